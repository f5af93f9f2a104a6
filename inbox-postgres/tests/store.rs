//! The store conformance suite against the Postgres inbox (`DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`), a schema per check.

use std::sync::Arc;

use async_trait::async_trait;
use brighter_core::Inbox;
use brighter_core::conformance::store::{InboxHarness, TransactionHarness};
use brighter_inbox_postgres::PgInbox;
use brighter_postgres::testing::PgTransactions;

struct Pg(PgTransactions);

async fn pg() -> Pg {
    Pg(PgTransactions::connect().await)
}

#[async_trait]
impl InboxHarness for Pg {
    fn transactions(&self) -> &dyn TransactionHarness {
        &self.0
    }

    async fn inbox(&self) -> Arc<dyn Inbox> {
        let inbox = PgInbox::builder(self.0.pool.clone())
            .schema(PgTransactions::schema())
            .build()
            .await;
        Arc::new(inbox.expect("inbox"))
    }
}

brighter_core::inbox_conformance_tests!(pg);
