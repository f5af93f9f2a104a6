//! The outbox contract. A message is added to the outbox in the caller's
//! transaction, sent by `clear_outbox` or a sweeper, and marked dispatched once
//! the broker confirmed it. A store implements the storage (add, claim, mark,
//! clean up); the sweeper loop, the per-key hold-back and the backoff are
//! written once, in [`OutboxSweeper`](crate::OutboxSweeper).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::memory::OutboxEntry;
use crate::message::Message;
use crate::store::Transaction;

/// What a sweeper asks [`Outbox::claim`] for.
#[derive(Debug, Clone, Default)]
pub struct ClaimRequest {
    /// At most this many messages.
    pub limit: usize,
    /// Only messages added at least this long ago (younger ones are left to
    /// the writer's own `clear_outbox`).
    pub min_age: Duration,
    /// Not these topics (they are backing off).
    pub skip_topics: Vec<String>,
}

/// One claimed message.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The message.
    pub message: Message,
    /// Must not be sent in this claim: an earlier outstanding message of its
    /// partition key is not in the claim (another sweeper holds it, or its
    /// transaction has not committed), or an earlier one of the key in this
    /// claim is held.
    pub held: bool,
    /// Failed attempts to send it so far.
    pub attempts: u32,
}

/// A failed attempt to send a claimed message, for [`OutboxClaim::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFailure {
    /// The message.
    pub id: Uuid,
    /// Why the send failed.
    pub error: String,
    /// Park the message: no sweep claims it again until it is requeued
    /// ([`Outbox::requeue_parked`]), and it no longer holds back its key.
    pub park: bool,
}

/// An outbox message parked after failing to send too often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedOutboxMessage {
    /// The message id.
    pub id: Uuid,
    /// Its topic.
    pub topic: String,
    /// Failed attempts to send it.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was parked.
    pub parked: DateTime<Utc>,
}

/// Messages claimed by one sweep: no other sweeper gets them until
/// [`finish`](OutboxClaim::finish) (or until the claim is dropped, which
/// releases them unmarked).
#[async_trait]
pub trait OutboxClaim: Send {
    /// The claimed messages, oldest first.
    fn take(&mut self) -> Vec<Claimed>;

    /// Marks `sent` dispatched, records a failed attempt with its error for
    /// each of `failed` (parking those it says), and releases the claim.
    async fn finish(self: Box<Self>, sent: &[Uuid], failed: &[SendFailure]) -> Result<(), Error>;
}

/// Tells sweepers that new messages may be in the outbox; handed to
/// [`Outbox::watch`]. It also tells the watch when every worker of the
/// sweeper is waiting for a wake-up ([`all_waiting`](Self::all_waiting)), for
/// stores whose writers announce new messages only while a sweeper waits.
#[derive(Debug, Clone)]
pub struct Wake {
    sender: Arc<watch::Sender<u64>>,
    waiting: Arc<Waiting>,
}

/// Which workers wait, and a signal when all do.
#[derive(Debug, Default)]
struct Waiting {
    /// By worker: whether it waits for a wake-up.
    workers: std::sync::Mutex<Vec<bool>>,
    all: tokio::sync::Notify,
}

impl Waiting {
    fn all(&self) -> bool {
        crate::sync::lock(&self.workers).iter().all(|w| *w)
    }
}

impl Wake {
    /// A wake-up channel and its first receiver.
    pub fn new() -> (Wake, watch::Receiver<u64>) {
        let (sender, receiver) = watch::channel(0);
        let wake = Wake {
            sender: Arc::new(sender),
            waiting: Arc::default(),
        };
        (wake, receiver)
    }

    /// Wakes every sweeper worker waiting for messages.
    pub fn wake(&self) {
        crate::sync::lock(&self.waiting.workers).fill(false);
        self.sender.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Another receiver, for another worker.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.sender.subscribe()
    }

    /// The sweeper has `workers` workers, none waiting yet.
    pub(crate) fn workers(&self, workers: usize) {
        *crate::sync::lock(&self.waiting.workers) = vec![false; workers];
    }

    /// Worker `worker` waits for a wake-up (or a poll), or stopped waiting.
    pub(crate) fn waiting(&self, worker: usize, waiting: bool) {
        let all = {
            let mut workers = crate::sync::lock(&self.waiting.workers);
            if let Some(slot) = workers.get_mut(worker) {
                *slot = waiting;
            }
            waiting && workers.iter().all(|w| *w)
        };
        if all {
            self.waiting.all.notify_waiters();
        }
    }

