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
/// How a transport's protocol binding of CloudEvents 1.0 names the event's
/// attributes in broker headers ("binary content mode"): `id`, `source`,
/// `specversion`, `type`, `time`, `subject`, `dataschema`, with the body as
/// the event's data and its content type as `datacontenttype`. A CloudEvents
/// SDK reads what a producer of this crate writes, and the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudEventsBinding {
    /// The Kafka binding: `ce_` headers, and `datacontenttype` as the
    /// `content-type` header.
    Kafka,
    /// The AMQP binding: `cloudEvents_` application properties (the AMQP
    /// headers table); `datacontenttype` is the content-type property, which
    /// the transport sets itself.
    Amqp,
}

impl CloudEventsBinding {
    /// The prefix of the attribute headers: `ce_` or `cloudEvents_`.
    pub fn prefix(self) -> &'static str {
        match self {
            CloudEventsBinding::Kafka => KAFKA_CE_PREFIX,
            CloudEventsBinding::Amqp => AMQP_CE_PREFIX,
        }
    }

    /// The header that carries CloudEvents attribute `attribute`, e.g.
    /// `ce_source`.
    pub fn key(self, attribute: &str) -> String {
        format!("{}{attribute}", self.prefix())
    }
}

/// The Kafka binding's attribute prefix.
pub const KAFKA_CE_PREFIX: &str = "ce_";
/// The AMQP binding's attribute prefix.
pub const AMQP_CE_PREFIX: &str = "cloudEvents_";
/// The AMQP binding's other prefix (read, never written; what this crate
/// wrote before 0.2).
pub const AMQP_CE_PREFIX_COLON: &str = "cloudEvents:";
/// The Kafka binding's header for `datacontenttype`.
pub const KAFKA_CONTENT_TYPE: &str = "content-type";

/// The CloudEvents attributes the codec reads and writes, by name.
pub const CE_ATTRIBUTES: [&str; 8] = [
    "id",
    "source",
    "specversion",
    "type",
    "time",
    "subject",
    "dataschema",
    "datacontenttype",
];

/// `key` as a CloudEvents attribute name when it is one of
/// [`CE_ATTRIBUTES`] under any binding's prefix (`ce_source`,
/// `cloudEvents_source`, `cloudEvents:source` are all `source`).
pub fn ce_attribute(key: &str) -> Option<&'static str> {
    let name = key
        .strip_prefix(KAFKA_CE_PREFIX)
        .or_else(|| key.strip_prefix(AMQP_CE_PREFIX))
        .or_else(|| key.strip_prefix(AMQP_CE_PREFIX_COLON))?;
    CE_ATTRIBUTES.iter().find(|a| **a == name).copied()
}

/// W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";
/// W3C `baggage`.
pub const BAGGAGE: &str = "baggage";

/// Whether `key` is one the codec owns (not a bag entry). CloudEvents
/// extension attributes (`ce_myext`) are not: they travel in the bag.
pub fn is_reserved(key: &str) -> bool {
    key.starts_with("x-brighter-")
        || ce_attribute(key).is_some()
        || matches!(key, TRACEPARENT | TRACESTATE | BAGGAGE | KAFKA_CONTENT_TYPE)
}

