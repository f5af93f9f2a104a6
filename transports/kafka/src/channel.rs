//! [`KafkaChannelFactory`] and [`KafkaChannel`]: a consumer in a group with
//! manual offsets. An offset is stored only after its message's outcome is
//! settled and committed by librdkafka on a timer, on rebalance and on close.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::{Channel, ChannelFactory, ChannelSpec, Delivery, Error, Message, wire};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::time::Instant;

use crate::admin::{delete_topics_and_group, ensure_topics, transport};
use crate::config::KafkaConfig;
use crate::producer::KafkaProducer;

/// Header of a message on a retry topic: when it is due (ms since the epoch).
pub const NOT_BEFORE: &str = "x-brighter-not-before";

/// The longest a deferred message waits on the retry topic. A longer requeue
/// delay is cut to this, and a due time read from a record that lies further
/// ahead (a foreign or corrupt header) counts as due now, with a warning: a
/// paused retry partition holds everything behind its head record.
pub const MAX_RETRY_WAIT: Duration = wire::MAX_DELAY;

/// Headers of a dead-lettered message: where it came from.
pub const ORIGINAL_TOPIC: &str = "x-brighter-original-topic";
/// Partition it was read from.
pub const ORIGINAL_PARTITION: &str = "x-brighter-original-partition";
/// Offset it was read at.
pub const ORIGINAL_OFFSET: &str = "x-brighter-original-offset";

/// Where a delivered message was read, and in which generation of the
/// member's assignment.
#[derive(Debug, Clone)]
struct Position {
    topic: String,
    partition: i32,
    offset: i64,
    generation: u64,
}

/// The offsets of one partition this member has read in one generation of its
/// assignment.
#[derive(Debug, Default)]
struct Offsets {
    generation: u64,
    /// Offsets handed out (or sent back for redelivery) and not settled yet.
    unsettled: BTreeSet<i64>,
    /// One past the highest settled offset.
    next: Option<i64>,
    /// The offset last stored for commit (the next one to read on a restart).
    stored: Option<i64>,
}

impl Offsets {
    /// Where a restart must read from: the lowest unsettled offset, or one
    /// past the highest settled one; `None` while nothing is settled.
    fn commit_point(&self) -> Option<i64> {
        let next = self.next?;
        Some(self.unsettled.first().map_or(next, |&low| low.min(next)))
    }
}

/// Opens [`KafkaChannel`]s. A subscription's channel name is its consumer group;
/// prefetching is librdkafka's (tune `queued.min.messages` and
/// `queued.max.messages.kbytes` through [`KafkaConfig::set`]); the subscription's
/// buffer size does not apply, as capping librdkafka's queue starves its fetcher.
/// it also gets `<channel>.retry` (deferred messages), `<channel>.dlq` and
/// `<channel>.invalid`, created with the subscription's topic when missing.
#[derive(Debug, Clone)]
pub struct KafkaChannelFactory {
    config: KafkaConfig,
    producer: KafkaProducer,
}

impl KafkaChannelFactory {
    /// Channels with `config`; `producer` sends retries and dead letters.
    pub fn new(config: KafkaConfig, producer: KafkaProducer) -> Self {
        KafkaChannelFactory { config, producer }
    }

    /// The retry topic of channel (group) `channel`.
    pub fn retry_topic(channel: &str) -> String {
        format!("{channel}.retry")
    }

    /// The dead-letter topic of channel (group) `channel`.
    pub fn dead_letter_topic(channel: &str) -> String {
        format!("{channel}.dlq")
    }

    /// The invalid-message topic of channel (group) `channel`.
    pub fn invalid_message_topic(channel: &str) -> String {
        format!("{channel}.invalid")
    }
}

/// What the group has given this member, kept up to date by the rebalance
/// callbacks (which librdkafka runs inside `recv`).
#[derive(Debug, Default)]
pub(crate) struct Membership {
    /// The partitions assigned to this member now, by topic (looked up with
    /// a borrowed topic on every settle, so no key is built per message).
    assigned: HashMap<String, HashSet<i32>>,
    /// Bumped by every revocation: offsets settled, and messages received, in an
    /// earlier generation may belong to another member now, so they are never
    /// stored or committed by this one.
    generation: u64,
    /// Whether the member has joined the group (with or without partitions).
    joined: bool,
}

