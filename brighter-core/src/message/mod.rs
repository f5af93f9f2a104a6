//! The message model: what travels through the outbox and over a broker. A
//! [`Message`] is a [`MessageHeader`] plus a byte body; mappers turn requests
//! into messages and back, publications say where a request type goes,
//! transforms wrap and unwrap bodies, and the wire codec writes headers for
//! the brokers.

pub(crate) mod mapper;
pub(crate) mod publication;
pub(crate) mod transform;
pub mod wire;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
pub use smol_str::SmolStr;
use uuid::Uuid;

/// What a message carries: a command for one consumer, an event for any number,
/// or a document (data without intent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageType {
    /// A command: exactly one handler.
    #[default]
    Command,
    /// An event: any number of handlers.
    Event,
    /// A document: data, no intent.
    Document,
}

impl MessageType {
    /// The wire name: `command`, `event` or `document`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Command => "command",
            MessageType::Event => "event",
            MessageType::Document => "document",
        }
    }

    /// Parses a wire name, tolerant of case; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "command" | "mt_command" => Some(MessageType::Command),
            "event" | "mt_event" => Some(MessageType::Event),
            "document" | "mt_document" => Some(MessageType::Document),
            _ => None,
        }
    }
}

/// CloudEvents context attributes carried with a message. An attribute
/// that is not set is left out when the header is written as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CloudEvents {
    /// `source`: the context in which the event happened (a URI reference).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SmolStr>,
    /// `type`: the kind of event, e.g. `com.example.greeting.sent`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<SmolStr>,
    /// `subject`: the subject of the event within the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<SmolStr>,
    /// `dataschema`: a URI for the schema of the body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<SmolStr>,
    /// `specversion`: the CloudEvents version, `1.0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specversion: Option<SmolStr>,
}

/// W3C trace context (and baggage) carried with a message so a consumer can
/// continue the producer's trace. A field that is not set is left out when
/// written as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TraceContext {
    /// `traceparent` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// `tracestate` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// `baggage` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baggage: Option<String>,
}

/// The header of a [`Message`].
///
/// Reading is tolerant: every field but `id` and `topic` has a default, and
/// unknown fields are ignored when a header is deserialized.
///
/// The names it carries (topic, reply-to, content type and the CloudEvents
/// attributes) are [`SmolStr`]s: set one from a `&str` or a `String` with
/// `.into()`, read it as a `&str`. Up to 23 bytes are held inline and longer
/// ones behind an `Arc`: a short name read off the wire allocates nothing,
/// and a clone (a publication's topic into each message) copies no text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MessageHeader {
    /// Unique, time-ordered id (UUID v7).
    pub id: Uuid,
    /// The topic (routing key) the message is sent to.
    pub topic: SmolStr,
    /// Command, event or document.
    pub message_type: MessageType,
    /// When the message was created.
    pub timestamp: DateTime<Utc>,
    /// Ties together the messages of one conversation.
    pub correlation_id: Uuid,
    /// Where a reply should be sent, for request-reply.
    pub reply_to: Option<SmolStr>,
    /// MIME type of the body, e.g. `application/json`.
    pub content_type: SmolStr,
    /// Messages with the same key are kept in order.
    pub partition_key: Option<String>,
    /// How many times the message has been requeued for another try.
    pub handled_count: u32,
    /// How long the transport should hold the message before delivering it.
    #[serde(with = "duration_millis")]
    pub delay: Duration,
    /// Free-form string headers.
    pub bag: BTreeMap<String, String>,
    /// CloudEvents attributes.
    pub cloud_events: CloudEvents,
    /// W3C trace context.
    pub trace: TraceContext,
}

impl Default for MessageHeader {
    fn default() -> Self {
        MessageHeader {
            id: Uuid::nil(),
            topic: SmolStr::default(),
            message_type: MessageType::Command,
            timestamp: DateTime::<Utc>::UNIX_EPOCH,
            correlation_id: Uuid::nil(),
            reply_to: None,
            content_type: SmolStr::new_static(JSON_CONTENT_TYPE),
            partition_key: None,
            handled_count: 0,
            delay: Duration::ZERO,
            bag: BTreeMap::new(),
            cloud_events: CloudEvents::default(),
            trace: TraceContext::default(),
        }
    }
}

/// The content type of the default JSON mapper.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The CloudEvents `specversion` every message is written with.
pub(crate) const CLOUD_EVENTS_SPEC_VERSION: &str = "1.0";

impl MessageHeader {
    /// A header for a new message to `topic`: a fresh UUID v7 id, now as timestamp
    /// (to the microsecond, as the outbox and the CloudEvents `time` keep it),
    /// and the id as correlation id.
    pub fn new(topic: impl Into<SmolStr>, message_type: MessageType) -> Self {
        let id = Uuid::now_v7();
        MessageHeader {
            id,
            topic: topic.into(),
            message_type,
            timestamp: chrono::SubsecRound::trunc_subsecs(Utc::now(), 6),
            correlation_id: id,
            ..MessageHeader::default()
        }
    }
}

/// A message: header and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The header.
    pub header: MessageHeader,
    /// The body, opaque bytes (JSON for the default mapper).
    pub body: Bytes,
}

impl Message {
    /// A message from a header and a body.
    pub fn new(header: MessageHeader, body: impl Into<Bytes>) -> Self {
        Message {
            header,
            body: body.into(),
        }
    }

    /// The message id.
    pub fn id(&self) -> Uuid {
        self.header.id
    }

    /// The body read as JSON into `T` (what the default mapper writes); fails
    /// with [`Error::Mapping`](crate::Error::Mapping) when it is not one.
    pub fn body_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::Error> {
        serde_json::from_slice(&self.body).map_err(|e| {
            crate::Error::Mapping(format!(
                "body of message {} is not a {}: {e}",
                self.header.id,
                std::any::type_name::<T>()
            ))
        })
    }

    /// Checks what writing must guarantee: a non-nil id, a non-empty topic and a
    /// content type. Producers and outboxes call this before accepting a message.
    pub fn validate_for_send(&self) -> Result<(), crate::Error> {
        if self.header.id.is_nil() {
            return Err(crate::Error::Mapping("message id is nil".into()));
        }
        if self.header.topic.trim().is_empty() {
            return Err(crate::Error::Mapping(format!(
                "message {} has no topic",
                self.header.id
            )));
        }
        if self.header.content_type.trim().is_empty() {
            return Err(crate::Error::Mapping(format!(
                "message {} has no content type",
                self.header.id
            )));
        }
        Ok(())
    }
}

mod duration_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    #[test]
    fn unset_attributes_are_left_out_of_json_and_explicit_nulls_still_read() {
        let ce = CloudEvents {
            source: Some("urn:x".into()),
            ..CloudEvents::default()
        };
        assert_eq!(
            serde_json::to_value(&ce).unwrap(),
            json!({"source": "urn:x"})
        );
        assert_eq!(
            serde_json::to_value(TraceContext::default()).unwrap(),
            json!({})
        );
        // Rows and documents written before kept every field, null when unset.
        let written_before = json!({
            "source": "urn:x", "type": null, "subject": null, "dataschema": null, "specversion": null
        });
        assert_eq!(
            serde_json::from_value::<CloudEvents>(written_before).unwrap(),
            ce
        );
        let written_before = json!({"traceparent": null, "tracestate": null, "baggage": null});
        assert_eq!(
            serde_json::from_value::<TraceContext>(written_before).unwrap(),
            TraceContext::default()
        );
    }
}
