//! Outbox rows to messages and back.

use std::collections::BTreeMap;
use std::time::Duration;

use brighter_core::{
    CloudEvents, Error, Message, MessageHeader, MessageType, SmolStr, TraceContext,
};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use uuid::Uuid;

/// The columns an outbox row is written with, in bind order.
pub(crate) const INSERT_COLUMNS: &str = "message_id, topic, message_type, message_timestamp, correlation_id, reply_to, \
     content_type, partition_key, handled_count, delay_ms, header_bag, cloud_events, trace_context, body";

/// The columns read back into a message, in `from_row` order.
pub(crate) const SELECT_COLUMNS: &str = "message_id, topic, message_type, message_timestamp, correlation_id, reply_to, \
     content_type, partition_key, handled_count, delay_ms, header_bag, cloud_events, trace_context, body, position, attempts";

/// The longest delay a row is scheduled with (a thousand years): longer
/// ones are cut to it, as Postgres intervals and timestamps end.
const MAX_DELAY_MS: i64 = 1000 * 366 * 24 * 60 * 60 * 1000;

/// The values of one outbox row, ready to bind, borrowed from its message:
/// nothing is copied, and the JSON columns are written straight into the
/// statement's buffer (no `serde_json::Value` built on the way).
pub(crate) struct RowValues<'a> {
    pub(crate) id: Uuid,
    pub(crate) topic: &'a str,
    pub(crate) message_type: &'static str,
    pub(crate) timestamp: DateTime<Utc>,
    pub(crate) correlation_id: Uuid,
    pub(crate) reply_to: Option<&'a str>,
    pub(crate) content_type: &'a str,
    pub(crate) partition_key: Option<&'a str>,
    pub(crate) handled_count: i32,
    pub(crate) delay_ms: i64,
    pub(crate) bag: Json<&'a BTreeMap<String, String>>,
    pub(crate) cloud_events: Json<&'a CloudEvents>,
    pub(crate) trace: Json<&'a TraceContext>,
    pub(crate) body: &'a [u8],
}

impl<'a> RowValues<'a> {
    /// Checks the message is complete (strict writing) and takes its values.
    pub(crate) fn from_message(m: &'a Message) -> Result<Self, Error> {
        m.validate_for_send()?;
        let h = &m.header;
        Ok(RowValues {
            id: h.id,
            topic: &h.topic,
            message_type: h.message_type.as_str(),
            timestamp: h.timestamp,
            correlation_id: h.correlation_id,
            reply_to: h.reply_to.as_deref(),
            content_type: &h.content_type,
            partition_key: h.partition_key.as_deref(),
            handled_count: i32::try_from(h.handled_count).unwrap_or(i32::MAX),
            delay_ms: i64::try_from(h.delay.as_millis())
                .unwrap_or(i64::MAX)
                .min(MAX_DELAY_MS),
            bag: Json(&h.bag),
            cloud_events: Json(&h.cloud_events),
            trace: Json(&h.trace),
            body: &m.body,
        })
    }
}

/// Column arrays for a multi-row `INSERT ... SELECT * FROM UNNEST(...)`,
/// borrowed from the messages as [`RowValues`] are.
#[derive(Default)]
pub(crate) struct Columns<'a> {
    pub(crate) ids: Vec<Uuid>,
    pub(crate) topics: Vec<&'a str>,
    pub(crate) types: Vec<&'static str>,
    pub(crate) timestamps: Vec<DateTime<Utc>>,
    pub(crate) correlation_ids: Vec<Uuid>,
    pub(crate) reply_tos: Vec<Option<&'a str>>,
    pub(crate) content_types: Vec<&'a str>,
    pub(crate) partition_keys: Vec<Option<&'a str>>,
    pub(crate) handled_counts: Vec<i32>,
    pub(crate) delays: Vec<i64>,
    pub(crate) bags: Vec<Json<&'a BTreeMap<String, String>>>,
    pub(crate) cloud_events: Vec<Json<&'a CloudEvents>>,
    pub(crate) traces: Vec<Json<&'a TraceContext>>,
    pub(crate) bodies: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    pub(crate) fn from_messages(messages: &'a [Message]) -> Result<Self, Error> {
        let mut c = Columns::default();
        for m in messages {
            let r = RowValues::from_message(m)?;
            c.ids.push(r.id);
            c.topics.push(r.topic);
            c.types.push(r.message_type);
            c.timestamps.push(r.timestamp);
            c.correlation_ids.push(r.correlation_id);
            c.reply_tos.push(r.reply_to);
            c.content_types.push(r.content_type);
            c.partition_keys.push(r.partition_key);
            c.handled_counts.push(r.handled_count);
            c.delays.push(r.delay_ms);
            c.bags.push(r.bag);
            c.cloud_events.push(r.cloud_events);
            c.traces.push(r.trace);
            c.bodies.push(r.body);
        }
        Ok(c)
    }
}

/// A message read from the outbox, with its row position.
pub(crate) struct OutboxRow {
    pub(crate) message: Message,
    pub(crate) position: i64,
    /// Failed attempts to send it so far.
    pub(crate) attempts: u32,
}

/// Reads a row; tolerant of unknown message types and odd JSON, strict about the
/// columns that cannot be defaulted.
pub(crate) fn from_row(row: &PgRow) -> Result<OutboxRow, sqlx::Error> {
    let message_type: &str = row.try_get(2)?;
    let handled_count: i32 = row.try_get(8)?;
    let delay_ms: i64 = row.try_get(9)?;
    let bag: Json<BTreeMap<String, serde_json::Value>> = row.try_get(10)?;
    let cloud_events: Json<CloudEvents> = row.try_get(11)?;
    let trace: Json<TraceContext> = row.try_get(12)?;
    let body: Vec<u8> = row.try_get(13)?;
    let header = MessageHeader {
        id: row.try_get(0)?,
        topic: SmolStr::new(row.try_get::<&str, _>(1)?),
        message_type: MessageType::parse(message_type).unwrap_or_default(),
        timestamp: row.try_get(3)?,
        correlation_id: row.try_get(4)?,
        reply_to: row.try_get::<Option<&str>, _>(5)?.map(SmolStr::new),
        content_type: SmolStr::new(row.try_get::<&str, _>(6)?),
        partition_key: row.try_get(7)?,
        handled_count: u32::try_from(handled_count).unwrap_or(0),
        delay: Duration::from_millis(u64::try_from(delay_ms).unwrap_or(0)),
        bag: bag
            .0
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        cloud_events: cloud_events.0,
        trace: trace.0,
    };
    Ok(OutboxRow {
        message: Message::new(header, body),
        position: row.try_get(14)?,
        attempts: u32::try_from(row.try_get::<i32, _>(15)?).unwrap_or(0),
    })
}
