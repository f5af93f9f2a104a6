//! Messages to AMQP properties and headers, and back; topology helpers.

use std::borrow::Cow;
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
    let mut unfit = None;
    wire::write(
        &message.header,
        wire::CloudEventsBinding::Amqp,
        carried(message),
        |key, _| {
            if unfit.is_none() && key.len() > SHORT_STRING_MAX {
                let start: String = key.chars().take(40).collect();
                unfit = Some(format!(
                    "header key '{start}…' is {} bytes; AMQP header keys are at most {SHORT_STRING_MAX}",
                    key.len()
                ));
            }
        },
    );
    unfit
}

/// What the AMQP properties of `message` carry, so its headers table need
/// not: the id (`message-id`), the correlation id (`correlation-id`, or
/// none when it is the id), the content type and the reply-to channel when
/// they fit a short string, and the message type (`type`).
fn carried(message: &Message) -> wire::Carried<'static> {
    let h = &message.header;
    wire::Carried {
        id: true,
        correlation_id: true,
        content_type: h.content_type.len() <= SHORT_STRING_MAX,
        message_type: true,
        reply_to: h
            .reply_to
            .as_ref()
            .is_none_or(|r| r.len() <= SHORT_STRING_MAX),
        ..wire::Carried::default()
    }
}

/// AMQP properties for `message`: the standard ones (message id, correlation
/// id when it is not the id, reply-to, content type, timestamp, type,
/// persistent) and, in the headers table, the header fields they do not
/// carry (see [`wire::write`]), plus `extra` headers. A property value too
/// long for a short string goes in the headers table as a long string
/// instead; a header entry whose key is too long is left out with a warning
/// (senders refuse such messages first, see [`unfit_for_amqp`]). Never panics.
pub(crate) fn properties(message: &Message, extra: &[(&str, &str)]) -> BasicProperties {
    let h = &message.header;
    let mut headers = FieldTable::default();
    let mut put = |key: &str, value: &str| match short(key) {
        Some(key) => {
            headers.insert(key, AMQPValue::LongString(LongString::from(value)));
        }
        None => {
            tracing::warn!(id = %h.id, key_bytes = key.len(), "header key too long for AMQP; left out of the copy");
        }
    };
    wire::write(
        h,
        wire::CloudEventsBinding::Amqp,
        carried(message),
        &mut put,
    );
    for (key, value) in extra {
        put(key, value);
    }
    let mut properties = BasicProperties::default()
        .with_timestamp(u64::try_from(h.timestamp.timestamp()).unwrap_or(0))
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_type(ShortString::from(h.message_type.as_str()));
    let mut id = [0u8; 36];
    let id = h.id.hyphenated().encode_lower(&mut id);
    if let Some(id) = short(id) {
        properties = properties.with_message_id(id);
    }
    if h.correlation_id != h.id {
        let mut correlation = [0u8; 36];
        let correlation = h.correlation_id.hyphenated().encode_lower(&mut correlation);
        if let Some(correlation) = short(correlation) {
            properties = properties.with_correlation_id(correlation);
        }
    }
    if let Some(content_type) = short(&h.content_type) {
        properties = properties.with_content_type(content_type);
    }
    if let Some(reply_to) = h.reply_to.as_deref().and_then(short) {
        properties = properties.with_reply_to(reply_to);
    }
    properties
}

/// A header value's bytes: borrowed for the string and byte types (what
/// this crate writes), written out for numbers, booleans and timestamps.
fn value_bytes(value: &AMQPValue) -> Option<std::borrow::Cow<'_, [u8]>> {
    use std::borrow::Cow;
    let owned = |text: String| Some(Cow::Owned(text.into_bytes()));
    match value {
        AMQPValue::LongString(s) => Some(Cow::Borrowed(s.as_bytes())),
        AMQPValue::ShortString(s) => Some(Cow::Borrowed(s.as_str().as_bytes())),
        AMQPValue::ByteArray(b) => Some(Cow::Borrowed(b.as_slice())),
        AMQPValue::LongInt(i) => owned(i.to_string()),
        AMQPValue::LongLongInt(i) => owned(i.to_string()),
        AMQPValue::LongUInt(i) => owned(i.to_string()),
        AMQPValue::Boolean(b) => owned(b.to_string()),
        // An AMQP 0-9-1 timestamp is in seconds (e.g. `cloudEvents_time`).
        AMQPValue::Timestamp(t) => i64::try_from(*t)
            .ok()
            .and_then(|t| chrono::DateTime::<chrono::Utc>::from_timestamp(t, 0))
            .and_then(|time| owned(time.to_rfc3339())),
        _ => None,
    }
}

/// The message in an AMQP delivery. Tolerant of messages from other publishers:
/// missing header fields come from the AMQP properties and the routing key.
/// The headers table is read in place.
pub(crate) fn message(
    properties: &BasicProperties,
    routing_key: &str,
    body: impl Into<bytes::Bytes>,
) -> Result<Message, Error> {
    let values: Vec<(&str, Cow<'_, [u8]>)> = properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| value_bytes(v).map(|b| (k.as_str(), b)))
                .collect()
        })
        .unwrap_or_default();
    fn text(v: &Option<ShortString>) -> Option<Cow<'_, str>> {
        v.as_ref().map(|s| Cow::Borrowed(s.as_str()))
    }
    let header = wire::decode_borrowed(
        values.iter().map(|(k, v)| (k.as_bytes(), v.as_ref())),
        |key| match key {
            wire::ID => text(properties.message_id()),
            wire::TOPIC => Some(Cow::Borrowed(routing_key)),
            wire::CORRELATION_ID => text(properties.correlation_id()),
            wire::REPLY_TO => text(properties.reply_to()),
            wire::CONTENT_TYPE => text(properties.content_type()),
            wire::MESSAGE_TYPE => text(properties.kind()),
            _ => None,
        },
    )?;
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

/// At least as many bytes as `properties` take on the wire, counted without
/// writing them out: every short-string property at its longest, the
/// timestamp and the single-byte ones, and the headers table entry by
/// entry; `None` when the table holds a value other than a string.
fn size_bound(properties: &BasicProperties) -> Option<usize> {
    // Flags (2), nine short strings of up to 256 bytes each, the timestamp
    // (8), delivery mode and priority (1 each), the table's length (4).
    const FIXED: usize = 2 + 9 * 256 + 8 + 2 + 4;
    let Some(headers) = properties.headers() else {
        return Some(FIXED);
    };
    headers
        .inner()
        .iter()
        .try_fold(FIXED, |total, (key, value)| {
            // Key length (1), key, type (1), value length (4), value.
            let value = match value {
                AMQPValue::LongString(s) => s.as_bytes().len(),
                AMQPValue::ShortString(s) => s.as_str().len(),
                _ => return None,
            };
            Some(total + 1 + key.as_str().len() + 1 + 4 + value)
        })
}

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
    // channel sharing it, instead of refusing one message. Measured exactly
    // (by writing it out) only when a cheap upper bound does not fit.
    let room = connection
        .frame_max()
        .saturating_sub(CONTENT_HEADER_OVERHEAD);
    if size_bound(&properties).is_none_or(|bound| bound > room)
        && let size = header_size(&properties)
        && size > room
    {
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
