//! The saga conformance suite against the Postgres saga store, with the
//! Postgres inbox and outbox joining its transactions (`DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`), a schema per check.

use std::sync::Arc;

use async_trait::async_trait;
use brighter_core::conformance::saga::{SagaHarness, SagaParts};
use brighter_inbox_postgres::PgInbox;
use brighter_outbox_postgres::PgOutbox;
use brighter_postgres::testing::PgTransactions;
use brighter_saga_postgres::PgSagaStore;

struct Pg(PgTransactions);

async fn pg() -> Pg {
    Pg(PgTransactions::connect().await)
}

#[async_trait]
impl SagaHarness for Pg {
    async fn parts(&self) -> SagaParts {
        let pool = self.0.pool.clone();
        let schema = PgTransactions::schema();
        let store = PgSagaStore::builder(pool.clone())
            .schema(&schema)
            .build()
            .await
            .expect("saga store");
        let inbox = PgInbox::builder(pool.clone())
            .schema(&schema)
            .build()
            .await
            .expect("inbox");
        let outbox = PgOutbox::builder(pool)
            .schema(&schema)
            .build()
            .await
            .expect("outbox");
        SagaParts {
            store: Arc::new(store),
            inbox: Arc::new(inbox),
            outbox: Arc::new(outbox),
        }
    }
}

brighter_core::saga_conformance_tests!(pg);
