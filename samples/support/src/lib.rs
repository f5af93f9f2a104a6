//! What the samples share: their command line (`--transport`, `--outbox`), the
//! broker and outbox it selects, OpenTelemetry set-up, and waiting for a
//! condition with a limit.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use brighter_core::{ChannelFactory, Error, InMemoryBroker, Producer};
use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer};
use brighter_rabbitmq::{RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use brighter_otel::OtelGuard;

/// What the command line chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `memory`, `rabbitmq` or `kafka`.
    pub transport: String,
    /// `memory` or `postgres`.
    pub outbox: String,
}

/// Reads `--transport memory|rabbitmq|kafka` and `--outbox memory|postgres` from
/// `args` (defaults: `default_transport`, `default_outbox`).
pub fn options(
    args: impl IntoIterator<Item = String>,
    default_transport: &str,
    default_outbox: &str,
) -> Result<Options, Error> {
    let mut options = Options {
        transport: default_transport.to_owned(),
        outbox: default_outbox.to_owned(),
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let value = args.next();
        match (flag.as_str(), value) {
            ("--transport", Some(value)) => options.transport = value,
            ("--outbox", Some(value)) => options.outbox = value,
            _ => {
                return Err(Error::configuration(format!(
                    "unexpected argument '{flag}': use [--transport memory|rabbitmq|kafka] [--outbox memory|postgres]"
                )));
            }
        }
    }
    if !matches!(options.transport.as_str(), "memory" | "rabbitmq" | "kafka") {
        return Err(Error::configuration(format!(
            "unknown transport '{}': use memory, rabbitmq or kafka",
            options.transport
        )));
    }
    if !matches!(options.outbox.as_str(), "memory" | "postgres") {
        return Err(Error::configuration(format!(
            "unknown outbox '{}': use memory or postgres",
            options.outbox
        )));
    }
    Ok(options)
}

/// A broker: a name to print, a producer to it and channels from it.
#[derive(Clone)]
pub struct Transport {
    /// e.g. `RabbitMQ`.
    pub name: &'static str,
    /// Sends messages to the broker.
    pub producer: Arc<dyn Producer>,
    /// Opens subscription and reply channels.
    pub channels: Arc<dyn ChannelFactory>,
}

/// Connects to the broker `kind` (`memory`, `rabbitmq` at `AMQP_ADDR`, `kafka` at
/// `KAFKA_BROKERS`); RabbitMQ messages go through the exchange `exchange`.
pub fn transport(kind: &str, exchange: &str) -> Result<Transport, Error> {
    match kind {
        "memory" => {
            let broker = InMemoryBroker::new();
            Ok(Transport {
                name: "in-memory broker",
                producer: Arc::new(broker.clone()),
                channels: Arc::new(broker),
            })
        }
        "rabbitmq" => {
            let config = RabbitConfig::from_env()
                .exchange(exchange)
                .connection_name(format!("{exchange}-sample"))
                // Each run of a sample declares queues with fresh names; the
                // broker drops them half an hour after the run. A service with
                // a long-lived queue leaves this out.
                .queue_expiry(std::time::Duration::from_secs(1800));
            let connection = RabbitConnection::new(config);
            Ok(Transport {
                name: "RabbitMQ",
                producer: Arc::new(RabbitProducer::new(connection.clone())),
                channels: Arc::new(RabbitChannelFactory::new(connection)),
            })
        }
        "kafka" => {
            let config = KafkaConfig::from_env();
            let producer = KafkaProducer::new(config.clone())?;
            Ok(Transport {
                name: "Kafka",
                producer: Arc::new(producer.clone()),
                channels: Arc::new(KafkaChannelFactory::new(config, producer)),
            })
        }
        other => Err(Error::configuration(format!(
            "unknown transport '{other}': use memory, rabbitmq or kafka"
        ))),
    }
}

/// A pool on `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
pub async fn postgres() -> Result<PgPool, Error> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .map_err(|e| Error::transport("connect to Postgres (DATABASE_URL)", e))
}

/// OpenTelemetry for `service`: OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is set (see `brighter-otel`), and logs at `RUST_LOG` (default `warn`).
pub fn telemetry(service: &str) -> Result<OtelGuard, Error> {
    brighter_otel::init(service).map_err(|e| Error::configuration(e.to_string()))
}

/// Waits until `done` holds, checking every 10 ms; fails after `limit` with
/// "`what` did not happen within `limit`".
pub async fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl AsyncFnMut() -> bool,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::configuration(format!(
                "{what} did not happen within {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
