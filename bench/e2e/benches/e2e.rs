//! End-to-end benchmarks over Postgres and real brokers, each against a
//! baseline written with the raw clients and measured in the same run:
//!
//! 3. `PgSweeper` draining a backlog to Kafka and to RabbitMQ vs a raw relay
//!    (claim 500 rows with `FOR UPDATE SKIP LOCKED`, send them all with confirms
//!    in flight, mark them dispatched, commit; repeat); plus the drain rate
//!    against raw produce alone, to show where the time goes. Each drain
//!    starts after a checkpoint, the two sides take turns going first, and
//!    the sweeper's end is seen by a query that stops at the first
//!    outstanding row.
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use benchkit::{Goal, Run, median, medians, quantile, rate_and_cpu, record};
use brighter_core::conformance::unique_name;
use brighter_core::pipeline::{Pipeline, UseInbox};
use brighter_core::{
    Channel, ChannelFactory, ChannelSpec, Command, CommandProcessor, Delivery, Dispatcher, Error,
    Handler, Message, MessageHeader, MessageType, Outbox, Producer, Publication, Request,
    RequestContext, Subscription,
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

/// Which side of a drain round goes first: the relay (`false`) in even
/// rounds, the sweeper (`true`) in odd ones.
fn turns(round: usize) -> [bool; 2] {
    let sweeper_first = round % 2 == 1;
    [sweeper_first, !sweeper_first]
}

/// Fills the outbox with a backlog of `rows` and checkpoints, so that writing
/// out the fill's pages does not fall inside one drain and not the other.
async fn fill(env: &Env, topic: &str, rows: usize) {
    let outbox = &env.outbox;
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
    sqlx::query("CHECKPOINT").execute(&env.pool).await.unwrap();
}

/// A `PgSweeper` draining a backlog of `rows`: with its defaults, or
/// `tuned` (4 workers, batches of 500).
async fn drain_ours(
    env: &Env,
    processor: &CommandProcessor,
    topic: &str,
    rows: usize,
    tuned: bool,
) -> Run {
    let outbox = &env.outbox;
    fill(env, topic, rows).await;
    // The end is seen by a query that stops at the first outstanding row. A
    // count (`outstanding_count`) reads every outstanding row: 4-5 ms of the
    // database's CPU per poll at 50,000 rows, taken from the sweeper it
    // measures, where the relay pays nothing to see its own end.
    let any_left = format!(
        "SELECT EXISTS (SELECT 1 FROM \"{}\".\"outbox\" WHERE dispatched IS NULL)",
        env.schema
    );
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    let mut sweeper = PgSweeper::new(outbox.clone(), processor.clone());
    if tuned {
        sweeper = sweeper.batch_size(BATCH).workers(4);
    }
    if let Ok(shape) = std::env::var("E2E_SWEEP") {
        let (w, b) = shape.split_once(',').unwrap();
        sweeper = sweeper
            .workers(w.parse().unwrap())
            .batch_size(b.parse().unwrap());
    }
    let sweeper = sweeper.start().await.unwrap();
    while sqlx::query_scalar::<_, bool>(&any_left)
        .fetch_one(&env.pool)
        .await
        .unwrap()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let run = rate_and_cpu(rows, start, cpu);
    sweeper.stop().await;
    run
}

/// The raw relay: claim, send all with confirms in flight, mark, commit; repeat.
async fn drain_raw<F, Fut>(env: &Env, topic: &str, rows: usize, send_all: F) -> Run
where
    F: Fn(Vec<(Uuid, Vec<u8>)>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (pool, schema) = (&env.pool, &env.schema);
    fill(env, topic, rows).await;
    let claim = format!(
        "SELECT message_id, body FROM \"{schema}\".\"outbox\" WHERE dispatched IS NULL \
         ORDER BY position LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
    );
    let mark =
        format!("UPDATE \"{schema}\".\"outbox\" SET dispatched = now() WHERE message_id = ANY($1)");
    let cpu = benchkit::cpu_time();
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
    rate_and_cpu(rows, start, cpu)
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
    let send_all = |batch| kafka_send_all(&raw, &topic, batch);
    let drains = drain_rounds(env, &processor, &topic, rows, runs, send_all, async || {}).await;
    let note = format!("{rows}-row backlog, idempotent producer, acks=all; median of {runs}");
    drain_report("Kafka", drains, &note);
}

/// What a broker's drain rounds measured: the sweeper with its defaults,
/// tuned, the raw relay, and raw produce alone (msg/s).
type Drains = (Vec<Run>, Vec<Run>, Vec<Run>, Vec<f64>);

/// `rounds` drain rounds over one broker: the sweeper with its defaults and
/// the raw relay sending with `send_all` (taking turns going first), the
/// sweeper tuned, then `send_all` alone. `clean` empties what the broker
/// kept after each (RabbitMQ's queue).
async fn drain_rounds<F, Fut>(
    env: &Env,
    processor: &CommandProcessor,
    topic: &str,
    rows: usize,
    rounds: usize,
    send_all: F,
    clean: impl AsyncFn(),
) -> Drains
where
    F: Fn(Vec<(Uuid, Vec<u8>)>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (mut ours, mut tuned, mut relay, mut produce) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // The relay and the sweeper take turns going first.
        for side in turns(round) {
            env.truncate().await;
            if side {
                ours.push(drain_ours(env, processor, topic, rows, false).await);
            } else {
                relay.push(drain_raw(env, topic, rows, &send_all).await);
            }
            clean().await;
        }
        env.truncate().await;
        tuned.push(drain_ours(env, processor, topic, rows, true).await);
        clean().await;
        let batch: Vec<(Uuid, Vec<u8>)> =
            (0..rows).map(|_| (Uuid::now_v7(), ping_body(0))).collect();
        let start = Instant::now();
        send_all(batch).await;
        produce.push(rows as f64 / start.elapsed().as_secs_f64());
        clean().await;
    }
    env.truncate().await;
    (ours, tuned, relay, produce)
}

