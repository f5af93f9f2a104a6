//! # brighter-inbox-postgres
//!
//! The inbox in Postgres (sqlx): a row per (message id, context key) that was
//! handled, with its correlation id, request type, message type and topic
//! (so a conversation can be rebuilt from inboxes and outboxes). With a
//! `PgUnitOfWork` step (from
//! [brighter-outbox-postgres](https://docs.rs/brighter-outbox-postgres))
//! before [`UseInbox`](brighter_core::pipeline::UseInbox), the row is inserted
//! (`INSERT ... ON CONFLICT DO NOTHING`; no row inserted = duplicate) in the
//! handler's own transaction before its effects, so the effects and the inbox row
//! commit together or not at all, whatever crashes.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), brighter_core::Error> {
//! use brighter_core::pipeline::{Pipeline, Retry, UseInbox};
//! use brighter_inbox_postgres::PgInbox;
//!
//! let inbox = PgInbox::builder(pool.clone()).schema("shop").build().await?;
//! let pipeline = Pipeline::new()
//!     .step(Retry::new(3))
//!     // .step(PgUnitOfWork::new(pool.clone()))   from brighter-outbox-postgres
//!     .step(UseInbox::new("reserve-stock"));
//! // CommandProcessor::builder().inbox(inbox).command_with(pipeline, handler)
//! # let _ = (inbox, pipeline); Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::{Error, Inbox, InboxEntry, MessageType, Transaction};
use brighter_postgres::{
    Identifier, PgInboxWriter, pg_connection, pg_error, render, run_migration,
};
use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SCHEMA_SQL: &str = include_str!("../sql/inbox.sql");

struct Statements {
    insert: String,
    exists: String,
    delete_older: String,
    by_correlation: String,
}

/// The inbox in Postgres.
#[derive(Clone)]
pub struct PgInbox {
    pool: PgPool,
    name: Arc<str>,
    sql: Arc<Statements>,
}

impl fmt::Debug for PgInbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgInbox")
            .field("table", &self.name)
            .finish_non_exhaustive()
    }
}

/// Configures a [`PgInbox`].
#[derive(Debug)]
#[must_use]
pub struct PgInboxBuilder {
    pool: PgPool,
    schema: String,
    table: String,
    migrate: bool,
}

impl PgInboxBuilder {
    /// The schema (default `brighter`).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The table (default `inbox`).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Whether `build` creates or updates the schema (default on).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Validates the names, runs the migrations, and returns the inbox.
    pub async fn build(self) -> Result<PgInbox, Error> {
        let schema = Identifier::new(&self.schema)?;
        let table = Identifier::with_max_len(&self.table, Identifier::MAX_LEN - 12)?;
        let qualified = format!("{}.{}", schema.quoted(), table.quoted());
        if self.migrate {
            let sql = render(
                SCHEMA_SQL,
                &[
                    ("schema", schema.quoted()),
                    ("table", table.quoted()),
                    ("handled_index", table.suffixed("_handled_idx")?.quoted()),
                ],
            );
            run_migration(&self.pool, &sql).await?;
        }
        Ok(PgInbox {
            pool: self.pool,
            name: format!("{schema}.{table}").into(),
            sql: Arc::new(Statements {
                insert: format!(
                    "INSERT INTO {qualified} (message_id, context_key, correlation_id, request_type, message_type, topic) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
                ),
                by_correlation: format!(
                    "SELECT message_id, context_key, correlation_id, request_type, message_type, topic, handled_at \
                     FROM {qualified} WHERE correlation_id = $1 ORDER BY handled_at, message_id"
                ),
                exists: format!(
                    "SELECT EXISTS (SELECT 1 FROM {qualified} WHERE message_id = $1 AND context_key = $2)"
                ),
                delete_older: format!(
                    "DELETE FROM {qualified} WHERE ctid IN (SELECT ctid FROM {qualified} \
                     WHERE handled_at < now() - $1 * interval '1 millisecond' LIMIT 10000)"
                ),
            }),
        })
    }
}

