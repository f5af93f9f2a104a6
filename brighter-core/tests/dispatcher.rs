//! The message pump: one test per outcome, shutdown, the supervisor, health,
//! starting and stopping subscriptions.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::pipeline::{CircuitBreaker, CircuitBreakerConfig, Pipeline, Retry};
use brighter_core::{
    Channel, ChannelFactory, ChannelSpec, Command, CommandProcessor, Delivery, Dispatcher, Error,
    ErrorKind, Event, Handler, InMemoryBroker, Message, MessageHeader, MessageType, Publication,
    Request, RequestContext, Subscription, SubscriptionState,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: Uuid,
    n: u32,
}
impl Request for Job {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Job {}

fn job(n: u32) -> Job {
    Job {
        id: Uuid::now_v7(),
        n,
    }
}

/// What the handler saw: (job number, handled count of the message, when).
type Seen = Arc<Mutex<Vec<(u32, u32, Instant)>>>;

/// Decides what the handler returns for a job on its n-th call (from 1).
type Script = Arc<dyn Fn(&Job, usize) -> Result<(), Error> + Send + Sync>;

/// A handler whose behaviour per call is scripted by a closure.
#[derive(Clone)]
struct Scripted {
    seen: Seen,
    script: Script,
}

impl Scripted {
    fn new(script: impl Fn(&Job, usize) -> Result<(), Error> + Send + Sync + 'static) -> Self {
        Scripted {
            seen: Arc::default(),
            script: Arc::new(script),
        }
    }
    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Handler<Job> for Scripted {
    async fn handle(&self, job: &Job, ctx: &mut RequestContext) -> Result<(), Error> {
        let handled_count = ctx.message().map_or(0, |m| m.header.handled_count);
        let call = {
            let mut seen = self.seen.lock().unwrap();
            seen.push((job.n, handled_count, Instant::now()));
            seen.len()
        };
        (self.script)(job, call)
    }
}

const TOPIC: &str = "jobs";
const QUEUE: &str = "jobs-q";

struct Rig {
    broker: InMemoryBroker,
    processor: CommandProcessor,
    dispatcher: Dispatcher,
}

fn rig_with<S, H>(
    pipeline: Pipeline<S>,
    handler: H,
    configure: impl FnOnce(Subscription) -> Subscription,
) -> Rig
where
    H: Send + 'static,
    S: brighter_core::pipeline::Step<H> + Send,
    S::Handler: Handler<Job>,
{
    let broker = InMemoryBroker::new();
    broker.declare(TOPIC, QUEUE).unwrap();
    let processor = CommandProcessor::builder()
        .command_with(pipeline, handler)
        .publication::<Job>(Publication::command(TOPIC))
        .producer(broker.clone())
        .build()
        .unwrap();
    let subscription = Subscription::command::<Job>("jobs", TOPIC, broker.clone())
        .channel(QUEUE)
        .empty_channel_delay(Duration::from_millis(5))
        .receive_timeout(Duration::from_millis(100))
        .requeue_delay(Duration::from_millis(50));
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(configure(subscription))
        .build()
        .unwrap();
    Rig {
        broker,
        processor,
        dispatcher,
    }
}

fn rig(handler: Scripted, configure: impl FnOnce(Subscription) -> Subscription) -> Rig {
    rig_with(Pipeline::new(), handler, configure)
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn success_acks_the_message() {
    let handler = Scripted::new(|_, _| Ok(()));
    let rig = rig(handler.clone(), |s| s);
    rig.dispatcher.start().await.unwrap();
    rig.processor.post(&job(1)).await.unwrap();
    eventually("handled", || handler.calls() == 1).await;
    eventually("acked", || rig.broker.in_flight(QUEUE) == 0).await;
    rig.dispatcher.shutdown().await;
    assert_eq!(rig.broker.waiting(QUEUE), 0);
    assert!(rig.broker.dead_letters(QUEUE).is_empty());
    assert_eq!(
        rig.dispatcher.subscription_health("jobs").unwrap().handled,
        1
    );
}

#[tokio::test]
async fn defer_requeues_after_the_delay_with_handled_count_incremented() {
    let delay = Duration::from_millis(300);
    let handler = Scripted::new(move |_, call| {
        if call == 1 {
            Err(Error::defer(delay))
        } else {
            Ok(())
        }
    });
    let rig = rig(handler.clone(), |s| s);
    rig.dispatcher.start().await.unwrap();
    rig.processor.post(&job(1)).await.unwrap();
    eventually("handled twice", || handler.calls() == 2).await;
    rig.dispatcher.shutdown().await;
    let seen = handler.seen.lock().unwrap().clone();
    assert_eq!((seen[0].1, seen[1].1), (0, 1), "handled count 0 then 1");
    let waited = seen[1].2 - seen[0].2;
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, delay was {delay:?}"
    );
    let health = rig.dispatcher.subscription_health("jobs").unwrap();
    assert_eq!((health.deferred, health.handled), (1, 1));
}

#[tokio::test]
async fn exhausted_requeue_count_dead_letters_with_the_reason() {
    let handler = Scripted::new(|_, _| Err(Error::defer(Duration::from_millis(10))));
    let rig = rig(handler.clone(), |s| s.requeue_count(2));
    rig.dispatcher.start().await.unwrap();
    let id = rig.processor.post(&job(1)).await.unwrap();
    eventually("dead-lettered", || {
        rig.broker.dead_letters(QUEUE).len() == 1
    })
    .await;
    rig.dispatcher.shutdown().await;
    // requeue_count 2: two requeues, so three deliveries, then the dead letter.
    assert_eq!(handler.calls(), 3);
    let counts: Vec<u32> = handler.seen.lock().unwrap().iter().map(|s| s.1).collect();
    assert_eq!(counts, vec![0, 1, 2]);
    let dead = &rig.broker.dead_letters(QUEUE)[0];
    assert_eq!(dead.message.id(), id);
    assert!(
        dead.reason.contains("requeue count exhausted"),
        "{}",
        dead.reason
    );
}

#[tokio::test]
async fn handler_error_after_retries_is_dead_lettered_never_acked() {
    let handler = Scripted::new(|_, _| Err(Error::handler("database is down")));
    let retry = Retry::new(3).backoff(Duration::from_millis(1), Duration::from_millis(5));
    let rig = rig_with(Pipeline::new().step(retry), handler.clone(), |s| s);
    rig.dispatcher.start().await.unwrap();
    let id = rig.processor.post(&job(1)).await.unwrap();
    eventually("dead-lettered", || {
        rig.broker.dead_letters(QUEUE).len() == 1
    })
    .await;
    rig.dispatcher.shutdown().await;
    assert_eq!(handler.calls(), 3, "the pipeline's retries ran first");
    let dead = &rig.broker.dead_letters(QUEUE)[0];
    assert_eq!(dead.message.id(), id);
    assert!(dead.reason.contains("database is down"), "{}", dead.reason);
    assert_eq!(
        rig.dispatcher.subscription_health("jobs").unwrap().handled,
        0
    );
}

#[tokio::test]
async fn reject_outcome_dead_letters_with_the_reason() {
    let handler = Scripted::new(|_, _| Err(Error::reject("order 7 does not exist")));
    let rig = rig(handler.clone(), |s| s);
    rig.dispatcher.start().await.unwrap();
    rig.processor.post(&job(1)).await.unwrap();
    eventually("dead-lettered", || {
        rig.broker.dead_letters(QUEUE).len() == 1
    })
    .await;
    rig.dispatcher.shutdown().await;
    assert_eq!(handler.calls(), 1);
    assert_eq!(
        rig.broker.dead_letters(QUEUE)[0].reason,
        "order 7 does not exist"
    );
}

#[tokio::test]
async fn unmappable_message_goes_to_the_invalid_channel_and_the_pump_goes_on() {
    let handler = Scripted::new(|_, _| Ok(()));
    let rig = rig(handler.clone(), |s| s);
    rig.dispatcher.start().await.unwrap();
    let mut bad = Message::new(
        MessageHeader::new(TOPIC, MessageType::Command),
        br#"{"id":"not-a-uuid"}"#.to_vec(),
    );
    bad.header.content_type = "application/json".into();
    use brighter_core::Producer;
    rig.broker.send(&bad).await.unwrap();
    rig.processor.post(&job(2)).await.unwrap();
    eventually("good one handled", || handler.calls() == 1).await;
    eventually("bad one parked", || {
        rig.broker.invalid_messages(QUEUE).len() == 1
    })
    .await;
    rig.dispatcher.shutdown().await;
    let invalid = &rig.broker.invalid_messages(QUEUE)[0];
    assert_eq!(invalid.message.id(), bad.id());
    assert!(invalid.reason.contains("Job"), "{}", invalid.reason);
    assert_eq!(
        rig.dispatcher.subscription_health("jobs").unwrap().invalid,
        1
    );
}

#[tokio::test]
async fn unacceptable_message_limit_stops_the_performer() {
    let handler = Scripted::new(|_, _| Ok(()));
    let rig = rig(handler.clone(), |s| s.unacceptable_message_limit(2));
    use brighter_core::Producer;
    for _ in 0..3 {
        let bad = Message::new(
            MessageHeader::new(TOPIC, MessageType::Command),
            b"garbage".to_vec(),
        );
        rig.broker.send(&bad).await.unwrap();
    }
    rig.dispatcher.start().await.unwrap();
    eventually("failed", || {
        matches!(
            rig.dispatcher.subscription_health("jobs").unwrap().state,
            SubscriptionState::Failed(_)
        )
    })
    .await;
    let health = rig.dispatcher.subscription_health("jobs").unwrap();
    assert_eq!(health.invalid, 2);
    assert_eq!(health.performers_running, 0);
    assert!(!health.is_healthy());
    assert_eq!(
        rig.broker.waiting(QUEUE),
        1,
        "the third bad message was not consumed"
    );
    rig.dispatcher.shutdown().await;
}

#[tokio::test]
async fn dont_ack_leaves_the_message_and_pauses() {
    let handler = Scripted::new(|_, call| {
        if call == 1 {
            Err(Error::dont_ack())
        } else {
            Ok(())
        }
    });
    let pause = Duration::from_millis(300);
    let rig = rig(handler.clone(), |s| s.dont_ack_delay(pause));
    rig.dispatcher.start().await.unwrap();
    rig.processor.post(&job(1)).await.unwrap();
    eventually("handled twice", || handler.calls() == 2).await;
    rig.dispatcher.shutdown().await;
    let seen = handler.seen.lock().unwrap().clone();
    assert_eq!(
        seen[1].1, 0,
        "a nack is not a requeue: handled count unchanged"
    );
    assert!(seen[1].2 - seen[0].2 >= pause, "the pump paused");
    let health = rig.dispatcher.subscription_health("jobs").unwrap();
    assert_eq!((health.not_acked, health.handled), (1, 1));
}

/// Found by the chaos suite (restarting Postgres mid-stream): a handler whose
/// database was away failed with a store error, and the pump dead-lettered
/// healthy messages. An unavailable dependency now leaves the message for
/// redelivery, however many times, without touching its requeue count.
#[tokio::test]
async fn an_unavailable_dependency_leaves_the_message_for_redelivery_not_the_dlq() {
    let handler = Scripted::new(|_, call| {
        if call <= 5 {
            Err(Error::unavailable("insert the order", "connection refused"))
        } else {
            Ok(())
        }
    });
    let rig = rig(handler.clone(), |s| {
        s.dont_ack_delay(Duration::from_millis(10)).requeue_count(1)
    });
    rig.dispatcher.start().await.unwrap();
    rig.processor.post(&job(1)).await.unwrap();
    eventually("handled after the outage", || handler.calls() == 6).await;
    eventually("acked", || rig.broker.in_flight(QUEUE) == 0).await;
    rig.dispatcher.shutdown().await;
    assert!(rig.broker.dead_letters(QUEUE).is_empty());
    let health = rig.dispatcher.subscription_health("jobs").unwrap();
    assert_eq!(
        (health.not_acked, health.handled, health.dead_lettered),
        (5, 1, 0)
    );
    let seen = handler.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|(_, count, _)| *count == 0),
        "no requeue counted"
    );
    assert!(Error::unavailable("x", "y").is_retryable());
    assert_eq!(Error::unavailable("x", "y").kind(), ErrorKind::Unavailable);
}

