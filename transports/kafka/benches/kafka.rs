//! Kafka transport vs raw rdkafka with the same settings, in the same run:
//!
//! 1. produce N messages, all in flight, idempotent, acks=all:
//!    `KafkaProducer::send_batch` vs a raw `FutureProducer`;
//! 2. consume N messages to a no-op, storing each offset after the work:
//!    the dispatcher's pump (one performer) vs a raw `StreamConsumer`; steady
//!    state, timed from each side's first message (after joining the group).
//!
//! Needs a Kafka-protocol broker at `KAFKA_BROKERS` (default 127.0.0.1:9092).
//! Run with: cargo bench -p brighter-kafka --bench kafka [-- --quick]
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use brighter_core::conformance::unique_name;
use brighter_core::{
    Command, CommandProcessor, Dispatcher, Error, Handler, Message, MessageHeader, MessageType,
    Producer, Publication, Request, RequestContext, Subscription,
};
use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer, ensure_topics};
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn body(i: usize) -> Vec<u8> {
    serde_json::to_vec(&Ping {
        id: Uuid::now_v7(),
        text: format!("hello {i}"),
    })
    .unwrap()
}

/// Messages per second and client CPU per message (µs) of one run.
type Run = (f64, f64);

async fn raw_produce(producer: &FutureProducer, topic: &str, n: usize) -> Run {
    let bodies: Vec<(String, Vec<u8>)> =
        (0..n).map(|i| (format!("k{}", i % 16), body(i))).collect();
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    let sends = bodies.iter().map(|(key, payload)| {
        producer.send(
            FutureRecord::to(topic).key(key).payload(payload),
            Timeout::After(Duration::from_secs(30)),
        )
    });
    for result in join_all(sends).await {
        result.map_err(|(e, _)| e).unwrap();
    }
    rate_and_cpu(n, start, cpu)
}

/// The rate since `start` and the CPU per message since `cpu`.
fn rate_and_cpu(n: usize, start: Instant, cpu: Duration) -> Run {
    let spent = benchkit::cpu_time().saturating_sub(cpu);
    (
        n as f64 / start.elapsed().as_secs_f64(),
        spent.as_secs_f64() * 1e6 / n as f64,
    )
}

async fn ours_produce(producer: &KafkaProducer, topic: &str, n: usize) -> Run {
    let messages: Vec<Message> = (0..n)
        .map(|i| {
            let mut m = Message::new(MessageHeader::new(topic, MessageType::Command), body(i));
            m.header.partition_key = Some(format!("k{}", i % 16));
            m
        })
        .collect();
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    for result in producer.send_batch(&messages).await {
        result.unwrap();
    }
    rate_and_cpu(n, start, cpu)
}

