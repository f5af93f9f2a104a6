//! The header wire format: a [`MessageHeader`] as string key/value pairs for
//! broker headers (Kafka record headers, AMQP headers), and back. Writing is
//! strict (every field, always); reading is tolerant (unknown keys go to the bag,
//! optional fields default) but refuses a message without a usable id or topic.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use crate::error::Error;
use crate::message::{
    CloudEvents, JSON_CONTENT_TYPE, MessageHeader, MessageType, SmolStr, TraceContext,
};

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
    ce_attribute_of(key.as_bytes())
}

/// [`ce_attribute`] of a header name as bytes.
fn ce_attribute_of(key: &[u8]) -> Option<&'static str> {
    let name = key
        .strip_prefix(KAFKA_CE_PREFIX.as_bytes())
        .or_else(|| key.strip_prefix(AMQP_CE_PREFIX.as_bytes()))
        .or_else(|| key.strip_prefix(AMQP_CE_PREFIX_COLON.as_bytes()))?;
    CE_ATTRIBUTES.iter().find(|a| a.as_bytes() == name).copied()
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

/// What a transport carries outside its headers, so that [`write()`] leaves it
/// out of them (and its decoder's `fallback` reads it back from there).
/// `Carried::default()`: nothing, every field that differs from what
/// [`decode`] assumes goes in the headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Carried<'a> {
    /// The record's topic (Kafka) or routing key (AMQP): [`TOPIC`] is left
    /// out when the header's topic is this one.
    pub topic: Option<&'a str>,
    /// The partition key is the record key (Kafka).
    pub partition_key: bool,
    /// The id is a property (AMQP `message-id`).
    pub id: bool,
    /// The correlation id is a property (AMQP `correlation-id`).
    pub correlation_id: bool,
    /// The content type is a property (AMQP `content-type`).
    pub content_type: bool,
    /// The message type is a property (AMQP `type`).
    pub message_type: bool,
    /// The reply-to channel is a property (AMQP `reply-to`).
    pub reply_to: bool,
}

/// The header of a CloudEvents attribute under `binding`, without allocating.
fn ce_header(binding: CloudEventsBinding, attribute: &str) -> &'static str {
    let kafka = binding == CloudEventsBinding::Kafka;
    match attribute {
        "id" if kafka => "ce_id",
        "id" => "cloudEvents_id",
        "time" if kafka => "ce_time",
        "time" => "cloudEvents_time",
        "specversion" if kafka => "ce_specversion",
        "specversion" => "cloudEvents_specversion",
        "source" if kafka => "ce_source",
        "source" => "cloudEvents_source",
        "type" if kafka => "ce_type",
        "type" => "cloudEvents_type",
        "subject" if kafka => "ce_subject",
        "subject" => "cloudEvents_subject",
        "dataschema" if kafka => "ce_dataschema",
        "dataschema" => "cloudEvents_dataschema",
        _ if kafka => "ce_datacontenttype",
        _ => "cloudEvents_datacontenttype",
    }
}

