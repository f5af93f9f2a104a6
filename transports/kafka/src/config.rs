//! Kafka client configuration. Extra librdkafka settings (SASL, TLS ...) pass
//! through; values of secret-looking keys never show in `Debug` or logs.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;

/// How to reach Kafka and how topics are created.
///
/// ```
/// use brighter_kafka::KafkaConfig;
///
/// let config = KafkaConfig::new("127.0.0.1:9092")
///     .set("security.protocol", "SASL_PLAINTEXT")
///     .set("sasl.mechanism", "PLAIN")
///     .set("sasl.username", "app")
///     .set("sasl.password", "s3cret");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
#[must_use]
pub struct KafkaConfig {
    pub(crate) bootstrap_servers: String,
    pub(crate) extra: BTreeMap<String, String>,
    pub(crate) partitions: i32,
    pub(crate) replication: i32,
    pub(crate) idempotent: bool,
    pub(crate) send_timeout: Duration,
}

/// Whether a librdkafka setting holds a secret: passwords, secrets, keys,
/// `sasl.oauthbearer.config` (it carries client secrets as `key=value`
/// pairs), JAAS configuration and keytabs.
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.contains("key.pem")
        || key.ends_with(".key")
        || key.contains("oauthbearer.config")
        || key.contains("jaas")
        || key.contains("keytab")
        || key.contains("token")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: BTreeMap<&str, &str> = self
            .extra
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("extra", &extra)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("idempotent", &self.idempotent)
            .finish()
    }
}

impl KafkaConfig {
    /// Brokers at `bootstrap_servers` (`host:port,...`); topics created with 3
    /// partitions and replication 1; idempotent producer.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.into(),
            extra: BTreeMap::new(),
            partitions: 3,
            replication: 1,
            idempotent: true,
            send_timeout: Duration::from_secs(30),
        }
    }

    /// From `KAFKA_BROKERS`, or `127.0.0.1:9092`. When `KAFKA_BROKER` is
    /// `tansu` (the project's scripts export it when they start tansu rather
    /// than Apache Kafka), with [`for_tansu`](Self::for_tansu) applied.
    pub fn from_env() -> Self {
        let config = KafkaConfig::new(
            std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
        );
        if std::env::var("KAFKA_BROKER").is_ok_and(|kind| kind == "tansu") {
            config.for_tansu()
        } else {
            config
        }
    }

    /// Settings for tansu 0.6, a Kafka-compatible broker, and for no other:
    /// tansu advances a partition's offsets per record batch rather than per
    /// record, so a consumer resuming inside a multi-record batch would find
    /// nothing after it. One record per batch (`batch.num.messages=1`) avoids
    /// that, at the cost of throughput. Apache Kafka needs nothing of the kind.
    pub fn for_tansu(self) -> Self {
        self.set("batch.num.messages", "1")
    }

    /// Any librdkafka setting, e.g. `security.protocol`, `sasl.*`, `ssl.*`.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// Partitions and replication factor of the topics the transport creates.
    pub fn topics(mut self, partitions: i32, replication: i32) -> Self {
        self.partitions = partitions.max(1);
        self.replication = replication.max(1);
        self
    }

    /// Whether the producer is idempotent (`enable.idempotence`); turn it off for
    /// brokers that do not support it.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// The brokers as an AsyncAPI server: their addresses and protocol
    /// (`kafka`, or `kafka-secure` over TLS), the partitions and replication
    /// of the topics it creates; no credentials.
    pub fn endpoint(&self) -> brighter_core::Endpoint {
        let secure = self
            .extra
            .get("security.protocol")
            .is_some_and(|p| p.to_ascii_uppercase().contains("SSL"));
        brighter_core::Endpoint {
            name: "kafka".into(),
            host: self.bootstrap_servers.clone(),
            protocol: if secure { "kafka-secure" } else { "kafka" }.into(),
            pathname: None,
            exchange: None,
            partitions: Some((self.partitions, self.replication)),
        }
    }

    /// The librdkafka configuration: the brokers and every setting given with
    /// [`set`](Self::set).
    pub fn client(&self) -> ClientConfig {
        self.client_with(&[])
    }

    /// [`client`](Self::client) on top of `defaults`: the user's settings win.
    pub(crate) fn client_with(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (key, value) in &self.extra {
            config.set(key, value);
        }
        config
    }
}
