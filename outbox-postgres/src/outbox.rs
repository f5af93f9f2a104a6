//! [`PgOutbox`]: the outbox as a Postgres table. Messages are inserted in the
//! caller's transaction, so they commit or roll back with the caller's writes.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::{
    ClaimRequest, Error, Message, Outbox, OutboxClaim, OutboxEntry, ParkedOutboxMessage,
    Transaction, Wake,
};
use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::row::{Columns, INSERT_COLUMNS, OutboxRow, RowValues, SELECT_COLUMNS, from_row};
use brighter_postgres::{Identifier, pg_connection, pg_error, render, run_migration};

const SCHEMA_SQL: &str = include_str!("../sql/outbox.sql");
/// Rows deleted or archived per statement during cleanup.
const CLEANUP_CHUNK: i64 = 10_000;

/// SQL text with the configured names filled in, built once.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) insert_one: String,
    pub(crate) insert_many: String,
    pub(crate) insert_one_keyed: String,
    pub(crate) insert_many_keyed: String,
    pub(crate) held_back: String,
    pub(crate) parked: String,
    pub(crate) parked_count: String,
    pub(crate) requeue_parked: String,
    pub(crate) get: String,
    pub(crate) outstanding: String,
    pub(crate) count: String,
    pub(crate) mark_dispatched: String,
    pub(crate) mark_failed: String,
    pub(crate) mark_failed_many: String,
    pub(crate) delete_dispatched: String,
    pub(crate) archive_dispatched: String,
    pub(crate) claim: String,
    pub(crate) key_positions: String,
    pub(crate) next_due: String,
    pub(crate) cancel_scheduled: String,
    pub(crate) take_to_send: String,
    pub(crate) release: String,
}

pub(crate) struct Tables {
    pub(crate) pool: PgPool,
    pub(crate) schema: Identifier,
    pub(crate) table: Identifier,
    /// NOTIFY channel: `schema.table`.
    pub(crate) channel: String,
    /// The text whose hash is the sweepers' advisory lock: held by a
    /// sweeper while every worker of it waits, which asks writers to NOTIFY.
    pub(crate) sweeper_lock: String,
    pub(crate) sql: Statements,
}

/// The transactional outbox in Postgres.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), brighter_core::Error> {
/// use brighter_outbox_postgres::PgOutbox;
///
/// let outbox = PgOutbox::builder(pool.clone()).schema("shop").table("outbox").build().await?;
/// // Then: CommandProcessor::builder().outbox(outbox.clone()) ..., and in a handler or service:
/// // let mut tx = pool.begin().await?;  ... business writes ...
/// // processor.deposit_post(&event, Some(&mut tx)).await?;
/// // tx.commit().await?;  processor.clear_outbox(&[id]).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgOutbox {
    pub(crate) tables: Arc<Tables>,
}

impl fmt::Debug for PgOutbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOutbox")
            .field("schema", &self.tables.schema.as_str())
            .field("table", &self.tables.table.as_str())
            .finish_non_exhaustive()
    }
}

/// Configures a [`PgOutbox`].
#[derive(Debug)]
#[must_use]
pub struct PgOutboxBuilder {
    pool: PgPool,
    schema: String,
    table: String,
    notify: bool,
    migrate: bool,
}

impl PgOutboxBuilder {
    /// The schema (default `brighter`).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The table (default `outbox`); `<table>_archive` holds archived rows.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Whether inserts NOTIFY sweepers (default on). Off saves a little per
    /// commit; sweepers then find new rows by polling.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Whether `build` creates or updates the schema (default on).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Validates the names, runs the migrations, and returns the outbox.
    pub async fn build(self) -> Result<PgOutbox, Error> {
        let schema = Identifier::new(&self.schema)?;
        // Room for the `_archive` / `_outstanding_idx` style suffixes.
        let table = Identifier::with_max_len(&self.table, Identifier::MAX_LEN - 16)?;
        let channel = format!("{schema}.{table}");
        if channel.len() > Identifier::MAX_LEN {
            return Err(Error::configuration(format!(
                "outbox schema and table names together must fit in {} bytes: '{channel}' does not",
                Identifier::MAX_LEN
            )));
        }
        let qualified = format!("{}.{}", schema.quoted(), table.quoted());
        let archive = format!(
            "{}.{}",
            schema.quoted(),
            table.suffixed("_archive")?.quoted()
        );
        let tables = Tables {
            sql: statements(&qualified, &archive, &channel),
            pool: self.pool,
            sweeper_lock: sweeper_lock(&channel),
            channel,
            schema,
            table,
        };
        if self.migrate {
            let sql = schema_sql(&tables, &qualified, &archive, self.notify)?;
            run_migration(&tables.pool, &sql).await?;
        }
        Ok(PgOutbox {
            tables: Arc::new(tables),
        })
    }
}