#[tokio::test]
async fn an_open_circuit_breaker_leaves_messages_for_redelivery_not_the_dlq() {
    // Two failures open the breaker; every message after that meets the open
    // breaker, which is the service's trouble, not the message's: none of
    // them may be dead-lettered, and each is handled once the breaker closes.
    let handler = Scripted::new(|_, call| {
        if call <= 2 {
            Err(Error::handler("downstream refused"))
        } else {
            Ok(())
        }
    });
    let breaker = CircuitBreaker::new(
        "downstream",
        CircuitBreakerConfig::new(2, Duration::from_millis(300)),
    );
    let rig = rig_with(Pipeline::new().step(breaker), handler.clone(), |s| {
        s.dont_ack_delay(Duration::from_millis(20))
    });
    rig.dispatcher.start().await.unwrap();
    for n in 0..10 {
        rig.processor.post(&job(n)).await.unwrap();
    }
    eventually("the eight after the breaker opened are handled", || {
        rig.dispatcher.subscription_health("jobs").unwrap().handled == 8
    })
    .await;
    rig.dispatcher.shutdown().await;
    let dead: Vec<String> = rig
        .broker
        .dead_letters(QUEUE)
        .into_iter()
        .map(|p| p.reason)
        .collect();
    assert_eq!(dead.len(), 2, "only the two real failures: {dead:?}");
    assert!(
        dead.iter().all(|r| r.contains("downstream refused")),
        "{dead:?}"
    );
    let health = rig.dispatcher.subscription_health("jobs").unwrap();
    assert!(
        health.not_acked > 0,
        "left for redelivery while open: {health:?}"
    );
}

