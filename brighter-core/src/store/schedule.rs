//! [`Due`]: when a scheduled message is to be sent, as a delay from now or
//! an absolute time.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// When a scheduled message is due: `post_scheduled` and
/// `deposit_post_scheduled` take one (or anything that converts: a
/// `Duration` is a delay, a `DateTime<Utc>` an absolute time).
///
/// The outbox holds a scheduled message until it is due and a sweeper sends
/// it then; a time in the past, or a zero delay, is due at once.
///
/// ```
/// use std::time::Duration;
/// use brighter_core::Due;
///
/// assert_eq!(Due::from(Duration::from_secs(5)).delay(), Duration::from_secs(5));
/// let at = chrono::Utc::now() - chrono::Duration::seconds(1);
/// assert_eq!(Due::from(at).delay(), Duration::ZERO);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// This long after the message is deposited (by the store's clock).
    After(Duration),
    /// At this time (by this process's clock; the outbox stores it as the
    /// delay left when the message is deposited).
    At(DateTime<Utc>),
}

impl Due {
    /// The delay from now until the message is due (zero when it is due now).
    pub fn delay(&self) -> Duration {
        match self {
            Due::After(delay) => *delay,
            Due::At(at) => (*at - Utc::now()).to_std().unwrap_or(Duration::ZERO),
        }
    }
}

impl From<Duration> for Due {
    fn from(delay: Duration) -> Self {
        Due::After(delay)
    }
}

impl From<DateTime<Utc>> for Due {
    fn from(at: DateTime<Utc>) -> Self {
        Due::At(at)
    }
}