fn store(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| pg_error(context, e)
}

impl PgInbox {
    /// Starts configuring an inbox on `pool`.
    pub fn builder(pool: PgPool) -> PgInboxBuilder {
        PgInboxBuilder {
            pool,
            schema: "brighter".into(),
            table: "inbox".into(),
            migrate: true,
        }
    }

    /// Records `entry` through any executor; [`Error::Duplicate`] when its id
    /// and context key were already there. Inside a transaction, a concurrent
    /// insert of the same key waits for the other transaction and then sees
    /// the duplicate.
    pub async fn insert<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        entry: &InboxEntry,
    ) -> Result<(), Error> {
        let inserted = sqlx::query(&self.sql.insert)
            .bind(entry.id)
            .bind(&entry.context_key)
            .bind(entry.correlation_id)
            .bind(entry.request_type.as_deref())
            .bind(entry.message_type.map(MessageType::as_str))
            .bind(entry.topic.as_deref())
            .execute(executor)
            .await
            .map_err(store("insert into the inbox"))?
            .rows_affected();
        if inserted == 0 {
            Err(Error::Duplicate {
                id: entry.id,
                context_key: entry.context_key.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Deletes entries handled more than `older_than` ago; returns how many.
    pub async fn delete_older_than(&self, older_than: Duration) -> Result<u64, Error> {
        let millis = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let deleted = sqlx::query(&self.sql.delete_older)
                .bind(millis)
                .execute(&self.pool)
                .await
                .map_err(store("clean up the inbox"))?
                .rows_affected();
            total += deleted;
            if deleted < 10_000 {
                return Ok(total);
            }
        }
    }

    /// Deletes entries older than `retention` every `every` until `shutdown`.
    /// Keep the retention well above the longest time a message can be redelivered.
    pub async fn run_cleanup(
        self,
        retention: Duration,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            match self.delete_older_than(retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, table = %self.name, "inbox cleanup"),
                Err(error) => tracing::warn!(%error, "inbox cleanup failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[async_trait]
impl PgInboxWriter for PgInbox {
    async fn record(&self, conn: &mut sqlx::PgConnection, entry: &InboxEntry) -> Result<(), Error> {
        self.insert(conn, entry).await
    }
}

/// A row read back: id, context key, correlation id, request type, message
/// type, topic, handled at.
type Row = (
    Uuid,
    String,
    Option<Uuid>,
    Option<String>,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
);

#[async_trait]
impl Inbox for PgInbox {
    async fn add(
        &self,
        id: Uuid,
        context_key: &str,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        Inbox::record(self, &InboxEntry::new(id, context_key), tx).await
    }

    async fn record(
        &self,
        entry: &InboxEntry,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        match tx {
            None => self.insert(&self.pool, entry).await,
            Some(tx) => {
                let conn = pg_connection(tx, "the Postgres inbox")?;
                self.insert(conn, entry).await
            }
        }
    }

    async fn by_correlation(&self, correlation_id: Uuid) -> Result<Vec<InboxEntry>, Error> {
        let rows: Vec<Row> = sqlx::query_as(&self.sql.by_correlation)
            .bind(correlation_id)
            .fetch_all(&self.pool)
            .await
            .map_err(store("read a conversation from the inbox"))?;
        Ok(rows
            .into_iter()
            .map(
                |(id, context_key, correlation_id, request_type, message_type, topic, at)| {
                    InboxEntry {
                        id,
                        context_key,
                        correlation_id,
                        request_type,
                        message_type: message_type.as_deref().and_then(MessageType::parse),
                        topic,
                        handled_at: Some(at),
                    }
                },
            )
            .collect())
    }

    async fn exists(&self, id: Uuid, context_key: &str) -> Result<bool, Error> {
        sqlx::query_scalar(&self.sql.exists)
            .bind(id)
            .bind(context_key)
            .fetch_one(&self.pool)
            .await
            .map_err(store("read the inbox"))
    }
}