/// A body over the subscription's size limit, or a message with more header
/// entries than its limit, is moved to the invalid-message channel unread.
#[tokio::test]
async fn messages_over_the_size_or_header_limits_are_invalid() {
    let handler = Scripted::new(|_, _| Ok(()));
    let rig = rig(handler.clone(), |s| {
        s.max_body_size(1024).max_header_count(8)
    });
    rig.dispatcher.start().await.unwrap();
    use brighter_core::Producer;
    let mut big = Message::new(
        MessageHeader::new(TOPIC, MessageType::Command),
        serde_json::to_vec(
            &serde_json::json!({"id": Uuid::now_v7(), "n": 1, "pad": "x".repeat(2048)}),
        )
        .unwrap(),
    );
    big.header.content_type = "application/json".into();
    rig.broker.send(&big).await.unwrap();
    let mut crowded = Message::new(
        MessageHeader::new(TOPIC, MessageType::Command),
        serde_json::to_vec(&job(2)).unwrap(),
    );
    crowded.header.content_type = "application/json".into();
    for i in 0..9 {
        crowded
            .header
            .bag
            .insert(format!("x-extra-{i}"), "1".into());
    }
    rig.broker.send(&crowded).await.unwrap();
    rig.processor.post(&job(3)).await.unwrap();
    eventually("both parked", || {
        rig.broker.invalid_messages(QUEUE).len() == 2
    })
    .await;
    eventually("the good one handled", || handler.calls() == 1).await;
    rig.dispatcher.shutdown().await;
    let invalid = rig.broker.invalid_messages(QUEUE);
    assert!(
        invalid[0]
            .reason
            .contains("over the subscription's limit of 1024 bytes"),
        "{}",
        invalid[0].reason
    );
    assert!(
        invalid[1].reason.contains("9 extra header entries"),
        "{}",
        invalid[1].reason
    );
    assert_eq!(handler.seen.lock().unwrap()[0].0, 3);
}

