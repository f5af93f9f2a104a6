//! # brighter-rabbitmq
//!
//! The RabbitMQ transport (lapin): [`RabbitProducer`] publishes with publisher
//! confirms, many in flight; [`RabbitChannelFactory`] declares each
//! subscription's durable topology (exchange, queue, binding, dead-letter
//! exchange and queues) and opens [`RabbitChannel`]s that ack, reject to the
//! dead-letter queue with the reason in a header, nack, and requeue with a delay
//! that really waits and cannot lose a message (a fixed ladder of delay levels,
//! see [`DELAY_LEVELS`]). Both share a
//! [`RabbitConnection`] that reconnects after a broker restart; the dispatcher's
//! supervisor reopens channels, so consumers resume on their own.
//!
//! ```no_run
//! # async fn example() -> Result<(), brighter_core::Error> {
//! use brighter_rabbitmq::{RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer};
//!
//! let connection = RabbitConnection::new(RabbitConfig::from_env().exchange("shop"));
//! let producer = RabbitProducer::new(connection.clone());
//! let channels = RabbitChannelFactory::new(connection);
//! // CommandProcessor::builder().producer(producer).reply_channels(channels.clone()) ...
//! // Subscription::command::<PlaceOrder>("orders", "orders.place", channels) ...
//! # let _ = (producer, channels); Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod amqp;
mod channel;
mod config;
mod connection;
mod dead_letters;
mod delay;
mod producer;

pub use channel::{RabbitChannel, RabbitChannelFactory, parked_reason};
pub use config::{ExchangeKind, RabbitConfig, redact};
pub use connection::RabbitConnection;
pub use dead_letters::{DeadLetter, list_dead_letters, replay_dead_letters};
pub use delay::{DELAY_LADDER, DELAY_LEVELS};
pub use producer::RabbitProducer;

/// The AMQP properties a producer sends `message` with: message id, correlation
/// id, reply-to, content type, timestamp, type, persistent delivery, and every
/// header field in the headers table. For tools that publish to brighter queues.
pub fn encode_properties(message: &brighter_core::Message) -> lapin::BasicProperties {
    amqp::properties(message, &[])
}

/// How many bytes `properties` take in a content header frame; with 20
/// bytes of frame overhead this must fit the broker's `frame_max`
/// ([`RabbitConnection::frame_max`]), or the producer and the channel refuse
/// the message ([`brighter_core::Error::Refused`]) rather than have the
/// broker close the connection.
pub fn properties_size(properties: &lapin::BasicProperties) -> usize {
    amqp::header_size(properties)
}

/// Reads a message from AMQP properties, routing key and body, as a channel
/// does: for tools that read the dead-letter and invalid queues.
pub fn decode_message(
    properties: &lapin::BasicProperties,
    routing_key: &str,
    body: Vec<u8>,
) -> Result<brighter_core::Message, brighter_core::Error> {
    amqp::message(properties, routing_key, body)
}
