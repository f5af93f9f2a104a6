//! What the cases share: a schema of their own in Postgres, a topic with its
//! queue or consumer group on either transport, the framework pieces under test
//! (outbox, sweeper, inbox-protected handler, pump), the worker processes that
//! get killed, and readers that count what arrived.

use std::fs::OpenOptions;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use brighter_core::conformance::unique_name;
use brighter_core::pipeline::{OnDuplicate, Pipeline, UseInbox};
use brighter_core::{
    ChannelFactory, ChannelSpec, Command, CommandProcessor, CommandProcessorBuilder, Error,
    Handler, Message, MessageHeader, MessageType, Outbox, Publication, Request, RequestContext,
    Subscription,
};
use brighter_inbox_postgres::PgInbox;
use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer, ensure_topics};
use brighter_outbox_postgres::{PgOutbox, PgSweeper, PgUnitOfWork, RunningSweeper, pg_transaction};
use brighter_rabbitmq::{
    RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer, parked_reason,
};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::{Child, Command as Process};
use uuid::Uuid;

/// Errors of the suite itself (setup, a service that did not come back).
pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The port of the Kafka broker of the restart case's own (Apache Kafka on
/// durable storage; tansu on SQLite storage where tansu is the test broker).
pub(crate) const DURABLE_KAFKA_PORT: u16 = 19092;

/// Whether the Kafka broker is tansu (`KAFKA_BROKER=tansu`, exported by
/// scripts/services.sh when it starts tansu rather than Apache Kafka).
pub(crate) fn on_tansu() -> bool {
    std::env::var("KAFKA_BROKER").is_ok_and(|kind| kind == "tansu")
}

/// Partitions of every Kafka topic the suite creates.
pub(crate) const PARTITIONS: i32 = 3;

/// Which broker a case runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Kafka,
    Rabbit,
}

impl Transport {
    pub(crate) fn parse(name: &str) -> Res<Transport> {
        match name {
            "kafka" => Ok(Transport::Kafka),
            "rabbitmq" => Ok(Transport::Rabbit),
            other => Err(format!("unknown transport '{other}' (kafka or rabbitmq)").into()),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::Kafka => "kafka",
            Transport::Rabbit => "rabbitmq",
        }
    }
}

/// The command every case sends: its id is the message id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Ping {
    pub(crate) id: Uuid,
    pub(crate) seq: u64,
}

impl Request for Ping {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Ping {}

/// A framework message carrying ping `seq`, with the ping's id as message id.
pub(crate) fn ping_message(topic: &str, seq: u64) -> Message {
    let ping = Ping {
        id: Uuid::now_v7(),
        seq,
    };
    let mut header = MessageHeader::new(topic, MessageType::Command);
    header.id = ping.id;
    header.content_type = "application/json".into();
    Message::new(header, serde_json::to_vec(&ping).unwrap_or_default())
}

/// The inbox-protected handler: one effect row per ping, written in the unit
/// of work's transaction with the inbox row. The effect table has no unique
/// constraint, so a second handling would show as a second row.
#[derive(Clone)]
pub(crate) struct WriteEffect {
    insert: String,
}

impl Handler<Ping> for WriteEffect {
    async fn handle(&self, ping: &Ping, ctx: &mut RequestContext) -> Result<(), Error> {
        sqlx::query(&self.insert)
            .bind(ping.id)
            .bind(i64::try_from(ping.seq).unwrap_or(i64::MAX))
            .execute(pg_transaction(ctx)?)
            .await
            .map_err(|e| Error::store("write the effect row", e))?;
        Ok(())
    }
}

/// One case's names and connections.
#[derive(Clone)]
pub(crate) struct Rig {
    pub(crate) transport: Transport,
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
    pub(crate) topic: String,
    /// The queue (RabbitMQ) or consumer group (Kafka).
    pub(crate) channel: String,
    pub(crate) exchange: String,
    pub(crate) brokers: String,
    pub(crate) database_url: String,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

async fn connect(url: &str) -> Res<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await?)
}

impl Rig {
    /// New names for a case on `transport`, and its schema.
    pub(crate) async fn new(transport: Transport, case: &str) -> Res<Rig> {
        let database_url = env_or(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        );
        let pool = connect(&database_url).await?;
        let schema = format!("chaos_{}", Uuid::now_v7().simple());
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
            .execute(&pool)
            .await?;
        let topic = unique_name(&format!("chaos.{case}"));
        Ok(Rig {
            transport,
            pool,
            schema,
            channel: format!("{topic}.q"),
            topic,
            exchange: unique_name("chaos"),
            brokers: env_or("KAFKA_BROKERS", "127.0.0.1:9092"),
            database_url,
        })
    }

