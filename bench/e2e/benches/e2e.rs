//! End-to-end benchmarks over Postgres and real brokers, each against a
//! baseline written with the raw clients and measured in the same run:
//!
//! 3. `PgSweeper` draining a backlog to Kafka and to RabbitMQ vs a raw relay
//!    (claim 500 rows with `FOR UPDATE SKIP LOCKED`, send them all with confirms
//!    in flight, mark them dispatched, commit; repeat); plus the drain rate
//!    against raw produce alone, to show where the time goes.
//! 5. Consuming through the pump with the Postgres inbox (RabbitMQ, prefetch
//!    100) vs a raw lapin consumer doing one inbox insert per message.
//! 6. Latency at a fixed offered load (RabbitMQ): `post` (Postgres outbox
//!    deposit + clear) → handled, vs raw publish with confirm → raw consume;
//!    p50 and p99.
//!
//! Needs Postgres, RabbitMQ and a Kafka-protocol broker (as `scripts/test`
//! starts them). Results go through `benchkit::record` (see `scripts/bench`).
//! Run with: cargo bench -p brighter-outbox-postgres --bench e2e [-- --quick]
//! (`E2E_SKIP_DRAIN=1` skips the drains, to look at the inbox and latency alone).
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use benchkit::{Goal, median, quantile, record};
use brighter_core::conformance::unique_name;
use brighter_core::pipeline::{Pipeline, UseInbox};
use brighter_core::{
    ChannelFactory, ChannelSpec, Command, CommandProcessor, Dispatcher, Error, Handler, Message,
    MessageHeader, MessageType, Outbox, Producer, Publication, Request, RequestContext,
    Subscription,
};
use brighter_inbox_postgres::PgInbox;
use brighter_kafka::{KafkaConfig, KafkaProducer, ensure_topics};
use brighter_outbox_postgres::{PgOutbox, PgSweeper};
use brighter_rabbitmq::{RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer};
use futures::StreamExt;
use futures::future::join_all;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const BATCH: usize = 500;
const PREFETCH: u16 = 100;