/// `time` in RFC 3339, UTC, with microseconds (`nanos`: nanoseconds), into
/// `buf`; `None` for a year outside 0..=9999 or a leap second.
fn format_time<'b>(time: &DateTime<Utc>, nanos: bool, buf: &'b mut [u8; 40]) -> Option<&'b str> {
    use chrono::{Datelike, Timelike};
    let year = time.year();
    // A leap second (nanoseconds past 999,999,999) is chrono's to write.
    if !(0..=9999).contains(&year) || time.nanosecond() >= 1_000_000_000 {
        return None;
    }
    fn digits(buf: &mut [u8], at: usize, mut value: u32, width: usize) -> usize {
        for i in (0..width).rev() {
            buf[at + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
        at + width
    }
    let year = u32::try_from(year).ok()?;
    let mut at = digits(buf, 0, year, 4);
    for (separator, value) in [
        (b'-', time.month()),
        (b'-', time.day()),
        (b'T', time.hour()),
        (b':', time.minute()),
        (b':', time.second()),
    ] {
        buf[at] = separator;
        at = digits(buf, at + 1, value, 2);
    }
    buf[at] = b'.';
    let fraction = time.nanosecond();
    at = if nanos {
        digits(buf, at + 1, fraction, 9)
    } else {
        digits(buf, at + 1, fraction / 1_000, 6)
    };
    buf[at] = b'Z';
    std::str::from_utf8(&buf[..=at]).ok()
}

/// Calls `put` with `time` formatted as [`format_time`] does (or by chrono
/// for a year it does not cover).
fn put_time(time: &DateTime<Utc>, nanos: bool, key: &str, put: &mut impl FnMut(&str, &str)) {
    let mut buf = [0u8; 40];
    match format_time(time, nanos, &mut buf) {
        Some(text) => put(key, text),
        None => {
            let format = if nanos {
                SecondsFormat::Nanos
            } else {
                SecondsFormat::Micros
            };
            put(key, &time.to_rfc3339_opts(format, true));
        }
    }
}

/// Writes `header` as key/value pairs through `put`, the CloudEvents
/// attributes as `binding` names them, leaving out what `carried` says the
/// transport carries otherwise and what [`decode`] reads back without it: the
/// id when `ce_id` carries it, the timestamp when `ce_time` carries it
/// exactly (to the microsecond), a correlation id equal to the id, a
/// requeue count and a delay of zero, the command message type, and the
/// content type when the Kafka binding's `content-type` carries it. Bag
/// entries whose key the codec owns are left out (the field wins). Allocates
/// nothing for a message without a header bag.
// One function: the wire format is the order and the rules below, in one place.
pub fn write(
    header: &MessageHeader,
    binding: CloudEventsBinding,
    carried: Carried<'_>,
    mut put: impl FnMut(&str, &str),
) {
    let ce = &header.cloud_events;
    let cloud_event = ce.specversion.is_some();
    let kafka = binding == CloudEventsBinding::Kafka;
    let mut id_buf = [0u8; 36];
    let id = header.id.hyphenated().encode_lower(&mut id_buf);
    if !carried.id && !cloud_event {
        put(ID, id);
    }
    if carried.topic != Some(header.topic.as_str()) {
        put(TOPIC, &header.topic);
    }
    if !carried.message_type && header.message_type != MessageType::Command {
        put(MESSAGE_TYPE, header.message_type.as_str());
    }
    if !cloud_event
        || !header
            .timestamp
            .timestamp_subsec_nanos()
            .is_multiple_of(1_000)
    {
        put_time(&header.timestamp, true, TIMESTAMP, &mut put);
    }
    if !carried.correlation_id && header.correlation_id != header.id {
        let mut buf = [0u8; 36];
        put(
            CORRELATION_ID,
            header.correlation_id.hyphenated().encode_lower(&mut buf),
        );
    }
    // The Kafka binding's `content-type` carries it for a CloudEvent.
    if !(carried.content_type || cloud_event && kafka) {
        put(CONTENT_TYPE, &header.content_type);
    }
    if header.handled_count != 0 {
        put(HANDLED_COUNT, &header.handled_count.to_string());
    }
    if !header.delay.is_zero() {
        put(DELAY_MS, &header.delay.as_millis().to_string());
    }
    if let Some(reply_to) = header.reply_to.as_deref().filter(|_| !carried.reply_to) {
        put(REPLY_TO, reply_to);
    }
    if let Some(key) = header
        .partition_key
        .as_deref()
        .filter(|_| !carried.partition_key)
    {
        put(PARTITION_KEY, key);
    }
    for (key, value) in [
        (TRACEPARENT, &header.trace.traceparent),
        (TRACESTATE, &header.trace.tracestate),
        (BAGGAGE, &header.trace.baggage),
    ] {
        if let Some(value) = value {
            put(key, value);
        }
    }
    // CloudEvents: the event's id and time are the message's; the message
    // builder sets specversion, source and type on every message it makes.
    if cloud_event {
        put(ce_header(binding, "id"), id);
        put_time(
            &header.timestamp,
            false,
            ce_header(binding, "time"),
            &mut put,
        );
        if kafka {
            put(KAFKA_CONTENT_TYPE, &header.content_type);
        }
    }
    for (attribute, value) in [
        ("specversion", &ce.specversion),
        ("source", &ce.source),
        ("type", &ce.kind),
        ("subject", &ce.subject),
        ("dataschema", &ce.dataschema),
    ] {
        if let Some(value) = value {
            put(ce_header(binding, attribute), value);
        }
    }
    for (key, value) in &header.bag {
        if !is_reserved(key) {
            put(key, value);
        }
    }
}

/// [`write()`] into owned pairs, with nothing carried outside the headers.
pub fn encode(header: &MessageHeader, binding: CloudEventsBinding) -> Vec<(String, String)> {
    let mut pairs = Vec::with_capacity(12);
    write(header, binding, Carried::default(), |key, value| {
        pairs.push((key.to_owned(), value.to_owned()));
    });
    pairs
}

/// The header fields [`decode`] reads, by where it files them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Id,
    Topic,
    MessageType,
    Timestamp,
    CorrelationId,
    ReplyTo,
    ContentType,
    PartitionKey,
    HandledCount,
    Delay,
    Traceparent,
    Tracestate,
    Baggage,
    CeId,
    CeSource,
    CeSpecversion,
    CeType,
    CeTime,
    CeSubject,
    CeDataschema,
    CeDatacontenttype,
}

