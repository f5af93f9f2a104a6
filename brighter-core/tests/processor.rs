//! The command processor: send, publish, registration errors, context.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use brighter_core::{
    Command, CommandProcessor, Error, ErrorKind, Event, Handler, Request, RequestContext,
    handler_fn,
};
use uuid::Uuid;

#[derive(Clone, Debug)]
struct Greet {
    id: Uuid,
}
impl Request for Greet {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Greet {}

#[derive(Clone, Debug)]
struct Greeted {
    id: Uuid,
}
impl Request for Greeted {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Event for Greeted {}

fn greet() -> Greet {
    Greet { id: Uuid::now_v7() }
}

#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);
impl<R: Request> Handler<R> for Counting {
    async fn handle(&self, _: &R, _: &mut RequestContext) -> Result<(), Error> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Failing(&'static str, Arc<AtomicUsize>);
impl<R: Request> Handler<R> for Failing {
    async fn handle(&self, _: &R, _: &mut RequestContext) -> Result<(), Error> {
        self.1.fetch_add(1, Ordering::SeqCst);
        Err(Error::handler(self.0))
    }
}

#[tokio::test]
async fn send_runs_the_one_handler() {
    let count = Counting::default();
    let processor = CommandProcessor::builder()
        .command::<Greet>(count.clone())
        .build()
        .unwrap();
    processor.send(&greet()).await.unwrap();
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn send_with_no_handler_errs_naming_the_type() {
    let processor = CommandProcessor::builder().build().unwrap();
    let err = processor.send(&greet()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoHandler);
    assert!(err.to_string().contains("Greet"), "{err}");
}

#[tokio::test]
async fn send_with_two_handlers_errs_naming_the_type() {
    let a = Counting::default();
    let b = Counting::default();
    let processor = CommandProcessor::builder()
        .command::<Greet>(a.clone())
        .command::<Greet>(b.clone())
        .build()
        .unwrap();
    let err = processor.send(&greet()).await.unwrap_err();
    assert!(
        matches!(err, Error::MultipleHandlers { count: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("Greet"), "{err}");
    assert_eq!(a.0.load(Ordering::SeqCst) + b.0.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn publish_runs_all_handlers_and_gathers_errors() {
    let ok = Counting::default();
    let bad1 = Arc::new(AtomicUsize::new(0));
    let bad2 = Arc::new(AtomicUsize::new(0));
    let processor = CommandProcessor::builder()
        .event::<Greeted>(Failing("first broke", bad1.clone()))
        .event::<Greeted>(ok.clone())
        .event::<Greeted>(Failing("second broke", bad2.clone()))
        .build()
        .unwrap();
    let err = processor
        .publish(&Greeted { id: Uuid::now_v7() })
        .await
        .unwrap_err();
    assert_eq!(ok.0.load(Ordering::SeqCst), 1);
    assert_eq!(bad1.load(Ordering::SeqCst), 1);
    assert_eq!(bad2.load(Ordering::SeqCst), 1);
    match err {
        Error::Publish {
            handlers, errors, ..
        } => {
            assert_eq!(handlers, 3);
            let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
            assert_eq!(messages.len(), 2);
            assert!(messages.iter().any(|m| m.contains("first broke")));
            assert!(messages.iter().any(|m| m.contains("second broke")));
        }
        other => panic!("expected Publish, got {other:?}"),
    }
}

#[tokio::test]
async fn publish_runs_handlers_concurrently() {
    // Two handlers that each wait for the other: only completes if they run at once.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let handler = |barrier: Arc<tokio::sync::Barrier>| {
        handler_fn(move |_: Greeted, _| {
            let barrier = barrier.clone();
            async move {
                barrier.wait().await;
                Ok(())
            }
        })
    };
    let processor = CommandProcessor::builder()
        .event(handler(barrier.clone()))
        .event(handler(barrier))
        .build()
        .unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        processor.publish(&Greeted { id: Uuid::now_v7() }),
    )
    .await
    .expect("handlers ran one after the other")
    .unwrap();
}

#[tokio::test]
async fn publish_with_no_handler_is_ok() {
    let processor = CommandProcessor::builder().build().unwrap();
    processor
        .publish(&Greeted { id: Uuid::now_v7() })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_panicking_handler_becomes_an_error() {
    struct Panics;
    impl Handler<Greet> for Panics {
        async fn handle(&self, _: &Greet, _: &mut RequestContext) -> Result<(), Error> {
            panic!("boom")
        }
    }
    let processor = CommandProcessor::builder().command(Panics).build().unwrap();
    let err = processor.send(&greet()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Panicked);
    assert!(err.to_string().contains("boom"));
}

#[tokio::test]
async fn context_carries_correlation_id_bag_and_sends_through_its_processor() {
    #[derive(Clone)]
    struct Tenant(&'static str);
    struct Unhandled {
        id: Uuid,
    }
    impl Request for Unhandled {
        fn id(&self) -> Uuid {
            self.id
        }
    }
    impl Command for Unhandled {}
    /// (correlation id, tenant from the bag, whether `ctx.send` reached the
    /// processor: it says no handler is registered) as the handler saw them.
    type Observed = Option<(Uuid, Option<&'static str>, bool)>;
    struct Inspect(Arc<std::sync::Mutex<Observed>>);
    impl Handler<Greet> for Inspect {
        async fn handle(&self, _: &Greet, ctx: &mut RequestContext) -> Result<(), Error> {
            *self.0.lock().unwrap() = Some((
                ctx.correlation_id(),
                ctx.bag().get::<Tenant>().map(|t| t.0),
                ctx.send(&Unhandled { id: Uuid::now_v7() })
                    .await
                    .is_err_and(|e| e.kind() == ErrorKind::NoHandler),
            ));
            Ok(())
        }
    }
    let seen = Arc::new(std::sync::Mutex::new(None));
    let processor = CommandProcessor::builder()
        .command(Inspect(seen.clone()))
        .build()
        .unwrap();

    // Default: the correlation id is the request id.
    let cmd = greet();
    processor.send(&cmd).await.unwrap();
    assert_eq!(seen.lock().unwrap().unwrap(), (cmd.id, None, true));

    // A caller's context keeps its correlation id and bag.
    let correlation = Uuid::now_v7();
    let mut ctx = RequestContext::new().with_correlation_id(correlation);
    ctx.bag_mut().insert(Tenant("acme"));
    processor.send_with(&greet(), &mut ctx).await.unwrap();
    assert_eq!(
        seen.lock().unwrap().unwrap(),
        (correlation, Some("acme"), true)
    );
}

#[tokio::test]
async fn closure_handlers_can_be_registered() {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let processor = CommandProcessor::builder()
        .command(handler_fn(move |_cmd: Greet, _ctx| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }))
        .build()
        .unwrap();
    processor.send(&greet()).await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_handler_can_publish_through_its_context() {
    struct Announce;
    impl Handler<Greet> for Announce {
        async fn handle(&self, cmd: &Greet, ctx: &mut RequestContext) -> Result<(), Error> {
            ctx.publish(&Greeted { id: cmd.id }).await
        }
    }
    let heard = Counting::default();
    let processor = CommandProcessor::builder()
        .command(Announce)
        .event::<Greeted>(heard.clone())
        .build()
        .unwrap();
    processor.send(&greet()).await.unwrap();
    assert_eq!(heard.0.load(Ordering::SeqCst), 1);
}
