//! The transport conformance suite: the same semantic checks for every transport
//! (delivery with headers, ack, requeue with a real delay, dead letter, invalid
//! messages, order, redelivery after a consumer dies, competing consumers,
//! graceful shutdown). A transport crate implements [`Harness`] and expands
//! [`conformance_tests!`](crate::conformance_tests) in a test file:
//!
//! ```ignore
//! async fn harness() -> MyHarness { MyHarness::connect().await }
//! brighter_core::conformance_tests!(harness);
//! ```
//!
//! Each check uses its own random topic and channel, so they run in parallel.
//! The store conformance suite, for outboxes and inboxes, is [`store`]; the
//! one for saga stores is [`saga`].

pub mod saga;
mod slip;
pub mod store;

pub use slip::{Leg, a_routing_slip_forwards_in_order_and_compensates_in_reverse};

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    Channel, ChannelFactory, ChannelSpec, Command, CommandProcessor, Dispatcher, Error, Handler,
    Message, MessageHeader, MessageType, ParkedMessage, Producer, Publication, Request,
    RequestContext, Subscription,
};

/// What the suite needs from a transport under test.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// The producer under test.
    fn producer(&self) -> Arc<dyn Producer>;
    /// The channel factory under test.
    fn channel_factory(&self) -> Arc<dyn ChannelFactory>;
    /// Creates what a fresh `topic` consumed through `channel` needs (topics with
    /// enough partitions, queues, bindings), so that messages sent after this
    /// returns reach a channel opened later.
    async fn provision(&self, topic: &str, channel: &str) -> Result<(), Error>;
    /// Messages dead-lettered from `channel`, with their reasons.
    async fn dead_letters(&self, topic: &str, channel: &str) -> Result<Vec<ParkedMessage>, Error>;
    /// Messages moved to the invalid-message channel from `channel`, with reasons.
    async fn invalid_messages(
        &self,
        topic: &str,
        channel: &str,
    ) -> Result<Vec<ParkedMessage>, Error>;
    /// How many broker objects (queues, exchanges, topics) the transport's
    /// delays use for `channel`, shared ones included; `None` when it cannot
    /// count them (by default). The delay checks assert it does not grow
    /// with the number of distinct delays.
    async fn delay_objects(&self, channel: &str) -> Result<Option<usize>, Error> {
        let _ = channel;
        Ok(None)
    }
}

/// A fresh random name with `prefix`, for test topics and channels.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::now_v7().simple())
}

/// How many cases a property test runs: `PROPTEST_CASES` when it is set
/// (`scripts/chaos` runs many more), else `default`.
pub fn property_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// A log writer for tests that check what gets logged (redaction): clone it
/// into a `tracing_subscriber` writer and read everything with
/// [`text`](Self::text).
#[derive(Debug, Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut captured) = self.0.lock() {
            captured.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) async fn fresh<H: Harness>(harness: &H, what: &str) -> (String, String) {
    let topic = unique_name(&format!("conf-{what}"));
    let channel = format!("{topic}-q");
    harness
        .provision(&topic, &channel)
        .await
        .expect("provision");
    (topic, channel)
}

async fn open<H: Harness>(harness: &H, topic: &str, channel: &str) -> Box<dyn Channel> {
    harness
        .channel_factory()
        .create_channel(&ChannelSpec::new(channel, topic, channel))
        .await
        .expect("open channel")
}

async fn receive_one(channel: &mut dyn Channel) -> crate::Delivery {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no message arrived within {WAIT:?}");
        if let Some(delivery) = channel
            .receive(left.min(Duration::from_secs(1)))
            .await
            .expect("receive")
        {
            return delivery;
        }
    }
}

fn plain(topic: &str, body: &str) -> Message {
    Message::new(
        MessageHeader::new(topic, MessageType::Event),
        body.as_bytes().to_vec(),
    )
}

