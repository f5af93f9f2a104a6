//! The outbox in memory: entries kept in order, committed with an
//! [`InMemoryTransaction`](crate::InMemoryTransaction) or at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::Error;
use crate::memory::InMemoryTransaction;
use crate::message::Message;
use crate::store::{
    ClaimRequest, Claimed, Outbox, OutboxClaim, ParkedOutboxMessage, SendFailure, Transaction,
    Wake, downcast_transaction,
};
use crate::sync::lock;

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
    /// When it was parked after failing too often (no sweep claims it).
    pub parked: Option<DateTime<Utc>>,
    /// When a scheduled entry (added with a delay) is due.
    pub due: Option<DateTime<Utc>>,
    /// Until when the writer that sends it holds it (a post, a
    /// `clear_outbox`): no sweep claims it before.
    pub leased_until: Option<DateTime<Utc>>,
}

impl OutboxEntry {
    /// Neither dispatched nor parked: a sweeper's to send.
    fn waiting(&self) -> bool {
        self.dispatched.is_none() && self.parked.is_none()
    }

    /// Scheduled and not due at `now`: invisible to claims and key order.
    fn not_due(&self, now: DateTime<Utc>) -> bool {
        self.due.is_some_and(|due| due > now)
    }

    /// Held by the writer that sends it at `now`.
    fn leased(&self, now: DateTime<Utc>) -> bool {
        self.leased_until.is_some_and(|until| until > now)
    }
}

/// `now` plus `delay`, saturating at the end of time.
pub(crate) fn due_after(now: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// How long the in-memory outbox keeps a dispatched entry by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Entries {
    order: Vec<Uuid>,
    by_id: HashMap<Uuid, OutboxEntry>,
    /// How long dispatched entries are kept; `None`: until deleted.
    retention: Option<Duration>,
    /// When dispatched entries were last pruned.
    pruned: DateTime<Utc>,
    /// Entries a sweep holds, until its claim finishes or is dropped.
    claimed: std::collections::HashSet<Uuid>,
    /// Sweepers watching for new entries, until their shutdown.
    watchers: Vec<(Wake, CancellationToken)>,
}

impl Default for Entries {
    fn default() -> Self {
        Entries {
            order: Vec::new(),
            by_id: HashMap::new(),
            retention: Some(DEFAULT_RETENTION),
            pruned: DateTime::<Utc>::MIN_UTC,
            claimed: std::collections::HashSet::new(),
            watchers: Vec::new(),
        }
    }
}

impl Entries {
    /// Drops entries dispatched longer ago than the retention, at most once a
    /// second (or on every call with a zero retention): without it a service
    /// that posts without a sweeper would grow without bound.
    fn prune(&mut self, now: DateTime<Utc>) {
        let Some(retention) = self.retention else {
            return;
        };
        let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        if !retention.is_zero() && now - self.pruned < chrono::Duration::seconds(1) {
            return;
        }
        self.pruned = now;
        let cutoff = now - retention;
        self.by_id
            .retain(|_, e| !matches!(e.dispatched, Some(at) if at <= cutoff));
        let Entries { order, by_id, .. } = self;
        order.retain(|id| by_id.contains_key(id));
    }

    fn insert(&mut self, messages: Vec<Message>, now: DateTime<Utc>, lease: Option<Duration>) {
        self.prune(now);
        for message in messages {
            let id = message.id();
            if self.by_id.contains_key(&id) {
                // Checked when the transaction added it; a concurrent add of the same
                // id won the race, and that one is kept.
                tracing::warn!(%id, "outbox: duplicate message id at commit, kept the first");
                continue;
            }
            self.order.push(id);
            let due =
                (!message.header.delay.is_zero()).then(|| due_after(now, message.header.delay));
            self.by_id.insert(
                id,
                OutboxEntry {
                    message,
                    created: now,
                    dispatched: None,
                    attempts: 0,
                    last_error: None,
                    parked: None,
                    due,
                    leased_until: lease.map(|lease| due_after(now, lease)),
                },
            );
        }
        self.watchers
            .retain(|(_, shutdown)| !shutdown.is_cancelled());
        // What its writer sends is no sweeper's news.
        for (watcher, _) in self.watchers.iter().filter(|_| lease.is_none()) {
            watcher.wake();
        }
    }

