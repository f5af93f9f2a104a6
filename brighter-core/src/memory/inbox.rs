//! The inbox in memory: a set of (message id, context key).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::Error;
use crate::memory::InMemoryTransaction;
use crate::store::{Inbox, Transaction, downcast_transaction};
use crate::sync::lock;

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
                let tx = downcast_transaction::<InMemoryTransaction>(tx, "the in-memory inbox")?;
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
