//! `brighter outbox` against a real Postgres outbox and RabbitMQ: a message
//! no queue takes is parked by the sweeper; the command line lists it with
//! its error, shows it, requeues it once a queue is there, and it is
//! delivered once; then the dispatched row is purged.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use brighter::postgres::{PgOutbox, PgSweeper};
use brighter::rabbitmq::{RabbitChannelFactory, RabbitConfig, RabbitConnection, RabbitProducer};
use brighter::uuid::Uuid;
use brighter::{ChannelFactory, ChannelSpec, CommandProcessor, Event, Outbox, Publication};
use common::{brighter, fresh, pool, until};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Event, Serialize, Deserialize)]
struct Shipped {
    id: Uuid,
    parcel: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_row_is_listed_and_requeued_then_delivered_once() {
    let pool = pool().await;
    let schema = fresh("cli");
    let topic = format!("{schema}.shipped");
    let outbox = PgOutbox::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let connection = RabbitConnection::new(
        RabbitConfig::from_env()
            .exchange(&schema)
            .queue_expiry(Duration::from_secs(600)),
    );
    let processor = CommandProcessor::builder()
        .publication::<Shipped>(Publication::event(&topic))
        .producer(RabbitProducer::new(connection.clone()))
        .outbox(outbox.clone())
        .build()
        .unwrap();
    let sweeper = PgSweeper::new(outbox.clone(), processor.clone())
        .min_age(Duration::ZERO)
        .poll_interval(Duration::from_millis(50))
        .park_after(2)
        .topic_backoff(Duration::from_millis(50), Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    // No queue is bound to the topic yet: the send is unroutable, and the
    // sweeper parks the message after two tries.
    let id = processor
        .post(&Shipped {
            id: Uuid::now_v7(),
            parcel: "p-1".into(),
        })
        .await
        .unwrap();
    until(
        "the message is parked",
        Duration::from_secs(30),
        async || outbox.parked_count().await.unwrap() == 1,
    )
    .await;
    let id_text = id.to_string();
    let of = ["outbox", "--schema", &schema];

    let parked = brighter(&[&of[..], &["parked"]].concat(), &[]).await;
    assert!(
        parked.ok && parked.stdout.contains(&id_text),
        "{}",
        parked.stdout
    );
    assert!(parked.stdout.contains("unroutable"), "{}", parked.stdout);
    let stats = brighter(&[&["--json"], &of[..], &["stats"]].concat(), &[])
        .await
        .json();
    assert_eq!(
        (stats["parked"].as_i64(), stats["outstanding"].as_i64()),
        (Some(1), Some(0))
    );
    let listed = brighter(
        &[&["--json"], &of[..], &["list", "--state", "parked"]].concat(),
        &[],
    )
    .await
    .json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id_text.as_str());
    assert_eq!(listed[0]["type"], "Shipped");
    let shown = brighter(&[&["--json"], &of[..], &["show", &id_text]].concat(), &[])
        .await
        .json();
    assert_eq!(shown["state"], "parked");
    assert!(shown["body"].as_str().unwrap().contains("p-1"));

    // A queue is there now: requeued, the sweeper delivers it, once.
    let queue = format!("{schema}.q");
    let mut channel = RabbitChannelFactory::new(connection.clone())
        .create_channel(&ChannelSpec::new(&queue, &topic, &queue))
        .await
        .unwrap();
    let requeued = brighter(&[&of[..], &["requeue", &id_text]].concat(), &[]).await;
    assert!(
        requeued.stdout.contains("requeued 1 of 1"),
        "{}",
        requeued.stdout
    );
    let mut delivered = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if let Some(delivery) = channel.receive(Duration::from_millis(500)).await.unwrap() {
            channel.ack(&delivery).await.unwrap();
            delivered.push(delivery.message.id());
        } else if !delivered.is_empty() {
            break;
        }
    }
    assert_eq!(delivered, vec![id], "delivered once");
    sweeper.stop().await;
    channel.close().await.unwrap();
    let stats = brighter(&[&["--json"], &of[..], &["stats"]].concat(), &[])
        .await
        .json();
    assert_eq!(
        (stats["parked"].as_i64(), stats["dispatched"].as_i64()),
        (Some(0), Some(1))
    );

    let purged = brighter(
        &[&of[..], &["purge-dispatched", "--older-than", "0s"]].concat(),
        &[],
    )
    .await;
    assert!(
        purged.stdout.contains("deleted 1 message(s)"),
        "{}",
        purged.stdout
    );
    assert!(outbox.by_correlation(id).await.unwrap().is_empty());
    brighter::sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn credentials_are_never_printed() {
    let secret = "hunter2-secret";
    let database = brighter(
        &["outbox", "stats"],
        &[(
            "DATABASE_URL",
            &format!("postgres://app:{secret}@127.0.0.1:1/none"),
        )],
    )
    .await;
    let amqp = brighter(
        &["dlq", "--transport", "rabbitmq", "list", "orders"],
        &[("AMQP_ADDR", &format!("amqp://app:{secret}@127.0.0.1:1/%2f"))],
    )
    .await;
    for run in [&database, &amqp] {
        assert!(!run.ok, "a failed connection succeeded");
        assert!(
            !run.stdout.contains(secret) && !run.stderr.contains(secret),
            "{}",
            run.stderr
        );
        assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
    }
    assert!(amqp.stderr.contains("app:***@"), "{}", amqp.stderr);
}
