//! `brighter dlq` against RabbitMQ and Kafka: a message whose handler
//! rejects it lands in the subscription's dead-letter channel; the command
//! line lists it with its reason and shows it; once the cause is fixed,
//! replay sends it back to the subscription, which handles it once; a
//! second replay sends nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use brighter::kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer};
use brighter::rabbitmq::{RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer};
use brighter::uuid::Uuid;
use brighter::{
    ChannelFactory, Command, CommandProcessor, Dispatcher, Error, Handler, Producer, Publication,
    RequestContext, Subscription,
};
use common::{brighter, fresh, until};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Command, Serialize, Deserialize)]
struct Charge {
    id: Uuid,
    cents: u64,
}

/// Rejects while `broken`; counts what it handled.
#[derive(Clone, Default)]
struct Charging {
    broken: Arc<AtomicBool>,
    handled: Arc<AtomicUsize>,
}

impl Handler<Charge> for Charging {
    async fn handle(&self, _: &Charge, _: &mut RequestContext) -> Result<(), Error> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(Error::reject("the card processor is down"));
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn dead_letter_then_replay(
    transport: &str,
    channel: &str,
    producer: Arc<dyn Producer>,
    channels: Arc<dyn ChannelFactory>,
    topic: &str,
) {
    let charging = Charging::default();
    charging.broken.store(true, Ordering::SeqCst);
    let processor = CommandProcessor::builder()
        .command(charging.clone())
        .publication::<Charge>(Publication::command(topic))
        .producer(producer)
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(Subscription::command::<Charge>(channel, topic, channels))
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    until(
        "the subscription's start",
        Duration::from_secs(60),
        async || dispatcher.health().iter().all(|h| h.is_healthy()),
    )
    .await;
    let charge = Charge {
        id: Uuid::now_v7(),
        cents: 4_200,
    };
    processor.post(&charge).await.unwrap();
    let args = |action: &'static str| vec!["dlq", "--transport", transport, action, channel];
    until("the dead letter", Duration::from_secs(60), async || {
        brighter(&[&["--json"], &args("list")[..]].concat(), &[])
            .await
            .json()
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .await;
    let listed = brighter(&args("list"), &[]).await;
    assert!(
        listed.stdout.contains(&charge.id.to_string()),
        "{}",
        listed.stdout
    );
    assert!(
        listed.stdout.contains("the card processor is down"),
        "{}",
        listed.stdout
    );
    let id = charge.id.to_string();
    let shown = brighter(&[&["--json"], &args("show")[..], &[&id]].concat(), &[])
        .await
        .json();
    assert_eq!(shown["reason"], "the card processor is down");
    assert_eq!(shown["topic"], topic);
    assert!(shown["body"].as_str().unwrap().contains("4200"));
    assert_eq!(charging.handled.load(Ordering::SeqCst), 0);

    // Fixed: replayed to the subscription, handled once.
    charging.broken.store(false, Ordering::SeqCst);
    let replayed = brighter(&[&["--json"], &args("replay")[..]].concat(), &[])
        .await
        .json();
    assert_eq!(replayed["replayed"], serde_json::json!([id]));
    until("the replayed charge", Duration::from_secs(60), async || {
        charging.handled.load(Ordering::SeqCst) == 1
    })
    .await;
    let again = brighter(&[&["--json"], &args("replay")[..]].concat(), &[])
        .await
        .json();
    assert_eq!(again["replayed"], serde_json::json!([]), "replayed twice");
    tokio::time::sleep(Duration::from_secs(2)).await;
    dispatcher.shutdown().await;
    assert_eq!(charging.handled.load(Ordering::SeqCst), 1, "handled once");
    let left = brighter(&[&["--json"], &args("list")[..]].concat(), &[])
        .await
        .json();
    match transport {
        // Replayed and acked off the queue.
        "rabbitmq" => assert_eq!(left, serde_json::json!([])),
        // A topic keeps its records: marked replayed.
        _ => assert_eq!(left[0]["replayed"], true),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_dead_letter_is_replayed_to_its_queue_and_handled_once() {
    let name = fresh("dlq");
    let connection = RabbitConnection::new(
        RabbitConfig::from_env()
            .exchange(&name)
            .queue_expiry(Duration::from_secs(600)),
    );
    dead_letter_then_replay(
        "rabbitmq",
        &format!("{name}.charges"),
        Arc::new(RabbitProducer::new(connection.clone())),
        Arc::new(RabbitChannelFactory::new(connection)),
        &format!("{name}.charge"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_dead_letter_is_replayed_to_its_group_and_handled_once() {
    let name = fresh("dlq");
    let config = KafkaConfig::from_env();
    let producer = KafkaProducer::new(config.clone()).unwrap();
    dead_letter_then_replay(
        "kafka",
        &format!("{name}.charges"),
        Arc::new(producer.clone()),
        Arc::new(KafkaChannelFactory::new(config, producer)),
        &format!("{name}.charge"),
    )
    .await;
}