/// Every field of `header` as key/value pairs, the CloudEvents attributes as
/// `binding` names them. Bag entries whose key the codec owns are left out
/// (the field wins).
pub fn encode(header: &MessageHeader, binding: CloudEventsBinding) -> Vec<(String, String)> {
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
        (TRACEPARENT, &header.trace.traceparent),
        (TRACESTATE, &header.trace.tracestate),
        (BAGGAGE, &header.trace.baggage),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            pairs.push((key.into(), value.clone()));
        }
    }
    // CloudEvents: the event's id and time are the message's; the message
    // builder sets specversion, source and type on every message it makes.
    let ce = &header.cloud_events;
    if ce.specversion.is_some() {
        pairs.push((binding.key("id"), header.id.to_string()));
        pairs.push((
            binding.key("time"),
            header
                .timestamp
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        ));
        if binding == CloudEventsBinding::Kafka {
            pairs.push((KAFKA_CONTENT_TYPE.into(), header.content_type.clone()));
        }
    }
    let attributes = [
        ("specversion", &ce.specversion),
        ("source", &ce.source),
        ("type", &ce.kind),
        ("subject", &ce.subject),
        ("dataschema", &ce.dataschema),
    ];
    for (attribute, value) in attributes {
        if let Some(value) = value {
            pairs.push((binding.key(attribute), value.clone()));
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
        // A CloudEvents attribute under any binding's name is read as one.
        let key = match ce_attribute(key) {
            Some(attribute) => ce_key(attribute),
            None if key == KAFKA_CONTENT_TYPE => CE_DATACONTENTTYPE,
            None => key,
        };
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
            CE_ID,
            CE_SOURCE,
            CE_TYPE,
            CE_TIME,
            CE_SUBJECT,
            CE_DATASCHEMA,
            CE_SPECVERSION,
            CE_DATACONTENTTYPE,
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
        .or_else(|| {
            // An event from elsewhere: its CloudEvents id, or when that is not
            // a UUID, one derived from it and its source (the pair is unique
            // by the spec), so a redelivery keeps its id for the inbox.
            let id = get(CE_ID).filter(|id| !id.trim().is_empty())?;
            Uuid::parse_str(id.trim())
                .ok()
                .filter(|id| !id.is_nil())
                .or_else(|| {
                    Some(cloud_event_uuid(
                        get(CE_SOURCE).as_deref().unwrap_or(""),
                        &id,
                    ))
                })
        })
        .ok_or_else(|| Error::Mapping("message has no valid id".into()))?;
    header.topic = get(TOPIC)
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| Error::Mapping(format!("message {} has no topic", header.id)))?;
    header.message_type = get(MESSAGE_TYPE)
        .and_then(|v| MessageType::parse(&v))
        .unwrap_or_default();
    if let Some(ts) = get(TIMESTAMP)
        .or_else(|| get(CE_TIME))
        .and_then(|v| parse_time(&v))
    {
        header.timestamp = ts;
    }
    header.correlation_id = get(CORRELATION_ID)
        .and_then(|v| Uuid::parse_str(v.trim()).ok())
        .unwrap_or(header.id);
    header.reply_to = get(REPLY_TO).filter(|v| !v.is_empty());
    if let Some(content_type) = get(CONTENT_TYPE)
        .filter(|v| !v.is_empty())
        .or_else(|| get(CE_DATACONTENTTYPE).filter(|v| !v.is_empty()))
    {
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

// What `decode` files each CloudEvents attribute under, whatever its binding.
const CE_ID: &str = "ce:id";
const CE_SOURCE: &str = "ce:source";
const CE_SPECVERSION: &str = "ce:specversion";
const CE_TYPE: &str = "ce:type";
const CE_TIME: &str = "ce:time";
const CE_SUBJECT: &str = "ce:subject";
const CE_DATASCHEMA: &str = "ce:dataschema";
const CE_DATACONTENTTYPE: &str = "ce:datacontenttype";

fn ce_key(attribute: &'static str) -> &'static str {
    match attribute {
        "id" => CE_ID,
        "source" => CE_SOURCE,
        "specversion" => CE_SPECVERSION,
        "type" => CE_TYPE,
        "time" => CE_TIME,
        "subject" => CE_SUBJECT,
        "dataschema" => CE_DATASCHEMA,
        _ => CE_DATACONTENTTYPE,
    }
}

/// The message id of a CloudEvent whose id is not a UUID: a name-based
/// (SHA-1, version 5) UUID of its source and id.
pub fn cloud_event_uuid(source: &str, id: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("{source}#{id}").as_bytes())
}

/// An RFC 3339 time, or milliseconds since the Unix epoch (how the AMQP
/// binding's SDKs write `time` as an AMQP timestamp).
fn parse_time(value: &str) -> Option<DateTime<Utc>> {
    let value = value.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Some(time.with_timezone(&Utc));
    }
    value
        .parse::<i64>()
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
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
        h.cloud_events.specversion = Some("1.0".into());
        h.trace.traceparent = Some("00-abc-def-01".into());
        for binding in [CloudEventsBinding::Kafka, CloudEventsBinding::Amqp] {
            let back = decode(encode(&h, binding), |_| None).unwrap();
            assert_eq!(back, h, "{binding:?}");
        }
    }

    #[test]
    fn a_message_is_a_cloud_event_under_its_transports_binding() {
        let mut h = MessageHeader::new("orders", MessageType::Event);
        h.cloud_events.source = Some("urn:shop".into());
        h.cloud_events.kind = Some("OrderPlaced".into());
        h.cloud_events.subject = Some("order-7".into());
        h.cloud_events.specversion = Some("1.0".into());
        let kafka: std::collections::HashMap<String, String> =
            encode(&h, CloudEventsBinding::Kafka).into_iter().collect();
        assert_eq!(kafka["ce_id"], h.id.to_string());
        assert_eq!(kafka["ce_source"], "urn:shop");
        assert_eq!(kafka["ce_type"], "OrderPlaced");
        assert_eq!(kafka["ce_specversion"], "1.0");
        assert_eq!(kafka["ce_subject"], "order-7");
        assert_eq!(kafka["content-type"], "application/json");
        assert!(DateTime::parse_from_rfc3339(&kafka["ce_time"]).is_ok());
        let amqp: std::collections::HashMap<String, String> =
            encode(&h, CloudEventsBinding::Amqp).into_iter().collect();
        assert_eq!(amqp["cloudEvents_id"], h.id.to_string());
        assert_eq!(amqp["cloudEvents_type"], "OrderPlaced");
        assert!(amqp.contains_key("cloudEvents_time"));
        // The AMQP binding's datacontenttype is the content-type property.
        assert!(!amqp.contains_key("content-type"));
        assert!(!amqp.keys().any(|k| k.starts_with("ce_")));
    }

    #[test]
    fn an_event_written_by_a_cloudevents_sdk_is_read_whatever_the_binding() {
        let id = Uuid::new_v4();
        let topic = |k: &str| (k == TOPIC).then(|| "orders".to_owned());
        let kafka = decode(
            [
                ("ce_id", id.to_string()),
                ("ce_source", "/sdk".into()),
                ("ce_type", "com.example.placed".into()),
                ("ce_specversion", "1.0".into()),
                ("ce_time", "2026-12-02T01:02:03.456789Z".into()),
                ("ce_tenant", "acme".into()),
                ("content-type", "application/json; charset=utf-8".into()),
            ],
            topic,
        )
        .unwrap();
        assert_eq!((kafka.id, kafka.topic.as_str()), (id, "orders"));
        assert_eq!(kafka.cloud_events.source.as_deref(), Some("/sdk"));
        assert_eq!(
            kafka.cloud_events.kind.as_deref(),
            Some("com.example.placed")
        );
        assert_eq!(kafka.content_type, "application/json; charset=utf-8");
        assert_eq!(kafka.timestamp.timestamp_micros() % 1_000_000, 456_789);
        // An extension attribute travels in the bag.
        assert_eq!(kafka.bag.get("ce_tenant").map(String::as_str), Some("acme"));

        // AMQP: `time` as milliseconds (an AMQP timestamp), the colon prefix,
        // and an id that is not a UUID: one derived from source and id.
        let amqp = decode(
            [
                ("cloudEvents:id", "order-1".to_owned()),
                ("cloudEvents_source", "/sdk".into()),
                ("cloudEvents_type", "t".into()),
                ("cloudEvents_specversion", "1.0".into()),
                ("cloudEvents_time", "1764637323456".into()),
            ],
            topic,
        )
        .unwrap();
        assert_eq!(amqp.id, cloud_event_uuid("/sdk", "order-1"));
        assert_eq!(amqp.timestamp.timestamp_millis(), 1_764_637_323_456);
        assert_eq!(amqp.cloud_events.kind.as_deref(), Some("t"));
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
