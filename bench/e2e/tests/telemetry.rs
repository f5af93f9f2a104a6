//! OpenTelemetry over the Postgres outbox and each transport: one trace from
//! `deposit_post` through the sweeper's publish to the consumer's process span
//! (in-memory span exporter), and the metrics after a known run (in-memory
//! metric exporter). Needs Postgres, RabbitMQ and a Kafka-protocol broker, as
//! `scripts/test` starts them. nextest runs each test in its own process, so
//! each installs its own global providers.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brighter_core::conformance::{CapturedLogs, unique_name};
use brighter_core::{
    ChannelFactory, ChannelSpec, Command, CommandProcessor, Dispatcher, Error, Handler,
    InMemoryBroker, Producer, Publication, Request, RequestContext, Subscription,
};
use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer, ensure_topics};
use brighter_outbox_postgres::{PgOutbox, PgSweeper};
use brighter_rabbitmq::{RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer};
use opentelemetry::baggage::BaggageExt;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Greeting {
    id: Uuid,
    name: String,
}
impl Request for Greeting {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Greeting {}

/// Handles greetings; rejects the name "reject"; records the baggage it sees.
#[derive(Clone, Default)]
struct Greeter {
    handled: Arc<AtomicUsize>,
    baggage: Arc<Mutex<Vec<String>>>,
}

impl Handler<Greeting> for Greeter {
    async fn handle(&self, greeting: &Greeting, _: &mut RequestContext) -> Result<(), Error> {
        let tenant = Context::current()
            .baggage()
            .get("tenant")
            .map(ToString::to_string)
            .unwrap_or_default();
        self.baggage.lock().unwrap().push(tenant);
        self.handled.fetch_add(1, Ordering::SeqCst);
        if greeting.name == "reject" {
            return Err(Error::reject("no greetings for reject"));
        }
        Ok(())
    }
}

struct Telemetry {
    spans: InMemorySpanExporter,
    tracer_provider: SdkTracerProvider,
    metrics: InMemoryMetricExporter,
    meter_provider: SdkMeterProvider,
}

/// In-memory span and metric exporters of this test's own, handed to its
/// processors with `Telemetry::from_providers` (no global provider, so the
/// tests run in parallel in one process under `cargo test` too), and W3C
/// propagation (the one global, the same for every test).
fn install_telemetry() -> Telemetry {
    global::set_text_map_propagator(opentelemetry::propagation::TextMapCompositePropagator::new(
        vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ],
    ));
    let spans = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let metrics = InMemoryMetricExporter::default();
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metrics.clone()).build())
        .build();
    Telemetry {
        spans,
        tracer_provider,
        metrics,
        meter_provider,
    }
}

impl Telemetry {
    /// The framework's telemetry on this test's providers.
    fn brighter(&self) -> brighter_core::Telemetry {
        brighter_core::Telemetry::from_providers(&self.tracer_provider, &self.meter_provider)
    }
}

enum Transport {
    Memory,
    RabbitMq,
    Kafka,
}

