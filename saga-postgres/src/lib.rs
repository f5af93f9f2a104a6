//! # brighter-saga-postgres
//!
//! The saga store in Postgres (sqlx): one row per process manager instance,
//! keyed by (saga, key), with its state as `jsonb`, a `version` every save
//! increments, and its status. A step runs in one transaction begun by the
//! store: the instance row is locked (`SELECT ... FOR UPDATE`) until the
//! step commits, so two messages for one instance never interleave while
//! steps of other instances run in parallel; the Postgres inbox and outbox
//! join the same transaction, so the state, the inbox record and the
//! outgoing messages commit together or not at all.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), brighter_core::Error> {
//! use brighter_saga_postgres::PgSagaStore;
//! let sagas = PgSagaStore::builder(pool).schema("shop").build().await?;
//! // SagaBuilder::new(OrderSaga, sagas).starts::<PlaceOrder>() ...
//! # let _ = sagas; Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::{Error, SagaInstance, SagaStatus, SagaStore, Transaction};
use brighter_postgres::{Identifier, pg_connection, pg_error, render, run_migration};
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;

const SCHEMA_SQL: &str = include_str!("../sql/saga.sql");

struct Statements {
    create: String,
    load: String,
    save: String,
    get: String,
    delete_ended: String,
}

/// Saga instances in Postgres.
#[derive(Clone)]
pub struct PgSagaStore {
    pool: PgPool,
    name: Arc<str>,
    sql: Arc<Statements>,
}

impl fmt::Debug for PgSagaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSagaStore")
            .field("table", &self.name)
            .finish_non_exhaustive()
    }
}

/// Configures a [`PgSagaStore`].
#[derive(Debug)]
#[must_use]
pub struct PgSagaStoreBuilder {
    pool: PgPool,
    schema: String,
    table: String,
    migrate: bool,
}

impl PgSagaStoreBuilder {
    /// The schema (default `brighter`); use the one of the inbox and outbox.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The table (default `sagas`).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Whether `build` creates or updates the schema (default on).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Validates the names, runs the migrations, and returns the store.
    pub async fn build(self) -> Result<PgSagaStore, Error> {
        let schema = Identifier::new(&self.schema)?;
        let table = Identifier::with_max_len(&self.table, Identifier::MAX_LEN - 10)?;
        let q = format!("{}.{}", schema.quoted(), table.quoted());
        if self.migrate {
            let sql = render(
                SCHEMA_SQL,
                &[
                    ("schema", schema.quoted()),
                    ("table", table.quoted()),
                    ("ended_index", table.suffixed("_ended_idx")?.quoted()),
                ],
            );
            run_migration(&self.pool, &sql).await?;
        }
        Ok(PgSagaStore {
            pool: self.pool,
            name: format!("{schema}.{table}").into(),
            sql: Arc::new(Statements {
                // A new instance's row, under the lock its insert takes: a
                // second starting message for the key waits for the first
                // step's commit, then finds the row.
                create: format!(
                    "INSERT INTO {q} (saga, key, state, version) VALUES ($1, $2, 'null', 0) \
                     ON CONFLICT (saga, key) DO NOTHING"
                ),
                load: format!(
                    "SELECT state, version, status, reason, updated_at FROM {q} \
                     WHERE saga = $1 AND key = $2 FOR UPDATE"
                ),
                save: format!(
                    "UPDATE {q} SET state = $3, version = version + 1, status = $4, reason = $5, \
                     updated_at = now() WHERE saga = $1 AND key = $2 AND version = $6 \
                     RETURNING version"
                ),
                get: format!(
                    "SELECT state, version, status, reason, updated_at FROM {q} \
                     WHERE saga = $1 AND key = $2"
                ),
                delete_ended: format!(
                    "DELETE FROM {q} WHERE ctid IN (SELECT ctid FROM {q} WHERE status <> 'running' \
                     AND updated_at < now() - $1 * interval '1 millisecond' LIMIT 10000)"
                ),
            }),
        })
    }
}

/// A stored row: state, version, status, reason, updated.
type Row = (
    serde_json::Value,
    i64,
    String,
    Option<String>,
    DateTime<Utc>,
);

fn instance(saga: &str, key: &str, row: Row) -> Result<SagaInstance, Error> {
    let (state, version, status, reason, updated) = row;
    let status = SagaStatus::parse(&status, reason).ok_or_else(|| {
        Error::store(
            "read a saga instance",
            format!("instance {saga}/{key} has an unknown status '{status}'"),
        )
    })?;
    Ok(SagaInstance {
        saga: saga.to_owned(),
        key: key.to_owned(),
        state,
        version,
        status,
        updated,
    })
}