    /// Claims entries as [`Outbox::claim`] says, with the hold-back rule of
    /// every outbox: per partition key, only the leading run of its
    /// outstanding entries that this claim holds may be sent.
    fn claim(&mut self, request: &ClaimRequest, now: DateTime<Utc>) -> Vec<Claimed> {
        let cutoff =
            now - chrono::Duration::from_std(request.min_age).unwrap_or(chrono::Duration::MAX);
        let mut claimed = Vec::new();
        // Keys whose next outstanding entry is not ours to send.
        let mut blocked: std::collections::HashSet<String> = std::collections::HashSet::new();
        for id in &self.order {
            if claimed.len() >= request.limit {
                break;
            }
            let Some(entry) = self.by_id.get(id) else {
                continue;
            };
            if !entry.waiting() || entry.not_due(now) {
                continue;
            }
            let key = entry.message.header.partition_key.as_ref();
            // A due scheduled entry is a sweeper's at once: no writer sends it.
            let old_enough = entry.due.is_some() || entry.created <= cutoff;
            let eligible = !self.claimed.contains(id)
                && old_enough
                && !entry.leased(now)
                && !request
                    .skip_topics
                    .iter()
                    .any(|t| *t == entry.message.header.topic);
            if !eligible {
                if let Some(key) = key {
                    blocked.insert(key.clone());
                }
                continue;
            }
            let held = key.is_some_and(|k| blocked.contains(k));
            claimed.push(Claimed {
                message: entry.message.clone(),
                held,
                attempts: entry.attempts,
            });
        }
        for c in &claimed {
            self.claimed.insert(c.message.id());
        }
        claimed
    }
}

/// An outbox in memory: first-class for samples and users' tests, not a test
/// double. It never drops an outstanding entry; dispatched entries go after a
/// retention ([`DEFAULT_RETENTION`], 10 minutes; see
/// [`with_retention`](Self::with_retention)), or when
/// [`delete_dispatched`](Outbox::delete_dispatched) removes them.
/// Pass an [`InMemoryTransaction`] to `add` to get commit/rollback behaviour.
#[derive(Debug, Default, Clone)]
pub struct InMemoryOutbox {
    entries: Arc<Mutex<Entries>>,
}

impl InMemoryOutbox {
    /// An empty outbox that keeps dispatched entries for [`DEFAULT_RETENTION`].
    pub fn new() -> Self {
        InMemoryOutbox::default()
    }

    /// An empty outbox that keeps dispatched entries for `retention` (`None`:
    /// until [`delete_dispatched`](Outbox::delete_dispatched) removes them).
    pub fn with_retention(retention: Option<Duration>) -> Self {
        let outbox = InMemoryOutbox::default();
        lock(&outbox.entries).retention = retention;
        outbox
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

/// A claim on in-memory entries: released when finished or dropped.
struct MemoryClaim {
    entries: Arc<Mutex<Entries>>,
    messages: Vec<Claimed>,
    ids: Vec<Uuid>,
}

impl Drop for MemoryClaim {
    fn drop(&mut self) {
        let mut entries = lock(&self.entries);
        for id in &self.ids {
            entries.claimed.remove(id);
        }
    }
}

#[async_trait]
impl OutboxClaim for MemoryClaim {
    fn take(&mut self) -> Vec<Claimed> {
        std::mem::take(&mut self.messages)
    }

    async fn finish(self: Box<Self>, sent: &[Uuid], failed: &[SendFailure]) -> Result<(), Error> {
        let now = Utc::now();
        let mut entries = lock(&self.entries);
        for id in sent {
            if let Some(entry) = entries.by_id.get_mut(id) {
                entry.dispatched.get_or_insert(now);
            }
        }
        for failure in failed {
            if let Some(entry) = entries.by_id.get_mut(&failure.id) {
                entry.attempts += 1;
                entry.last_error = Some(failure.error.clone());
                if failure.park {
                    entry.parked.get_or_insert(now);
                }
            }
        }
        Ok(())
    }
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
            None => lock(&self.entries).insert(messages, Utc::now(), None),
            Some(tx) => {
                let tx = downcast_transaction::<InMemoryTransaction>(tx, "the in-memory outbox")?;
                let entries = Arc::clone(&self.entries);
                tx.on_commit(move || lock(&entries).insert(messages, Utc::now(), None));
            }
        }
        Ok(())
    }

