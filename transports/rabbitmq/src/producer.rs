//! [`RabbitProducer`]: publishes with publisher confirms, many in flight, and
//! returns only when the broker confirmed the message.

use async_trait::async_trait;
use brighter_core::{Error, Message, Producer};
use lapin::Channel;
use tokio::sync::Mutex;

use crate::amqp::{confirm_mode, declare_exchange, properties, publish_confirmed, unfit_for_amqp};
use crate::connection::RabbitConnection;

/// Sends messages to the configured exchange with the topic as routing key,
/// persistent and mandatory (a message no queue is bound to comes back from
/// the broker and the send fails with `Error::Unroutable`, so the outbox keeps
/// it; see `Publication::drop_if_unrouted` for events), through one confirm-mode channel shared by concurrent sends (so
/// many publishes are in flight at once). A message with a delay is refused
/// (`Error::Validation`): scheduled messages are held by the outbox
/// (`post_scheduled`) and handed to the producer when due; a consumer's
/// `defer` waits in the delay ladder. After a dropped connection the next send reconnects; what
/// was not confirmed was not marked dispatched, so the outbox sends it again.
#[derive(Debug)]
pub struct RabbitProducer {
    connection: RabbitConnection,
    /// The live channel: cloned by every send without waiting.
    channel: std::sync::Mutex<Option<Channel>>,
    /// Held while (re)opening the channel, so one send reconnects for all.
    reopen: Mutex<()>,
}

impl RabbitProducer {
    /// A producer on `connection`.
    pub fn new(connection: RabbitConnection) -> Self {
        RabbitProducer {
            connection,
            channel: std::sync::Mutex::new(None),
            reopen: Mutex::new(()),
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
        *self.slot() = Some(channel.clone());
        Ok(channel)
    }

    async fn publish(&self, message: &Message) -> Result<(), Error> {
        let channel = self.channel().await?;
        let config = self.connection.config();
        let props = properties(message, &[]);
        publish_confirmed(
            &channel,
            &config.exchange,
            &message.header.topic,
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
    fn endpoint(&self) -> Option<brighter_core::Endpoint> {
        Some(self.connection.config().endpoint())
    }

    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    async fn send(&self, message: &Message) -> Result<(), Error> {
        message.validate_for_send()?;
        if !message.header.delay.is_zero() {
            return Err(Error::validation(format!(
                "message {} has a delay of {:?}: RabbitProducer sends now and never waits; schedule it through the outbox (post_scheduled or deposit_post_scheduled, sent by a sweeper when due)",
                message.id(),
                message.header.delay
            )));
        }
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
