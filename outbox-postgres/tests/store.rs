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