fn store(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| pg_error(context, e)
}

impl PgSagaStore {
    /// Starts configuring a store on `pool`: the pool of the inbox and the
    /// outbox, whose inserts join its transactions.
    pub fn builder(pool: PgPool) -> PgSagaStoreBuilder {
        PgSagaStoreBuilder {
            pool,
            schema: "brighter".into(),
            table: "sagas".into(),
            migrate: true,
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Deletes ended instances older than `retention` every `every` until
    /// `shutdown` (see [`SagaStore::delete_ended`]).
    pub async fn run_cleanup(
        self,
        retention: Duration,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            match self.delete_ended(retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, table = %self.name, "saga cleanup"),
                Err(error) => tracing::warn!(%error, "saga cleanup failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[async_trait]
impl SagaStore for PgSagaStore {
    async fn begin(&self) -> Result<Box<dyn Transaction>, Error> {
        let tx = self
            .pool
            .begin()
            .await
            .map_err(store("begin a saga step"))?;
        Ok(Box::new(tx))
    }

    async fn load(
        &self,
        tx: &mut dyn Transaction,
        saga: &str,
        key: &str,
        create: bool,
    ) -> Result<Option<SagaInstance>, Error> {
        let conn = pg_connection(tx, "the Postgres saga store")?;
        let lock = async |conn: &mut sqlx::PgConnection| {
            sqlx::query_as::<_, Row>(&self.sql.load)
                .bind(saga)
                .bind(key)
                .fetch_optional(conn)
                .await
                .map_err(store("load a saga instance"))
        };
        let mut row = lock(&mut *conn).await?;
        if row.is_none() && create {
            // Created under the insert's lock, then locked as any instance:
            // a concurrent creator waits for this step and finds the row.
            sqlx::query(&self.sql.create)
                .bind(saga)
                .bind(key)
                .execute(&mut *conn)
                .await
                .map_err(store("create a saga instance"))?;
            row = lock(&mut *conn).await?;
        }
        row.map(|row| instance(saga, key, row)).transpose()
    }

    async fn save(&self, tx: &mut dyn Transaction, instance: &SagaInstance) -> Result<i64, Error> {
        let conn = pg_connection(tx, "the Postgres saga store")?;
        let version: Option<i64> = sqlx::query_scalar(&self.sql.save)
            .bind(&instance.saga)
            .bind(&instance.key)
            .bind(&instance.state)
            .bind(instance.status.as_str())
            .bind(instance.status.reason())
            .bind(instance.version)
            .fetch_optional(&mut *conn)
            .await
            .map_err(store("save a saga instance"))?;
        version.ok_or_else(|| {
            Error::store(
                "save a saga instance",
                format!(
                    "instance {}/{} is no longer at version {} (or was not loaded in this transaction)",
                    instance.saga, instance.key, instance.version
                ),
            )
        })
    }

    async fn commit(&self, tx: Box<dyn Transaction>) -> Result<(), Error> {
        sqlx_transaction(tx)?
            .commit()
            .await
            .map_err(store("commit a saga step"))
    }

    async fn rollback(&self, tx: Box<dyn Transaction>) -> Result<(), Error> {
        sqlx_transaction(tx)?
            .rollback()
            .await
            .map_err(store("roll back a saga step"))
    }

    async fn get(&self, saga: &str, key: &str) -> Result<Option<SagaInstance>, Error> {
        let row: Option<Row> = sqlx::query_as(&self.sql.get)
            .bind(saga)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(store("read a saga instance"))?;
        row.map(|row| instance(saga, key, row)).transpose()
    }

    async fn delete_ended(&self, older_than: Duration) -> Result<u64, Error> {
        let millis = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let deleted = sqlx::query(&self.sql.delete_ended)
                .bind(millis)
                .execute(&self.pool)
                .await
                .map_err(store("delete ended saga instances"))?
                .rows_affected();
            total += deleted;
            if deleted < 10_000 {
                return Ok(total);
            }
        }
    }
}

fn sqlx_transaction(
    tx: Box<dyn Transaction>,
) -> Result<sqlx::Transaction<'static, Postgres>, Error> {
    tx.into_any()
        .downcast::<sqlx::Transaction<'static, Postgres>>()
        .map(|tx| *tx)
        .map_err(|_| {
            Error::configuration("the Postgres saga store commits only the transactions it began")
        })
}
