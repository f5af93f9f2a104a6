//! The activity of one conversation, rebuilt from the outboxes and inboxes
//! of the services it crossed: every message each service sent (with where
//! it is now: outstanding, scheduled, parked, dispatched, and which service
//! handled it) and received, in order, and where the conversation stopped.
//!
//! ```
//! # use std::sync::Arc;
//! # use brighter_core::{Activity, InMemoryInbox, InMemoryOutbox, Inbox, InboxEntry, Outbox, Message, MessageHeader, MessageType};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let conversation = uuid::Uuid::now_v7();
//! let (orders_outbox, payments_inbox) = (InMemoryOutbox::new(), InMemoryInbox::new());
//! let mut take = Message::new(MessageHeader::new("payments.take", MessageType::Command), "{}");
//! take.header.correlation_id = conversation;
//! orders_outbox.add(&[take.clone()], None).await.unwrap();
//! let activity = Activity::rebuild(
//!     conversation,
//!     &[
//!         ("orders", &orders_outbox as &dyn Outbox, &InMemoryInbox::new() as &dyn Inbox),
//!         ("payments", &InMemoryOutbox::new(), &payments_inbox),
//!     ],
//! )
//! .await
//! .unwrap();
//! assert_eq!(activity.steps.len(), 1);
//! assert!(activity.stopped.contains("not sent yet"), "{}", activity.stopped);
//! # });
//! ```

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::error::Error;
use crate::memory::OutboxEntry;
use crate::store::{Inbox, InboxEntry, Outbox};

/// Sent or received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The service put it in its outbox.
    Sent,
    /// The service's inbox recorded it as handled.
    Received,
}

/// Where a sent message is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Whereabouts {
    /// In the outbox, not sent yet.
    Outstanding {
        /// Failed attempts so far.
        attempts: u32,
        /// The last failure.
        last_error: Option<String>,
    },
    /// In the outbox, due later.
    Scheduled {
        /// When it is due.
        due: DateTime<Utc>,
    },
    /// Parked in the outbox after failing to send too often.
    Parked {
        /// The last failure.
        last_error: Option<String>,
    },
    /// Sent and confirmed by the broker.
    Dispatched {
        /// When.
        at: DateTime<Utc>,
    },
    /// Recorded as handled.
    Handled,
}

/// One step of a conversation: a message one service sent or received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivityStep {
    /// When: added to the outbox, or handled.
    pub at: DateTime<Utc>,
    /// The service whose stores recorded it.
    pub service: String,
    /// Sent or received.
    pub direction: Direction,
    /// The message id.
    pub message_id: Uuid,
    /// What it is: the request type (or CloudEvents type).
    pub message: String,
    /// Its topic, when known.
    pub topic: Option<String>,
    /// Sent: where it is now; received: handled.
    pub whereabouts: Whereabouts,
    /// Sent: the services (and handler contexts) that handled it;
    /// received: the handler context.
    pub handled_by: Vec<String>,
}

/// A conversation as the services' stores remember it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Activity {
    /// The conversation.
    pub correlation_id: Uuid,
    /// Every step, in time order.
    pub steps: Vec<ActivityStep>,
    /// What is still open, the most telling first: messages parked, sent
    /// and handled by none of the services asked, not sent, scheduled.
    pub open: Vec<String>,
    /// Where it stopped, in a sentence: the first open end, or that it is
    /// complete.
    pub stopped: String,
}

fn sent_step(service: &str, entry: &OutboxEntry, now: DateTime<Utc>) -> ActivityStep {
    let header = &entry.message.header;
    let whereabouts = if let Some(at) = entry.dispatched {
        Whereabouts::Dispatched { at }
    } else if entry.parked.is_some() {
        Whereabouts::Parked {
            last_error: entry.last_error.clone(),
        }
    } else if let Some(due) = entry.due.filter(|due| *due > now) {
        Whereabouts::Scheduled { due }
    } else {
        Whereabouts::Outstanding {
            attempts: entry.attempts,
            last_error: entry.last_error.clone(),
        }
    };
    ActivityStep {
        at: entry.created,
        service: service.to_owned(),
        direction: Direction::Sent,
        message_id: header.id,
        message: header
            .cloud_events
            .kind
            .as_ref()
            .unwrap_or(&header.topic)
            .to_string(),
        topic: Some(header.topic.to_string()),
        whereabouts,
        handled_by: Vec::new(),
    }
}