#[tokio::test]
async fn a_panicking_handler_is_dead_lettered_and_the_dispatcher_goes_on() {
    let handler = Scripted::new(|job, _| {
        if job.n == 1 {
            panic!("handler bug")
        } else {
            Ok(())
        }
    });
    let rig = rig(handler.clone(), |s| s);
    rig.dispatcher.start().await.unwrap();
    rig.processor.post(&job(1)).await.unwrap();
    rig.processor.post(&job(2)).await.unwrap();
    eventually("both seen", || handler.calls() == 2).await;
    eventually("dead-lettered", || {
        rig.broker.dead_letters(QUEUE).len() == 1
    })
    .await;
    rig.dispatcher.shutdown().await;
    assert!(
        rig.broker.dead_letters(QUEUE)[0]
            .reason
            .contains("handler bug")
    );
    assert_eq!(
        rig.dispatcher.subscription_health("jobs").unwrap().handled,
        1
    );
}

/// Opens in-memory channels whose first `crashes` receives panic: a performer
/// that dies for a reason outside the handler.
struct Crashing {
    broker: InMemoryBroker,
    crashes: Arc<AtomicUsize>,
    /// Every dead-letter publish fails (a DLQ that is gone or full).
    reject_fails: bool,
}

struct CrashingChannel {
    inner: Box<dyn Channel>,
    crashes: Arc<AtomicUsize>,
    reject_fails: bool,
}

