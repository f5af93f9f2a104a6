//! [`RabbitChannelFactory`] and [`RabbitChannel`]: consume a subscription's queue
//! with a prefetch, settle each message by outcome.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::{Channel, ChannelFactory, ChannelSpec, Delivery, Error, wire};
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Consumer, ExchangeKind};
use tokio::time::Instant;

use crate::amqp::{
    CONTENT_HEADER_OVERHEAD, arguments, bind, confirm_mode, declare_exchange, declare_queue,
    header_size, header_text, message, millis, properties, publish_confirmed, text,
};
use crate::connection::{RabbitConnection, transport};

/// Opens [`RabbitChannel`]s, declaring each subscription's topology first
/// (idempotent): the exchange; a dead-letter exchange `<exchange>.dlx`; a durable
/// queue named after the channel, bound to the exchange with the topic, whose
/// rejected messages go to `<queue>.dlq`; and `<queue>.invalid` for messages that
/// cannot be read.
#[derive(Debug, Clone)]
pub struct RabbitChannelFactory {
    connection: RabbitConnection,
}

impl RabbitChannelFactory {
    /// Channels on `connection`.
    pub fn new(connection: RabbitConnection) -> Self {
        RabbitChannelFactory { connection }
    }

    /// The dead-letter queue of `queue`.
    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dlq")
    }

    /// The invalid-message queue of `queue`.
    pub fn invalid_message_queue(queue: &str) -> String {
        format!("{queue}.invalid")
    }
}

#[async_trait]
impl ChannelFactory for RabbitChannelFactory {
    async fn lag(&self, spec: &ChannelSpec) -> Result<Option<u64>, Error> {
        // A passive declare answers with the queue's ready messages; on a
        // channel of its own, as one for a missing queue closes its channel.
        let channel = self.connection.channel().await?;
        let declared = channel
            .queue_declare(
                spec.channel.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..lapin::options::QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "lag read".into()).await;
        let queue = declared
            .map_err(|e| transport(&format!("read the depth of queue '{}'", spec.channel), e))?;
        Ok(Some(u64::from(queue.message_count())))
    }

    fn endpoint(&self) -> Option<brighter_core::Endpoint> {
        Some(self.connection.config().endpoint())
    }

    async fn create_channel(&self, spec: &ChannelSpec) -> Result<Box<dyn Channel>, Error> {
        Ok(Box::new(RabbitChannel::open(&self.connection, spec).await?))
    }
}

/// Declares the topology of `spec` on `channel`.
pub(crate) async fn declare_topology(
    channel: &lapin::Channel,
    connection: &RabbitConnection,
    spec: &ChannelSpec,
) -> Result<(), Error> {
    let config = connection.config();
    let (exchange, queue) = (&config.exchange, &spec.channel);
    let dlx = format!("{exchange}.dlx");
    let expiry = config
        .queue_expiry
        .map(|expiry| ("x-expires", AMQPValue::LongLongInt(millis(expiry).max(1))));
    let with_expiry = |mut pairs: Vec<(&'static str, AMQPValue)>| {
        pairs.extend(expiry.clone());
        arguments(&pairs)
    };
    declare_exchange(channel, exchange, config.exchange_kind.clone(), false).await?;
    if spec.auto_delete {
        declare_queue(channel, queue, false, true, with_expiry(vec![])).await?;
    } else {
        declare_exchange(channel, &dlx, ExchangeKind::Direct, false).await?;
        let dlq = RabbitChannelFactory::dead_letter_queue(queue);
        let invalid = RabbitChannelFactory::invalid_message_queue(queue);
        declare_queue(channel, &dlq, true, false, with_expiry(vec![])).await?;
        bind(channel, &dlq, &dlx, queue).await?;
        declare_queue(channel, &invalid, true, false, with_expiry(vec![])).await?;
        bind(channel, &invalid, &dlx, &invalid).await?;
        let args = with_expiry(vec![
            ("x-dead-letter-exchange", text(&dlx)),
            ("x-dead-letter-routing-key", text(queue)),
        ]);
        declare_queue(channel, queue, true, false, args).await?;
    }
    bind(channel, queue, exchange, &spec.topic).await
}

