//! The store conformance suite against the Postgres outbox (`DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`), a schema per check.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use async_trait::async_trait;
use brighter_core::Outbox;
use brighter_core::conformance::store::{OutboxHarness, TransactionHarness};
use brighter_outbox_postgres::PgOutbox;
use brighter_postgres::testing::PgTransactions;

struct Pg(PgTransactions);

async fn pg() -> Pg {
    Pg(PgTransactions::connect().await)
}

#[async_trait]
impl OutboxHarness for Pg {
    fn transactions(&self) -> &dyn TransactionHarness {
        &self.0
    }

    async fn outbox(&self) -> Arc<dyn Outbox> {
        let outbox = PgOutbox::builder(self.0.pool.clone())
            .schema(PgTransactions::schema())
            .build()
            .await;
        Arc::new(outbox.expect("outbox"))
    }
}

brighter_core::outbox_conformance_tests!(pg);

/// The ids of the rows `claim` holds that may be sent now (not held back).
fn ready_ids(claim: &mut dyn brighter_core::OutboxClaim) -> Vec<uuid::Uuid> {
    claim
        .take()
        .into_iter()
        .filter(|c| !c.held)
        .map(|c| c.message.id())
        .collect()
}

#[tokio::test]
async fn a_deposit_while_the_database_is_away_is_unavailable_not_a_store_error() {
    // Outside a unit of work a deposit goes through the outbox's own pool; when
    // that cannot reach the database the error must say so, so that a pump
    // waits for the database instead of dead-lettering the message.
    let pg = pg().await;
    let outbox = PgOutbox::builder(pg.0.pool.clone())
        .schema(PgTransactions::schema())
        .build()
        .await
        .expect("outbox");
    pg.0.pool.close().await;
    let message = brighter_core::Message::new(
        brighter_core::MessageHeader::new("t", brighter_core::MessageType::Event),
        "{}",
    );
    let err = outbox
        .add(&[message], None)
        .await
        .expect_err("the pool is closed");
    assert!(err.is_unavailable(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_key_from_overlapping_transactions_are_never_claimed_out_of_order() {
    // A long transaction adds k's first message; a second writer adds k's
    // second and commits at once. Without the per-key advisory lock the
    // second row (a later position) became visible first and a sweep sent it
    // ahead of the first. Now the second writer waits for the first to end.
    use brighter_core::{ClaimRequest, Message, MessageHeader, MessageType};
    use std::time::Duration;
    let pg = pg().await;
    let outbox = PgOutbox::builder(pg.0.pool.clone())
        .schema(PgTransactions::schema())
        .build()
        .await
        .unwrap();
    let keyed = || {
        let mut header = MessageHeader::new("t", MessageType::Event);
        header.partition_key = Some("k".into());
        Message::new(header, "{}")
    };
    let (first, second) = (keyed(), keyed());
    let mut long = pg.0.pool.begin().await.unwrap();
    outbox
        .insert(&mut *long, std::slice::from_ref(&first))
        .await
        .unwrap();
    let writer = {
        let (outbox, pool, second) = (outbox.clone(), pg.0.pool.clone(), second.clone());
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            outbox
                .insert(&mut *tx, std::slice::from_ref(&second))
                .await
                .unwrap();
            tx.commit().await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = ClaimRequest {
        limit: 100,
        ..ClaimRequest::default()
    };
    let mut claim = outbox.claim(&all).await.unwrap();
    let early = ready_ids(claim.as_mut());
    claim.finish(&[], &[]).await.unwrap();
    assert!(
        early.is_empty(),
        "k's second was ready while its first was uncommitted: {early:?}"
    );
    long.commit().await.unwrap();
    writer.await.unwrap();
    let mut claim = outbox.claim(&all).await.unwrap();
    let ready = ready_ids(claim.as_mut());
    claim.finish(&ready, &[]).await.unwrap();
    assert_eq!(ready, vec![first.id(), second.id()]);
}

#[tokio::test]
async fn a_mark_leaves_the_next_commit_on_its_connection_durable() {
    // Marking rows dispatched commits without waiting for its WAL flush
    // (`synchronous_commit` off for that transaction alone). The setting
    // must end with it: a deposit made next on the same pooled connection
    // waits for its flush as the server's setting says. One connection, so
    // every step below runs on it.
    use brighter_core::{ClaimRequest, Message, MessageHeader, MessageType};
    let options = pg().await.0.pool.connect_options();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*options).clone())
        .await
        .unwrap();
    let outbox = PgOutbox::builder(pool.clone())
        .schema(PgTransactions::schema())
        .build()
        .await
        .unwrap();
    let setting = || async {
        sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let server = setting().await;
    let message = || Message::new(MessageHeader::new("t", MessageType::Event), "{}");
    let (posted, swept) = (message(), message());
    outbox
        .add(&[posted.clone(), swept.clone()], None)
        .await
        .unwrap();

    outbox
        .mark_dispatched(&[posted.id()], chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(setting().await, server, "after a post's mark");

    let mut claim = outbox
        .claim(&ClaimRequest {
            limit: 10,
            ..ClaimRequest::default()
        })
        .await
        .unwrap();
    let ready = ready_ids(claim.as_mut());
    assert_eq!(ready, vec![swept.id()], "the posted row is marked");
    claim.finish(&ready, &[]).await.unwrap();
    assert_eq!(setting().await, server, "after a sweep's mark");
    assert_eq!(outbox.outstanding_count().await.unwrap(), 0);
}
