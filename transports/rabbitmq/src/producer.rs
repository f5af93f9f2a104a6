//! [`RabbitProducer`]: publishes with publisher confirms, many in flight, and
//! returns only when the broker confirmed the message.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::{Error, Message, Producer};
use lapin::{Channel, ExchangeKind};
use tokio::sync::Mutex;

use crate::amqp::{
    arguments, bind, confirm_mode, declare_exchange, declare_queue, millis, properties,
    publish_confirmed, text, unfit_for_amqp,
};
use crate::connection::RabbitConnection;

/// Sends messages to the configured exchange with the topic as routing key,
/// persistent and mandatory (a message no queue is bound to comes back from
/// the broker and the send fails with `Error::Unroutable`, so the outbox keeps
/// it; see `Publication::drop_if_unrouted` for events), through one confirm-mode channel shared by concurrent sends (so
/// many publishes are in flight at once). A message with a delay goes through a
/// delay exchange and queue per delay value, whose TTL dead-letters it to the
/// exchange when due. After a dropped connection the next send reconnects; what
/// was not confirmed was not marked dispatched, so the outbox sends it again.
#[derive(Debug)]
pub struct RabbitProducer {
    connection: RabbitConnection,
    /// The live channel: cloned by every send without waiting.
    channel: std::sync::Mutex<Option<Channel>>,
    /// Held while (re)opening the channel, so one send reconnects for all.
    reopen: Mutex<()>,
    delays: Mutex<HashSet<i64>>,
}

impl RabbitProducer {
    /// A producer on `connection`.
    pub fn new(connection: RabbitConnection) -> Self {
        RabbitProducer {
            connection,
            channel: std::sync::Mutex::new(None),
            reopen: Mutex::new(()),
            delays: Mutex::new(HashSet::new()),
        }
    }

    fn live(&self) -> Option<Channel> {
        self.slot()
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Channel>> {
        // Only ever held for a clone or an assignment.
        self.channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn channel(&self) -> Result<Channel, Error> {
        if let Some(channel) = self.live() {
            return Ok(channel);
        }
        let _reopening = self.reopen.lock().await;
        if let Some(channel) = self.live() {
            return Ok(channel); // another send reopened it meanwhile
        }
        let channel = self.connection.channel().await?;
        confirm_mode(&channel).await?;
        let config = self.connection.config();
        declare_exchange(
            &channel,
            &config.exchange,
            config.exchange_kind.clone(),
            false,
        )
        .await?;
        self.delays.lock().await.clear();
        *self.slot() = Some(channel.clone());
        Ok(channel)
    }

    /// The delay exchange for `delay`, declared on first use.
    async fn delay_exchange(&self, channel: &Channel, delay: Duration) -> Result<String, Error> {
        let ms = millis(delay);
        let exchange = &self.connection.config().exchange;
        let name = format!("{exchange}.delay.{ms}");
        if self.delays.lock().await.contains(&ms) {
            return Ok(name);
        }
        declare_exchange(channel, &name, ExchangeKind::Fanout, true).await?;
        let args = arguments(&[
            ("x-message-ttl", lapin::types::AMQPValue::LongLongInt(ms)),
            ("x-dead-letter-exchange", text(exchange)),
            // Unused delay queues go away ten minutes after their last message.
            (
                "x-expires",
                lapin::types::AMQPValue::LongLongInt(ms.saturating_add(600_000)),
            ),
        ]);
        declare_queue(channel, &name, true, false, args).await?;
        bind(channel, &name, &name, "").await?;
        self.delays.lock().await.insert(ms);
        Ok(name)
    }

    async fn publish(&self, message: &Message) -> Result<(), Error> {
        let channel = self.channel().await?;
        let config = self.connection.config();
        let props = properties(message, &[]);
        let topic = &message.header.topic;
        if message.header.delay.is_zero() {
            return publish_confirmed(
                &channel,
                &config.exchange,
                topic,
                &message.body,
                props,
                true,
                &self.connection,
            )
            .await;
        }
        let exchange = self.delay_exchange(&channel, message.header.delay).await?;
        let sent = publish_confirmed(
            &channel,
            &exchange,
            topic,
            &message.body,
            props.clone(),
            true,
            &self.connection,
        )
        .await;
        if sent.is_ok() {
            return sent;
        }
        // The delay queue may have expired since it was declared: declare again, once.
        self.delays
            .lock()
            .await
            .remove(&millis(message.header.delay));
        let exchange = self.delay_exchange(&channel, message.header.delay).await?;
        publish_confirmed(
            &channel,
            &exchange,
            topic,
            &message.body,
            props,
            true,
            &self.connection,
        )
        .await
    }
}

#[async_trait]
impl Producer for RabbitProducer {
    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    async fn send(&self, message: &Message) -> Result<(), Error> {
        message.validate_for_send()?;
        if let Some(reason) = unfit_for_amqp(message) {
            return Err(Error::validation(reason));
        }
        let result = self.publish(message).await;
        if result.is_err() {
            let mut slot = self.slot();
            if slot.as_ref().is_some_and(|c| !c.status().connected()) {
                *slot = None;
            }
        }
        result
    }
}
