//! # brighter
//!
//! A Brighter-style messaging framework: a command processor that dispatches
//! commands and events to handlers through a policy pipeline (retry, circuit
//! breaker, timeout, once-only), a transactional outbox swept to Kafka or
//! RabbitMQ, and a message pump that records each message in an inbox so its
//! work happens once.
//!
//! This crate is the one a service depends on. Without features it is the core
//! ([`CommandProcessor`], [`Dispatcher`], the in-memory broker, outbox and
//! inbox); each transport and store is a feature, and the client crates that
//! appear in their APIs are re-exported so their versions cannot drift from the
//! ones brighter was built with:
//!
//! | feature | what it adds |
//! |---|---|
//! | `macros` (default) | `#[derive(Command)]`, `#[derive(Event)]`, `#[derive(Request)]` |
//! | `kafka` | [`kafka`]: the Kafka producer and channels, and [`rdkafka`] |
//! | `kafka-cmake-build`, `kafka-dynamic-linking` | how librdkafka is built: with CMake, or the system's (default: rdkafka's own build, make and a C compiler) |
//! | `kafka-ssl`, `kafka-ssl-vendored`, `kafka-sasl`, `kafka-zstd` | TLS (and SASL PLAIN/SCRAM over it), Kerberos, zstd |
//! | `rabbitmq`, `rabbitmq-tls` | [`rabbitmq`]: the RabbitMQ producer and channels, and [`lapin`] |
//! | `postgres`, `postgres-tls` | [`postgres`]: the outbox, sweeper, unit of work, inbox and saga store, and [`sqlx`] |
//! | `otel` | [`otel`]: OTLP export of traces and metrics, W3C propagation |
//! | `testing` | [`testing`]: the test kit; [`conformance`]: the transport and store suites |
//!
//! ```
//! use brighter::{Command, CommandProcessor, Error, Handler, RequestContext};
//! use brighter::uuid::Uuid;
//!
//! #[derive(Command)]
//! struct Greet { id: Uuid, name: String }
//!
//! struct GreetHandler;
//! impl Handler<Greet> for GreetHandler {
//!     async fn handle(&self, cmd: &Greet, _: &mut RequestContext) -> Result<(), Error> {
//!         assert_eq!(cmd.name, "Ada");
//!         Ok(())
//!     }
//! }
//!
//! # tokio_block_on(async {
//! let processor = CommandProcessor::builder().command(GreetHandler).build()?;
//! processor.send(&Greet { id: Uuid::now_v7(), name: "Ada".into() }).await?;
//! # Ok::<(), Error>(()) }).unwrap();
//! # fn tokio_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The derives name `::brighter`; inside this crate's own doc tests too.
#[allow(unused_extern_crates)]
extern crate self as brighter;

pub use brighter_core::*;

/// The Kafka transport: [`KafkaProducer`](kafka::KafkaProducer),
/// [`KafkaChannelFactory`](kafka::KafkaChannelFactory) and their configuration
/// (see `brighter-kafka`).
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka {
    pub use brighter_kafka::*;
}

/// rdkafka, the Kafka client the transport is built on, at the version it uses.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use rdkafka;

/// The RabbitMQ transport: [`RabbitProducer`](rabbitmq::RabbitProducer),
/// [`RabbitChannelFactory`](rabbitmq::RabbitChannelFactory),
/// [`RabbitConnection`](rabbitmq::RabbitConnection) (see `brighter-rabbitmq`).
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub mod rabbitmq {
    pub use brighter_rabbitmq::*;
}

/// lapin, the AMQP client the RabbitMQ transport is built on, at the version it uses.
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub use lapin;

/// Postgres: the transactional [`PgOutbox`](postgres::PgOutbox), the
/// [`PgSweeper`](postgres::PgSweeper), the [`PgUnitOfWork`](postgres::PgUnitOfWork),
/// the [`PgInbox`](postgres::PgInbox) and the [`PgSagaStore`](postgres::PgSagaStore)
/// (see `brighter-outbox-postgres`, `brighter-inbox-postgres` and
/// `brighter-saga-postgres`).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres {
    pub use brighter_inbox_postgres::{PgInbox, PgInboxBuilder};
    pub use brighter_outbox_postgres::*;
    pub use brighter_saga_postgres::{PgSagaStore, PgSagaStoreBuilder};
}

/// sqlx, the Postgres client the stores are built on, at the version they use.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use sqlx;

/// OpenTelemetry set-up: [`init`](otel::init) exports traces and metrics over
/// OTLP (see `brighter-otel`).
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod otel {
    pub use brighter_otel::*;
}
