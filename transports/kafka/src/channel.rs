//! [`KafkaChannelFactory`] and [`KafkaChannel`]: a consumer in a group with
//! manual offsets. An offset is stored only after its message's outcome is
//! settled and committed by librdkafka on a timer, on rebalance and on close.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::{Channel, ChannelFactory, ChannelSpec, Delivery, Error, Message, wire};
use futures::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::time::Instant;

use crate::admin::{delete_topics_and_group, ensure_topics, transport};
use crate::config::KafkaConfig;
use crate::producer::KafkaProducer;
use crate::record_headers::{self, RecordHeaders};

/// Header of a message on a retry tier: when its wait on this tier ends (ms
/// since the epoch).
pub const NOT_BEFORE: &str = "x-brighter-not-before";

/// Header of a message on a retry tier: when it is due back to the
/// subscription (ms since the epoch). Without it, it is due at [`NOT_BEFORE`].
pub const DUE: &str = "x-brighter-due";

/// The retry tiers of a channel, shortest first: a deferred message waits on
/// tier topics of fixed waits (each `<channel>.retry.<seconds>s`) that sum to
/// its delay, the longest that fits first, then comes back to the
/// subscription. A delay is rounded up to whole seconds, so every message on
/// a tier waits the same time: a tier's partitions are in due order and no
/// long delay holds back a short one. A delay of up to [`MAX_RETRY_WAIT`]
/// takes at most 3 hops per tier; each hop costs a produce and a fetch.
pub const RETRY_TIERS: [Duration; 9] = [
    Duration::from_secs(1),
    Duration::from_secs(4),
    Duration::from_secs(16),
    Duration::from_secs(64),
    Duration::from_secs(256),
    Duration::from_secs(1024),
    Duration::from_secs(4096),
    Duration::from_secs(16384),
    Duration::from_secs(65536),
];

/// The tier a message with `remaining` to wait goes to next, and its wait
/// there: the longest tier that fits, or the shortest for a rest under it.
fn tier_for(remaining: Duration) -> (usize, Duration) {
    match RETRY_TIERS.iter().rposition(|tier| *tier <= remaining) {
        Some(i) => (i, RETRY_TIERS[i]),
        None => (0, remaining),
    }
}

/// A tier record whose wait ends within this is held in the channel until
/// then; a longer wait pauses its partition.
const SOON: Duration = Duration::from_secs(1);

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

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

/// Where a delivered message was read (its partition's slot in
/// [`Partitions`]), and in which generation of the member's assignment.
#[derive(Debug, Clone, Copy)]
struct Position {
    slot: usize,
    offset: i64,
    generation: u64,
}

/// The offsets of one partition this member has read in one generation of its
/// assignment.
#[derive(Debug, Default)]
struct Offsets {
    generation: u64,
    /// Offsets handed out (or sent back for redelivery) and not settled yet,
    /// ascending: usually none or one, as a performer settles each message
    /// before it takes the next.
    unsettled: Vec<i64>,
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

    fn insert(&mut self, offset: i64) {
        if let Err(at) = self.unsettled.binary_search(&offset) {
            self.unsettled.insert(at, offset);
        }
    }

    fn remove(&mut self, offset: i64) {
        if let Ok(at) = self.unsettled.binary_search(&offset) {
            self.unsettled.remove(at);
        }
    }
}

/// One partition this channel has read from, kept for the channel's life so
/// that nothing per message is looked up by name or allocated: its offsets,
/// a one-element list to store them with, whether it is a retry tier, and
/// in which generation the member last found it owned.
struct Slot {
    topic: Arc<str>,
    partition: i32,
    /// Its index in the channel's tiers, for a retry tier partition.
    tier: Option<usize>,
    offsets: Offsets,
    store_list: TopicPartitionList,
    owned_in: Option<u64>,
}

/// The partitions a channel has read from, found by topic and partition
/// with the last one found tried first (a backlog comes a partition at a time).
#[derive(Default)]
struct Partitions {
    slots: Vec<Slot>,
    last: usize,
    /// Tier topic -> its index in the channel's tiers.
    tier_of: HashMap<String, usize>,
}

