//! One AMQP connection shared by producers and channels, reconnected on demand
//! when the broker restarts or drops it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use brighter_core::Error;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::config::RabbitConfig;

/// A lazily opened, self-healing connection: every channel request checks that
/// the connection is up and opens a new one when it is not. Callers back off
/// between failures (the sweeper, the performer supervisor).
#[derive(Clone, Debug)]
pub struct RabbitConnection {
    config: Arc<RabbitConfig>,
    connection: Arc<Mutex<Option<Arc<Connection>>>>,
    /// The frame size negotiated with the broker (RabbitMQ's default until
    /// connected).
    frame_max: Arc<AtomicUsize>,
    /// Set once the delay ladder is declared (see [`crate::delay`]).
    pub(crate) ladder: Arc<tokio::sync::OnceCell<()>>,
}

/// RabbitMQ's default `frame_max`.
const DEFAULT_FRAME_MAX: usize = 131_072;

pub(crate) fn transport(context: &str, e: impl Into<brighter_core::BoxError>) -> Error {
    Error::transport(context.to_owned(), e)
}

impl RabbitConnection {
    /// A connection with `config`; nothing is opened until first use.
    pub fn new(config: RabbitConfig) -> Self {
        RabbitConnection {
            config: Arc::new(config),
            connection: Arc::default(),
            frame_max: Arc::new(AtomicUsize::new(DEFAULT_FRAME_MAX)),
            ladder: Arc::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.config
    }

    /// The largest frame the broker takes, as negotiated on the last connect
    /// (RabbitMQ's default, 128 KiB, before the first).
    pub fn frame_max(&self) -> usize {
        self.frame_max.load(Ordering::Relaxed)
    }

    /// A new channel on a live connection, reconnecting first when needed.
    /// Fails with a retryable transport error when the connect or the
    /// channel's opening takes longer than [`RabbitConfig::connect_timeout`].
    pub async fn channel(&self) -> Result<Channel, Error> {
        let limit = self.config.connect_timeout;
        let connection = {
            let mut slot = self.connection.lock().await;
            match slot.as_ref() {
                Some(c) if c.status().connected() => Arc::clone(c),
                _ => {
                    let properties = ConnectionProperties::default()
                        .with_connection_name(self.config.connection_name.clone().into());
                    let context = || format!("connect to {}", self.config.redacted_uri());
                    // lapin can lose a refusal that comes while its connect
                    // is queueing the handshake, and then never returns.
                    let connection = tokio::time::timeout(
                        limit,
                        Connection::connect(&self.config.uri, properties),
                    )
                    .await
                    .map_err(|_| transport(&context(), format!("no answer within {limit:?}")))?
                    .map_err(|e| transport(&context(), e))?;
                    tracing::info!(uri = %self.config.redacted_uri(), "connected to RabbitMQ");
                    let negotiated = connection.configuration().frame_max();
                    if negotiated > 0 {
                        self.frame_max.store(negotiated as usize, Ordering::Relaxed);
                    }
                    let connection = Arc::new(connection);
                    *slot = Some(Arc::clone(&connection));
                    connection
                }
            }
        };
        tokio::time::timeout(limit, connection.create_channel())
            .await
            .map_err(|_| transport("open a channel", format!("no answer within {limit:?}")))?
            .map_err(|e| transport("open a channel", e))
    }
}
