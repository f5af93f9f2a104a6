//! The RabbitMQ transport against a real RabbitMQ (`AMQP_ADDR`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`): the conformance suite, a broker
//! closing our connections mid-stream, request-reply, delays, redaction. Each
//! test uses its own random exchange and queues.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::conformance::{CapturedLogs, Harness, unique_name};
use brighter_core::{
    ChannelFactory, ChannelSpec, Command, CommandProcessor, Dispatcher, Error, Handler,
    InMemoryOutbox, Message, MessageHeader, MessageType, OutboxSweeper, ParkedMessage, Producer,
    Publication, Request, RequestContext, Subscription,
};
use brighter_rabbitmq::{
    RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer, decode_message,
    parked_reason, properties_size,
};
use lapin::options::BasicGetOptions;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use uuid::Uuid;

struct Rabbit {
    connection: RabbitConnection,
    producer: Arc<RabbitProducer>,
    factory: RabbitChannelFactory,
    /// Parked messages read so far, by queue (reading removes them from RabbitMQ).
    parked: tokio::sync::Mutex<HashMap<String, Vec<ParkedMessage>>>,
}

fn config(connection_name: &str) -> RabbitConfig {
    RabbitConfig::from_env()
        .exchange(unique_name("test"))
        .connection_name(connection_name)
        // Every test declares queues of its own; the broker drops them after.
        .queue_expiry(Duration::from_secs(1800))
}

async fn rabbit() -> Rabbit {
    let connection = RabbitConnection::new(config("brighter-tests"));
    Rabbit {
        producer: Arc::new(RabbitProducer::new(connection.clone())),
        factory: RabbitChannelFactory::new(connection.clone()),
        connection,
        parked: tokio::sync::Mutex::default(),
    }
}

impl Rabbit {
    /// A fresh topic and its queue (`<topic>.q`), declared as a subscription
    /// declares them, with no consumer left on it.
    async fn declared(&self, prefix: &str) -> (String, String) {
        let topic = unique_name(prefix);
        let queue = format!("{topic}.q");
        let mut opened = self
            .factory
            .create_channel(&ChannelSpec::new(&queue, &topic, &queue))
            .await
            .unwrap();
        opened.close().await.unwrap();
        (topic, queue)
    }