impl Partitions {
    fn find(&mut self, topic: &str, partition: i32) -> usize {
        if let Some(slot) = self.slots.get(self.last)
            && slot.partition == partition
            && &*slot.topic == topic
        {
            return self.last;
        }
        let found = self
            .slots
            .iter()
            .position(|s| s.partition == partition && &*s.topic == topic);
        self.last = found.unwrap_or_else(|| {
            let mut store_list = TopicPartitionList::with_capacity(1);
            store_list.add_partition(topic, partition);
            self.slots.push(Slot {
                topic: Arc::from(topic),
                partition,
                tier: self.tier_of.get(topic).copied(),
                offsets: Offsets::default(),
                store_list,
                owned_in: None,
            });
            self.slots.len() - 1
        });
        self.last
    }

    /// The offsets of `position`'s partition, started afresh when the
    /// partition was assigned again since they were last used.
    fn offsets(&mut self, position: &Position) -> &mut Offsets {
        let offsets = &mut self.slots[position.slot].offsets;
        if offsets.generation != position.generation {
            *offsets = Offsets {
                generation: position.generation,
                ..Offsets::default()
            };
        }
        offsets
    }
}

/// Opens [`KafkaChannel`]s. A subscription's channel name is its consumer group;
/// prefetching is librdkafka's (tune `queued.min.messages` and
/// `queued.max.messages.kbytes` through [`KafkaConfig::set`]); the subscription's
/// buffer size does not apply, as capping librdkafka's queue starves its fetcher.
/// It also gets the retry tiers `<channel>.retry.<seconds>s` (deferred
/// messages, see [`RETRY_TIERS`]), `<channel>.dlq` and `<channel>.invalid`,
/// created with the subscription's topic when missing: 12 topics per
/// channel, whatever the delays.
#[derive(Debug, Clone)]
pub struct KafkaChannelFactory {
    config: KafkaConfig,
    producer: KafkaProducer,
    lag_clients: LagClients,
}

/// One client per consumer group whose lag is asked for, made on the first
/// ask: it reads the group's committed offsets without joining it.
#[derive(Clone, Default)]
struct LagClients(Arc<Mutex<HashMap<String, Arc<BaseConsumer>>>>);

impl std::fmt::Debug for LagClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagClients").finish_non_exhaustive()
    }
}

impl LagClients {
    fn client(&self, config: &KafkaConfig, group: &str) -> Result<Arc<BaseConsumer>, Error> {
        let mut clients = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(group) {
            return Ok(Arc::clone(client));
        }
        let client: BaseConsumer = config
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| transport("create a Kafka client for the lag", e))?;
        let client = Arc::new(client);
        clients.insert(group.to_owned(), Arc::clone(&client));
        Ok(client)
    }
}

/// How far `group`'s committed offsets are behind `topic`'s high watermarks,
/// over every partition (from the low watermark where it committed none).
fn group_lag(client: &BaseConsumer, topic: &str) -> Result<u64, Error> {
    let timeout = Duration::from_secs(5);
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| transport("read a topic's metadata", e))?;
    let mut partitions = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            partitions.add_partition(topic, p.id());
        }
    }
    let committed = client
        .committed_offsets(partitions.clone(), timeout)
        .map_err(|e| transport("read a group's committed offsets", e))?;
    let mut lag = 0u64;
    for element in partitions.elements() {
        let (low, high) = client
            .fetch_watermarks(topic, element.partition(), timeout)
            .map_err(|e| transport("read a partition's watermarks", e))?;
        let from = match committed
            .find_partition(topic, element.partition())
            .map(|e| e.offset())
        {
            Some(Offset::Offset(offset)) => offset.max(low),
            _ => low,
        };
        lag += u64::try_from(high.saturating_sub(from)).unwrap_or(0);
    }
    Ok(lag)
}

impl KafkaChannelFactory {
    /// Channels with `config`; `producer` sends retries and dead letters.
    pub fn new(config: KafkaConfig, producer: KafkaProducer) -> Self {
        KafkaChannelFactory {
            config,
            producer,
            lag_clients: LagClients::default(),
        }
    }

    /// The retry tier topic of channel (group) `channel` whose wait is `tier`.
    pub fn retry_topic(channel: &str, tier: Duration) -> String {
        format!("{channel}.retry.{}s", tier.as_secs())
    }

