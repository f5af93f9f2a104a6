//! The producer contract: sends messages to a broker and returns once the broker
//! has confirmed them.

use async_trait::async_trait;
use futures::future::join_all;

use crate::error::Error;
use crate::message::Message;
use crate::operate::asyncapi::Endpoint;

/// Sends messages to a broker.
///
/// `send` returns only after the broker confirmed the message (publisher confirm,
/// `acks=all`), so the outbox marks a message dispatched only when it is safe.
/// A producer honours `header.delay` by delivering the message no earlier than
/// that delay from now.
#[async_trait]
pub trait Producer: Send + Sync + 'static {
    /// The `messaging.system` of spans for this producer: `kafka`, `rabbitmq`, ...
    fn system(&self) -> &'static str {
        "brighter"
    }

    /// Where this producer sends, for the AsyncAPI document (no
    /// credentials); `None` by default.
    fn endpoint(&self) -> Option<Endpoint> {
        None
    }

    /// Sends one message and waits for the broker's confirm.
    async fn send(&self, message: &Message) -> Result<(), Error>;

    /// Sends many messages with all of them in flight at once; one result per
    /// message, in order. Messages with the same partition key are sent in order.
    async fn send_batch(&self, messages: &[Message]) -> Vec<Result<(), Error>> {
        join_all(messages.iter().map(|m| self.send(m))).await
    }
}

#[async_trait]
impl<T: Producer + ?Sized> Producer for std::sync::Arc<T> {
    fn system(&self) -> &'static str {
        (**self).system()
    }

    fn endpoint(&self) -> Option<Endpoint> {
        (**self).endpoint()
    }

    async fn send(&self, message: &Message) -> Result<(), Error> {
        (**self).send(message).await
    }

    async fn send_batch(&self, messages: &[Message]) -> Vec<Result<(), Error>> {
        (**self).send_batch(messages).await
    }
}
