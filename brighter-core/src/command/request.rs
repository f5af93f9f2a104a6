//! Requests: commands and events.

use uuid::Uuid;

/// Anything the command processor can dispatch: it has a unique id.
///
/// Implement [`Command`] or [`Event`] on top of it to say how it is dispatched.
pub trait Request: Send + Sync + 'static {
    /// The request's unique id. It becomes the message id when the request is
    /// posted, and is the inbox key on the consumer side; make it with
    /// `Uuid::now_v7()` so message ids are time-ordered.
    fn id(&self) -> Uuid;

    /// Messages with the same partition key are delivered in order (Kafka record
    /// key, RabbitMQ consistent ordering within a queue). `None` by default.
    fn partition_key(&self) -> Option<String> {
        None
    }
}

/// A request with exactly one handler: `send` runs it, `post` sends it as a message.
pub trait Command: Request {}

/// A request with any number of handlers: `publish` runs them all.
pub trait Event: Request {}
