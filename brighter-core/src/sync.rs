//! Small helpers shared by the crate's in-process state: locking and
//! deadlines.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Locks `m`, using a poisoned lock as it is: every mutex in this crate
/// guards state whose critical sections leave it consistent at each step (a
/// single insert, lookup or update), so a panic elsewhere cannot leave it
/// half-changed.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `duration` from now, without overflowing an `Instant` on an absurd
/// duration (a delay or timeout from the wire or a user): at most about a
/// century ahead.
pub(crate) fn instant_after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