fn received_step(service: &str, entry: &InboxEntry) -> ActivityStep {
    ActivityStep {
        at: entry.handled_at.unwrap_or(DateTime::<Utc>::MIN_UTC),
        service: service.to_owned(),
        direction: Direction::Received,
        message_id: entry.id,
        message: entry
            .request_type
            .clone()
            .unwrap_or_else(|| "(unknown type)".into()),
        topic: entry.topic.clone(),
        whereabouts: Whereabouts::Handled,
        handled_by: vec![entry.context_key.clone()],
    }
}

impl Activity {
    /// Rebuilds conversation `correlation_id` from each named service's
    /// outbox and inbox.
    pub async fn rebuild(
        correlation_id: Uuid,
        services: &[(&str, &dyn Outbox, &dyn Inbox)],
    ) -> Result<Activity, Error> {
        let now = Utc::now();
        let mut steps = Vec::new();
        for (service, outbox, inbox) in services {
            for entry in outbox.by_correlation(correlation_id).await? {
                steps.push(sent_step(service, &entry, now));
            }
            for entry in inbox.by_correlation(correlation_id).await? {
                steps.push(received_step(service, &entry));
            }
        }
        steps.sort_by(|a, b| {
            (a.at, a.direction == Direction::Received, a.message_id).cmp(&(
                b.at,
                b.direction == Direction::Received,
                b.message_id,
            ))
        });
        let received: Vec<(Uuid, String)> = steps
            .iter()
            .filter(|s| s.direction == Direction::Received)
            .map(|s| {
                let context = s.handled_by.first().cloned().unwrap_or_default();
                (s.message_id, format!("{} ({context})", s.service))
            })
            .collect();
        // Open ends, the most telling first: a parked message, one sent and
        // handled by nobody, one not sent, then what is scheduled (an
        // expected future, such as a timeout, rather than a stop).
        let mut open: Vec<(u8, String)> = Vec::new();
        for step in &mut steps {
            if step.direction != Direction::Sent {
                continue;
            }
            step.handled_by = received
                .iter()
                .filter(|(id, _)| *id == step.message_id)
                .map(|(_, by)| by.clone())
                .collect();
            let what = format!("{} {} from {}", step.message, step.message_id, step.service);
            match &step.whereabouts {
                Whereabouts::Outstanding { last_error, .. } => open.push((
                    2,
                    match last_error {
                        Some(error) => format!("{what} is not sent yet (last error: {error})"),
                        None => format!("{what} is not sent yet"),
                    },
                )),
                Whereabouts::Scheduled { due } => {
                    open.push((3, format!("{what} is scheduled for {}", due.to_rfc3339())));
                }
                Whereabouts::Parked { last_error } => open.push((
                    0,
                    format!(
                        "{what} is parked in its outbox ({})",
                        last_error.as_deref().unwrap_or("no error recorded")
                    ),
                )),
                Whereabouts::Dispatched { .. } if step.handled_by.is_empty() => open.push((
                    1,
                    format!(
                        "{what} was sent to {} and no service asked has handled it",
                        step.topic.as_deref().unwrap_or("its topic")
                    ),
                )),
                Whereabouts::Dispatched { .. } | Whereabouts::Handled => {}
            }
        }
        open.sort_by_key(|(rank, _)| *rank);
        let open: Vec<String> = open.into_iter().map(|(_, text)| text).collect();
        let stopped = match (open.first(), steps.last()) {
            (Some(first), _) => format!("waiting: {first}"),
            (None, Some(last)) => format!(
                "complete: every message sent was handled; the last step: {} {} {}",
                last.service,
                match last.direction {
                    Direction::Sent => "sent",
                    Direction::Received => "handled",
                },
                last.message
            ),
            (None, None) => "no service asked has a trace of this conversation".to_owned(),
        };
        Ok(Activity {
            correlation_id,
            steps,
            open,
            stopped,
        })
    }
}