    /// The rig a worker process was started with (see [`spawn`](Self::spawn)).
    pub(crate) async fn from_env() -> Res<Rig> {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
        let database_url = var("DATABASE_URL")?;
        Ok(Rig {
            transport: Transport::parse(&var("CHAOS_TRANSPORT")?)?,
            pool: connect(&database_url).await?,
            schema: var("CHAOS_SCHEMA")?,
            topic: var("CHAOS_TOPIC")?,
            channel: var("CHAOS_CHANNEL")?,
            exchange: var("CHAOS_EXCHANGE")?,
            brokers: var("KAFKA_BROKERS")?,
            database_url,
        })
    }

    /// Starts `chaos worker ROLE` on this rig; its log goes to `target/chaos/`.
    pub(crate) fn spawn(&self, role: &str) -> Res<Child> {
        self.spawn_with(role, &[])
    }

    /// As [`spawn`](Self::spawn), with `env` added to the worker's environment.
    pub(crate) fn spawn_with(&self, role: &str, env: &[(&str, &str)]) -> Res<Child> {
        std::fs::create_dir_all("target/chaos")?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(role))?;
        let child = Process::new(std::env::current_exe()?)
            .args(["worker", role])
            .env("DATABASE_URL", &self.database_url)
            .env("CHAOS_TRANSPORT", self.transport.name())
            .env("CHAOS_SCHEMA", &self.schema)
            .env("CHAOS_TOPIC", &self.topic)
            .env("CHAOS_CHANNEL", &self.channel)
            .env("CHAOS_EXCHANGE", &self.exchange)
            .env("KAFKA_BROKERS", &self.brokers)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        Ok(child)
    }

    /// Where the workers of `role` on this rig log.
    pub(crate) fn log_path(&self, role: &str) -> String {
        format!("target/chaos/{}-{role}.log", self.topic)
    }

    /// Lines of the `role` workers' logs that contain `text`.
    pub(crate) fn log_lines(&self, role: &str, text: &str) -> usize {
        std::fs::read_to_string(self.log_path(role))
            .map(|log| log.lines().filter(|line| line.contains(text)).count())
            .unwrap_or(0)
    }

    /// Whether Kafka is the restart case's tansu on SQLite storage.
    fn on_durable_tansu(&self) -> bool {
        on_tansu()
            && self.transport == Transport::Kafka
            && self.brokers.ends_with(&format!(":{DURABLE_KAFKA_PORT}"))
    }

    /// The producer's normal settings (batching, idempotence) on Apache Kafka.
    pub(crate) fn kafka_config(&self) -> KafkaConfig {
        let config = KafkaConfig::new(&self.brokers).topics(PARTITIONS, 1);
        if !on_tansu() {
            return config;
        }
        // tansu only: one record per batch (it advances offsets per batch), and
        // on its SQLite storage no idempotence (it panics, lite.rs:503, when an
        // idempotent producer's state outlives a broker restart).
        config.for_tansu().idempotent(!self.on_durable_tansu())
    }

    pub(crate) fn rabbit(&self) -> RabbitConnection {
        RabbitConnection::new(
            RabbitConfig::from_env()
                .exchange(&self.exchange)
                .connection_name("brighter-chaos")
                // Each run declares queues of its own; the broker drops them after.
                .queue_expiry(std::time::Duration::from_secs(1800)),
        )
    }

    pub(crate) async fn outbox(&self) -> Res<PgOutbox> {
        Ok(PgOutbox::builder(self.pool.clone())
            .schema(&self.schema)
            .build()
            .await?)
    }

    pub(crate) async fn inbox(&self) -> Res<PgInbox> {
        Ok(PgInbox::builder(self.pool.clone())
            .schema(&self.schema)
            .build()
            .await?)
    }

    /// `builder` with this transport's producer.
    pub(crate) fn with_producer(
        &self,
        builder: CommandProcessorBuilder,
    ) -> Res<CommandProcessorBuilder> {
        Ok(match self.transport {
            Transport::Kafka => builder.producer(KafkaProducer::new(self.kafka_config())?),
            Transport::Rabbit => builder.producer(RabbitProducer::new(self.rabbit())),
        })
    }

    /// A processor that sends pings to the topic through `outbox`.
    pub(crate) fn sender(&self, outbox: PgOutbox) -> Res<CommandProcessor> {
        let builder = CommandProcessor::builder()
            .publication::<Ping>(Publication::command(&self.topic))
            .outbox(outbox);
        Ok(self.with_producer(builder)?.build()?)
    }

    /// The sweeper as the suite runs it: four workers, batches of 500 (fewer on
    /// the restart case's tansu).
    ///
    /// `min_age` zero when the sweeper does all the sending; the default (1 s)
    /// when `post` sends and the sweeper only picks up what it failed to.
    pub(crate) async fn start_sweeper(
        &self,
        outbox: PgOutbox,
        min_age: Duration,
    ) -> Res<RunningSweeper> {
        let processor = self.sender(outbox.clone())?;
        // tansu on SQLite storage writes each record slowly: fewer messages in
        // flight and a longer send timeout, or every batch times out and is sent
        // again while the first copies are still queued.
        let (batch, workers, timeout) = if self.on_durable_tansu() {
            (100, 1, Duration::from_secs(30))
        } else {
            (500, 4, Duration::from_secs(10))
        };
        Ok(PgSweeper::new(outbox, processor)
            .min_age(min_age)
            .batch_size(batch)
            .workers(workers)
            .poll_interval(Duration::from_millis(20))
            .send_timeout(timeout)
            .topic_backoff(Duration::from_millis(100), Duration::from_secs(5))
            .start()
            .await?)
    }

    /// Creates the effect table: no key, no unique constraint.
    pub(crate) async fn create_effects(&self) -> Res<()> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS \"{}\".effects (message_id uuid NOT NULL, seq bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())",
            self.schema
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Effect rows, and distinct message ids among them.
    pub(crate) async fn effects(&self) -> Res<(i64, i64)> {
        Ok(sqlx::query_as(&format!(
            "SELECT count(*), count(DISTINCT message_id) FROM \"{}\".effects",
            self.schema
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    /// Effect rows so far, for polling (0 while they cannot be read).
    pub(crate) async fn effect_rows(&self) -> u64 {
        self.effects().await.map_or(0, |(rows, _)| rows as u64)
    }

    /// Messages with an effect row so far, for polling (0 while they cannot be read).
    pub(crate) async fn handled(&self) -> u64 {
        self.effects()
            .await
            .map_or(0, |(_, distinct)| distinct as u64)
    }

    /// The consuming side: UseInbox in a Postgres unit of work around
    /// [`WriteEffect`], duplicates skipped or failed as `on_duplicate` says.
    pub(crate) async fn consumer(&self, on_duplicate: OnDuplicate) -> Res<CommandProcessor> {
        let inbox = self.inbox().await?;
        let handler = WriteEffect {
            insert: format!(
                "INSERT INTO \"{}\".effects (message_id, seq) VALUES ($1, $2)",
                self.schema
            ),
        };
        Ok(CommandProcessor::builder()
            .inbox(inbox)
            .command_with(
                Pipeline::new()
                    .step(PgUnitOfWork::new(self.pool.clone()))
                    .step(UseInbox::new("chaos").on_duplicate(on_duplicate)),
                handler,
            )
            .build()?)
    }

    /// The channel factory of this transport.
    pub(crate) fn factory(&self) -> Res<Arc<dyn ChannelFactory>> {
        Ok(match self.transport {
            Transport::Kafka => Arc::new(KafkaChannelFactory::new(
                self.kafka_config(),
                KafkaProducer::new(self.kafka_config())?,
            )),
            Transport::Rabbit => Arc::new(RabbitChannelFactory::new(self.rabbit())),
        })
    }

    /// The pump's subscription to the topic.
    pub(crate) fn subscription(&self) -> Res<Subscription> {
        Ok(
            Subscription::command::<Ping>("chaos", &self.topic, self.factory()?)
                .channel(&self.channel)
                .buffer_size(100)
                .restart_delay(Duration::from_millis(200), Duration::from_secs(2)),
        )
    }

    /// Creates the topic (and the channel's retry, dead-letter and invalid
    /// topics) or the queue bound to it, so nothing sent before the consumer
    /// starts is dropped.
    pub(crate) async fn prepare(&self) -> Res<()> {
        self.prepare_channel(&self.topic, &self.channel).await
    }

    /// As [`prepare`](Self::prepare), for `topic` consumed through `channel`.
    pub(crate) async fn prepare_channel(&self, topic: &str, channel: &str) -> Res<()> {
        let mut opened = self
            .factory()?
            .create_channel(&ChannelSpec::new("chaos", topic, channel))
            .await?;
        opened.close().await?;
        if self.transport == Transport::Kafka {
            ensure_topics(&self.kafka_config(), &[topic]).await?;
        }
        Ok(())
    }

    /// The dead-letter and invalid-message destinations of the channel.
    pub(crate) fn parking(&self) -> [String; 2] {
        match self.transport {
            Transport::Kafka => [
                KafkaChannelFactory::dead_letter_topic(&self.channel),
                KafkaChannelFactory::invalid_message_topic(&self.channel),
            ],
            Transport::Rabbit => [
                RabbitChannelFactory::dead_letter_queue(&self.channel),
                RabbitChannelFactory::invalid_message_queue(&self.channel),
            ],
        }
    }

    /// Everything in `source` (a Kafka topic from its start, or a RabbitMQ queue,
    /// consumed and acked), read until nothing came for `idle`.
    pub(crate) async fn read_all(&self, source: &str, idle: Duration) -> Res<Vec<Received>> {
        match self.transport {
            Transport::Kafka => self.read_topic(source, idle).await,
            Transport::Rabbit => self.read_queue(source, idle).await,
        }
    }

    async fn read_topic(&self, topic: &str, idle: Duration) -> Res<Vec<Received>> {
        let consumer: StreamConsumer = self
            .kafka_config()
            .client()
            .set("group.id", unique_name("chaos.reader"))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut partitions = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            partitions.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&partitions)?;
        let mut received = Vec::new();
        let mut stream = consumer.stream();
        while let Ok(Some(record)) = tokio::time::timeout(idle, stream.next()).await {
            let record = record?;
            let header = |key: &str| {
                record.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == key)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
            };
            received.push(Received {
                id: header(brighter_core::wire::ID).and_then(|id| id.parse().ok()),
                body: record.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                reason: header(brighter_core::wire::DEAD_LETTER_REASON)
                    .or_else(|| header(brighter_core::wire::INVALID_REASON)),
            });
        }
        Ok(received)
    }

    async fn read_queue(&self, queue: &str, idle: Duration) -> Res<Vec<Received>> {
        let channel = self.rabbit().channel().await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                unique_name("chaos.reader").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut received = Vec::new();
        while let Ok(Some(delivery)) = tokio::time::timeout(idle, consumer.next()).await {
            let delivery = delivery?;
            let id = brighter_rabbitmq::decode_message(
                &delivery.properties,
                delivery.routing_key.as_str(),
                Vec::new(),
            )
            .ok()
            .map(|m| m.id());
            received.push(Received {
                id,
                reason: parked_reason(&delivery.properties),
                body: delivery.data.clone(),
            });
            delivery.ack(BasicAckOptions::default()).await?;
        }
        let _ = channel.close(200, "read".into()).await;
        Ok(received)
    }

    /// Drops the case's schema.
    pub(crate) async fn drop_schema(&self) {
        let _ = sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
            .execute(&self.pool)
            .await;
    }
}

/// One message read back from a topic or queue.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) id: Option<Uuid>,
    pub(crate) body: Vec<u8>,
    /// The dead-letter or invalid-message reason, for parked messages.
    pub(crate) reason: Option<String>,
}

