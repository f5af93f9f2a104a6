//! Connection and topology configuration. The URI carries the credentials, so
//! `Debug` and every log line show it with the password replaced.

use std::fmt;
use std::time::Duration;

pub use lapin::ExchangeKind;

/// How to reach RabbitMQ and which exchange to use.
///
/// ```
/// use brighter_rabbitmq::RabbitConfig;
///
/// let config = RabbitConfig::new("amqp://app:s3cret@rabbit:5672/%2f").exchange("shop");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
#[must_use]
pub struct RabbitConfig {
    pub(crate) uri: String,
    pub(crate) exchange: String,
    pub(crate) exchange_kind: ExchangeKind,
    pub(crate) connection_name: String,
    pub(crate) confirm_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) queue_expiry: Option<Duration>,
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("uri", &redact(&self.uri))
            .field("exchange", &self.exchange)
            .field("exchange_kind", &self.exchange_kind)
            .field("connection_name", &self.connection_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("queue_expiry", &self.queue_expiry)
            .finish_non_exhaustive()
    }
}

/// The name AMQP gives exchange kind `kind`.
fn exchange_kind(kind: &ExchangeKind) -> String {
    match kind {
        ExchangeKind::Custom(custom) => custom.clone(),
        ExchangeKind::Direct => "direct".into(),
        ExchangeKind::Fanout => "fanout".into(),
        ExchangeKind::Headers => "headers".into(),
        ExchangeKind::Topic => "topic".into(),
    }
}

/// `uri` with any password replaced by `***`.
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return "***".into();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => uri.to_owned(),
    }
}

impl RabbitConfig {
    /// Connect with `uri` (`amqp://` or, with the `tls` feature, `amqps://`;
    /// credentials and vhost in the URI). Exchange `brighter`, kind topic.
    pub fn new(uri: impl Into<String>) -> Self {
        RabbitConfig {
            uri: uri.into(),
            exchange: "brighter".into(),
            exchange_kind: ExchangeKind::Topic,
            connection_name: "brighter".into(),
            confirm_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            queue_expiry: None,
        }
    }

    /// From `AMQP_ADDR`, or `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub fn from_env() -> Self {
        RabbitConfig::new(
            std::env::var("AMQP_ADDR")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        )
    }

    /// The exchange messages are published to and queues are bound to.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// The exchange kind: topic (default), direct or fanout.
    pub fn exchange_kind(mut self, kind: ExchangeKind) -> Self {
        self.exchange_kind = kind;
        self
    }

    /// The name the connection shows in the management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// How long a publish may wait for the broker's confirm.
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long opening a connection (TCP, TLS and the AMQP handshake), or a
    /// channel on it, may take before it fails with a retryable transport
    /// error. 10 s by default, RabbitMQ's own handshake timeout. It also
    /// bounds a lapin 4.12 race in which a refused connect never returns.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Let the broker delete each queue this configuration declares (the
    /// subscription's queue, its dead-letter and invalid-message queues) once
    /// it has gone `expiry` without a consumer or a redeclaration (RabbitMQ's
    /// `x-expires`), together with the messages in it. Meant for tests, demos
    /// and short-lived environments that create queues with fresh names and
    /// would otherwise leave them behind; never for a production queue whose
    /// consumer may be down for longer than `expiry`. Off by default.
    ///
    /// RabbitMQ refuses to redeclare a queue with different arguments, so
    /// switching this on or off for an existing queue needs the queue deleted
    /// first.
    pub fn queue_expiry(mut self, expiry: Duration) -> Self {
        self.queue_expiry = Some(expiry);
        self
    }

    /// The configured exchange name.
    pub fn exchange_name(&self) -> &str {
        &self.exchange
    }

    /// The broker as an AsyncAPI server: host, port and vhost from the URI
    /// (never its user or password), `amqp` or `amqps`, and the exchange.
    ///
    /// ```
    /// use brighter_rabbitmq::RabbitConfig;
    /// let endpoint = RabbitConfig::new("amqps://app:s3cret@rabbit:5671/shop%2ftest").exchange("orders").endpoint();
    /// assert_eq!(endpoint.host, "rabbit:5671");
    /// assert_eq!(endpoint.protocol, "amqps");
    /// assert_eq!(endpoint.pathname.as_deref(), Some("shop/test"));
    /// assert_eq!(endpoint.exchange, Some(("orders".into(), "topic".into())));
    /// assert!(!format!("{endpoint:?}").contains("s3cret") && !format!("{endpoint:?}").contains("app"));
    /// ```
    pub fn endpoint(&self) -> brighter_core::Endpoint {
        let (scheme, rest) = self.uri.split_once("://").unwrap_or(("amqp", &self.uri));
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let (host, vhost) = match rest.split_once('/') {
            Some((host, vhost)) => (host, vhost.replace("%2f", "/").replace("%2F", "/")),
            None => (rest, "/".to_owned()),
        };
        let vhost = if vhost.is_empty() {
            "/".to_owned()
        } else {
            vhost
        };
        let vhost = vhost.split('?').next().unwrap_or("/").to_owned();
        brighter_core::Endpoint {
            name: "rabbitmq".into(),
            host: host.to_owned(),
            protocol: if scheme.eq_ignore_ascii_case("amqps") {
                "amqps"
            } else {
                "amqp"
            }
            .into(),
            pathname: Some(vhost),
            exchange: Some((self.exchange.clone(), exchange_kind(&self.exchange_kind))),
            partitions: None,
        }
    }

    /// The URI with the password hidden, for logs.
    pub fn redacted_uri(&self) -> String {
        redact(&self.uri)
    }
}