/// Every header field survives the trip through the transport.
pub async fn delivers_with_headers_intact<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "headers").await;
    let mut header = MessageHeader::new(topic.clone(), MessageType::Event);
    header.correlation_id = Uuid::now_v7();
    header.reply_to = Some("replies.here".into());
    header.content_type = "application/json; charset=utf-8".into();
    header.partition_key = Some("order-42".into());
    header.bag = BTreeMap::from([
        ("tenant".to_owned(), "acme".to_owned()),
        ("x-empty".to_owned(), String::new()),
        ("unicode".to_owned(), "grüße ✓".to_owned()),
    ]);
    header.cloud_events.source = Some("urn:test:conformance".into());
    header.cloud_events.kind = Some("com.example.tested".into());
    header.cloud_events.subject = Some("subject-1".into());
    header.cloud_events.dataschema = Some("https://example.com/schema.json".into());
    header.cloud_events.specversion = Some("1.0".into());
    header.trace.traceparent =
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    header.trace.tracestate = Some("vendor=value".into());
    header.trace.baggage = Some("user=alice".into());
    let sent = Message::new(header, br#"{"hello":"world"}"#.to_vec());

    let mut channel = open(harness, &topic, &channel_name).await;
    harness.producer().send(&sent).await.expect("send");
    let delivery = receive_one(channel.as_mut()).await;
    channel.ack(&delivery).await.expect("ack");

    let got = &delivery.message;
    assert_eq!(got.body, sent.body, "body");
    let (g, s) = (&got.header, &sent.header);
    assert_eq!(g.id, s.id, "id");
    assert_eq!(g.topic, s.topic, "topic");
    assert_eq!(g.message_type, s.message_type, "message type");
    assert_eq!(g.correlation_id, s.correlation_id, "correlation id");
    assert_eq!(g.reply_to, s.reply_to, "reply to");
    assert_eq!(g.content_type, s.content_type, "content type");
    assert_eq!(g.partition_key, s.partition_key, "partition key");
    assert_eq!(g.handled_count, 0, "handled count");
    assert_eq!(g.cloud_events, s.cloud_events, "cloud events");
    assert_eq!(g.trace, s.trace, "trace context");
    for (key, value) in &s.bag {
        assert_eq!(g.bag.get(key), Some(value), "bag entry {key}");
    }
    let skew = (g.timestamp - s.timestamp).num_milliseconds().abs();
    assert!(skew <= 1, "timestamp off by {skew} ms");
}

/// An acked message is gone: a new consumer does not get it again.
pub async fn ack_removes_the_message<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "ack").await;
    let mut channel = open(harness, &topic, &channel_name).await;
    harness
        .producer()
        .send(&plain(&topic, "once"))
        .await
        .expect("send");
    let delivery = receive_one(channel.as_mut()).await;
    channel.ack(&delivery).await.expect("ack");
    channel.close().await.expect("close");
    drop(channel);

    let mut again = open(harness, &topic, &channel_name).await;
    let redelivered = again
        .receive(Duration::from_secs(2))
        .await
        .expect("receive");
    assert!(redelivered.is_none(), "acked message was delivered again");
}

/// A requeue with a delay is not redelivered before the delay, then is, with
/// the handled count the pump set.
pub async fn requeue_waits_for_its_delay<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "requeue").await;
    let mut channel = open(harness, &topic, &channel_name).await;
    let sent = plain(&topic, "later");
    harness.producer().send(&sent).await.expect("send");
    let mut delivery = receive_one(channel.as_mut()).await;
    delivery.message_mut().header.handled_count = 1;
    let delay = Duration::from_secs(2);
    let requeued_at = Instant::now();
    channel.requeue(delivery, delay).await.expect("requeue");

    let again = receive_one(channel.as_mut()).await;
    let waited = requeued_at.elapsed();
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    assert_eq!(again.message.id(), sent.id());
    assert_eq!(
        again.message.header.handled_count, 1,
        "handled count survives requeue"
    );
    assert_eq!(again.message.body, sent.body);
    channel.ack(&again).await.expect("ack");
}

/// A processor posting `ConformanceCommand`s to `topic` through the
/// harness's producer, with an in-memory outbox and a sweeper running.
async fn scheduling<H: Harness>(
    harness: &H,
    topic: &str,
) -> (CommandProcessor, crate::RunningSweeper) {
    let processor = CommandProcessor::builder()
        .publication::<ConformanceCommand>(Publication::command(topic))
        .producer(harness.producer())
        .build()
        .expect("processor");
    let sweeper = crate::OutboxSweeper::new(&processor)
        .start()
        .await
        .expect("sweeper");
    (processor, sweeper)
}

