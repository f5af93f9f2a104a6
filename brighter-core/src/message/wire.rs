//! The header wire format: a [`MessageHeader`] as string key/value pairs for
//! broker headers (Kafka record headers, AMQP headers), and back. Writing is
//! strict (every field, always); reading is tolerant (unknown keys go to the bag,
//! optional fields default) but refuses a message without a usable id or topic.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use crate::error::Error;
use crate::message::{MessageHeader, MessageType};

/// The longest delay a header read from the wire may ask for (24 hours); a
/// longer one counts as none, with a warning.
pub const MAX_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Message id.
pub const ID: &str = "x-brighter-id";
/// Topic the message was sent to.
pub const TOPIC: &str = "x-brighter-topic";
/// `command`, `event` or `document`.
pub const MESSAGE_TYPE: &str = "x-brighter-message-type";
/// RFC 3339 timestamp with nanoseconds.
pub const TIMESTAMP: &str = "x-brighter-timestamp";
/// Correlation id.
pub const CORRELATION_ID: &str = "x-brighter-correlation-id";
/// Reply-to channel.
pub const REPLY_TO: &str = "x-brighter-reply-to";
/// Content type of the body.
pub const CONTENT_TYPE: &str = "x-brighter-content-type";
/// Partition key.
pub const PARTITION_KEY: &str = "x-brighter-partition-key";
/// Requeues so far.
pub const HANDLED_COUNT: &str = "x-brighter-handled-count";
/// Delay in milliseconds.
pub const DELAY_MS: &str = "x-brighter-delay-ms";
/// Why a message was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "x-brighter-dead-letter-reason";
/// Why a message was moved to the invalid-message channel.
pub const INVALID_REASON: &str = "x-brighter-invalid-reason";
/// On a parked copy (dead letter, invalid, forward) that would have been over
/// the broker's limit with the original's header bag: how many bag entries
/// were left out.
pub const HEADERS_DROPPED: &str = "x-brighter-headers-dropped";
/// The longest reason, in bytes, a parked copy carries (see [`bounded_reason`]).
pub const MAX_REASON_BYTES: usize = 2_048;

/// `reason` cut to at most [`MAX_REASON_BYTES`] at a character boundary: a
/// reason is an error's text, bounded so that a parked copy stays near the
/// original's size.
pub fn bounded_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}
/// CloudEvents attributes, with the `cloudEvents:` prefix of the AMQP and Kafka bindings.
pub const CE_SOURCE: &str = "cloudEvents:source";
/// CloudEvents `type`.
pub const CE_TYPE: &str = "cloudEvents:type";
/// CloudEvents `subject`.
pub const CE_SUBJECT: &str = "cloudEvents:subject";
/// CloudEvents `dataschema`.
pub const CE_DATASCHEMA: &str = "cloudEvents:dataschema";
/// CloudEvents `specversion`.
pub const CE_SPECVERSION: &str = "cloudEvents:specversion";
/// W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";
/// W3C `baggage`.
pub const BAGGAGE: &str = "baggage";

/// Whether `key` is one the codec owns (not a bag entry).
pub fn is_reserved(key: &str) -> bool {
    key.starts_with("x-brighter-")
        || key.starts_with("cloudEvents:")
        || matches!(key, TRACEPARENT | TRACESTATE | BAGGAGE)
}

/// Every field of `header` as key/value pairs. Bag entries whose key the codec
/// owns are left out (the field wins).
pub fn encode(header: &MessageHeader) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = vec![
        (ID.into(), header.id.to_string()),
        (TOPIC.into(), header.topic.clone()),
        (MESSAGE_TYPE.into(), header.message_type.as_str().into()),
        (
            TIMESTAMP.into(),
            header.timestamp.to_rfc3339_opts(SecondsFormat::Nanos, true),
        ),
        (CORRELATION_ID.into(), header.correlation_id.to_string()),
        (CONTENT_TYPE.into(), header.content_type.clone()),
        (HANDLED_COUNT.into(), header.handled_count.to_string()),
        (DELAY_MS.into(), header.delay.as_millis().to_string()),
    ];
    let optional = [
        (REPLY_TO, &header.reply_to),
        (PARTITION_KEY, &header.partition_key),
        (CE_SOURCE, &header.cloud_events.source),
        (CE_TYPE, &header.cloud_events.kind),
        (CE_SUBJECT, &header.cloud_events.subject),
        (CE_DATASCHEMA, &header.cloud_events.dataschema),
        (CE_SPECVERSION, &header.cloud_events.specversion),
        (TRACEPARENT, &header.trace.traceparent),
        (TRACESTATE, &header.trace.tracestate),
        (BAGGAGE, &header.trace.baggage),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            pairs.push((key.into(), value.clone()));
        }
    }
    for (key, value) in &header.bag {
        if !is_reserved(key) {
            pairs.push((key.clone(), value.clone()));
        }
    }
    pairs
}

