//! Messages to AMQP properties and headers, and back; topology helpers.

use std::time::Duration;

use brighter_core::{Error, Message, wire};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use crate::connection::{RabbitConnection, transport};

/// The longest AMQP short string (property values, header keys, routing keys).
pub(crate) const SHORT_STRING_MAX: usize = 255;

/// `value` as an AMQP short string, or `None` when it is too long to be one.
/// Never `ShortString::from`, which panics on a long value: values come from
/// the wire and from users.
pub(crate) fn short(value: &str) -> Option<ShortString> {
    ShortString::try_new(value).ok()
}

/// Why `message` cannot be published to AMQP, if it cannot: a header key (a
/// short string on the wire) over 255 bytes. Long values are fine: they go in
/// the headers table as long strings.
pub(crate) fn unfit_for_amqp(message: &Message) -> Option<String> {
    wire::encode(&message.header, wire::CloudEventsBinding::Amqp)
        .into_iter()
        .find(|(key, _)| key.len() > SHORT_STRING_MAX)
        .map(|(key, _)| {
            let start: String = key.chars().take(40).collect();
            format!(
                "header key '{start}…' is {} bytes; AMQP header keys are at most {SHORT_STRING_MAX}",
                key.len()
            )
        })
}

/// AMQP properties for `message`: the standard ones (message id, correlation id,
/// reply-to, content type, timestamp, type, persistent) and every header field
/// in the headers table (see [`wire`]), plus `extra` headers. A property value
/// too long for a short string is left out (the headers table carries it as a
/// long string, and reading prefers it); a header entry whose key is too long
/// is left out with a warning (senders refuse such messages first, see
/// [`unfit_for_amqp`]). Never panics.
pub(crate) fn properties(message: &Message, extra: &[(&str, &str)]) -> BasicProperties {
    let h = &message.header;
    let mut headers = FieldTable::default();
    let entries = wire::encode(h, wire::CloudEventsBinding::Amqp)
        .into_iter()
        .chain(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
    for (key, value) in entries {
        match short(&key) {
            Some(key) => {
                headers.insert(key, AMQPValue::LongString(LongString::from(value)));
            }
            None => {
                tracing::warn!(id = %h.id, key_bytes = key.len(), "header key too long for AMQP; left out of the copy")
            }
        }
    }
    let mut properties = BasicProperties::default()
        .with_timestamp(u64::try_from(h.timestamp.timestamp()).unwrap_or(0))
        .with_delivery_mode(2)
        .with_headers(headers);
    for (value, set) in [
        (
            Some(h.id.to_string()),
            BasicProperties::with_message_id as fn(BasicProperties, ShortString) -> BasicProperties,
        ),
        (
            Some(h.correlation_id.to_string()),
            BasicProperties::with_correlation_id,
        ),
        (
            Some(h.content_type.clone()),
            BasicProperties::with_content_type,
        ),
        (
            Some(h.message_type.as_str().to_owned()),
            BasicProperties::with_type,
        ),
        (h.reply_to.clone(), BasicProperties::with_reply_to),
    ] {
        if let Some(value) = value.as_deref().and_then(short) {
            properties = set(properties, value);
        }
    }
    properties
}

fn value_bytes(value: &AMQPValue) -> Option<Vec<u8>> {
    match value {
        AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
        AMQPValue::ByteArray(b) => Some(b.as_slice().to_vec()),
        AMQPValue::LongInt(i) => Some(i.to_string().into_bytes()),
        AMQPValue::LongLongInt(i) => Some(i.to_string().into_bytes()),
        AMQPValue::LongUInt(i) => Some(i.to_string().into_bytes()),
        AMQPValue::Boolean(b) => Some(b.to_string().into_bytes()),
        // An AMQP 0-9-1 timestamp is in seconds (e.g. `cloudEvents_time`).
        AMQPValue::Timestamp(t) => i64::try_from(*t)
            .ok()
            .and_then(|t| chrono::DateTime::<chrono::Utc>::from_timestamp(t, 0))
            .map(|time| time.to_rfc3339().into_bytes()),
        _ => None,
    }
}

/// The message in an AMQP delivery. Tolerant of messages from other publishers:
/// missing header fields come from the AMQP properties and the routing key.
pub(crate) fn message(
    properties: &BasicProperties,
    routing_key: &str,
    body: Vec<u8>,
) -> Result<Message, Error> {
    let pairs: Vec<(String, Vec<u8>)> = properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| value_bytes(v).map(|b| (k.as_str().to_owned(), b)))
                .collect()
        })
        .unwrap_or_default();
    let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    let header = wire::decode(pairs, |key| match key {
        wire::ID => text(properties.message_id()),
        wire::TOPIC => Some(routing_key.to_owned()),
        wire::CORRELATION_ID => text(properties.correlation_id()),
        wire::REPLY_TO => text(properties.reply_to()),
        wire::CONTENT_TYPE => text(properties.content_type()),
        wire::MESSAGE_TYPE => text(properties.kind()),
        _ => None,
    })?;
    Ok(Message::new(header, body))
}

