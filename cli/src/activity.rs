//! `brighter activity`: one conversation across services' outboxes and
//! inboxes.

use brighter::postgres::{PgInbox, PgOutbox};
use brighter::uuid::Uuid;
use brighter::{Activity, Direction, Inbox, Outbox, Whereabouts};
use serde_json::json;

use crate::Res;
use crate::report::{Report, short, time};

/// What a step's whereabouts say, for a table.
fn whereabouts(step: &brighter::ActivityStep) -> String {
    match &step.whereabouts {
        Whereabouts::Outstanding { last_error, .. } => match last_error {
            Some(error) => format!("outstanding (last error: {})", short(error, 60)),
            None => "outstanding".into(),
        },
        Whereabouts::Scheduled { due } => format!("scheduled for {}", time(Some(*due))),
        Whereabouts::Parked { last_error } => {
            format!(
                "parked ({})",
                short(last_error.as_deref().unwrap_or(""), 60)
            )
        }
        Whereabouts::Dispatched { .. } if step.handled_by.is_empty() => {
            "dispatched; not handled by a service asked".into()
        }
        Whereabouts::Dispatched { .. } => {
            format!("dispatched; handled by {}", step.handled_by.join(", "))
        }
        Whereabouts::Handled => format!("handled ({})", step.handled_by.join(", ")),
    }
}

pub(crate) async fn run(
    correlation_id: Uuid,
    services: &[String],
    outbox_table: &str,
    inbox_table: &str,
) -> Res<Report> {
    let pool = crate::outbox::pool().await?;
    let mut stores: Vec<(String, PgOutbox, PgInbox)> = Vec::new();
    for service in services {
        let (name, schema) = service
            .split_once('=')
            .ok_or_else(|| format!("--service {service}: use NAME=SCHEMA"))?;
        let outbox = PgOutbox::builder(pool.clone())
            .schema(schema)
            .table(outbox_table)
            .migrate(false)
            .build()
            .await?;
        let inbox = PgInbox::builder(pool.clone())
            .schema(schema)
            .table(inbox_table)
            .migrate(false)
            .build()
            .await?;
        stores.push((name.to_owned(), outbox, inbox));
    }
    let asked: Vec<(&str, &dyn Outbox, &dyn Inbox)> = stores
        .iter()
        .map(|(name, outbox, inbox)| (name.as_str(), outbox as &dyn Outbox, inbox as &dyn Inbox))
        .collect();
    let activity = Activity::rebuild(correlation_id, &asked).await?;
    let rows = activity
        .steps
        .iter()
        .map(|s| {
            vec![
                time(Some(s.at)),
                s.service.clone(),
                match s.direction {
                    Direction::Sent => "sent".into(),
                    Direction::Received => "received".into(),
                },
                s.message.clone(),
                s.topic.clone().unwrap_or_default(),
                s.message_id.to_string(),
                whereabouts(s),
            ]
        })
        .collect();
    let mut report = Report::line(
        format!(
            "conversation {correlation_id}: {} step(s) across {}",
            activity.steps.len(),
            stores
                .iter()
                .map(|(name, ..)| name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        json!(activity),
    );
    report = report.table(
        "",
        &["at", "service", "", "message", "topic", "id", "where it is"],
        rows,
    );
    report.after.push(format!("stopped: {}", activity.stopped));
    for open in activity.open.iter().skip(1) {
        report.after.push(format!("also open: {open}"));
    }
    Ok(report)
}