/// The migration script for these names (built before any await, so the
/// builder's future holds no borrowed names across it).
fn schema_sql(
    tables: &Tables,
    qualified: &str,
    archive: &str,
    notify: bool,
) -> Result<String, Error> {
    let table = &tables.table;
    let notify_fn = table.suffixed("_notify")?;
    let trigger = table.suffixed("_notify_trigger")?;
    let names = [
        ("schema", tables.schema.quoted()),
        ("table", table.quoted()),
        ("notify_fn", notify_fn.quoted()),
        (
            "outstanding_index",
            table.suffixed("_outstanding_idx")?.quoted(),
        ),
        ("key_index", table.suffixed("_key_idx")?.quoted()),
        (
            "dispatched_index",
            table.suffixed("_dispatched_idx")?.quoted(),
        ),
        ("due_index", table.suffixed("_due_idx")?.quoted()),
        ("channel", tables.channel.clone()),
        ("sweeper_lock", tables.sweeper_lock.clone()),
    ];
    let mut sql = render(SCHEMA_SQL, &names);
    sql.push_str(&format!(
        "\nCREATE TABLE IF NOT EXISTS {archive} (LIKE {qualified});\n\
         ALTER TABLE {archive} ADD COLUMN IF NOT EXISTS parked timestamptz;\n\
         ALTER TABLE {archive} ADD COLUMN IF NOT EXISTS due_at timestamptz;\n"
    ));
    if notify {
        // A deferred constraint trigger (announcing at commit), per row a
        // sweeper should hear of: not one leased to its writer. Made once:
        // replacing it on every start would lock the table each time.
        let regclass = format!("{}.{}", tables.schema.quoted(), table.quoted());
        sql.push_str(&format!(
            "DO $$ BEGIN\n\
             IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = '{regclass}'::regclass \
             AND tgname = '{trigger_name}' AND tgconstraint <> 0) THEN\n\
             DROP TRIGGER IF EXISTS {trigger} ON {qualified};\n\
             CREATE CONSTRAINT TRIGGER {trigger} AFTER INSERT ON {qualified} \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.leased_until IS NULL) \
             EXECUTE FUNCTION {schema}.{function}();\n\
             END IF;\n\
             END $$;\n",
            trigger_name = trigger.as_str(),
            trigger = trigger.quoted(),
            schema = tables.schema.quoted(),
            function = notify_fn.quoted(),
        ));
    } else {
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {} ON {qualified};\n",
            trigger.quoted()
        ));
    }
    Ok(sql)
}