const FIELDS: usize = 21;

/// The field a header key is read into, if the codec owns one by that name:
/// a CloudEvents attribute under any binding's name, and the Kafka
/// binding's `content-type` as `datacontenttype`.
fn field_of(key: &[u8]) -> Option<Field> {
    // The names of the fields as bytes: a header name is matched as it comes,
    // and checked as UTF-8 only when it is none of them.
    const ID_: &[u8] = ID.as_bytes();
    const TOPIC_: &[u8] = TOPIC.as_bytes();
    const MESSAGE_TYPE_: &[u8] = MESSAGE_TYPE.as_bytes();
    const TIMESTAMP_: &[u8] = TIMESTAMP.as_bytes();
    const CORRELATION_ID_: &[u8] = CORRELATION_ID.as_bytes();
    const REPLY_TO_: &[u8] = REPLY_TO.as_bytes();
    const CONTENT_TYPE_: &[u8] = CONTENT_TYPE.as_bytes();
    const PARTITION_KEY_: &[u8] = PARTITION_KEY.as_bytes();
    const HANDLED_COUNT_: &[u8] = HANDLED_COUNT.as_bytes();
    const DELAY_MS_: &[u8] = DELAY_MS.as_bytes();
    const TRACEPARENT_: &[u8] = TRACEPARENT.as_bytes();
    const TRACESTATE_: &[u8] = TRACESTATE.as_bytes();
    const BAGGAGE_: &[u8] = BAGGAGE.as_bytes();
    const KAFKA_CONTENT_TYPE_: &[u8] = KAFKA_CONTENT_TYPE.as_bytes();
    Some(match key {
        ID_ => Field::Id,
        TOPIC_ => Field::Topic,
        MESSAGE_TYPE_ => Field::MessageType,
        TIMESTAMP_ => Field::Timestamp,
        CORRELATION_ID_ => Field::CorrelationId,
        REPLY_TO_ => Field::ReplyTo,
        CONTENT_TYPE_ => Field::ContentType,
        PARTITION_KEY_ => Field::PartitionKey,
        HANDLED_COUNT_ => Field::HandledCount,
        DELAY_MS_ => Field::Delay,
        TRACEPARENT_ => Field::Traceparent,
        TRACESTATE_ => Field::Tracestate,
        BAGGAGE_ => Field::Baggage,
        KAFKA_CONTENT_TYPE_ => Field::CeDatacontenttype,
        _ => match ce_attribute_of(key)? {
            "id" => Field::CeId,
            "source" => Field::CeSource,
            "specversion" => Field::CeSpecversion,
            "type" => Field::CeType,
            "time" => Field::CeTime,
            "subject" => Field::CeSubject,
            "dataschema" => Field::CeDataschema,
            _ => Field::CeDatacontenttype,
        },
    })
}