    /// Every topic a channel (group) `channel` of `topic` reads or writes:
    /// `topic`, its dead-letter and invalid-message topics and its retry
    /// tiers; what to create ahead (see [`ensure_topics`](crate::ensure_topics)).
    pub fn channel_topics(topic: &str, channel: &str) -> Vec<String> {
        let mut topics = vec![
            topic.to_owned(),
            Self::dead_letter_topic(channel),
            Self::invalid_message_topic(channel),
        ];
        topics.extend(Self::retry_topics(channel));
        topics
    }

    /// Every retry tier topic of channel (group) `channel`, shortest first.
    pub fn retry_topics(channel: &str) -> Vec<String> {
        RETRY_TIERS
            .iter()
            .map(|tier| Self::retry_topic(channel, *tier))
            .collect()
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
    /// The membership's generation, for reading without the lock.
    generation: Arc<AtomicU64>,
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
            self.generation
                .store(membership.generation, Ordering::Release);
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
    async fn lag(&self, spec: &ChannelSpec) -> Result<Option<u64>, Error> {
        let client = self.lag_clients.client(&self.config, &spec.channel)?;
        let topic = spec.topic.clone();
        tokio::task::spawn_blocking(move || group_lag(&client, &topic))
            .await
            .map_err(|e| transport("read the lag", e))?
            .map(Some)
    }

    fn endpoint(&self) -> Option<brighter_core::Endpoint> {
        Some(self.config.endpoint())
    }

    // One function: topics, the consumer's settings, the subscription and the
    // join follow each other and share the consumer being built.
    async fn create_channel(&self, spec: &ChannelSpec) -> Result<Box<dyn Channel>, Error> {
        let tiers = Self::retry_topics(&spec.channel);
        let dlq = Self::dead_letter_topic(&spec.channel);
        let invalid = Self::invalid_message_topic(&spec.channel);
        let topics = Self::channel_topics(&spec.topic, &spec.channel);
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        ensure_topics(&self.config, &topics).await?;
        let subscribed: Vec<&str> = std::iter::once(spec.topic.as_str())
            .chain(tiers.iter().map(String::as_str))
            .collect();
        let context = GroupContext::default();
        let membership = Arc::clone(&context.membership);
        let generation = Arc::clone(&context.generation);
        let mut client = self.config.client_with(&[
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "1000"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "10000"),
            // The retry tiers are usually empty; brokers that hold a fetch while
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
            .subscribe(&subscribed)
            .map_err(|e| transport(&format!("subscribe to '{}'", spec.topic), e))?;
        let mut channel = KafkaChannel {
            consumer,
            producer: self.producer.clone(),
            partitions: Partitions {
                tier_of: tiers
                    .iter()
                    .enumerate()
                    .map(|(i, topic)| (topic.clone(), i))
                    .collect(),
                ..Partitions::default()
            },
            tiers,
            dlq,
            invalid,
            in_flight: Vec::new(),
            next_tag: 0,
            paused: HashMap::new(),
            waiting: HashMap::new(),
            pending: None,
            membership,
            generation,
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

/// A consumer of one subscription's topic (and its retry tiers) in its group.
pub struct KafkaChannel {
    /// What is unsettled and settled per partition read: the offset stored
    /// for commit is never past the lowest unsettled message. Before the
    /// consumer, so it drops first: its offset lists hold references into
    /// the client (librdkafka's toppars), which destroying the consumer
    /// waits for.
    partitions: Partitions,
    consumer: StreamConsumer<GroupContext>,
    producer: KafkaProducer,
    /// The retry tier topics, shortest first.
    tiers: Vec<String>,
    dlq: String,
    invalid: String,
    /// tag -> where a delivered, unsettled message was read (one or none
    /// while a performer settles each message before it takes the next).
    in_flight: Vec<(u64, Position)>,
    next_tag: u64,
    /// Retry tier partitions paused until their head message's wait ends.
    paused: HashMap<(String, i32), Instant>,
    /// Records of retry tier partitions whose wait ends within [`SOON`], held
    /// here in partition order (unsettled, so no offset passes them) rather
    /// than paying a pause, a seek and a fetch each.
    waiting: HashMap<(String, i32), std::collections::VecDeque<(Instant, OwnedMessage)>>,
    /// A record taken from the consumer and not handed out yet: read while
    /// joining the group, or by `try_receive` when it goes the long way.
    pending: Option<OwnedMessage>,
    /// The member's assignment, from the rebalance callbacks.
    membership: Arc<Mutex<Membership>>,
    /// The assignment's generation, read per message without the lock.
    generation: Arc<AtomicU64>,
    closed: bool,
    /// Unreadable messages moved to the invalid-message channel, not yet reported.
    unreadable: u64,
    /// For an auto-delete channel: what `close` removes (topic and group).
    auto_delete: Option<(KafkaConfig, String, String)>,
}

impl std::fmt::Debug for KafkaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaChannel")
            .field("tiers", &self.tiers.len())
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

/// The brighter message in a Kafka record (borrowed from the consumer or
/// owned); tolerant of foreign producers (the record key is the partition
/// key, the record's topic the topic). Reads the headers in place: only the
/// header fields and the body are copied out.
pub fn decode_record<M>(record: &M) -> Result<Message, Error>
where
    M: rdkafka::Message,
    M::Headers: RecordHeaders,
{
    decode_record_of(record, record.topic())
}

/// [`decode_record`] given the record's topic, which librdkafka spells out
/// anew (a length and a UTF-8 check) each time it is asked.
fn decode_record_of<M>(record: &M, topic: &str) -> Result<Message, Error>
where
    M: rdkafka::Message,
    M::Headers: RecordHeaders,
{
    // A name that is not UTF-8 (a client writing bytes) names none of ours:
    // the codec keeps it in the bag under its lossy text.
    let pairs =
        record_headers::pairs(record).map(|(name, value)| (name, value.unwrap_or_default()));
    let header = wire::decode_borrowed(pairs, |name| match name {
        wire::TOPIC => Some(Cow::Borrowed(topic)),
        wire::PARTITION_KEY => record.key().map(String::from_utf8_lossy),
        _ => None,
    })?;
    Ok(Message::new(
        header,
        record.payload().unwrap_or_default().to_vec(),
    ))
}

/// A record just taken from the consumer, read in place when it is of the
/// subscription's own topic and readable: its partition's slot, its offset
/// and its message. Else (a retry tier's record, or one that cannot be read)
/// it is copied out, to go the long way ([`KafkaChannel::accept`]).
fn read_in_place(
    partitions: &mut Partitions,
    record: BorrowedMessage<'_>,
) -> Result<(usize, i64, Message), OwnedMessage> {
    let topic = record.topic();
    let slot = partitions.find(topic, record.partition());
    if partitions.slots[slot].tier.is_none()
        && let Ok(message) = decode_record_of(&record, topic)
    {
        let offset = record.offset();
        // Let go of here, as it holds the consumer borrowed.
        drop(record);
        return Ok((slot, offset, message));
    }
    Err(record.detach())
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
        let due: Vec<(String, i32)> = self
            .paused
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for (topic, partition) in due {
            self.paused.remove(&(topic.clone(), partition));
            self.consumer
                .resume(&Self::partition_list(&topic, partition))
                .map_err(|e| transport("resume a retry partition", e))?;
        }
        Ok(())
    }

    /// The headers saying where the message at `position` was read, for a
    /// forwarded copy.
    fn origin(&self, position: &Position) -> [(&'static str, String); 3] {
        let slot = &self.partitions.slots[position.slot];
        [
            (ORIGINAL_TOPIC, slot.topic.to_string()),
            (ORIGINAL_PARTITION, slot.partition.to_string()),
            (ORIGINAL_OFFSET, position.offset.to_string()),
        ]
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Where a record of `topic`'s `partition` at `offset` is, now.
    fn position(&mut self, topic: &str, partition: i32, offset: i64) -> Position {
        Position {
            slot: self.partitions.find(topic, partition),
            offset,
            generation: self.generation(),
        }
    }

    /// The message at `position` is being handed out (or will be read again).
    fn unsettled(&mut self, position: &Position) {
        self.partitions.offsets(position).insert(position.offset);
    }

    /// Marks the message at `position` settled and stores, for librdkafka's
    /// auto-commit (every second and on rebalance) and for `close`, the offset
    /// a restart must read from: never past a message still unsettled.
    fn store(&mut self, position: &Position) -> Result<(), Error> {
        let offsets = self.partitions.offsets(position);
        offsets.remove(position.offset);
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
        let list = &mut self.partitions.slots[position.slot].store_list;
        list.set_all_offsets(Offset::Offset(point))
            .map_err(|e| transport("store the consumed offset", e))?;
        self.consumer
            .store_offsets(list)
            .map_err(|e| transport("store the consumed offset", e))
    }

    /// Whether this member still owns the partition of `position` in the
    /// generation it was read in. The membership is asked once per partition
    /// and generation; a revocation changes the generation.
    fn owns(&mut self, position: &Position) -> bool {
        if self.generation() != position.generation {
            return false;
        }
        let slot = &mut self.partitions.slots[position.slot];
        if slot.owned_in == Some(position.generation) {
            return true;
        }
        let owned = lock(&self.membership).owns(&slot.topic, slot.partition, position.generation);
        if owned {
            slot.owned_in = Some(position.generation);
        }
        owned
    }

    /// Takes `delivery` out of the in-flight set; `None` when its partition was
    /// revoked since it was read: the partition's new owner reads it again, so
    /// this member must neither store its offset nor move it anywhere.
    fn take(&mut self, delivery: &Delivery) -> Result<Option<Position>, Error> {
        let at = self
            .in_flight
            .iter()
            .position(|(tag, _)| *tag == delivery.tag)
            .ok_or_else(|| {
                transport(
                    "settle",
                    format!(
                        "delivery {} is not in flight (already settled?)",
                        delivery.tag
                    ),
                )
            })?;
        let (_, position) = self.in_flight.swap_remove(at);
        if self.owns(&position) {
            Ok(Some(position))
        } else {
            let slot = &self.partitions.slots[position.slot];
            tracing::info!(
                topic = %slot.topic,
                partition = slot.partition,
                offset = position.offset,
                "partition revoked while its message was in hand; its new owner reads it again"
            );
            Ok(None)
        }
    }

    /// [`hand_out`](Self::hand_out) of a message [`read_in_place`], in the
    /// current generation.
    fn hand_out_read(&mut self, slot: usize, offset: i64, message: Message) -> Delivery {
        let position = Position {
            slot,
            offset,
            generation: self.generation(),
        };
        self.hand_out(position, message)
    }

    /// Acknowledges `delivery`: its offset is stored (locally, in the
    /// client) once nothing before it is unsettled.
    fn settle_ack(&mut self, delivery: &Delivery) -> Result<(), Error> {
        match self.take(delivery)? {
            Some(position) => self.store(&position),
            None => Ok(()),
        }
    }

    /// Hands out `message`, read at `position`.
    fn hand_out(&mut self, position: Position, message: Message) -> Delivery {
        self.next_tag += 1;
        self.unsettled(&position);
        self.in_flight.push((self.next_tag, position));
        Delivery::new(message, self.next_tag)
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
        extra.extend(self.origin(&position));
        self.send_copy(&topic, &delivery.message, extra).await?;
        self.store(&position)
    }

    /// Sends a copy of `message` to `topic` with `extra` headers (bounded).
    async fn send_copy(
        &self,
        topic: &str,
        message: &Message,
        mut extra: Vec<(&str, String)>,
    ) -> Result<(), Error> {
        for (_, value) in &mut extra {
            let bounded = wire::bounded_reason(value).len();
            value.truncate(bounded);
        }
        match self.producer.send_to(topic, message, &extra).await {
            Err(Error::Refused { reason }) => {
                // The copy is over the size limit where the original was not
                // (its headers re-encoded, plus ours): send the body with the
                // framework's header fields only, and say what was left out.
                tracing::warn!(%topic, id = %message.id(), %reason, "copy too large; sending it without its header bag");
                let mut minimal = message.clone();
                let dropped = minimal.header.bag.len();
                minimal.header.bag.clear();
                extra.push((wire::HEADERS_DROPPED, dropped.to_string()));
                self.producer.send_to(topic, &minimal, &extra).await
            }
            sent => sent,
        }
    }

    /// Sends `message`, due at `due` (ms since the epoch), to the retry tier
    /// its remaining wait calls for, with `extra` headers of its origin.
    async fn to_tier(
        &self,
        message: &Message,
        due: i64,
        mut extra: Vec<(&str, String)>,
    ) -> Result<(), Error> {
        let now = now_ms();
        let remaining = Duration::from_millis(u64::try_from(due.saturating_sub(now)).unwrap_or(0));
        let (tier, wait) = tier_for(remaining);
        extra.push((NOT_BEFORE, now.saturating_add(millis(wait)).to_string()));
        extra.push((DUE, due.to_string()));
        self.send_copy(&self.tiers[tier], message, extra).await
    }

    /// Handles a record: `Some` to hand to the pump, `None` when it was dealt
    /// with here (unreadable, or a retry not yet due). One function: the
    /// record's position is taken once and every path settles or hands it on.
    /// Boxed: the long way's state stays out of `receive`'s future, which the
    /// common case (a record of the subscription's topic) moves per message.
    fn accept(
        &mut self,
        record: OwnedMessage,
    ) -> futures::future::BoxFuture<'_, Result<Option<Delivery>, Error>> {
        Box::pin(self.accept_record(record, false))
    }

    /// The next held tier record whose wait is over, if any.
    fn take_waiting(&mut self) -> Option<OwnedMessage> {
        let now = Instant::now();
        let key = self
            .waiting
            .iter()
            .find(|(_, queue)| queue.front().is_some_and(|(at, _)| *at <= now))
            .map(|(key, _)| key.clone())?;
        let queue = self.waiting.get_mut(&key)?;
        let (_, record) = queue.pop_front()?;
        if queue.is_empty() {
            self.waiting.remove(&key);
        }
        Some(record)
    }

    /// [`accept`](Self::accept); `held`: the record comes from `waiting`, its
    /// wait over, or its partition's order is kept by the queue.
    async fn accept_record(
        &mut self,
        record: OwnedMessage,
        held: bool,
    ) -> Result<Option<Delivery>, Error> {
        let (topic, partition, offset) = (
            record.topic().to_owned(),
            record.partition(),
            record.offset(),
        );
        let position = self.position(&topic, partition, offset);
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
        if self.partitions.slots[position.slot].tier.is_some() {
            // A time read from a record that lies further ahead than any
            // wait (a foreign or corrupt header) counts as now: a paused
            // tier partition holds everything behind its head.
            let now = now_ms();
            let time = |key: &str| {
                let at = record_headers::value(&record, key).and_then(|v| v.parse::<i64>().ok())?;
                if at.saturating_sub(now) > millis(MAX_RETRY_WAIT) {
                    tracing::warn!(%topic, partition, offset, at, "a retry record claims a time more than {MAX_RETRY_WAIT:?} ahead; treated as now");
                    return Some(now);
                }
                Some(at)
            };
            let not_before = time(NOT_BEFORE).unwrap_or(0);
            let wait = not_before.saturating_sub(now);
            let key = (topic.clone(), partition);
            let wait_for = Duration::from_millis(u64::try_from(wait).unwrap_or(0));
            if held && !self.owns(&position) {
                // Revoked while held: its new owner reads it again.
                return Ok(None);
            }
            if !held && (self.waiting.contains_key(&key) || (wait > 0 && wait_for <= SOON)) {
                // Behind a held record of its partition, or due soon: held in
                // order, unsettled, and handled when its wait is over.
                self.unsettled(&position);
                self.waiting
                    .entry(key)
                    .or_default()
                    .push_back((Instant::now() + wait_for, record));
                return Ok(None);
            }
            if held && wait > 0 && wait_for <= SOON {
                // The clocks' rounding: back to the head of its queue.
                self.waiting
                    .entry(key)
                    .or_default()
                    .push_front((Instant::now() + wait_for, record));
                return Ok(None);
            }
            if wait > 0 {
                // Held ones behind it are read again after the seek.
                self.waiting.remove(&key);
                // Its wait on this tier is not over: pause this tier partition
                // (the main topic and the other tiers keep flowing) and read
                // the record again when it is.
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
                self.paused.insert(key, Instant::now() + wait_for);
                return Ok(None);
            }
            let due = time(DUE).unwrap_or(not_before);
            if due > now {
                // More to wait: on to the next tier, keeping where it came from.
                let extra: Vec<(&str, String)> =
                    [ORIGINAL_TOPIC, ORIGINAL_PARTITION, ORIGINAL_OFFSET]
                        .into_iter()
                        .filter_map(|key| record_headers::value(&record, key).map(|v| (key, v)))
                        .collect();
                self.to_tier(&message, due, extra).await?;
                self.unsettled(&position);
                self.store(&position)?;
                return Ok(None);
            }
        }
        Ok(Some(self.hand_out(position, message)))
    }
}

#[async_trait]
impl Channel for KafkaChannel {
    fn system(&self) -> &'static str {
        "kafka"
    }

    async fn receive(&mut self, timeout: Duration) -> Result<Option<Delivery>, Error> {
        let mut deadline = None;
        loop {
            if !self.paused.is_empty() {
                self.resume_due()?;
            }
            if !self.waiting.is_empty()
                && let Some(record) = self.take_waiting()
            {
                if let Some(delivery) = Box::pin(self.accept_record(record, true)).await? {
                    return Ok(Some(delivery));
                }
                continue;
            }
            if let Some(record) = self.pending.take() {
                if let Some(delivery) = self.accept(record).await? {
                    return Ok(Some(delivery));
                }
                continue;
            }
            // A record already fetched is taken without arming a timer.
            let received = match self.consumer.recv().now_or_never() {
                Some(received) => received,
                None => {
                    let now = Instant::now();
                    let deadline = *deadline.get_or_insert(now + timeout);
                    if now >= deadline {
                        return Ok(None);
                    }
                    let wake = self
                        .paused
                        .values()
                        .chain(
                            self.waiting
                                .values()
                                .filter_map(|q| q.front().map(|(at, _)| at)),
                        )
                        .min()
                        .map_or(deadline, |at| (*at).min(deadline));
                    let wait = wake.saturating_duration_since(now);
                    match tokio::time::timeout(wait, self.consumer.recv()).await {
                        Err(_elapsed) => continue,
                        Ok(received) => received,
                    }
                }
            };
            let record = received.map_err(|e| transport("consume", e))?;
            match read_in_place(&mut self.partitions, record) {
                Ok((slot, offset, message)) => {
                    return Ok(Some(self.hand_out_read(slot, offset, message)));
                }
                Err(record) => {
                    if let Some(delivery) = self.accept(record).await? {
                        return Ok(Some(delivery));
                    }
                }
            }
        }
    }

    fn try_receive(&mut self) -> Option<Result<Delivery, Error>> {
        // What waits in the channel itself goes through `receive`.
        if !self.paused.is_empty() || !self.waiting.is_empty() || self.pending.is_some() {
            return None;
        }
        let record = match self.consumer.recv().now_or_never()? {
            Ok(record) => record,
            Err(e) => return Some(Err(transport("consume", e))),
        };
        match read_in_place(&mut self.partitions, record) {
            Ok((slot, offset, message)) => Some(Ok(self.hand_out_read(slot, offset, message))),
            Err(record) => {
                // The long way, which `receive` takes next.
                self.pending = Some(record);
                None
            }
        }
    }

    fn try_ack(&mut self, delivery: &Delivery) -> Option<Result<(), Error>> {
        Some(self.settle_ack(delivery))
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), Error> {
        self.settle_ack(delivery)
    }

    async fn requeue(&mut self, delivery: Delivery, delay: Duration) -> Result<(), Error> {
        let Some(position) = self.take(&delivery)? else {
            return Ok(());
        };
        // Whole seconds (never less than asked), so every hop is a full tier
        // wait, and one more millisecond for the clock's truncation.
        let seconds = delay.min(MAX_RETRY_WAIT).as_nanos().div_ceil(1_000_000_000);
        let wait = Duration::from_secs(u64::try_from(seconds).unwrap_or(u64::MAX));
        let due = now_ms().saturating_add(millis(wait)).saturating_add(1);
        let extra = self.origin(&position).to_vec();
        self.to_tier(&delivery.message, due, extra).await?;
        self.store(&position)
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
        let slot = &self.partitions.slots[position.slot];
        self.consumer
            .seek(
                &slot.topic,
                slot.partition,
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
            self.partitions
                .slots
                .iter()
                .filter(|slot| {
                    membership.owns(&slot.topic, slot.partition, slot.offsets.generation)
                })
                .filter_map(|slot| {
                    slot.offsets
                        .commit_point()
                        .map(|point| (&*slot.topic, slot.partition, point))
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
            let mut topics = vec![topic.as_str(), self.dlq.as_str(), self.invalid.as_str()];
            topics.extend(self.tiers.iter().map(String::as_str));
            if let Err(e) = delete_topics_and_group(&config, &topics, &group).await {
                tracing::warn!(error = %e, %group, "could not remove the private channel's topics and group");
            }
        }
        Ok(())
    }
}
