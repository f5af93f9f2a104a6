//! Postgres outbox benchmark, against a baseline measured in the same run:
//! `deposit_post`, one message per transaction, 8 concurrent writers, vs a raw
//! sqlx insert of the same row into the same table, one per transaction. (The
//! sweeper's drain to real brokers is in `benches/e2e.rs`.)
//!
//! Needs Postgres at `DATABASE_URL` (default postgres://postgres@127.0.0.1:5432/postgres).
//! Run with: cargo bench -p brighter-outbox-postgres --bench outbox [-- --quick]
#![allow(missing_docs, clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
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

async fn writers<F, Fut>(per_writer: usize, write: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let write = Arc::new(write);
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
    (WRITERS * per_writer) as f64 / start.elapsed().as_secs_f64()
}

async fn deposit_ours(pool: PgPool, processor: CommandProcessor, per_writer: usize) -> f64 {
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

/// The same row written by hand: every column bound, as a hand-written outbox would.
async fn deposit_raw(pool: PgPool, schema: String, per_writer: usize) -> f64 {
    let sql: Arc<str> = format!(
        "INSERT INTO \"{schema}\".\"outbox\" (message_id, topic, message_type, message_timestamp, correlation_id, \
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
    let outbox = PgOutbox::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let processor = CommandProcessor::builder()
        .publication::<OrderPlaced>(Publication::event("orders.placed"))
        .producer(Noop)
        .outbox(outbox.clone())
        .build()
        .unwrap();
    let (per_writer, runs) = if quick { (100, 3) } else { (500, 3) };

    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    deposit_raw(pool.clone(), schema.clone(), 20).await; // warm up
    for _ in 0..runs {
        raw.push(deposit_raw(pool.clone(), schema.clone(), per_writer).await);
        ours.push(deposit_ours(pool.clone(), processor.clone(), per_writer).await);
    }
    let (o, r) = (benchkit::median(ours), benchkit::median(raw));
    println!("deposit_post, 1 message per transaction, {WRITERS} writers, median of {runs} runs:");
    println!(
        "  ours: {o:>8.0} tx/s   raw sqlx insert: {r:>8.0} tx/s   ratio {:.2} (goal >= 0.9)",
        o / r
    );

    benchkit::record(
        "deposit_post vs raw sqlx insert",
        o,
        r,
        "tx/s",
        benchkit::Goal::AtLeast(0.9),
        &format!("{WRITERS} writers, one message per transaction; median of {runs}"),
    );
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

fn main() {
    benchkit::main("outbox", run);
}
