//! CloudEvents interoperability with an SDK written by others: the
//! CloudEvents Python SDK (`cloudevents` 2.2.0 from PyPI, its Kafka and AMQP
//! protocol bindings, driven by `scripts/cloudevents_interop.py`) reads what
//! our producers write to real Kafka and RabbitMQ brokers as valid events with
//! the right attributes, and the events it writes are consumed by our pump,
//! also when a foreign AMQP publisher adds a header whose name is not UTF-8.
//!
//! The SDK runs from `BRIGHTER_CE_PYTHON` (set by `scripts/test`); without it
//! the test installs it as `scripts/services.sh` does (a virtual environment
//! from PyPI, once).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brighter_core::conformance::unique_name;
use brighter_core::wire::cloud_event_uuid;
use brighter_core::{
    ChannelFactory, CommandProcessor, Dispatcher, Error, Event, Handler, Producer, Publication,
    RequestContext, SmolStr, Subscription,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Debug, Clone, Event, Serialize, Deserialize)]
struct OrderPlaced {
    id: Uuid,
    item: String,
}

/// What our handler saw of each event: message id, CloudEvents source and
/// type, and the item.
type Seen = Arc<Mutex<Vec<(Uuid, Option<SmolStr>, Option<SmolStr>, String)>>>;

struct Record(Seen);
impl Handler<OrderPlaced> for Record {
    async fn handle(&self, event: &OrderPlaced, ctx: &mut RequestContext) -> Result<(), Error> {
        let header = &ctx.message().unwrap().header;
        self.0.lock().unwrap().push((
            header.id,
            header.cloud_events.source.clone(),
            header.cloud_events.kind.clone(),
            event.item.clone(),
        ));
        Ok(())
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The Python with the CloudEvents SDK installed.
fn python() -> PathBuf {
    if let Ok(python) = std::env::var("BRIGHTER_CE_PYTHON") {
        return python.into();
    }
    let output = Process::new("bash")
        .arg("-c")
        .arg("source scripts/services.sh && ensure_cloudevents_sdk && echo \"$BRIGHTER_CE_PYTHON\"")
        .current_dir(repo_root())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "installing the CloudEvents SDK failed"
    );
    String::from_utf8(output.stdout).unwrap().trim().into()
}

fn sdk(args: &[&str]) -> Process {
    let mut process = Process::new(python());
    process
        .arg(repo_root().join("scripts/cloudevents_interop.py"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    process
}

/// Runs the SDK to the end; its stdout lines parsed as JSON.
fn sdk_events(args: &[&str]) -> Vec<Value> {
    let output = sdk(args).output().unwrap();
    assert!(
        output.status.success(),
        "cloudevents_interop.py {args:?} failed"
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// An event for the SDK to write, with `id` and an order for `item`.
fn sdk_event(id: &str, item: &str) -> String {
    json!({
        "attributes": {
            "id": id,
            "source": "/python-sdk",
            "type": "com.example.order.placed",
            "datacontenttype": "application/json",
            "subject": "order",
        },
        "data": {"id": Uuid::now_v7(), "item": item},
    })
    .to_string()
}

/// Checks what the SDK made of the one event we posted.
fn assert_is_our_event(events: &[Value], id: Uuid) {
    assert_eq!(events.len(), 1, "{events:?}");
    let attributes = &events[0]["attributes"];
    assert_eq!(attributes["id"], id.to_string());
    assert_eq!(attributes["specversion"], "1.0");
    assert_eq!(attributes["source"], "urn:brighter:shop");
    assert_eq!(attributes["type"], "OrderPlaced");
    assert_eq!(attributes["subject"], "orders");
    assert_eq!(attributes["datacontenttype"], "application/json");
    assert!(
        attributes["time"].as_str().unwrap().starts_with("20"),
        "{attributes}"
    );
    assert_eq!(events[0]["data"]["item"], "tea");
    assert_eq!(events[0]["data"]["id"], id.to_string());
}

/// Posts our event (the tea order); its id.
async fn post_ours(processor: &CommandProcessor) -> Uuid {
    let id = Uuid::now_v7();
    processor
        .post(&OrderPlaced {
            id,
            item: "tea".into(),
        })
        .await
        .unwrap();
    id
}

/// The SDK writes two events with `write` (its command and where to), one
/// with a UUID id and one with another; our pump gets both.
async fn sdk_events_reach_our_pump(seen: &Seen, write: &[&str]) {
    let uuid_id = Uuid::new_v4();
    let other_id = "py-order-2";
    for (id, item) in [(uuid_id.to_string().as_str(), "coffee"), (other_id, "cake")] {
        let event = sdk_event(id, item);
        sdk_events(&[write, &[event.as_str()]].concat());
    }
    assert_pump_got_sdk_events(seen, uuid_id, other_id).await;
}

/// Our pump gets both SDK events: the one with a UUID id under that id, the
/// other under the id derived from its source and id; source and type kept.
async fn assert_pump_got_sdk_events(seen: &Seen, uuid_id: Uuid, other_id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pump saw {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    let from_sdk: Vec<_> = seen.iter().filter(|s| s.3 != "tea").collect();
    assert_eq!(from_sdk.len(), 2, "{seen:?}");
    let by_item = |item: &str| from_sdk.iter().find(|s| s.3 == item).unwrap();
    let first = by_item("coffee");
    assert_eq!(first.0, uuid_id);
    assert_eq!(first.1.as_deref(), Some("/python-sdk"));
    assert_eq!(first.2.as_deref(), Some("com.example.order.placed"));
    let second = by_item("cake");
    assert_eq!(second.0, cloud_event_uuid("/python-sdk", other_id));
}

fn processor(topic: &str, producer: impl Producer, seen: &Seen) -> CommandProcessor {
    CommandProcessor::builder()
        .event(Record(Arc::clone(seen)))
        .publication::<OrderPlaced>(
            Publication::event(topic)
                .source("urn:brighter:shop")
                .subject("orders"),
        )
        .producer(producer)
        .build()
        .unwrap()
}

async fn started(
    processor: &CommandProcessor,
    name: &str,
    topic: &str,
    channels: Arc<dyn ChannelFactory>,
) -> Dispatcher {
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::event::<OrderPlaced>(name, topic, channels))
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !dispatcher
        .subscription_health(name)
        .is_some_and(|h| h.is_healthy())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            dispatcher.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_messages_are_cloud_events_to_the_python_sdk_and_its_events_reach_our_pump() {
    use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer};
    let topic = unique_name("ce-kafka");
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let config = KafkaConfig::from_env().topics(1, 1);
    let producer = KafkaProducer::new(config.clone()).unwrap();
    let seen: Seen = Arc::default();
    let processor = processor(&topic, producer.clone(), &seen);
    let channels = Arc::new(KafkaChannelFactory::new(config, producer));
    let dispatcher = started(&processor, &unique_name("ce"), &topic, channels).await;

    // Ours, read by the SDK's Kafka binding.
    let id = post_ours(&processor).await;
    let events = sdk_events(&["read-kafka", &brokers, &topic, "1"]);
    println!("the SDK read: {}", events[0]);
    assert_is_our_event(&events, id);

    // The SDK's, consumed by our pump.
    sdk_events_reach_our_pump(&seen, &["write-kafka", &brokers, &topic]).await;
    dispatcher.shutdown().await;
}

/// Our pump on a RabbitMQ exchange and topic of their own, recording what it
/// handles in `seen`, and the processor that publishes there.
struct RabbitPump {
    url: String,
    exchange: String,
    topic: String,
    /// The subscription's name.
    name: String,
    seen: Seen,
    processor: CommandProcessor,
    dispatcher: Dispatcher,
}

impl RabbitPump {
    async fn start(prefix: &str) -> RabbitPump {
        use brighter_rabbitmq::{
            RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer,
        };
        let topic = unique_name(prefix);
        let exchange = unique_name(&format!("{prefix}-exchange"));
        let url = std::env::var("AMQP_ADDR")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let connection = RabbitConnection::new(
            RabbitConfig::from_env()
                .exchange(&exchange)
                .queue_expiry(Duration::from_secs(1800)),
        );
        let seen: Seen = Arc::default();
        let processor = processor(&topic, RabbitProducer::new(connection.clone()), &seen);
        let channels = Arc::new(RabbitChannelFactory::new(connection));
        let name = unique_name(prefix);
        let dispatcher = started(&processor, &name, &topic, channels).await;
        RabbitPump {
            url,
            exchange,
            topic,
            name,
            seen,
            processor,
            dispatcher,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_messages_are_cloud_events_to_the_python_sdk_and_its_events_reach_our_pump() {
    let RabbitPump {
        url,
        exchange,
        topic,
        seen,
        processor,
        dispatcher,
        ..
    } = RabbitPump::start("ce-rabbit").await;

    // Ours, read by the SDK's AMQP binding from a queue of its own on the
    // exchange (bound before we publish: it says "ready").
    let mut reader = sdk(&["read-amqp", &url, &exchange, &topic, "1"])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(reader.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let id = post_ours(&processor).await;
    let events: Vec<Value> = lines
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect();
    assert!(reader.wait().unwrap().success());
    println!("the SDK read: {}", events[0]);
    assert_is_our_event(&events, id);

    // The SDK's, consumed by our pump.
    sdk_events_reach_our_pump(&seen, &["write-amqp", &url, &exchange, &topic]).await;
    dispatcher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_header_name_that_is_not_utf8_stops_nothing() {
    // AMQP short strings are bytes and RabbitMQ passes them on as they are;
    // the AMQP client refused such a header name as a frame error and closed
    // the connection, so the message came back at the head of the queue on
    // every reconnect and nothing behind it was consumed.
    let RabbitPump {
        url,
        exchange,
        topic,
        name,
        seen,
        dispatcher,
        ..
    } = RabbitPump::start("binary-name").await;
    let (binary, plain) = (Uuid::new_v4(), Uuid::new_v4());
    sdk_events(&[
        "write-amqp-binary-name",
        &url,
        &exchange,
        &topic,
        &sdk_event(&binary.to_string(), "with a binary header name"),
    ]);
    sdk_events(&[
        "write-amqp",
        &url,
        &exchange,
        &topic,
        &sdk_event(&plain.to_string(), "behind it"),
    ]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pump saw {:?}; {:?}",
            seen.lock().unwrap(),
            dispatcher.subscription_health(&name)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids: Vec<Uuid> = seen.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(ids, [binary, plain], "both handled, once, in order");
    dispatcher.shutdown().await;
}