/// Deposits `messages` through `outbox` in one transaction, retrying while the
/// database is away. After a failure it first checks whether the batch did
/// commit (the connection can drop after the commit), so a batch is never
/// written twice nor lost.
pub(crate) async fn deposit(
    outbox: &PgOutbox,
    pool: &PgPool,
    schema: &str,
    messages: &[Message],
) -> Res<u32> {
    let ids: Vec<Uuid> = messages.iter().map(Message::id).collect();
    let count = format!("SELECT count(*) FROM \"{schema}\".outbox WHERE message_id = ANY($1)");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut retries = 0;
    loop {
        match outbox.add(messages, None).await {
            Ok(()) => return Ok(retries),
            Err(error) if Instant::now() < deadline => {
                retries += 1;
                tracing::info!(%error, "deposit failed; checking whether it committed");
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Ok(present) = sqlx::query_scalar::<_, i64>(&count)
                    .bind(&ids)
                    .fetch_one(pool)
                    .await
                    && present as usize == ids.len()
                {
                    return Ok(retries);
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Polls `probe` until it is true or `timeout` passes; whether it became true.
pub(crate) async fn wait_until<F, Fut>(timeout: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if probe().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Sends SIGKILL and reaps the process.
pub(crate) async fn kill9(child: &mut Child) -> Res<()> {
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}