impl Membership {
    fn owns(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.generation == generation
            && self
                .assigned
                .get(topic)
                .is_some_and(|partitions| partitions.contains(&partition))
    }
}

/// The consumer's context: follows the member's assignment.
#[derive(Default)]
pub(crate) struct GroupContext {
    membership: Arc<Mutex<Membership>>,
}

fn lock(membership: &Mutex<Membership>) -> std::sync::MutexGuard<'_, Membership> {
    // Each critical section is a few set operations.
    membership
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Before librdkafka commits the stored offsets of the revoked
            // partitions: from here on, nothing of them is stored again.
            let mut membership = lock(&self.membership);
            membership.generation += 1;
            for element in tpl.elements() {
                if let Some(partitions) = membership.assigned.get_mut(element.topic()) {
                    partitions.remove(&element.partition());
                }
            }
        }
    }

    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let mut membership = lock(&self.membership);
        match rebalance {
            Rebalance::Assign(tpl) => {
                membership.joined = true;
                for element in tpl.elements() {
                    membership
                        .assigned
                        .entry(element.topic().to_owned())
                        .or_default()
                        .insert(element.partition());
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "Kafka rebalance error"),
        }
    }
}

#[async_trait]
impl ChannelFactory for KafkaChannelFactory {
    // One function: topics, the consumer's settings, the subscription and the
    // join follow each other and share the consumer being built.
    async fn create_channel(&self, spec: &ChannelSpec) -> Result<Box<dyn Channel>, Error> {
        let retry = Self::retry_topic(&spec.channel);
        let dlq = Self::dead_letter_topic(&spec.channel);
        let invalid = Self::invalid_message_topic(&spec.channel);
        ensure_topics(&self.config, &[spec.topic.as_str(), &retry, &dlq, &invalid]).await?;
        let context = GroupContext::default();
        let membership = Arc::clone(&context.membership);
        let mut client = self.config.client_with(&[
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "1000"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "10000"),
            // The retry topic is usually empty; brokers that hold a fetch while
            // any of its partitions has no data (tansu) would otherwise slow the
            // main topic to one fetch per 500 ms.
            ("fetch.wait.max.ms", "100"),
        ]);
        // Not the user's to change: the group is the channel, and offsets are
        // stored only once a message is settled.
        client
            .set("group.id", &spec.channel)
            .set("enable.auto.offset.store", "false");
        let consumer: StreamConsumer<GroupContext> = client
            .create_with_context(context)
            .map_err(|e| transport("create the Kafka consumer", e))?;
        consumer
            .subscribe(&[spec.topic.as_str(), &retry])
            .map_err(|e| transport(&format!("subscribe to '{}'", spec.topic), e))?;
        let mut channel = KafkaChannel {
            consumer,
            producer: self.producer.clone(),
            retry,
            dlq,
            invalid,
            in_flight: HashMap::new(),
            next_tag: 0,
            paused: HashMap::new(),
            pending: None,
            offsets: HashMap::new(),
            membership,
            closed: false,
            unreadable: 0,
            auto_delete: spec.auto_delete.then(|| {
                (
                    self.config.clone(),
                    spec.topic.clone(),
                    spec.channel.clone(),
                )
            }),
        };
        // Join the group before returning, so messages sent after this are ours
        // (or a fellow member's) to read. A member given no partition (more
        // members than partitions) has joined all the same: it is a standby that
        // takes over partitions when another member leaves.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lock(&channel.membership).joined {
            if Instant::now() >= deadline {
                return Err(transport(
                    "join the consumer group",
                    format!(
                        "group '{}' did not take this member in within 30 s",
                        spec.channel
                    ),
                ));
            }
            if let Ok(next) =
                tokio::time::timeout(Duration::from_millis(100), channel.consumer.recv()).await
            {
                channel.pending = Some(next.map_err(|e| transport("consume", e))?.detach());
            }
            if channel.pending.is_some() {
                break;
            }
        }
        Ok(Box::new(channel))
    }
}