/// A header value of an AMQP delivery, as text.
pub(crate) fn header_text(properties: &BasicProperties, key: &str) -> Option<String> {
    properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(key).and_then(value_bytes))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A content header frame beside its properties: frame type, channel, size
/// and end (8 bytes), class, weight and body size (12 bytes).
pub(crate) const CONTENT_HEADER_OVERHEAD: usize = 20;

/// How many bytes `properties` take on the wire (their flags included).
pub(crate) fn header_size(properties: &BasicProperties) -> usize {
    cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    )
    .map_or(usize::MAX, |bytes| bytes.len())
}

/// Publishes and waits for the broker's confirm. With `mandatory`, a message no
/// queue took is an error rather than silently dropped.
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
    connection: &RabbitConnection,
) -> Result<(), Error> {
    let timeout = connection.config().confirm_timeout;
    // A content header larger than a frame is a connection error to
    // RabbitMQ (FRAME_ERROR): it would close the connection, and every
    // channel sharing it, instead of refusing one message.
    let size = header_size(&properties);
    let room = connection
        .frame_max()
        .saturating_sub(CONTENT_HEADER_OVERHEAD);
    if size > room {
        return Err(Error::Refused {
            reason: format!(
                "its AMQP properties and headers take {size} bytes; one frame holds {room} (frame_max {})",
                connection.frame_max()
            ),
        });
    }
    let options = BasicPublishOptions {
        mandatory,
        ..BasicPublishOptions::default()
    };
    let (Some(exchange_name), Some(key)) = (short(exchange), short(routing_key)) else {
        let start: String = routing_key.chars().take(40).collect();
        return Err(Error::validation(format!(
            "exchange or routing key '{start}…' is longer than AMQP's {SHORT_STRING_MAX} bytes"
        )));
    };
    let confirm = channel
        .basic_publish(exchange_name, key, options, body, properties)
        .await
        .map_err(|e| transport("publish", e))?;
    let confirmation = tokio::time::timeout(timeout, confirm)
        .await
        .map_err(|_| transport("publish", format!("no confirm within {timeout:?}")))?
        .map_err(|e| transport("publisher confirm", e))?;
    if !confirmation.is_ack() {
        return Err(transport(
            "publish",
            "the broker refused the message (nack)",
        ));
    }
    if confirmation.take_message().is_some() {
        // Returned (basic.return): the exchange had no queue for the key.
        return Err(Error::unroutable(routing_key));
    }
    Ok(())
}

pub(crate) async fn confirm_mode(channel: &Channel) -> Result<(), Error> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| transport("enable publisher confirms", e))
}

pub(crate) async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
    auto_delete: bool,
) -> Result<(), Error> {
    let options = ExchangeDeclareOptions {
        durable: !auto_delete,
        auto_delete,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(name.into(), kind, options, FieldTable::default())
        .await
        .map_err(|e| transport(&format!("declare exchange '{name}'"), e))
}

pub(crate) async fn declare_queue(
    channel: &Channel,
    name: &str,
    durable: bool,
    auto_delete: bool,
    arguments: FieldTable,
) -> Result<(), Error> {
    let options = QueueDeclareOptions {
        durable,
        auto_delete,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), options, arguments)
        .await
        .map(|_| ())
        .map_err(|e| transport(&format!("declare queue '{name}'"), e))
}

pub(crate) async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), Error> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| transport(&format!("bind queue '{queue}' to '{exchange}'"), e))
}

pub(crate) fn arguments(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        if let Some(key) = short(key) {
            table.insert(key, value.clone());
        }
    }
    table
}

pub(crate) fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}
