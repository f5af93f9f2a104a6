//! The metrics an operator alerts on, read from an in-memory exporter after
//! a known run: the outbox's oldest outstanding age and parked rows, inbox
//! duplicates dropped, handler retries, and each subscription's lag on every
//! transport (Kafka: committed offsets against high watermarks; RabbitMQ:
//! ready messages in the queue). Needs RabbitMQ and a Kafka-protocol broker,
//! as `scripts/test` starts them.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use brighter_core::conformance::unique_name;
use brighter_core::pipeline::{Pipeline, Retry, UseInbox};
use brighter_core::{
    ChannelFactory, ClaimRequest, Command, CommandProcessor, Dispatcher, Error, Handler,
    InMemoryBroker, InMemoryInbox, InMemoryOutbox, Outbox, OutboxSweeper, Producer, Publication,
    Request, RequestContext, SendFailure, Subscription,
};
use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer, ensure_topics};
use brighter_rabbitmq::{RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer};
use opentelemetry::Value;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: Uuid,
}
impl Request for Job {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Job {}

struct Metrics {
    exporter: InMemoryMetricExporter,
    provider: SdkMeterProvider,
}

impl Metrics {
    fn new() -> Metrics {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        Metrics { exporter, provider }
    }

    fn telemetry(&self) -> brighter_core::Telemetry {
        let tracing = opentelemetry::trace::noop::NoopTracerProvider::new();
        brighter_core::Telemetry::from_providers(&tracing, &self.provider)
    }

    /// The latest value of `name` whose attribute `key` is `value` (any when
    /// `key` is empty), as exported now; counters summed over their points.
    fn latest(&self, name: &str, key: &str, value: &str) -> Option<f64> {
        self.exporter.reset();
        self.provider.force_flush().unwrap();
        let matches = |attributes: &mut dyn Iterator<Item = &opentelemetry::KeyValue>| {
            if key.is_empty() {
                return true;
            }
            for kv in attributes {
                if kv.key.as_str() == key && kv.value == Value::from(value.to_owned()) {
                    return true;
                }
            }
            false
        };
        let mut found = None;
        for resource in self.exporter.get_finished_metrics().unwrap() {
            for scope in resource.scope_metrics() {
                for metric in scope.metrics().filter(|m| m.name() == name) {
                    let points: Vec<f64> = match metric.data() {
                        AggregatedMetrics::U64(MetricData::Gauge(g)) => g
                            .data_points()
                            .filter(|p| matches(&mut p.attributes()))
                            .map(|p| p.value() as f64)
                            .collect(),
                        AggregatedMetrics::F64(MetricData::Gauge(g)) => g
                            .data_points()
                            .filter(|p| matches(&mut p.attributes()))
                            .map(|p| p.value())
                            .collect(),
                        AggregatedMetrics::U64(MetricData::Sum(s)) => vec![
                            s.data_points()
                                .filter(|p| matches(&mut p.attributes()))
                                .map(|p| p.value() as f64)
                                .sum(),
                        ],
                        _ => Vec::new(),
                    };
                    if let Some(last) = points.last() {
                        found = Some(*last);
                    }
                }
            }
        }
        found
    }

