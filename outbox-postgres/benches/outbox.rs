//! Postgres outbox benchmark, against a baseline measured in the same run:
//! `deposit_post`, one message per transaction, 8 concurrent writers, vs a raw
//! sqlx insert of the same row into a plain table (the outbox's columns and a
//! primary key, no trigger, no other index), one per transaction, and vs the
//! same outbox announcing nothing (no NOTIFY). The three sides take turns
//! going first, each after a checkpoint. (The
//! sweeper's drain to real brokers is in `benches/e2e.rs`.)
//!
//! Needs Postgres at `DATABASE_URL` (default postgres://postgres@127.0.0.1:5432/postgres).
//! Run with: cargo bench -p brighter-outbox-postgres --bench outbox [-- --quick]
//! (`BENCH_SIDE=ours`, `plain` or `none` runs one side, or none, for a
//! profiler: the client's instructions per transaction are then
//! (side − none) / transactions.)
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use benchkit::{Run, medians};
use brighter_core::{CommandProcessor, Error, Event, Message, Producer, Publication, Request};
use brighter_outbox_postgres::PgOutbox;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const WRITERS: usize = 8;

#[derive(Clone, Serialize, Deserialize)]
struct OrderPlaced {
    id: Uuid,
    customer: String,
    total_cents: u64,
}
impl Request for OrderPlaced {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Event for OrderPlaced {}

fn event() -> OrderPlaced {
    OrderPlaced {
        id: Uuid::now_v7(),
        customer: "customer-42".into(),
        total_cents: 12_345,
    }
}

struct Noop;
#[async_trait]
impl Producer for Noop {
    async fn send(&self, _: &Message) -> Result<(), Error> {
        Ok(())
    }
}

async fn writers<F, Fut>(per_writer: usize, write: F) -> Run
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let write = Arc::new(write);
    let cpu = benchkit::cpu_time();
    let start = Instant::now();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let write = Arc::clone(&write);
            tokio::spawn(async move {
                for _ in 0..per_writer {
                    write().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    benchkit::rate_and_cpu(WRITERS * per_writer, start, cpu)
}

async fn deposit_ours(pool: PgPool, processor: CommandProcessor, per_writer: usize) -> Run {
    writers(per_writer, move || {
        let (pool, processor) = (pool.clone(), processor.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            processor
                .deposit_post(&event(), Some(&mut tx))
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    })
    .await
}

/// The same row written by hand into `table`: every column bound, as a
/// hand-written outbox would.
async fn deposit_raw(pool: PgPool, schema: String, table: &str, per_writer: usize) -> Run {
    let sql: Arc<str> = format!(
        "INSERT INTO \"{schema}\".\"{table}\" (message_id, topic, message_type, message_timestamp, correlation_id, \
         reply_to, content_type, partition_key, handled_count, delay_ms, header_bag, cloud_events, trace_context, body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    )
    .into();
    writers(per_writer, move || {
        let (pool, sql) = (pool.clone(), Arc::clone(&sql));
        async move {
            let e = event();
            let body = serde_json::to_vec(&e).unwrap();
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(&sql)
                .bind(e.id)
                .bind("orders.placed")
                .bind("event")
                .bind(chrono::Utc::now())
                .bind(e.id)
                .bind(None::<String>)
                .bind("application/json")
                .bind(None::<String>)
                .bind(0i32)
                .bind(0i64)
                .bind(serde_json::json!({}))
                .bind(serde_json::json!({"source": "urn:brighter", "type": "OrderPlaced", "specversion": "1.0"}))
                .bind(serde_json::json!({}))
                .bind(body)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    })
    .await
}

async fn run(quick: bool) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .unwrap();
    let schema = format!("bench_{}", Uuid::now_v7().simple());
    let quiet = format!("bench_{}", Uuid::now_v7().simple());
    let outbox = PgOutbox::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    // The same outbox without announcing inserts: what the notification costs.
    let silent = PgOutbox::builder(pool.clone())
        .schema(&quiet)
        .notify(false)
        .build()
        .await
        .unwrap();
    // A plain table, as a hand-written outbox: the same columns and
    // defaults, a primary key on the message id, no trigger, no other index.
    sqlx::raw_sql(&format!(
        "CREATE TABLE \"{schema}\".plain (LIKE \"{schema}\".outbox INCLUDING DEFAULTS); \
         ALTER TABLE \"{schema}\".plain ADD PRIMARY KEY (message_id)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let processor = |outbox: PgOutbox| {
        CommandProcessor::builder()
            .publication::<OrderPlaced>(Publication::event("orders.placed"))
            .producer(Noop)
            .outbox(outbox)
            .build()
            .unwrap()
    };
    let (loud, silent) = (processor(outbox), processor(silent));
    let (per_writer, runs) = if quick { (100, 3) } else { (500, 5) };

    let (mut ours, mut plain, mut unannounced) = (Vec::new(), Vec::new(), Vec::new());
    deposit_raw(pool.clone(), schema.clone(), "plain", 20).await; // warm up
    deposit_ours(pool.clone(), loud.clone(), 20).await;
    if let Ok(side) = std::env::var("BENCH_SIDE") {
        let one = match side.as_str() {
            "ours" => Some(deposit_ours(pool.clone(), loud.clone(), per_writer).await),
            "plain" => Some(deposit_raw(pool.clone(), schema.clone(), "plain", per_writer).await),
            _ => None,
        };
        if let Some(one) = one {
            println!(
                "deposit, {side} only: {:.0} tx/s {:.1} µs CPU/tx",
                one.0, one.1
            );
        }
        drop_schemas(&pool, [schema, quiet]).await;
        return;
    }
    for round in 0..runs {
        // Each side goes first in turn, and starts after a checkpoint, so
        // that writing out the pages of the side before does not fall
        // inside it.
        for side in (0..3).map(|i| (round + i) % 3) {
            sqlx::query("CHECKPOINT").execute(&pool).await.unwrap();
            match side {
                0 => {
                    plain.push(deposit_raw(pool.clone(), schema.clone(), "plain", per_writer).await)
                }
                1 => ours.push(deposit_ours(pool.clone(), loud.clone(), per_writer).await),
                _ => unannounced.push(deposit_ours(pool.clone(), silent.clone(), per_writer).await),
            }
        }
    }
    let (ours, plain, unannounced) = (medians(ours), medians(plain), medians(unannounced));
    println!("deposit_post, 1 message per transaction, {WRITERS} writers, median of {runs} runs:");
    println!(
        "  ours: {:>6.0} tx/s {:.0} µs CPU/tx   without announcing: {:>6.0} tx/s   raw insert into a plain table: {:>6.0} tx/s {:.0} µs CPU/tx   ratio {:.2} (goal >= 0.9)",
        ours.0,
        ours.1,
        unannounced.0,
        plain.0,
        plain.1,
        ours.0 / plain.0
    );
    let note = format!(
        "{WRITERS} writers, one message per transaction, no sweeper running; the plain table has the outbox's columns, a primary key and nothing else; median of {runs}"
    );
    benchkit::record(
        "deposit_post vs raw insert into a plain table",
        ours.0,
        plain.0,
        "tx/s",
        benchkit::Goal::AtLeast(0.9),
        &note,
    );
    benchkit::record_cpu(
        "deposit_post vs raw insert into a plain table",
        ours.1,
        plain.1,
        benchkit::Goal::None,
        &note,
    );
    benchkit::record(
        "deposit_post vs the same outbox announcing nothing",
        ours.0,
        unannounced.0,
        "tx/s",
        benchkit::Goal::None,
        &note,
    );
    drop_schemas(&pool, [schema, quiet]).await;
}

async fn drop_schemas(pool: &PgPool, schemas: [String; 2]) {
    for schema in schemas {
        sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .execute(pool)
            .await
            .unwrap();
    }
}

fn main() {
    benchkit::main("outbox", run);
}
