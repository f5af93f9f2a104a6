//! The outbox in memory: entries kept in order, committed with an
//! [`InMemoryTransaction`](crate::InMemoryTransaction) or at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::Error;
use crate::memory::InMemoryTransaction;
use crate::message::Message;
use crate::store::{Outbox, Transaction, downcast_transaction};

/// One outbox entry, as the in-memory outbox keeps it.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// The message.
    pub message: Message,
    /// When it was added.
    pub created: DateTime<Utc>,
    /// When the broker confirmed it.
    pub dispatched: Option<DateTime<Utc>>,
    /// Failed attempts to send it.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Entries {
    order: Vec<Uuid>,
    by_id: HashMap<Uuid, OutboxEntry>,
}

impl Entries {
    fn insert(&mut self, messages: Vec<Message>, now: DateTime<Utc>) {
        for message in messages {
            let id = message.id();
            if self.by_id.contains_key(&id) {
                // Checked when the transaction added it; a concurrent add of the same
                // id won the race, and that one is kept.
                tracing::warn!(%id, "outbox: duplicate message id at commit, kept the first");
                continue;
            }
            self.order.push(id);
            self.by_id.insert(
                id,
                OutboxEntry {
                    message,
                    created: now,
                    dispatched: None,
                    attempts: 0,
                    last_error: None,
                },
            );
        }
    }
}

/// An outbox in memory: first-class for samples and users' tests, not a test
/// double. It never drops an entry silently: entries stay until
/// [`delete_dispatched`](Outbox::delete_dispatched) removes dispatched ones.
/// Pass an [`InMemoryTransaction`] to `add` to get commit/rollback behaviour.
#[derive(Debug, Default, Clone)]
pub struct InMemoryOutbox {
    entries: Arc<Mutex<Entries>>,
}

impl InMemoryOutbox {
    /// An empty outbox.
    pub fn new() -> Self {
        InMemoryOutbox::default()
    }

    /// Every entry, in the order added.
    pub fn entries(&self) -> Vec<OutboxEntry> {
        let entries = lock(&self.entries);
        entries
            .order
            .iter()
            .filter_map(|id| entries.by_id.get(id).cloned())
            .collect()
    }

    /// The entry of message `id`.
    pub fn entry(&self, id: Uuid) -> Option<OutboxEntry> {
        lock(&self.entries).by_id.get(&id).cloned()
    }

    fn check_new(&self, messages: &[Message]) -> Result<(), Error> {
        let entries = lock(&self.entries);
        let mut seen = std::collections::HashSet::new();
        for message in messages {
            message.validate_for_send()?;
            if entries.by_id.contains_key(&message.id()) || !seen.insert(message.id()) {
                return Err(Error::Duplicate {
                    id: message.id(),
                    context_key: "outbox".into(),
                });
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections leave the entries consistent at every step.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl Outbox for InMemoryOutbox {
    async fn add(
        &self,
        messages: &[Message],
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error> {
        self.check_new(messages)?;
        let messages = messages.to_vec();
        match tx {
            None => lock(&self.entries).insert(messages, Utc::now()),
            Some(tx) => {
                let tx = downcast_transaction::<InMemoryTransaction>(tx, "the in-memory outbox")?;
                let entries = Arc::clone(&self.entries);
                tx.on_commit(move || lock(&entries).insert(messages, Utc::now()));
            }
        }
        Ok(())
    }

    async fn get(&self, ids: &[Uuid]) -> Result<Vec<Message>, Error> {
        let entries = lock(&self.entries);
        let mut found: Vec<&OutboxEntry> = ids
            .iter()
            .filter_map(|id| entries.by_id.get(id))
            .filter(|e| e.dispatched.is_none())
            .collect();
        found.sort_by_key(|e| (e.created, e.message.id()));
        found.dedup_by_key(|e| e.message.id());
        Ok(found.into_iter().map(|e| e.message.clone()).collect())
    }

    async fn outstanding(&self, older_than: Duration, limit: usize) -> Result<Vec<Message>, Error> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        let entries = lock(&self.entries);
        Ok(entries
            .order
            .iter()
            .filter_map(|id| entries.by_id.get(id))
            .filter(|e| e.dispatched.is_none() && e.created <= cutoff)
            .take(limit)
            .map(|e| e.message.clone())
            .collect())
    }

    async fn outstanding_count(&self) -> Result<u64, Error> {
        let entries = lock(&self.entries);
        Ok(entries
            .by_id
            .values()
            .filter(|e| e.dispatched.is_none())
            .count() as u64)
    }

    async fn mark_dispatched(&self, ids: &[Uuid], at: DateTime<Utc>) -> Result<(), Error> {
        let mut entries = lock(&self.entries);
        for id in ids {
            if let Some(entry) = entries.by_id.get_mut(id) {
                entry.dispatched.get_or_insert(at);
            }
        }
        Ok(())
    }

    async fn mark_failed(&self, id: Uuid, error: &str) -> Result<(), Error> {
        if let Some(entry) = lock(&self.entries).by_id.get_mut(&id) {
            entry.attempts += 1;
            entry.last_error = Some(error.to_owned());
        }
        Ok(())
    }

    async fn delete_dispatched(&self, older_than: Duration) -> Result<u64, Error> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        let mut entries = lock(&self.entries);
        let before = entries.by_id.len();
        entries
            .by_id
            .retain(|_, e| !matches!(e.dispatched, Some(at) if at <= cutoff));
        let Entries { order, by_id } = &mut *entries;
        order.retain(|id| by_id.contains_key(id));
        Ok((before - entries.by_id.len()) as u64)
    }
}
