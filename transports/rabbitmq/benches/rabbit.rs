//! RabbitMQ transport vs raw lapin with the same settings, in the same run,
//! each side's client CPU per message beside its rate:
//!
//! 1. publish N persistent messages with publisher confirms, all in flight:
//!    `RabbitProducer::send_batch` of messages as the processor makes them
//!    (CloudEvents attributes included) vs `basic_publish` + awaiting every
//!    confirm, with bare properties (delivery mode, message id, content
//!    type) and with the properties our producer writes (our format, raw
//!    client);
//! 2. consume N messages with prefetch 500 to a no-op: the dispatcher's pump
//!    (one performer) vs a lapin consumer acking each message, of bare
//!    messages and of ours (reading the message id); steady state, timed
//!    from each side's first message.
//!
//! Also reports the bytes of AMQP properties and headers per message.
//!
//! Needs RabbitMQ at `AMQP_ADDR` (default amqp://guest:guest@127.0.0.1:5672/%2f).
//! Run with: cargo bench -p brighter-rabbitmq --bench rabbit [-- --quick]
//! (`BENCH_ONLY=publish` or `BENCH_ONLY=consume` runs one scenario.)
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use benchkit::{Run, medians, rate_and_cpu, record_runs};
use brighter_core::conformance::unique_name;
use brighter_core::{
    ChannelFactory, ChannelSpec, Command, CommandProcessor, Dispatcher, Error, Handler, Message,
    Producer, Publication, Request, RequestContext, Subscription,
};
use brighter_rabbitmq::{
    RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer, encode_properties,
    properties_size,
};
use futures::StreamExt;
use futures::future::join_all;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const PREFETCH: u16 = 500;

