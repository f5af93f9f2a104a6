//! `brighter dlq`: a subscription's dead-letter queue (RabbitMQ) or topic
//! (Kafka).

use brighter::Message;
use brighter::kafka::{KafkaConfig, KafkaProducer};
use brighter::rabbitmq::{RabbitConfig, RabbitConnection};
use brighter::uuid::Uuid;
use serde_json::{Value, json};

use crate::report::{Report, event_type, short, time};
use crate::{DlqAction, Res, Transport};

/// A dead letter as both brokers describe it.
struct Letter {
    id: Option<Uuid>,
    reason: Option<String>,
    message: Option<Message>,
    size: usize,
    /// Where it is: `partition/offset` (Kafka), empty on RabbitMQ.
    place: String,
    /// Kafka: replayed already.
    replayed: Option<bool>,
}

fn rabbit() -> RabbitConnection {
    RabbitConnection::new(RabbitConfig::from_env().connection_name("brighter-cli"))
}

async fn letters(transport: Transport, channel: &str, limit: usize) -> Res<Vec<Letter>> {
    Ok(match transport {
        Transport::Rabbitmq => brighter::rabbitmq::list_dead_letters(&rabbit(), channel, limit)
            .await?
            .into_iter()
            .map(|d| Letter {
                id: d.id,
                reason: d.reason,
                message: d.message,
                size: d.size,
                place: String::new(),
                replayed: None,
            })
            .collect(),
        Transport::Kafka => {
            brighter::kafka::list_dead_letters(&KafkaConfig::from_env(), channel, limit)
                .await?
                .into_iter()
                .map(|d| Letter {
                    id: d.id,
                    reason: d.reason,
                    message: d.message,
                    size: d.size,
                    place: format!("{}/{}", d.partition, d.offset),
                    replayed: Some(d.replayed),
                })
                .collect()
        }
    })
}

fn letter_json(letter: &Letter, full: bool) -> Value {
    let header = letter.message.as_ref().map(|m| &m.header);
    let mut value = json!({
        "id": letter.id,
        "reason": letter.reason,
        "topic": header.map(|h| h.topic.to_string()),
        "type": header.and_then(|h| h.cloud_events.kind.clone()),
        "correlation_id": header.map(|h| h.correlation_id),
        "timestamp": header.map(|h| h.timestamp),
        "size": letter.size,
        "position": Some(&letter.place).filter(|p| !p.is_empty()),
        "replayed": letter.replayed,
    });
    if full {
        value["header"] = header
            .and_then(|h| serde_json::to_value(h).ok())
            .unwrap_or(Value::Null);
        value["body"] = json!(
            letter
                .message
                .as_ref()
                .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        );
    }
    value
}

fn place(transport: Transport, channel: &str) -> String {
    match transport {
        Transport::Rabbitmq => format!(
            "queue {}",
            brighter::rabbitmq::RabbitChannelFactory::dead_letter_queue(channel)
        ),
        Transport::Kafka => format!(
            "topic {}",
            brighter::kafka::KafkaChannelFactory::dead_letter_topic(channel)
        ),
    }
}

pub(crate) async fn run(transport: Transport, action: DlqAction) -> Res<Report> {
    Ok(match action {
        DlqAction::List { channel, limit } => {
            let found = letters(transport, &channel, limit).await?;
            let mut header = vec!["id", "type", "topic", "timestamp", "reason"];
            if transport == Transport::Kafka {
                header.extend(["partition/offset", "replayed"]);
            }
            let rows = found
                .iter()
                .map(|l| {
                    let h = l.message.as_ref().map(|m| &m.header);
                    let mut row = vec![
                        l.id.map(|id| id.to_string())
                            .unwrap_or_else(|| "(unreadable)".into()),
                        h.map(event_type).unwrap_or_default(),
                        h.map(|h| h.topic.to_string()).unwrap_or_default(),
                        time(h.map(|h| h.timestamp)),
                        short(l.reason.as_deref().unwrap_or(""), 80),
                    ];
                    if let Some(replayed) = l.replayed {
                        row.push(l.place.clone());
                        row.push(if replayed { "yes" } else { "no" }.into());
                    }
                    row
                })
                .collect();
            Report::line(
                format!(
                    "{}: {} dead letter(s) (nothing taken out)",
                    place(transport, &channel),
                    found.len()
                ),
                json!(
                    found
                        .iter()
                        .map(|l| letter_json(l, false))
                        .collect::<Vec<_>>()
                ),
            )
            .table("", &header, rows)
        }
        DlqAction::Show { channel, id } => {
            let found = letters(transport, &channel, usize::MAX).await?;
            let letter = found
                .iter()
                .find(|l| l.id == Some(id))
                .ok_or_else(|| format!("no message {id} in {}", place(transport, &channel)))?;
            let mut rows = vec![vec![
                "reason".to_owned(),
                letter.reason.clone().unwrap_or_default(),
            ]];
            if let Some(message) = &letter.message {
                let h = &message.header;
                rows.extend([
                    vec!["topic".into(), h.topic.to_string()],
                    vec!["type".into(), event_type(h)],
                    vec!["correlation id".into(), h.correlation_id.to_string()],
                    vec!["timestamp".into(), time(Some(h.timestamp))],
                    vec!["handled count".into(), h.handled_count.to_string()],
                ]);
                for (key, value) in &h.bag {
                    rows.push(vec![format!("header {key}"), value.clone()]);
                }
                rows.push(vec![
                    "body".into(),
                    short(&String::from_utf8_lossy(&message.body), 2000),
                ]);
            }
            Report::line(
                format!("message {id} in {}", place(transport, &channel)),
                letter_json(letter, true),
            )
            .table("", &["field", "value"], rows)
        }
        DlqAction::Replay { channel, ids } => {
            let only = (!ids.is_empty()).then_some(ids.as_slice());
            let replayed = match transport {
                Transport::Rabbitmq => {
                    brighter::rabbitmq::replay_dead_letters(&rabbit(), &channel, only).await?
                }
                Transport::Kafka => {
                    let config = KafkaConfig::from_env();
                    let producer = KafkaProducer::new(config.clone())?;
                    brighter::kafka::replay_dead_letters(&config, &producer, &channel, only).await?
                }
            };
            let missing: Vec<&Uuid> = ids.iter().filter(|id| !replayed.contains(id)).collect();
            let mut report = Report::line(
                format!(
                    "replayed {} message(s) from {} to subscription channel {channel}",
                    replayed.len(),
                    place(transport, &channel)
                ),
                json!({ "replayed": replayed, "not_found": missing }),
            );
            if !missing.is_empty() {
                report.lines.push(format!(
                    "not found: {}",
                    missing
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            report.table(
                "",
                &["replayed id"],
                replayed.iter().map(|id| vec![id.to_string()]).collect(),
            )
        }
    })
}
