//! RabbitMQ transport vs raw lapin with the same settings, in the same run:
//!
//! 1. publish N persistent messages with publisher confirms, all in flight:
//!    `RabbitProducer::send_batch` vs `basic_publish` + awaiting every confirm;
//! 2. consume N messages with prefetch 100 to a no-op: the dispatcher's pump
//!    (one performer) vs a lapin consumer acking each message.
//!
//! Needs RabbitMQ at `AMQP_ADDR` (default amqp://guest:guest@127.0.0.1:5672/%2f).
//! Run with: cargo bench -p brighter-rabbitmq --bench rabbit [-- --quick]
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use brighter_core::conformance::unique_name;
use brighter_core::{
    ChannelFactory, ChannelSpec, Command, CommandProcessor, Dispatcher, Error, Handler, Message,
    MessageHeader, MessageType, Producer, Publication, Request, RequestContext, Subscription,
};
use brighter_rabbitmq::{
    RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer, encode_properties,
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

const PREFETCH: u16 = 100;

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

fn body(i: usize) -> Vec<u8> {
    serde_json::to_vec(&Ping {
        id: Uuid::now_v7(),
        text: format!("hello {i}"),
    })
    .unwrap()
}

/// Raw lapin publishing: `same_headers` sends the headers our producer sends
/// (built the same way), else bare persistent properties.
async fn raw_publish(
    raw: &lapin::Channel,
    exchange: &str,
    topic: &str,
    n: usize,
    same_headers: bool,
) -> f64 {
    let start = Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        let props = if same_headers {
            encode_properties(&Message::new(
                MessageHeader::new(topic, MessageType::Command),
                Vec::new(),
            ))
        } else {
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(Uuid::now_v7().to_string().into())
                .with_content_type("application/json".into())
        };
        confirms.push(
            raw.basic_publish(
                exchange.into(),
                topic.into(),
                BasicPublishOptions::default(),
                &body(i),
                props,
            )
            .await
            .unwrap(),
        );
    }
    for confirmation in join_all(confirms).await {
        assert!(confirmation.unwrap().is_ack());
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn ours_publish(producer: &RabbitProducer, topic: &str, n: usize) -> f64 {
    let messages: Vec<Message> = (0..n)
        .map(|i| Message::new(MessageHeader::new(topic, MessageType::Command), body(i)))
        .collect();
    let start = Instant::now();
    for result in producer.send_batch(&messages).await {
        result.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn raw_consume(connection: &Connection, queue: &str, n: usize) -> f64 {
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
    let start = Instant::now();
    for _ in 0..n {
        let delivery = consumer.next().await.unwrap().unwrap();
        let ping: Ping = serde_json::from_slice(&delivery.data).unwrap();
        std::hint::black_box(ping);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    channel.close(200, "done".into()).await.unwrap();
    rate
}

async fn ours_consume(
    processor: &CommandProcessor,
    factory: &RabbitChannelFactory,
    handled: &AtomicUsize,
    topic: &str,
    queue: &str,
    n: usize,
) -> f64 {
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Ping>(queue, topic, factory.clone())
                .buffer_size(usize::from(PREFETCH))
                .empty_channel_delay(Duration::ZERO),
        )
        .build()
        .unwrap();
    let before = handled.load(Ordering::Relaxed);
    let start = Instant::now();
    dispatcher.start().await.unwrap();
    while handled.load(Ordering::Relaxed) - before < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    dispatcher.shutdown().await;
    rate
}

async fn run(quick: bool) {
    let (n, runs) = if quick { (2_000, 3) } else { (10_000, 3) };
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

    let (mut ours, mut same, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        same.push(raw_publish(&raw, &exchange, topic, n, true).await);
        purge().await;
        ours.push(ours_publish(&producer, topic, n).await);
        purge().await;
        bare.push(raw_publish(&raw, &exchange, topic, n, false).await);
        purge().await;
    }
    let (o, s, b) = (
        benchkit::median(ours),
        benchkit::median(same),
        benchkit::median(bare),
    );
    println!("publish {n} persistent messages with confirms, all in flight, median of {runs}:");
    println!(
        "  ours: {o:>8.0} msg/s   raw lapin, same headers: {s:>8.0} msg/s   ratio {:.2} (goal >= 0.8)",
        o / s
    );
    println!(
        "  raw lapin, bare properties: {b:>8.0} msg/s   ratio {:.2}",
        o / b
    );
    let note = format!("{n} persistent messages with confirms, all in flight; median of {runs}");
    benchkit::record(
        "RabbitMQ publish vs raw lapin with the same headers",
        o,
        s,
        "msg/s",
        benchkit::Goal::AtLeast(0.8),
        &note,
    );
    benchkit::record(
        "RabbitMQ publish vs raw lapin with bare properties",
        o,
        b,
        "msg/s",
        benchkit::Goal::None,
        &note,
    );

    let handled = Arc::new(AtomicUsize::new(0));
    let processor = CommandProcessor::builder()
        .command(Count(Arc::clone(&handled)))
        .publication::<Ping>(Publication::command(topic))
        .producer(RabbitProducer::new(connection.clone()))
        .build()
        .unwrap();
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ours_publish(&producer, topic, n).await;
        base.push(raw_consume(&raw_connection, &queue, n).await);
        ours_publish(&producer, topic, n).await;
        ours.push(ours_consume(&processor, &factory, &handled, topic, &queue, n).await);
    }
    let (o, b) = (benchkit::median(ours), benchkit::median(base));
    println!("consume {n} messages, prefetch {PREFETCH}, no-op handler, median of {runs}:");
    println!(
        "  ours (pump): {o:>8.0} msg/s   raw lapin consumer: {b:>8.0} msg/s   ratio {:.2} (goal >= 0.8)",
        o / b
    );
    benchkit::record(
        "RabbitMQ consume through the pump vs raw lapin consumer",
        o,
        b,
        "msg/s",
        benchkit::Goal::AtLeast(0.8),
        &format!("{n} messages, prefetch {PREFETCH} both sides, no-op handler; median of {runs}"),
    );
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
