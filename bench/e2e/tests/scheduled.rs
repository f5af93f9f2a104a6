//! Scheduled messages through the Postgres outbox and a real Kafka broker
//! (`DATABASE_URL`, `KAFKA_BROKERS`): held in the outbox until due, sent once
//! by whichever sweeper runs then, and never by a sleeping producer.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

use brighter_core::conformance::unique_name;
use brighter_core::{ChannelFactory, ChannelSpec, CommandProcessor, Event, Publication, Request};
use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer, ensure_topics};
use brighter_outbox_postgres::{PgOutbox, PgSweeper};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reminder {
    id: Uuid,
}
impl Request for Reminder {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Event for Reminder {}

/// A "service process": a processor on the outbox, and its sweeper.
async fn service(
    outbox: &PgOutbox,
    config: &KafkaConfig,
    topic: &str,
) -> (CommandProcessor, brighter_core::RunningSweeper) {
    let processor = CommandProcessor::builder()
        .publication::<Reminder>(Publication::event(topic))
        .producer(KafkaProducer::new(config.clone()).unwrap())
        .outbox(outbox.clone())
        .build()
        .unwrap();
    let sweeper = PgSweeper::new(outbox.clone(), processor.clone())
        .start()
        .await
        .unwrap();
    (processor, sweeper)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_message_scheduled_45_s_ahead_arrives_once_when_due_whichever_sweeper_runs() {
    // Before: KafkaProducer::send slept for the delay, so post_with_delay
    // blocked its caller for 45 s, the sweeper sent the still-outstanding row
    // a second time after min_age, and its 30 s send timeout fired first.
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect(&url)
        .await
        .unwrap();
    let schema = format!("t_{}", Uuid::now_v7().simple());
    let outbox = PgOutbox::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let config = KafkaConfig::from_env().topics(1, 1);
    let topic = unique_name("scheduled");
    let group = format!("{topic}-g");
    let topics = KafkaChannelFactory::channel_topics(&topic, &group);
    ensure_topics(
        &config,
        &topics.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let mut channel =
        KafkaChannelFactory::new(config.clone(), KafkaProducer::new(config.clone()).unwrap())
            .create_channel(&ChannelSpec::new(&group, &topic, &group))
            .await
            .unwrap();

    let (first, first_sweeper) = service(&outbox, &config, &topic).await;
    let delay = Duration::from_secs(45);
    let posted = Instant::now();
    let id = first
        .post_scheduled(&Reminder { id: Uuid::now_v7() }, delay)
        .await
        .unwrap();
    let returned = posted.elapsed();
    assert!(
        returned < Duration::from_secs(5),
        "post_scheduled took {returned:?}"
    );
    let due_at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(&format!(
        "SELECT due_at FROM {schema}.outbox WHERE message_id = $1"
    ))
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(due_at.is_some(), "the row has its due time");

    // The first process goes away before the message is due; another one
    // (a new processor and sweeper on the same outbox) sends it when due.
    assert!(
        channel
            .receive(Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    first_sweeper.stop().await;
    drop(first);
    let (_second, second_sweeper) = service(&outbox, &config, &topic).await;
    if let Some(early) = channel
        .receive(delay.saturating_sub(posted.elapsed()))
        .await
        .unwrap()
    {
        panic!(
            "message {} arrived {:?} after the post, before it was due",
            early.message.id(),
            posted.elapsed()
        );
    }
    let delivery = channel
        .receive(Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the scheduled message arrived");
    let arrived = posted.elapsed();
    assert_eq!(delivery.message.id(), id);
    assert!(arrived >= delay, "arrived after {arrived:?}");
    channel.ack(&delivery).await.unwrap();
    assert!(
        channel
            .receive(Duration::from_secs(5))
            .await
            .unwrap()
            .is_none(),
        "arrived twice"
    );
    let dispatched: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.outbox WHERE dispatched IS NOT NULL"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(dispatched, 1);
    println!(
        "post_scheduled returned in {returned:?}; scheduled {delay:?}, arrived after {arrived:?}"
    );
    second_sweeper.stop().await;
    channel.close().await.unwrap();
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
