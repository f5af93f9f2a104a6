//! The dead-letter queue of a subscription, for operators: list what is in
//! it (without taking it out), and replay messages to the queue they were
//! dead-lettered from, with their headers, once each (a replayed message is
//! acknowledged off the dead-letter queue only after the broker confirmed
//! its copy).

use brighter_core::{Error, Message, wire};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use uuid::Uuid;

use crate::amqp::{confirm_mode, header_text, message, publish_confirmed, text};
use crate::{RabbitChannelFactory, RabbitConnection};

/// A message in a dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The message, as the pump would read it (`None` when it cannot be read).
    pub message: Option<Message>,
    /// Its id (the AMQP message id when the message cannot be read).
    pub id: Option<Uuid>,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// The body's size in bytes.
    pub size: usize,
}

fn transport(context: &str, error: impl Into<brighter_core::BoxError>) -> Error {
    Error::transport(context, error)
}

fn dead_letter(delivery: &lapin::message::BasicGetMessage) -> DeadLetter {
    let message = message(
        &delivery.properties,
        delivery.routing_key.as_str(),
        delivery.data.clone(),
    )
    .ok();
    let id = message.as_ref().map(Message::id).or_else(|| {
        delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| id.as_str().parse().ok())
    });
    DeadLetter {
        id,
        reason: header_text(&delivery.properties, wire::DEAD_LETTER_REASON),
        size: delivery.data.len(),
        message,
    }
}

/// Up to `limit` messages of `queue`'s dead-letter queue (`<queue>.dlq`),
/// oldest first. They stay in it: each is taken without an ack and goes
/// back when the channel closes.
pub async fn list_dead_letters(
    connection: &RabbitConnection,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, Error> {
    let dlq = RabbitChannelFactory::dead_letter_queue(queue);
    let channel = connection.channel().await?;
    let mut found = Vec::new();
    while found.len() < limit {
        let got = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| transport(&format!("read dead-letter queue '{dlq}'"), e))?;
        let Some(delivery) = got else { break };
        found.push(dead_letter(&delivery));
    }
    // Everything taken goes back, in its place.
    let _ = channel.close(200, "listed".into()).await;
    Ok(found)
}

/// Replays messages of `queue`'s dead-letter queue to `queue` itself (the
/// subscription that dead-lettered them; no other subscription gets them
/// again): every one, or those whose ids are in `only`. Each goes with its
/// headers as they were, less the dead-letter reason and with its handled
/// count back to 0, and is taken off the dead-letter queue once the broker
/// confirmed the copy. Returns the ids replayed.
pub async fn replay_dead_letters(
    connection: &RabbitConnection,
    queue: &str,
    only: Option<&[Uuid]>,
) -> Result<Vec<Uuid>, Error> {
    let dlq = RabbitChannelFactory::dead_letter_queue(queue);
    let channel = connection.channel().await?;
    confirm_mode(&channel).await?;
    let mut replayed = Vec::new();
    loop {
        let got = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| transport(&format!("read dead-letter queue '{dlq}'"), e))?;
        let Some(delivery) = got else { break };
        let letter = dead_letter(&delivery);
        let Some(id) = letter
            .id
            .filter(|id| only.is_none_or(|ids| ids.contains(id)))
        else {
            // Not asked for: left unacked, so it goes back when the channel closes.
            continue;
        };
        let mut headers: FieldTable = delivery.properties.headers().clone().unwrap_or_default();
        let kept: Vec<(String, AMQPValue)> = headers
            .inner()
            .iter()
            .filter(|(key, _)| key.as_str() != wire::DEAD_LETTER_REASON)
            .map(|(key, value)| (key.as_str().to_owned(), value.clone()))
            .collect();
        headers = FieldTable::default();
        for (key, value) in kept {
            headers.insert(key.into(), value);
        }
        headers.insert(wire::HANDLED_COUNT.into(), text("0"));
        let properties = delivery.properties.clone().with_headers(headers);
        publish_confirmed(
            &channel,
            "",
            queue,
            &delivery.data,
            properties,
            true,
            connection,
        )
        .await?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| transport(&format!("take message {id} off '{dlq}'"), e))?;
        replayed.push(id);
    }
    let _ = channel.close(200, "replayed".into()).await;
    Ok(replayed)
}
