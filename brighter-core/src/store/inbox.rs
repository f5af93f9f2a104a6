//! The inbox contract: a record of which messages were handled, keyed by
//! (message id, context key), so that at-least-once delivery does the work once.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::Error;
use crate::store::Transaction;

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
}
