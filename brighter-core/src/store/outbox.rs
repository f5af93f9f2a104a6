//! The outbox contract. A message is added to the
//! outbox in the caller's transaction, sent by `clear_outbox` or a sweeper, and
//! marked dispatched once the broker confirmed it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::Error;
use crate::message::Message;
use crate::store::Transaction;

/// Stores messages until they are sent.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Adds `messages`; with `tx`, they commit or roll back with the caller's
    /// transaction. A message id already in the outbox fails the whole call.
    async fn add(
        &self,
        messages: &[Message],
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error>;

    /// The messages among `ids` that are not dispatched yet, in the order they were added.
    async fn get(&self, ids: &[Uuid]) -> Result<Vec<Message>, Error>;

    /// Up to `limit` messages not dispatched yet and added at least `older_than`
    /// ago, oldest first.
    async fn outstanding(&self, older_than: Duration, limit: usize) -> Result<Vec<Message>, Error>;

    /// How many messages are not dispatched yet.
    async fn outstanding_count(&self) -> Result<u64, Error>;

    /// Marks `ids` dispatched at `at`.
    async fn mark_dispatched(&self, ids: &[Uuid], at: DateTime<Utc>) -> Result<(), Error>;

    /// Records a failed attempt to send `id`.
    async fn mark_failed(&self, id: Uuid, error: &str) -> Result<(), Error>;

    /// Deletes messages dispatched more than `older_than` ago; returns how many.
    async fn delete_dispatched(&self, older_than: Duration) -> Result<u64, Error>;
}

#[async_trait]
impl<T: Outbox + ?Sized> Outbox for Arc<T> {
    async fn add(
        &self,
        messages: &[Message],
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        (**self).add(messages, tx).await
    }
    async fn get(&self, ids: &[Uuid]) -> Result<Vec<Message>, Error> {
        (**self).get(ids).await
    }
    async fn outstanding(&self, older_than: Duration, limit: usize) -> Result<Vec<Message>, Error> {
        (**self).outstanding(older_than, limit).await
    }
    async fn outstanding_count(&self) -> Result<u64, Error> {
        (**self).outstanding_count().await
    }
    async fn mark_dispatched(&self, ids: &[Uuid], at: DateTime<Utc>) -> Result<(), Error> {
        (**self).mark_dispatched(ids, at).await
    }
    async fn mark_failed(&self, id: Uuid, error: &str) -> Result<(), Error> {
        (**self).mark_failed(id, error).await
    }
    async fn delete_dispatched(&self, older_than: Duration) -> Result<u64, Error> {
        (**self).delete_dispatched(older_than).await
    }
}