    /// Publishes to `topic` with the raw client, as a foreign publisher does,
    /// and waits for the confirm; returns the AMQP channel, for reading the
    /// parking queues afterwards.
    async fn publish_raw(
        &self,
        topic: &str,
        body: &[u8],
        properties: lapin::BasicProperties,
    ) -> lapin::Channel {
        let channel = self.connection.channel().await.unwrap();
        channel
            .basic_publish(
                self.connection.config().exchange_name().into(),
                topic.into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        channel
    }

    /// A started dispatcher whose subscription runs `handler` on `queue`,
    /// configured further by `configure`.
    async fn pump(
        &self,
        handler: impl Handler<Work>,
        topic: &str,
        queue: &str,
        configure: impl FnOnce(Subscription) -> Subscription,
    ) -> Dispatcher {
        let processor = CommandProcessor::builder()
            .command(handler)
            .build()
            .unwrap();
        let dispatcher = Dispatcher::builder(processor)
            .subscription(configure(
                Subscription::command::<Work>(
                    queue,
                    topic,
                    RabbitChannelFactory::new(self.connection.clone()),
                )
                .channel(queue),
            ))
            .build()
            .unwrap();
        dispatcher.start().await.unwrap();
        dispatcher
    }
    async fn drain(&self, queue: &str) -> Result<Vec<ParkedMessage>, Error> {
        let channel = self.connection.channel().await?;
        let mut parked = self.parked.lock().await;
        let seen = parked.entry(queue.to_owned()).or_default();
        while let Some(got) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(|e| Error::transport("basic_get", e))?
        {
            let d = got.delivery;
            seen.push(ParkedMessage {
                reason: parked_reason(&d.properties).unwrap_or_default(),
                message: decode_message(&d.properties, d.routing_key.as_str(), d.data)?,
            });
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(seen.clone())
    }
}

#[async_trait]
impl Harness for Rabbit {
    fn producer(&self) -> Arc<dyn Producer> {
        self.producer.clone()
    }

    fn channel_factory(&self) -> Arc<dyn ChannelFactory> {
        Arc::new(self.factory.clone())
    }

    async fn provision(&self, topic: &str, channel: &str) -> Result<(), Error> {
        let mut opened = self
            .factory
            .create_channel(&ChannelSpec::new(channel, topic, channel))
            .await?;
        opened.close().await
    }

    async fn dead_letters(&self, _topic: &str, channel: &str) -> Result<Vec<ParkedMessage>, Error> {
        self.drain(&RabbitChannelFactory::dead_letter_queue(channel))
            .await
    }

    async fn invalid_messages(
        &self,
        _topic: &str,
        channel: &str,
    ) -> Result<Vec<ParkedMessage>, Error> {
        self.drain(&RabbitChannelFactory::invalid_message_queue(channel))
            .await
    }

    async fn delay_objects(&self, channel: &str) -> Result<Option<usize>, Error> {
        Ok(delay_objects(channel))
    }
}

/// Queues and exchanges of the vhost that hold delayed messages for `queue`:
/// the shared ladder, and any named after the queue (`<queue>.delay.<ms>`,
/// as the delay queues before the ladder were); `None` without `rabbitmqctl`.
fn delay_objects(queue: &str) -> Option<usize> {
    let mut count = 0;
    for what in ["list_queues", "list_exchanges"] {
        let out = std::process::Command::new("rabbitmqctl")
            .args([what, "name", "--no-table-headers", "-q"])
            .output()
            .ok()
            .filter(|out| out.status.success())?;
        count += String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|name| {
                name.starts_with(&format!("{}.", brighter_rabbitmq::DELAY_LADDER))
                    || name.starts_with(&format!("{queue}.delay"))
            })
            .count();
    }
    Some(count)
}

brighter_core::conformance_tests!(rabbit);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    id: Uuid,
    n: u32,
}
impl Request for Work {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Work {}

#[derive(Clone, Default)]
struct Record(Arc<Mutex<Vec<u32>>>);
impl Handler<Work> for Record {
    async fn handle(&self, work: &Work, _: &mut RequestContext) -> Result<(), Error> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.0.lock().unwrap().push(work.n);
        Ok(())
    }
}