/// Asserts `channel` delivers nothing before `until`; returns what it
/// delivered at `until` or just after (a receive ending at its timeout).
async fn nothing_until(
    channel: &mut dyn Channel,
    until: Instant,
    what: &str,
) -> Option<crate::Delivery> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        if let Some(early) = channel.receive(left).await.expect("receive") {
            if Instant::now() >= until {
                return Some(early);
            }
            panic!(
                "{what}: message {} arrived {:?} early",
                early.message.id(),
                until.saturating_duration_since(Instant::now())
            );
        }
    }
}

/// Panics if any message arrives on `channel` within `quiet` from now.
async fn nothing_for(channel: &mut dyn Channel, quiet: Duration, what: &str) {
    if let Some(late) = nothing_until(channel, Instant::now() + quiet, what).await {
        panic!("{what}: message {} arrived", late.message.id());
    }
}

/// A scheduled post returns at once, is not delivered before it is due, and
/// is delivered once after it (the outbox holds it; a sweeper sends it).
pub async fn a_scheduled_post_arrives_once_when_due<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "scheduled").await;
    let mut channel = open(harness, &topic, &channel_name).await;
    let (processor, sweeper) = scheduling(harness, &topic).await;
    let command = ConformanceCommand {
        id: Uuid::now_v7(),
        seq: 1,
    };
    let delay = Duration::from_secs(3);
    let posted = Instant::now();
    let id = processor
        .post_scheduled(&command, delay)
        .await
        .expect("post scheduled");
    assert!(
        posted.elapsed() < delay,
        "post_scheduled returned after {:?}, past the delay",
        posted.elapsed()
    );
    let delivery = match nothing_until(channel.as_mut(), posted + delay, "scheduled post").await {
        Some(delivery) => delivery,
        None => receive_one(channel.as_mut()).await,
    };
    assert_eq!(delivery.message.id(), id);
    channel.ack(&delivery).await.expect("ack");
    nothing_for(
        channel.as_mut(),
        Duration::from_secs(2),
        "scheduled post delivered twice",
    )
    .await;
    sweeper.stop().await;
}

/// A cancelled scheduled message never arrives; one scheduled beside it does.
pub async fn a_cancelled_scheduled_message_never_arrives<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "cancel").await;
    let mut channel = open(harness, &topic, &channel_name).await;
    let (processor, sweeper) = scheduling(harness, &topic).await;
    let command = |seq| ConformanceCommand {
        id: Uuid::now_v7(),
        seq,
    };
    let cancelled = processor
        .post_scheduled(&command(1), Duration::from_secs(1))
        .await
        .expect("post scheduled");
    let kept = processor
        .post_scheduled(&command(2), Duration::from_secs(2))
        .await
        .expect("post scheduled");
    assert!(
        processor.cancel_scheduled(cancelled).await.expect("cancel"),
        "not cancelled"
    );
    let delivery = receive_one(channel.as_mut()).await;
    assert_eq!(delivery.message.id(), kept, "the cancelled message arrived");
    channel.ack(&delivery).await.expect("ack");
    assert!(
        !processor.cancel_scheduled(kept).await.expect("cancel"),
        "cancelled after it was sent"
    );
    nothing_for(
        channel.as_mut(),
        Duration::from_secs(2),
        "the cancelled message arrived",
    )
    .await;
    sweeper.stop().await;
}

