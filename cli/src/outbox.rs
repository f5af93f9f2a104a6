//! `brighter outbox`: a service's Postgres outbox.

use brighter::postgres::{EntryState, PgOutbox};
use brighter::sqlx::PgPool;
use brighter::sqlx::postgres::PgPoolOptions;
use brighter::{Outbox, OutboxEntry};
use chrono::Utc;
use serde_json::{Value, json};

use crate::report::{Report, age, event_type, short, time};
use crate::{OutboxAction, Res};

/// A pool on `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
pub(crate) async fn pool() -> Res<PgPool> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(3))
        .connect(&url)
        .await
        .map_err(|e| format!("connect to Postgres (DATABASE_URL): {e}").into())
}

/// The outbox in `schema`.`table`, as it is: no migration.
async fn outbox(schema: &str, table: &str) -> Res<PgOutbox> {
    Ok(PgOutbox::builder(pool().await?)
        .schema(schema)
        .table(table)
        .migrate(false)
        .build()
        .await?)
}

/// An entry's state, as the tables show it.
pub(crate) fn state(entry: &OutboxEntry) -> &'static str {
    if entry.dispatched.is_some() {
        "dispatched"
    } else if entry.parked.is_some() {
        "parked"
    } else if entry.due.is_some_and(|due| due > Utc::now()) {
        "scheduled"
    } else {
        "outstanding"
    }
}

fn entry_json(entry: &OutboxEntry, full: bool) -> Value {
    let h = &entry.message.header;
    let mut value = json!({
        "id": h.id,
        "topic": h.topic,
        "type": h.cloud_events.kind,
        "message_type": h.message_type.as_str(),
        "correlation_id": h.correlation_id,
        "partition_key": h.partition_key,
        "state": state(entry),
        "created": entry.created,
        "due": entry.due,
        "dispatched": entry.dispatched,
        "parked": entry.parked,
        "attempts": entry.attempts,
        "last_error": entry.last_error,
    });
    if full {
        value["header"] = serde_json::to_value(h).unwrap_or(Value::Null);
        value["body"] = json!(String::from_utf8_lossy(&entry.message.body));
    }
    value
}

fn entry_row(entry: &OutboxEntry) -> Vec<String> {
    let h = &entry.message.header;
    vec![
        h.id.to_string(),
        h.topic.to_string(),
        event_type(h),
        state(entry).to_owned(),
        time(Some(entry.created)),
        entry.attempts.to_string(),
        short(entry.last_error.as_deref().unwrap_or(""), 60),
    ]
}

const ENTRY_HEADER: [&str; 7] = [
    "id",
    "topic",
    "type",
    "state",
    "created",
    "attempts",
    "last error",
];

