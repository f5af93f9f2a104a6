//! What the samples share: their command line (`--transport`, `--outbox`), the
//! broker and outbox it selects, OpenTelemetry set-up, and waiting for a
//! condition with a limit.
//!
//! Each broker and store is a cargo feature of the sample (`kafka`, `rabbitmq`,
//! `postgres`, `otel`, or `full` for all), so the in-memory quick start builds
//! none of their clients; choosing one the build lacks is an error that names
//! the feature.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "postgres")]
use brighter::sqlx::PgPool;
use brighter::{
    ChannelFactory, CommandProcessor, Error, InMemoryBroker, InMemoryOutbox, Outbox, Producer,
    RunningSweeper,
};

/// What the command line chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `memory`, `rabbitmq` or `kafka`.
    pub transport: String,
    /// `memory` or `postgres`.
    pub outbox: String,
    /// Print the sample's AsyncAPI document and exit (`--asyncapi`).
    pub asyncapi: bool,
}

/// Reads `--transport memory|rabbitmq|kafka`, `--outbox memory|postgres` and
/// `--asyncapi` from `args` (defaults: `default_transport`, `default_outbox`).
pub fn options(
    args: impl IntoIterator<Item = String>,
    default_transport: &str,
    default_outbox: &str,
) -> Result<Options, Error> {
    let mut options = Options {
        transport: default_transport.to_owned(),
        outbox: default_outbox.to_owned(),
        asyncapi: false,
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "--asyncapi" {
            options.asyncapi = true;
            continue;
        }
        let value = args.next();
        match (flag.as_str(), value) {
            ("--transport", Some(value)) => options.transport = value,
            ("--outbox", Some(value)) => options.outbox = value,
            _ => {
                return Err(Error::configuration(format!(
                    "unexpected argument '{flag}': use [--transport memory|rabbitmq|kafka] [--outbox memory|postgres] [--asyncapi]"
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
    probe: Probe,
}

/// How to ask the broker whether it answers.
#[derive(Clone)]
enum Probe {
    Memory,
    #[cfg(feature = "rabbitmq")]
    Rabbit(brighter::rabbitmq::RabbitConnection),
    /// The client is made on the first ping: only a service that asks for
    /// its readiness pays for one more librdkafka client.
    #[cfg(feature = "kafka")]
    Kafka(
        brighter::kafka::KafkaConfig,
        Arc<std::sync::OnceLock<brighter::rdkafka::producer::BaseProducer>>,
    ),
}

impl Transport {
    /// Whether the broker answers now (within `limit`): RabbitMQ opens a
    /// channel, Kafka fetches the cluster's metadata.
    pub async fn ping(&self, limit: Duration) -> Result<(), Error> {
        match &self.probe {
            Probe::Memory => {
                let _ = limit;
                Ok(())
            }
            #[cfg(feature = "rabbitmq")]
            Probe::Rabbit(connection) => {
                let channel = tokio::time::timeout(limit, connection.channel())
                    .await
                    .map_err(|_| Error::Timeout(limit))??;
                let _ = channel.close(200, "ping".into()).await;
                Ok(())
            }
            #[cfg(feature = "kafka")]
            Probe::Kafka(config, client) => {
                use brighter::rdkafka::producer::Producer as _;
                let (config, client) = (config.clone(), Arc::clone(client));
                tokio::task::spawn_blocking(move || {
                    let client = match client.get() {
                        Some(client) => client,
                        None => {
                            let made = config.client().create().map_err(|e| {
                                Error::configuration(format!("a Kafka client: {e}"))
                            })?;
                            client.get_or_init(|| made)
                        }
                    };
                    client
                        .client()
                        .fetch_metadata(None, limit)
                        .map(|_| ())
                        .map_err(|e| Error::transport("fetch Kafka metadata", e))
                })
                .await
                .map_err(|e| Error::transport("ping Kafka", e))?
            }
        }
    }
}

/// Connects to the broker `kind` (`memory`, `rabbitmq` at `AMQP_ADDR`, `kafka` at
/// `KAFKA_BROKERS`); RabbitMQ messages go through the exchange `exchange`.
pub fn transport(kind: &str, exchange: &str) -> Result<Transport, Error> {
    #[cfg(not(feature = "rabbitmq"))]
    let _ = exchange;
    match kind {
        "memory" => {
            let broker = InMemoryBroker::new();
            Ok(Transport {
                name: "in-memory broker",
                producer: Arc::new(broker.clone()),
                channels: Arc::new(broker),
                probe: Probe::Memory,
            })
        }
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => {
            use brighter::rabbitmq::{
                RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer,
            };
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
                channels: Arc::new(RabbitChannelFactory::new(connection.clone())),
                probe: Probe::Rabbit(connection),
            })
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            use brighter::kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer};
            let config = KafkaConfig::from_env();
            let producer = KafkaProducer::new(config.clone())?;
            Ok(Transport {
                name: "Kafka",
                producer: Arc::new(producer.clone()),
                channels: Arc::new(KafkaChannelFactory::new(config.clone(), producer)),
                probe: Probe::Kafka(config, Arc::default()),
            })
        }
        #[cfg(not(feature = "rabbitmq"))]
        "rabbitmq" => Err(missing_feature(kind)),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(missing_feature(kind)),
        other => Err(Error::configuration(format!(
            "unknown transport '{other}': use memory, rabbitmq or kafka"
        ))),
    }
}

/// The error for a broker or store this build of the sample was compiled without.
#[cfg_attr(
    all(
        feature = "kafka",
        feature = "rabbitmq",
        feature = "postgres",
        feature = "otel"
    ),
    allow(dead_code)
)]
fn missing_feature(feature: &str) -> Error {
    Error::configuration(format!(
        "this build has no '{feature}' support: run the sample with `--features {feature}` \
         (or `--features full`), e.g. cargo run -p greetings --features {feature} -- ..."
    ))
}

/// The outbox the command line chose.
#[derive(Clone)]
pub struct SampleOutbox {
    /// Where messages wait to be sent.
    pub outbox: Arc<dyn Outbox>,
    #[cfg(feature = "postgres")]
    postgres: Option<brighter::postgres::PgOutbox>,
}

impl SampleOutbox {
    /// Whether a sweeper sends from it (a Postgres table); the in-memory
    /// outbox is cleared by the writer.
    pub fn is_swept(&self) -> bool {
        #[cfg(feature = "postgres")]
        if self.postgres.is_some() {
            return true;
        }
        false
    }

    /// Starts a sweeper on a swept outbox (sending at once, as from another
    /// process); `None` for the in-memory outbox.
    pub async fn start_sweeper(
        &self,
        processor: &CommandProcessor,
    ) -> Result<Option<RunningSweeper>, Error> {
        #[cfg(feature = "postgres")]
        if let Some(outbox) = &self.postgres {
            let sweeper = brighter::postgres::PgSweeper::new(outbox.clone(), processor.clone())
                .start()
                .await?;
            return Ok(Some(sweeper));
        }
        let _ = processor;
        Ok(None)
    }
}

/// The outbox `kind`: `memory`, or `postgres` (a table in `schema` on
/// `DATABASE_URL`).
pub async fn outbox(kind: &str, schema: &str) -> Result<SampleOutbox, Error> {
    match kind {
        #[cfg(feature = "postgres")]
        "postgres" => {
            let pool = postgres().await?;
            let outbox = brighter::postgres::PgOutbox::builder(pool)
                .schema(schema)
                .build()
                .await?;
            Ok(SampleOutbox {
                outbox: Arc::new(outbox.clone()),
                postgres: Some(outbox),
            })
        }
        #[cfg(not(feature = "postgres"))]
        "postgres" => {
            let _ = schema;
            Err(missing_feature(kind))
        }
        _ => Ok(SampleOutbox {
            outbox: Arc::new(InMemoryOutbox::new()),
            #[cfg(feature = "postgres")]
            postgres: None,
        }),
    }
}

/// A pool on `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
#[cfg(feature = "postgres")]
pub async fn postgres() -> Result<PgPool, Error> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    brighter::sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .map_err(|e| Error::transport("connect to Postgres (DATABASE_URL)", e))
}