/// The producer and channel factory of `transport`, with `topic` and the
/// subscription's channel `channel` ready to use.
async fn transport(
    transport: &Transport,
    topic: &str,
    channel: &str,
) -> (Arc<dyn Producer>, Arc<dyn ChannelFactory>) {
    match transport {
        Transport::Memory => {
            let broker = InMemoryBroker::new();
            broker.declare(topic, channel).unwrap();
            (Arc::new(broker.clone()), Arc::new(broker))
        }
        Transport::RabbitMq => {
            let connection = RabbitConnection::new(
                RabbitConfig::from_env()
                    .exchange(unique_name("telemetry"))
                    .connection_name("brighter-telemetry-test")
                    .queue_expiry(std::time::Duration::from_secs(1800)),
            );
            let factory = RabbitChannelFactory::new(connection.clone());
            // Declares the queue and its binding, so the message is routed.
            let mut opened = factory
                .create_channel(&ChannelSpec::new(channel, topic, channel))
                .await
                .unwrap();
            opened.close().await.unwrap();
            (Arc::new(RabbitProducer::new(connection)), Arc::new(factory))
        }
        Transport::Kafka => {
            let config = KafkaConfig::from_env().topics(1, 1);
            ensure_topics(
                &config,
                &KafkaChannelFactory::channel_topics(topic, channel)
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
            let producer = KafkaProducer::new(config.clone()).unwrap();
            let factory = KafkaChannelFactory::new(config, producer.clone());
            (Arc::new(producer), Arc::new(factory))
        }
    }
}

struct Run {
    ids: Vec<Uuid>,
    greeter: Greeter,
}

/// Deposits `names` in the Postgres outbox (each in its own transaction, inside
/// a `checkout` span with baggage `tenant=acme`), lets a `PgSweeper` send them
/// over `transport` and a dispatcher handle them, then flushes the exporters.
async fn run(transport_kind: Transport, names: &[&str], telemetry: &Telemetry) -> Run {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect(&url)
        .await
        .expect("Postgres must be running: scripts/test starts it");
    let schema = format!("t_{}", Uuid::now_v7().simple());
    let outbox = PgOutbox::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let topic = unique_name("greetings");
    let channel = unique_name("greeter");
    let (producer, factory) = transport(&transport_kind, &topic, &channel).await;

    // The sending service: deposits into the outbox; its sweeper publishes.
    let sender = CommandProcessor::builder()
        .publication::<Greeting>(Publication::command(&topic))
        .producer(Arc::clone(&producer))
        .outbox(outbox.clone())
        .telemetry(telemetry.brighter())
        .build()
        .unwrap();
    // The receiving service: handles greetings from the broker.
    let greeter = Greeter::default();
    let receiver = CommandProcessor::builder()
        .command(greeter.clone())
        .telemetry(telemetry.brighter())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(receiver)
        .subscription(Subscription::command::<Greeting>(&channel, &topic, factory))
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();

    let tracer = telemetry.tracer_provider.tracer("shop");
    let mut ids = Vec::new();
    for name in names {
        let root = tracer.start("checkout");
        let cx =
            Context::current_with_span(root).with_baggage(vec![KeyValue::new("tenant", "acme")]);
        let mut tx = pool.begin().await.unwrap();
        let greeting = Greeting {
            id: Uuid::now_v7(),
            name: (*name).to_owned(),
        };
        let id = sender
            .deposit_post(&greeting, Some(&mut tx))
            .with_context(cx.clone())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        cx.span().end();
        ids.push(id);
    }

    let sweeper = PgSweeper::new(outbox, sender)
        .min_age(Duration::ZERO)
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while greeter.handled.load(Ordering::SeqCst) < names.len() {
        assert!(Instant::now() < deadline, "messages not handled in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last settle (ack or dead-letter) finish and its span end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    dispatcher.shutdown().await;
    sweeper.stop().await;
    telemetry.tracer_provider.force_flush().unwrap();
    telemetry.meter_provider.force_flush().unwrap();
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
    Run { ids, greeter }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

fn one<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one span named '{name}', got {}; all: {:?}",
        found.len(),
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

async fn one_trace_over(transport_kind: Transport, system: &str) {
    let telemetry = install_telemetry();
    let run = run(transport_kind, &["Ada"], &telemetry).await;
    let id = run.ids[0];
    let spans = telemetry.spans.get_finished_spans().unwrap();

    let checkout = one(&spans, "checkout");
    let deposit = spans
        .iter()
        .find(|s| s.name.ends_with(" deposit"))
        .expect("a deposit span");
    let topic = deposit.name.trim_end_matches(" deposit").to_owned();
    let publish = one(&spans, &format!("{topic} publish"));
    let process = one(&spans, &format!("{topic} process"));
    let send = one(&spans, "send Greeting");

    // One trace, each span the child of the one before it.
    let trace_id = checkout.span_context.trace_id();
    for span in [deposit, publish, process, send] {
        assert_eq!(
            span.span_context.trace_id(),
            trace_id,
            "{} is in another trace",
            span.name
        );
    }
    assert_eq!(checkout.parent_span_id, SpanId::INVALID);
    assert_eq!(deposit.parent_span_id, checkout.span_context.span_id());
    assert_eq!(publish.parent_span_id, deposit.span_context.span_id());
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert_eq!(send.parent_span_id, process.span_context.span_id());

    assert_eq!(deposit.span_kind, SpanKind::Internal);
    assert_eq!(publish.span_kind, SpanKind::Producer);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(send.span_kind, SpanKind::Internal);

    // Semantic-convention attributes.
    let id = id.to_string();
    for (span, operation) in [(publish, "send"), (process, "process")] {
        assert_eq!(attribute(span, "messaging.system").as_deref(), Some(system));
        assert_eq!(
            attribute(span, "messaging.destination.name").as_deref(),
            Some(topic.as_str())
        );
        assert_eq!(
            attribute(span, "messaging.operation.type").as_deref(),
            Some(operation)
        );
        assert_eq!(
            attribute(span, "messaging.message.id").as_deref(),
            Some(id.as_str())
        );
        // No correlation id was given: the conversation is the message's own id.
        assert_eq!(
            attribute(span, "messaging.message.conversation_id").as_deref(),
            Some(id.as_str())
        );
    }
    assert_eq!(
        attribute(deposit, "messaging.operation.type").as_deref(),
        Some("create")
    );
    assert_eq!(attribute(process, "outcome").as_deref(), Some("acked"));
    assert_eq!(
        attribute(process, "messaging.consumer.group.name"),
        attribute(process, "brighter.subscription")
    );
    // Baggage travelled with the message to the handler.
    assert_eq!(
        *run.greeter.baggage.lock().unwrap(),
        vec!["acme".to_owned()]
    );
}

#[tokio::test]
async fn one_trace_from_deposit_to_process_over_rabbitmq() {
    one_trace_over(Transport::RabbitMq, "rabbitmq").await;
}

#[tokio::test]
async fn one_trace_from_deposit_to_process_over_kafka() {
    one_trace_over(Transport::Kafka, "kafka").await;
}

#[tokio::test]
async fn one_trace_from_deposit_to_process_in_memory() {
    one_trace_over(Transport::Memory, "memory").await;
}

/// Sums of a counter's data points by their `outcome` attribute.
fn counter_by_outcome(telemetry: &Telemetry, name: &str) -> HashMap<String, u64> {
    let mut sums = HashMap::new();
    for resource in telemetry.metrics.get_finished_metrics().unwrap() {
        for scope in resource.scope_metrics() {
            for metric in scope.metrics().filter(|m| m.name() == name) {
                let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric.data() else {
                    panic!("{name} is not a u64 sum");
                };
                for point in sum.data_points() {
                    let outcome = point
                        .attributes()
                        .find(|kv| kv.key.as_str() == "outcome")
                        .map(|kv| kv.value.as_str().into_owned())
                        .unwrap_or_default();
                    // Cumulative temporality: the last export holds the totals.
                    sums.insert(outcome, point.value());
                }
            }
        }
    }
    sums
}

fn histogram_count(telemetry: &Telemetry, name: &str) -> u64 {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for resource in telemetry.metrics.get_finished_metrics().unwrap() {
        for scope in resource.scope_metrics() {
            for metric in scope.metrics().filter(|m| m.name() == name) {
                let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() else {
                    panic!("{name} is not an f64 histogram");
                };
                for point in histogram.data_points() {
                    let key = point
                        .attributes()
                        .map(|kv| format!("{}={}", kv.key, kv.value))
                        .collect::<Vec<_>>()
                        .join(",");
                    counts.insert(key, point.count());
                }
            }
        }
    }
    counts.values().sum()
}

fn gauge_seen(telemetry: &Telemetry, name: &str) -> bool {
    telemetry
        .metrics
        .get_finished_metrics()
        .unwrap()
        .iter()
        .flat_map(|r| r.scope_metrics())
        .flat_map(|s| s.metrics())
        .any(|m| m.name() == name)
}

#[tokio::test]
async fn metrics_count_a_known_run() {
    let telemetry = install_telemetry();
    let names = ["Ada", "Grace", "reject", "Barbara"];
    run(Transport::Memory, &names, &telemetry).await;

    let sent = counter_by_outcome(&telemetry, "messaging.client.sent.messages");
    assert_eq!(sent.get("sent"), Some(&4), "sent: {sent:?}");
    assert_eq!(sent.get("failed"), None);

    let consumed = counter_by_outcome(&telemetry, "messaging.client.consumed.messages");
    assert_eq!(consumed.get("acked"), Some(&3), "consumed: {consumed:?}");
    assert_eq!(consumed.get("rejected"), Some(&1), "consumed: {consumed:?}");

    let dead = counter_by_outcome(&telemetry, "brighter.messages.dead_lettered");
    assert_eq!(dead, HashMap::from([("rejected".to_owned(), 1)]));

    assert_eq!(histogram_count(&telemetry, "messaging.process.duration"), 4);
    assert!(gauge_seen(&telemetry, "brighter.outbox.outstanding"));
}

/// Everything a span shows an exporter, as text: name, attributes, events
/// (with their attributes) and status.
fn span_text(span: &SpanData) -> String {
    let mut text = format!("{} {:?}", span.name, span.status);
    for kv in &span.attributes {
        text.push_str(&format!(" {}={}", kv.key, kv.value));
    }
    for event in span.events.iter() {
        text.push_str(&format!(" event {}", event.name));
        for kv in &event.attributes {
            text.push_str(&format!(" {}={}", kv.key, kv.value));
        }
    }
    text
}

/// Sends that fail against unreachable brokers configured with credentials
/// (a RabbitMQ URI with a password, Kafka SASL settings) record errors on
/// their spans and in the logs; no span, attribute, event, status or log line
/// shows the password.
#[tokio::test]
async fn credentials_never_appear_in_spans_or_logs() {
    let telemetry = install_telemetry();
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rabbit = RabbitProducer::new(RabbitConnection::new(RabbitConfig::new(
        "amqp://app:hunter2@127.0.0.1:1/%2f",
    )));
    let kafka = KafkaProducer::new(
        KafkaConfig::new("127.0.0.1:1")
            .set("security.protocol", "sasl_plaintext")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", "app")
            .set("sasl.password", "hunter2")
            .set("message.timeout.ms", "500"),
    )
    .unwrap();
    for producer in [
        Arc::new(rabbit) as Arc<dyn Producer>,
        Arc::new(kafka) as Arc<dyn Producer>,
    ] {
        let processor = CommandProcessor::builder()
            .publication::<Greeting>(Publication::command(unique_name("redaction")))
            .producer(producer)
            .telemetry(telemetry.brighter())
            .build()
            .unwrap();
        let greeting = Greeting {
            id: Uuid::now_v7(),
            name: "secret".into(),
        };
        // Deposited, not sent: the broker is unreachable.
        processor.post(&greeting).await.unwrap();
    }
    telemetry.tracer_provider.force_flush().unwrap();
    let spans = telemetry.spans.get_finished_spans().unwrap();
    let errors: Vec<String> = spans
        .iter()
        .filter(|s| matches!(s.status, opentelemetry::trace::Status::Error { .. }))
        .map(span_text)
        .collect();
    assert!(
        errors.len() >= 2,
        "both failed sends are on spans: {errors:?}"
    );
    for span in &spans {
        let text = span_text(span);
        assert!(!text.contains("hunter2"), "{text}");
    }
    assert!(
        errors.iter().any(|e| e.contains("app:***@127.0.0.1:1")),
        "the RabbitMQ failure names the broker, redacted: {errors:?}"
    );
    let text = logs.text();
    assert!(text.contains("app:***@127.0.0.1:1"), "logged: {text}");
    assert!(!text.contains("hunter2"), "{text}");
}