/// Deferred (requeued) messages with random delays from 0 to 10 s all come
/// back once, none before its delay, none held back behind one due more
/// than 5 s after it (a long delay does not block short ones; checked for
/// messages due once all are deferred, when the consumer is not busy
/// deferring the rest), and the
/// broker objects the delays use do not grow with the number of distinct
/// delays.
pub async fn deferred_messages_with_random_delays_come_back_once_none_early<H: Harness>(
    harness: &H,
) {
    const N: usize = 1000;
    let (topic, channel_name) = fresh(harness, "delays").await;
    let mut channel = open(harness, &topic, &channel_name).await;
    let sent: Vec<Message> = (0..N).map(|i| plain(&topic, &i.to_string())).collect();
    for chunk in sent.chunks(100) {
        let producer = harness.producer();
        let sends = chunk.iter().map(|m| {
            let producer = Arc::clone(&producer);
            async move { producer.send(m).await }
        });
        for result in futures::future::join_all(sends).await {
            result.expect("send");
        }
    }
    // xorshift, seeded per run: delays of 0 to 10,000 ms.
    let mut seed = Uuid::now_v7().as_u128() as u64 | 1;
    let mut next_delay = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        Duration::from_millis(seed % 10_001)
    };
    let mut due: std::collections::HashMap<Uuid, Instant> = std::collections::HashMap::new();
    let mut back: HashSet<Uuid> = HashSet::new();
    let mut latest_due_back: Option<Instant> = None;
    let mut all_deferred: Option<Instant> = None;
    let mut objects_before = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while back.len() < N {
        assert!(
            Instant::now() < deadline,
            "{} of {N} deferred messages came back within 120 s",
            back.len()
        );
        let Some(delivery) = channel
            .receive(Duration::from_secs(1))
            .await
            .expect("receive")
        else {
            continue;
        };
        let id = delivery.message.id();
        match due.get(&id) {
            None => {
                let delay = next_delay();
                due.insert(id, Instant::now() + delay);
                if due.len() == N {
                    all_deferred = Some(Instant::now());
                }
                channel.requeue(delivery, delay).await.expect("requeue");
                if objects_before.is_none() {
                    objects_before =
                        Some(harness.delay_objects(&channel_name).await.expect("count"));
                }
            }
            Some(at) => {
                let now = Instant::now();
                assert!(
                    now >= *at,
                    "message {id} came back {:?} before its delay",
                    *at - now
                );
                assert!(back.insert(id), "message {id} came back twice");
                if all_deferred.is_some_and(|all| *at > all) {
                    if let Some(latest) = latest_due_back {
                        assert!(
                            *at + Duration::from_secs(5) >= latest,
                            "message {id} was held back behind one due {:?} after it",
                            latest - *at
                        );
                    }
                    latest_due_back = latest_due_back.max(Some(*at));
                }
                channel.ack(&delivery).await.expect("ack");
            }
        }
    }
    nothing_for(
        channel.as_mut(),
        Duration::from_secs(2),
        "a deferred message came back twice",
    )
    .await;
    let objects_after = harness.delay_objects(&channel_name).await.expect("count");
    assert_eq!(
        objects_after,
        objects_before.flatten(),
        "the delays' broker objects grew with {N} random delays"
    );
    channel.close().await.expect("close");
}

/// A rejected message lands in the dead-letter channel with its reason.
pub async fn reject_dead_letters_with_reason<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "reject").await;
    let mut channel = open(harness, &topic, &channel_name).await;
    let sent = plain(&topic, "poison");
    harness.producer().send(&sent).await.expect("send");
    let delivery = receive_one(channel.as_mut()).await;
    channel
        .reject(delivery, "card declined")
        .await
        .expect("reject");

    let dead = wait_for(|| harness.dead_letters(&topic, &channel_name), 1).await;
    assert_eq!(dead[0].message.id(), sent.id());
    assert_eq!(dead[0].message.body, sent.body);
    assert!(
        dead[0].reason.contains("card declined"),
        "reason: {}",
        dead[0].reason
    );
    let redelivered = channel
        .receive(Duration::from_secs(1))
        .await
        .expect("receive");
    assert!(
        redelivered.is_none(),
        "rejected message was delivered again"
    );
}

async fn wait_for<F, Fut>(mut query: F, count: usize) -> Vec<ParkedMessage>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<ParkedMessage>, Error>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let found = query().await.expect("query parked messages");
        if found.len() >= count || Instant::now() >= deadline {
            assert_eq!(found.len(), count, "parked messages");
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages with one partition key arrive in the order sent.
pub async fn keeps_order_within_a_partition_key<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "order").await;
    let mut channel = open(harness, &topic, &channel_name).await;
    let messages: Vec<Message> = (0..50)
        .map(|i| {
            let mut m = plain(&topic, &i.to_string());
            m.header.partition_key = Some("same-key".into());
            m
        })
        .collect();
    for result in harness.producer().send_batch(&messages).await {
        result.expect("send");
    }
    for expected in &messages {
        let delivery = receive_one(channel.as_mut()).await;
        assert_eq!(
            String::from_utf8_lossy(&delivery.message.body),
            String::from_utf8_lossy(&expected.body),
            "out of order"
        );
        channel.ack(&delivery).await.expect("ack");
    }
}

