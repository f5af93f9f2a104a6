//! # brighter-kafka
//!
//! The Kafka transport (rdkafka). A stream is not a queue: no per-message lock,
//! no broker requeue, order by partition. [`KafkaProducer`] is idempotent with
//! `acks=all` and the partition key as record key; [`KafkaChannel`] is a member
//! of the subscription's consumer group that stores an offset only after the
//! message's outcome is settled (committed by librdkafka every second, on
//! rebalance and on close), so a message is never skipped. Outcomes: defer =
//! republish through retry tiers of fixed waits (`<group>.retry.<seconds>s`,
//! see [`RETRY_TIERS`]) and read it back when due (a waiting tier partition
//! pauses; the main topic and the other tiers keep flowing, and no long delay
//! holds back a short one); dead letter = `<group>.dlq`
//! with the reason and the original topic, partition and offset; invalid =
//! `<group>.invalid`; don't-ack = seek back. [`replay`] resets a group.
//!
//! ```no_run
//! # fn example() -> Result<(), brighter_core::Error> {
//! use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer};
//!
//! let config = KafkaConfig::from_env();
//! let producer = KafkaProducer::new(config.clone())?;
//! let channels = KafkaChannelFactory::new(config, producer.clone());
//! // CommandProcessor::builder().producer(producer) ...
//! // Subscription::command::<PlaceOrder>("orders", "orders.place", channels) ...
//! # let _ = channels; Ok(()) }
//! ```

// `unsafe` only where rdkafka's safe API panics on what a broker hands us
// (`record_headers`).
#![deny(unsafe_code)]

mod admin;
mod channel;
mod config;
mod dead_letters;
mod producer;
mod record_headers;

pub use admin::{ReplayFrom, ensure_topics, replay};
pub use channel::{
    DUE, KafkaChannel, KafkaChannelFactory, MAX_RETRY_WAIT, NOT_BEFORE, ORIGINAL_OFFSET,
    ORIGINAL_PARTITION, ORIGINAL_TOPIC, RETRY_TIERS, decode_record,
};
pub use config::KafkaConfig;
pub use dead_letters::{DeadLetter, list_dead_letters, replay_dead_letters, replay_group};
pub use producer::KafkaProducer;
pub use record_headers::RecordHeaders;

/// The Kafka record headers a [`KafkaProducer`] writes for `message` sent to
/// its own topic with its partition key as the record key (the header fields
/// the record does not carry, see [`brighter_core::wire::write`]): for tools
/// and tests that write records with their own client.
pub fn encode_headers(message: &brighter_core::Message) -> rdkafka::message::OwnedHeaders {
    producer::headers(message, &message.header.topic, &[])
}