    /// Waits until the latest value of `name` (attribute `key` = `value`)
    /// meets `test`; the value.
    async fn until(&self, name: &str, key: &str, value: &str, test: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.latest(name, key, value);
            if let Some(now) = now.filter(|v| test(*v)) {
                return now;
            }
            assert!(Instant::now() < deadline, "{name} stayed at {now:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Fails `failures` times, then succeeds.
#[derive(Clone, Default)]
struct Flaky {
    failures: Arc<AtomicU32>,
}

impl Handler<Job> for Flaky {
    async fn handle(&self, _: &Job, _: &mut RequestContext) -> Result<(), Error> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::handler("not yet"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_gauges_duplicates_and_retries_are_measured() {
    let metrics = Metrics::new();
    let flaky = Flaky::default();
    flaky.failures.store(2, Ordering::SeqCst);
    let outbox = InMemoryOutbox::new();
    let broker = InMemoryBroker::new();
    let processor = CommandProcessor::builder()
        .inbox(InMemoryInbox::new())
        .command_with(
            Pipeline::new()
                .step(Retry::new(3).backoff(Duration::from_millis(1), Duration::from_millis(5)))
                .step(UseInbox::new("jobs")),
            flaky,
        )
        .publication::<Job>(Publication::command("jobs"))
        .producer(broker)
        .outbox(outbox.clone())
        .telemetry(metrics.telemetry())
        .build()
        .unwrap();
    let job = Job { id: Uuid::now_v7() };
    processor.send(&job).await.unwrap();
    processor.send(&job).await.unwrap();
    assert_eq!(
        metrics.latest("brighter.handler.retries", "", ""),
        Some(2.0)
    );
    assert_eq!(
        metrics.latest(
            "brighter.inbox.duplicates",
            "brighter.inbox.context",
            "jobs"
        ),
        Some(1.0)
    );

    // One message parked, one waiting (a sweeper that leaves young
    // messages to their writers does not take it).
    let parked = Job { id: Uuid::now_v7() };
    processor.deposit_post(&parked, None).await.unwrap();
    let mut claim = outbox
        .claim(&ClaimRequest {
            limit: 10,
            min_age: Duration::ZERO,
            skip_topics: Vec::new(),
        })
        .await
        .unwrap();
    claim.take();
    claim
        .finish(
            &[],
            &[SendFailure {
                id: parked.id,
                error: "refused".into(),
                park: true,
            }],
        )
        .await
        .unwrap();
    processor
        .deposit_post(&Job { id: Uuid::now_v7() }, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let sweeper = OutboxSweeper::new(&processor)
        .min_age(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let age = metrics
        .until("brighter.outbox.oldest_age", "", "", |age| age >= 1.0)
        .await;
    assert!(age < 60.0, "age {age}");
    assert_eq!(
        metrics.latest("brighter.outbox.parked_rows", "", ""),
        Some(1.0)
    );
    assert_eq!(
        metrics.latest("brighter.outbox.outstanding", "", ""),
        Some(1.0)
    );
    sweeper.stop().await;
}

/// Lets one message through per permit.
#[derive(Clone)]
struct Gated {
    gate: Arc<Semaphore>,
}

impl Handler<Job> for Gated {
    async fn handle(&self, _: &Job, _: &mut RequestContext) -> Result<(), Error> {
        self.gate.acquire().await.unwrap().forget();
        Ok(())
    }
}

async fn lag_is_measured(
    producer: Arc<dyn Producer>,
    channels: Arc<dyn ChannelFactory>,
    topic: &str,
) {
    let metrics = Metrics::new();
    let gated = Gated {
        gate: Arc::new(Semaphore::new(0)),
    };
    let processor = CommandProcessor::builder()
        .command(gated.clone())
        .publication::<Job>(Publication::command(topic))
        .producer(producer)
        .telemetry(metrics.telemetry())
        .build()
        .unwrap();
    let name = unique_name("lag");
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Job>(&name, topic, channels)
                .buffer_size(1)
                .lag_interval(Duration::from_millis(200)),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let started = Instant::now() + Duration::from_secs(60);
    while !dispatcher.health().iter().all(|h| h.is_healthy()) {
        assert!(Instant::now() < started, "the subscription did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        processor.post(&Job { id: Uuid::now_v7() }).await.unwrap();
    }
    // The first is in the handler, held: at least nine wait.
    let waiting = metrics
        .until(
            "brighter.subscription.lag",
            "brighter.subscription",
            &name,
            |lag| lag >= 9.0,
        )
        .await;
    assert!(waiting <= 10.0, "lag {waiting}");
    gated.gate.add_permits(10);
    metrics
        .until(
            "brighter.subscription.lag",
            "brighter.subscription",
            &name,
            |lag| lag == 0.0,
        )
        .await;
    dispatcher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_of_a_subscription_is_measured_in_memory() {
    let broker = InMemoryBroker::new();
    let topic = unique_name("lag.memory");
    lag_is_measured(Arc::new(broker.clone()), Arc::new(broker), &topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_of_a_subscription_is_measured_on_rabbitmq() {
    let connection = RabbitConnection::new(
        RabbitConfig::from_env()
            .exchange(unique_name("lag"))
            .queue_expiry(Duration::from_secs(600)),
    );
    let topic = unique_name("lag.rabbit");
    lag_is_measured(
        Arc::new(RabbitProducer::new(connection.clone())),
        Arc::new(RabbitChannelFactory::new(connection)),
        &topic,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_of_a_subscription_is_measured_on_kafka() {
    let config = KafkaConfig::from_env();
    let topic = unique_name("lag.kafka");
    ensure_topics(&config, &[topic.as_str()]).await.unwrap();
    let producer = KafkaProducer::new(config.clone()).unwrap();
    let channels = KafkaChannelFactory::new(config, producer.clone());
    lag_is_measured(Arc::new(producer), Arc::new(channels), &topic).await;
}
