//! Publications: which topic a request type is sent to, through which producer,
//! with which CloudEvents attributes and transforms.

use std::fmt;
use std::sync::Arc;

use crate::Request;
use crate::message::transform::Transform;
use crate::message::{CloudEvents, MessageType, SmolStr};
use crate::operate::asyncapi::DescribedReply;

/// Where and how a request type is sent. Register one per request type with
/// `CommandProcessorBuilder::publication`.
///
/// ```
/// use brighter_core::Publication;
///
/// let publication = Publication::event("orders.placed")
///     .producer("kafka")
///     .source("urn:service:orders")
///     .cloud_event_type("com.example.order.placed")
///     .subject("order");
/// assert_eq!(publication.topic, "orders.placed");
/// ```
#[derive(Clone)]
#[must_use]
pub struct Publication {
    /// The topic (routing key) messages are sent to.
    pub topic: SmolStr,
    /// Command, event or document.
    pub message_type: MessageType,
    /// The named producer to send with; `None` means the producer registered for
    /// the topic, or else the default producer.
    pub producer: Option<String>,
    /// CloudEvents attributes; `type` defaults to the request's type name,
    /// `source` to the processor's source, `specversion` to `1.0`.
    pub cloud_events: CloudEvents,
    /// Transforms applied in order when a message is written (and undone in
    /// reverse order by a subscription's transforms when read).
    pub transforms: Vec<Arc<dyn Transform>>,
    /// Whether a message no queue is bound to counts as sent (and is gone)
    /// rather than failing and staying in the outbox: see
    /// [`drop_if_unrouted`](Self::drop_if_unrouted).
    pub drop_if_unrouted: bool,
    /// What requests of this publication are answered with when sent with
    /// `call`: see [`replies_with`](Self::replies_with).
    pub reply: Option<DescribedReply>,
}

impl fmt::Debug for Publication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publication")
            .field("topic", &self.topic)
            .field("message_type", &self.message_type)
            .field("producer", &self.producer)
            .field("cloud_events", &self.cloud_events)
            .field("transforms", &self.transforms.len())
            .field("drop_if_unrouted", &self.drop_if_unrouted)
            .field("reply", &self.reply.as_ref().map(|r| r.name))
            .finish()
    }
}

impl Publication {
    /// A publication of `message_type` messages to `topic`.
    pub fn new(topic: impl Into<SmolStr>, message_type: MessageType) -> Self {
        Publication {
            topic: topic.into(),
            message_type,
            producer: None,
            cloud_events: CloudEvents::default(),
            transforms: Vec::new(),
            drop_if_unrouted: false,
            reply: None,
        }
    }

    /// Commands to `topic`.
    pub fn command(topic: impl Into<SmolStr>) -> Self {
        Publication::new(topic, MessageType::Command)
    }

    /// Events to `topic`.
    pub fn event(topic: impl Into<SmolStr>) -> Self {
        Publication::new(topic, MessageType::Event)
    }

    /// Documents to `topic`.
    pub fn document(topic: impl Into<SmolStr>) -> Self {
        Publication::new(topic, MessageType::Document)
    }

    /// Sends through the producer registered under `name`.
    pub fn producer(mut self, name: impl Into<String>) -> Self {
        self.producer = Some(name.into());
        self
    }

    /// CloudEvents `source`.
    pub fn source(mut self, source: impl Into<SmolStr>) -> Self {
        self.cloud_events.source = Some(source.into());
        self
    }

    /// CloudEvents `type`.
    pub fn cloud_event_type(mut self, kind: impl Into<SmolStr>) -> Self {
        self.cloud_events.kind = Some(kind.into());
        self
    }

    /// CloudEvents `subject`.
    pub fn subject(mut self, subject: impl Into<SmolStr>) -> Self {
        self.cloud_events.subject = Some(subject.into());
        self
    }

    /// CloudEvents `dataschema`.
    pub fn dataschema(mut self, dataschema: impl Into<SmolStr>) -> Self {
        self.cloud_events.dataschema = Some(dataschema.into());
        self
    }

    /// Events only: when no queue is bound to the topic (nobody subscribes
    /// yet), the broker's refusal counts as a successful send, so the message
    /// is marked dispatched and gone, as a broker without subscribers drops an
    /// event. Without this, every message to a topic that no queue is bound
    /// to is an [`Error::Unroutable`](crate::Error::Unroutable) send failure
    /// and stays in the outbox until a queue is there. A command (or a
    /// document) must reach its handler, so the processor refuses to build
    /// with this set on one.
    pub fn drop_if_unrouted(mut self) -> Self {
        self.drop_if_unrouted = true;
        self
    }

    /// Requests of this publication are sent with `call` and answered with
    /// `R` on the caller's reply channel: the AsyncAPI document shows the
    /// reply (its channel and message) with the send operation.
    pub fn replies_with<R: Request>(mut self) -> Self {
        self.reply = Some(DescribedReply {
            request_type: std::any::type_name::<R>(),
            name: crate::messenger::short_type_name::<R>(),
            schema: R::json_schema(),
        });
        self
    }

    /// Adds a transform applied when messages are written.
    pub fn transform(mut self, transform: impl Transform) -> Self {
        self.transforms.push(Arc::new(transform));
        self
    }
}