#[async_trait]
impl ChannelFactory for Crashing {
    async fn create_channel(&self, spec: &ChannelSpec) -> Result<Box<dyn Channel>, Error> {
        Ok(Box::new(CrashingChannel {
            inner: self.broker.create_channel(spec).await?,
            crashes: Arc::clone(&self.crashes),
            reject_fails: self.reject_fails,
        }))
    }
}

#[async_trait]
impl Channel for CrashingChannel {
    async fn receive(&mut self, timeout: Duration) -> Result<Option<Delivery>, Error> {
        if self
            .crashes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("transport bug");
        }
        self.inner.receive(timeout).await
    }
    async fn ack(&mut self, d: &Delivery) -> Result<(), Error> {
        self.inner.ack(d).await
    }
    async fn requeue(&mut self, d: Delivery, delay: Duration) -> Result<(), Error> {
        self.inner.requeue(d, delay).await
    }
    async fn reject(&mut self, d: Delivery, reason: &str) -> Result<(), Error> {
        if self.reject_fails {
            return Err(Error::transport(
                "dead-letter publish",
                "the DLQ refused it",
            ));
        }
        self.inner.reject(d, reason).await
    }
    async fn invalid(&mut self, d: Delivery, reason: &str) -> Result<(), Error> {
        self.inner.invalid(d, reason).await
    }
    async fn nack(&mut self, d: Delivery) -> Result<(), Error> {
        self.inner.nack(d).await
    }
    async fn close(&mut self) -> Result<(), Error> {
        self.inner.close().await
    }
}

