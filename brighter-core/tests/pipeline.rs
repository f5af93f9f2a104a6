//! Each pipeline step on its own, and steps together.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brighter_core::pipeline::{
    CircuitBreaker, CircuitBreakerConfig, CircuitState, Fallback, FeatureSwitch, Pipeline,
    RequestTracing, Retry, Timeout, Validate, fallback_fn, step_fn,
};
use brighter_core::{
    Command, CommandProcessor, Error, ErrorKind, Handler, Request, RequestContext,
};
use tokio::time::Instant;
use uuid::Uuid;

#[derive(Clone, Debug)]
struct Pay {
    id: Uuid,
    amount: i64,
}
impl Request for Pay {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Pay {}

fn pay(amount: i64) -> Pay {
    Pay {
        id: Uuid::now_v7(),
        amount,
    }
}

/// Fails the first `fail_first` calls with `make_error`, then succeeds; records
/// the (paused-clock) time of each call.
#[derive(Clone)]
struct Flaky {
    calls: Arc<Mutex<Vec<Instant>>>,
    fail_first: usize,
    make_error: fn() -> Error,
}

impl Flaky {
    fn new(fail_first: usize, make_error: fn() -> Error) -> Self {
        Flaky {
            calls: Arc::default(),
            fail_first,
            make_error,
        }
    }
    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn gaps(&self) -> Vec<Duration> {
        let calls = self.calls.lock().unwrap();
        calls.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

impl Handler<Pay> for Flaky {
    async fn handle(&self, _: &Pay, _: &mut RequestContext) -> Result<(), Error> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            calls.len()
        };
        if n <= self.fail_first {
            Err((self.make_error)())
        } else {
            Ok(())
        }
    }
}

fn transient() -> Error {
    Error::handler("gateway unavailable")
}

fn processor<S, H>(pipeline: Pipeline<S>, handler: H) -> CommandProcessor
where
    H: Send + 'static,
    S: brighter_core::pipeline::Step<H> + Send,
    S::Handler: Handler<Pay>,
{
    CommandProcessor::builder()
        .command_with(pipeline, handler)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn retry_tries_max_attempts_with_exponential_backoff() {
    let flaky = Flaky::new(10, transient);
    let retry = Retry::new(4)
        .backoff(Duration::from_millis(100), Duration::from_secs(10))
        .jitter(false);
    let p = processor(Pipeline::new().step(retry), flaky.clone());
    let err = p.send(&pay(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Handler);
    assert_eq!(flaky.calls(), 4);
    let gaps = flaky.gaps();
    assert_eq!(gaps.len(), 3);
    for (gap, expected) in gaps.into_iter().zip([100u64, 200, 400]) {
        // Tokio's timer rounds a sleep up to its next 1 ms tick.
        let expected = Duration::from_millis(expected);
        assert!(
            gap >= expected && gap <= expected + Duration::from_millis(1),
            "gap {gap:?}, expected {expected:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_stops_at_first_success() {
    let flaky = Flaky::new(2, transient);
    let retry = Retry::new(5).backoff(Duration::from_millis(10), Duration::from_secs(1));
    let p = processor(Pipeline::new().step(retry), flaky.clone());
    p.send(&pay(1)).await.unwrap();
    assert_eq!(flaky.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn retry_backoff_is_capped_and_jitter_stays_within_one_delay() {
    let flaky = Flaky::new(10, transient);
    let retry = Retry::new(6)
        .backoff(Duration::from_millis(100), Duration::from_millis(300))
        .jitter(true);
    let p = processor(Pipeline::new().step(retry), flaky.clone());
    p.send(&pay(1)).await.unwrap_err();
    let base = [100u64, 200, 300, 300, 300];
    for (gap, base) in flaky.gaps().into_iter().zip(base) {
        let base = Duration::from_millis(base);
        assert!(
            gap >= base && gap <= base * 2 + Duration::from_millis(1),
            "gap {gap:?} for base {base:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_if_stops_retries() {
    let flaky = Flaky::new(10, || Error::Timeout(Duration::from_secs(1)));
    let retry = Retry::new(5).retry_if(|e| e.kind() == ErrorKind::Handler);
    let p = processor(Pipeline::new().step(retry), flaky.clone());
    let err = p.send(&pay(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(flaky.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn fatal_errors_and_outcomes_are_not_retried() {
    for make in [
        (|| Error::fatal("card declined")) as fn() -> Error,
        || Error::defer(Duration::from_secs(1)),
        || Error::reject("bad"),
        Error::dont_ack,
    ] {
        let flaky = Flaky::new(10, make);
        let p = processor(Pipeline::new().step(Retry::new(5)), flaky.clone());
        p.send(&pay(1)).await.unwrap_err();
        assert_eq!(flaky.calls(), 1, "{:?}", make());
    }
}

#[tokio::test(start_paused = true)]
async fn validation_failure_is_not_retried() {
    let flaky = Flaky::new(0, transient);
    let pipeline = Pipeline::new()
        .step(Retry::new(5))
        .step(Validate::new(|p: &Pay| {
            if p.amount > 0 {
                Ok(())
            } else {
                Err(format!("amount must be positive, got {}", p.amount))
            }
        }));
    let p = processor(pipeline, flaky.clone());
    let err = p.send(&pay(-5)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation);
    assert!(err.to_string().contains("amount must be positive"));
    assert_eq!(
        flaky.calls(),
        0,
        "the handler never sees an invalid request"
    );
    p.send(&pay(5)).await.unwrap();
    assert_eq!(flaky.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn breaker_goes_closed_open_half_open_closed_and_open_again() {
    let failing = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    struct Switchable(Arc<AtomicBool>, Arc<AtomicUsize>);
    impl Handler<Pay> for Switchable {
        async fn handle(&self, _: &Pay, _: &mut RequestContext) -> Result<(), Error> {
            self.1.fetch_add(1, Ordering::SeqCst);
            if self.0.load(Ordering::SeqCst) {
                Err(Error::handler("down"))
            } else {
                Ok(())
            }
        }
    }
    let breaker = CircuitBreaker::new(
        "payments",
        CircuitBreakerConfig::new(3, Duration::from_secs(30)),
    );
    let p = processor(
        Pipeline::new().step(breaker.clone()),
        Switchable(failing.clone(), calls.clone()),
    );

    // Closed: three failures reach the handler, then it opens.
    for _ in 0..3 {
        assert_eq!(
            p.send(&pay(1)).await.unwrap_err().kind(),
            ErrorKind::Handler
        );
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    // Open: fails fast without calling the handler.
    let err = p.send(&pay(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    assert!(err.to_string().contains("payments"));
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // After the open duration: half-open; a failed trial opens it again.
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
    assert_eq!(
        p.send(&pay(1)).await.unwrap_err().kind(),
        ErrorKind::Handler
    );
    assert_eq!(breaker.state(), CircuitState::Open);
    assert_eq!(
        p.send(&pay(1)).await.unwrap_err().kind(),
        ErrorKind::CircuitOpen
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    // Half-open again; a successful trial closes it.
    tokio::time::advance(Duration::from_secs(31)).await;
    failing.store(false, Ordering::SeqCst);
    p.send(&pay(1)).await.unwrap();
    assert_eq!(breaker.state(), CircuitState::Closed);
    p.send(&pay(1)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 6);

    // And a new run of failures opens it again.
    failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        p.send(&pay(1)).await.unwrap_err();
    }
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn half_open_breaker_lets_one_trial_through_at_a_time() {
    let breaker = CircuitBreaker::new("slow", CircuitBreakerConfig::new(1, Duration::from_secs(5)));
    struct Slow;
    impl Handler<Pay> for Slow {
        async fn handle(&self, p: &Pay, _: &mut RequestContext) -> Result<(), Error> {
            if p.amount < 0 {
                return Err(Error::handler("down"));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(())
        }
    }
    let p = processor(Pipeline::new().step(breaker.clone()), Slow);
    p.send(&pay(-1)).await.unwrap_err();
    tokio::time::advance(Duration::from_secs(6)).await;
    let (a, b) = (pay(1), pay(1));
    let trial = p.send(&a);
    let second = p.send(&b);
    let (trial, second) = tokio::join!(trial, second);
    trial.unwrap();
    assert_eq!(second.unwrap_err().kind(), ErrorKind::CircuitOpen);
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn named_breaker_is_shared_by_several_handlers() {
    #[derive(Clone, Debug)]
    struct Refund {
        id: Uuid,
    }
    impl Request for Refund {
        fn id(&self) -> Uuid {
            self.id
        }
    }
    impl Command for Refund {}
    struct Down;
    impl<R: Request> Handler<R> for Down {
        async fn handle(&self, _: &R, _: &mut RequestContext) -> Result<(), Error> {
            Err(Error::handler("gateway down"))
        }
    }
    let p = CommandProcessor::builder()
        .circuit_breaker(
            "gateway",
            CircuitBreakerConfig::new(2, Duration::from_secs(60)),
        )
        // Down handles any request: the request type is named.
        .command_with::<Pay, _, _>(Pipeline::new().step(CircuitBreaker::named("gateway")), Down)
        .command_with::<Refund, _, _>(Pipeline::new().step(CircuitBreaker::named("gateway")), Down)
        .build()
        .unwrap();
    p.send(&pay(1)).await.unwrap_err();
    p.send(&Refund { id: Uuid::now_v7() }).await.unwrap_err();
    // Two failures across two handlers opened the shared breaker.
    let err = p.send(&pay(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    let err = p.send(&Refund { id: Uuid::now_v7() }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    assert_eq!(
        p.resources().circuit_breaker("gateway").unwrap().state(),
        CircuitState::Open
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_cancels_the_handler() {
    let finished = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicBool::new(false));
    struct DropFlag(Arc<AtomicBool>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    struct Slow(Arc<AtomicBool>, Arc<AtomicBool>);
    impl Handler<Pay> for Slow {
        async fn handle(&self, _: &Pay, _: &mut RequestContext) -> Result<(), Error> {
            let _flag = DropFlag(self.1.clone());
            tokio::time::sleep(Duration::from_secs(60)).await;
            self.0.store(true, Ordering::SeqCst);
            Ok(())
        }
    }
    let p = processor(
        Pipeline::new().step(Timeout::new(Duration::from_millis(250))),
        Slow(finished.clone(), dropped.clone()),
    );
    let started = Instant::now();
    let err = p.send(&pay(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert!(dropped.load(Ordering::SeqCst), "handler future was dropped");
    assert!(!finished.load(Ordering::SeqCst));
}

#[tokio::test]
async fn feature_switch_off_skips_the_handler() {
    let flaky = Flaky::new(0, transient);
    let p = processor(Pipeline::new().step(FeatureSwitch::Off), flaky.clone());
    p.send(&pay(1)).await.unwrap();
    assert_eq!(flaky.calls(), 0);
}

#[tokio::test]
async fn feature_switch_follows_configuration_at_run_time() {
    let enabled = Arc::new(AtomicBool::new(false));
    let flags = enabled.clone();
    let flaky = Flaky::new(0, transient);
    let p = CommandProcessor::builder()
        .feature_flags(move |feature: &str| feature == "payments" && flags.load(Ordering::SeqCst))
        .command_with(
            Pipeline::new().step(FeatureSwitch::configured("payments")),
            flaky.clone(),
        )
        .build()
        .unwrap();
    p.send(&pay(1)).await.unwrap();
    assert_eq!(flaky.calls(), 0);
    enabled.store(true, Ordering::SeqCst);
    p.send(&pay(1)).await.unwrap();
    assert_eq!(flaky.calls(), 1);
}

#[tokio::test]
async fn fallback_runs_on_failure_with_the_error() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    let fallback = fallback_fn(move |p: Pay, _ctx, error: Error| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(format!("{} {error}", p.amount));
            Ok(())
        }
    });
    let flaky = Flaky::new(1, transient);
    let p = processor(Pipeline::new().step(Fallback::new(fallback)), flaky.clone());
    p.send(&pay(7)).await.unwrap();
    p.send(&pay(8)).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["7 handler failed: gateway unavailable".to_owned()]
    );
    assert_eq!(flaky.calls(), 2);
}

#[tokio::test]
async fn steps_run_in_declared_order() {
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let step = |name: &'static str, log: Arc<Mutex<Vec<String>>>| {
        step_fn(move |p: &Pay, ctx, next| {
            let log = log.clone();
            Box::pin(async move {
                log.lock().unwrap().push(format!("{name} before"));
                let result = next.run(p, ctx).await;
                log.lock().unwrap().push(format!("{name} after"));
                result
            })
        })
    };
    let handler_log = log.clone();
    let handler = brighter_core::handler_fn(move |_: Pay, _| {
        let log = handler_log.clone();
        async move {
            log.lock().unwrap().push("handler".into());
            Ok(())
        }
    });
    let p = processor(
        Pipeline::new()
            .step(step("first", log.clone()))
            .step(RequestTracing)
            .step(step("second", log.clone()))
            .step(step("third", log.clone())),
        handler,
    );
    p.send(&pay(1)).await.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            "first before",
            "second before",
            "third before",
            "handler",
            "third after",
            "second after",
            "first after"
        ]
    );
}

#[test]
fn a_pipeline_naming_an_unregistered_breaker_fails_at_build() {
    let err = CommandProcessor::builder()
        .command_with(
            Pipeline::new().step(CircuitBreaker::named("nope")),
            Flaky::new(0, transient),
        )
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration);
    assert!(err.to_string().contains("'nope'"), "{err}");
    assert!(err.to_string().contains("Pay"), "{err}");
}

#[test]
fn a_configured_feature_switch_without_flags_fails_at_build() {
    let err = CommandProcessor::builder()
        .command_with(
            Pipeline::new().step(FeatureSwitch::configured("payments")),
            Flaky::new(0, transient),
        )
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration);
    assert!(err.to_string().contains("feature flags"), "{err}");
}

#[test]
fn impossible_step_settings_fail_at_build() {
    let cases: Vec<Result<CommandProcessor, Error>> = vec![
        CommandProcessor::builder()
            .command_with(
                Pipeline::new().step(Retry::new(0)),
                Flaky::new(0, transient),
            )
            .build(),
        CommandProcessor::builder()
            .command_with(
                Pipeline::new().step(Retry::new(3).factor(0.5)),
                Flaky::new(0, transient),
            )
            .build(),
        CommandProcessor::builder()
            .command_with(
                Pipeline::new().step(Timeout::new(Duration::ZERO)),
                Flaky::new(0, transient),
            )
            .build(),
        CommandProcessor::builder()
            .circuit_breaker("b", CircuitBreakerConfig::new(0, Duration::from_secs(1)))
            .build(),
    ];
    for case in cases {
        assert_eq!(case.unwrap_err().kind(), ErrorKind::Configuration);
    }
}

#[tokio::test(start_paused = true)]
async fn retry_breaker_and_timeout_compose() {
    // Timeouts count as failures for the breaker and are retried.
    struct Hangs(Arc<AtomicUsize>);
    impl Handler<Pay> for Hangs {
        async fn handle(&self, _: &Pay, _: &mut RequestContext) -> Result<(), Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::future::pending().await
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let breaker = CircuitBreaker::new("b", CircuitBreakerConfig::new(3, Duration::from_secs(60)));
    let p = processor(
        Pipeline::new()
            .step(RequestTracing)
            .step(Retry::new(5).backoff(Duration::from_millis(10), Duration::from_millis(10)))
            .step(breaker.clone())
            .step(Timeout::new(Duration::from_millis(100))),
        Hangs(calls.clone()),
    );
    let err = p.send(&pay(1)).await.unwrap_err();
    // 3 timeouts open the breaker; the 4th attempt fails fast and is not retried.
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(breaker.state(), CircuitState::Open);
}
