//! The inbox contract: a record of which messages were handled, keyed by
//! (message id, context key), so that at-least-once delivery does the work once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::Error;
use crate::transaction::Transaction;

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

/// An inbox in memory: for samples and users' tests. Entries are kept until the
/// inbox is dropped; none is ever evicted.
#[derive(Debug, Default)]
pub struct InMemoryInbox {
    entries: Arc<Mutex<HashSet<(Uuid, String)>>>,
}

impl InMemoryInbox {
    /// An empty inbox.
    pub fn new() -> Self {
        InMemoryInbox::default()
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(Uuid, String)>> {
        lock(&self.entries)
    }

    fn insert(&self, id: Uuid, context_key: &str) -> Result<(), Error> {
        if self.lock().insert((id, context_key.to_owned())) {
            Ok(())
        } else {
            Err(Error::Duplicate {
                id,
                context_key: context_key.to_owned(),
            })
        }
    }
}

#[async_trait]
impl Inbox for InMemoryInbox {
    async fn add(
        &self,
        id: Uuid,
        context_key: &str,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        match tx {
            None => self.insert(id, context_key),
            Some(tx) => {
                let tx = crate::transaction::downcast_transaction::<crate::InMemoryTransaction>(
                    tx,
                    "the in-memory inbox",
                )?;
                if self.exists(id, context_key).await? {
                    return Err(Error::Duplicate {
                        id,
                        context_key: context_key.to_owned(),
                    });
                }
                let entries = Arc::clone(&self.entries);
                let key = (id, context_key.to_owned());
                tx.on_commit(move || {
                    lock(&entries).insert(key);
                });
                Ok(())
            }
        }
    }

    async fn exists(&self, id: Uuid, context_key: &str) -> Result<bool, Error> {
        Ok(self.lock().contains(&(id, context_key.to_owned())))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single insert or lookup: a panic elsewhere cannot
    // leave the set half-changed.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