/// Records a broker's drain rows: the sweeper with its defaults against the
/// raw relay (the goal), tuned, and against raw produce alone.
fn drain_report(broker: &str, (ours, tuned, relay, produce): Drains, note: &str) {
    let (ours, tuned, relay, produce) = (
        medians(ours),
        medians(tuned),
        medians(relay),
        median(produce),
    );
    let name = format!("sweeper drain to {broker}, defaults, vs raw relay");
    record(&name, ours.0, relay.0, "msg/s", Goal::AtLeast(1.0), note);
    benchkit::record_cpu(&name, ours.1, relay.1, Goal::None, note);
    record(
        &format!("sweeper drain to {broker}, 4 workers, batches of 500, vs raw relay"),
        tuned.0,
        relay.0,
        "msg/s",
        Goal::None,
        note,
    );
    record(
        &format!("sweeper drain to {broker}, defaults, vs raw produce alone"),
        ours.0,
        produce,
        "msg/s",
        Goal::None,
        note,
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
    let send_all = |batch| rabbit_send_all(&raw, &env.exchange, &topic, batch);
    let clean = async || env.purge(&queue).await;
    let drains = drain_rounds(env, &processor, &topic, rows, runs, send_all, clean).await;
    let note = format!("{rows}-row backlog, persistent messages with confirms; median of {runs}");
    drain_report("RabbitMQ", drains, &note);
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

/// When one message reached each stage of its trip, µs since the run's epoch
/// (0: not yet).
#[derive(Debug, Default, Clone, Copy)]
struct Trip {
    posted: u64,
    send_start: u64,
    confirmed: u64,
    handling: u64,
    handled: u64,
    acked: u64,
}

/// The trips of a latency run, by message id, stamped by the decorators
/// below and by the handler.
#[derive(Clone)]
struct Trips {
    epoch: Instant,
    trips: Arc<std::sync::Mutex<HashMap<Uuid, Trip>>>,
}

impl Trips {
    fn new(epoch: Instant) -> Self {
        Trips {
            epoch,
            trips: Arc::default(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn stamp(&self, id: Uuid, stage: impl FnOnce(&mut Trip, u64)) {
        let now = self.now();
        stage(self.trips.lock().unwrap().entry(id).or_default(), now);
    }

    fn all(&self) -> Vec<Trip> {
        self.trips.lock().unwrap().values().copied().collect()
    }
}

/// A producer that stamps when each send starts and when it is confirmed.
struct TimedProducer<P> {
    inner: P,
    trips: Trips,
}

#[async_trait]
impl<P: Producer> Producer for TimedProducer<P> {
    fn system(&self) -> &'static str {
        self.inner.system()
    }

    async fn send(&self, message: &Message) -> Result<(), Error> {
        self.trips
            .stamp(message.id(), |t, now| t.send_start = t.send_start.max(now));
        let sent = self.inner.send(message).await;
        self.trips
            .stamp(message.id(), |t, now| t.confirmed = t.confirmed.max(now));
        sent
    }
}

/// Channels that stamp when each ack is done.
struct TimedChannels<F> {
    inner: F,
    trips: Trips,
}

#[async_trait]
impl<F: ChannelFactory> ChannelFactory for TimedChannels<F> {
    async fn create_channel(&self, spec: &ChannelSpec) -> Result<Box<dyn Channel>, Error> {
        Ok(Box::new(TimedChannel {
            inner: self.inner.create_channel(spec).await?,
            trips: self.trips.clone(),
        }))
    }
}

struct TimedChannel {
    inner: Box<dyn Channel>,
    trips: Trips,
}

#[async_trait]
impl Channel for TimedChannel {
    fn system(&self) -> &'static str {
        self.inner.system()
    }
    async fn receive(&mut self, timeout: Duration) -> Result<Option<Delivery>, Error> {
        self.inner.receive(timeout).await
    }
    async fn ack(&mut self, delivery: &Delivery) -> Result<(), Error> {
        let acked = self.inner.ack(delivery).await;
        self.trips
            .stamp(delivery.message.id(), |t, now| t.acked = now);
        acked
    }
    async fn requeue(&mut self, delivery: Delivery, delay: Duration) -> Result<(), Error> {
        self.inner.requeue(delivery, delay).await
    }
    async fn reject(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error> {
        self.inner.reject(delivery, reason).await
    }
    async fn invalid(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error> {
        self.inner.invalid(delivery, reason).await
    }
    async fn nack(&mut self, delivery: Delivery) -> Result<(), Error> {
        self.inner.nack(delivery).await
    }
    fn take_unreadable(&mut self) -> u64 {
        self.inner.take_unreadable()
    }
    async fn close(&mut self) -> Result<(), Error> {
        self.inner.close().await
    }
}

/// Stamps the handler's start and end of each ping.
#[derive(Clone)]
struct Stamp {
    trips: Trips,
    handled: Arc<AtomicUsize>,
}

impl Handler<Ping> for Stamp {
    async fn handle(&self, ping: &Ping, _: &mut RequestContext) -> Result<(), Error> {
        self.trips.stamp(ping.id, |t, now| t.handling = now);
        std::hint::black_box(ping);
        self.trips.stamp(ping.id, |t, now| t.handled = now);
        self.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A broker a latency run goes over: what the raw side and ours need.
enum Broker {
    Rabbit { queue_topic: String },
    Kafka { config: KafkaConfig },
}

impl Broker {
    /// A producer to this broker that stamps each send in `trips`.
    fn timed_producer(&self, env: &Env, trips: &Trips) -> TimedProducer<Arc<dyn Producer>> {
        let inner: Arc<dyn Producer> = match self {
            Broker::Rabbit { .. } => Arc::new(RabbitProducer::new(env.rabbit.clone())),
            Broker::Kafka { config } => Arc::new(KafkaProducer::new(config.clone()).unwrap()),
        };
        TimedProducer {
            inner,
            trips: trips.clone(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Broker::Rabbit { .. } => "RabbitMQ",
            Broker::Kafka { .. } => "Kafka",
        }
    }

    /// The topic of one run: RabbitMQ's routing key (each run has a queue of
    /// its own), a new Kafka topic (so no run reads another's records).
    async fn topic(&self) -> String {
        match self {
            Broker::Rabbit { queue_topic } => queue_topic.clone(),
            Broker::Kafka { config } => {
                let topic = unique_name("bench-latency");
                ensure_topics(config, &[topic.as_str()]).await.unwrap();
                topic
            }
        }
    }
}

/// Raw publish → consume latencies (ms, and publish → confirm) of `n`
/// messages at one per `interval`.
async fn raw_latencies(
    env: &Env,
    broker: &Broker,
    epoch: Instant,
    interval: Duration,
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let confirms = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let mut ticker = tokio::time::interval(interval);
    let mut sends = Vec::with_capacity(n);
    let receiver = match broker {
        Broker::Rabbit { queue_topic } => {
            let queue = unique_name("bench.latency.raw");
            env.rabbit_queue(queue_topic, &queue).await;
            let (_channel, mut consumer) = env.raw_consumer(&queue).await;
            let receiver = tokio::spawn(async move {
                let _channel = _channel;
                let mut latencies = Vec::with_capacity(n);
                for _ in 0..n {
                    let delivery = consumer.next().await.unwrap().unwrap();
                    let ping: Ping = serde_json::from_slice(&delivery.data).unwrap();
                    latencies
                        .push((epoch.elapsed().as_micros() as f64 - ping.sent_us as f64) / 1000.0);
                    delivery.ack(BasicAckOptions::default()).await.unwrap();
                }
                latencies
            });
            let publisher = Arc::new(env.rabbit.channel().await.unwrap());
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            for _ in 0..n {
                ticker.tick().await;
                let (publisher, exchange, topic, confirms) = (
                    Arc::clone(&publisher),
                    env.exchange.clone(),
                    queue_topic.clone(),
                    Arc::clone(&confirms),
                );
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
                    let took = epoch.elapsed().as_micros() as f64 - sent_us as f64;
                    confirms.lock().unwrap().push(took / 1000.0);
                }));
            }
            receiver
        }
        Broker::Kafka { config } => {
            let topic = &broker.topic().await;
            let consumer: rdkafka::consumer::StreamConsumer = config
                .client()
                .set("group.id", unique_name("raw"))
                .set("auto.offset.reset", "latest")
                .set("fetch.wait.max.ms", "100")
                .create()
                .unwrap();
            rdkafka::consumer::Consumer::subscribe(&consumer, &[topic.as_str()]).unwrap();
            // Joined once it is assigned the topic's partitions.
            while rdkafka::consumer::Consumer::assignment(&consumer)
                .map(|a| a.count())
                .unwrap_or(0)
                == 0
            {
                let _ = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
            }
            let raw: Arc<FutureProducer> = Arc::new(
                config
                    .client()
                    .set("acks", "all")
                    .set("enable.idempotence", "true")
                    .set("linger.ms", "5")
                    .create()
                    .unwrap(),
            );
            // Warm: the producer has its metadata and id, the consumer its
            // fetch position, before the clock runs.
            raw.send(
                FutureRecord::<(), [u8]>::to(topic).payload(&ping_body(0)),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
            consumer.recv().await.unwrap();
            let receiver = tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(n);
                while latencies.len() < n {
                    let m = consumer.recv().await.unwrap();
                    let ping: Ping =
                        serde_json::from_slice(rdkafka::Message::payload(&m).unwrap()).unwrap();
                    latencies
                        .push((epoch.elapsed().as_micros() as f64 - ping.sent_us as f64) / 1000.0);
                }
                latencies
            });
            for _ in 0..n {
                ticker.tick().await;
                let (raw, topic, confirms) =
                    (Arc::clone(&raw), topic.clone(), Arc::clone(&confirms));
                let sent_us = epoch.elapsed().as_micros() as u64;
                sends.push(tokio::spawn(async move {
                    let body = ping_body(sent_us.max(1));
                    raw.send(
                        FutureRecord::<(), [u8]>::to(&topic).payload(&body),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .unwrap();
                    let took = epoch.elapsed().as_micros() as f64 - sent_us as f64;
                    confirms.lock().unwrap().push(took / 1000.0);
                }));
            }
            receiver
        }
    };
    join_all(sends).await;
    let latencies = receiver.await.unwrap();
    let confirms = confirms.lock().unwrap().clone();
    (latencies, confirms)
}

/// The trips of `n` posts at one per `interval` to a one-performer pump,
/// through the Postgres outbox or (`postgres` false) the in-memory one.
async fn post_trips(
    env: &Env,
    broker: &Broker,
    epoch: Instant,
    interval: Duration,
    n: usize,
    postgres: bool,
) -> Vec<Trip> {
    let trips = Trips::new(epoch);
    let stamp = Stamp {
        trips: trips.clone(),
        handled: Arc::default(),
    };
    let topic = broker.topic().await;
    let channel_name = match broker {
        Broker::Rabbit { .. } => unique_name("bench.latency.ours"),
        Broker::Kafka { .. } => unique_name("bench-latency-ours"),
    };
    let mut builder = CommandProcessor::builder()
        .command(stamp.clone())
        .publication::<Ping>(Publication::command(&topic));
    builder = builder.producer(broker.timed_producer(env, &trips));
    if postgres {
        builder = builder.outbox(env.outbox.clone());
    }
    let processor = builder.build().unwrap();
    let subscription = match broker {
        Broker::Rabbit { .. } => {
            env.rabbit_queue(&topic, &channel_name).await;
            Subscription::command::<Ping>(
                &channel_name,
                &topic,
                TimedChannels {
                    inner: env.rabbit_factory.clone(),
                    trips: trips.clone(),
                },
            )
        }
        Broker::Kafka { config, .. } => Subscription::command::<Ping>(
            &channel_name,
            &topic,
            TimedChannels {
                inner: brighter_kafka::KafkaChannelFactory::new(
                    config.clone(),
                    KafkaProducer::new(config.clone()).unwrap(),
                ),
                trips: trips.clone(),
            },
        ),
    };
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            subscription
                .buffer_size(usize::from(PREFETCH))
                .empty_channel_delay(Duration::ZERO),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    // Kafka: the group has joined once the subscription is healthy; a first
    // ping makes sure its partitions are assigned before the clock runs.
    while !dispatcher.health().iter().all(|h| h.is_healthy()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warm = Ping {
        id: Uuid::now_v7(),
        sent_us: 0,
    };
    processor.post(&warm).await.unwrap();
    while stamp.handled.load(Ordering::Relaxed) < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut ticker = tokio::time::interval(interval);
    let mut sends = Vec::with_capacity(n);
    for _ in 0..n {
        ticker.tick().await;
        let (processor, trips) = (processor.clone(), trips.clone());
        let ping = Ping {
            id: Uuid::now_v7(),
            sent_us: trips.now().max(1),
        };
        trips.stamp(ping.id, |t, _| t.posted = ping.sent_us);
        sends.push(tokio::spawn(
            async move { processor.post(&ping).await.unwrap() },
        ));
    }
    join_all(sends).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stamp.handled.load(Ordering::Relaxed) < n + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The last acks.
    tokio::time::sleep(Duration::from_millis(50)).await;
    dispatcher.shutdown().await;
    trips.all().into_iter().filter(|t| t.posted > 0).collect()
}

/// One stage of a trip: its duration in ms, when both ends were stamped.
type Stage = fn(&Trip) -> Option<f64>;

fn ms(from: u64, to: u64) -> Option<f64> {
    (from > 0 && to >= from).then(|| (to - from) as f64 / 1000.0)
}

/// How many times Postgres has flushed its WAL to disk (`None` before
/// Postgres 14, which has no `pg_stat_wal`).
async fn wal_flushes(pool: &PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal")
        .fetch_one(pool)
        .await
        .ok()
}

/// Scenario 6: `post` → handled latency at `rate` msg/s for `n` messages over
/// `broker`, against raw publish → consume, with the p99 of each stage.
async fn latency(env: &Env, broker: &Broker, n: usize, rate: u64) {
    // The drains before this wrote a lot of WAL: checkpoint now, so a checkpoint
    // triggered by them does not land in the middle of one side's run.
    sqlx::query("CHECKPOINT").execute(&env.pool).await.unwrap();
    let epoch = Instant::now();
    let interval = Duration::from_micros(1_000_000 / rate);
    let (raw, raw_confirms) = raw_latencies(env, broker, epoch, interval, n).await;
    let flushes = wal_flushes(&env.pool).await;
    let ours = post_trips(env, broker, epoch, interval, n, true).await;
    let flushes = wal_flushes(&env.pool)
        .await
        .zip(flushes)
        .map(|(after, before)| (after - before) as f64 / ours.len().max(1) as f64);
    let in_memory = post_trips(env, broker, epoch, interval, n, false).await;
    let total = |trips: &[Trip]| -> Vec<f64> {
        trips
            .iter()
            .filter_map(|t| ms(t.posted, t.handled))
            .collect()
    };
    let name = broker.name();
    let note = format!(
        "{n} messages at {rate} msg/s over {name}; ours = post through the Postgres outbox"
    );
    let ours_total = total(&ours);
    record(
        &format!("latency p50 over {name}: post -> handled vs raw publish -> consume"),
        quantile(ours_total.clone(), 0.5),
        quantile(raw.clone(), 0.5),
        "ms",
        Goal::None,
        &note,
    );
    let p99 = quantile(ours_total, 0.99);
    record(
        &format!("latency p99 over {name}: post -> handled vs raw publish -> consume"),
        p99,
        quantile(raw.clone(), 0.99),
        "ms",
        Goal::AtMost(3.0),
        &note,
    );
    record(
        &format!(
            "latency p99 over {name}: post (in-memory outbox) -> handled vs raw publish -> consume"
        ),
        quantile(total(&in_memory), 0.99),
        quantile(raw, 0.99),
        "ms",
        Goal::None,
        "the same run without Postgres: what the pump and transport add",
    );
    if let Some(flushes) = flushes {
        record(
            &format!("latency over {name}: Postgres WAL flushes per post, vs one per message"),
            flushes,
            1.0,
            "flushes/msg",
            Goal::None,
            "pg_stat_wal.wal_sync over the posts through the Postgres outbox (the deposit's commit waits for one; the WAL writer adds its own)",
        );
    }
    // Where the p99 goes: each stage's p99 against the whole trip's.
    let stages: [(&str, Stage); 5] = [
        ("deposit commit", |t| ms(t.posted, t.send_start)),
        ("send confirm", |t| ms(t.send_start, t.confirmed)),
        ("delivery (publish -> handler)", |t| {
            ms(t.send_start, t.handling)
        }),
        ("handler", |t| ms(t.handling, t.handled)),
        ("ack", |t| ms(t.handled, t.acked)),
    ];
    for (stage, of) in stages {
        let values: Vec<f64> = ours.iter().filter_map(of).collect();
        record(
            &format!("latency p99 over {name}, stage {stage}, vs the whole post -> handled"),
            quantile(values, 0.99),
            p99,
            "ms",
            Goal::None,
            "the stage's own p99 (stages overlap: the confirm and the delivery run at once)",
        );
    }
    record(
        &format!("latency p99 over {name}: send confirm vs raw publish -> confirm"),
        quantile(
            ours.iter()
                .filter_map(|t| ms(t.send_start, t.confirmed))
                .collect(),
            0.99,
        ),
        quantile(raw_confirms, 0.99),
        "ms",
        Goal::None,
        &note,
    );
}

/// Deposit → broker when only the sweeper sends: `n` deposits at `rate`
/// msg/s, each in a transaction of its own, and the time from each commit to
/// the broker's confirm of the sweeper's send (a default `PgSweeper`), against
/// raw publish → confirm.
async fn sweeper_latency(env: &Env, broker: &Broker, n: usize, rate: u64) {
    let epoch = Instant::now();
    let interval = Duration::from_micros(1_000_000 / rate);
    let (_, raw_confirms) = raw_latencies(env, broker, epoch, interval, n).await;
    let trips = Trips::new(epoch);
    let topic = broker.topic().await;
    let mut builder = CommandProcessor::builder()
        .publication::<Ping>(Publication::command(&topic))
        .outbox(env.outbox.clone());
    builder = builder.producer(broker.timed_producer(env, &trips));
    let processor = builder.build().unwrap();
    let sweeper = PgSweeper::new(env.outbox.clone(), processor.clone())
        .start()
        .await
        .unwrap();
    // Warm: one deposit through to the broker (the producer's first send
    // fetches metadata), then the workers find nothing and wait, as a quiet
    // outbox's do.
    let warm = Ping {
        id: Uuid::now_v7(),
        sent_us: 1,
    };
    processor.deposit_post(&warm, None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while trips.all().iter().all(|t| t.confirmed == 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    trips.trips.lock().unwrap().clear();
    let mut ticker = tokio::time::interval(interval);
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ticker.tick().await;
        let ping = Ping {
            id: Uuid::now_v7(),
            sent_us: 1,
        };
        let mut tx = env.pool.begin().await.unwrap();
        processor.deposit_post(&ping, Some(&mut tx)).await.unwrap();
        tx.commit().await.unwrap();
        trips.stamp(ping.id, |t, now| t.posted = now);
        ids.push(ping.id);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && trips
            .trips
            .lock()
            .unwrap()
            .values()
            .filter(|t| t.confirmed > 0)
            .count()
            < n
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if std::env::var("E2E_DEBUG").is_ok() {
        let stats = sweeper.stats();
        println!(
            "sweeper: sent {} notified {} failed {}",
            stats.sent(),
            stats.notified(),
            stats.failed()
        );
    }
    sweeper.stop().await;
    let after: Vec<f64> = trips
        .all()
        .iter()
        .filter_map(|t| ms(t.posted, t.confirmed))
        .collect();
    let name = broker.name();
    if std::env::var("E2E_DEBUG").is_ok() {
        let mut sorted = after.clone();
        sorted.sort_by(f64::total_cmp);
        println!("{name} deposit -> confirm ms: {sorted:?}");
    }
    let note = format!(
        "{n} deposits at {rate} msg/s, each committed alone, sent by a default PgSweeper only; goal: p99 <= 50 ms after the commit"
    );
    record(
        &format!("deposit commit -> {name} confirm by the sweeper, p99, vs raw publish -> confirm"),
        quantile(after.clone(), 0.99),
        quantile(raw_confirms.clone(), 0.99),
        "ms",
        Goal::None,
        &note,
    );
    benchkit::record_absolute(
        &format!("deposit commit -> {name} confirm by the sweeper, p99"),
        quantile(after, 0.99),
        "ms",
        50.0,
        &note,
    );
}

async fn run(quick: bool) {
    let env = env().await;
    // Each scenario stays under a minute on two cores: the inbox consume runs
    // at a few hundred msg/s (one synchronous Postgres commit per message).
    let (rows, consume, runs, latency_n) = if quick {
        (5_000, 1_000, 1, 300)
    } else {
        (50_000, 3_000, 2, 2_000)
    };
    let only = std::env::var("E2E_ONLY").unwrap_or_default();
    let wanted = |what: &str| only.is_empty() || only.split(',').any(|o| o == what);
    if wanted("drain") && std::env::var("E2E_SKIP_DRAIN").is_err() {
        // An even number of rounds: each side goes first as often.
        let rounds = 2 * runs;
        sweeper_to_kafka(&env, rows, rounds).await;
        sweeper_to_rabbit(&env, rows, rounds).await;
    }
    if wanted("inbox") {
        inbox_consume(&env, consume, runs).await;
    }
    let brokers = [
        Broker::Rabbit {
            queue_topic: unique_name("bench.latency"),
        },
        Broker::Kafka {
            config: KafkaConfig::from_env().topics(3, 1),
        },
    ];
    for broker in &brokers {
        if wanted("latency") {
            latency(&env, broker, latency_n, 200).await;
        }
        if wanted("sweeper-latency") {
            sweeper_latency(&env, broker, latency_n / 4, 100).await;
        }
    }
    sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", env.schema))
        .execute(&env.pool)
        .await
        .unwrap();
}

fn main() {
    benchkit::main("e2e", run);
}