/// A consumer of one subscription's topic (and its retry topic) in its group.
pub struct KafkaChannel {
    consumer: StreamConsumer<GroupContext>,
    producer: KafkaProducer,
    retry: String,
    dlq: String,
    invalid: String,
    /// tag -> where a delivered, unsettled message was read.
    in_flight: HashMap<u64, Position>,
    next_tag: u64,
    /// Retry partitions paused until their head message is due.
    paused: HashMap<i32, Instant>,
    /// A message read while joining the group.
    pending: Option<OwnedMessage>,
    /// What is unsettled and settled per (topic, partition): the offset
    /// stored for commit is never past the lowest unsettled message.
    /// By topic, then partition (looked up with a borrowed topic).
    offsets: HashMap<String, HashMap<i32, Offsets>>,
    /// The member's assignment, from the rebalance callbacks.
    membership: Arc<Mutex<Membership>>,
    closed: bool,
    /// Unreadable messages moved to the invalid-message channel, not yet reported.
    unreadable: u64,
    /// For an auto-delete channel: what `close` removes (topic and group).
    auto_delete: Option<(KafkaConfig, String, String)>,
}

impl std::fmt::Debug for KafkaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaChannel")
            .field("retry", &self.retry)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

fn header_value(message: &OwnedMessage, key: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The brighter message in a Kafka record; tolerant of foreign producers (the
/// record key is the partition key, the record's topic the topic).
pub fn decode_record(record: &OwnedMessage) -> Result<Message, Error> {
    let pairs: Vec<(String, Vec<u8>)> = record
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let key = record
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    let header = wire::decode(pairs, |name| match name {
        wire::TOPIC => Some(record.topic().to_owned()),
        wire::PARTITION_KEY => key.clone(),
        _ => None,
    })?;
    Ok(Message::new(
        header,
        record.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    ))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl KafkaChannel {
    fn partition_list(topic: &str, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        tpl
    }

    fn resume_due(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        let due: Vec<i32> = self
            .paused
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| *p)
            .collect();
        for partition in due {
            self.paused.remove(&partition);
            self.consumer
                .resume(&Self::partition_list(&self.retry, partition))
                .map_err(|e| transport("resume a retry partition", e))?;
        }
        Ok(())
    }

    /// The offsets of `position`'s partition, started afresh when the
    /// partition was assigned again since they were last used.
    fn offsets(&mut self, position: &Position) -> &mut Offsets {
        if !self.offsets.contains_key(&position.topic) {
            self.offsets.insert(position.topic.clone(), HashMap::new());
        }
        let offsets = self
            .offsets
            .get_mut(&position.topic)
            .expect("the topic's entry was made above")
            .entry(position.partition)
            .or_default();
        if offsets.generation != position.generation {
            *offsets = Offsets {
                generation: position.generation,
                ..Offsets::default()
            };
        }
        offsets
    }

    /// The message at `position` is being handed out (or will be read again).
    fn unsettled(&mut self, position: &Position) {
        self.offsets(position).unsettled.insert(position.offset);
    }

    /// Marks the message at `position` settled and stores, for librdkafka's
    /// auto-commit (every second and on rebalance) and for `close`, the offset
    /// a restart must read from: never past a message still unsettled.
    fn store(&mut self, position: &Position) -> Result<(), Error> {
        let offsets = self.offsets(position);
        offsets.unsettled.remove(&position.offset);
        offsets.next = Some(
            offsets
                .next
                .map_or(position.offset + 1, |n| n.max(position.offset + 1)),
        );
        let Some(point) = offsets.commit_point() else {
            return Ok(());
        };
        if offsets.stored.is_some_and(|stored| stored >= point) {
            return Ok(());
        }
        offsets.stored = Some(point);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&position.topic, position.partition, Offset::Offset(point))
            .map_err(|e| transport("store the consumed offset", e))?;
        self.consumer
            .store_offsets(&tpl)
            .map_err(|e| transport("store the consumed offset", e))
    }

    fn generation(&self) -> u64 {
        lock(&self.membership).generation
    }

    /// Takes `delivery` out of the in-flight set; `None` when its partition was
    /// revoked since it was read: the partition's new owner reads it again, so
    /// this member must neither store its offset nor move it anywhere.
    fn take(&mut self, delivery: &Delivery) -> Result<Option<Position>, Error> {
        let position = self.in_flight.remove(&delivery.tag).ok_or_else(|| {
            transport(
                "settle",
                format!(
                    "delivery {} is not in flight (already settled?)",
                    delivery.tag
                ),
            )
        })?;
        if lock(&self.membership).owns(&position.topic, position.partition, position.generation) {
            Ok(Some(position))
        } else {
            tracing::info!(
                topic = %position.topic,
                partition = position.partition,
                offset = position.offset,
                "partition revoked while its message was in hand; its new owner reads it again"
            );
            Ok(None)
        }
    }

    /// Sends `message` to `topic` with `extra` headers and the origin of the
    /// delivery, then stores the delivery's offset.
    async fn forward(
        &mut self,
        delivery: &Delivery,
        topic: String,
        mut extra: Vec<(&str, String)>,
    ) -> Result<(), Error> {
        let Some(position) = self.take(delivery)? else {
            return Ok(());
        };
        extra.push((ORIGINAL_TOPIC, position.topic.clone()));
        extra.push((ORIGINAL_PARTITION, position.partition.to_string()));
        extra.push((ORIGINAL_OFFSET, position.offset.to_string()));
        for (_, value) in &mut extra {
            let bounded = wire::bounded_reason(value).len();
            value.truncate(bounded);
        }
        match self
            .producer
            .send_to(&topic, &delivery.message, &extra)
            .await
        {
            Err(Error::Refused { reason }) => {
                // The copy is over the size limit where the original was not
                // (its headers re-encoded, plus ours): send the body with the
                // framework's header fields only, and say what was left out.
                tracing::warn!(%topic, id = %delivery.message.id(), %reason, "copy too large; sending it without its header bag");
                let mut minimal = delivery.message.clone();
                let dropped = minimal.header.bag.len();
                minimal.header.bag.clear();
                extra.push((wire::HEADERS_DROPPED, dropped.to_string()));
                self.producer.send_to(&topic, &minimal, &extra).await?;
            }
            sent => sent?,
        }
        self.store(&position)
    }

    /// Handles a record: `Some` to hand to the pump, `None` when it was dealt
    /// with here (unreadable, or a retry not yet due). One function: the
    /// record's position is taken once and every path settles or hands it on.
    async fn accept(&mut self, record: OwnedMessage) -> Result<Option<Delivery>, Error> {
        let (topic, partition, offset) = (
            record.topic().to_owned(),
            record.partition(),
            record.offset(),
        );
        let position = Position {
            topic: topic.clone(),
            partition,
            offset,
            generation: self.generation(),
        };
        let message = match decode_record(&record) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(%topic, partition, offset, error = %e, "unreadable record moved to the invalid-message topic");
                let mut raw = brighter_core::MessageHeader::new(
                    topic.clone(),
                    brighter_core::MessageType::Document,
                );
                raw.content_type = "application/octet-stream".into();
                let body = record.payload().map(<[u8]>::to_vec).unwrap_or_default();
                let extra = vec![
                    (wire::INVALID_REASON, e.to_string()),
                    (ORIGINAL_TOPIC, topic.clone()),
                    (ORIGINAL_PARTITION, partition.to_string()),
                    (ORIGINAL_OFFSET, offset.to_string()),
                ];
                self.producer
                    .send_to(&self.invalid, &Message::new(raw, body), &extra)
                    .await?;
                self.unsettled(&position);
                self.store(&position)?;
                self.unreadable += 1;
                return Ok(None);
            }
        };
        if topic == self.retry {
            let due = header_value(&record, NOT_BEFORE)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            let mut wait = due.saturating_sub(now_ms());
            if wait > i64::try_from(MAX_RETRY_WAIT.as_millis()).unwrap_or(i64::MAX) {
                tracing::warn!(%topic, partition, offset, due, "a retry record claims to be due more than {MAX_RETRY_WAIT:?} ahead; treated as due now");
                wait = 0;
            }
            if wait > 0 {
                // Not due: park this retry partition (the main topic keeps flowing)
                // and read this record again when it is.
                let tpl = Self::partition_list(&topic, partition);
                self.consumer
                    .pause(&tpl)
                    .map_err(|e| transport("pause a retry partition", e))?;
                self.consumer
                    .seek(
                        &topic,
                        partition,
                        Offset::Offset(offset),
                        Duration::from_secs(5),
                    )
                    .map_err(|e| transport("seek a retry partition", e))?;
                let wait = Duration::from_millis(u64::try_from(wait).unwrap_or(0));
                self.paused.insert(partition, Instant::now() + wait);
                return Ok(None);
            }
        }
        self.next_tag += 1;
        self.unsettled(&position);
        self.in_flight.insert(self.next_tag, position);
        Ok(Some(Delivery {
            message,
            tag: self.next_tag,
        }))
    }
}

