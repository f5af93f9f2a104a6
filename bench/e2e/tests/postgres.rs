//! The Postgres outbox, sweeper, unit of work and inbox against a real Postgres
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`). Each
//! test works in its own random schema.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::pipeline::{Pipeline, UseInbox};
use brighter_core::{
    Command, CommandProcessor, Dispatcher, Error, ErrorKind, Event, Handler, InMemoryBroker,
    Message, MessageHeader, MessageType, Outbox, Producer, Publication, Request, RequestContext,
    Subscription,
};
use brighter_inbox_postgres::PgInbox;
use brighter_outbox_postgres::{
    PgHandler, PgOutbox, PgSweeper, PgTx, PgUnit, PgUnitOfWork, Retention, pg_handler_fn,
    pg_transaction,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;
use uuid::Uuid;

struct Db {
    pool: PgPool,
    schema: String,
}

async fn db() -> Db {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .expect("Postgres must be running: scripts/test starts it");
    Db {
        pool,
        schema: format!("t_{}", Uuid::now_v7().simple()),
    }
}

impl Db {
    async fn outbox(&self) -> PgOutbox {
        PgOutbox::builder(self.pool.clone())
            .schema(&self.schema)
            .build()
            .await
            .unwrap()
    }

    async fn inbox(&self) -> PgInbox {
        PgInbox::builder(self.pool.clone())
            .schema(&self.schema)
            .build()
            .await
            .unwrap()
    }

    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(&sql.replace("{s}", &self.schema))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(&sql.replace("{s}", &self.schema))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn drop(self) {
        self.exec("DROP SCHEMA IF EXISTS {s} CASCADE").await;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPlaced {
    id: Uuid,
    order: String,
    seq: u32,
}
impl Request for OrderPlaced {
    fn id(&self) -> Uuid {
        self.id
    }
    fn partition_key(&self) -> Option<String> {
        Some(self.order.clone())
    }
}
impl Event for OrderPlaced {}

fn placed(order: &str, seq: u32) -> OrderPlaced {
    OrderPlaced {
        id: Uuid::now_v7(),
        order: order.into(),
        seq,
    }
}

/// Records sends; optionally fails, delays or checks per-key order.
#[derive(Clone, Default)]
struct Recorder {
    sent: Arc<Mutex<Vec<Message>>>,
    failing_topic: Arc<Mutex<Option<String>>>,
    random_delay: bool,
    /// key -> last seq confirmed; a send that does not follow it is a violation.
    confirmed: Arc<Mutex<HashMap<String, u32>>>,
    violations: Arc<AtomicUsize>,
}

#[async_trait]
impl Producer for Recorder {
    async fn send(&self, message: &Message) -> Result<(), Error> {
        if self.failing_topic.lock().unwrap().as_deref() == Some(message.header.topic.as_str()) {
            return Err(Error::transport("send", "broker down"));
        }
        let event: Option<OrderPlaced> = serde_json::from_slice(&message.body).ok();
        if let (Some(event), true) = (&event, self.random_delay) {
            let last = self.confirmed.lock().unwrap().get(&event.order).copied();
            let expected = last.map_or(0, |s| s + 1);
            if event.seq != expected {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
            // Confirms come back out of order across keys.
            let jitter = (message.id().as_u128() % 5) as u64;
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
        self.sent.lock().unwrap().push(message.clone());
        if let (Some(event), true) = (event, self.random_delay) {
            self.confirmed
                .lock()
                .unwrap()
                .insert(event.order, event.seq);
        }
        Ok(())
    }
}

impl Recorder {
    fn count(&self) -> usize {
        self.sent.lock().unwrap().len()
    }
}

fn processor(outbox: &PgOutbox, producer: impl Producer) -> CommandProcessor {
    CommandProcessor::builder()
        .publication::<OrderPlaced>(Publication::event("orders.placed"))
        .producer(producer)
        .outbox(outbox.clone())
        .build()
        .unwrap()
}

async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn business_row_and_message_commit_together_and_roll_back_together() {
    let db = db().await;
    let outbox = db.outbox().await;
    db.exec("CREATE TABLE {s}.orders (id uuid PRIMARY KEY)")
        .await;
    let p = processor(&outbox, Recorder::default());

    let committed = placed("o-1", 0);
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO {}.orders (id) VALUES ($1)",
        db.schema
    ))
    .bind(committed.id)
    .execute(&mut *tx)
    .await
    .unwrap();
    p.deposit_post(&committed, Some(&mut tx)).await.unwrap();
    tx.commit().await.unwrap();

    let rolled_back = placed("o-2", 0);
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO {}.orders (id) VALUES ($1)",
        db.schema
    ))
    .bind(rolled_back.id)
    .execute(&mut *tx)
    .await
    .unwrap();
    p.deposit_post(&rolled_back, Some(&mut tx)).await.unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(db.count("SELECT count(*) FROM {s}.orders").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM {s}.outbox").await, 1);
    let ids: Vec<Uuid> = outbox
        .outstanding(Duration::ZERO, 10)
        .await
        .unwrap()
        .iter()
        .map(Message::id)
        .collect();
    assert_eq!(ids, vec![committed.id]);
    db.drop().await;
}

#[tokio::test]
async fn every_header_field_survives_the_outbox_row() {
    let db = db().await;
    let outbox = db.outbox().await;
    let mut header = MessageHeader::new("t", MessageType::Document);
    header.reply_to = Some("replies".into());
    header.partition_key = Some("k".into());
    header.handled_count = 2;
    // (A delay would schedule it: `get` returns no scheduled message.)
    header.bag.insert("tenant".into(), "acme".into());
    header.cloud_events.source = Some("urn:s".into());
    header.cloud_events.kind = Some("t.v1".into());
    header.trace.traceparent =
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    header.trace.baggage = Some("a=b".into());
    let message = Message::new(header, vec![0u8, 159, 146, 150]);
    outbox
        .add(std::slice::from_ref(&message), None)
        .await
        .unwrap();
    let mut read = outbox.get(&[message.id()]).await.unwrap().remove(0);
    // Postgres keeps microseconds.
    assert_eq!(
        read.header.timestamp.timestamp_micros(),
        message.header.timestamp.timestamp_micros()
    );
    read.header.timestamp = message.header.timestamp;
    assert_eq!(read, message);
    db.drop().await;
}

#[tokio::test]
async fn clear_outbox_sends_and_marks_dispatched_and_duplicates_are_refused() {
    let db = db().await;
    let outbox = db.outbox().await;
    let producer = Recorder::default();
    let p = processor(&outbox, producer.clone());
    let event = placed("o", 0);
    let id = p.post(&event).await.unwrap();
    assert_eq!(producer.count(), 1);
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.outbox WHERE dispatched IS NOT NULL")
            .await,
        1
    );
    let err = p.deposit_post(&event, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Duplicate, "{err}");
    assert_eq!(id, event.id);
    db.drop().await;
}

#[tokio::test]
async fn two_sweepers_racing_over_10000_rows_send_each_row_once_and_both_progress() {
    let db = db().await;
    let outbox = db.outbox().await;
    let rows = 10_000u32;
    for chunk in (0..rows).collect::<Vec<_>>().chunks(1000) {
        let messages: Vec<Message> = chunk
            .iter()
            .map(|i| {
                let mut m = Message::new(
                    MessageHeader::new("bulk", MessageType::Event),
                    i.to_string(),
                );
                m.header.partition_key = (i % 3 == 0).then(|| format!("key-{}", i % 50));
                m
            })
            .collect();
        outbox.add(&messages, None).await.unwrap();
    }
    let (a, b) = (Recorder::default(), Recorder::default());
    let sweep = |producer: &Recorder| {
        PgSweeper::new(outbox.clone(), processor(&outbox, producer.clone()))
            .min_age(Duration::ZERO)
            .poll_interval(Duration::from_millis(50))
            .batch_size(200)
    };
    let (first, second) = (
        sweep(&a).start().await.unwrap(),
        sweep(&b).start().await.unwrap(),
    );
    until("the outbox drained", Duration::from_secs(120), async || {
        outbox.outstanding_count().await.unwrap() == 0
    })
    .await;
    first.stop().await;
    second.stop().await;

    let mut sends: HashMap<Uuid, usize> = HashMap::new();
    for m in a
        .sent
        .lock()
        .unwrap()
        .iter()
        .chain(b.sent.lock().unwrap().iter())
    {
        *sends.entry(m.id()).or_default() += 1;
    }
    assert_eq!(sends.len(), rows as usize, "every row sent");
    assert!(sends.values().all(|&n| n == 1), "no row sent twice");
    println!("sweeper a sent {}, sweeper b sent {}", a.count(), b.count());
    assert!(
        a.count() > 0 && b.count() > 0,
        "both made progress: {} / {}",
        a.count(),
        b.count()
    );
    db.drop().await;
}

#[tokio::test]
async fn order_per_partition_key_holds_with_several_sweepers_and_out_of_order_confirms() {
    let db = db().await;
    let outbox = db.outbox().await;
    let producer = Recorder {
        random_delay: true,
        ..Recorder::default()
    };
    let p = processor(&outbox, producer.clone());
    let keys = 10;
    let per_key = 40;
    let events: Vec<OrderPlaced> = (0..per_key)
        .flat_map(|seq| (0..keys).map(move |k| placed(&format!("order-{k}"), seq)))
        .collect();
    p.deposit_post_batch(&events, None).await.unwrap();
    let mut sweepers = Vec::new();
    for _ in 0..3 {
        sweepers.push(
            PgSweeper::new(outbox.clone(), p.clone())
                .min_age(Duration::ZERO)
                .workers(2)
                .batch_size(25)
                .poll_interval(Duration::from_millis(20))
                .start()
                .await
                .unwrap(),
        );
    }
    until("all sent", Duration::from_secs(120), async || {
        outbox.outstanding_count().await.unwrap() == 0
    })
    .await;
    for s in sweepers {
        s.stop().await;
    }
    assert_eq!(producer.count(), (keys * per_key) as usize);
    assert_eq!(
        producer.violations.load(Ordering::SeqCst),
        0,
        "a later message of a key went before an earlier one was confirmed"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_sweep_never_sends_past_a_row_of_its_key_held_elsewhere() {
    // Regression: a claim that skips locked rows gets rows 0 and 3 of a key while
    // another sweeper holds 1 and 2; sending 3 then would overtake them.
    let db = db().await;
    let outbox = db.outbox().await;
    let producer = Recorder::default();
    let p = processor(&outbox, producer.clone());
    let events: Vec<OrderPlaced> = (0..4).map(|seq| placed("k", seq)).collect();
    p.deposit_post_batch(&events, None).await.unwrap();
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT position FROM {0}.outbox WHERE position IN \
         (SELECT position FROM {0}.outbox ORDER BY position OFFSET 1 LIMIT 2) FOR UPDATE",
        db.schema
    ))
    .fetch_all(&mut *other)
    .await
    .unwrap();
    let report = PgSweeper::new(outbox.clone(), p.clone())
        .min_age(Duration::ZERO)
        .sweep_once()
        .await
        .unwrap();
    assert_eq!(
        (report.claimed, report.sent, report.held_back),
        (2, 1, 1),
        "{report:?}"
    );
    let sent: Vec<u32> = producer
        .sent
        .lock()
        .unwrap()
        .iter()
        .map(|m| serde_json::from_slice::<OrderPlaced>(&m.body).unwrap().seq)
        .collect();
    assert_eq!(sent, vec![0]);
    other.rollback().await.unwrap();
    db.drop().await;
}

#[tokio::test]
async fn a_sleeping_sweeper_wakes_on_notify_well_before_its_polling_interval() {
    let db = db().await;
    let outbox = db.outbox().await;
    let producer = Recorder::default();
    let p = processor(&outbox, producer.clone());
    let sweeper = PgSweeper::new(outbox.clone(), p.clone())
        .min_age(Duration::ZERO)
        .poll_interval(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // first (empty) sweep done; asleep
    let mut tx = db.pool.begin().await.unwrap();
    p.deposit_post(&placed("o", 0), Some(&mut tx))
        .await
        .unwrap();
    let committed = Instant::now();
    tx.commit().await.unwrap();
    until("sent by the sweeper", Duration::from_secs(10), async || {
        producer.count() == 1
    })
    .await;
    let latency = committed.elapsed();
    println!("commit -> sent by the sleeping sweeper: {latency:?} (poll interval 60 s)");
    assert!(latency < Duration::from_secs(5), "took {latency:?}");
    assert!(sweeper.stats().notified() >= 1);
    sweeper.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn young_rows_are_left_to_the_writer() {
    let db = db().await;
    let outbox = db.outbox().await;
    let producer = Recorder::default();
    let p = processor(&outbox, producer.clone());
    p.deposit_post(&placed("o", 0), None).await.unwrap();
    let sweeper = PgSweeper::new(outbox.clone(), p).min_age(Duration::from_secs(3600));
    assert_eq!(sweeper.sweep_once().await.unwrap().claimed, 0);
    assert_eq!(producer.count(), 0);
    db.drop().await;
}

#[tokio::test]
async fn a_failing_topic_backs_off_without_stalling_other_topics() {
    let db = db().await;
    let outbox = db.outbox().await;
    let producer = Recorder::default();
    *producer.failing_topic.lock().unwrap() = Some("down".into());
    let p = processor(&outbox, producer.clone());
    let messages: Vec<Message> = (0..10)
        .map(|i| {
            let topic = if i % 2 == 0 { "down" } else { "up" };
            Message::new(MessageHeader::new(topic, MessageType::Event), i.to_string())
        })
        .collect();
    outbox.add(&messages, None).await.unwrap();
    let sweeper = PgSweeper::new(outbox.clone(), p)
        .min_age(Duration::ZERO)
        .batch_size(4)
        .topic_backoff(Duration::from_secs(60), Duration::from_secs(60));
    let mut reports = Vec::new();
    for _ in 0..4 {
        reports.push(sweeper.sweep_once().await.unwrap());
    }
    assert_eq!(
        producer.count(),
        5,
        "every 'up' message went out: {reports:?}"
    );
    assert!(
        producer
            .sent
            .lock()
            .unwrap()
            .iter()
            .all(|m| m.header.topic == "up")
    );
    // 'down' was tried once, then skipped while backing off.
    assert_eq!(
        reports.iter().map(|r| r.failed).sum::<usize>(),
        2,
        "{reports:?}"
    );
    let attempts = db
        .count("SELECT sum(attempts) FROM {s}.outbox WHERE topic = 'down'")
        .await;
    assert_eq!(attempts, 2);
    assert_eq!(outbox.outstanding_count().await.unwrap(), 5);
    db.drop().await;
}

/// Found by the chaos suite (restarting RabbitMQ): every failed message of a
/// batch doubled its topic's backoff, so one failed batch of 40 backed the topic
/// off for the maximum. A failed sweep now backs a topic off once.
#[tokio::test]
async fn a_failed_batch_backs_its_topic_off_once_not_once_per_message() {
    let db = db().await;
    let outbox = db.outbox().await;
    let producer = Recorder::default();
    *producer.failing_topic.lock().unwrap() = Some("down".into());
    let p = processor(&outbox, producer.clone());
    let messages: Vec<Message> = (0..20)
        .map(|i| {
            Message::new(
                MessageHeader::new("down", MessageType::Event),
                i.to_string(),
            )
        })
        .collect();
    outbox.add(&messages, None).await.unwrap();
    let sweeper = PgSweeper::new(outbox.clone(), p)
        .min_age(Duration::ZERO)
        .batch_size(20)
        .topic_backoff(Duration::from_millis(300), Duration::from_secs(60));
    assert_eq!(sweeper.sweep_once().await.unwrap().failed, 20);
    assert_eq!(
        sweeper.sweep_once().await.unwrap().claimed,
        0,
        "backing off"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        sweeper.sweep_once().await.unwrap().failed,
        20,
        "tried again after the first delay, not after 300 ms x 2^19"
    );
    db.drop().await;
}

#[tokio::test]
async fn dispatched_rows_are_deleted_or_archived_after_the_retention() {
    let db = db().await;
    let outbox = db.outbox().await;
    let p = processor(&outbox, Recorder::default());
    for i in 0..4 {
        p.post(&placed("o", i)).await.unwrap();
    }
    p.deposit_post(&placed("o", 9), None).await.unwrap();
    assert_eq!(
        outbox
            .delete_dispatched(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    db.exec("UPDATE {s}.outbox SET dispatched = now() - interval '2 hours' WHERE position <= 2")
        .await;
    assert_eq!(
        outbox
            .archive_dispatched(Duration::from_secs(3600))
            .await
            .unwrap(),
        2
    );
    assert_eq!(db.count("SELECT count(*) FROM {s}.outbox_archive").await, 2);
    // A sweeper that sends nothing younger than an hour: the deposited row
    // stays outstanding while the retention runs.
    let sweeper = PgSweeper::new(outbox.clone(), p)
        .min_age(Duration::from_secs(3600))
        .retention(Retention::Delete(Duration::ZERO), Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    until("deleted", Duration::from_secs(10), async || {
        db.count("SELECT count(*) FROM {s}.outbox").await == 1
    })
    .await;
    sweeper.stop().await;
    assert_eq!(
        outbox.outstanding_count().await.unwrap(),
        1,
        "outstanding rows are never cleaned up"
    );
    db.drop().await;
}

#[tokio::test]
async fn the_outbox_bound_gives_backpressure_to_writers() {
    let db = db().await;
    let outbox = db.outbox().await;
    let p = CommandProcessor::builder()
        .publication::<OrderPlaced>(Publication::event("orders.placed"))
        .producer(Recorder::default())
        .outbox(outbox.clone())
        .outbox_limit(3)
        .build()
        .unwrap();
    for i in 0..3 {
        p.deposit_post(&placed("o", i), None).await.unwrap();
    }
    let err = p.deposit_post(&placed("o", 3), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backpressure, "{err}");
    assert!(err.to_string().contains("limit 3"), "{err}");
    db.drop().await;
}

#[tokio::test]
async fn hostile_schema_and_table_names_are_refused() {
    let db = db().await;
    for bad in [
        "x; DROP TABLE users",
        "Outbox",
        "outbox\"",
        "1outbox",
        "",
        "a b",
        "ümlaut",
        &"a".repeat(64),
    ] {
        let err = PgOutbox::builder(db.pool.clone())
            .schema(bad)
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Configuration, "{bad:?}");
        let err = PgOutbox::builder(db.pool.clone())
            .table(bad)
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Configuration, "{bad:?}");
        let err = PgInbox::builder(db.pool.clone())
            .schema(bad)
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Configuration, "{bad:?}");
        let err = PgInbox::builder(db.pool.clone())
            .table(bad)
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Configuration, "{bad:?}");
    }
    db.drop().await;
}

#[tokio::test]
async fn migrations_are_idempotent_and_the_outbox_and_inbox_share_a_database() {
    let db = db().await;
    // Concurrently and repeatedly, both crates, one schema.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (pool, schema) = (db.pool.clone(), db.schema.clone());
        tasks.push(tokio::spawn(async move {
            PgOutbox::builder(pool.clone())
                .schema(&schema)
                .build()
                .await
                .unwrap();
            PgInbox::builder(pool)
                .schema(&schema)
                .build()
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    db.outbox().await;
    db.inbox().await;
    assert_eq!(
        db.count("SELECT count(*) FROM information_schema.tables WHERE table_schema = '{s}'")
            .await,
        3,
        "outbox, outbox_archive, inbox"
    );
    db.drop().await;
}

// ---------------------------------------------------------------- consumer side

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReserveStock {
    id: Uuid,
    sku: String,
}
impl Request for ReserveStock {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for ReserveStock {}

/// Writes one effect row per call in the unit of work; fails the first
/// `fail_first` calls after writing.
#[derive(Clone)]
struct Reserve {
    schema: String,
    calls: Arc<AtomicUsize>,
    fail_first: usize,
}

impl Handler<ReserveStock> for Reserve {
    async fn handle(&self, cmd: &ReserveStock, ctx: &mut RequestContext) -> Result<(), Error> {
        sqlx::query(&format!(
            "INSERT INTO {}.effects (message_id, sku) VALUES ($1, $2)",
            self.schema
        ))
        .bind(cmd.id)
        .bind(&cmd.sku)
        .execute(pg_transaction(ctx)?)
        .await
        .map_err(Error::handler)?;
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
            return Err(Error::handler("warehouse service timed out"));
        }
        Ok(())
    }
}

fn consumer(
    db: &Db,
    inbox: &PgInbox,
    handler: Reserve,
    producer: impl Producer,
) -> CommandProcessor {
    CommandProcessor::builder()
        .inbox(inbox.clone())
        .command_with(
            Pipeline::new()
                .step(PgUnitOfWork::new(db.pool.clone()))
                .step(UseInbox::new("reserve-stock")),
            handler,
        )
        .publication::<ReserveStock>(Publication::command("stock"))
        .producer(producer)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_handler_error_rolls_back_its_effects_and_its_inbox_row() {
    let db = db().await;
    let inbox = db.inbox().await;
    db.exec("CREATE TABLE {s}.effects (message_id uuid, sku text)")
        .await;
    let handler = Reserve {
        schema: db.schema.clone(),
        calls: Arc::default(),
        fail_first: 1,
    };
    let p = consumer(&db, &inbox, handler.clone(), Recorder::default());
    let cmd = ReserveStock {
        id: Uuid::now_v7(),
        sku: "sku-1".into(),
    };
    let err = p.send(&cmd).await.unwrap_err();
    assert!(err.to_string().contains("timed out"));
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.effects").await,
        0,
        "effects rolled back"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.inbox").await,
        0,
        "inbox row rolled back"
    );

    p.send(&cmd).await.unwrap(); // the redelivery runs again
    p.send(&cmd).await.unwrap(); // a duplicate after success is skipped
    assert_eq!(handler.calls.load(Ordering::SeqCst), 2);
    assert_eq!(db.count("SELECT count(*) FROM {s}.effects").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM {s}.inbox").await, 1);
    db.drop().await;
}

/// Forwards the first send to the broker, then never confirms it: the sweeper's
/// process "dies" between send and mark.
#[derive(Clone)]
struct DiesAfterFirstSend {
    broker: InMemoryBroker,
    died: Arc<AtomicBool>,
}

#[async_trait]
impl Producer for DiesAfterFirstSend {
    async fn send(&self, message: &Message) -> Result<(), Error> {
        self.broker.send(message).await?;
        if !self.died.swap(true, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_crash_between_send_and_mark_resends_and_the_inbox_drops_the_duplicate() {
    let db = db().await;
    let outbox = db.outbox().await;
    let inbox = db.inbox().await;
    db.exec("CREATE TABLE {s}.effects (message_id uuid, sku text)")
        .await;
    let broker = InMemoryBroker::new();
    broker.declare("stock", "stock").unwrap();

    // Producer side: the message is in the outbox; the first sweep sends it and
    // "crashes" before marking it (its transaction is dropped, i.e. rolled back).
    let dying = DiesAfterFirstSend {
        broker: broker.clone(),
        died: Arc::default(),
    };
    let writer = CommandProcessor::builder()
        .publication::<ReserveStock>(Publication::command("stock"))
        .producer(dying)
        .outbox(outbox.clone())
        .build()
        .unwrap();
    let cmd = ReserveStock {
        id: Uuid::now_v7(),
        sku: "sku-1".into(),
    };
    writer.deposit_post(&cmd, None).await.unwrap();
    let crashing = PgSweeper::new(outbox.clone(), writer.clone()).min_age(Duration::ZERO);
    let crashed = tokio::time::timeout(Duration::from_secs(2), crashing.sweep_once()).await;
    assert!(
        crashed.is_err(),
        "the sweep hung after sending, as a dying process would"
    );
    drop(crashing);
    assert_eq!(broker.waiting("stock"), 1, "the message reached the broker");
    until(
        "the claim was released",
        Duration::from_secs(10),
        async || outbox.outstanding_count().await.unwrap() == 1,
    )
    .await;

    // A restarted sweeper sends it again.
    let restarted = PgSweeper::new(outbox.clone(), writer).min_age(Duration::ZERO);
    until("re-sent", Duration::from_secs(10), async || {
        restarted.sweep_once().await.unwrap().sent == 1
    })
    .await;
    assert_eq!(broker.waiting("stock"), 2, "delivered twice: at least once");
    assert_eq!(outbox.outstanding_count().await.unwrap(), 0);

    // Consumer side: the inbox lets the work happen once.
    let handler = Reserve {
        schema: db.schema.clone(),
        calls: Arc::default(),
        fail_first: 0,
    };
    let reader = consumer(&db, &inbox, handler.clone(), broker.clone());
    let dispatcher = Dispatcher::builder(reader)
        .subscription(Subscription::command::<ReserveStock>(
            "stock",
            "stock",
            broker.clone(),
        ))
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    until(
        "both deliveries settled",
        Duration::from_secs(10),
        async || dispatcher.subscription_health("stock").unwrap().handled == 2,
    )
    .await;
    dispatcher.shutdown().await;
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        1,
        "the duplicate never reached the handler"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.effects").await,
        1,
        "one effect"
    );
    assert_eq!(db.count("SELECT count(*) FROM {s}.inbox").await, 1);
    assert!(broker.dead_letters("stock").is_empty());
    db.drop().await;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StockReserved {
    id: Uuid,
    sku: String,
}
impl Request for StockReserved {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Event for StockReserved {}

/// Writes business data and posts an event, all in the unit of work.
struct ReserveAndAnnounce {
    schema: String,
    fail: bool,
}

impl Handler<ReserveStock> for ReserveAndAnnounce {
    async fn handle(&self, cmd: &ReserveStock, ctx: &mut RequestContext) -> Result<(), Error> {
        sqlx::query(&format!(
            "INSERT INTO {}.effects (message_id, sku) VALUES ($1, $2)",
            self.schema
        ))
        .bind(cmd.id)
        .bind(&cmd.sku)
        .execute(pg_transaction(ctx)?)
        .await
        .map_err(Error::handler)?;
        let event = StockReserved {
            id: Uuid::now_v7(),
            sku: cmd.sku.clone(),
        };
        ctx.deposit_post(&event).await?;
        if self.fail {
            return Err(Error::handler("failed after writing"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_handler_writes_its_data_inbox_row_and_messages_in_one_transaction() {
    let db = db().await;
    let outbox = db.outbox().await;
    let inbox = db.inbox().await;
    db.exec("CREATE TABLE {s}.effects (message_id uuid, sku text)")
        .await;
    let producer = Recorder::default();
    let build = |fail: bool| {
        CommandProcessor::builder()
            .inbox(inbox.clone())
            .command_with(
                Pipeline::new()
                    .step(PgUnitOfWork::new(db.pool.clone()))
                    .step(UseInbox::new("reserve")),
                ReserveAndAnnounce {
                    schema: db.schema.clone(),
                    fail,
                },
            )
            .publication::<StockReserved>(Publication::event("stock.reserved"))
            .producer(producer.clone())
            .outbox(outbox.clone())
            .build()
            .unwrap()
    };
    let cmd = ReserveStock {
        id: Uuid::now_v7(),
        sku: "sku-7".into(),
    };
    build(true).send(&cmd).await.unwrap_err();
    assert_eq!(db.count("SELECT count(*) FROM {s}.effects").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM {s}.inbox").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM {s}.outbox").await, 0);
    assert_eq!(producer.count(), 0);

    build(false).send(&cmd).await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM {s}.effects").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM {s}.inbox").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.outbox WHERE dispatched IS NOT NULL")
            .await,
        1,
        "sent and marked right after commit"
    );
    let sent = producer.sent.lock().unwrap()[0].clone();
    assert_eq!(sent.header.topic, "stock.reserved");
    assert_eq!(
        sent.header.correlation_id, cmd.id,
        "the event continues the command's conversation"
    );
    db.drop().await;
}

/// Loses its database connection on the first call (the backend is terminated,
/// as in a Postgres restart), then writes its effect.
#[derive(Clone)]
struct LosesTheDatabaseOnce {
    schema: String,
    calls: Arc<AtomicUsize>,
}

impl Handler<ReserveStock> for LosesTheDatabaseOnce {
    async fn handle(&self, cmd: &ReserveStock, ctx: &mut RequestContext) -> Result<(), Error> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
                .execute(pg_transaction(ctx)?)
                .await
                // As handlers commonly do: any failure is a handler error.
                .map_err(Error::handler)?;
        }
        sqlx::query(&format!(
            "INSERT INTO {}.effects (message_id, sku) VALUES ($1, $2)",
            self.schema
        ))
        .bind(cmd.id)
        .bind(&cmd.sku)
        .execute(pg_transaction(ctx)?)
        .await
        .map_err(Error::handler)?;
        Ok(())
    }
}

/// Found by the chaos suite (restarting Postgres mid-stream): when the database
/// went away inside a unit of work, the pump dead-lettered the message. Now the
/// failed rollback tells the unit of work that the database is away, it fails
/// with `Unavailable`, and the pump leaves the message for redelivery.
#[tokio::test]
async fn a_unit_of_work_that_loses_its_database_leaves_the_message_for_redelivery() {
    let db = db().await;
    let inbox = db.inbox().await;
    db.exec("CREATE TABLE {s}.effects (message_id uuid, sku text)")
        .await;
    let broker = InMemoryBroker::new();
    broker.declare("stock", "stock-q").unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let processor = CommandProcessor::builder()
        .inbox(inbox)
        .command_with(
            Pipeline::new()
                .step(PgUnitOfWork::new(db.pool.clone()))
                .step(UseInbox::new("reserve")),
            LosesTheDatabaseOnce {
                schema: db.schema.clone(),
                calls: Arc::clone(&calls),
            },
        )
        .publication::<ReserveStock>(Publication::command("stock"))
        .producer(broker.clone())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<ReserveStock>("stock", "stock", broker.clone())
                .channel("stock-q")
                .dont_ack_delay(Duration::from_millis(50)),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let cmd = ReserveStock {
        id: Uuid::now_v7(),
        sku: "sku-1".into(),
    };
    processor.post(&cmd).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.count("SELECT count(*) FROM {s}.effects").await == 0 {
        assert!(Instant::now() < deadline, "never handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.shutdown().await;
    assert!(broker.dead_letters("stock-q").is_empty());
    let health = dispatcher.subscription_health("stock").unwrap();
    assert_eq!(
        (health.not_acked, health.handled, health.dead_lettered),
        (1, 1, 0)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(db.count("SELECT count(*) FROM {s}.effects").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM {s}.inbox").await, 1);
    db.drop().await;
}

#[test]
fn connection_failures_are_unavailable_and_statement_failures_are_store_errors() {
    use brighter_outbox_postgres::pg_error;
    assert_eq!(
        pg_error("claim", sqlx::Error::PoolTimedOut).kind(),
        ErrorKind::Unavailable
    );
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    assert_eq!(
        pg_error("claim", sqlx::Error::Io(io)).kind(),
        ErrorKind::Unavailable
    );
    assert_eq!(
        pg_error("claim", sqlx::Error::RowNotFound).kind(),
        ErrorKind::Store
    );
}

/// The same handler for the typed unit of work: the transaction comes as a
/// typed value, no downcast on the way.
struct TypedReserveAndAnnounce {
    schema: String,
    fail: bool,
}

impl PgHandler<ReserveStock> for TypedReserveAndAnnounce {
    async fn handle(
        &self,
        cmd: &ReserveStock,
        ctx: &mut RequestContext,
        tx: &mut PgTx<'_>,
    ) -> Result<(), Error> {
        sqlx::query(&format!(
            "INSERT INTO {}.effects (message_id, sku) VALUES ($1, $2)",
            self.schema
        ))
        .bind(cmd.id)
        .bind(&cmd.sku)
        .execute(tx.conn())
        .await
        .map_err(Error::handler)?;
        let event = StockReserved {
            id: Uuid::now_v7(),
            sku: cmd.sku.clone(),
        };
        tx.deposit_post(ctx, &event).await?;
        if self.fail {
            return Err(Error::handler("failed after writing"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_typed_unit_of_work_commits_data_inbox_row_and_messages_together_or_nothing() {
    let db = db().await;
    let outbox = db.outbox().await;
    let inbox = db.inbox().await;
    db.exec("CREATE TABLE {s}.effects (message_id uuid, sku text)")
        .await;
    let producer = Recorder::default();
    let build = |fail: bool| {
        CommandProcessor::builder()
            .command_with(
                Pipeline::new().step(PgUnit::new(outbox.clone()).inbox(inbox.clone(), "reserve")),
                TypedReserveAndAnnounce {
                    schema: db.schema.clone(),
                    fail,
                },
            )
            .publication::<StockReserved>(Publication::event("stock.reserved"))
            .producer(producer.clone())
            .outbox(outbox.clone())
            .build()
            .unwrap()
    };
    let cmd = ReserveStock {
        id: Uuid::now_v7(),
        sku: "sku-7".into(),
    };
    build(true).send(&cmd).await.unwrap_err();
    assert_eq!(db.count("SELECT count(*) FROM {s}.effects").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM {s}.inbox").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM {s}.outbox").await, 0);
    assert_eq!(producer.count(), 0);

    let processor = build(false);
    processor.send(&cmd).await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM {s}.effects").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM {s}.inbox").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.outbox WHERE dispatched IS NOT NULL")
            .await,
        1,
        "sent and marked right after commit"
    );
    let sent = producer.sent.lock().unwrap()[0].clone();
    assert_eq!(sent.header.correlation_id, cmd.id, "same conversation");

    // The same command again: the inbox row, in the same transaction, makes
    // it a skipped duplicate; nothing is written twice.
    processor.send(&cmd).await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM {s}.effects").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM {s}.outbox").await, 1);

    // A closure handler gets the same transaction.
    let other = ReserveStock {
        id: Uuid::now_v7(),
        sku: "sku-8".into(),
    };
    let insert = format!(
        "INSERT INTO {}.effects (message_id, sku) VALUES ($1, $2)",
        db.schema
    );
    let closure = CommandProcessor::builder()
        .command_with(
            Pipeline::new().step(PgUnit::new(outbox.clone())),
            pg_handler_fn(move |cmd: &ReserveStock, _ctx, tx| {
                let insert = insert.clone();
                Box::pin(async move {
                    sqlx::query(&insert)
                        .bind(cmd.id)
                        .bind(&cmd.sku)
                        .execute(tx.conn())
                        .await
                        .map_err(Error::handler)?;
                    Ok(())
                })
            }),
        )
        .build()
        .unwrap();
    closure.send(&other).await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM {s}.effects").await, 2);
    db.drop().await;
}

/// Writes its effect and deposits an event; on the first call it then hangs
/// long enough for a `Timeout` step outside the unit of work to cancel it.
#[derive(Clone)]
struct HangsOnce {
    schema: String,
    calls: Arc<AtomicUsize>,
}

impl Handler<ReserveStock> for HangsOnce {
    async fn handle(&self, cmd: &ReserveStock, ctx: &mut RequestContext) -> Result<(), Error> {
        sqlx::query(&format!(
            "INSERT INTO {}.effects (message_id, sku) VALUES ($1, $2)",
            self.schema
        ))
        .bind(cmd.id)
        .bind(&cmd.sku)
        .execute(pg_transaction(ctx)?)
        .await
        .map_err(Error::handler)?;
        ctx.deposit_post(&StockReserved {
            id: Uuid::now_v7(),
            sku: cmd.sku.clone(),
        })
        .await?;
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_unit_of_work_cancelled_by_a_timeout_rolls_back_and_leaves_nothing_for_the_retry() {
    use brighter_core::pipeline::{Retry, Timeout};
    let db = db().await;
    let outbox = db.outbox().await;
    let inbox = db.inbox().await;
    db.exec("CREATE TABLE {s}.effects (message_id uuid, sku text)")
        .await;
    let producer = Recorder::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let processor = CommandProcessor::builder()
        .inbox(inbox.clone())
        .command_with(
            Pipeline::new()
                .step(Retry::new(2).backoff(Duration::from_millis(10), Duration::from_millis(10)))
                .step(Timeout::new(Duration::from_millis(500)))
                .step(PgUnitOfWork::new(db.pool.clone()))
                .step(UseInbox::new("reserve")),
            HangsOnce {
                schema: db.schema.clone(),
                calls: calls.clone(),
            },
        )
        .publication::<StockReserved>(Publication::event("stock.reserved"))
        .producer(producer.clone())
        .outbox(outbox.clone())
        .build()
        .unwrap();
    let cmd = ReserveStock {
        id: Uuid::now_v7(),
        sku: "sku-9".into(),
    };
    // Before the fix the second attempt joined the first's abandoned
    // transaction or waited on its uncommitted inbox row, and timed out too.
    processor.send(&cmd).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.effects").await,
        1,
        "the cancelled attempt's effect is rolled back"
    );
    assert_eq!(db.count("SELECT count(*) FROM {s}.inbox").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.outbox").await,
        1,
        "one event, from the attempt that committed"
    );
    assert_eq!(producer.count(), 1);
    // No connection is left inside an open transaction.
    let idle_in_tx: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND datname = current_database() AND pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%'",
    )
    .bind(&db.schema)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        idle_in_tx, 0,
        "a connection stayed pinned in the abandoned transaction"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_closure_handler_under_a_unit_of_work_deposits_in_its_transaction() {
    let db = db().await;
    let outbox = db.outbox().await;
    let producer = Recorder::default();
    let build = |fail: bool| {
        CommandProcessor::builder()
            .command_with(
                Pipeline::new().step(PgUnitOfWork::new(db.pool.clone())),
                brighter_core::handler_fn(move |cmd: ReserveStock, mut ctx| async move {
                    assert!(
                        ctx.has_transaction(),
                        "the closure sees the unit of work's transaction"
                    );
                    ctx.deposit_post(&StockReserved {
                        id: Uuid::now_v7(),
                        sku: cmd.sku,
                    })
                    .await?;
                    if fail {
                        return Err(Error::handler("failed after depositing"));
                    }
                    Ok(())
                }),
            )
            .publication::<StockReserved>(Publication::event("stock.reserved"))
            .producer(producer.clone())
            .outbox(outbox.clone())
            .build()
            .unwrap()
    };
    let cmd = || ReserveStock {
        id: Uuid::now_v7(),
        sku: "sku-3".into(),
    };
    build(true).send(&cmd()).await.unwrap_err();
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.outbox").await,
        0,
        "the deposit rolled back with the unit of work"
    );
    assert_eq!(producer.count(), 0);
    build(false).send(&cmd()).await.unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM {s}.outbox WHERE dispatched IS NOT NULL")
            .await,
        1,
        "committed, then sent after the commit"
    );
    assert_eq!(producer.count(), 1);
    db.drop().await;
}