/// The name `decode`'s `fallback` is asked for, for a field missing from the
/// pairs: the header key of the field (a CloudEvents attribute's Kafka name).
fn fallback_name(field: Field) -> &'static str {
    match field {
        Field::Id => ID,
        Field::Topic => TOPIC,
        Field::MessageType => MESSAGE_TYPE,
        Field::Timestamp => TIMESTAMP,
        Field::CorrelationId => CORRELATION_ID,
        Field::ReplyTo => REPLY_TO,
        Field::ContentType => CONTENT_TYPE,
        Field::PartitionKey => PARTITION_KEY,
        Field::HandledCount => HANDLED_COUNT,
        Field::Delay => DELAY_MS,
        Field::Traceparent => TRACEPARENT,
        Field::Tracestate => TRACESTATE,
        Field::Baggage => BAGGAGE,
        Field::CeId => "ce_id",
        Field::CeSource => "ce_source",
        Field::CeSpecversion => "ce_specversion",
        Field::CeType => "ce_type",
        Field::CeTime => "ce_time",
        Field::CeSubject => "ce_subject",
        Field::CeDataschema => "ce_dataschema",
        Field::CeDatacontenttype => KAFKA_CONTENT_TYPE,
    }
}

/// A header from key/value pairs. Fails with [`Error::Mapping`] when the id or
/// topic is missing or unusable, or a field the codec owns is not UTF-8; other
/// fields default when missing or malformed; unknown keys go to the bag (lossily
/// decoded when not UTF-8). `fallback` supplies values the transport knows
/// otherwise (AMQP properties, the routing key, the record key) for fields
/// that are absent, asked by header key ([`ID`], [`TOPIC`], ...). Of a key
/// given twice, the last one counts. [`decode_borrowed`] reads pairs borrowed
/// from a transport's buffer without copying them first.
pub fn decode<K, V>(
    pairs: impl IntoIterator<Item = (K, V)>,
    fallback: impl Fn(&str) -> Option<String>,
) -> Result<MessageHeader, Error>
where
    K: AsRef<str>,
    V: AsRef<[u8]>,
{
    let pairs: Vec<(K, V)> = pairs.into_iter().collect();
    decode_borrowed(
        pairs
            .iter()
            .map(|(k, v)| (k.as_ref().as_bytes(), v.as_ref())),
        |key| fallback(key).map(Cow::Owned),
    )
}