async fn raw_consume(topic: &str, n: usize) -> Run {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique_name("raw"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100") // as the transport's consumer
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    // Steady state: the clock starts at the first message (after the group join).
    let first = consumer.recv().await.unwrap();
    consumer.store_offset_from_message(&first).unwrap();
    drop(first);
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    for i in 1..n {
        let m = match tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await {
            Ok(m) => m.unwrap(),
            Err(_) => panic!("raw consumer: no message after {i} of {n}"),
        };
        let ping: Ping = serde_json::from_slice(rdkafka::Message::payload(&m).unwrap()).unwrap();
        std::hint::black_box(ping);
        consumer.store_offset_from_message(&m).unwrap();
    }
    rate_and_cpu(n - 1, start, cpu)
}

async fn ours_consume(
    processor: &CommandProcessor,
    factory: &KafkaChannelFactory,
    handled: &AtomicUsize,
    topic: &str,
    n: usize,
) -> Run {
    let group = unique_name("ours");
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Ping>(&group, topic, factory.clone())
                .empty_channel_delay(Duration::ZERO),
        )
        .build()
        .unwrap();
    let before = handled.load(Ordering::Relaxed);
    dispatcher.start().await.unwrap();
    // Steady state: the clock starts at the first message (after topic creation
    // and the group join).
    while handled.load(Ordering::Relaxed) == before {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let before = before + 1;
    let n = n - 1;
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    while handled.load(Ordering::Relaxed) - before < n {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "pump: {} of {n} after 120 s",
            handled.load(Ordering::Relaxed) - before
        );
        // Coarse polling, so the bench's own wake-ups cost next to nothing.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let run = rate_and_cpu(n, start, cpu);
    dispatcher.shutdown().await;
    run
}

/// The medians of runs: (ours rate, raw rate, ours CPU, raw CPU).
fn medians(ours: Vec<Run>, raw: Vec<Run>) -> (f64, f64, f64, f64) {
    let (o, oc): (Vec<f64>, Vec<f64>) = ours.into_iter().unzip();
    let (b, bc): (Vec<f64>, Vec<f64>) = raw.into_iter().unzip();
    (
        benchkit::median(o),
        benchkit::median(b),
        benchkit::median(oc),
        benchkit::median(bc),
    )
}

async fn run(quick: bool) {
    let (n, runs) = if quick { (2_000, 3) } else { (10_000, 3) };
    // The producer's normal batching on both sides: KafkaProducer's defaults
    // (acks=all, idempotent, linger.ms=5), and the same for raw rdkafka. On
    // tansu `from_env` sends one record per batch (`KafkaConfig::for_tansu`),
    // and the raw producer is given the same.
    let config = KafkaConfig::from_env().topics(3, 1);
    let producer = KafkaProducer::new(config.clone()).unwrap();
    let mut raw = ClientConfig::new();
    raw.set("bootstrap.servers", brokers())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5");
    let tansu = std::env::var("KAFKA_BROKER").is_ok_and(|kind| kind == "tansu");
    if tansu {
        raw.set("batch.num.messages", "1");
    }
    let raw: FutureProducer = raw.create().unwrap();
    let topic = unique_name("bench");
    ensure_topics(&config, &[topic.as_str()]).await.unwrap();

    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        base.push(raw_produce(&raw, &topic, n).await);
        ours.push(ours_produce(&producer, &topic, n).await);
    }
    let (o, b, oc, bc) = medians(ours, base);
    println!("produce {n} messages, all in flight, idempotent, acks=all, median of {runs}:");
    println!(
        "  ours: {o:>8.0} msg/s {oc:.2} µs CPU/msg   raw rdkafka: {b:>8.0} msg/s {bc:.2} µs CPU/msg   ratio {:.2} (goal >= 0.9)",
        o / b
    );
    let note = format!(
        "{n} messages, idempotent, acks=all, linger.ms=5 both sides{}; median of {runs}",
        if tansu {
            ", one record per batch (tansu)"
        } else {
            ""
        }
    );
    benchkit::record(
        "Kafka produce vs raw rdkafka",
        o,
        b,
        "msg/s",
        benchkit::Goal::AtLeast(0.9),
        &note,
    );
    benchkit::record_cpu("Kafka produce", oc, bc, benchkit::Goal::None, &note);

    // Consume one backlog of brighter messages (raw-produced records have no
    // message id: the pump would rightly move them to the invalid topic) from the
    // start, each run and side in a group of its own.
    let topic = unique_name("backlog");
    ensure_topics(&config, &[topic.as_str()]).await.unwrap();
    let total = 2 * n;
    ours_produce(&producer, &topic, total).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let processor = CommandProcessor::builder()
        .command(Count(Arc::clone(&handled)))
        .publication::<Ping>(Publication::command(&topic))
        .producer(producer.clone())
        .build()
        .unwrap();
    let factory = KafkaChannelFactory::new(config, producer);
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        base.push(raw_consume(&topic, total).await);
        ours.push(ours_consume(&processor, &factory, &handled, &topic, total).await);
    }
    let (o, b, oc, bc) = medians(ours, base);
    println!(
        "consume {total} messages to a no-op, offsets stored after the work, median of {runs}:"
    );
    println!(
        "  ours (pump): {o:>8.0} msg/s {oc:.2} µs CPU/msg   raw rdkafka consumer: {b:>8.0} msg/s {bc:.2} µs CPU/msg   ratio {:.2} (goal >= 0.95)",
        o / b
    );
    let note = format!(
        "{total}-message backlog to a no-op handler, fetch.wait.max.ms=100 both sides; median of {runs}"
    );
    benchkit::record(
        "Kafka consume through the pump vs raw rdkafka consumer",
        o,
        b,
        "msg/s",
        benchkit::Goal::AtLeast(0.95),
        &note,
    );
    benchkit::record_cpu("Kafka consume", oc, bc, benchkit::Goal::AtMost(1.5), &note);
}

fn main() {
    benchkit::main("kafka", run);
}