    fn leases(&self) -> bool {
        true
    }

    async fn add_to_send(&self, messages: &[Message], lease: Duration) -> Result<(), Error> {
        self.check_new(messages)?;
        lock(&self.entries).insert(messages.to_vec(), Utc::now(), Some(lease));
        Ok(())
    }

    async fn release(&self, ids: &[Uuid]) -> Result<(), Error> {
        let mut entries = lock(&self.entries);
        for id in ids {
            if let Some(entry) = entries.by_id.get_mut(id) {
                entry.leased_until = None;
            }
        }
        Ok(())
    }

    async fn take_to_send(&self, ids: &[Uuid], lease: Duration) -> Result<Vec<Message>, Error> {
        let now = Utc::now();
        let mut entries = lock(&self.entries);
        let Entries { by_id, claimed, .. } = &mut *entries;
        let mut taken: Vec<&mut OutboxEntry> = by_id
            .values_mut()
            .filter(|e| {
                ids.contains(&e.message.id())
                    && e.waiting()
                    && e.due.is_none()
                    && !e.leased(now)
                    && !claimed.contains(&e.message.id())
            })
            .collect();
        taken.sort_by_key(|e| (e.created, e.message.id()));
        Ok(taken
            .into_iter()
            .map(|e| {
                e.leased_until = Some(due_after(now, lease));
                e.message.clone()
            })
            .collect())
    }

    async fn get(&self, ids: &[Uuid]) -> Result<Vec<Message>, Error> {
        let entries = lock(&self.entries);
        let mut found: Vec<&OutboxEntry> = ids
            .iter()
            .filter_map(|id| entries.by_id.get(id))
            .filter(|e| e.waiting() && e.due.is_none())
            .collect();
        found.sort_by_key(|e| (e.created, e.message.id()));
        found.dedup_by_key(|e| e.message.id());
        Ok(found.into_iter().map(|e| e.message.clone()).collect())
    }

    async fn outstanding(&self, older_than: Duration, limit: usize) -> Result<Vec<Message>, Error> {
        let now = Utc::now();
        let cutoff = now - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        let entries = lock(&self.entries);
        Ok(entries
            .order
            .iter()
            .filter_map(|id| entries.by_id.get(id))
            .filter(|e| {
                e.waiting() && !e.leased(now) && e.due.map_or(e.created <= cutoff, |due| due <= now)
            })
            .take(limit)
            .map(|e| e.message.clone())
            .collect())
    }