fn statements(t: &str, archive: &str, lock_space: &str) -> Statements {
    let placeholders = (1..=14)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let unnest = format!(
        "UNNEST($1::uuid[], $2::text[], $3::text[], \
             $4::timestamptz[], $5::uuid[], $6::text[], $7::text[], $8::text[], $9::int4[], $10::int8[], \
             $11::jsonb[], $12::jsonb[], $13::jsonb[], $14::bytea[]) AS u({INSERT_COLUMNS})"
    );
    // A message with a delay is scheduled: due that long after its insert.
    let due = |delay: &str| {
        format!(
            "CASE WHEN {delay} > 0 THEN clock_timestamp() + {delay} * interval '1 millisecond' END"
        )
    };
    let due_one = due("$10::int8");
    let due_many = due("u.delay_ms");
    // A row its writer sends at once (a post) is leased to it for $15 ms.
    let lease =
        "CASE WHEN $15::int8 > 0 THEN clock_timestamp() + $15::int8 * interval '1 millisecond' END";
    // Whether a waiting row may be sent now: a scheduled one once due, any
    // other once `min_age` old, and none leased to its writer.
    let ready = "(CASE WHEN due_at IS NULL THEN created <= now() - $1 * interval '1 millisecond' \
                 ELSE due_at <= now() END) AND (leased_until IS NULL OR leased_until <= now())";
    // Whether row `o` counts in its key's order: not scheduled, or due.
    let counts = "(o.due_at IS NULL OR o.due_at <= now())";
    // A keyed insert first takes a transaction-scoped advisory lock per key
    // (in key order, so two writers cannot deadlock on one statement's keys):
    // writers of one key then commit in the order their rows are numbered,
    // and a row of a key never becomes visible after a later one.
    let lock = |source: &str| {
        format!(
            "(SELECT count(pg_advisory_xact_lock(hashtextextended('{lock_space}:' || k, 0))) \
             FROM (SELECT DISTINCT k FROM {source} WHERE k IS NOT NULL ORDER BY k) AS keys) AS locked"
        )
    };
    Statements {
        insert_one: format!(
            "INSERT INTO {t} ({INSERT_COLUMNS}, due_at, leased_until) VALUES ({placeholders}, {due_one}, {lease})"
        ),
        insert_many: format!(
            "INSERT INTO {t} ({INSERT_COLUMNS}, due_at, leased_until) SELECT u.*, {due_many}, {lease} FROM {unnest}"
        ),
        insert_one_keyed: format!(
            "INSERT INTO {t} ({INSERT_COLUMNS}, due_at, leased_until) SELECT {placeholders}, {due_one}, {lease} FROM {}",
            lock("(SELECT $8::text AS k) AS one")
        ),
        insert_many_keyed: format!(
            "INSERT INTO {t} ({INSERT_COLUMNS}, due_at, leased_until) SELECT u.*, {due_many}, {lease} FROM {}, {unnest}",
            lock("UNNEST($8::text[]) AS k")
        ),
        held_back: format!(
            "SELECT mine.message_id FROM {t} AS mine WHERE mine.message_id = ANY($1) \
             AND mine.partition_key IS NOT NULL AND EXISTS (SELECT 1 FROM {t} AS o \
             WHERE o.partition_key = mine.partition_key AND o.dispatched IS NULL AND o.parked IS NULL \
             AND {counts} AND o.position < mine.position AND NOT (o.message_id = ANY($1)))"
        ),
        parked: format!(
            "SELECT message_id, topic, attempts, last_error, parked FROM {t} \
             WHERE parked IS NOT NULL AND dispatched IS NULL ORDER BY position LIMIT $1"
        ),
        parked_count: format!(
            "SELECT count(*) FROM {t} WHERE parked IS NOT NULL AND dispatched IS NULL"
        ),
        requeue_parked: format!(
            "UPDATE {t} SET parked = NULL, attempts = 0 WHERE message_id = ANY($1) \
             AND parked IS NOT NULL AND dispatched IS NULL"
        ),
        get: format!(
            "SELECT {SELECT_COLUMNS} FROM {t} WHERE message_id = ANY($1) AND dispatched IS NULL \
             AND parked IS NULL AND due_at IS NULL ORDER BY position"
        ),
        outstanding: format!(
            "SELECT {SELECT_COLUMNS} FROM {t} WHERE dispatched IS NULL AND parked IS NULL \
             AND {ready} ORDER BY position LIMIT $2"
        ),
        count: format!(
            "SELECT count(*) FROM {t} AS o WHERE dispatched IS NULL AND parked IS NULL AND {counts}"
        ),
        // Marking rows dispatched does not wait for the WAL to reach the disk
        // (`synchronous_commit` off for its own transaction only, set once per
        // statement): a mark lost to a database crash is a resend, which the
        // outbox already allows (at least once, the inbox drops the copy),
        // and a post then pays one flush, its deposit's, not two.
        mark_dispatched: format!(
            "UPDATE {t} SET dispatched = $2 WHERE message_id = ANY($1) AND dispatched IS NULL \
             AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'"
        ),
        mark_failed: format!(
            "UPDATE {t} SET attempts = attempts + 1, last_error = $2, leased_until = NULL WHERE message_id = $1"
        ),
        mark_failed_many: format!(
            "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = f.err, leased_until = NULL, \
             parked = CASE WHEN f.park THEN coalesce(o.parked, clock_timestamp()) ELSE o.parked END \
             FROM UNNEST($1::uuid[], $2::text[], $3::bool[]) AS f(id, err, park) WHERE o.message_id = f.id"
        ),
        delete_dispatched: format!(
            "DELETE FROM {t} WHERE position IN (SELECT position FROM {t} WHERE dispatched IS NOT NULL \
             AND dispatched <= now() - $1 * interval '1 millisecond' ORDER BY position LIMIT $2)"
        ),
        archive_dispatched: format!(
            "WITH moved AS (DELETE FROM {t} WHERE position IN (SELECT position FROM {t} \
             WHERE dispatched IS NOT NULL AND dispatched <= now() - $1 * interval '1 millisecond' \
             ORDER BY position LIMIT $2) RETURNING *) INSERT INTO {archive} SELECT * FROM moved"
        ),
        claim: format!(
            "SELECT {SELECT_COLUMNS} FROM {t} WHERE dispatched IS NULL AND parked IS NULL \
             AND {ready} AND NOT (topic = ANY($3)) \
             ORDER BY position LIMIT $2 FOR UPDATE SKIP LOCKED"
        ),
        key_positions: format!(
            "SELECT k.key, o.position FROM UNNEST($1::text[], $2::int8[]) AS k(key, last_position) \
             JOIN {t} AS o ON o.partition_key = k.key AND o.dispatched IS NULL AND o.parked IS NULL \
             AND {counts} AND o.position <= k.last_position \
             ORDER BY k.key, o.position"
        ),
        next_due: format!(
            "SELECT min(due_at) FROM {t} WHERE dispatched IS NULL AND parked IS NULL AND due_at IS NOT NULL"
        ),
        cancel_scheduled: format!(
            "DELETE FROM {t} WHERE message_id = $1 AND dispatched IS NULL AND due_at IS NOT NULL"
        ),
        // Rows a sweep holds are skipped (the sweep sends them); the rest
        // are leased to the caller, so no later claim returns them.
        take_to_send: format!(
            "UPDATE {t} SET leased_until = clock_timestamp() + $2 * interval '1 millisecond' \
             WHERE position IN (SELECT position FROM {t} WHERE message_id = ANY($1) \
             AND dispatched IS NULL AND parked IS NULL AND due_at IS NULL \
             AND (leased_until IS NULL OR leased_until <= now()) FOR UPDATE SKIP LOCKED) \
             RETURNING {SELECT_COLUMNS}"
        ),
        release: format!(
            "UPDATE {t} SET leased_until = NULL WHERE message_id = ANY($1) AND leased_until IS NOT NULL"
        ),
    }
}

