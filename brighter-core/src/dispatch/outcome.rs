//! Outcomes: what a handler tells the message pump to do with its message
//! when "done" is not the answer. They are not failures: a handler returns
//! one through [`Error::defer`](crate::Error::defer),
//! [`Error::reject`](crate::Error::reject) or
//! [`Error::dont_ack`](crate::Error::dont_ack) so that the pipeline unwinds
//! (a unit of work rolls back, `Retry` does not retry), and the pump reads the
//! [`Outcome`] itself, not an error to decode.

use std::time::Duration;

use crate::error::Error;

/// What the pump does with a message, as its handler asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Outcome {
    /// Requeue the message and handle it again after the delay (zero: the
    /// subscription's requeue delay).
    #[error("deferred: requeue after {0:?}")]
    Defer(Duration),
    /// Move the message to the dead-letter channel with this reason.
    #[error("rejected: {0}")]
    Reject(String),
    /// Do not acknowledge: leave the message for redelivery and pause.
    #[error("not acknowledged")]
    DontAck,
}

/// How the pump settles a message whose pipeline did not simply succeed: the
/// one place a pipeline's error becomes a settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Requeue after the delay.
    Requeue(Duration),
    /// Dead-letter with the reason.
    DeadLetter(String),
    /// Leave it with the broker and pause: the service is in trouble, not the
    /// message.
    Leave,
}

impl Settlement {
    /// The settlement for a pipeline that ended with `error`:
    /// - an [`Outcome`] is obeyed (of an event's handlers: a deferral wins,
    ///   then a don't-ack);
    /// - the service's own trouble leaves the message for redelivery, however
    ///   long it lasts: a dependency away ([`Error::Unavailable`]), an open
    ///   circuit breaker, outbox backpressure;
    /// - any other error dead-letters the message with the error as reason:
    ///   a failed message is never acked silently.
    pub(crate) fn of(error: &Error) -> Settlement {
        match error {
            Error::Outcome(outcome) => Settlement::obey(outcome),
            Error::Publish { errors, .. } => {
                let outcomes = || errors.iter().filter_map(Error::outcome);
                if let Some(delay) = outcomes().find_map(|o| match o {
                    Outcome::Defer(delay) => Some(*delay),
                    _ => None,
                }) {
                    Settlement::Requeue(delay)
                } else if outcomes().any(|o| *o == Outcome::DontAck)
                    || errors.iter().any(is_service_trouble)
                {
                    Settlement::Leave
                } else {
                    Settlement::DeadLetter(error.to_string())
                }
            }
            other if is_service_trouble(other) => Settlement::Leave,
            other => Settlement::DeadLetter(other.to_string()),
        }
    }

    fn obey(outcome: &Outcome) -> Settlement {
        match outcome {
            Outcome::Defer(delay) => Settlement::Requeue(*delay),
            Outcome::Reject(reason) => Settlement::DeadLetter(reason.clone()),
            Outcome::DontAck => Settlement::Leave,
        }
    }
}

/// Whether `error` is the service's trouble rather than the message's.
fn is_service_trouble(error: &Error) -> bool {
    matches!(
        error,
        Error::Unavailable { .. } | Error::CircuitOpen { .. } | Error::Backpressure { .. }
    )
}