    async fn outstanding_count(&self) -> Result<u64, Error> {
        let now = Utc::now();
        let entries = lock(&self.entries);
        Ok(entries
            .by_id
            .values()
            .filter(|e| e.waiting() && !e.not_due(now))
            .count() as u64)
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, Error> {
        let entries = lock(&self.entries);
        Ok(entries
            .by_id
            .values()
            .filter(|e| e.waiting())
            .filter_map(|e| e.due)
            .min())
    }

    async fn cancel_scheduled(&self, id: Uuid) -> Result<bool, Error> {
        let mut entries = lock(&self.entries);
        let cancellable = !entries.claimed.contains(&id)
            && entries
                .by_id
                .get(&id)
                .is_some_and(|e| e.dispatched.is_none() && e.due.is_some());
        if cancellable {
            entries.by_id.remove(&id);
            entries.order.retain(|other| *other != id);
        }
        Ok(cancellable)
    }

    async fn held_back(&self, messages: &[Message]) -> Result<HashSet<Uuid>, Error> {
        let mut held = HashSet::new();
        if messages.iter().all(|m| m.header.partition_key.is_none()) {
            return Ok(held);
        }
        let ours: HashSet<Uuid> = messages.iter().map(Message::id).collect();
        let now = Utc::now();
        let entries = lock(&self.entries);
        // Keys with a waiting entry that is not ours, seen so far in order.
        let mut blocked: HashSet<&str> = HashSet::new();
        for id in &entries.order {
            let Some(entry) = entries.by_id.get(id) else {
                continue;
            };
            let Some(key) = entry.message.header.partition_key.as_deref() else {
                continue;
            };
            if ours.contains(id) {
                if blocked.contains(key) {
                    held.insert(*id);
                }
            } else if entry.waiting() && !entry.not_due(now) {
                blocked.insert(key);
            }
        }
        Ok(held)
    }

    async fn parked(&self, limit: usize) -> Result<Vec<ParkedOutboxMessage>, Error> {
        let entries = lock(&self.entries);
        Ok(entries
            .order
            .iter()
            .filter_map(|id| entries.by_id.get(id))
            .filter(|e| e.dispatched.is_none())
            .filter_map(|e| {
                e.parked.map(|parked| ParkedOutboxMessage {
                    id: e.message.id(),
                    topic: e.message.header.topic.to_string(),
                    attempts: e.attempts,
                    last_error: e.last_error.clone(),
                    parked,
                })
            })
            .take(limit)
            .collect())
    }

    async fn parked_count(&self) -> Result<u64, Error> {
        let entries = lock(&self.entries);
        Ok(entries
            .by_id
            .values()
            .filter(|e| e.dispatched.is_none() && e.parked.is_some())
            .count() as u64)
    }

    async fn requeue_parked(&self, ids: &[Uuid]) -> Result<u64, Error> {
        let mut entries = lock(&self.entries);
        let mut requeued = 0;
        for id in ids {
            if let Some(entry) = entries.by_id.get_mut(id)
                && entry.dispatched.is_none()
                && entry.parked.take().is_some()
            {
                entry.attempts = 0;
                requeued += 1;
            }
        }
        Ok(requeued)
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
            // The writer gave up: the sweepers' now.
            entry.leased_until = None;
        }
        Ok(())
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Box<dyn OutboxClaim>, Error> {
        let messages = lock(&self.entries).claim(request, Utc::now());
        let ids = messages.iter().map(|c| c.message.id()).collect();
        Ok(Box::new(MemoryClaim {
            entries: Arc::clone(&self.entries),
            messages,
            ids,
        }))
    }

    async fn watch(&self, wake: Wake, shutdown: CancellationToken) -> Result<(), Error> {
        let mut entries = lock(&self.entries);
        entries
            .watchers
            .retain(|(_, shutdown)| !shutdown.is_cancelled());
        entries.watchers.push((wake, shutdown));
        Ok(())
    }

    async fn oldest_outstanding(&self) -> Result<Option<DateTime<Utc>>, Error> {
        let now = Utc::now();
        Ok(lock(&self.entries)
            .by_id
            .values()
            .filter(|e| e.waiting() && !e.not_due(now))
            .map(|e| e.due.unwrap_or(e.created).max(e.created))
            .min())
    }

    async fn by_correlation(&self, correlation_id: Uuid) -> Result<Vec<OutboxEntry>, Error> {
        let mut found: Vec<OutboxEntry> = lock(&self.entries)
            .by_id
            .values()
            .filter(|e| e.message.header.correlation_id == correlation_id)
            .cloned()
            .collect();
        found.sort_by_key(|e| (e.created, e.message.id()));
        Ok(found)
    }

    async fn delete_dispatched(&self, older_than: Duration) -> Result<u64, Error> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        let mut entries = lock(&self.entries);
        let before = entries.by_id.len();
        entries
            .by_id
            .retain(|_, e| !matches!(e.dispatched, Some(at) if at <= cutoff));
        let Entries { order, by_id, .. } = &mut *entries;
        order.retain(|id| by_id.contains_key(id));
        Ok((before - entries.by_id.len()) as u64)
    }
}