/// The properties of a foreign message, for its copy in the invalid queue:
/// all of them but those that would make the broker refuse the copy
/// (`user-id`, checked against the publishing user) or drop it later
/// (`expiration`, a per-message TTL), and persistent.
fn parkable(original: &lapin::BasicProperties) -> lapin::BasicProperties {
    let mut copy = lapin::BasicProperties::default().with_delivery_mode(2);
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(value) = original.$get() {
                copy = copy.$set(value.clone());
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    copy
}

/// A consumer of one queue. Dropping it (or `close`) cancels the consumer and
/// closes the AMQP channel, so the broker redelivers what was not acked.
pub struct RabbitChannel {
    connection: RabbitConnection,
    channel: lapin::Channel,
    consumer: Consumer,
    consumer_tag: String,
    queue: String,
    in_flight: HashMap<u64, lapin::message::Delivery>,
    /// Whether this queue is bound to the delay ladder's delivery exchange.
    delay_bound: bool,
    closed: bool,
    /// Unreadable messages moved to the invalid-message channel, not yet reported.
    unreadable: u64,
}

impl std::fmt::Debug for RabbitChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitChannel")
            .field("queue", &self.queue)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl RabbitChannel {
    async fn open(connection: &RabbitConnection, spec: &ChannelSpec) -> Result<Self, Error> {
        let channel = connection.channel().await?;
        confirm_mode(&channel).await?;
        declare_topology(&channel, connection, spec).await?;
        let prefetch = u16::try_from(spec.buffer_size).unwrap_or(u16::MAX).max(1);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| transport("set prefetch", e))?;
        let consumer_tag = format!("{}-{}", spec.subscription, uuid::Uuid::now_v7().simple());
        let consumer = channel
            .basic_consume(
                spec.channel.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| transport(&format!("consume '{}'", spec.channel), e))?;
        Ok(RabbitChannel {
            connection: connection.clone(),
            channel,
            consumer,
            consumer_tag,
            queue: spec.channel.clone(),
            in_flight: HashMap::new(),
            delay_bound: false,
            closed: false,
            unreadable: 0,
        })
    }

    /// Whether `properties` fit one frame of this connection.
    fn fits(&self, properties: &lapin::BasicProperties) -> bool {
        header_size(properties) + CONTENT_HEADER_OVERHEAD <= self.connection.frame_max()
    }

    fn take(&mut self, delivery: &Delivery) -> Result<lapin::message::Delivery, Error> {
        self.in_flight.remove(&delivery.tag).ok_or_else(|| {
            transport(
                "settle",
                format!(
                    "delivery {} is not in flight (already settled?)",
                    delivery.tag
                ),
            )
        })
    }

    /// Publishes `delivery`'s message to the dead-letter exchange with a reason
    /// header, then acks the original.
    async fn park(
        &mut self,
        delivery: &Delivery,
        routing_key: &str,
        reason_header: &str,
        reason: &str,
    ) -> Result<(), Error> {
        let original = self.take(delivery)?;
        let dlx = format!("{}.dlx", self.connection.config().exchange);
        let reason = wire::bounded_reason(reason);
        // The original's headers as they came (their AMQP types kept), plus
        // the reason; its properties but those that would expire or refuse
        // the copy.
        let mut headers = original.properties.headers().clone().unwrap_or_default();
        headers.insert(reason_header.into(), text(reason));
        let mut props = parkable(&original.properties).with_headers(headers);
        if !self.fits(&props) {
            // The copy is over a frame where the original was not (its
            // headers plus the reason): park the body with the framework's
            // fields and the reason, and say how many headers were left out.
            let mut minimal = brighter_core::Message::clone(&delivery.message);
            let dropped = minimal.header.bag.len().to_string();
            minimal.header.bag.clear();
            tracing::warn!(id = %minimal.id(), dropped, "the parked copy is too large for a frame with its headers; parked without them");
            props = properties(
                &minimal,
                &[(reason_header, reason), (wire::HEADERS_DROPPED, &dropped)],
            );
        }
        publish_confirmed(
            &self.channel,
            &dlx,
            routing_key,
            &delivery.message.body,
            props,
            true,
            &self.connection,
        )
        .await?;
        original
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| transport("ack", e))?;
        Ok(())
    }

    /// A message that could not even be read: moved to the invalid queue as it
    /// came, with the reason.
    async fn park_raw(
        &mut self,
        delivery: lapin::message::Delivery,
        reason: &str,
    ) -> Result<(), Error> {
        let dlx = format!("{}.dlx", self.connection.config().exchange);
        let reason = wire::bounded_reason(reason);
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(wire::INVALID_REASON.into(), text(reason));
        let mut props = parkable(&delivery.properties).with_headers(headers);
        if !self.fits(&props) {
            let dropped = delivery
                .properties
                .headers()
                .as_ref()
                .map_or(0, |h| h.inner().len());
            let mut only = FieldTable::default();
            only.insert(wire::INVALID_REASON.into(), text(reason));
            only.insert(wire::HEADERS_DROPPED.into(), text(&dropped.to_string()));
            props = parkable(&delivery.properties).with_headers(only);
        }
        let key = RabbitChannelFactory::invalid_message_queue(&self.queue);
        publish_confirmed(
            &self.channel,
            &dlx,
            &key,
            &delivery.data,
            props,
            true,
            &self.connection,
        )
        .await?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| transport("ack", e))?;
        Ok(())
    }

    /// Where a requeue with `delay` goes: (exchange, routing key). Straight
    /// back to the queue without one; else into the delay ladder (declared
    /// once per connection, this queue bound to its end once per channel).
    async fn requeue_route(&mut self, delay: Duration) -> Result<(String, String), Error> {
        if delay.is_zero() {
            return Ok((String::new(), self.queue.clone()));
        }
        let routing_key = crate::delay::routing_key(delay, &self.queue)?;
        let channel = &self.channel;
        self.connection
            .ladder
            .get_or_try_init(|| crate::delay::declare_ladder(channel))
            .await?;
        if !self.delay_bound {
            crate::delay::bind_destination(&self.channel, &self.queue).await?;
            self.delay_bound = true;
        }
        Ok((crate::delay::entry_exchange(), routing_key))
    }
}

