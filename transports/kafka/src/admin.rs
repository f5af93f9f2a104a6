//! Topic creation and replay (resetting a group's offsets).

use std::time::Duration;

use brighter_core::Error;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

pub(crate) fn transport(context: &str, e: impl Into<brighter_core::BoxError>) -> Error {
    Error::transport(context.to_owned(), e)
}

/// Deletes `topics` and consumer group `group` (leaving them once deleted is
/// fine: a missing topic or group is not an error).
pub(crate) async fn delete_topics_and_group(
    config: &KafkaConfig,
    topics: &[&str],
    group: &str,
) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> = config
        .client()
        .create()
        .map_err(|e| transport("create the Kafka admin client", e))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin
        .delete_topics(topics, &options)
        .await
        .map_err(|e| transport("delete topics", e))?
    {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => {
                return Err(transport(&format!("delete topic '{topic}'"), code));
            }
        }
    }
    // Then the group. One whose member is still leaving is not empty yet:
    // try again for a few seconds.
    let mut tries = 0;
    loop {
        let results = admin
            .delete_groups(&[group], &options)
            .await
            .map_err(|e| transport("delete a consumer group", e))?;
        match results.into_iter().next() {
            None | Some(Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound))) => break,
            Some(Err((_, RDKafkaErrorCode::NonEmptyGroup))) if tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Some(Err((group, code))) => {
                return Err(transport(&format!("delete group '{group}'"), code));
            }
        }
    }
    Ok(())
}

/// Creates `topics` that do not exist yet, with the configured partitions and
/// replication. Existing topics are left as they are.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> = config
        .client()
        .create()
        .map_err(|e| transport("create the Kafka admin client", e))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                config.partitions,
                TopicReplication::Fixed(config.replication),
            )
        })
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| transport("create topics", e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(transport(&format!("create topic '{topic}'"), code)),
        }
    }
    Ok(())
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The earliest offset still in the topic.
    Earliest,
    /// The first message at or after this time (milliseconds since the epoch).
    Timestamp(i64),
}

/// Resets consumer group `group`'s committed offsets on every partition of
/// `topic`, so its consumers read again from `from`. Stop the group's consumers
/// first: Kafka refuses offset commits for a group with active members.
/// One function: it runs as one blocking task with one consumer.
pub async fn replay(
    config: &KafkaConfig,
    group: &str,
    topic: &str,
    from: ReplayFrom,
) -> Result<(), Error> {
    let (config, group, topic) = (config.clone(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .client()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| transport("create a replay consumer", e))?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map_err(|e| transport("read topic metadata", e))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            let offset = match from {
                ReplayFrom::Earliest => Offset::Offset(
                    consumer
                        .fetch_watermarks(&topic, *p, Duration::from_secs(10))
                        .map_err(|e| transport("read watermarks", e))?
                        .0,
                ),
                ReplayFrom::Timestamp(ms) => Offset::Offset(ms),
            };
            tpl.add_partition_offset(&topic, *p, offset)
                .map_err(|e| transport("build the offset list", e))?;
        }
        if let ReplayFrom::Timestamp(_) = from {
            tpl = consumer
                .offsets_for_times(tpl, Duration::from_secs(10))
                .map_err(|e| transport("find offsets for the timestamp", e))?;
            // Partitions with no message after the time start at their end.
            let mut resolved = TopicPartitionList::new();
            for element in tpl.elements() {
                let offset = match element.offset() {
                    Offset::Offset(o) => Offset::Offset(o),
                    _ => Offset::Offset(
                        consumer
                            .fetch_watermarks(&topic, element.partition(), Duration::from_secs(10))
                            .map_err(|e| transport("read watermarks", e))?
                            .1,
                    ),
                };
                resolved
                    .add_partition_offset(&topic, element.partition(), offset)
                    .map_err(|e| transport("build the offset list", e))?;
            }
            tpl = resolved;
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| transport(&format!("commit replay offsets for group '{group}'"), e))
    })
    .await
    .map_err(|e| transport("replay task", e))?
}