/// Closes, from the broker side, every connection whose client name is `name`.
fn close_connections(name: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
            "-q",
        ])
        .output()
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<&str> = listing
        .lines()
        .filter(|line| line.contains(&format!("\"{name}\"")))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for pid in &pids {
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by the reconnect test"])
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success());
    }
    pids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_closing_our_connection_mid_stream_loses_nothing() {
    let name = unique_name("reconnect");
    let connection = RabbitConnection::new(config(&name));
    let topic = unique_name("work");
    let outbox = InMemoryOutbox::new();
    let record = Record::default();
    let processor = CommandProcessor::builder()
        .command(record.clone())
        .publication::<Work>(Publication::command(&topic))
        .producer(RabbitProducer::new(connection.clone()))
        .outbox(outbox.clone())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Work>(
                &topic,
                &topic,
                RabbitChannelFactory::new(connection.clone()),
            )
            .restart_delay(Duration::from_millis(100), Duration::from_secs(1)),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dispatcher.subscription_health(&topic).unwrap().is_healthy() {
        assert!(Instant::now() < deadline, "subscription never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The sweeper sends what a post could not while the connection was down.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sweeper = tokio::spawn(
        OutboxSweeper::new(processor.clone())
            .min_age(Duration::ZERO)
            .poll_interval(Duration::from_millis(100))
            .run(shutdown.clone()),
    );
    const N: u32 = 300;
    let mut closed = 0;
    for n in 0..N {
        let _ = processor
            .post(&Work {
                id: Uuid::now_v7(),
                n,
            })
            .await; // failures stay in the outbox
        if n == N / 2 {
            closed = close_connections(&name);
        }
    }
    assert!(closed >= 1, "found our connection to close");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let handled: HashSet<u32> = record.0.lock().unwrap().iter().copied().collect();
        if handled.len() == N as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {N} handled; health {:?}",
            handled.len(),
            dispatcher.subscription_health(&topic)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    sweeper.await.unwrap();
    dispatcher.shutdown().await;
    let all = record.0.lock().unwrap().len();
    let health = dispatcher.subscription_health(&topic).unwrap();
    println!(
        "closed {closed} connection(s) mid-stream: {N} of {N} handled, {} redelivered duplicate(s), {} performer restart(s)",
        all - N as usize,
        health.restarts
    );
    assert!(
        health.restarts >= 1,
        "the performer was restarted after the connection dropped"
    );
    assert_eq!(outbox.outstanding_count_sync(), 0);
}

trait OutstandingSync {
    fn outstanding_count_sync(&self) -> usize;
}
impl OutstandingSync for InMemoryOutbox {
    fn outstanding_count_sync(&self) -> usize {
        self.entries()
            .iter()
            .filter(|e| e.dispatched.is_none())
            .count()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Quote {
    id: Uuid,
    sku: String,
}
impl Request for Quote {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Quote {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Price {
    id: Uuid,
    cents: u64,
}
impl Request for Price {
    fn id(&self) -> Uuid {
        self.id
    }
}

struct Pricer;
impl Handler<Quote> for Pricer {
    async fn handle(&self, quote: &Quote, ctx: &mut RequestContext) -> Result<(), Error> {
        let price = Price {
            id: Uuid::now_v7(),
            cents: 100 * quote.sku.len() as u64,
        };
        ctx.reply(&price).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_gets_its_reply_over_rabbitmq() {
    let h = rabbit().await;
    let topic = unique_name("quotes");
    let processor = CommandProcessor::builder()
        .command(Pricer)
        .publication::<Quote>(Publication::command(&topic))
        .producer(h.producer.clone())
        .reply_channels(h.factory.clone())
        .build()
        .unwrap();
    h.provision(&topic, &topic).await.unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::command::<Quote>(
            &topic,
            &topic,
            h.factory.clone(),
        ))
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let price: Price = processor
        .call(
            &Quote {
                id: Uuid::now_v7(),
                sku: "abcd".into(),
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(price.cents, 400);
    dispatcher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_refuses_a_delayed_message_rather_than_wait() {
    let h = rabbit().await;
    let topic = unique_name("later");
    let mut message = Message::new(MessageHeader::new(&topic, MessageType::Event), "later");
    message.header.delay = Duration::from_millis(1500);
    let sent = Instant::now();
    let refused = h.producer.send(&message).await.unwrap_err();
    assert!(
        sent.elapsed() < Duration::from_millis(1500),
        "the producer waited"
    );
    assert!(refused.to_string().contains("post_scheduled"), "{refused}");
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The delay ladder's queues with their arguments, as `rabbitmqctl` lists them.
fn ladder_queues() -> Vec<String> {
    rabbitmqctl(&[
        "list_queues",
        "name",
        "arguments",
        "--no-table-headers",
        "-q",
    ])
    .lines()
    .filter(|line| {
        line.trim_start()
            .starts_with(brighter_rabbitmq::DELAY_LADDER)
    })
    .map(str::to_owned)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_message_outlives_a_queue_lease_that_would_have_expired() {
    // Before: the delay queue `<queue>.delay.<ms>` had `x-expires` of the delay
    // plus 10 minutes, never renewed; the broker deleted it with the message
    // inside. A policy shortens every lease of this test's queues to 15 s
    // (the broker takes the lower of policy and argument), so the old delay
    // queue went at 15 s with the message in it; the ladder's queues have no
    // lease and are not named after the queue.
    let h = rabbit().await;
    let (topic, queue) = h.declared("lease").await;
    let policy = unique_name("short-lease");
    rabbitmqctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "--priority",
        "100",
        &policy,
        &format!("^{}", queue.replace('.', "\\.")),
        r#"{"expires":15000}"#,
    ]);
    let mut channel = h
        .factory
        .create_channel(&ChannelSpec::new(&queue, &topic, &queue))
        .await
        .unwrap();
    let sent = Message::new(MessageHeader::new(&topic, MessageType::Event), "later");
    h.producer.send(&sent).await.unwrap();
    let delivery = channel
        .receive(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let delay = Duration::from_secs(30);
    let deferred = Instant::now();
    channel.requeue(delivery, delay).await.unwrap();
    let ladder = ladder_queues();
    let none_early = channel
        .receive(delay.saturating_sub(deferred.elapsed()))
        .await
        .unwrap();
    if let Some(early) = none_early {
        panic!(
            "message {} came back {:?} after the defer, before its {delay:?}",
            early.message.id(),
            deferred.elapsed()
        );
    }
    let back = channel.receive(Duration::from_secs(20)).await.unwrap();
    rabbitmqctl(&["clear_policy", &policy]);
    assert_eq!(
        ladder.len(),
        brighter_rabbitmq::DELAY_LEVELS as usize,
        "{ladder:?}"
    );
    assert!(
        ladder.iter().all(|queue| !queue.contains("x-expires")),
        "a delay queue has a lease: {ladder:?}"
    );
    let back = back.expect("the deferred message came back");
    assert_eq!(back.message.id(), sent.id());
    assert!(deferred.elapsed() >= delay);
    channel.ack(&back).await.unwrap();
    assert!(
        channel
            .receive(Duration::from_secs(2))
            .await
            .unwrap()
            .is_none(),
        "came back twice"
    );
}

#[test]
fn credentials_never_appear_in_debug_output() {
    let config = RabbitConfig::new("amqp://app:hunter2@rabbit.internal:5672/%2f");
    let shown = format!("{config:?} {}", config.redacted_uri());
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("app:***@rabbit.internal:5672"), "{shown}");
    let connection = RabbitConnection::new(config);
    assert!(!format!("{connection:?}").contains("hunter2"));
    let producer = RabbitProducer::new(connection.clone());
    assert!(!format!("{producer:?}").contains("hunter2"));
    assert!(!format!("{:?}", RabbitChannelFactory::new(connection)).contains("hunter2"));
}

#[tokio::test]
async fn a_bad_address_is_a_clear_error_without_credentials() {
    let connection = RabbitConnection::new(RabbitConfig::new("amqp://app:hunter2@127.0.0.1:1/%2f"));
    let err = connection.channel().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("connect to amqp://app:***@127.0.0.1:1"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(err.is_retryable());
}

/// Slows the thread that connects right after lapin has taken the
/// connection's earlier failure and before it queues its protocol header: the
/// window in which a fast refusal is lost. A fresh process is slow there on
/// its own (its first trace events register their callsites), and so is any
/// thread the scheduler preempts on a busy machine.
struct SlowBeforeTheHeader;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SlowBeforeTheHeader {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0 |= field.name() == "message"
                    && format!("{value:?}") == "Sending protocol header to server";
            }
        }
        let mut message = Message(false);
        event.record(&mut message);
        if message.0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A connect to a port nobody listens on fails every time; it never waits
/// forever. lapin 4.12 loses a refusal that comes between its taking the
/// last failure and its queueing the protocol header, and its connect then
/// never returns: the CLI's `dlq list` hung a CI run for an hour on it (one
/// fresh process in about 500 here), and a sweeper or pump reconnecting to a
/// broker that is down would stop for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_an_error_every_time_never_a_hang() {
    use tracing_subscriber::layer::SubscriberExt;
    let _slow =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(SlowBeforeTheHeader));
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let connection = RabbitConnection::new(
        RabbitConfig::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
            .connect_timeout(Duration::from_secs(1)),
    );
    for attempt in 0..3 {
        let Ok(result) = tokio::time::timeout(Duration::from_secs(60), connection.channel()).await
        else {
            panic!("connect {attempt} neither failed nor succeeded in a minute");
        };
        let err = result.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("connect to amqp://guest:***@127.0.0.1:{port}")),
            "{err}"
        );
    }
}

/// A pump whose broker is unreachable logs its failures and restarts: with
/// every log level on, the logs name the broker but never show the password.
#[tokio::test]
async fn credentials_never_appear_in_logs_of_a_failing_pump() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Current-thread runtime: every task of the test logs through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let connection = RabbitConnection::new(
        RabbitConfig::new("amqp://app:hunter2@127.0.0.1:1/%2f").connection_name("redaction"),
    );
    let processor = CommandProcessor::builder()
        .command(Record::default())
        .publication::<Work>(Publication::command("redaction.work"))
        .producer(RabbitProducer::new(connection.clone()))
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::command::<Work>(
            "redaction",
            "redaction.work",
            RabbitChannelFactory::new(connection),
        ))
        .build()
        .unwrap();
    let _ = dispatcher.start().await;
    let posted = processor
        .post(&Work {
            id: Uuid::now_v7(),
            n: 1,
        })
        .await;
    assert!(
        posted.is_ok(),
        "deposited in the outbox, though the broker is unreachable"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    dispatcher.shutdown().await;

    let text = logs.text();
    assert!(
        text.contains("app:***@127.0.0.1:1"),
        "the failure is logged: {text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

/// Found by the chaos suite's bad-input case: messages the channel cannot even
/// read (here: no id anywhere) are parked by the channel itself, and the pump's
/// health did not count them. Now it does, with the ones it parks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pump_counts_unreadable_messages_the_channel_parks() {
    let r = rabbit().await;
    let (topic, queue) = r.declared("unreadable").await;
    // A message from a foreign publisher with no id header and no message-id property.
    let channel = r
        .publish_raw(
            &topic,
            br#"{"id":"01a231c2-a016-779b-888400d936c8e823","n":1}"#,
            lapin::BasicProperties::default(),
        )
        .await;
    let good = Message::new(
        MessageHeader::new(&topic, MessageType::Command),
        serde_json::to_vec(&Work {
            id: Uuid::now_v7(),
            n: 2,
        })
        .unwrap(),
    );
    r.producer.send(&good).await.unwrap();
    let handled = Record::default();
    let dispatcher = r.pump(handled.clone(), &topic, &queue, |s| s).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while handled.0.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the good message was not handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    let health = dispatcher.subscription_health(&queue).unwrap();
    assert_eq!((health.handled, health.invalid), (1, 1));
    let invalid = RabbitChannelFactory::invalid_message_queue(&queue);
    let got = channel
        .basic_get(invalid.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the unreadable message is in the invalid-message queue");
    let reason = parked_reason(&got.delivery.properties).unwrap();
    assert!(reason.contains("id"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_declared_with_an_expiry_are_dropped_by_the_broker_once_unused() {
    let connection =
        RabbitConnection::new(config("expiry").queue_expiry(Duration::from_millis(500)));
    let queue = unique_name("expiring");
    let channel = RabbitChannelFactory::new(connection.clone())
        .create_channel(&ChannelSpec::new(&queue, &queue, &queue))
        .await
        .unwrap();
    let exists = |name: String| {
        let connection = connection.clone();
        async move {
            let probe = connection.channel().await.unwrap();
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            probe
                .queue_declare(name.as_str().into(), passive, Default::default())
                .await
                .is_ok()
        }
    };
    let names = [
        queue.clone(),
        RabbitChannelFactory::dead_letter_queue(&queue),
        RabbitChannelFactory::invalid_message_queue(&queue),
    ];
    for name in &names {
        assert!(exists(name.clone()).await, "{name} declared");
    }
    drop(channel);
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in &names {
        while exists(name.clone()).await {
            assert!(Instant::now() < deadline, "{name} outlived its expiry");
            // A passive declare counts as use and restarts the queue's
            // expiry, so look less often than the expiry.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
}

/// Defers each message the first time it sees it, then handles it.
#[derive(Clone, Default)]
struct DefersOnce(Arc<Mutex<Vec<Uuid>>>);
impl Handler<Work> for DefersOnce {
    async fn handle(&self, work: &Work, _: &mut RequestContext) -> Result<(), Error> {
        let mut seen = self.0.lock().unwrap();
        let first = !seen.contains(&work.id);
        seen.push(work.id);
        if first {
            return Err(Error::defer(Duration::from_millis(10)));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_too_long_for_amqp_properties_never_panic_the_pump() {
    // Before: a content type (or reply-to) over 255 bytes, read from the
    // headers, became a short-string property when the message was requeued,
    // and the conversion panicked: the performer restarted and the message
    // came back, again and again.
    let r = rabbit().await;
    let (topic, queue) = r.declared("long-headers").await;
    let work = Work {
        id: Uuid::now_v7(),
        n: 1,
    };
    let long = |prefix: &str, n: usize| {
        lapin::types::AMQPValue::LongString(format!("{prefix}{}", "a".repeat(n)).into())
    };
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        brighter_core::wire::ID.into(),
        long(&work.id.to_string(), 0),
    );
    headers.insert(
        brighter_core::wire::CONTENT_TYPE.into(),
        long("application/json; pad=", 1000),
    );
    headers.insert(brighter_core::wire::REPLY_TO.into(), long("replies.", 300));
    r.publish_raw(
        &topic,
        &serde_json::to_vec(&work).unwrap(),
        lapin::BasicProperties::default().with_headers(headers),
    )
    .await;
    let handler = DefersOnce::default();
    let dispatcher = r
        .pump(handler.clone(), &topic, &queue, |s| {
            s.restart_delay(Duration::from_millis(10), Duration::from_millis(50))
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while dispatcher.subscription_health(&queue).unwrap().handled == 0 {
        assert!(Instant::now() < deadline, "never handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    let health = dispatcher.subscription_health(&queue).unwrap();
    assert_eq!(health.restarts, 0, "{:?}", health.last_error);
    assert_eq!((health.deferred, health.handled), (1, 1));
    assert_eq!(
        *handler.0.lock().unwrap(),
        vec![work.id, work.id],
        "deferred once, handled once"
    );
}

#[tokio::test]
async fn a_message_whose_header_key_amqp_cannot_carry_is_refused_not_a_panic() {
    let r = rabbit().await;
    let mut message = Message::new(
        MessageHeader::new(unique_name("long-key"), MessageType::Event),
        "{}",
    );
    message.header.bag.insert("k".repeat(300), "v".into());
    let error = r.producer.send(&message).await.unwrap_err();
    assert!(matches!(error, Error::Validation(_)), "{error:?}");
    assert!(error.to_string().contains("at most 255"), "{error}");
    assert!(
        error.is_message_fault(),
        "the outbox parks it after its attempts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_headers_do_not_fit_a_frame_is_refused_and_the_connection_stays_up() {
    let r = rabbit().await;
    let topic = unique_name("fat-headers");
    r.provision(&topic, &topic).await.unwrap();
    let mut message = Message::new(MessageHeader::new(&topic, MessageType::Event), "{}");
    for i in 0..200 {
        message
            .header
            .bag
            .insert(format!("h{i}"), "x".repeat(1_000));
    }
    let error = r.producer.send(&message).await.unwrap_err();
    assert!(error.is_message_fault(), "{error:?}");
    assert!(error.to_string().contains("frame"), "{error}");
    // The shared connection is still up: a normal message goes through.
    let fine = Message::new(MessageHeader::new(&topic, MessageType::Event), "{}");
    r.producer.send(&fine).await.unwrap();
}

/// Rejects every message with the given reason.
#[derive(Clone)]
struct RejectsWith(String);
impl Handler<Work> for RejectsWith {
    async fn handle(&self, _: &Work, _: &mut RequestContext) -> Result<(), Error> {
        Err(Error::reject(self.0.clone()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_a_few_bytes_over_the_frame_is_parked_without_its_headers() {
    // Before: the copy (original headers plus the reason) went over frame_max,
    // RabbitMQ answered with FRAME_ERROR and closed the connection shared by
    // every channel, the message came back, and round it went. Now the copy
    // goes without the original's header bag, and says so.
    let r = rabbit().await;
    let (topic, queue) = r.declared("frame-edge").await;
    let frame_max = r.connection.frame_max();
    let room = frame_max - 20;
    let work = Work {
        id: Uuid::now_v7(),
        n: 1,
    };
    // A message whose properties leave 40 bytes of its frame free.
    let mut message = Message::new(
        MessageHeader::new(&topic, MessageType::Command),
        serde_json::to_vec(&work).unwrap(),
    );
    message.header.id = work.id;
    message.header.bag.insert("pad".into(), String::new());
    let base = properties_size(&brighter_rabbitmq::encode_properties(&message));
    message
        .header
        .bag
        .insert("pad".into(), "p".repeat(room - base - 40));
    let size = properties_size(&brighter_rabbitmq::encode_properties(&message));
    assert_eq!(size, room - 40);
    r.producer.send(&message).await.unwrap();
    let dispatcher = r
        .pump(RejectsWith("r".repeat(100)), &topic, &queue, |s| {
            s.restart_delay(Duration::from_millis(10), Duration::from_millis(50))
                .settle_attempts(3)
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while dispatcher
        .subscription_health(&queue)
        .unwrap()
        .dead_lettered
        == 0
    {
        assert!(Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    let health = dispatcher.subscription_health(&queue).unwrap();
    assert_eq!((health.restarts, health.unsettled), (0, 0), "{health:?}");
    // The connection shared with the producer stayed up all along.
    let fine = Message::new(MessageHeader::new(&topic, MessageType::Event), "{}");
    r.producer.send(&fine).await.unwrap();
    let channel = r.connection.channel().await.unwrap();
    let dlq = RabbitChannelFactory::dead_letter_queue(&queue);
    let got = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is in the dead-letter queue");
    let parked =
        decode_message(&got.delivery.properties, &topic, got.delivery.data.clone()).unwrap();
    assert_eq!(parked.id(), work.id);
    assert_eq!(parked.body, message.body, "the body is whole");
    assert_eq!(
        parked_reason(&got.delivery.properties).unwrap(),
        "r".repeat(100)
    );
    assert!(
        !parked.header.bag.contains_key("pad"),
        "the header bag was left out"
    );
    let headers = got.delivery.properties.headers().clone().unwrap();
    assert!(
        headers
            .inner()
            .contains_key(brighter_core::wire::HEADERS_DROPPED)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_with_a_ttl_stays_in_the_invalid_queue() {
    // Before: the copy in the invalid queue kept the original's per-message
    // TTL (`expiration`), so it was counted as parked and then vanished.
    let r = rabbit().await;
    let (topic, queue) = r.declared("ttl").await;
    let channel = r
        .publish_raw(
            &topic,
            b"no id anywhere",
            lapin::BasicProperties::default().with_expiration("1500".into()),
        )
        .await;
    let dispatcher = r.pump(Record::default(), &topic, &queue, |s| s).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while dispatcher.subscription_health(&queue).unwrap().invalid == 0 {
        assert!(Instant::now() < deadline, "never parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // past the TTL
    let invalid = RabbitChannelFactory::invalid_message_queue(&queue);
    let got = channel
        .basic_get(invalid.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("still in the invalid-message queue after the original's TTL");
    assert_eq!(got.delivery.data, b"no id anywhere");
    assert!(got.delivery.properties.expiration().is_none());
    assert!(parked_reason(&got.delivery.properties).is_some());
}

/// Field tables nested `depth` deep under one header.
fn deep_headers(id: Uuid, depth: usize) -> lapin::types::FieldTable {
    let mut table = lapin::types::FieldTable::default();
    for _ in 0..depth {
        let mut outer = lapin::types::FieldTable::default();
        outer.insert("a".into(), lapin::types::AMQPValue::FieldTable(table));
        table = outer;
    }
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        brighter_core::wire::ID.into(),
        lapin::types::AMQPValue::LongString(id.to_string().into()),
    );
    headers.insert("x-deep".into(), lapin::types::AMQPValue::FieldTable(table));
    headers
}

/// The publisher half of the deep-table test, run in a process of its own
/// with a large thread stack: lapin's (recursive) writer needs it to send
/// what its reader, patched, now survives.
async fn publish_a_deeply_nested_header_table(exchange: String) {
    let topic = std::env::var("DEEP_TOPIC").unwrap();
    let id: Uuid = std::env::var("DEEP_ID").unwrap().parse().unwrap();
    let connection = RabbitConnection::new(config("deep-publisher").exchange(&exchange));
    let channel = connection.channel().await.unwrap();
    let work = Work { id, n: 7 };
    channel
        .basic_publish(
            exchange.as_str().into(),
            topic.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            &serde_json::to_vec(&work).unwrap(),
            lapin::BasicProperties::default().with_headers(deep_headers(id, 1_000)),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_table_nested_a_thousand_deep_does_not_kill_the_consumer() {
    if let Ok(exchange) = std::env::var("DEEP_EXCHANGE") {
        // This is the child process started below: publish and end.
        return publish_a_deeply_nested_header_table(exchange).await;
    }
    // About 7 KB of nested field tables: the AMQP client's recursive parser
    // overflowed the stack of its I/O thread and aborted the process (seen
    // here as SIGABRT, "thread 'lapin-io-loop' has overflowed its stack").
    let r = rabbit().await;
    let (topic, queue) = r.declared("deep").await;
    let id = Uuid::now_v7();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_header_table_nested_a_thousand_deep_does_not_kill_the_consumer",
            "--nocapture",
        ])
        .env("RUST_MIN_STACK", (256 * 1024 * 1024).to_string())
        .env("DEEP_EXCHANGE", r.connection.config().exchange_name())
        .env("DEEP_TOPIC", &topic)
        .env("DEEP_ID", id.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "the publisher process failed: {status}");
    let handled = Record::default();
    let dispatcher = r.pump(handled.clone(), &topic, &queue, |s| s).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let health = dispatcher.subscription_health(&queue).unwrap();
        if health.handled + health.invalid > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "neither handled nor parked: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    // The message is well formed apart from the deep header, which is read
    // as empty past 64 levels: it is handled, once, and the process lives.
    let health = dispatcher.subscription_health(&queue).unwrap();
    assert_eq!((health.handled, health.restarts), (1, 0), "{health:?}");
    assert_eq!(handled.0.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_copy_keeps_the_original_header_types() {
    // Before: the copy was re-encoded from the decoded message, so every
    // header became a string (an integer 42 came back as "42").
    let r = rabbit().await;
    let (topic, queue) = r.declared("types").await;
    let id = Uuid::now_v7();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        brighter_core::wire::ID.into(),
        lapin::types::AMQPValue::LongString(id.to_string().into()),
    );
    headers.insert("x-count".into(), lapin::types::AMQPValue::LongInt(42));
    headers.insert("x-flag".into(), lapin::types::AMQPValue::Boolean(true));
    let channel = r
        .publish_raw(
            &topic,
            b"not JSON",
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await;
    let dispatcher = r.pump(Record::default(), &topic, &queue, |s| s).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while dispatcher.subscription_health(&queue).unwrap().invalid == 0 {
        assert!(Instant::now() < deadline, "never parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    let invalid = RabbitChannelFactory::invalid_message_queue(&queue);
    let got = channel
        .basic_get(invalid.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("in the invalid-message queue");
    let headers = got.delivery.properties.headers().clone().unwrap();
    let inner = headers.inner();
    assert_eq!(
        inner.get("x-count"),
        Some(&lapin::types::AMQPValue::LongInt(42))
    );
    assert_eq!(
        inner.get("x-flag"),
        Some(&lapin::types::AMQPValue::Boolean(true))
    );
    assert!(parked_reason(&got.delivery.properties).is_some());
}
