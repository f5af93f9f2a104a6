//! The store conformance suite against the Postgres outbox (`DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`), a schema per check.

use std::sync::Arc;

use async_trait::async_trait;
use brighter_core::conformance::store::{OutboxHarness, TransactionHarness};
use brighter_core::{Outbox, Transaction};
use brighter_outbox_postgres::PgOutbox;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};

struct Pg {
    pool: PgPool,
}

async fn pg() -> Pg {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    Pg {
        pool: PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("Postgres at DATABASE_URL"),
    }
}

#[async_trait]
impl TransactionHarness for Pg {
    async fn begin(&self) -> Box<dyn Transaction> {
        Box::new(self.pool.begin().await.expect("begin"))
    }

    async fn commit(&self, tx: Box<dyn Transaction>) {
        match tx
            .into_any()
            .downcast::<sqlx::Transaction<'static, Postgres>>()
        {
            Ok(tx) => tx.commit().await.expect("commit"),
            Err(_) => panic!("the harness begins sqlx transactions only"),
        }
    }

    async fn rollback(&self, tx: Box<dyn Transaction>) {
        match tx
            .into_any()
            .downcast::<sqlx::Transaction<'static, Postgres>>()
        {
            Ok(tx) => tx.rollback().await.expect("rollback"),
            Err(_) => panic!("the harness begins sqlx transactions only"),
        }
    }
}

#[async_trait]
impl OutboxHarness for Pg {
    async fn outbox(&self) -> Arc<dyn Outbox> {
        let schema = format!("store_{}", uuid::Uuid::now_v7().simple());
        Arc::new(
            PgOutbox::builder(self.pool.clone())
                .schema(schema)
                .build()
                .await
                .expect("outbox"),
        )
    }
}

brighter_core::outbox_conformance_tests!(pg);
