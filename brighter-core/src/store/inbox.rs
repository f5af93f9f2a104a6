//! The inbox contract: a record of which messages were handled, keyed by
//! (message id, context key), so that at-least-once delivery does the work once.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::Error;
use crate::message::MessageType;
use crate::store::Transaction;
use crate::{Request, RequestContext};

/// What an inbox records of a handled message: its key (message id and
/// context) and, for rebuilding a conversation, its correlation id, request
/// type, message type and topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboxEntry {
    /// The message (request) id.
    pub id: Uuid,
    /// The handler's context key.
    pub context_key: String,
    /// The conversation it belongs to.
    pub correlation_id: Option<Uuid>,
    /// The request's type (its short name).
    pub request_type: Option<String>,
    /// Command, event or document, when it came as a message.
    pub message_type: Option<MessageType>,
    /// The topic it came from, when it came as a message.
    pub topic: Option<String>,
    /// When it was recorded (set by the store, when read back).
    pub handled_at: Option<DateTime<Utc>>,
}

impl InboxEntry {
    /// An entry with the key alone.
    pub fn new(id: Uuid, context_key: impl Into<String>) -> Self {
        InboxEntry {
            id,
            context_key: context_key.into(),
            ..InboxEntry::default()
        }
    }

    /// The entry of `request`, handled in `context_key` with `ctx`: its
    /// conversation, its type, and the message it came in (if it did).
    pub fn of<R: Request>(request: &R, ctx: &RequestContext, context_key: &str) -> Self {
        let message = ctx.message();
        InboxEntry {
            id: request.id(),
            context_key: context_key.to_owned(),
            correlation_id: Some(ctx.correlation_id()).filter(|c| !c.is_nil()),
            request_type: Some(crate::messenger::short_type_name::<R>().to_owned()),
            message_type: message.map(|m| m.header.message_type),
            topic: message.map(|m| m.header.topic.to_string()),
            handled_at: None,
        }
    }
}

/// Records handled messages.
///
/// Implementations backed by a database join the caller's transaction in
/// [`add`](Inbox::add), so the record commits with the handler's own writes.
#[async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// Records `id` as handled in `context_key`. Fails with [`Error::Duplicate`]
    /// when it already was; the record commits with `tx` when one is given.
    async fn add(
        &self,
        id: Uuid,
        context_key: &str,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error>;

    /// Whether `id` was recorded as handled in `context_key`.
    async fn exists(&self, id: Uuid, context_key: &str) -> Result<bool, Error>;

    /// Records `entry` as [`add`](Self::add) does, with what it says of the
    /// message for rebuilding its conversation. By default only its key is
    /// kept.
    async fn record(
        &self,
        entry: &InboxEntry,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        self.add(entry.id, &entry.context_key, tx).await
    }

    /// The entries of conversation `correlation_id`, oldest first. By
    /// default an inbox cannot tell (a configuration error).
    async fn by_correlation(&self, correlation_id: Uuid) -> Result<Vec<InboxEntry>, Error> {
        let _ = correlation_id;
        Err(Error::configuration(
            "this inbox keeps no correlation ids: it cannot list a conversation",
        ))
    }
}

#[async_trait]
impl<T: Inbox + ?Sized> Inbox for Arc<T> {
    async fn add(
        &self,
        id: Uuid,
        context_key: &str,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        (**self).add(id, context_key, tx).await
    }

    async fn exists(&self, id: Uuid, context_key: &str) -> Result<bool, Error> {
        (**self).exists(id, context_key).await
    }

    async fn record(
        &self,
        entry: &InboxEntry,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        (**self).record(entry, tx).await
    }

    async fn by_correlation(&self, correlation_id: Uuid) -> Result<Vec<InboxEntry>, Error> {
        (**self).by_correlation(correlation_id).await
    }
}