/// A header from key/value pairs. Fails with [`Error::Mapping`] when the id or
/// topic is missing or unusable, or a field the codec owns is not UTF-8; other
/// fields default when missing or malformed; unknown keys go to the bag (lossily
/// decoded when not UTF-8). `fallback` supplies values the transport knows
/// otherwise (AMQP properties, the routing key) for keys that are absent.
// One function: each header field is read in one place, next to its default.
pub fn decode<K, V>(
    pairs: impl IntoIterator<Item = (K, V)>,
    fallback: impl Fn(&str) -> Option<String>,
) -> Result<MessageHeader, Error>
where
    K: AsRef<str>,
    V: AsRef<[u8]>,
{
    let mut header = MessageHeader {
        timestamp: Utc::now(),
        ..MessageHeader::default()
    };
    let mut known: Vec<(&'static str, String)> = Vec::new();
    for (key, value) in pairs {
        let (key, value) = (key.as_ref(), value.as_ref());
        let reserved = [
            ID,
            TOPIC,
            MESSAGE_TYPE,
            TIMESTAMP,
            CORRELATION_ID,
            REPLY_TO,
            CONTENT_TYPE,
            PARTITION_KEY,
            HANDLED_COUNT,
            DELAY_MS,
            CE_SOURCE,
            CE_TYPE,
            CE_SUBJECT,
            CE_DATASCHEMA,
            CE_SPECVERSION,
            TRACEPARENT,
            TRACESTATE,
            BAGGAGE,
        ];
        if let Some(name) = reserved.iter().find(|k| **k == key) {
            let text = std::str::from_utf8(value)
                .map_err(|_| Error::Mapping(format!("header '{key}' is not valid UTF-8")))?;
            known.push((name, text.to_owned()));
        } else if !is_reserved(key) {
            header
                .bag
                .insert(key.to_owned(), String::from_utf8_lossy(value).into_owned());
        }
    }
    let get = |name: &str| {
        known
            .iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| fallback(name))
    };
    header.id = get(ID)
        .and_then(|v| Uuid::parse_str(v.trim()).ok())
        .filter(|id| !id.is_nil())
        .ok_or_else(|| Error::Mapping("message has no valid id".into()))?;
    header.topic = get(TOPIC)
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| Error::Mapping(format!("message {} has no topic", header.id)))?;
    header.message_type = get(MESSAGE_TYPE)
        .and_then(|v| MessageType::parse(&v))
        .unwrap_or_default();
    if let Some(ts) = get(TIMESTAMP).and_then(|v| DateTime::parse_from_rfc3339(&v).ok()) {
        header.timestamp = ts.with_timezone(&Utc);
    }
    header.correlation_id = get(CORRELATION_ID)
        .and_then(|v| Uuid::parse_str(v.trim()).ok())
        .unwrap_or(header.id);
    header.reply_to = get(REPLY_TO).filter(|v| !v.is_empty());
    if let Some(content_type) = get(CONTENT_TYPE).filter(|v| !v.is_empty()) {
        header.content_type = content_type;
    }
    header.partition_key = get(PARTITION_KEY);
    header.handled_count = get(HANDLED_COUNT).and_then(|v| v.parse().ok()).unwrap_or(0);
    let delay = Duration::from_millis(get(DELAY_MS).and_then(|v| v.parse().ok()).unwrap_or(0));
    header.delay = if delay > MAX_DELAY {
        // A time from the wire is not trusted: one absurd value must not
        // hold a message (or a partition) back silently.
        tracing::warn!(id = %header.id, ?delay, "a delay header longer than {MAX_DELAY:?}; treated as none");
        Duration::ZERO
    } else {
        delay
    };
    header.cloud_events.source = get(CE_SOURCE);
    header.cloud_events.kind = get(CE_TYPE);
    header.cloud_events.subject = get(CE_SUBJECT);
    header.cloud_events.dataschema = get(CE_DATASCHEMA);
    header.cloud_events.specversion = get(CE_SPECVERSION);
    header.trace.traceparent = get(TRACEPARENT);
    header.trace.tracestate = get(TRACESTATE);
    header.trace.baggage = get(BAGGAGE);
    Ok(header)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_header_round_trips() {
        let mut h = MessageHeader::new("orders", MessageType::Event);
        h.reply_to = Some("r".into());
        h.partition_key = Some("k".into());
        h.handled_count = 3;
        h.delay = Duration::from_millis(250);
        h.bag.insert("tenant".into(), "acme".into());
        h.cloud_events.source = Some("urn:x".into());
        h.trace.traceparent = Some("00-abc-def-01".into());
        let back = decode(encode(&h), |_| None).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn decoding_is_tolerant_but_needs_an_id_and_a_topic() {
        let id = Uuid::now_v7();
        let h = decode(
            [
                (ID, id.to_string()),
                (TOPIC, "t".into()),
                ("x-new-field", "1".into()),
                (HANDLED_COUNT, "NaN".into()),
            ],
            |_| None,
        )
        .unwrap();
        assert_eq!((h.id, h.correlation_id, h.handled_count), (id, id, 0));
        assert_eq!(h.bag.get("x-new-field").map(String::as_str), Some("1"));
        assert!(decode([(TOPIC, "t")], |_| None).is_err());
        assert!(decode([(ID, "not-a-uuid"), (TOPIC, "t")], |_| None).is_err());
        assert!(decode([(ID, id.to_string())], |_| None).is_err());
        let from_fallback = decode([(ID, id.to_string())], |k| {
            (k == TOPIC).then(|| "rk".into())
        })
        .unwrap();
        assert_eq!(from_fallback.topic, "rk");
        let bad_utf8: Vec<(&str, Vec<u8>)> =
            vec![(ID, id.to_string().into_bytes()), (TOPIC, vec![0xff, 0xfe])];
        assert!(decode(bad_utf8, |_| None).is_err());
    }
}