#[tokio::test]
async fn the_supervisor_restarts_a_crashed_performer() {
    let handler = Scripted::new(|_, _| Ok(()));
    let broker = InMemoryBroker::new();
    broker.declare(TOPIC, QUEUE).unwrap();
    let processor = CommandProcessor::builder()
        .command(handler.clone())
        .publication::<Job>(Publication::command(TOPIC))
        .producer(broker.clone())
        .build()
        .unwrap();
    let factory = Crashing {
        broker: broker.clone(),
        crashes: Arc::new(AtomicUsize::new(2)),
        reject_fails: false,
    };
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Job>("jobs", TOPIC, factory)
                .channel(QUEUE)
                .receive_timeout(Duration::from_millis(50))
                .restart_delay(Duration::from_millis(10), Duration::from_millis(50)),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    processor.post(&job(1)).await.unwrap();
    eventually("handled after restarts", || handler.calls() == 1).await;
    let health = dispatcher.subscription_health("jobs").unwrap();
    assert_eq!(health.restarts, 2);
    assert!(health.last_error.clone().unwrap().contains("transport bug"));
    assert!(health.is_healthy());
    dispatcher.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_and_acks_the_message_in_hand() {
    let started = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicUsize::new(0));
    struct Slow(Arc<tokio::sync::Notify>, Arc<AtomicUsize>);
    impl Handler<Job> for Slow {
        async fn handle(&self, _: &Job, _: &mut RequestContext) -> Result<(), Error> {
            self.0.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let rig = rig_with(
        Pipeline::new(),
        Slow(started.clone(), finished.clone()),
        |s| s,
    );
    rig.dispatcher.start().await.unwrap();
    rig.processor.post(&job(1)).await.unwrap();
    rig.processor.post(&job(2)).await.unwrap();
    started.notified().await;
    rig.dispatcher.shutdown().await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "the message in hand was finished"
    );
    assert_eq!(rig.broker.in_flight(QUEUE), 0, "and acked");
    assert_eq!(rig.broker.waiting(QUEUE), 1, "the other one was not taken");
    let health = rig.dispatcher.subscription_health("jobs").unwrap();
    assert_eq!(health.state, SubscriptionState::Stopped);
    assert_eq!(health.performers_running, 0);
}

#[tokio::test]
async fn subscriptions_start_and_stop_at_run_time_with_health() {
    let handler = Scripted::new(|_, _| Ok(()));
    let rig = rig(handler.clone(), |s| s.performers(3));
    let health = rig.dispatcher.subscription_health("jobs").unwrap();
    assert_eq!(health.state, SubscriptionState::Stopped);

    rig.dispatcher.start_subscription("jobs").await.unwrap();
    eventually("all performers up", || {
        rig.dispatcher
            .subscription_health("jobs")
            .unwrap()
            .is_healthy()
    })
    .await;
    rig.processor.post(&job(1)).await.unwrap();
    eventually("handled", || handler.calls() == 1).await;

    rig.dispatcher.stop_subscription("jobs").await.unwrap();
    rig.processor.post(&job(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(handler.calls(), 1, "stopped subscriptions consume nothing");
    assert_eq!(rig.broker.waiting(QUEUE), 1);

    rig.dispatcher.start_subscription("jobs").await.unwrap();
    eventually("handled after restart", || handler.calls() == 2).await;
    rig.dispatcher.shutdown().await;
    let err = rig.dispatcher.start_subscription("nope").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration);
}

#[tokio::test]
async fn performers_compete_for_one_channel_one_message_each() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let (i, m) = (in_flight.clone(), max_in_flight.clone());
    #[derive(Clone)]
    struct Concurrency(Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>);
    impl Handler<Job> for Concurrency {
        async fn handle(&self, _: &Job, _: &mut RequestContext) -> Result<(), Error> {
            let now = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            self.1.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.0.fetch_sub(1, Ordering::SeqCst);
            self.2.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let done = Arc::new(AtomicUsize::new(0));
    let rig = rig_with(Pipeline::new(), Concurrency(i, m, done.clone()), |s| {
        s.performers(3)
    });
    rig.dispatcher.start().await.unwrap();
    let jobs: Vec<Job> = (0..12).map(job).collect();
    let ids = rig.processor.deposit_post_batch(&jobs, None).await.unwrap();
    rig.processor.clear_outbox(&ids).await.unwrap();
    eventually("all handled", || done.load(Ordering::SeqCst) == 12).await;
    rig.dispatcher.shutdown().await;
    assert_eq!(
        max_in_flight.load(Ordering::SeqCst),
        3,
        "three reactors, one message each"
    );
}

#[tokio::test]
async fn a_single_performer_handles_messages_one_at_a_time_in_order() {
    let handler = Scripted::new(|_, _| Ok(()));
    let rig = rig(handler.clone(), |s| s);
    let jobs: Vec<Job> = (0..25).map(job).collect();
    let ids = rig.processor.deposit_post_batch(&jobs, None).await.unwrap();
    rig.processor.clear_outbox(&ids).await.unwrap();
    rig.dispatcher.start().await.unwrap();
    eventually("all handled", || handler.calls() == 25).await;
    rig.dispatcher.shutdown().await;
    let order: Vec<u32> = handler.seen.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(order, (0..25).collect::<Vec<_>>());
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Happened {
    id: Uuid,
}
impl Request for Happened {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Event for Happened {}

#[tokio::test]
async fn an_event_subscription_runs_every_handler() {
    let count = Arc::new(AtomicUsize::new(0));
    #[derive(Clone)]
    struct Count(Arc<AtomicUsize>);
    impl Handler<Happened> for Count {
        async fn handle(&self, _: &Happened, _: &mut RequestContext) -> Result<(), Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let broker = InMemoryBroker::new();
    let processor = CommandProcessor::builder()
        .event(Count(count.clone()))
        .event(Count(count.clone()))
        .publication::<Happened>(Publication::event("happened"))
        .producer(broker.clone())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::event::<Happened>(
            "audit",
            "happened",
            broker.clone(),
        ))
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    eventually("channel open", || {
        dispatcher
            .subscription_health("audit")
            .unwrap()
            .is_healthy()
    })
    .await;
    processor
        .post(&Happened { id: Uuid::now_v7() })
        .await
        .unwrap();
    eventually("both handlers ran", || count.load(Ordering::SeqCst) == 2).await;
    dispatcher.shutdown().await;
}

#[test]
fn a_subscription_that_cannot_work_fails_at_build() {
    let broker = InMemoryBroker::new();
    let no_handler = CommandProcessor::builder().build().unwrap();
    let err = Dispatcher::builder(no_handler)
        .subscription(Subscription::command::<Job>("jobs", TOPIC, broker.clone()))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("no handler"), "{err}");

    // No mapper registered: the subscription reads JSON.
    let no_mapper = CommandProcessor::builder()
        .command(Scripted::new(|_, _| Ok(())))
        .build()
        .unwrap();
    Dispatcher::builder(no_mapper)
        .subscription(Subscription::command::<Job>("jobs", TOPIC, broker.clone()))
        .build()
        .expect("JSON is the default mapper");

    let ok = CommandProcessor::builder()
        .command(Scripted::new(|_, _| Ok(())))
        .build()
        .unwrap();
    for bad in [
        Subscription::command::<Job>("jobs", TOPIC, broker.clone()).performers(0),
        Subscription::command::<Job>("jobs", "", broker.clone()),
        Subscription::command::<Job>("jobs", TOPIC, broker.clone()).buffer_size(0),
    ] {
        let err = Dispatcher::builder(ok.clone())
            .subscription(bad)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Configuration);
    }
    let err = Dispatcher::builder(ok)
        .subscription(Subscription::command::<Job>("jobs", TOPIC, broker.clone()))
        .subscription(Subscription::command::<Job>("jobs", TOPIC, broker))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("two subscriptions"), "{err}");
}

#[tokio::test]
async fn a_message_that_cannot_be_settled_fails_the_subscription_instead_of_looping() {
    let handler = Scripted::new(|_, _| Err(Error::reject("bad order")));
    let broker = InMemoryBroker::new();
    broker.declare(TOPIC, QUEUE).unwrap();
    let processor = CommandProcessor::builder()
        .command(handler.clone())
        .publication::<Job>(Publication::command(TOPIC))
        .producer(broker.clone())
        .build()
        .unwrap();
    let factory = Crashing {
        broker: broker.clone(),
        crashes: Arc::new(AtomicUsize::new(0)),
        reject_fails: true,
    };
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Job>("jobs", TOPIC, factory)
                .channel(QUEUE)
                .receive_timeout(Duration::from_millis(50))
                .restart_delay(Duration::from_millis(5), Duration::from_millis(20))
                .settle_attempts(3),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let id = processor.post(&job(1)).await.unwrap();
    eventually("the subscription gives up", || {
        matches!(
            dispatcher.subscription_health("jobs").unwrap().state,
            SubscriptionState::Failed(_)
        )
    })
    .await;
    let health = dispatcher.subscription_health("jobs").unwrap();
    let SubscriptionState::Failed(reason) = &health.state else {
        unreachable!()
    };
    assert!(reason.contains(&id.to_string()), "{reason}");
    assert!(reason.contains("the DLQ refused it"), "{reason}");
    assert_eq!(health.unsettled, 3);
    assert_eq!(
        health.restarts, 2,
        "restarted between the attempts, then stopped"
    );
    assert!(!health.is_healthy());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(handler.calls(), 3, "no more rounds after giving up");
    dispatcher.shutdown().await;
    assert_eq!(broker.waiting(QUEUE), 1, "the message is not lost");
}

/// Panics on every message it unwraps.
struct PanickingTransform;

#[async_trait]
impl brighter_core::Transform for PanickingTransform {
    async fn wrap(&self, message: Message) -> Result<Message, Error> {
        Ok(message)
    }
    async fn unwrap(&self, _: Message) -> Result<Message, Error> {
        panic!("transform bug")
    }
}

#[tokio::test]
async fn a_panicking_transform_makes_the_message_invalid_without_restarting_the_performer() {
    let handler = Scripted::new(|_, _| Ok(()));
    let rig = rig(handler.clone(), |s| s.transform(PanickingTransform));
    rig.dispatcher.start().await.unwrap();
    rig.processor.post(&job(1)).await.unwrap();
    eventually("moved to the invalid channel", || {
        !rig.broker.invalid_messages(QUEUE).is_empty()
    })
    .await;
    let invalid = rig.broker.invalid_messages(QUEUE);
    assert!(
        invalid[0].reason.contains("transform bug"),
        "{}",
        invalid[0].reason
    );
    let health = rig.dispatcher.subscription_health("jobs").unwrap();
    assert_eq!(health.restarts, 0);
    assert_eq!(health.invalid, 1);
    assert_eq!(handler.calls(), 0);
    rig.dispatcher.shutdown().await;
}

/// Never returns from its first message; the later ones are quick.
struct Stuck(Arc<AtomicUsize>);
impl Handler<Job> for Stuck {
    async fn handle(&self, job: &Job, _: &mut RequestContext) -> Result<(), Error> {
        if job.n == 1 {
            std::future::pending::<()>().await;
        }
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_handler_that_never_returns_shows_in_health_and_shutdown_abandons_it_by_a_deadline() {
    let done = Arc::new(AtomicUsize::new(0));
    let broker = InMemoryBroker::new();
    broker.declare(TOPIC, QUEUE).unwrap();
    broker.declare("other", "other-q").unwrap();
    let processor = CommandProcessor::builder()
        .command(Stuck(done.clone()))
        .publication::<Job>(Publication::command(TOPIC))
        .producer(broker.clone())
        .build()
        .unwrap();
    let subscription = |name: &str, topic: &str, queue: &str| {
        Subscription::command::<Job>(name, topic, broker.clone())
            .channel(queue)
            .receive_timeout(Duration::from_millis(20))
            .empty_channel_delay(Duration::from_millis(5))
            .in_hand_limit(Duration::from_millis(100))
    };
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(subscription("stuck", TOPIC, QUEUE))
        .subscription(subscription("other", "other", "other-q"))
        .drain_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let id = processor.post(&job(1)).await.unwrap();
    eventually("the stuck message shows in health", || {
        let health = dispatcher.subscription_health("stuck").unwrap();
        health.in_hand.as_ref().is_some_and(|h| h.id == id) && !health.is_healthy()
    })
    .await;
    assert!(
        dispatcher
            .subscription_health("other")
            .unwrap()
            .is_healthy()
    );

    // Shutdown stops intake everywhere at once, then drains until its deadline.
    let shutdown = dispatcher.shutdown();
    tokio::pin!(shutdown);
    let report = tokio::select! {
        report = &mut shutdown => report,
        () = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Sent to the other subscription while the stuck one drains.
            let mut late = job(2);
            late.id = Uuid::now_v7();
            let message = brighter_core::Message::new(
                MessageHeader::new("other", MessageType::Command),
                serde_json::to_vec(&late).unwrap(),
            );
            brighter_core::Producer::send(&broker, &message).await.unwrap();
            std::future::pending::<()>().await;
        } => unreachable!(),
    };
    assert_eq!(report.abandoned.len(), 1, "{report:?}");
    assert_eq!(report.abandoned[0].subscription, "stuck");
    assert_eq!(report.abandoned[0].in_hand.id, id);
    assert_eq!(done.load(Ordering::SeqCst), 0, "no intake during the drain");
    assert_eq!(broker.waiting("other-q"), 1);
    // The abandoned message goes back for redelivery.
    assert_eq!(broker.waiting(QUEUE), 1);
    assert_eq!(broker.in_flight(QUEUE), 0);
    let health = dispatcher.subscription_health("stuck").unwrap();
    assert_eq!(health.state, SubscriptionState::Stopped);
    assert!(health.in_hand.is_none());
}