/// [`decode`] of pairs borrowed from the transport's own buffer (Kafka
/// record headers, an AMQP headers table): only the values the header keeps
/// are copied out. Names come as bytes, as Kafka carries them: one that is
/// not UTF-8 names no field of ours and goes to the bag under its lossy
/// text. Its `fallback` may lend its values too.
// One function: each header field is read in one place, next to its default.
pub fn decode_borrowed<'a>(
    pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    fallback: impl Fn(&str) -> Option<Cow<'a, str>>,
) -> Result<MessageHeader, Error> {
    let mut fields: [Option<&'a str>; FIELDS] = [None; FIELDS];
    // The fields read as bytes (ids, times), by `byte_slot`: kept unchecked
    // when ASCII, which is UTF-8; a value that is not goes through the
    // general check instead, into `fields`.
    let mut ascii: [Option<&'a [u8]>; BYTE_FIELDS] = [None; BYTE_FIELDS];
    let mut bag = BTreeMap::new();
    for (key, value) in pairs {
        match field_of(key) {
            Some(field) => {
                let slot = byte_slot(field);
                if let Some(slot) = slot
                    && value.is_ascii()
                {
                    ascii[slot] = Some(value);
                    fields[field as usize] = None;
                    continue;
                }
                let text = std::str::from_utf8(value).map_err(|_| {
                    Error::Mapping(format!(
                        "header '{}' is not valid UTF-8",
                        String::from_utf8_lossy(key)
                    ))
                })?;
                fields[field as usize] = Some(text);
                if let Some(slot) = slot {
                    ascii[slot] = None;
                }
            }
            None => {
                let key = String::from_utf8_lossy(key);
                if !is_reserved(&key) {
                    bag.insert(
                        key.into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    );
                }
            }
        }
    }
    let ascii_of = |field: Field| byte_slot(field).and_then(|slot| ascii[slot]);
    let get = |field: Field| -> Option<Cow<'a, str>> {
        match (fields[field as usize], ascii_of(field)) {
            (Some(text), _) => Some(Cow::Borrowed(text)),
            // ASCII: never fails.
            (None, Some(bytes)) => std::str::from_utf8(bytes).ok().map(Cow::Borrowed),
            (None, None) => fallback(fallback_name(field)),
        }
    };
    // A field read as bytes: as it came when ASCII, else its text.
    let bytes = |field: Field| -> Option<Cow<'a, [u8]>> {
        match ascii_of(field) {
            Some(bytes) => Some(Cow::Borrowed(bytes)),
            None => get(field).map(|text| match text {
                Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
                Cow::Owned(text) => Cow::Owned(text.into_bytes()),
            }),
        }
    };
    let owned = |field: Field| get(field).map(Cow::into_owned);
    // A name (topic, content type, CloudEvents attribute): inline when short.
    let name = |field: Field| get(field).map(|text| SmolStr::new(&*text));
    let uuid = |value: &[u8]| uuid_of(value).filter(|id| !id.is_nil());
    let ce_source = name(Field::CeSource);
    let id = bytes(Field::Id)
        .as_deref()
        .and_then(uuid)
        .or_else(|| {
            // An event from elsewhere: its CloudEvents id, or when that is not
            // a UUID, one derived from it and its source (the pair is unique
            // by the spec), so a redelivery keeps its id for the inbox.
            let ce_id = bytes(Field::CeId)?;
            uuid(&ce_id).or_else(|| {
                let ce_id = get(Field::CeId)?;
                let ce_id = Some(ce_id.as_ref()).filter(|id| !id.trim().is_empty())?;
                Some(cloud_event_uuid(ce_source.as_deref().unwrap_or(""), ce_id))
            })
        })
        .ok_or_else(|| Error::Mapping("message has no valid id".into()))?;
    let topic = name(Field::Topic)
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| Error::Mapping(format!("message {id} has no topic")))?;
    let timestamp = bytes(Field::Timestamp)
        .as_deref()
        .and_then(parse_time)
        .or_else(|| bytes(Field::CeTime).as_deref().and_then(parse_time))
        .unwrap_or_else(Utc::now);
    let content_type = name(Field::ContentType)
        .filter(|v| !v.is_empty())
        .or_else(|| name(Field::CeDatacontenttype).filter(|v| !v.is_empty()))
        .unwrap_or_else(|| SmolStr::new_static(JSON_CONTENT_TYPE));
    let delay = Duration::from_millis(get(Field::Delay).and_then(|v| v.parse().ok()).unwrap_or(0));
    let delay = if delay > MAX_DELAY {
        // A time from the wire is not trusted: one absurd value must not
        // hold a message (or a partition) back silently.
        tracing::warn!(%id, ?delay, "a delay header longer than {MAX_DELAY:?}; treated as none");
        Duration::ZERO
    } else {
        delay
    };
    Ok(MessageHeader {
        id,
        topic,
        message_type: get(Field::MessageType)
            .and_then(|v| MessageType::parse(&v))
            .unwrap_or_default(),
        timestamp,
        correlation_id: bytes(Field::CorrelationId)
            .as_deref()
            .and_then(uuid_of)
            .unwrap_or(id),
        reply_to: name(Field::ReplyTo).filter(|v| !v.is_empty()),
        content_type,
        partition_key: owned(Field::PartitionKey),
        handled_count: get(Field::HandledCount)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        delay,
        bag,
        cloud_events: CloudEvents {
            source: ce_source,
            kind: name(Field::CeType),
            subject: name(Field::CeSubject),
            dataschema: name(Field::CeDataschema),
            specversion: name(Field::CeSpecversion),
        },
        trace: TraceContext {
            traceparent: owned(Field::Traceparent),
            tracestate: owned(Field::Tracestate),
            baggage: owned(Field::Baggage),
        },
    })
}

