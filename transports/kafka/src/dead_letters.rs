//! A subscription's dead-letter topic, for operators: list what is in it,
//! and replay records to the subscription that dead-lettered them, with
//! their headers, once. A topic keeps its records, so "once" is kept by a
//! consumer group of its own, `<group>.dlq.replayed`, whose committed
//! offsets mark what was replayed; a copy goes to the subscription's first
//! retry tier (due at once), which only that consumer group reads, so the
//! topic's other groups do not get the message again.

use std::collections::BTreeMap;
use std::time::Duration;

use brighter_core::{Error, Message, wire};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::admin::transport;
use crate::channel::{DUE, NOT_BEFORE, ORIGINAL_TOPIC, RETRY_TIERS, decode_record};
use crate::record_headers;
use crate::{KafkaChannelFactory, KafkaConfig, KafkaProducer};

/// A record in a dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The message, as the pump would read it (`None` when it cannot be read).
    pub message: Option<Message>,
    /// Its id.
    pub id: Option<Uuid>,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// The topic it was dead-lettered from.
    pub original_topic: Option<String>,
    /// Its partition in the dead-letter topic.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Whether it was replayed already (by the replay group).
    pub replayed: bool,
    /// The body's size in bytes.
    pub size: usize,
}

/// The consumer group that marks what was replayed from `group`'s
/// dead-letter topic.
pub fn replay_group(group: &str) -> String {
    format!("{group}.dlq.replayed")
}

/// Every record of `topic` (all partitions, up to the high watermarks when
/// read), and the offsets `group` committed there.
fn read_to_end(
    config: &KafkaConfig,
    topic: &str,
    group: &str,
) -> Result<(Vec<OwnedMessage>, BTreeMap<i32, i64>), Error> {
    let consumer: BaseConsumer = config
        .client()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .map_err(|e| transport("create a Kafka consumer", e))?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| transport(&format!("read the metadata of '{topic}'"), e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::configuration(format!(
            "no dead-letter topic '{topic}': is the consumer group name right?"
        )));
    }
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(wanted, timeout)
        .map_err(|e| transport("read the replay group's offsets", e))?;
    let mut done = BTreeMap::new();
    let mut from = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in &partitions {
        let mark = match committed.find_partition(topic, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        done.insert(*p, mark);
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(|e| transport("read the dead-letter topic's watermarks", e))?;
        if high > low {
            ends.insert(*p, high);
            from.add_partition_offset(topic, *p, Offset::Offset(low))
                .map_err(|e| transport("assign a partition", e))?;
        }
    }
    let mut records = Vec::new();
    if !ends.is_empty() {
        consumer
            .assign(&from)
            .map_err(|e| transport("assign the dead-letter topic", e))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !ends.is_empty() && std::time::Instant::now() < deadline {
            let Some(result) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let record = result
                .map_err(|e| transport("read the dead-letter topic", e))?
                .detach();
            if ends
                .get(&record.partition())
                .is_some_and(|end| record.offset() + 1 >= *end)
            {
                ends.remove(&record.partition());
            }
            records.push(record);
        }
    }
    records.sort_by_key(|r| {
        (
            r.timestamp().to_millis().unwrap_or(0),
            r.partition(),
            r.offset(),
        )
    });
    Ok((records, done))
}

fn dead_letter(record: &OwnedMessage, done: &BTreeMap<i32, i64>) -> DeadLetter {
    let message = decode_record(record).ok();
    DeadLetter {
        id: message.as_ref().map(Message::id),
        reason: record_headers::value(record, wire::DEAD_LETTER_REASON),
        original_topic: record_headers::value(record, ORIGINAL_TOPIC),
        partition: record.partition(),
        offset: record.offset(),
        replayed: done
            .get(&record.partition())
            .is_some_and(|mark| record.offset() < *mark),
        size: record.payload().map_or(0, <[u8]>::len),
        message,
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| transport("a Kafka client task", e))?
}

/// The records of `group`'s dead-letter topic (`<group>.dlq`), oldest first,
/// at most `limit`; each says whether it was replayed already.
pub async fn list_dead_letters(
    config: &KafkaConfig,
    group: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, Error> {
    let (config, topic, marks) = (
        config.clone(),
        KafkaChannelFactory::dead_letter_topic(group),
        replay_group(group),
    );
    let (records, done) = blocking(move || read_to_end(&config, &topic, &marks)).await?;
    Ok(records
        .iter()
        .take(limit)
        .map(|r| dead_letter(r, &done))
        .collect())
}

/// Replays records of `group`'s dead-letter topic to the subscription that
/// dead-lettered them (through its first retry tier, due at once): every
/// record not replayed before, or, with `only`, the records with those ids
/// (replayed or not: an explicit choice). Each goes with its headers as they
/// were, less the dead-letter reason and origin, and with its handled count
/// back to 0. The replay group's offsets move past what was replayed (not
/// with `only`). Returns the ids replayed.
pub async fn replay_dead_letters(
    config: &KafkaConfig,
    producer: &KafkaProducer,
    group: &str,
    only: Option<&[Uuid]>,
) -> Result<Vec<Uuid>, Error> {
    let dlq = KafkaChannelFactory::dead_letter_topic(group);
    let marks = replay_group(group);
    let (records, done) = {
        let (config, dlq, marks) = (config.clone(), dlq.clone(), marks.clone());
        blocking(move || read_to_end(&config, &dlq, &marks)).await?
    };
    let tier = KafkaChannelFactory::retry_topic(group, RETRY_TIERS[0]);
    let mut replayed = Vec::new();
    let mut advanced: BTreeMap<i32, i64> = BTreeMap::new();
    for record in &records {
        let letter = dead_letter(record, &done);
        let chosen = match only {
            Some(ids) => letter.id.is_some_and(|id| ids.contains(&id)),
            None => !letter.replayed,
        };
        if !chosen {
            continue;
        }
        let Some(mut message) = letter.message else {
            tracing::warn!(
                partition = letter.partition,
                offset = letter.offset,
                "an unreadable dead letter is not replayed"
            );
            continue;
        };
        message.header.handled_count = 0;
        let now = chrono::Utc::now().timestamp_millis().to_string();
        producer
            .send_to(&tier, &message, &[(NOT_BEFORE, now.clone()), (DUE, now)])
            .await?;
        replayed.push(message.id());
        if only.is_none() {
            advanced.insert(record.partition(), record.offset() + 1);
        }
    }
    if !advanced.is_empty() {
        let config = config.clone();
        blocking(move || {
            let consumer: BaseConsumer = config
                .client()
                .set("group.id", &marks)
                .set("enable.auto.commit", "false")
                .create()
                .map_err(|e| transport("create a Kafka consumer", e))?;
            let mut offsets = TopicPartitionList::new();
            for (partition, offset) in advanced {
                offsets
                    .add_partition_offset(&dlq, partition, Offset::Offset(offset))
                    .map_err(|e| transport("mark replayed records", e))?;
            }
            consumer
                .commit(&offsets, CommitMode::Sync)
                .map_err(|e| transport("mark replayed records", e))
        })
        .await?;
    }
    Ok(replayed)
}
