//! Kafka transport vs raw rdkafka with the same settings, in the same run,
//! each side's client CPU per message beside its rate:
//!
//! 1. produce N messages, all in flight, idempotent, acks=all, linger.ms=5:
//!    `KafkaProducer::send_batch` of messages as the processor makes them
//!    (CloudEvents attributes included) vs a raw `FutureProducer` sending
//!    bare records (key and payload), and vs the same raw producer writing
//!    the same header fields by hand (our message format, raw client);
//! 2. consume N messages to a no-op, storing each offset after the work:
//!    the dispatcher's pump (one performer) vs a raw `StreamConsumer` that
//!    reads bare records and deserializes the payload, and vs the same raw
//!    consumer reading our records and the message id from their headers;
//!    steady state, timed from each side's first message (after joining the
//!    group).
//!
//! Needs a Kafka-protocol broker at `KAFKA_BROKERS` (default 127.0.0.1:9092).
//! Run with: cargo bench -p brighter-kafka --bench kafka [-- --quick]
//! (`BENCH_ONLY=produce` or `BENCH_ONLY=consume` runs one scenario;
//! `BENCH_SIDE=ours`, `raw` or `format` runs one side of a scenario, for a
//! profiler; `none`, neither.)
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use benchkit::{Run, medians, rate_and_cpu, record_runs};
use brighter_core::conformance::unique_name;
use brighter_core::{
    Command, CommandProcessor, Dispatcher, Error, Handler, Message, Producer, Publication, Request,
    RequestContext, Subscription,
};
use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer, ensure_topics};
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
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

/// A processor that sends pings to `topic` through `producer` and counts
/// those it handles.
fn counting(topic: &str, producer: impl Producer) -> (CommandProcessor, Arc<AtomicUsize>) {
    let handled = Arc::new(AtomicUsize::new(0));
    let processor = CommandProcessor::builder()
        .command(Count(Arc::clone(&handled)))
        .publication::<Ping>(Publication::command(topic))
        .producer(producer)
        .build()
        .unwrap();
    (processor, handled)
}

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn ping(i: usize) -> Ping {
    Ping {
        id: Uuid::now_v7(),
        text: format!("hello {i}"),
    }
}

fn key(i: usize) -> String {
    format!("k{}", i % 16)
}

/// `n` messages as the processor makes them for a post (its mapper, the
/// CloudEvents attributes), keyed as the raw records are.
async fn messages(processor: &CommandProcessor, n: usize) -> Vec<Message> {
    let mut messages = Vec::with_capacity(n);
    for i in 0..n {
        let mut message = processor
            .messenger()
            .message_for(&ping(i), None)
            .await
            .unwrap();
        message.header.partition_key = Some(key(i));
        messages.push(message);
    }
    messages
}