/// The message id of a CloudEvent whose id is not a UUID: a name-based
/// (SHA-1, version 5) UUID of its source and id.
pub fn cloud_event_uuid(source: &str, id: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("{source}#{id}").as_bytes())
}

/// How many fields `decode` reads from their bytes.
const BYTE_FIELDS: usize = 5;

/// Where `decode` keeps `field` when it reads it from its bytes (a UUID or a
/// time): such a value needs no UTF-8 check when it is ASCII.
fn byte_slot(field: Field) -> Option<usize> {
    match field {
        Field::Id => Some(0),
        Field::CeId => Some(1),
        Field::CorrelationId => Some(2),
        Field::Timestamp => Some(3),
        Field::CeTime => Some(4),
        _ => None,
    }
}

/// A UUID in any of its text forms, around which whitespace is allowed.
fn uuid_of(value: &[u8]) -> Option<Uuid> {
    Uuid::try_parse_ascii(value.trim_ascii()).ok().or_else(|| {
        // Whitespace `trim_ascii` keeps (a vertical tab, Unicode spaces).
        let text = std::str::from_utf8(value).ok()?;
        Uuid::try_parse(text.trim()).ok()
    })
}

/// An RFC 3339 time, or milliseconds since the Unix epoch (how the AMQP
/// binding's SDKs write `time` as an AMQP timestamp).
fn parse_time(value: &[u8]) -> Option<DateTime<Utc>> {
    if let Some(time) = parse_utc_time(value.trim_ascii()) {
        return Some(time);
    }
    let value = std::str::from_utf8(value).ok()?.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Some(time.with_timezone(&Utc));
    }
    value
        .parse::<i64>()
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
}