#[derive(Clone, Serialize, Deserialize)]
struct Ping {
    id: Uuid,
    /// Microseconds since the run's epoch when it was sent (latency runs).
    sent_us: u64,
}
impl Request for Ping {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Ping {}

/// Counts handled pings and, when given an epoch, records their latency.
#[derive(Clone)]
struct Count {
    handled: Arc<AtomicUsize>,
    latencies: Arc<std::sync::Mutex<Vec<f64>>>,
    epoch: Instant,
}
impl Handler<Ping> for Count {
    async fn handle(&self, ping: &Ping, _: &mut RequestContext) -> Result<(), Error> {
        if ping.sent_us > 0 {
            let now = self.epoch.elapsed().as_micros() as f64;
            self.latencies
                .lock()
                .unwrap()
                .push((now - ping.sent_us as f64) / 1000.0);
        }
        self.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn counter(epoch: Instant) -> Count {
    Count {
        handled: Arc::default(),
        latencies: Arc::default(),
        epoch,
    }
}

fn ping_body(sent_us: u64) -> Vec<u8> {
    serde_json::to_vec(&Ping {
        id: Uuid::now_v7(),
        sent_us,
    })
    .unwrap()
}

async fn fill(outbox: &PgOutbox, topic: &str, rows: usize) {
    for start in (0..rows).step_by(1000) {
        let messages: Vec<Message> = (start..(start + 1000).min(rows))
            .map(|_| {
                Message::new(
                    MessageHeader::new(topic, MessageType::Command),
                    ping_body(0),
                )
            })
            .collect();
        outbox.add(&messages, None).await.unwrap();
    }
}

async fn drain_ours(
    outbox: &PgOutbox,
    processor: &CommandProcessor,
    topic: &str,
    rows: usize,
) -> f64 {
    fill(outbox, topic, rows).await;
    let start = Instant::now();
    let sweeper = PgSweeper::new(outbox.clone(), processor.clone())
        .min_age(Duration::ZERO)
        .batch_size(BATCH)
        .workers(4)
        .poll_interval(Duration::from_millis(10))
        .start()
        .await
        .unwrap();
    while outbox.outstanding_count().await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = rows as f64 / start.elapsed().as_secs_f64();
    sweeper.stop().await;
    rate
}

/// The raw relay: claim, send all with confirms in flight, mark, commit; repeat.
async fn drain_raw<F, Fut>(
    outbox: &PgOutbox,
    pool: &PgPool,
    schema: &str,
    topic: &str,
    rows: usize,
    send_all: F,
) -> f64
where
    F: Fn(Vec<(Uuid, Vec<u8>)>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    fill(outbox, topic, rows).await;
    let claim = format!(
        "SELECT message_id, body FROM \"{schema}\".\"outbox\" WHERE dispatched IS NULL \
         ORDER BY position LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
    );
    let mark =
        format!("UPDATE \"{schema}\".\"outbox\" SET dispatched = now() WHERE message_id = ANY($1)");
    let start = Instant::now();
    loop {
        let mut tx = pool.begin().await.unwrap();
        let claimed: Vec<(Uuid, Vec<u8>)> =
            sqlx::query_as(&claim).fetch_all(&mut *tx).await.unwrap();
        if claimed.is_empty() {
            tx.commit().await.unwrap();
            break;
        }
        let ids: Vec<Uuid> = claimed.iter().map(|(id, _)| *id).collect();
        send_all(claimed).await;
        sqlx::query(&mark)
            .bind(ids)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    rows as f64 / start.elapsed().as_secs_f64()
}

async fn kafka_send_all(raw: &FutureProducer, topic: &str, rows: Vec<(Uuid, Vec<u8>)>) {
    let keys: Vec<String> = rows.iter().map(|(id, _)| id.to_string()).collect();
    let sends = rows.iter().zip(&keys).map(|((_, body), key)| {
        raw.send(
            FutureRecord::to(topic).payload(body).key(key),
            Duration::from_secs(30),
        )
    });
    for result in join_all(sends).await {
        result.map_err(|(e, _)| e).unwrap();
    }
}

async fn rabbit_send_all(
    raw: &lapin::Channel,
    exchange: &str,
    topic: &str,
    rows: Vec<(Uuid, Vec<u8>)>,
) {
    let mut confirms = Vec::with_capacity(rows.len());
    for (id, body) in rows {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.to_string().into())
            .with_content_type("application/json".into());
        confirms.push(
            raw.basic_publish(
                exchange.into(),
                topic.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .unwrap(),
        );
    }
    for confirmation in join_all(confirms).await {
        assert!(confirmation.unwrap().is_ack());
    }
}

struct Env {
    pool: PgPool,
    schema: String,
    outbox: PgOutbox,
    rabbit: RabbitConnection,
    exchange: String,
    rabbit_factory: RabbitChannelFactory,
}

async fn env() -> Env {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .unwrap();
    let schema = format!("bench_{}", Uuid::now_v7().simple());
    let outbox = PgOutbox::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let exchange = unique_name("bench");
    let rabbit = RabbitConnection::new(
        RabbitConfig::from_env()
            .exchange(&exchange)
            .connection_name("brighter-bench")
            .queue_expiry(std::time::Duration::from_secs(1800)),
    );
    Env {
        pool,
        schema,
        outbox,
        rabbit_factory: RabbitChannelFactory::new(rabbit.clone()),
        rabbit,
        exchange,
    }
}

impl Env {
    async fn truncate(&self) {
        sqlx::query(&format!("TRUNCATE \"{}\".\"outbox\"", self.schema))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Declares the exchange, `queue` and its binding to `topic`.
    async fn rabbit_queue(&self, topic: &str, queue: &str) {
        let mut channel = self
            .rabbit_factory
            .create_channel(&ChannelSpec::new(queue, topic, queue))
            .await
            .unwrap();
        channel.close().await.unwrap();
    }

    /// A raw lapin consumer on `queue` with the pump's prefetch.
    async fn raw_consumer(&self, queue: &str) -> (lapin::Channel, lapin::Consumer) {
        let channel = self.rabbit.channel().await.unwrap();
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                queue.into(),
                "raw".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (channel, consumer)
    }

    async fn purge(&self, queue: &str) {
        let channel = self.rabbit.channel().await.unwrap();
        channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .unwrap();
    }

    fn processor(&self, producer: impl Producer, topic: &str) -> CommandProcessor {
        CommandProcessor::builder()
            .publication::<Ping>(Publication::command(topic))
            .producer(producer)
            .outbox(self.outbox.clone())
            .build()
            .unwrap()
    }
}

/// Scenario 3 over Kafka.
async fn sweeper_to_kafka(env: &Env, rows: usize, runs: usize) {
    // Both sides batch as librdkafka does by default.
    let config = KafkaConfig::from_env().topics(3, 1);
    let topic = unique_name("bench.sweep");
    ensure_topics(&config, &[topic.as_str()]).await.unwrap();
    let producer = KafkaProducer::new(config.clone()).unwrap();
    let raw: FutureProducer = config.client().create().unwrap();
    let processor = env.processor(producer, &topic);
    let (mut ours, mut relay, mut produce) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        env.truncate().await;
        relay.push(
            drain_raw(&env.outbox, &env.pool, &env.schema, &topic, rows, |batch| {
                kafka_send_all(&raw, &topic, batch)
            })
            .await,
        );
        env.truncate().await;
        ours.push(drain_ours(&env.outbox, &processor, &topic, rows).await);
        let batch: Vec<(Uuid, Vec<u8>)> =
            (0..rows).map(|_| (Uuid::now_v7(), ping_body(0))).collect();
        let start = Instant::now();
        kafka_send_all(&raw, &topic, batch).await;
        produce.push(rows as f64 / start.elapsed().as_secs_f64());
    }
    env.truncate().await;
    let (o, r, p) = (median(ours), median(relay), median(produce));
    let note = format!("{rows}-row backlog, idempotent producer, acks=all; median of {runs}");
    record(
        "sweeper drain to Kafka vs raw relay",
        o,
        r,
        "msg/s",
        Goal::AtLeast(1.0),
        &note,
    );
    record(
        "sweeper drain to Kafka vs raw produce alone",
        o,
        p,
        "msg/s",
        Goal::None,
        &note,
    );
}

/// Scenario 3 over RabbitMQ.
async fn sweeper_to_rabbit(env: &Env, rows: usize, runs: usize) {
    let topic = unique_name("bench.sweep");
    let queue = unique_name("bench.sweep");
    env.rabbit_queue(&topic, &queue).await;
    let raw = env.rabbit.channel().await.unwrap();
    raw.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let processor = env.processor(RabbitProducer::new(env.rabbit.clone()), &topic);
    let (mut ours, mut relay, mut produce) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        env.truncate().await;
        relay.push(
            drain_raw(&env.outbox, &env.pool, &env.schema, &topic, rows, |batch| {
                rabbit_send_all(&raw, &env.exchange, &topic, batch)
            })
            .await,
        );
        env.purge(&queue).await;
        env.truncate().await;
        ours.push(drain_ours(&env.outbox, &processor, &topic, rows).await);
        env.purge(&queue).await;
        let batch: Vec<(Uuid, Vec<u8>)> =
            (0..rows).map(|_| (Uuid::now_v7(), ping_body(0))).collect();
        let start = Instant::now();
        rabbit_send_all(&raw, &env.exchange, &topic, batch).await;
        produce.push(rows as f64 / start.elapsed().as_secs_f64());
        env.purge(&queue).await;
    }
    env.truncate().await;
    let (o, r, p) = (median(ours), median(relay), median(produce));
    let note = format!("{rows}-row backlog, persistent messages with confirms; median of {runs}");
    record(
        "sweeper drain to RabbitMQ vs raw relay",
        o,
        r,
        "msg/s",
        Goal::AtLeast(1.0),
        &note,
    );
    record(
        "sweeper drain to RabbitMQ vs raw produce alone",
        o,
        p,
        "msg/s",
        Goal::None,
        &note,
    );
}

/// Publishes `n` pings (framework messages) to `topic` for a consume run.
async fn backlog(env: &Env, topic: &str, n: usize) {
    let producer = RabbitProducer::new(env.rabbit.clone());
    let messages: Vec<Message> = (0..n)
        .map(|_| {
            Message::new(
                MessageHeader::new(topic, MessageType::Command),
                ping_body(0),
            )
        })
        .collect();
    for result in producer.send_batch(&messages).await {
        result.unwrap();
    }
}

/// Scenario 5: the pump with the Postgres inbox vs raw consume + inbox insert.
async fn inbox_consume(env: &Env, n: usize, runs: usize) {
    let inbox = PgInbox::builder(env.pool.clone())
        .schema(&env.schema)
        .build()
        .await
        .unwrap();
    let insert = format!(
        "INSERT INTO \"{}\".\"inbox\" (message_id, context_key) VALUES ($1, 'raw') ON CONFLICT DO NOTHING",
        env.schema
    );
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let topic = unique_name("bench.inbox");
        // Both queues get the same backlog.
        let (queue, ours_queue) = (
            unique_name("bench.inbox.raw"),
            unique_name("bench.inbox.ours"),
        );
        env.rabbit_queue(&topic, &queue).await;
        env.rabbit_queue(&topic, &ours_queue).await;
        backlog(env, &topic, n).await;

        // Raw: a lapin consumer, one inbox insert per message, then ack.
        let (channel, mut consumer) = env.raw_consumer(&queue).await;
        let start = Instant::now();
        for _ in 0..n {
            let delivery = consumer.next().await.unwrap().unwrap();
            let ping: Ping = serde_json::from_slice(&delivery.data).unwrap();
            sqlx::query(&insert)
                .bind(ping.id)
                .execute(&env.pool)
                .await
                .unwrap();
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        raw.push(n as f64 / start.elapsed().as_secs_f64());
        let _ = channel.close(200, "done".into()).await;

        // Ours: the pump with UseInbox on the Postgres inbox.
        let count = counter(Instant::now());
        let processor = CommandProcessor::builder()
            .inbox(inbox.clone())
            .command_with(Pipeline::new().step(UseInbox::new("ours")), count.clone())
            .build()
            .unwrap();
        ours.push(pump(&processor, env, &topic, &ours_queue, &count, n).await);
    }
    let (o, r) = (median(ours), median(raw));
    let note = format!("{n} messages over RabbitMQ, prefetch {PREFETCH}; median of {runs}");
    record(
        "consume with the Postgres inbox vs raw consume + insert",
        o,
        r,
        "msg/s",
        Goal::AtLeast(0.7),
        &note,
    );
}

/// Runs a one-performer pump on `queue` until `n` more are handled; msg/s.
async fn pump(
    processor: &CommandProcessor,
    env: &Env,
    topic: &str,
    queue: &str,
    count: &Count,
    n: usize,
) -> f64 {
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Ping>(queue, topic, env.rabbit_factory.clone())
                .buffer_size(usize::from(PREFETCH))
                .empty_channel_delay(Duration::ZERO),
        )
        .build()
        .unwrap();
    let before = count.handled.load(Ordering::Relaxed);
    let start = Instant::now();
    dispatcher.start().await.unwrap();
    while count.handled.load(Ordering::Relaxed) - before < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let rate =
        (count.handled.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64();
    dispatcher.shutdown().await;
    rate
}

/// Scenario 6: latency at `rate` msg/s for `n` messages.
async fn latency(env: &Env, n: usize, rate: u64) {
    // The drains before this wrote a lot of WAL: checkpoint now, so a checkpoint
    // triggered by them does not land in the middle of one side's run.
    sqlx::query("CHECKPOINT").execute(&env.pool).await.unwrap();
    let epoch = Instant::now();
    let interval = Duration::from_micros(1_000_000 / rate);

    // Raw: publish with confirm, consume with a lapin consumer.
    let topic = unique_name("bench.latency");
    let queue = unique_name("bench.latency.raw");
    env.rabbit_queue(&topic, &queue).await;
    let (_consumer_channel, mut consumer) = env.raw_consumer(&queue).await;
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(n);
        for _ in 0..n {
            let delivery = consumer.next().await.unwrap().unwrap();
            let ping: Ping = serde_json::from_slice(&delivery.data).unwrap();
            latencies.push((epoch.elapsed().as_micros() as f64 - ping.sent_us as f64) / 1000.0);
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        latencies
    });
    let publisher = Arc::new(env.rabbit.channel().await.unwrap());
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut ticker = tokio::time::interval(interval);
    let mut sends = Vec::with_capacity(n);
    for _ in 0..n {
        ticker.tick().await;
        let (publisher, exchange, topic) =
            (Arc::clone(&publisher), env.exchange.clone(), topic.clone());
        let sent_us = epoch.elapsed().as_micros() as u64;
        sends.push(tokio::spawn(async move {
            let confirm = publisher
                .basic_publish(
                    exchange.as_str().into(),
                    topic.as_str().into(),
                    BasicPublishOptions::default(),
                    &ping_body(sent_us.max(1)),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            assert!(confirm.await.unwrap().is_ack());
        }));
    }
    join_all(sends).await;
    let raw = receiver.await.unwrap();

    // Ours: post (Postgres outbox deposit + send) -> pump -> handler; then the
    // same with the in-memory outbox, to show what the Postgres commit costs.
    let ours = post_latencies(env, &topic, epoch, interval, n, true).await;
    let in_memory = post_latencies(env, &topic, epoch, interval, n, false).await;

    let note = format!(
        "{n} messages at {rate} msg/s over RabbitMQ; ours = post through the Postgres outbox"
    );
    record(
        "latency p50: post -> handled vs raw publish -> consume",
        quantile(ours.clone(), 0.5),
        quantile(raw.clone(), 0.5),
        "ms",
        Goal::None,
        &note,
    );
    record(
        "latency p99: post -> handled vs raw publish -> consume",
        quantile(ours, 0.99),
        quantile(raw.clone(), 0.99),
        "ms",
        Goal::AtMost(5.0),
        &note,
    );
    record(
        "latency p99: post (in-memory outbox) -> handled vs raw publish -> consume",
        quantile(in_memory, 0.99),
        quantile(raw, 0.99),
        "ms",
        Goal::None,
        "the same run without Postgres: what the pump and transport add",
    );
}

/// Latencies (ms) of `n` posts at one per `interval` to a pump on a new queue,
/// through the Postgres outbox or (`postgres` false) the in-memory one.
async fn post_latencies(
    env: &Env,
    topic: &str,
    epoch: Instant,
    interval: Duration,
    n: usize,
    postgres: bool,
) -> Vec<f64> {
    let queue = unique_name("bench.latency.ours");
    env.rabbit_queue(topic, &queue).await;
    let count = counter(epoch);
    let mut builder = CommandProcessor::builder()
        .command(count.clone())
        .publication::<Ping>(Publication::command(topic))
        .producer(RabbitProducer::new(env.rabbit.clone()));
    if postgres {
        builder = builder.outbox(env.outbox.clone());
    }
    let processor = builder.build().unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Ping>(&queue, topic, env.rabbit_factory.clone())
                .buffer_size(usize::from(PREFETCH))
                .empty_channel_delay(Duration::ZERO),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let mut ticker = tokio::time::interval(interval);
    let mut sends = Vec::with_capacity(n);
    for _ in 0..n {
        ticker.tick().await;
        let processor = processor.clone();
        let ping = Ping {
            id: Uuid::now_v7(),
            sent_us: (epoch.elapsed().as_micros() as u64).max(1),
        };
        sends.push(tokio::spawn(
            async move { processor.post(&ping).await.unwrap() },
        ));
    }
    join_all(sends).await;
    while count.handled.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    dispatcher.shutdown().await;
    count.latencies.lock().unwrap().clone()
}

async fn run(quick: bool) {
    let env = env().await;
    // Each scenario stays under a minute on two cores: the inbox consume runs
    // at a few hundred msg/s (one synchronous Postgres commit per message).
    let (rows, consume, runs, latency_n) = if quick {
        (5_000, 1_000, 1, 300)
    } else {
        (50_000, 3_000, 2, 3_000)
    };
    if std::env::var("E2E_SKIP_DRAIN").is_err() {
        sweeper_to_kafka(&env, rows, runs).await;
        sweeper_to_rabbit(&env, rows, runs).await;
    }
    inbox_consume(&env, consume, runs).await;
    latency(&env, latency_n, 200).await;
    sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", env.schema))
        .execute(&env.pool)
        .await
        .unwrap();
}

fn main() {
    benchkit::main("e2e", run);
}