/// A raw record: key, payload and, for our format, the header fields as
/// text pairs that the raw producer writes as Kafka headers itself.
struct RawRecord {
    key: String,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// Raw records: bare (key and payload), or with the header fields our
/// producer writes for `messages` (the same keys and values).
fn raw_records(messages: &[Message], with_format: bool) -> Vec<RawRecord> {
    messages
        .iter()
        .map(|m| {
            let mut headers = Vec::new();
            if with_format {
                let carried = brighter_core::wire::Carried {
                    topic: Some(&m.header.topic),
                    partition_key: true,
                    ..Default::default()
                };
                brighter_core::wire::write(
                    &m.header,
                    brighter_core::wire::CloudEventsBinding::Kafka,
                    carried,
                    |k, v| headers.push((k.to_owned(), v.to_owned())),
                );
            }
            RawRecord {
                key: m.header.partition_key.clone().unwrap_or_default(),
                payload: m.body.to_vec(),
                headers,
            }
        })
        .collect()
}

async fn raw_produce(producer: &FutureProducer, topic: &str, records: &[RawRecord]) -> Run {
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    let sends = records.iter().map(|r| {
        let mut record = FutureRecord::to(topic).key(&r.key).payload(&r.payload);
        if !r.headers.is_empty() {
            let headers = r.headers.iter().fold(
                OwnedHeaders::new_with_capacity(r.headers.len()),
                |headers, (key, value)| {
                    headers.insert(Header {
                        key,
                        value: Some(value),
                    })
                },
            );
            record = record.headers(headers);
        }
        producer.send(record, Timeout::After(Duration::from_secs(30)))
    });
    for result in join_all(sends).await {
        result.map_err(|(e, _)| e).unwrap();
    }
    rate_and_cpu(records.len(), start, cpu)
}

async fn ours_produce(producer: &KafkaProducer, messages: &[Message]) -> Run {
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    for result in producer.send_batch(messages).await {
        result.unwrap();
    }
    rate_and_cpu(messages.len(), start, cpu)
}

/// A raw consumer of `topic` in a group of its own, from the start; `read_id`:
/// it also reads each record's message id from its headers (our format).
async fn raw_consume(topic: &str, n: usize, read_id: bool) -> Run {
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
        if read_id {
            let id = rdkafka::Message::headers(&m)
                .and_then(|h| h.iter().find(|h| h.key == "ce_id"))
                .and_then(|h| h.value)
                .and_then(|v| Uuid::try_parse_ascii(v).ok());
            assert!(id.is_some(), "a record without its id");
            std::hint::black_box(id);
        }
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
    // and the group join). A channel that decodes records before its pump
    // asks (a read-ahead) gets a head start here that it would not have in a
    // stream: measure such a change from the channel's opening instead (see
    // bench/NOTES.md on Kafka consume).
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

async fn run(quick: bool) {
    let (n, runs) = if quick { (2_000, 3) } else { (10_000, 5) };
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
    let (processor, _) = counting(&topic, producer.clone());

    // Header bytes per record: each header's key and value, and a length
    // byte for each (both are varints, one byte under 64).
    let sample = raw_records(&messages(&processor, 1).await, true);
    let bytes: usize = sample[0]
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum();
    println!("Kafka header bytes per record: {bytes}");
    benchkit::record(
        "Kafka header bytes per record, ours",
        bytes as f64,
        508.0,
        "bytes",
        benchkit::Goal::None,
        "a keyed command as the processor makes it (CloudEvents attributes, no trace context); baseline: the same message as 0.1 wrote it (measured at commit 456cc57)",
    );

    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "produce" {
        produce(&processor, &producer, &raw, &topic, n, runs, tansu).await;
    }
    if only.is_empty() || only == "consume" {
        consume(&config, &producer, &raw, n, runs).await;
    }
}

async fn produce(
    processor: &CommandProcessor,
    producer: &KafkaProducer,
    raw: &FutureProducer,
    topic: &str,
    n: usize,
    runs: usize,
    tansu: bool,
) {
    let (mut ours, mut bare, mut format) = (Vec::new(), Vec::new(), Vec::new());
    // BENCH_SIDE=ours, raw or format: one side only (for a profiler).
    let side = std::env::var("BENCH_SIDE").unwrap_or_default();
    for _ in 0..runs {
        let messages = messages(processor, n).await;
        if side.is_empty() || side == "raw" {
            bare.push(raw_produce(raw, topic, &raw_records(&messages, false)).await);
        }
        if side.is_empty() || side == "format" {
            format.push(raw_produce(raw, topic, &raw_records(&messages, true)).await);
        }
        if side.is_empty() || side == "ours" {
            ours.push(ours_produce(producer, &messages).await);
        }
    }
    if !side.is_empty() {
        return one_side("produce", &side, &[ours, bare, format]);
    }
    let (ours, bare, format) = (medians(ours), medians(bare), medians(format));
    println!("produce {n} messages, all in flight, idempotent, acks=all, median of {runs}:");
    let note = format!(
        "{n} messages, idempotent, acks=all, linger.ms=5 both sides{}; median of {runs}",
        if tansu {
            ", one record per batch (tansu)"
        } else {
            ""
        }
    );
    record_runs(
        "Kafka produce",
        "raw rdkafka, bare records",
        (ours, bare),
        (benchkit::Goal::AtLeast(0.9), benchkit::Goal::None),
        &note,
    );
    record_runs(
        "Kafka produce",
        "raw rdkafka with our headers",
        (ours, format),
        (benchkit::Goal::None, benchkit::Goal::None),
        &note,
    );
}

async fn consume(
    config: &KafkaConfig,
    producer: &KafkaProducer,
    raw: &FutureProducer,
    n: usize,
    runs: usize,
) {
    // Two backlogs of the same messages, read from the start by each run and
    // side in a group of its own: ours (what KafkaProducer writes) and bare
    // records (raw-produced records have no message id: the pump would
    // rightly move them to the invalid topic, so only the raw consumer reads
    // those).
    let topic = unique_name("backlog");
    let bare_topic = unique_name("bare");
    ensure_topics(config, &[topic.as_str(), bare_topic.as_str()])
        .await
        .unwrap();
    let total = 2 * n;
    let (processor, handled) = counting(&topic, producer.clone());
    let backlog = messages(&processor, total).await;
    ours_produce(producer, &backlog).await;
    raw_produce(raw, &bare_topic, &raw_records(&backlog, false)).await;
    let factory = KafkaChannelFactory::new(config.clone(), producer.clone());
    let (mut ours, mut bare, mut format) = (Vec::new(), Vec::new(), Vec::new());
    // BENCH_SIDE=ours, raw or format: one side only (for a profiler).
    let side = std::env::var("BENCH_SIDE").unwrap_or_default();
    for _ in 0..runs {
        if side.is_empty() || side == "raw" {
            bare.push(raw_consume(&bare_topic, total, false).await);
        }
        if side.is_empty() || side == "format" {
            format.push(raw_consume(&topic, total, true).await);
        }
        if side.is_empty() || side == "ours" {
            ours.push(ours_consume(&processor, &factory, &handled, &topic, total).await);
        }
    }
    if !side.is_empty() {
        return one_side("consume", &side, &[ours, bare, format]);
    }
    let (ours, bare, format) = (medians(ours), medians(bare), medians(format));
    println!(
        "consume {total} messages to a no-op, offsets stored after the work, median of {runs}:"
    );
    let note = format!(
        "{total}-message backlog to a no-op handler, fetch.wait.max.ms=100 both sides; median of {runs}"
    );
    record_runs(
        "Kafka consume through the pump",
        "raw rdkafka consumer, bare records",
        (ours, bare),
        (benchkit::Goal::AtLeast(0.95), benchkit::Goal::AtMost(1.5)),
        &note,
    );
    record_runs(
        "Kafka consume through the pump",
        "raw rdkafka consumer reading our headers",
        (ours, format),
        (benchkit::Goal::AtLeast(0.95), benchkit::Goal::AtMost(1.5)),
        &note,
    );
}

/// Prints the medians of the one side that ran (`BENCH_SIDE`), for a
/// profiler's run; nothing is recorded.
fn one_side(scenario: &str, side: &str, runs: &[Vec<Run>; 3]) {
    let one = medians(runs.concat());
    println!(
        "{scenario}, {side} only: {:.0} msg/s {:.2} µs CPU/msg",
        one.0, one.1
    );
}

fn main() {
    benchkit::main("kafka", run);
}