/// The common case of [`parse_time`] without chrono's general parser:
/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, as [`write`] and most producers write
/// it; `None` for anything else (an offset, a leap second), which chrono
/// reads.
fn parse_utc_time(text: &[u8]) -> Option<DateTime<Utc>> {
    let number = |from: usize, to: usize| -> Option<u32> {
        let digits = text.get(from..to)?;
        digits.iter().try_fold(0u32, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let at = |i: usize, expected: &[u8]| text.get(i).is_some_and(|c| expected.contains(c));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    if second > 59 {
        return None;
    }
    let mut end = 19;
    let mut nanos = 0u32;
    if at(19, b".") {
        let digits = text[20..].iter().take_while(|d| d.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        end = 20 + digits;
        let kept = digits.min(9);
        nanos = number(20, 20 + kept)? * 10u32.pow(u32::try_from(9 - kept).ok()?);
    }
    if end + 1 != text.len() || !at(end, b"Zz") {
        return None;
    }
    chrono::NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?
        .and_hms_nano_opt(hour, minute, second, nanos)
        .map(|time| time.and_utc())
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
    fn times_are_written_as_chrono_writes_them() {
        let times = [
            "2026-12-06T12:43:16.123456789Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "1970-01-01T00:00:00.000001Z",
        ];
        for text in times {
            let time = DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc);
            for (nanos, format) in [(true, SecondsFormat::Nanos), (false, SecondsFormat::Micros)] {
                let mut buf = [0u8; 40];
                assert_eq!(
                    format_time(&time, nanos, &mut buf),
                    Some(time.to_rfc3339_opts(format, true).as_str()),
                    "{text}"
                );
            }
        }
        // Outside what the fast path covers, chrono writes it.
        let far = DateTime::parse_from_rfc3339("+10000-01-01T00:00:00Z");
        if let Ok(far) = far {
            assert!(format_time(&far.with_timezone(&Utc), true, &mut [0u8; 40]).is_none());
        }
    }

    #[test]
    fn times_are_read_as_chrono_reads_them() {
        for text in [
            "2026-12-06T12:43:16Z",
            "2026-12-06T12:43:16.1Z",
            "2026-12-06T12:43:16.123456Z",
            "2026-12-06t12:43:16.123456789z",
            "2026-12-06T12:43:16.1234567891234Z",
            "2026-02-28T23:59:59.999999Z",
            "0001-01-01T00:00:00Z",
        ] {
            let chrono = DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc);
            assert_eq!(parse_utc_time(text.as_bytes()), Some(chrono), "{text}");
            assert_eq!(parse_time(text.as_bytes()), Some(chrono), "{text}");
        }
        // Left to chrono (or refused): offsets, leap seconds, malformed text.
        for text in [
            "2026-12-06T12:43:16+01:00",
            "2026-12-06T23:59:60Z",
            "2026-02-30T00:00:00Z",
            "2026-12-06T12:43:16.Z",
            "2026-12-06T12:43:16.5",
            "2026-12-06 12:43:16Z",
            "2026-1x-06T12:43:16Z",
            "",
        ] {
            assert_eq!(parse_utc_time(text.as_bytes()), None, "{text}");
            assert_eq!(
                parse_time(text.as_bytes()),
                DateTime::parse_from_rfc3339(text)
                    .ok()
                    .map(|t| t.with_timezone(&Utc)),
                "{text}"
            );
        }
    }

    #[test]
    fn the_headers_leave_out_what_decoding_reads_back_without_them() {
        let mut h = MessageHeader::new("orders", MessageType::Command);
        h.cloud_events.source = Some("urn:shop".into());
        h.cloud_events.kind = Some("PlaceOrder".into());
        h.cloud_events.specversion = Some("1.0".into());
        h.partition_key = Some("k".into());
        let keys = |binding, carried| {
            let mut keys = Vec::new();
            write(&h, binding, carried, |k, _| keys.push(k.to_owned()));
            keys
        };
        let kafka = keys(
            CloudEventsBinding::Kafka,
            Carried {
                topic: Some("orders"),
                partition_key: true,
                ..Carried::default()
            },
        );
        assert_eq!(
            kafka,
            [
                "ce_id",
                "ce_time",
                "content-type",
                "ce_specversion",
                "ce_source",
                "ce_type"
            ]
        );
        let amqp = keys(
            CloudEventsBinding::Amqp,
            Carried {
                id: true,
                correlation_id: true,
                content_type: true,
                message_type: true,
                reply_to: true,
                ..Carried::default()
            },
        );
        assert_eq!(
            amqp,
            [
                TOPIC,
                PARTITION_KEY,
                "cloudEvents_id",
                "cloudEvents_time",
                "cloudEvents_specversion",
                "cloudEvents_source",
                "cloudEvents_type"
            ]
        );
        // With nothing carried, what is left out still reads back whole.
        for binding in [CloudEventsBinding::Kafka, CloudEventsBinding::Amqp] {
            assert_eq!(decode(encode(&h, binding), |_| None).unwrap(), h);
        }
        // A time with nanoseconds (not from MessageHeader::new) keeps them.
        h.timestamp = DateTime::parse_from_rfc3339("2026-12-06T12:43:16.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        h.correlation_id = Uuid::now_v7();
        h.message_type = MessageType::Event;
        h.handled_count = 2;
        h.delay = Duration::from_millis(5);
        let pairs = encode(&h, CloudEventsBinding::Kafka);
        for key in [
            TIMESTAMP,
            CORRELATION_ID,
            MESSAGE_TYPE,
            HANDLED_COUNT,
            DELAY_MS,
        ] {
            assert!(pairs.iter().any(|(k, _)| k == key), "{key}");
        }
        assert_eq!(decode(pairs, |_| None).unwrap(), h);
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

    #[test]
    fn a_header_name_is_matched_as_bytes_and_one_not_utf8_goes_to_the_bag() {
        let id = Uuid::now_v7().to_string();
        let pairs: [(&[u8], &[u8]); 4] = [
            (b"ce_id", id.as_bytes()),
            (TOPIC.as_bytes(), b"t"),
            (b"ce_source", b"urn:x"),
            (b"tenant-\xff", b"acme"),
        ];
        let h = decode_borrowed(pairs, |_| None).unwrap();
        assert_eq!(h.id.to_string(), id);
        assert_eq!(h.cloud_events.source.as_deref(), Some("urn:x"));
        assert_eq!(
            h.bag.get("tenant-\u{fffd}").map(String::as_str),
            Some("acme")
        );
        assert_eq!(h.bag.len(), 1, "{:?}", h.bag);
    }

    #[test]
    fn ids_and_times_read_as_bytes_keep_the_text_rules() {
        let id = Uuid::now_v7();
        let other = Uuid::now_v7();
        let time = "2026-12-06T12:43:16.123456Z";
        let at = DateTime::parse_from_rfc3339(time)
            .unwrap()
            .with_timezone(&Utc);
        let read = |pairs: Vec<(&str, Vec<u8>)>| decode(pairs, |_| None);
        // Whitespace around them, ASCII or not (a vertical tab, a no-break
        // space), as `str::trim` takes it off.
        for (pad_l, pad_r) in [(" ", "\t"), ("\u{b}", "\u{b}"), ("\u{a0}", "\u{2003}")] {
            let h = read(vec![
                (ID, format!("{pad_l}{id}{pad_r}").into_bytes()),
                (TOPIC, b"t".to_vec()),
                (TIMESTAMP, format!("{pad_l}{time}{pad_r}").into_bytes()),
                (
                    CORRELATION_ID,
                    format!("{pad_l}{other}{pad_r}").into_bytes(),
                ),
            ])
            .unwrap();
            assert_eq!((h.id, h.timestamp, h.correlation_id), (id, at, other));
        }
        // A value that is not UTF-8 is refused, as for every field of ours.
        for key in [ID, CORRELATION_ID, TIMESTAMP, "ce_time"] {
            let mut pairs = vec![(ID, id.to_string().into_bytes()), (TOPIC, b"t".to_vec())];
            pairs.push((key, vec![b'1', 0xff]));
            let error = read(pairs).unwrap_err().to_string();
            assert!(error.contains(&format!("header '{key}'")), "{error}");
        }
        // Of a key given twice, the last counts, ASCII or not.
        let h = read(vec![
            (ID, id.to_string().into_bytes()),
            (ID, format!("\u{a0}{other}").into_bytes()),
            (TOPIC, b"t".to_vec()),
        ])
        .unwrap();
        assert_eq!(h.id, other);
        let h = read(vec![
            (ID, format!("\u{a0}{other}").into_bytes()),
            (ID, id.to_string().into_bytes()),
            (TOPIC, b"t".to_vec()),
        ])
        .unwrap();
        assert_eq!(h.id, id);
        // A CloudEvents id that is no UUID still names the message.
        let h = read(vec![
            ("ce_id", b" order-42 ".to_vec()),
            ("ce_source", b"urn:shop".to_vec()),
            (TOPIC, b"t".to_vec()),
        ])
        .unwrap();
        assert_eq!(h.id, cloud_event_uuid("urn:shop", " order-42 "));
        assert!(read(vec![("ce_id", b"  ".to_vec()), (TOPIC, b"t".to_vec())]).is_err());
    }
}