    /// Returns once every worker waits for a wake-up: each has found nothing
    /// more to send (at once when the sweeper has no workers). A store whose
    /// writers announce only while a sweeper waits says so then.
    pub async fn all_waiting(&self) {
        loop {
            let notified = self.waiting.all.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.waiting.all() {
                return;
            }
            notified.await;
        }
    }
}

/// Stores messages until they are sent.
///
/// A message added with a nonzero `header.delay` is **scheduled**: due that
/// long after it was added (the store's clock). Until it is due, no claim
/// returns it, it holds back no partition key and
/// [`outstanding_count`](Outbox::outstanding_count) does not count it; once
/// due, a claim returns it whatever the claim's `min_age`. Only claims (a
/// sweeper) send scheduled messages: [`get`](Outbox::get) never returns one,
/// so a writer's `clear_outbox` cannot race a
/// [`cancel_scheduled`](Outbox::cancel_scheduled).
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Adds `messages`; with `tx`, they commit or roll back with the caller's
    /// transaction. A message id already in the outbox fails the whole call.
    async fn add(
        &self,
        messages: &[Message],
        tx: Option<&mut dyn Transaction>,
    ) -> Result<(), Error>;

    /// The messages among `ids` that are not dispatched yet and not
    /// scheduled, in the order they were added.
    async fn get(&self, ids: &[Uuid]) -> Result<Vec<Message>, Error>;

    /// Whether this outbox leases messages to the writer that sends them
    /// ([`add_to_send`](Self::add_to_send), [`take_to_send`](Self::take_to_send)):
    /// then a sweeper may claim any other message the moment it commits
    /// (its `min_age` defaults to zero), with no double send. By default
    /// not: sweepers leave messages younger than their `min_age` (1 s by
    /// default) to the writer.
    fn leases(&self) -> bool {
        false
    }

    /// Adds `messages`, outside any transaction, for the caller to send at
    /// once (a post): leased to it for `lease`, so no claim returns them
    /// meanwhile; after that (the caller failed or died) they are any
    /// sweeper's. [`mark_failed`](Self::mark_failed) ends the lease. By
    /// default a plain [`add`](Self::add).
    async fn add_to_send(&self, messages: &[Message], lease: Duration) -> Result<(), Error> {
        let _ = lease;
        self.add(messages, None).await
    }

    /// Takes the messages among `ids` that are outstanding and no sweep
    /// holds (not dispatched, parked, scheduled or leased), in the order
    /// they were added, leased to the caller for `lease` (see
    /// [`add_to_send`](Self::add_to_send)): a writer's `clear_outbox`. A
    /// message a sweeper holds is the sweeper's to send, and one taken here
    /// no sweeper claims until the lease ends. By default [`get`](Self::get).
    async fn take_to_send(&self, ids: &[Uuid], lease: Duration) -> Result<Vec<Message>, Error> {
        let _ = lease;
        self.get(ids).await
    }

    /// Ends the lease on `ids` that the writer did not send after all (held
    /// back behind an earlier message of their key, or behind one that
    /// failed): they are the sweepers' at once. By default nothing.
    async fn release(&self, ids: &[Uuid]) -> Result<(), Error> {
        let _ = ids;
        Ok(())
    }

    /// Of `messages` (outstanding, in the order they were added), the ids of
    /// those with a partition key that must not be sent now because an
    /// earlier outstanding message of their key is not among them: it failed
    /// before, or another sender holds it. The sweeper sends them in order
    /// later. Parked messages hold nothing back.
    async fn held_back(&self, messages: &[Message]) -> Result<HashSet<Uuid>, Error>;

    /// Up to `limit` parked messages, oldest first.
    async fn parked(&self, limit: usize) -> Result<Vec<ParkedOutboxMessage>, Error>;

    /// How many messages are parked.
    async fn parked_count(&self) -> Result<u64, Error>;

    /// Puts parked messages among `ids` back in line for the sweeper, with
    /// their attempts reset; returns how many were parked.
    async fn requeue_parked(&self, ids: &[Uuid]) -> Result<u64, Error>;

    /// Up to `limit` messages not dispatched (nor parked) yet and added at
    /// least `older_than` ago, or scheduled and due, oldest first.
    async fn outstanding(&self, older_than: Duration, limit: usize) -> Result<Vec<Message>, Error>;

    /// How many messages are not dispatched yet (parked ones and scheduled
    /// ones not due yet not counted).
    async fn outstanding_count(&self) -> Result<u64, Error>;

    /// When the earliest scheduled message not yet sent (nor parked) is due,
    /// if any is waiting: sweepers wake then. It may lie in the past (a due
    /// message whose send failed).
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, Error>;

    /// Removes scheduled message `id` if it has not been sent; `true` when it
    /// was removed. `false` when it was sent, is being sent by a sweeper that
    /// holds it in a claim (the Postgres outbox waits for that claim to end and
    /// answers after it), was not scheduled, or is not in the outbox.
    async fn cancel_scheduled(&self, id: Uuid) -> Result<bool, Error>;

    /// Marks `ids` dispatched at `at`.
    async fn mark_dispatched(&self, ids: &[Uuid], at: DateTime<Utc>) -> Result<(), Error>;

    /// Records a failed attempt to send `id`.
    async fn mark_failed(&self, id: Uuid, error: &str) -> Result<(), Error>;

    /// Deletes messages dispatched more than `older_than` ago; returns how many.
    async fn delete_dispatched(&self, older_than: Duration) -> Result<u64, Error>;

    /// Claims outstanding messages for a sweep (see [`ClaimRequest`] and
    /// [`Claimed`]): oldest first, none that another sweep holds.
    async fn claim(&self, request: &ClaimRequest) -> Result<Box<dyn OutboxClaim>, Error>;

    /// Calls `wake` whenever messages may have been added, until `shutdown`
    /// (the Postgres outbox: `LISTEN/NOTIFY`); returns once it is watching.
    /// By default nothing is watched and sweepers poll.
    async fn watch(&self, wake: Wake, shutdown: CancellationToken) -> Result<(), Error> {
        let _ = (wake, shutdown);
        Ok(())
    }

    /// Moves messages dispatched more than `older_than` ago to an archive;
    /// returns how many. By default they are deleted.
    async fn archive_dispatched(&self, older_than: Duration) -> Result<u64, Error> {
        self.delete_dispatched(older_than).await
    }

    /// When the oldest message not dispatched yet (nor parked, nor
    /// scheduled for later) was added: how far behind the outbox is. `None`
    /// when nothing is outstanding, or the store cannot tell (the default).
    async fn oldest_outstanding(&self) -> Result<Option<DateTime<Utc>>, Error> {
        Ok(None)
    }

    /// Every message of conversation `correlation_id` the outbox holds
    /// (outstanding, scheduled, dispatched or parked), in the order they were
    /// added. By default an outbox cannot tell (a configuration error).
    async fn by_correlation(&self, correlation_id: Uuid) -> Result<Vec<OutboxEntry>, Error> {
        let _ = correlation_id;
        Err(Error::configuration(
            "this outbox cannot list the messages of a conversation",
        ))
    }
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
    fn leases(&self) -> bool {
        (**self).leases()
    }
    async fn add_to_send(&self, messages: &[Message], lease: Duration) -> Result<(), Error> {
        (**self).add_to_send(messages, lease).await
    }
    async fn take_to_send(&self, ids: &[Uuid], lease: Duration) -> Result<Vec<Message>, Error> {
        (**self).take_to_send(ids, lease).await
    }
    async fn release(&self, ids: &[Uuid]) -> Result<(), Error> {
        (**self).release(ids).await
    }
    async fn held_back(&self, messages: &[Message]) -> Result<HashSet<Uuid>, Error> {
        (**self).held_back(messages).await
    }
    async fn parked(&self, limit: usize) -> Result<Vec<ParkedOutboxMessage>, Error> {
        (**self).parked(limit).await
    }
    async fn parked_count(&self) -> Result<u64, Error> {
        (**self).parked_count().await
    }
    async fn requeue_parked(&self, ids: &[Uuid]) -> Result<u64, Error> {
        (**self).requeue_parked(ids).await
    }
    async fn outstanding(&self, older_than: Duration, limit: usize) -> Result<Vec<Message>, Error> {
        (**self).outstanding(older_than, limit).await
    }
    async fn outstanding_count(&self) -> Result<u64, Error> {
        (**self).outstanding_count().await
    }
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, Error> {
        (**self).next_due().await
    }
    async fn cancel_scheduled(&self, id: Uuid) -> Result<bool, Error> {
        (**self).cancel_scheduled(id).await
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
    async fn claim(&self, request: &ClaimRequest) -> Result<Box<dyn OutboxClaim>, Error> {
        (**self).claim(request).await
    }
    async fn watch(&self, wake: Wake, shutdown: CancellationToken) -> Result<(), Error> {
        (**self).watch(wake, shutdown).await
    }
    async fn archive_dispatched(&self, older_than: Duration) -> Result<u64, Error> {
        (**self).archive_dispatched(older_than).await
    }
    async fn oldest_outstanding(&self) -> Result<Option<DateTime<Utc>>, Error> {
        (**self).oldest_outstanding().await
    }
    async fn by_correlation(&self, correlation_id: Uuid) -> Result<Vec<OutboxEntry>, Error> {
        (**self).by_correlation(correlation_id).await
    }
}
