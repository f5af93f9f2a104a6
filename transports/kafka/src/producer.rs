//! [`KafkaProducer`]: idempotent, `acks=all`, many sends in flight; the
//! partition key is the record key, every header field a Kafka header.

use async_trait::async_trait;
use brighter_core::{Error, Message, Producer, wire};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::admin::transport;
use crate::config::KafkaConfig;

/// Sends messages to the topic in their header, with `acks=all` and (by
/// default) idempotence, so retries inside librdkafka neither lose nor
/// duplicate nor reorder. `send` returns when the broker acknowledged.
///
/// Kafka has no broker-side delay, and this producer never waits: a message
/// with a delay is refused (`Error::Validation`). Scheduled messages are held
/// by the outbox (`post_scheduled`, `deposit_post_scheduled`) and handed to
/// the producer by a sweeper when due; a consumer's `defer` goes through the
/// channel's retry tiers.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: FutureProducer,
    config: KafkaConfig,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Kafka headers for `message` sent as a record to `topic`, plus `extra`: the
/// record carries the topic and the partition key (its key), so the headers
/// leave them out, and what else [`wire::write`] reads back without.
pub(crate) fn headers(message: &Message, topic: &str, extra: &[(&str, String)]) -> OwnedHeaders {
    let mut headers = Some(OwnedHeaders::new_with_capacity(8 + extra.len()));
    let mut put = |key: &str, value: &str| {
        headers = headers.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
    };
    let carried = wire::Carried {
        topic: Some(topic),
        partition_key: true,
        ..wire::Carried::default()
    };
    wire::write(
        &message.header,
        wire::CloudEventsBinding::Kafka,
        carried,
        &mut put,
    );
    for (key, value) in extra {
        put(key, value);
    }
    headers.unwrap_or_default()
}

impl KafkaProducer {
    /// A producer with `config`.
    pub fn new(config: KafkaConfig) -> Result<Self, Error> {
        let timeout = config.send_timeout.as_millis().to_string();
        let client = config.client_with(&[
            ("acks", "all"),
            (
                "enable.idempotence",
                if config.idempotent { "true" } else { "false" },
            ),
            ("message.timeout.ms", &timeout),
            ("linger.ms", "5"),
        ]);
        let producer = client
            .create()
            .map_err(|e| transport("create the Kafka producer", e))?;
        Ok(KafkaProducer { producer, config })
    }

    /// Sends `message` to `topic` (not necessarily its own) with `extra` headers.
    pub(crate) async fn send_to(
        &self,
        topic: &str,
        message: &Message,
        extra: &[(&str, String)],
    ) -> Result<(), Error> {
        let mut record = FutureRecord::to(topic)
            .payload(message.body.as_ref())
            .headers(headers(message, topic, extra))
            .timestamp(message.header.timestamp.timestamp_millis());
        if let Some(key) = &message.header.partition_key {
            record = record.key(key.as_str());
        }
        self.producer
            .send(record, Timeout::After(self.config.send_timeout))
            .await
            .map(|_| ())
            .map_err(|(e, _)| produce_error(topic, e))
    }
}

/// A produce failure: `Error::Refused` when the broker (or the client on its
/// behalf) refuses the record for what it is, so that trying again is
/// pointless and the outbox parks it; a transport error otherwise.
fn produce_error(topic: &str, error: rdkafka::error::KafkaError) -> Error {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(
            code @ (Code::MessageSizeTooLarge
            | Code::InvalidMessageSize
            | Code::InvalidMessage
            | Code::InvalidRecord
            | Code::MessageBatchTooLarge),
        ) => Error::Refused {
            reason: format!("produce to '{topic}': {code}"),
        },
        _ => transport(&format!("produce to '{topic}'"), error),
    }
}

#[async_trait]
impl Producer for KafkaProducer {
    fn endpoint(&self) -> Option<brighter_core::Endpoint> {
        Some(self.config.endpoint())
    }

    fn system(&self) -> &'static str {
        "kafka"
    }

    async fn send(&self, message: &Message) -> Result<(), Error> {
        message.validate_for_send()?;
        if !message.header.delay.is_zero() {
            return Err(Error::validation(format!(
                "message {} has a delay of {:?}: Kafka has no broker-side delay and KafkaProducer never waits; schedule it through the outbox (post_scheduled or deposit_post_scheduled, sent by a sweeper when due)",
                message.id(),
                message.header.delay
            )));
        }
        self.send_to(&message.header.topic, message, &[]).await
    }
}
