//! Test support for Postgres stores: the transactions of the store
//! conformance suite (`brighter_core::conformance::store`) on a pool.

use async_trait::async_trait;
use brighter_core::Transaction;
use brighter_core::conformance::store::TransactionHarness;
use sqlx::{PgPool, Postgres};

/// `sqlx` transactions on a pool, for the store conformance suite.
#[derive(Debug, Clone)]
pub struct PgTransactions {
    /// The pool transactions are begun on.
    pub pool: PgPool,
}

impl PgTransactions {
    /// On the database at `DATABASE_URL` (default
    /// `postgres://postgres@127.0.0.1:5432/postgres`); panics when it cannot
    /// connect, as a test would.
    pub async fn connect() -> PgTransactions {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("Postgres at DATABASE_URL: {e}"));
        PgTransactions { pool }
    }

    /// A fresh schema name for one check.
    pub fn schema() -> String {
        format!("store_{}", uuid::Uuid::now_v7().simple())
    }
}

fn sqlx_transaction(tx: Box<dyn Transaction>) -> sqlx::Transaction<'static, Postgres> {
    match tx
        .into_any()
        .downcast::<sqlx::Transaction<'static, Postgres>>()
    {
        Ok(tx) => *tx,
        Err(_) => panic!("the harness begins sqlx transactions only"),
    }
}

#[async_trait]
impl TransactionHarness for PgTransactions {
    async fn begin(&self) -> Box<dyn Transaction> {
        Box::new(
            self.pool
                .begin()
                .await
                .unwrap_or_else(|e| panic!("begin: {e}")),
        )
    }

    async fn commit(&self, tx: Box<dyn Transaction>) {
        if let Err(e) = sqlx_transaction(tx).commit().await {
            panic!("commit: {e}");
        }
    }

    async fn rollback(&self, tx: Box<dyn Transaction>) {
        if let Err(e) = sqlx_transaction(tx).rollback().await {
            panic!("rollback: {e}");
        }
    }
}
