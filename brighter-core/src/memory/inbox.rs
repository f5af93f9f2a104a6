//! The inbox in memory: a set of (message id, context key).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::Utc;
use uuid::Uuid;

use crate::error::Error;
use crate::memory::InMemoryTransaction;
use crate::store::{Inbox, InboxEntry, Transaction, downcast_transaction};
use crate::sync::lock;

type Entries = HashMap<(Uuid, String), InboxEntry>;

/// An inbox in memory: for samples and users' tests. Entries are kept until the
/// inbox is dropped; none is ever evicted.
#[derive(Debug, Default, Clone)]
pub struct InMemoryInbox {
    entries: Arc<Mutex<Entries>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        lock(&self.entries)
    }

    fn duplicate(entry: &InboxEntry) -> Error {
        Error::Duplicate {
            id: entry.id,
            context_key: entry.context_key.clone(),
        }
    }

    /// Inserts `entry` now; a duplicate when its key is there.
    fn insert(entries: &Mutex<Entries>, mut entry: InboxEntry) -> Result<(), Error> {
        let mut entries = lock(entries);
        let key = (entry.id, entry.context_key.clone());
        if entries.contains_key(&key) {
            return Err(Self::duplicate(&entry));
        }
        entry.handled_at = Some(Utc::now());
        entries.insert(key, entry);
        Ok(())
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
        self.record(&InboxEntry::new(id, context_key), tx).await
    }

    async fn exists(&self, id: Uuid, context_key: &str) -> Result<bool, Error> {
        Ok(self.lock().contains_key(&(id, context_key.to_owned())))
    }

    async fn record(
        &self,
        entry: &InboxEntry,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        match tx {
            None => Self::insert(&self.entries, entry.clone()),
            Some(tx) => {
                let tx = downcast_transaction::<InMemoryTransaction>(tx, "the in-memory inbox")?;
                if self.exists(entry.id, &entry.context_key).await? {
                    return Err(Self::duplicate(entry));
                }
                let entries = Arc::clone(&self.entries);
                let entry = entry.clone();
                tx.on_commit(move || {
                    // A concurrent commit of the same key: the first one stays.
                    let _ = Self::insert(&entries, entry);
                });
                Ok(())
            }
        }
    }

    async fn by_correlation(&self, correlation_id: Uuid) -> Result<Vec<InboxEntry>, Error> {
        let mut found: Vec<InboxEntry> = self
            .lock()
            .values()
            .filter(|e| e.correlation_id == Some(correlation_id))
            .cloned()
            .collect();
        found.sort_by_key(|e| (e.handled_at, e.id));
        Ok(found)
    }
}
