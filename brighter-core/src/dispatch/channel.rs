//! The consumer contract: a channel delivers messages of one subscription, one at
//! a time, and is told the outcome of each (ack, requeue, reject, invalid, nack).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Error;
use crate::message::Message;
use crate::operate::asyncapi::Endpoint;

/// A received message and the transport's tag to settle it with.
///
/// The message is shared: the pump hands the same allocation to the pipeline
/// and takes it back to settle, so a delivery moves as two words, not as the
/// whole message.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message as received.
    pub message: Arc<Message>,
    /// The transport's handle for this delivery (delivery tag, offset ...).
    pub tag: u64,
}

impl Delivery {
    /// A delivery of `message`, settled with `tag`.
    pub fn new(message: Message, tag: u64) -> Self {
        Delivery {
            message: Arc::new(message),
            tag,
        }
    }

    /// The message to change (copied first only if a handler still holds it).
    pub fn message_mut(&mut self) -> &mut Message {
        Arc::make_mut(&mut self.message)
    }

    /// The message, owned (copied only if a handler still holds it).
    pub fn into_message(self) -> Message {
        Arc::unwrap_or_clone(self.message)
    }
}

/// What a channel factory needs to open a channel for a subscription.
#[derive(Debug, Clone)]
pub struct ChannelSpec {
    /// The subscription's name.
    pub subscription: String,
    /// The topic (routing key) to consume.
    pub topic: String,
    /// The queue (RabbitMQ), consumer group (Kafka) or queue name (in memory);
    /// consumers on the same channel name compete for messages.
    pub channel: String,
    /// How many messages the transport may prefetch.
    pub buffer_size: usize,
    /// Remove the queue when its last consumer closes (reply queues).
    pub auto_delete: bool,
}

impl ChannelSpec {
    /// A spec for `topic` consumed through the channel `channel`.
    pub fn new(
        subscription: impl Into<String>,
        topic: impl Into<String>,
        channel: impl Into<String>,
    ) -> Self {
        ChannelSpec {
            subscription: subscription.into(),
            topic: topic.into(),
            channel: channel.into(),
            buffer_size: 10,
            auto_delete: false,
        }
    }
}

/// A consumer of one subscription.
///
/// `receive` must be cancel-safe: when its future is dropped before it returns,
/// no message is lost (it stays with the transport or its buffer).
#[async_trait]
pub trait Channel: Send + 'static {
    /// The `messaging.system` of the pump's spans for this channel: `kafka`,
    /// `rabbitmq`, ...
    fn system(&self) -> &'static str {
        "brighter"
    }

    /// The next message, waiting at most `timeout`; `None` when none came.
    async fn receive(&mut self, timeout: Duration) -> Result<Option<Delivery>, Error>;

    /// The next message if the channel has one at hand, without waiting and
    /// without a future: the pump asks this first, and calls
    /// [`receive`](Self::receive) when it answers `None`. `None` means "ask
    /// `receive`", not "there is no message". For transports whose client
    /// buffers what it fetched (Kafka, the in-memory broker). Default `None`.
    fn try_receive(&mut self) -> Option<Result<Delivery, Error>> {
        None
    }

    /// The message was handled: remove it.
    async fn ack(&mut self, delivery: &Delivery) -> Result<(), Error>;

    /// [`ack`](Self::ack) done at once, for transports that settle without
    /// waiting on the network (Kafka stores the offset in its client); the
    /// pump calls `ack` when this answers `None` (the default).
    fn try_ack(&mut self, delivery: &Delivery) -> Option<Result<(), Error>> {
        let _ = delivery;
        None
    }

    /// Deliver `delivery.message` (its handled count already incremented by the
    /// pump) again after `delay`, and settle the original.
    async fn requeue(&mut self, delivery: Delivery, delay: Duration) -> Result<(), Error>;

    /// Move the message to the dead-letter channel with `reason`.
    async fn reject(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error>;

    /// Move a message that cannot be mapped to the invalid-message channel with `reason`.
    async fn invalid(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error>;

    /// Do not acknowledge: leave the message with the broker for redelivery.
    async fn nack(&mut self, delivery: Delivery) -> Result<(), Error>;

    /// How many messages this channel could not even read (no usable id, a
    /// header it owns not UTF-8 ...) and moved to the invalid-message channel
    /// itself since the last call. The pump counts them with the invalid
    /// messages it parks. Default 0, for channels that hand every message over.
    fn take_unreadable(&mut self) -> u64 {
        0
    }

    /// Stop consuming; unsettled messages go back to the broker.
    async fn close(&mut self) -> Result<(), Error>;
}

/// Opens channels for subscriptions.
#[async_trait]
pub trait ChannelFactory: Send + Sync + 'static {
    /// Opens a channel, declaring what the transport needs (queue, binding ...).
    async fn create_channel(&self, spec: &ChannelSpec) -> Result<Box<dyn Channel>, Error>;

    /// Where channels from this factory receive, for the AsyncAPI document
    /// (no credentials); `None` by default.
    fn endpoint(&self) -> Option<Endpoint> {
        None
    }

    /// How many messages wait for the subscription `spec` describes (all its
    /// consumers together): on Kafka its group's committed offsets behind the
    /// topic's high watermarks, on RabbitMQ its queue's ready messages.
    /// `None` when the transport cannot tell (the default).
    async fn lag(&self, spec: &ChannelSpec) -> Result<Option<u64>, Error> {
        let _ = spec;
        Ok(None)
    }
}

#[async_trait]
impl<T: ChannelFactory + ?Sized> ChannelFactory for std::sync::Arc<T> {
    async fn create_channel(&self, spec: &ChannelSpec) -> Result<Box<dyn Channel>, Error> {
        (**self).create_channel(spec).await
    }

    fn endpoint(&self) -> Option<Endpoint> {
        (**self).endpoint()
    }

    async fn lag(&self, spec: &ChannelSpec) -> Result<Option<u64>, Error> {
        (**self).lag(spec).await
    }
}