/// A message received but not acked by a consumer that goes away is delivered
/// to the next consumer.
pub async fn redelivers_when_a_consumer_dies_before_acking<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "redeliver").await;
    let mut first = open(harness, &topic, &channel_name).await;
    let sent = plain(&topic, "unacked");
    harness.producer().send(&sent).await.expect("send");
    let delivery = receive_one(first.as_mut()).await;
    assert_eq!(delivery.message.id(), sent.id());
    drop(first); // dies without acking or closing

    let mut second = open(harness, &topic, &channel_name).await;
    let again = receive_one(second.as_mut()).await;
    assert_eq!(again.message.id(), sent.id());
    second.ack(&again).await.expect("ack");
}

/// A message sent to a topic nobody consumes yet is never silently lost: the
/// send fails with [`Error::Unroutable`] (so the outbox keeps it), or the
/// transport keeps it for a consumer that comes later (a Kafka topic).
pub async fn an_unroutable_send_is_never_silently_lost<H: Harness>(harness: &H) {
    let topic = unique_name("conf-unrouted");
    let channel_name = format!("{topic}-q");
    let sent = plain(&topic, "nobody listens yet");
    match harness.producer().send(&sent).await {
        Err(Error::Unroutable { topic: refused }) => {
            assert_eq!(refused, topic, "the error names the topic");
            // Once a queue is bound, the same message goes through.
            harness
                .provision(&topic, &channel_name)
                .await
                .expect("provision");
            let mut channel = open(harness, &topic, &channel_name).await;
            harness
                .producer()
                .send(&sent)
                .await
                .expect("send once routed");
            let delivery = receive_one(channel.as_mut()).await;
            assert_eq!(delivery.message.id(), sent.id());
            channel.ack(&delivery).await.expect("ack");
        }
        Err(other) => panic!("an unroutable send failed with {other:?}, not Error::Unroutable"),
        Ok(()) => {
            harness
                .provision(&topic, &channel_name)
                .await
                .expect("provision");
            let mut channel = open(harness, &topic, &channel_name).await;
            let delivery = receive_one(channel.as_mut()).await;
            assert_eq!(
                delivery.message.id(),
                sent.id(),
                "a send that succeeded with no consumer must be kept for a later one"
            );
            channel.ack(&delivery).await.expect("ack");
        }
    }
}

/// Two consumers on one channel share the messages; each is handled by one.
pub async fn competing_consumers_share_work<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "compete").await;
    const N: usize = 40;
    let seen: Arc<Mutex<Vec<(usize, Uuid)>>> = Arc::default();
    let mut consumers = Vec::new();
    for consumer in 0..2 {
        let mut channel = open(harness, &topic, &channel_name).await;
        let seen = Arc::clone(&seen);
        consumers.push(tokio::spawn(async move {
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline && seen.lock().expect("lock").len() < N {
                if let Some(d) = channel
                    .receive(Duration::from_millis(200))
                    .await
                    .expect("receive")
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    seen.lock().expect("lock").push((consumer, d.message.id()));
                    channel.ack(&d).await.expect("ack");
                }
            }
        }));
    }
    let messages: Vec<Message> = (0..N)
        .map(|i| {
            let mut m = plain(&topic, &i.to_string());
            m.header.partition_key = Some(format!("key-{i}"));
            m
        })
        .collect();
    for result in harness.producer().send_batch(&messages).await {
        result.expect("send");
    }
    for consumer in consumers {
        consumer.await.expect("consumer task");
    }
    let seen = seen.lock().expect("lock").clone();
    let ids: HashSet<Uuid> = seen.iter().map(|(_, id)| *id).collect();
    assert_eq!(seen.len(), N, "each message handled once");
    assert_eq!(ids.len(), N, "no duplicates");
    for consumer in 0..2 {
        assert!(
            seen.iter().any(|(c, _)| *c == consumer),
            "consumer {consumer} got no work"
        );
    }
}

/// The command the pump-based checks post.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConformanceCommand {
    /// Request id.
    pub id: Uuid,
    /// Sequence number.
    pub seq: u32,
}

impl Request for ConformanceCommand {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for ConformanceCommand {}

#[derive(Clone, Default)]
struct Recorder {
    handled: Arc<Mutex<Vec<Uuid>>>,
    work: Duration,
}

impl Handler<ConformanceCommand> for Recorder {
    async fn handle(&self, cmd: &ConformanceCommand, _: &mut RequestContext) -> Result<(), Error> {
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        self.handled.lock().expect("lock").push(cmd.id);
        Ok(())
    }
}

fn pump<H: Harness>(
    harness: &H,
    topic: &str,
    channel: &str,
    recorder: Recorder,
) -> (CommandProcessor, Dispatcher) {
    let processor = CommandProcessor::builder()
        .command(recorder)
        .publication::<ConformanceCommand>(Publication::command(topic))
        .producer(harness.producer())
        .build()
        .expect("processor");
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<ConformanceCommand>(channel, topic, harness.channel_factory())
                .channel(channel)
                .empty_channel_delay(Duration::from_millis(10))
                .receive_timeout(Duration::from_millis(200)),
        )
        .build()
        .expect("dispatcher");
    (processor, dispatcher)
}

