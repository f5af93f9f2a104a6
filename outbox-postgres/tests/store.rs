//! The store conformance suite against the Postgres outbox (`DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`), a schema per check.

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
