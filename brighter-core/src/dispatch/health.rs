//! Health and counters of a subscription, updated by its performers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
    /// The last error that stopped a performer.
    pub last_error: Option<String>,
}

impl SubscriptionHealth {
    /// Running with every performer's channel open.
    pub fn is_healthy(&self) -> bool {
        self.state == SubscriptionState::Running && self.performers_running == self.performers
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
            last_error: Mutex::new(None),
            state: Mutex::new(SubscriptionState::Stopped),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

    pub(crate) fn snapshot(&self, name: &str, performers: usize) -> SubscriptionHealth {
        SubscriptionHealth {
            name: name.to_owned(),
            state: lock(&self.state).clone(),
            performers,
            performers_running: self.running.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
            not_acked: self.not_acked.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
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