/// A message that cannot be mapped goes to the invalid-message channel with the
/// reason, and the pump keeps handling good messages.
pub async fn invalid_message_goes_to_the_invalid_channel<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "invalid").await;
    let recorder = Recorder::default();
    let (processor, dispatcher) = pump(harness, &topic, &channel_name, recorder.clone());
    dispatcher.start().await.expect("start");
    let mut bad = plain(&topic, "{not json");
    bad.header.message_type = MessageType::Command;
    harness.producer().send(&bad).await.expect("send bad");
    let good = ConformanceCommand {
        id: Uuid::now_v7(),
        seq: 1,
    };
    processor.post(&good).await.expect("post good");

    let invalid = wait_for(|| harness.invalid_messages(&topic, &channel_name), 1).await;
    assert_eq!(invalid[0].message.id(), bad.id());
    assert!(
        invalid[0].reason.contains("ConformanceCommand"),
        "reason: {}",
        invalid[0].reason
    );
    let deadline = Instant::now() + WAIT;
    while recorder.handled.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    assert_eq!(*recorder.handled.lock().expect("lock"), vec![good.id]);
}

/// Shutting down mid-stream finishes and acks the message in hand; what was not
/// handled is handled after a restart; nothing is lost.
pub async fn graceful_shutdown_loses_nothing<H: Harness>(harness: &H) {
    let (topic, channel_name) = fresh(harness, "shutdown").await;
    const N: usize = 30;
    let recorder = Recorder {
        handled: Arc::default(),
        work: Duration::from_millis(20),
    };
    let (processor, dispatcher) = pump(harness, &topic, &channel_name, recorder.clone());
    dispatcher.start().await.expect("start");
    let commands: Vec<ConformanceCommand> = (0..N as u32)
        .map(|seq| ConformanceCommand {
            id: Uuid::now_v7(),
            seq,
        })
        .collect();
    let ids = processor
        .deposit_post_batch(&commands, None)
        .await
        .expect("deposit");
    processor.clear_outbox(&ids).await.expect("clear");

    let deadline = Instant::now() + WAIT;
    while recorder.handled.lock().expect("lock").len() < N / 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    dispatcher.shutdown().await;
    let at_shutdown = recorder.handled.lock().expect("lock").len();
    assert!(at_shutdown < N, "shutdown came too late to test anything");

    dispatcher.start().await.expect("restart");
    let deadline = Instant::now() + WAIT;
    while recorder.handled.lock().expect("lock").len() < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    let handled = recorder.handled.lock().expect("lock").clone();
    let unique: HashSet<Uuid> = handled.iter().copied().collect();
    assert_eq!(unique.len(), N, "every message handled");
    assert_eq!(
        handled.len(),
        N,
        "no message handled twice: the in-hand one was acked at shutdown"
    );
}

/// Expands to one `#[tokio::test]` per conformance check, each calling
/// `$harness().await` for a fresh harness.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:path) => {
        $crate::conformance_tests!(@tests $harness;
            delivers_with_headers_intact,
            ack_removes_the_message,
            requeue_waits_for_its_delay,
            reject_dead_letters_with_reason,
            invalid_message_goes_to_the_invalid_channel,
            keeps_order_within_a_partition_key,
            redelivers_when_a_consumer_dies_before_acking,
            competing_consumers_share_work,
            an_unroutable_send_is_never_silently_lost,
            graceful_shutdown_loses_nothing,
            a_scheduled_post_arrives_once_when_due,
            a_cancelled_scheduled_message_never_arrives,
            deferred_messages_with_random_delays_come_back_once_none_early,
            a_routing_slip_forwards_in_order_and_compensates_in_reverse,
        );
    };
    (@tests $harness:path; $($check:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let harness = $harness().await;
                $crate::conformance::$check(&harness).await;
            }
        )*
    };
}