impl Drop for RabbitChannel {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let channel = self.channel.clone();
            runtime.spawn(async move {
                // Closing returns the unacked messages to the queue.
                let _ = channel.close(200, "consumer dropped".into()).await;
            });
        }
    }
}

#[async_trait]
impl Channel for RabbitChannel {
    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    async fn receive(&mut self, timeout: Duration) -> Result<Option<Delivery>, Error> {
        let mut deadline = None;
        loop {
            // A delivery already buffered is taken without arming a timer.
            let next = match self.consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, self.consumer.next()).await {
                        Err(_elapsed) => return Ok(None),
                        Ok(next) => next,
                    }
                }
            };
            let mut delivery = match next {
                None => return Err(transport("consume", "the broker cancelled the consumer")),
                Some(Err(e)) => return Err(transport("consume", e)),
                Some(Ok(delivery)) => delivery,
            };
            match message(
                &delivery.properties,
                delivery.routing_key.as_str(),
                bytes::Bytes::new(),
            ) {
                Ok(mut message) => {
                    // The body moves to the message; the delivery is kept
                    // to settle it (its acker, its properties for a copy).
                    message.body = std::mem::take(&mut delivery.data).into();
                    let tag = delivery.delivery_tag;
                    self.in_flight.insert(tag, delivery);
                    return Ok(Some(Delivery::new(message, tag)));
                }
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "unreadable message moved to the invalid-message queue");
                    Box::pin(self.park_raw(delivery, &e.to_string())).await?;
                    self.unreadable += 1;
                }
            }
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), Error> {
        self.take(delivery)?
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| transport("ack", e))
    }

    async fn requeue(&mut self, delivery: Delivery, delay: Duration) -> Result<(), Error> {
        let (exchange, routing_key) = self.requeue_route(delay).await?;
        let original = self.take(&delivery)?;
        let props = properties(&delivery.message, &[]);
        publish_confirmed(
            &self.channel,
            &exchange,
            &routing_key,
            &delivery.message.body,
            props,
            true,
            &self.connection,
        )
        .await?;
        original
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| transport("ack", e))
    }

    async fn reject(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error> {
        let queue = self.queue.clone();
        self.park(&delivery, &queue, wire::DEAD_LETTER_REASON, reason)
            .await
    }

    async fn invalid(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error> {
        let key = RabbitChannelFactory::invalid_message_queue(&self.queue);
        self.park(&delivery, &key, wire::INVALID_REASON, reason)
            .await
    }

    fn take_unreadable(&mut self) -> u64 {
        std::mem::take(&mut self.unreadable)
    }

    async fn nack(&mut self, delivery: Delivery) -> Result<(), Error> {
        self.take(&delivery)?
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| transport("nack", e))
    }

    async fn close(&mut self) -> Result<(), Error> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let _ = self
            .channel
            .basic_cancel(
                self.consumer_tag.as_str().into(),
                BasicCancelOptions::default(),
            )
            .await;
        self.channel
            .close(200, "closing".into())
            .await
            .map_err(|e| transport("close channel", e))
    }
}

/// The reason header of a parked AMQP message, for tools reading the dead-letter
/// and invalid queues.
pub fn parked_reason(properties: &lapin::BasicProperties) -> Option<String> {
    header_text(properties, wire::DEAD_LETTER_REASON)
        .or_else(|| header_text(properties, wire::INVALID_REASON))
}