/// The text whose 64-bit hash is the sweepers' advisory lock of the outbox
/// announcing on `channel`.
fn sweeper_lock(channel: &str) -> String {
    format!("{channel}#sweepers")
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn store(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| pg_error(context, e)
}

impl PgOutbox {
    /// Starts configuring an outbox on `pool`.
    pub fn builder(pool: PgPool) -> PgOutboxBuilder {
        PgOutboxBuilder {
            pool,
            schema: "brighter".into(),
            table: "outbox".into(),
            notify: true,
            migrate: true,
        }
    }

    /// The pool the outbox uses outside callers' transactions.
    pub fn pool(&self) -> &PgPool {
        &self.tables.pool
    }

    /// The NOTIFY channel new rows are announced on.
    pub fn channel(&self) -> &str {
        &self.tables.channel
    }

    /// Inserts `messages` through any executor (a pool, a connection, a
    /// transaction), so the insert joins whatever the caller is doing. One
    /// function: the one-row and the many-row statements bind the same columns.
    pub async fn insert<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        messages: &[Message],
    ) -> Result<(), Error> {
        self.insert_leased(executor, messages, Duration::ZERO).await
    }

    /// [`insert`](Self::insert), the rows leased to the writer for `lease`
    /// (none when zero).
    async fn insert_leased<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        messages: &[Message],
        lease: Duration,
    ) -> Result<(), Error> {
        let lease = millis(lease);
        let result = match messages {
            [] => return Ok(()),
            [one] => {
                let r = RowValues::from_message(one)?;
                let sql = if r.partition_key.is_some() {
                    &self.tables.sql.insert_one_keyed
                } else {
                    &self.tables.sql.insert_one
                };
                sqlx::query(sql)
                    .bind(r.id)
                    .bind(r.topic)
                    .bind(r.message_type)
                    .bind(r.timestamp)
                    .bind(r.correlation_id)
                    .bind(r.reply_to)
                    .bind(r.content_type)
                    .bind(r.partition_key)
                    .bind(r.handled_count)
                    .bind(r.delay_ms)
                    .bind(r.bag)
                    .bind(r.cloud_events)
                    .bind(r.trace)
                    .bind(r.body)
                    .bind(lease)
                    .execute(executor)
                    .await
            }
            many => {
                let c = Columns::from_messages(many)?;
                let sql = if c.partition_keys.iter().any(Option::is_some) {
                    &self.tables.sql.insert_many_keyed
                } else {
                    &self.tables.sql.insert_many
                };
                sqlx::query(sql)
                    .bind(c.ids)
                    .bind(c.topics)
                    .bind(c.types)
                    .bind(c.timestamps)
                    .bind(c.correlation_ids)
                    .bind(c.reply_tos)
                    .bind(c.content_types)
                    .bind(c.partition_keys)
                    .bind(c.handled_counts)
                    .bind(c.delays)
                    .bind(c.bags)
                    .bind(c.cloud_events)
                    .bind(c.traces)
                    .bind(c.bodies)
                    .bind(lease)
                    .execute(executor)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_database_error()
                    .is_some_and(|d| d.is_unique_violation()) =>
            {
                Err(Error::Duplicate {
                    id: messages[0].id(),
                    context_key: "outbox".into(),
                })
            }
            Err(e) => Err(pg_error("insert into the outbox", e)),
        }
    }

    pub(crate) async fn select(
        &self,
        sql: &str,
        bind: impl FnOnce(
            sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
        ) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<OutboxRow>, Error> {
        let rows = bind(sqlx::query(sql))
            .fetch_all(&self.tables.pool)
            .await
            .map_err(store("read the outbox"))?;
        rows.iter()
            .map(|row| from_row(row).map_err(store("decode an outbox row")))
            .collect()
    }

    /// Moves rows dispatched more than `older_than` ago to `<table>_archive`;
    /// returns how many.
    pub async fn archive_dispatched(&self, older_than: Duration) -> Result<u64, Error> {
        self.cleanup(&self.tables.sql.archive_dispatched, older_than)
            .await
    }

    async fn cleanup(&self, sql: &str, older_than: Duration) -> Result<u64, Error> {
        let mut total = 0;
        loop {
            let done = sqlx::query(sql)
                .bind(millis(older_than))
                .bind(CLEANUP_CHUNK)
                .execute(&self.tables.pool)
                .await
                .map_err(store("clean up dispatched outbox rows"))?
                .rows_affected();
            total += done;
            if done < u64::try_from(CLEANUP_CHUNK).unwrap_or(u64::MAX) {
                return Ok(total);
            }
        }
    }
}

#[async_trait]
impl Outbox for PgOutbox {
    async fn add(
        &self,
        messages: &[Message],
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        match tx {
            None => self.insert(&self.tables.pool, messages).await,
            Some(tx) => {
                let conn = pg_connection(tx, "the Postgres outbox")?;
                self.insert(conn, messages).await
            }
        }
    }

    async fn get(&self, ids: &[Uuid]) -> Result<Vec<Message>, Error> {
        let rows = self
            .select(&self.tables.sql.get, |q| q.bind(ids.to_vec()))
            .await?;
        Ok(rows.into_iter().map(|r| r.message).collect())
    }

    fn leases(&self) -> bool {
        true
    }

    async fn add_to_send(&self, messages: &[Message], lease: Duration) -> Result<(), Error> {
        self.insert_leased(
            &self.tables.pool,
            messages,
            lease.max(Duration::from_millis(1)),
        )
        .await
    }

    async fn take_to_send(&self, ids: &[Uuid], lease: Duration) -> Result<Vec<Message>, Error> {
        let mut rows = self
            .select(&self.tables.sql.take_to_send, |q| {
                q.bind(ids.to_vec())
                    .bind(millis(lease.max(Duration::from_millis(1))))
            })
            .await?;
        rows.sort_by_key(|row| row.position);
        Ok(rows.into_iter().map(|r| r.message).collect())
    }

    async fn release(&self, ids: &[Uuid]) -> Result<(), Error> {
        sqlx::query(&self.tables.sql.release)
            .bind(ids.to_vec())
            .execute(&self.tables.pool)
            .await
            .map_err(store("release leased outbox rows"))?;
        Ok(())
    }

    async fn held_back(&self, messages: &[Message]) -> Result<HashSet<Uuid>, Error> {
        if messages.iter().all(|m| m.header.partition_key.is_none()) {
            return Ok(HashSet::new());
        }
        let ids: Vec<Uuid> = messages.iter().map(Message::id).collect();
        let held: Vec<Uuid> = sqlx::query_scalar(&self.tables.sql.held_back)
            .bind(ids)
            .fetch_all(&self.tables.pool)
            .await
            .map_err(store("read partition key order"))?;
        Ok(held.into_iter().collect())
    }

    async fn parked(&self, limit: usize) -> Result<Vec<ParkedOutboxMessage>, Error> {
        let rows: Vec<(Uuid, String, i32, Option<String>, DateTime<Utc>)> =
            sqlx::query_as(&self.tables.sql.parked)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.tables.pool)
                .await
                .map_err(store("read parked outbox rows"))?;
        Ok(rows
            .into_iter()
            .map(
                |(id, topic, attempts, last_error, parked)| ParkedOutboxMessage {
                    id,
                    topic,
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    last_error,
                    parked,
                },
            )
            .collect())
    }

    async fn parked_count(&self) -> Result<u64, Error> {
        let count: i64 = sqlx::query_scalar(&self.tables.sql.parked_count)
            .fetch_one(&self.tables.pool)
            .await
            .map_err(store("count parked outbox rows"))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn requeue_parked(&self, ids: &[Uuid]) -> Result<u64, Error> {
        Ok(sqlx::query(&self.tables.sql.requeue_parked)
            .bind(ids.to_vec())
            .execute(&self.tables.pool)
            .await
            .map_err(store("requeue parked outbox rows"))?
            .rows_affected())
    }

    async fn outstanding(&self, older_than: Duration, limit: usize) -> Result<Vec<Message>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .select(&self.tables.sql.outstanding, |q| {
                q.bind(millis(older_than)).bind(limit)
            })
            .await?;
        Ok(rows.into_iter().map(|r| r.message).collect())
    }

    async fn outstanding_count(&self) -> Result<u64, Error> {
        let count: i64 = sqlx::query_scalar(&self.tables.sql.count)
            .fetch_one(&self.tables.pool)
            .await
            .map_err(store("count outstanding outbox rows"))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, Error> {
        sqlx::query_scalar(&self.tables.sql.next_due)
            .fetch_one(&self.tables.pool)
            .await
            .map_err(store("read the next due time"))
    }

    async fn cancel_scheduled(&self, id: Uuid) -> Result<bool, Error> {
        // A sweeper sending the row holds its lock: the delete waits for the
        // sweep to end, and then finds it dispatched (or still there, when the
        // send failed).
        Ok(sqlx::query(&self.tables.sql.cancel_scheduled)
            .bind(id)
            .execute(&self.tables.pool)
            .await
            .map_err(store("cancel a scheduled outbox row"))?
            .rows_affected()
            == 1)
    }

    async fn mark_dispatched(&self, ids: &[Uuid], at: DateTime<Utc>) -> Result<(), Error> {
        sqlx::query(&self.tables.sql.mark_dispatched)
            .bind(ids.to_vec())
            .bind(at)
            .execute(&self.tables.pool)
            .await
            .map_err(store("mark outbox rows dispatched"))?;
        Ok(())
    }

    async fn mark_failed(&self, id: Uuid, error: &str) -> Result<(), Error> {
        sqlx::query(&self.tables.sql.mark_failed)
            .bind(id)
            .bind(error)
            .execute(&self.tables.pool)
            .await
            .map_err(store("record an outbox send failure"))?;
        Ok(())
    }

    async fn delete_dispatched(&self, older_than: Duration) -> Result<u64, Error> {
        self.cleanup(&self.tables.sql.delete_dispatched, older_than)
            .await
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Box<dyn OutboxClaim>, Error> {
        self.claim_rows(request).await
    }

    async fn watch(&self, wake: Wake, shutdown: CancellationToken) -> Result<(), Error> {
        self.watch_notifications(wake, shutdown).await
    }

    async fn oldest_outstanding(&self) -> Result<Option<DateTime<Utc>>, Error> {
        self.oldest().await
    }

    async fn by_correlation(&self, correlation_id: Uuid) -> Result<Vec<OutboxEntry>, Error> {
        self.conversation(correlation_id).await
    }

    async fn archive_dispatched(&self, older_than: Duration) -> Result<u64, Error> {
        PgOutbox::archive_dispatched(self, older_than).await
    }
}
