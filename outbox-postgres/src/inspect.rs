//! Looking into the outbox: its rows with their state (for operators and the
//! `brighter` command line), counts per state and topic, how far behind it
//! is, and every message of one conversation.

use brighter_core::{Error, OutboxEntry};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::outbox::{PgOutbox, store};
use crate::row::{SELECT_COLUMNS, from_row};

/// Which rows [`PgOutbox::entries`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryState {
    /// Every row.
    #[default]
    All,
    /// Waiting to be sent (not scheduled for later, not parked).
    Outstanding,
    /// Scheduled and not due yet.
    Scheduled,
    /// Parked after failing to send too often.
    Parked,
    /// Sent and confirmed.
    Dispatched,
}

impl EntryState {
    /// The state named `name` (`all`, `outstanding`, `scheduled`, `parked`,
    /// `dispatched`).
    pub fn parse(name: &str) -> Option<EntryState> {
        Some(match name {
            "all" => EntryState::All,
            "outstanding" => EntryState::Outstanding,
            "scheduled" => EntryState::Scheduled,
            "parked" => EntryState::Parked,
            "dispatched" => EntryState::Dispatched,
            _ => return None,
        })
    }

    fn condition(self) -> &'static str {
        match self {
            EntryState::All => "TRUE",
            EntryState::Outstanding => {
                "dispatched IS NULL AND parked IS NULL AND (due_at IS NULL OR due_at <= now())"
            }
            EntryState::Scheduled => "dispatched IS NULL AND parked IS NULL AND due_at > now()",
            EntryState::Parked => "dispatched IS NULL AND parked IS NOT NULL",
            EntryState::Dispatched => "dispatched IS NOT NULL",
        }
    }
}

/// Counts of one topic's rows, by state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicCounts {
    /// The topic.
    pub topic: String,
    /// Waiting to be sent.
    pub outstanding: i64,
    /// Scheduled and not due yet.
    pub scheduled: i64,
    /// Parked.
    pub parked: i64,
    /// Sent (until retention removes them).
    pub dispatched: i64,
}

/// What the outbox holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// All topics together.
    pub total: TopicCounts,
    /// When the oldest outstanding row was added (or fell due).
    pub oldest_outstanding: Option<DateTime<Utc>>,
    /// Per topic, by name.
    pub topics: Vec<TopicCounts>,
}

/// The columns of an entry: the message's, then its bookkeeping.
fn entry_columns() -> String {
    format!("{SELECT_COLUMNS}, created, dispatched, last_error, parked, due_at, leased_until")
}

fn entry(row: &PgRow) -> Result<OutboxEntry, sqlx::Error> {
    let read = from_row(row)?;
    Ok(OutboxEntry {
        message: read.message,
        created: row.try_get(16)?,
        dispatched: row.try_get(17)?,
        attempts: read.attempts,
        last_error: row.try_get(18)?,
        parked: row.try_get(19)?,
        due: row.try_get(20)?,
        leased_until: row.try_get(21)?,
    })
}

impl PgOutbox {
    fn qualified(&self) -> String {
        format!(
            "{}.{}",
            self.tables.schema.quoted(),
            self.tables.table.quoted()
        )
    }

    /// The query of the entries that meet `condition`, in `order`.
    fn select_entries(&self, condition: &str, order: &str) -> String {
        format!(
            "SELECT {} FROM {} WHERE {condition} ORDER BY {order}",
            entry_columns(),
            self.qualified()
        )
    }

    async fn fetch_entries(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<OutboxEntry>, Error> {
        let rows = query
            .fetch_all(self.pool())
            .await
            .map_err(store("read outbox rows"))?;
        rows.iter()
            .map(entry)
            .collect::<Result<_, _>>()
            .map_err(store("read an outbox row"))
    }

    /// Up to `limit` rows in `state` (of `topic`, when given), oldest first.
    pub async fn entries(
        &self,
        state: EntryState,
        topic: Option<&str>,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let condition = format!("{} AND ($1::text IS NULL OR topic = $1)", state.condition());
        let sql = self.select_entries(&condition, "position LIMIT $2");
        self.fetch_entries(sqlx::query(&sql).bind(topic).bind(limit))
            .await
    }

    /// The row of message `id`, whatever its state.
    pub async fn entry(&self, id: Uuid) -> Result<Option<OutboxEntry>, Error> {
        let sql = self.select_entries("message_id = $1", "position");
        Ok(self.fetch_entries(sqlx::query(&sql).bind(id)).await?.pop())
    }

    /// Every row of conversation `correlation_id`, in the order added (a scan
    /// of the table: for operators, not for a hot path).
    pub(crate) async fn conversation(
        &self,
        correlation_id: Uuid,
    ) -> Result<Vec<OutboxEntry>, Error> {
        let sql = self.select_entries("correlation_id = $1", "position");
        self.fetch_entries(sqlx::query(&sql).bind(correlation_id))
            .await
    }

    /// When the oldest outstanding row was added (or, scheduled, fell due).
    pub(crate) async fn oldest(&self) -> Result<Option<DateTime<Utc>>, Error> {
        sqlx::query_scalar(&format!(
            "SELECT min(greatest(created, coalesce(due_at, created))) FROM {} WHERE {}",
            self.qualified(),
            EntryState::Outstanding.condition()
        ))
        .fetch_one(self.pool())
        .await
        .map_err(store("read the oldest outstanding row"))
    }

    /// Counts by state, in all and per topic, and how far behind it is.
    pub async fn stats(&self) -> Result<OutboxStats, Error> {
        let sql = format!(
            "SELECT topic, \
             count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}), \
             count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}) \
             FROM {} GROUP BY topic ORDER BY topic",
            EntryState::Outstanding.condition(),
            EntryState::Scheduled.condition(),
            EntryState::Parked.condition(),
            EntryState::Dispatched.condition(),
            self.qualified()
        );
        let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(store("count outbox rows"))?;
        let mut stats = OutboxStats {
            total: TopicCounts {
                topic: "(all)".into(),
                ..TopicCounts::default()
            },
            oldest_outstanding: self.oldest().await?,
            topics: Vec::new(),
        };
        for (topic, outstanding, scheduled, parked, dispatched) in rows {
            stats.total.outstanding += outstanding;
            stats.total.scheduled += scheduled;
            stats.total.parked += parked;
            stats.total.dispatched += dispatched;
            stats.topics.push(TopicCounts {
                topic,
                outstanding,
                scheduled,
                parked,
                dispatched,
            });
        }
        Ok(stats)
    }
}