pub(crate) async fn run(schema: &str, table: &str, action: OutboxAction) -> Res<Report> {
    let outbox = outbox(schema, table).await?;
    let name = format!("{schema}.{table}");
    Ok(match action {
        OutboxAction::Stats => {
            let stats = outbox.stats().await?;
            let oldest = stats.oldest_outstanding.map(age);
            let rows = std::iter::once(&stats.total)
                .chain(&stats.topics)
                .map(|t| {
                    vec![
                        t.topic.to_string(),
                        t.outstanding.to_string(),
                        t.scheduled.to_string(),
                        t.parked.to_string(),
                        t.dispatched.to_string(),
                    ]
                })
                .collect();
            let t = &stats.total;
            Report::line(
                format!(
                    "outbox {name}: {} outstanding (oldest {}), {} scheduled, {} parked, {} dispatched",
                    t.outstanding,
                    oldest.as_deref().unwrap_or("-"),
                    t.scheduled,
                    t.parked,
                    t.dispatched
                ),
                json!({
                    "outbox": name,
                    "outstanding": t.outstanding,
                    "scheduled": t.scheduled,
                    "parked": t.parked,
                    "dispatched": t.dispatched,
                    "oldest_outstanding": stats.oldest_outstanding,
                    "oldest_outstanding_age_seconds": stats.oldest_outstanding.map(|at| (Utc::now() - at).num_seconds()),
                    "topics": stats.topics.iter().map(|t| json!({
                        "topic": t.topic, "outstanding": t.outstanding, "scheduled": t.scheduled,
                        "parked": t.parked, "dispatched": t.dispatched,
                    })).collect::<Vec<_>>(),
                }),
            )
            .table("", &["topic", "outstanding", "scheduled", "parked", "dispatched"], rows)
        }
        OutboxAction::List {
            state,
            topic,
            limit,
        } => {
            let filter = EntryState::parse(&state).ok_or_else(|| {
                format!("--state {state}: use all, outstanding, scheduled, parked or dispatched")
            })?;
            let entries = outbox.entries(filter, topic.as_deref(), limit).await?;
            Report::line(
                format!("outbox {name}: {} message(s) ({state})", entries.len()),
                json!(
                    entries
                        .iter()
                        .map(|e| entry_json(e, false))
                        .collect::<Vec<_>>()
                ),
            )
            .table("", &ENTRY_HEADER, entries.iter().map(entry_row).collect())
        }
        OutboxAction::Show { id } => {
            let entry = outbox
                .entry(id)
                .await?
                .ok_or_else(|| format!("no message {id} in outbox {name}"))?;
            let h = &entry.message.header;
            let mut rows = vec![
                vec!["state".into(), state(&entry).into()],
                vec!["topic".into(), h.topic.to_string()],
                vec!["message type".into(), h.message_type.as_str().into()],
                vec!["type".into(), event_type(h)],
                vec!["correlation id".into(), h.correlation_id.to_string()],
                vec![
                    "partition key".into(),
                    h.partition_key.clone().unwrap_or_default(),
                ],
                vec!["created".into(), time(Some(entry.created))],
                vec!["due".into(), time(entry.due)],
                vec!["dispatched".into(), time(entry.dispatched)],
                vec!["parked".into(), time(entry.parked)],
                vec!["attempts".into(), entry.attempts.to_string()],
                vec![
                    "last error".into(),
                    entry.last_error.clone().unwrap_or_default(),
                ],
                vec![
                    "trace".into(),
                    h.trace.traceparent.clone().unwrap_or_default(),
                ],
            ];
            for (key, value) in &h.bag {
                rows.push(vec![format!("header {key}"), value.clone()]);
            }
            rows.push(vec![
                "body".into(),
                short(&String::from_utf8_lossy(&entry.message.body), 2000),
            ]);
            Report::line(
                format!("message {id} in outbox {name}"),
                entry_json(&entry, true),
            )
            .table("", &["field", "value"], rows)
        }
        OutboxAction::Parked { limit } => {
            let entries = outbox.entries(EntryState::Parked, None, limit).await?;
            Report::line(
                format!(
                    "outbox {name}: {} parked message(s); `brighter outbox requeue ID...` puts them back in line",
                    entries.len()
                ),
                json!(entries.iter().map(|e| entry_json(e, false)).collect::<Vec<_>>()),
            )
            .table(
                "",
                &["id", "topic", "type", "parked", "attempts", "last error"],
                entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.message.id().to_string(),
                            e.message.header.topic.to_string(),
                            event_type(&e.message.header),
                            time(e.parked),
                            e.attempts.to_string(),
                            short(e.last_error.as_deref().unwrap_or(""), 80),
                        ]
                    })
                    .collect(),
            )
        }
        OutboxAction::Requeue { ids } => {
            let requeued = outbox.requeue_parked(&ids).await?;
            Report::line(
                format!(
                    "requeued {requeued} of {} message(s) in outbox {name}: a sweeper sends them next",
                    ids.len()
                ),
                json!({ "requeued": requeued, "asked": ids.len() }),
            )
        }
        OutboxAction::PurgeDispatched { older_than } => {
            let deleted = Outbox::delete_dispatched(&outbox, older_than).await?;
            Report::line(
                format!(
                    "deleted {deleted} message(s) dispatched more than {} ago from outbox {name}",
                    humantime::format_duration(older_than)
                ),
                json!({ "deleted": deleted }),
            )
        }
    })
}