#[async_trait]
impl Channel for KafkaChannel {
    fn system(&self) -> &'static str {
        "kafka"
    }

    async fn receive(&mut self, timeout: Duration) -> Result<Option<Delivery>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            self.resume_due()?;
            if let Some(record) = self.pending.take() {
                if let Some(delivery) = self.accept(record).await? {
                    return Ok(Some(delivery));
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wake = self
                .paused
                .values()
                .min()
                .map_or(deadline, |at| (*at).min(deadline));
            match tokio::time::timeout(wake.saturating_duration_since(now), self.consumer.recv())
                .await
            {
                Err(_elapsed) => {}
                Ok(Err(e)) => return Err(transport("consume", e)),
                Ok(Ok(record)) => {
                    let record = record.detach();
                    if let Some(delivery) = self.accept(record).await? {
                        return Ok(Some(delivery));
                    }
                }
            }
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), Error> {
        match self.take(delivery)? {
            Some(position) => self.store(&position),
            None => Ok(()),
        }
    }

    async fn requeue(&mut self, delivery: Delivery, delay: Duration) -> Result<(), Error> {
        let delay = delay.min(MAX_RETRY_WAIT);
        let due = now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        let retry = self.retry.clone();
        self.forward(&delivery, retry, vec![(NOT_BEFORE, due.to_string())])
            .await
    }

    async fn reject(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error> {
        let dlq = self.dlq.clone();
        self.forward(
            &delivery,
            dlq,
            vec![(wire::DEAD_LETTER_REASON, reason.to_owned())],
        )
        .await
    }

    async fn invalid(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error> {
        let invalid = self.invalid.clone();
        self.forward(
            &delivery,
            invalid,
            vec![(wire::INVALID_REASON, reason.to_owned())],
        )
        .await
    }

    fn take_unreadable(&mut self) -> u64 {
        std::mem::take(&mut self.unreadable)
    }

    async fn nack(&mut self, delivery: Delivery) -> Result<(), Error> {
        // Read it (and what follows in its partition) again; it stays
        // unsettled, so nothing after it is stored meanwhile.
        let Some(position) = self.take(&delivery)? else {
            return Ok(());
        };
        self.consumer
            .seek(
                &position.topic,
                position.partition,
                Offset::Offset(position.offset),
                Duration::from_secs(5),
            )
            .map_err(|e| transport("seek back for redelivery", e))
    }

    async fn close(&mut self) -> Result<(), Error> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        // Commit exactly what was settled (not the consumer's position, which
        // includes fetched messages nobody handled); the rest is read again.
        // Only partitions this member still owns: a partition revoked in a
        // rebalance may have moved on under its new owner, and committing what
        // this member settled before would move the group's offset back.
        let owned: Vec<(&str, i32, i64)> = {
            let membership = lock(&self.membership);
            self.offsets
                .iter()
                .flat_map(|(topic, partitions)| {
                    partitions
                        .iter()
                        .map(move |(partition, offsets)| (topic.as_str(), *partition, offsets))
                })
                .filter(|(topic, partition, offsets)| {
                    membership.owns(topic, *partition, offsets.generation)
                })
                .filter_map(|(topic, partition, offsets)| {
                    offsets
                        .commit_point()
                        .map(|point| (topic, partition, point))
                })
                .collect()
        };
        if !owned.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (topic, partition, next) in owned {
                tpl.add_partition_offset(topic, partition, Offset::Offset(next))
                    .map_err(|e| transport("build the commit list", e))?;
            }
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "committing settled offsets on close failed; they are read again");
            }
        }
        // Dropping the consumer closes it: it leaves the group and the rest of the
        // group takes over its partitions.
        if let Some((config, topic, group)) = self.auto_delete.take() {
            // Leaves the group, so that it can be deleted: the leave happens
            // while the consumer is polled.
            self.consumer.unsubscribe();
            let _ = tokio::time::timeout(Duration::from_millis(500), self.consumer.recv()).await;
            // A private channel (a call's replies): nobody else reads it, so
            // its topics and group go with it.
            let topics = [
                topic.as_str(),
                self.retry.as_str(),
                self.dlq.as_str(),
                self.invalid.as_str(),
            ];
            if let Err(e) = delete_topics_and_group(&config, &topics, &group).await {
                tracing::warn!(error = %e, %group, "could not remove the private channel's topics and group");
            }
        }
        Ok(())
    }
}