#[derive(Clone, Serialize, Deserialize)]
struct Ping {
    id: Uuid,
    text: String,
}
impl Request for Ping {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Ping {}

struct Count(Arc<AtomicUsize>);
impl Handler<Ping> for Count {
    async fn handle(&self, _: &Ping, _: &mut RequestContext) -> Result<(), Error> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// `n` messages as the processor makes them for a post.
async fn messages(processor: &CommandProcessor, n: usize) -> Vec<Message> {
    let mut messages = Vec::with_capacity(n);
    for i in 0..n {
        let ping = Ping {
            id: Uuid::now_v7(),
            text: format!("hello {i}"),
        };
        messages.push(
            processor
                .messenger()
                .message_for(&ping, None)
                .await
                .unwrap(),
        );
    }
    messages
}

/// Bare persistent properties: what a hand-written publisher sends.
fn bare(message: &Message) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(message.id().to_string().as_str().into())
        .with_content_type("application/json".into())
}

/// Raw lapin publishing of `messages`: with `format`, the properties our
/// producer writes (built per message, as a publisher would), else bare ones.
async fn raw_publish(
    raw: &lapin::Channel,
    exchange: &str,
    topic: &str,
    messages: &[Message],
    format: bool,
) -> Run {
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    let mut confirms = Vec::with_capacity(messages.len());
    for message in messages {
        let props = if format {
            encode_properties(message)
        } else {
            bare(message)
        };
        confirms.push(
            raw.basic_publish(
                exchange.into(),
                topic.into(),
                BasicPublishOptions::default(),
                &message.body,
                props,
            )
            .await
            .unwrap(),
        );
    }
    for confirmation in join_all(confirms).await {
        assert!(confirmation.unwrap().is_ack());
    }
    rate_and_cpu(messages.len(), start, cpu)
}

async fn ours_publish(producer: &RabbitProducer, messages: &[Message]) -> Run {
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    for result in producer.send_batch(messages).await {
        result.unwrap();
    }
    rate_and_cpu(messages.len(), start, cpu)
}

/// A raw consumer of `n` messages of `queue`, prefetch as ours, acking each;
/// `read_id`: it also reads each message's id (our format).
async fn raw_consume(connection: &Connection, queue: &str, n: usize, read_id: bool) -> Run {
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "raw-bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Steady state: the clock starts at the first message.
    let first = consumer.next().await.unwrap().unwrap();
    first.ack(BasicAckOptions::default()).await.unwrap();
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    for _ in 1..n {
        let delivery = consumer.next().await.unwrap().unwrap();
        if read_id {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|id| Uuid::try_parse(id.as_str()).ok());
            assert!(id.is_some(), "a message without its id");
            std::hint::black_box(id);
        }
        let ping: Ping = serde_json::from_slice(&delivery.data).unwrap();
        std::hint::black_box(ping);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let run = rate_and_cpu(n - 1, start, cpu);
    channel.close(200, "done".into()).await.unwrap();
    run
}

async fn ours_consume(
    processor: &CommandProcessor,
    factory: &RabbitChannelFactory,
    handled: &AtomicUsize,
    topic: &str,
    queue: &str,
    n: usize,
) -> Run {
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Ping>(queue, topic, factory.clone())
                .buffer_size(usize::from(PREFETCH))
                .empty_channel_delay(Duration::ZERO),
        )
        .build()
        .unwrap();
    let before = handled.load(Ordering::Relaxed);
    dispatcher.start().await.unwrap();
    while handled.load(Ordering::Relaxed) == before {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let (before, n) = (before + 1, n - 1);
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    while handled.load(Ordering::Relaxed) - before < n {
        // Coarse polling, so the bench's own wake-ups cost next to nothing.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let run = rate_and_cpu(n, start, cpu);
    dispatcher.shutdown().await;
    run
}

async fn run(quick: bool) {
    let (n, runs) = if quick { (2_000, 3) } else { (10_000, 5) };
    let exchange = unique_name("bench");
    let topic = "bench.ping";
    let queue = unique_name("bench-q");
    let config = RabbitConfig::from_env()
        .exchange(&exchange)
        .connection_name("brighter-bench")
        .queue_expiry(std::time::Duration::from_secs(1800));
    let uri = std::env::var("AMQP_ADDR")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let connection = RabbitConnection::new(config);
    let producer = RabbitProducer::new(connection.clone());
    let factory = RabbitChannelFactory::new(connection.clone());
    // Topology (exchange, queue bound to the topic) as a subscription declares it.
    let mut declare = factory
        .create_channel(&ChannelSpec::new(&queue, topic, &queue))
        .await
        .unwrap();
    declare.close().await.unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let processor = CommandProcessor::builder()
        .command(Count(Arc::clone(&handled)))
        .publication::<Ping>(Publication::command(topic))
        .producer(RabbitProducer::new(connection.clone()))
        .build()
        .unwrap();

    let raw_connection = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let raw = raw_connection.create_channel().await.unwrap();
    raw.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let purge = || async {
        raw.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap()
    };

    let sample = messages(&processor, 1).await.remove(0);
    let bytes = properties_size(&encode_properties(&sample));
    let bare_bytes = properties_size(&bare(&sample));
    println!("AMQP properties and headers per message: ours {bytes} bytes, bare {bare_bytes}");
    let note = "a command as the processor makes it (CloudEvents attributes, no trace context)";
    benchkit::record(
        "RabbitMQ properties and headers per message, ours vs bare",
        bytes as f64,
        bare_bytes as f64,
        "bytes",
        benchkit::Goal::None,
        note,
    );
    benchkit::record(
        "RabbitMQ properties and headers per message, ours vs 0.1",
        bytes as f64,
        661.0,
        "bytes",
        benchkit::Goal::None,
        &format!("{note}; baseline: the same message as 0.1 wrote it (measured at commit 456cc57)"),
    );

    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "publish" {
        let (mut ours, mut format, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let batch = messages(&processor, n).await;
            format.push(raw_publish(&raw, &exchange, topic, &batch, true).await);
            purge().await;
            ours.push(ours_publish(&producer, &batch).await);
            purge().await;
            plain.push(raw_publish(&raw, &exchange, topic, &batch, false).await);
            purge().await;
        }
        let (ours, format, plain) = (medians(ours), medians(format), medians(plain));
        println!("publish {n} persistent messages with confirms, all in flight, median of {runs}:");
        let note =
            format!("{n} persistent messages with confirms, all in flight; median of {runs}");
        record_runs(
            "RabbitMQ publish",
            "raw lapin, bare properties",
            (ours, plain),
            (benchkit::Goal::AtLeast(0.9), benchkit::Goal::None),
            &note,
        );
        record_runs(
            "RabbitMQ publish",
            "raw lapin with our properties",
            (ours, format),
            (benchkit::Goal::AtLeast(0.97), benchkit::Goal::AtMost(1.3)),
            &note,
        );
    }

    if only.is_empty() || only == "consume" {
        let (mut ours, mut format, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let batch = messages(&processor, n).await;
            raw_publish(&raw, &exchange, topic, &batch, false).await;
            plain.push(raw_consume(&raw_connection, &queue, n, false).await);
            ours_publish(&producer, &batch).await;
            format.push(raw_consume(&raw_connection, &queue, n, true).await);
            ours_publish(&producer, &batch).await;
            ours.push(ours_consume(&processor, &factory, &handled, topic, &queue, n).await);
        }
        let (ours, format, plain) = (medians(ours), medians(format), medians(plain));
        println!("consume {n} messages, prefetch {PREFETCH}, no-op handler, median of {runs}:");
        let note = format!(
            "{n} messages, prefetch {PREFETCH} both sides, no-op handler; median of {runs}"
        );
        record_runs(
            "RabbitMQ consume through the pump",
            "raw lapin consumer, bare messages",
            (ours, plain),
            (benchkit::Goal::AtLeast(0.9), benchkit::Goal::None),
            &note,
        );
        record_runs(
            "RabbitMQ consume through the pump",
            "raw lapin consumer of our messages",
            (ours, format),
            (benchkit::Goal::AtLeast(0.97), benchkit::Goal::AtMost(1.3)),
            &note,
        );
    }
    for name in [
        queue.clone(),
        format!("{queue}.dlq"),
        format!("{queue}.invalid"),
    ] {
        let _ = raw
            .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
            .await;
    }
}

fn main() {
    benchkit::main("rabbit", run);
}
