//! The one error type of the framework, with the kinds callers branch on: whether
//! to retry, and what a message pump should do with the message that caused it.

use std::time::Duration;

use uuid::Uuid;

use crate::dispatch::outcome::Outcome;

/// A boxed error from user code or a backing library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the command processor, its pipeline, the
/// outbox/inbox and the message pump.
///
/// Handlers return it, and three of its variants are *outcomes* that steer a
/// message pump rather than failures: [`Error::defer`], [`Error::reject`] and
/// [`Error::dont_ack`].
///
/// ```
/// use brighter_core::{Error, ErrorKind};
/// use std::time::Duration;
///
/// let e = Error::defer(Duration::from_secs(2));
/// assert_eq!(e.kind(), ErrorKind::Defer);
/// assert!(e.is_outcome());
/// assert!(!e.is_retryable());
/// assert!(Error::handler("database unavailable").is_retryable());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No handler is registered for the request type.
    #[error("no handler registered for {request_type}")]
    NoHandler {
        /// The Rust type name of the request.
        request_type: &'static str,
    },
    /// More than one handler is registered for a command.
    #[error("{count} handlers registered for command {request_type}; a command needs exactly one")]
    MultipleHandlers {
        /// The Rust type name of the command.
        request_type: &'static str,
        /// How many handlers are registered.
        count: usize,
    },
    /// A handler failed in a way that may succeed if tried again.
    #[error("handler failed: {0}")]
    Handler(#[source] BoxError),
    /// A handler failed in a way that will not succeed if tried again.
    #[error("handler failed permanently: {0}")]
    Fatal(#[source] BoxError),
    /// The request is invalid; it was not handled and must not be retried.
    #[error("validation failed: {0}")]
    Validation(String),
    /// A timeout step cancelled the handler.
    #[error("handler timed out after {0:?}")]
    Timeout(Duration),
    /// A circuit breaker is open and refused the request without running it.
    #[error("circuit breaker '{name}' is open")]
    CircuitOpen {
        /// The breaker's name.
        name: String,
    },
    /// One or more handlers of an event failed; every handler was run.
    #[error("{} of {handlers} handlers of event {request_type} failed; first: {}", errors.len(), errors.first().map(ToString::to_string).unwrap_or_default())]
    Publish {
        /// The Rust type name of the event.
        request_type: &'static str,
        /// How many handlers ran.
        handlers: usize,
        /// The errors of the handlers that failed.
        errors: Vec<Error>,
    },
    /// A handler panicked; the panic was caught and turned into this error.
    #[error("handler panicked: {0}")]
    Panicked(String),
    /// Not a failure: an [`Outcome`] for the message pump (defer, reject,
    /// don't-ack), carried up through the pipeline so that it unwinds.
    #[error("{0}")]
    Outcome(Outcome),
    /// The processor, a pipeline, a publication or a subscription is configured wrongly.
    #[error("configuration error: {0}")]
    Configuration(String),
    /// A message could not be turned into a request, or a request into a message.
    #[error("cannot map message: {0}")]
    Mapping(String),
    /// A broker or transport failed.
    #[error("transport error: {context}: {source}")]
    Transport {
        /// What was being done.
        context: String,
        /// The transport's error.
        #[source]
        source: BoxError,
    },
    /// The broker accepted the message but no queue is bound to its topic, so
    /// nobody would ever get it (a consumer not deployed yet, a typo in a
    /// routing key, a deleted queue). Retryable: the message stays in the
    /// outbox until a queue is there, unless its publication allows dropping
    /// it ([`Publication::drop_if_unrouted`](crate::Publication::drop_if_unrouted)).
    #[error("unroutable: no queue is bound to topic '{topic}'")]
    Unroutable {
        /// The message's topic (routing key).
        topic: String,
    },
    /// The broker refused this message for what it is (too large, malformed),
    /// so sending it again fails the same way. Not retryable; the outbox
    /// sweeper parks such a message (see `OutboxSweeper::park_after`).
    #[error("refused by the broker: {reason}")]
    Refused {
        /// The broker's reason.
        reason: String,
    },
    /// An outbox, inbox or claim-check store failed.
    #[error("store error: {context}: {source}")]
    Store {
        /// What was being done.
        context: String,
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// A service the work depends on (a database, a broker) cannot be reached
    /// right now. Retryable; a message pump does not dead-letter the message but
    /// leaves it for redelivery and pauses, however long the outage lasts.
    #[error("unavailable: {context}: {source}")]
    Unavailable {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The inbox has already recorded this message for this context.
    #[error("message {id} was already handled in context '{context_key}'")]
    Duplicate {
        /// The message (request) id.
        id: Uuid,
        /// The inbox context key.
        context_key: String,
    },
    /// `call` got no reply in time.
    #[error("no reply to {request_type} within {timeout:?}")]
    CallTimeout {
        /// The Rust type name of the request.
        request_type: &'static str,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// The outbox holds as many outstanding messages as it is allowed to.
    #[error("outbox is full: {outstanding} outstanding messages, limit {limit}")]
    Backpressure {
        /// Outstanding messages counted.
        outstanding: u64,
        /// The configured bound.
        limit: u64,
    },
    /// The component was shut down.
    #[error("shut down")]
    Shutdown,
}

/// The kind of an [`Error`], for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(missing_docs)] // each kind mirrors the Error variant of the same name
pub enum ErrorKind {
    NoHandler,
    MultipleHandlers,
    Handler,
    Fatal,
    Validation,
    Timeout,
    CircuitOpen,
    Publish,
    Panicked,
    Defer,
    Reject,
    DontAck,
    Configuration,
    Mapping,
    Transport,
    Unroutable,
    Refused,
    Store,
    Unavailable,
    Duplicate,
    CallTimeout,
    Backpressure,
    Shutdown,
}

impl Error {
    /// A handler failure that may succeed on retry.
    pub fn handler(error: impl Into<BoxError>) -> Self {
        Error::Handler(error.into())
    }

    /// A handler failure that will not succeed on retry: not retried, dead-lettered.
    pub fn fatal(error: impl Into<BoxError>) -> Self {
        Error::Fatal(error.into())
    }

    /// A validation failure: never retried.
    pub fn validation(reason: impl Into<String>) -> Self {
        Error::Validation(reason.into())
    }

    /// Outcome: requeue the message and handle it again after `delay`.
    pub fn defer(delay: Duration) -> Self {
        Error::Outcome(Outcome::Defer(delay))
    }

    /// Outcome: dead-letter the message with `reason`.
    pub fn reject(reason: impl Into<String>) -> Self {
        Error::Outcome(Outcome::Reject(reason.into()))
    }

    /// Outcome: do not acknowledge the message; the pump pauses and it is redelivered.
    pub fn dont_ack() -> Self {
        Error::Outcome(Outcome::DontAck)
    }

    /// A configuration error.
    pub fn configuration(reason: impl Into<String>) -> Self {
        Error::Configuration(reason.into())
    }

    /// A transport failure while doing `context`.
    pub fn transport(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Transport {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A store (outbox, inbox, claim check) failure while doing `context`.
    pub fn store(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Store {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A service the work depends on could not be reached while doing `context`:
    /// see [`Error::Unavailable`].
    pub fn unavailable(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoHandler { .. } => ErrorKind::NoHandler,
            Error::MultipleHandlers { .. } => ErrorKind::MultipleHandlers,
            Error::Handler(_) => ErrorKind::Handler,
            Error::Fatal(_) => ErrorKind::Fatal,
            Error::Validation(_) => ErrorKind::Validation,
            Error::Timeout(_) => ErrorKind::Timeout,
            Error::CircuitOpen { .. } => ErrorKind::CircuitOpen,
            Error::Publish { .. } => ErrorKind::Publish,
            Error::Panicked(_) => ErrorKind::Panicked,
            Error::Outcome(Outcome::Defer(_)) => ErrorKind::Defer,
            Error::Outcome(Outcome::Reject(_)) => ErrorKind::Reject,
            Error::Outcome(Outcome::DontAck) => ErrorKind::DontAck,
            Error::Configuration(_) => ErrorKind::Configuration,
            Error::Mapping(_) => ErrorKind::Mapping,
            Error::Transport { .. } => ErrorKind::Transport,
            Error::Unroutable { .. } => ErrorKind::Unroutable,
            Error::Refused { .. } => ErrorKind::Refused,
            Error::Store { .. } => ErrorKind::Store,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Duplicate { .. } => ErrorKind::Duplicate,
            Error::CallTimeout { .. } => ErrorKind::CallTimeout,
            Error::Backpressure { .. } => ErrorKind::Backpressure,
            Error::Shutdown => ErrorKind::Shutdown,
        }
    }

    /// Whether trying again may succeed: handler failures, timeouts, transport and
    /// store failures. Validation errors, fatal errors, open breakers, outcomes and
    /// configuration errors are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Handler(_)
            | Error::Timeout(_)
            | Error::Transport { .. }
            | Error::Unroutable { .. }
            | Error::Store { .. }
            | Error::Unavailable { .. }
            | Error::Backpressure { .. } => true,
            Error::Publish { errors, .. } => errors.iter().any(Error::is_retryable),
            _ => false,
        }
    }

    /// Whether this is an outcome that steers a message pump (defer, reject, don't-ack)
    /// rather than a failure.
    pub fn is_outcome(&self) -> bool {
        matches!(self, Error::Outcome(_))
    }

    /// The outcome this carries, when it is one.
    pub fn outcome(&self) -> Option<&Outcome> {
        match self {
            Error::Outcome(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Whether a service the work depends on could not be reached (also inside
    /// the errors of an event's handlers).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Publish { errors, .. } => errors.iter().any(Error::is_unavailable),
            _ => false,
        }
    }

    /// A message to `topic` that no queue is bound to: see [`Error::Unroutable`].
    pub fn unroutable(topic: impl Into<String>) -> Self {
        Error::Unroutable {
            topic: topic.into(),
        }
    }

    /// Whether sending failed because of the message itself or its route
    /// (unroutable, refused by the broker, invalid, unmappable), not because
    /// a service is away: trying again will fail the same way until someone
    /// changes something. The outbox sweeper parks such messages after
    /// `park_after` attempts.
    pub fn is_message_fault(&self) -> bool {
        matches!(
            self,
            Error::Unroutable { .. }
                | Error::Refused { .. }
                | Error::Validation(_)
                | Error::Mapping(_)
        )
    }

    /// Whether the inbox found the message already handled.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Error::Duplicate { .. })
    }
}