/// Prints the AsyncAPI document of `processors` and `dispatchers` (what the
/// sample publishes and subscribes to over the chosen transport) as JSON.
pub fn print_asyncapi(
    title: &str,
    description: &str,
    processors: &[&CommandProcessor],
    dispatchers: &[&brighter::Dispatcher],
) {
    let mut document =
        brighter::AsyncApi::new(title, env!("CARGO_PKG_VERSION")).description(description);
    for processor in processors {
        document = document.processor(processor);
    }
    for dispatcher in dispatchers {
        document = document.dispatcher(dispatcher);
    }
    #[allow(clippy::print_stdout)]
    {
        println!("{}", document.to_json());
    }
}

/// A pool on `DATABASE_URL` that connects on first use: for building a
/// service's parts (an AsyncAPI document) without a database.
#[cfg(feature = "postgres")]
pub fn postgres_lazy() -> Result<PgPool, Error> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    brighter::sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect_lazy(&url)
        .map_err(|e| Error::configuration(format!("DATABASE_URL: {e}")))
}

/// Flushes telemetry when dropped (with the `otel` feature).
#[must_use = "telemetry is flushed when the guard is dropped"]
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    _otel: brighter::otel::OtelGuard,
}

/// Logs at `RUST_LOG` (default `warn`); with the `otel` feature, OpenTelemetry
/// for `service` too: OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
/// (see `brighter-otel`).
pub fn telemetry(service: &str) -> Result<TelemetryGuard, Error> {
    #[cfg(feature = "otel")]
    {
        let otel =
            brighter::otel::init(service).map_err(|e| Error::configuration(e.to_string()))?;
        Ok(TelemetryGuard { _otel: otel })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .try_init();
        if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|e| !e.trim().is_empty()) {
            return Err(missing_feature("otel"));
        }
        let _ = service;
        Ok(TelemetryGuard {})
    }
}

/// Resolves on SIGTERM (on Unix) or Ctrl-C: when a service is asked to stop.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
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
