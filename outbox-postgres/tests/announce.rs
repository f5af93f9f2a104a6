//! Announcing new rows to sweepers, on Postgres (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), a schema per test: writers
//! NOTIFY only while a sweeper waits, a waiting sweeper is woken by a commit,
//! and a sweeper that sends rows as they commit never sends one that its
//! writer clears itself.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::{CommandProcessor, Error, Message, MessageHeader, MessageType, Producer};
use brighter_outbox_postgres::{PgOutbox, PgSweeper};
use brighter_postgres::testing::PgTransactions;
use sqlx::postgres::PgListener;
use uuid::Uuid;

/// Counts the sends of each message.
#[derive(Clone, Default)]
struct Counting(Arc<Mutex<HashMap<Uuid, usize>>>);

impl Counting {
    fn sends(&self, id: Uuid) -> usize {
        self.0.lock().unwrap().get(&id).copied().unwrap_or(0)
    }
    fn all(&self) -> HashMap<Uuid, usize> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait]
impl Producer for Counting {
    async fn send(&self, message: &Message) -> Result<(), Error> {
        *self.0.lock().unwrap().entry(message.id()).or_default() += 1;
        Ok(())
    }
}

fn message() -> Message {
    Message::new(MessageHeader::new("t", MessageType::Event), "{}")
}

async fn setup() -> (PgTransactions, PgOutbox, CommandProcessor, Counting) {
    let pg = PgTransactions::connect().await;
    let outbox = PgOutbox::builder(pg.pool.clone())
        .schema(PgTransactions::schema())
        .build()
        .await
        .unwrap();
    let producer = Counting::default();
    let processor = CommandProcessor::builder()
        .producer(producer.clone())
        .outbox(outbox.clone())
        .build()
        .unwrap();
    (pg, outbox, processor, producer)
}

/// Deposits `message` in a transaction of its own and commits it.
async fn deposit(pg: &PgTransactions, outbox: &PgOutbox, message: &Message) {
    let mut tx = pg.pool.begin().await.unwrap();
    outbox
        .insert(&mut *tx, std::slice::from_ref(message))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn sent_within(producer: &Counting, id: Uuid, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if producer.sends(id) > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Whether one of up to 5 deposits, each committed once the sweeper had
/// time to wait again, was sent within `limit` of its commit. (A sweeper's
/// workers start by sweeping: the first deposit may go with that sweep
/// rather than wake it.)
async fn woken_by_a_commit(
    pg: &PgTransactions,
    outbox: &PgOutbox,
    producer: &Counting,
    limit: Duration,
) -> bool {
    for _ in 0..5 {
        let m = message();
        deposit(pg, outbox, &m).await;
        if sent_within(producer, m.id(), limit).await {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_announce_only_while_a_sweeper_waits_and_it_wakes_on_the_commit() {
    let (pg, outbox, processor, producer) = setup().await;
    let mut listener = PgListener::connect_with(&pg.pool).await.unwrap();
    listener.listen(outbox.channel()).await.unwrap();
    // No sweeper: a commit is announced to nobody, so it is not announced.
    deposit(&pg, &outbox, &message()).await;
    let heard = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(heard.is_err(), "announced with no sweeper");

    // A sweeper that polls once a minute: only an announcement wakes it in time.
    let sweeper = PgSweeper::new(outbox.clone(), processor)
        .poll_interval(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    // Its workers find nothing more and wait: from then on commits are
    // announced.
    let swept = woken_by_a_commit(&pg, &outbox, &producer, Duration::from_secs(10)).await;
    assert!(swept, "a waiting sweeper was not woken by a commit");
    sweeper.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeper_never_sends_a_row_its_writer_clears_itself() {
    let (pg, outbox, processor, producer) = setup().await;
    // Rows are the sweeper's as soon as they commit (the outbox leases what
    // writers send): writers that clear their own rows race it for each one.
    let sweeper = PgSweeper::new(outbox.clone(), processor.clone())
        .start()
        .await
        .unwrap();
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let (pg_pool, outbox, processor) = (pg.pool.clone(), outbox.clone(), processor.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..100 {
                    let m = message();
                    let mut tx = pg_pool.begin().await.unwrap();
                    outbox
                        .insert(&mut *tx, std::slice::from_ref(&m))
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    // Half cleared by their writer at once, half left to the sweeper.
                    if (writer + n) % 2 == 0 {
                        processor.clear_outbox(&[m.id()]).await.unwrap();
                    }
                    ids.push(m.id());
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for writer in writers {
        ids.extend(writer.await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ids.iter().any(|id| producer.sends(*id) == 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sweeper.stop().await;
    let sends = producer.all();
    let missing = ids.iter().filter(|id| !sends.contains_key(id)).count();
    let twice = sends.values().filter(|n| **n > 1).count();
    assert_eq!(missing, 0, "every row sent");
    assert_eq!(twice, 0, "no row sent twice");
    assert_eq!(
        brighter_core::Outbox::outstanding_count(&outbox)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_made_before_announces_at_commit_once_built_again() {
    // 0.1 made a statement trigger that announced every insert; building the
    // outbox again replaces it with the deferred one that asks first.
    let pg = PgTransactions::connect().await;
    let schema = PgTransactions::schema();
    PgOutbox::builder(pg.pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let table = format!("\"{schema}\".\"outbox\"");
    sqlx::raw_sql(&format!(
        "DROP TRIGGER outbox_notify_trigger ON {table}; \
         CREATE TRIGGER outbox_notify_trigger AFTER INSERT ON {table} \
         FOR EACH STATEMENT EXECUTE FUNCTION \"{schema}\".outbox_notify()"
    ))
    .execute(&pg.pool)
    .await
    .unwrap();
    let deferred = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT tgdeferrable FROM pg_trigger WHERE tgrelid = $1::regclass \
             AND tgname = 'outbox_notify_trigger'",
        )
        .bind(&table)
        .fetch_one(&pg.pool)
        .await
        .unwrap()
    };
    assert!(!deferred().await);
    PgOutbox::builder(pg.pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    assert!(deferred().await, "the trigger is the deferred one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeper_started_after_another_stopped_is_woken_by_commits() {
    // The sweepers' lock lives in the listener's session: a listener that
    // went back to the pool kept it, and the next sweeper's listener waited
    // for it for ever, so commits reached that sweeper only by polling.
    let (pg, outbox, processor, producer) = setup().await;
    for round in 0..2 {
        let sweeper = PgSweeper::new(outbox.clone(), processor.clone())
            .poll_interval(Duration::from_secs(60))
            .start()
            .await
            .unwrap();
        let swept = woken_by_a_commit(&pg, &outbox, &producer, Duration::from_secs(5)).await;
        sweeper.stop().await;
        assert!(swept, "sweeper {round} was not woken by a commit");
        // Its lock went with it.
        let held = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
                 AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
            )
            .bind(format!("{}#sweepers", outbox.channel()))
            .fetch_one(&pg.pool)
            .await
            .unwrap()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while held().await > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            held().await,
            0,
            "sweeper {round} left the sweepers' lock held"
        );
    }
}
