//! Health and counters of a subscription, updated by its performers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::subscription::Subscription;
use crate::sync::lock;

/// Whether a subscription is consuming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionState {
    /// Performers are running (or being restarted by their supervisor).
    Running,
    /// Stopped on request, or not started.
    Stopped,
    /// A performer stopped for good, e.g. after too many unacceptable messages.
    Failed(String),
}

/// A snapshot of a subscription's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionHealth {
    /// Subscription name.
    pub name: String,
    /// Its state.
    pub state: SubscriptionState,
    /// Performers configured.
    pub performers: usize,
    /// Performers with an open channel right now.
    pub performers_running: usize,
    /// Messages handled and acked.
    pub handled: u64,
    /// Messages requeued after a deferral.
    pub deferred: u64,
    /// Messages sent to the dead-letter channel.
    pub dead_lettered: u64,
    /// Messages sent to the invalid-message channel.
    pub invalid: u64,
    /// Messages not acknowledged (left for redelivery).
    pub not_acked: u64,
    /// Performer restarts by the supervisor.
    pub restarts: u64,
    /// Times a message could not be settled (its ack, requeue, dead-letter
    /// or invalid-channel publish failed), each followed by a restart of the
    /// performer; see [`Subscription::settle_attempts`].
    pub unsettled: u64,
    /// The message a performer has held longest right now (being handled or
    /// settled), if any.
    pub in_hand: Option<InHand>,
    /// How long a message may be in hand before the subscription is not
    /// healthy ([`Subscription::in_hand_limit`]).
    pub in_hand_limit: Duration,
    /// The last error that stopped a performer.
    pub last_error: Option<String>,
}

/// A message a performer is working on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InHand {
    /// The message id.
    pub id: Uuid,
    /// Which performer of the subscription holds it (from 0).
    pub performer: usize,
    /// For how long, so far.
    pub held: Duration,
}

impl SubscriptionHealth {
    /// Running with every performer's channel open, and no message in hand
    /// for longer than the in-hand limit (a handler that never returns).
    pub fn is_healthy(&self) -> bool {
        self.state == SubscriptionState::Running
            && self.performers_running == self.performers
            && self
                .in_hand
                .as_ref()
                .is_none_or(|held| held.held <= self.in_hand_limit)
    }
}

#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) running: AtomicUsize,
    pub(crate) handled: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) invalid: AtomicU64,
    pub(crate) not_acked: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) unsettled: AtomicU64,
    /// By performer: the message it holds and since when (a slot per
    /// performer, so taking a message in hand allocates nothing).
    in_hand: Mutex<Vec<Option<(Uuid, Instant)>>>,
    /// The message that failed to settle last and how many times in a row.
    unsettled_streak: Mutex<Option<(Uuid, u32)>>,
    /// Whether `unsettled_streak` holds a streak (read without its lock on
    /// every settled message).
    streaking: AtomicBool,
    last_error: Mutex<Option<String>>,
    state: Mutex<SubscriptionState>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            running: AtomicUsize::new(0),
            handled: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            not_acked: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            unsettled: AtomicU64::new(0),
            in_hand: Mutex::new(Vec::new()),
            unsettled_streak: Mutex::new(None),
            streaking: AtomicBool::new(false),
            last_error: Mutex::new(None),
            state: Mutex::new(SubscriptionState::Stopped),
        }
    }
}

impl Stats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_error(&self, error: String) {
        *lock(&self.last_error) = Some(error);
    }

    pub(crate) fn set_state(&self, state: SubscriptionState) {
        *lock(&self.state) = state;
    }

    pub(crate) fn state(&self) -> SubscriptionState {
        lock(&self.state).clone()
    }

    /// Performer `performer` took message `id` in hand.
    pub(crate) fn take_in_hand(&self, performer: usize, id: Uuid) {
        let mut in_hand = lock(&self.in_hand);
        if in_hand.len() <= performer {
            in_hand.resize(performer + 1, None);
        }
        in_hand[performer] = Some((id, Instant::now()));
    }

    /// Performer `performer` is done with its message (settled or not).
    pub(crate) fn release_in_hand(&self, performer: usize) {
        if let Some(slot) = lock(&self.in_hand).get_mut(performer) {
            *slot = None;
        }
    }

    /// Takes every message in hand (their performers are being stopped).
    pub(crate) fn abandon_in_hand(&self) -> Vec<InHand> {
        let held = self.all_in_hand();
        lock(&self.in_hand).fill(None);
        held
    }

    /// Every message in hand right now, longest held first.
    pub(crate) fn all_in_hand(&self) -> Vec<InHand> {
        let mut held: Vec<InHand> = lock(&self.in_hand)
            .iter()
            .enumerate()
            .filter_map(|(performer, held)| held.map(|held| (performer, held)))
            .map(|(performer, (id, since))| InHand {
                id,
                performer,
                held: since.elapsed(),
            })
            .collect();
        held.sort_by_key(|h| std::cmp::Reverse(h.held));
        held
    }

    /// Message `id` failed to settle once more: how many times in a row.
    pub(crate) fn unsettled_again(&self, id: Uuid) -> u32 {
        Stats::bump(&self.unsettled);
        let mut streak = lock(&self.unsettled_streak);
        let count = match *streak {
            Some((last, count)) if last == id => count + 1,
            _ => 1,
        };
        *streak = Some((id, count));
        self.streaking.store(true, Ordering::Relaxed);
        count
    }

    /// A message was settled: any streak of settle failures is over.
    pub(crate) fn settled(&self) {
        if self.streaking.swap(false, Ordering::Relaxed) {
            *lock(&self.unsettled_streak) = None;
        }
    }

    pub(crate) fn snapshot(&self, sub: &Subscription) -> SubscriptionHealth {
        SubscriptionHealth {
            name: sub.name.clone(),
            state: self.state(),
            performers: sub.performers,
            performers_running: self.running.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
            not_acked: self.not_acked.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
            unsettled: self.unsettled.load(Ordering::Relaxed),
            in_hand: self.all_in_hand().into_iter().next(),
            in_hand_limit: sub.in_hand_limit,
            last_error: lock(&self.last_error).clone(),
        }
    }
}

/// Counts a performer as running while alive.
pub(crate) struct RunningGuard<'a>(pub(crate) &'a Stats);

impl RunningGuard<'_> {
    pub(crate) fn new(stats: &Stats) -> RunningGuard<'_> {
        stats.running.fetch_add(1, Ordering::Relaxed);
        RunningGuard(stats)
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}
