//! The Kafka transport against a real broker (`KAFKA_BROKERS`, default
//! 127.0.0.1:9092; `scripts/test` starts Apache Kafka there): the conformance
//! suite, a consumer killed mid-batch, two consumers in one group, a 2 s defer
//! that does not stall its partition. Each test uses its own random topics.
//! What only a real group coordinator makes meaningful (rebalances, standbys,
//! multi-record batches) is in `tests/group.rs`.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::conformance::{Harness, unique_name};
use brighter_core::{
    Channel, ChannelFactory, ChannelSpec, Error, Message, MessageHeader, MessageType,
    ParkedMessage, Producer, wire,
};
use brighter_kafka::{
    KafkaChannelFactory, KafkaConfig, KafkaProducer, decode_record, ensure_topics,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::time::Instant;

fn config() -> KafkaConfig {
    // The producer's normal batching; on tansu, `from_env` sends one record per
    // batch (see `KafkaConfig::for_tansu`).
    KafkaConfig::from_env().topics(3, 1)
}

struct Kafka {
    config: KafkaConfig,
    producer: Arc<KafkaProducer>,
    factory: KafkaChannelFactory,
}

async fn kafka() -> Kafka {
    let config = config();
    let producer = KafkaProducer::new(config.clone()).unwrap();
    Kafka {
        factory: KafkaChannelFactory::new(config.clone(), producer.clone()),
        producer: Arc::new(producer),
        config,
    }
}

impl Kafka {
    /// Every message in `topic`, read from the beginning by a throwaway consumer.
    async fn read_all(&self, topic: &str) -> Result<Vec<ParkedMessage>, Error> {
        let consumer: StreamConsumer = self
            .config
            .client()
            .set("group.id", unique_name("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| Error::transport("reader", e))?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer
            .assign(&tpl)
            .map_err(|e| Error::transport("assign", e))?;
        let mut parked = Vec::new();
        while let Ok(Ok(record)) =
            tokio::time::timeout(Duration::from_millis(1500), consumer.recv()).await
        {
            let record = record.detach();
            let reason = record
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| {
                            h.key == wire::DEAD_LETTER_REASON || h.key == wire::INVALID_REASON
                        })
                        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                })
                .unwrap_or_default();
            parked.push(ParkedMessage {
                message: decode_record(&record)?,
                reason,
            });
        }
        Ok(parked)
    }
}

#[async_trait]
impl Harness for Kafka {
    fn producer(&self) -> Arc<dyn Producer> {
        self.producer.clone()
    }

    fn channel_factory(&self) -> Arc<dyn ChannelFactory> {
        Arc::new(self.factory.clone())
    }

    async fn provision(&self, topic: &str, channel: &str) -> Result<(), Error> {
        ensure_topics(
            &self.config,
            &KafkaChannelFactory::channel_topics(topic, channel)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .await
    }

    async fn dead_letters(&self, _topic: &str, channel: &str) -> Result<Vec<ParkedMessage>, Error> {
        self.read_all(&KafkaChannelFactory::dead_letter_topic(channel))
            .await
    }

    async fn invalid_messages(
        &self,
        _topic: &str,
        channel: &str,
    ) -> Result<Vec<ParkedMessage>, Error> {
        self.read_all(&KafkaChannelFactory::invalid_message_topic(channel))
            .await
    }
}

brighter_core::conformance_tests!(kafka);

fn keyed(topic: &str, key: &str, n: u32) -> Message {
    let mut m = Message::new(MessageHeader::new(topic, MessageType::Event), n.to_string());
    m.header.partition_key = Some(key.into());
    m
}

async fn open(h: &Kafka, topic: &str, group: &str) -> Box<dyn Channel> {
    h.factory
        .create_channel(&ChannelSpec::new(group, topic, group))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_resumes_without_losing_or_skipping() {
    let h = kafka().await;
    let topic = unique_name("crash");
    let group = format!("{topic}-g");
    h.provision(&topic, &group).await.unwrap();
    let messages: Vec<Message> = (0..30)
        .map(|n| keyed(&topic, &format!("k{}", n % 3), n))
        .collect();
    for r in h.producer.send_batch(&messages).await {
        r.unwrap();
    }
    // First consumer settles 10, holds 2 more unsettled, then dies (no close).
    let mut first = open(&h, &topic, &group).await;
    let mut settled = HashSet::new();
    for _ in 0..10 {
        let d = first
            .receive(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        settled.insert(d.message.id());
        first.ack(&d).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // an auto-commit passes
    let mut unsettled = HashSet::new();
    for _ in 0..2 {
        let d = first
            .receive(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        unsettled.insert(d.message.id());
    }
    drop(first);

    let mut second = open(&h, &topic, &group).await;
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() + settled.len() < 30 && Instant::now() < deadline {
        if let Some(d) = second.receive(Duration::from_secs(1)).await.unwrap() {
            seen.insert(d.message.id());
            second.ack(&d).await.unwrap();
        }
    }
    second.close().await.unwrap();
    let all: HashSet<_> = settled.union(&seen).copied().collect();
    assert_eq!(all.len(), 30, "no message lost or skipped");
    assert!(
        unsettled.is_subset(&seen),
        "unsettled messages were redelivered"
    );
    println!(
        "killed after settling 10: the restarted consumer read {} (of which {} were already settled)",
        seen.len(),
        seen.intersection(&settled).count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_in_a_group_share_partitions_and_keep_key_order() {
    let h = kafka().await;
    let topic = unique_name("share");
    let group = format!("{topic}-g");
    h.provision(&topic, &group).await.unwrap();
    let seen: Arc<Mutex<Vec<(usize, String, u32)>>> = Arc::default();
    let mut tasks = Vec::new();
    const N: u32 = 60;
    for consumer in 0..2 {
        let mut channel = open(&h, &topic, &group).await;
        let seen = Arc::clone(&seen);
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && seen.lock().unwrap().len() < N as usize {
                if let Some(d) = channel.receive(Duration::from_millis(200)).await.unwrap() {
                    let key = d.message.header.partition_key.clone().unwrap();
                    let n: u32 = String::from_utf8_lossy(&d.message.body).parse().unwrap();
                    seen.lock().unwrap().push((consumer, key, n));
                    channel.ack(&d).await.unwrap();
                }
            }
            channel.close().await.unwrap();
        }));
    }
    let messages: Vec<Message> = (0..N)
        .map(|n| keyed(&topic, &format!("key-{}", n % 6), n))
        .collect();
    for r in h.producer.send_batch(&messages).await {
        r.unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), N as usize);
    for consumer in 0..2 {
        assert!(
            seen.iter().any(|(c, _, _)| *c == consumer),
            "consumer {consumer} got no partition"
        );
    }
    for key in 0..6 {
        let order: Vec<u32> = seen
            .iter()
            .filter(|(_, k, _)| *k == format!("key-{key}"))
            .map(|s| s.2)
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "order of key-{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_second_defer_waits_while_its_partition_keeps_flowing() {
    let h = kafka().await;
    let topic = unique_name("defer");
    let group = format!("{topic}-g");
    h.provision(&topic, &group).await.unwrap();
    let mut channel = open(&h, &topic, &group).await;
    let first = keyed(&topic, "same", 0);
    h.producer.send(&first).await.unwrap();
    let mut d = channel
        .receive(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    d.message_mut().header.handled_count = 1;
    let deferred_at = Instant::now();
    channel.requeue(d, Duration::from_secs(2)).await.unwrap();
    // The partition keeps flowing: a later message of the same key comes first.
    let second = keyed(&topic, "same", 1);
    h.producer.send(&second).await.unwrap();
    let next = channel
        .receive(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.message.id(), second.id());
    assert!(deferred_at.elapsed() < Duration::from_secs(2));
    channel.ack(&next).await.unwrap();
    let again = channel
        .receive(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.message.id(), first.id());
    assert!(
        deferred_at.elapsed() >= Duration::from_secs(2),
        "redelivered after {:?}",
        deferred_at.elapsed()
    );
    assert_eq!(again.message.header.handled_count, 1);
    channel.ack(&again).await.unwrap();
    channel.close().await.unwrap();
}

#[test]
fn oauthbearer_config_and_other_credentials_never_appear_in_debug_output() {
    // sasl.oauthbearer.config carries client secrets (e.g. "principal=app
    // clientSecret=..."); the JAAS-style and TLS key settings too.
    let config = KafkaConfig::new("b:9092")
        .set(
            "sasl.oauthbearer.config",
            "principal=app secret=oauth-s3cret",
        )
        .set("sasl.oauthbearer.client.secret", "client-s3cret")
        .set("ssl.key.password", "key-s3cret")
        .set("ssl.keystore.password", "store-s3cret")
        .set("sasl.kerberos.keytab", "/etc/keytab-s3cret");
    let shown = format!("{config:?}");
    for secret in [
        "oauth-s3cret",
        "client-s3cret",
        "key-s3cret",
        "store-s3cret",
        "keytab-s3cret",
    ] {
        assert!(!shown.contains(secret), "{secret} shown: {shown}");
    }
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let config = KafkaConfig::new("b:9092")
        .set("sasl.password", "hunter2")
        .set("sasl.username", "app");
    let shown = format!("{config:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_resets_a_group_to_the_earliest_offset_or_a_time() {
    let h = kafka().await;
    let topic = unique_name("replay");
    let group = format!("{topic}-g");
    h.provision(&topic, &group).await.unwrap();
    let early: Vec<Message> = (0..4).map(|n| keyed(&topic, &format!("k{n}"), n)).collect();
    for r in h.producer.send_batch(&early).await {
        r.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let late: Vec<Message> = (4..7).map(|n| keyed(&topic, &format!("k{n}"), n)).collect();
    for r in h.producer.send_batch(&late).await {
        r.unwrap();
    }
    let read_all = |expect: usize| {
        let (h, topic, group) = (&h, &topic, &group);
        async move {
            let mut channel = open(h, topic, group).await;
            let mut ids = HashSet::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while ids.len() < expect && Instant::now() < deadline {
                if let Some(d) = channel.receive(Duration::from_millis(500)).await.unwrap() {
                    ids.insert(d.message.id());
                    channel.ack(&d).await.unwrap();
                }
            }
            // Nothing more than expected.
            assert!(
                channel
                    .receive(Duration::from_millis(1000))
                    .await
                    .unwrap()
                    .is_none()
            );
            channel.close().await.unwrap();
            drop(channel);
            ids
        }
    };
    assert_eq!(read_all(7).await.len(), 7);
    brighter_kafka::replay(
        &h.config,
        &group,
        &topic,
        brighter_kafka::ReplayFrom::Earliest,
    )
    .await
    .unwrap();
    assert_eq!(
        read_all(7).await.len(),
        7,
        "all read again from the earliest offset"
    );
    brighter_kafka::replay(
        &h.config,
        &group,
        &topic,
        brighter_kafka::ReplayFrom::Timestamp(cut),
    )
    .await
    .unwrap();
    let again = read_all(3).await;
    let expected: HashSet<_> = late.iter().map(Message::id).collect();
    assert_eq!(again, expected, "only what came after the time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_size_limit_is_refused_and_parked_by_the_sweeper() {
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    struct Blob {
        id: uuid::Uuid,
        data: String,
    }
    impl brighter_core::Request for Blob {
        fn id(&self) -> uuid::Uuid {
            self.id
        }
    }
    impl brighter_core::Command for Blob {}
    let kafka = kafka().await;
    let topic = unique_name("too-large");
    let outbox = brighter_core::InMemoryOutbox::new();
    let processor = brighter_core::CommandProcessor::builder()
        .publication::<Blob>(brighter_core::Publication::command(&topic))
        .producer(kafka.producer.as_ref().clone())
        .outbox(outbox.clone())
        .build()
        .unwrap();
    // Over the producer's (and broker's default) message.max.bytes of 1 MB.
    let blob = Blob {
        id: uuid::Uuid::now_v7(),
        data: "x".repeat(2 * 1024 * 1024),
    };
    processor.deposit_post(&blob, None).await.unwrap();
    let sweeper = brighter_core::OutboxSweeper::new(&processor)
        .min_age(Duration::ZERO)
        .park_after(2);
    let first = sweeper.sweep_once().await.unwrap();
    assert_eq!((first.failed, first.parked), (1, 0));
    let entry = outbox.entry(blob.id).unwrap();
    assert!(
        entry
            .last_error
            .as_deref()
            .unwrap()
            .contains("refused by the broker"),
        "{:?}",
        entry.last_error
    );
    let second = sweeper.sweep_once().await.unwrap();
    assert_eq!((second.failed, second.parked), (1, 1));
    assert_eq!(
        brighter_core::Outbox::parked(&outbox, 10).await.unwrap()[0].id,
        blob.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_share_one_reply_topic_which_goes_when_the_replies_close() {
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    struct Quote {
        id: uuid::Uuid,
        sku: String,
    }
    impl brighter_core::Request for Quote {
        fn id(&self) -> uuid::Uuid {
            self.id
        }
    }
    impl brighter_core::Command for Quote {}
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    struct Price {
        id: uuid::Uuid,
        cents: u64,
    }
    impl brighter_core::Request for Price {
        fn id(&self) -> uuid::Uuid {
            self.id
        }
    }
    struct Pricer;
    impl brighter_core::Handler<Quote> for Pricer {
        async fn handle(
            &self,
            quote: &Quote,
            ctx: &mut brighter_core::RequestContext,
        ) -> Result<(), Error> {
            ctx.reply(&Price {
                id: uuid::Uuid::now_v7(),
                cents: 100 * quote.sku.len() as u64,
            })
            .await
        }
    }
    let h = kafka().await;
    let topic = unique_name("quotes");
    ensure_topics(&h.config, &[&topic]).await.unwrap();
    let processor = brighter_core::CommandProcessor::builder()
        .command(Pricer)
        .publication::<Quote>(brighter_core::Publication::command(&topic))
        .producer(h.producer.as_ref().clone())
        .reply_channels(h.factory.clone())
        .build()
        .unwrap();
    let dispatcher = brighter_core::Dispatcher::builder(processor.clone())
        .subscription(brighter_core::Subscription::command::<Quote>(
            &topic,
            &topic,
            h.factory.clone(),
        ))
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let reply_topics = || {
        let consumer: rdkafka::consumer::BaseConsumer = h.config.client().create().unwrap();
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap();
        metadata
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .filter(|name| name.starts_with("reply."))
            .collect::<HashSet<String>>()
    };
    let before = reply_topics();
    for sku in ["a", "ab", "abc"] {
        let price: Price = processor
            .call(
                &Quote {
                    id: uuid::Uuid::now_v7(),
                    sku: sku.into(),
                },
                Duration::from_secs(20),
            )
            .await
            .unwrap();
        assert_eq!(price.cents, 100 * sku.len() as u64);
    }
    let during: HashSet<String> = reply_topics().difference(&before).cloned().collect();
    assert_eq!(
        during.len(),
        KafkaChannelFactory::channel_topics("t", "c").len(),
        "one reply topic (with its retry tiers, dlq and invalid topics) for three calls: {during:?}"
    );
    processor.close_replies().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<String> = reply_topics().intersection(&during).cloned().collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reply topics left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let group = during.iter().min_by_key(|t| t.len()).unwrap().clone();
    let consumer: rdkafka::consumer::BaseConsumer = h.config.client().create().unwrap();
    let groups = consumer
        .fetch_group_list(Some(&group), Duration::from_secs(10))
        .unwrap();
    assert!(
        groups.groups().iter().all(|g| g.state() == "Dead"),
        "the reply group is left behind: {:?}",
        groups
            .groups()
            .iter()
            .map(|g| (g.name(), g.state()))
            .collect::<Vec<_>>()
    );
    dispatcher.shutdown().await;
}

/// A channel on a topic of its own, its first retry tier, and a raw
/// producer to write records to either as a foreign client would.
struct Tier {
    topic: String,
    channel_name: String,
    channel: Box<dyn Channel>,
    retry: String,
    raw: rdkafka::producer::FutureProducer,
}

impl Tier {
    async fn open(h: &Kafka, prefix: &str) -> Tier {
        let topic = unique_name(prefix);
        let channel_name = format!("{topic}-q");
        let channel = open(h, &topic, &channel_name).await;
        let retry = KafkaChannelFactory::retry_topic(&channel_name, brighter_kafka::RETRY_TIERS[0]);
        Tier {
            raw: h.config.client().create().unwrap(),
            topic,
            channel_name,
            channel,
            retry,
        }
    }
}

/// Writes a record with `headers` and an empty JSON body to partition 0 of
/// `to`, and waits for its delivery.
async fn send_raw(
    raw: &rdkafka::producer::FutureProducer,
    to: &str,
    headers: rdkafka::message::OwnedHeaders,
) {
    raw.send(
        rdkafka::producer::FutureRecord::<(), [u8]>::to(to)
            .payload(b"{}")
            .headers(headers)
            .partition(0),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
}

/// What `seen` makes of each of the next `n` messages `channel` delivers,
/// each acked; fails if they do not all come within 20 s.
async fn receive_acked<T: std::fmt::Debug>(
    channel: &mut dyn Channel,
    n: usize,
    seen: impl Fn(&Message) -> T,
) -> Vec<T> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        assert!(Instant::now() < deadline, "only {got:?} of {n} arrived");
        if let Some(delivery) = channel.receive(Duration::from_millis(500)).await.unwrap() {
            got.push(seen(&delivery.message));
            channel.ack(&delivery).await.unwrap();
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_due_times_on_the_retry_topic_never_stall_it() {
    // Before: a due time read from a retry record was trusted, so one far in
    // the future paused the retry partition (and everything behind it) for
    // good, and one near i64::MIN overflowed the subtraction.
    use rdkafka::message::{Header, OwnedHeaders};
    let h = kafka().await;
    let Tier {
        topic,
        mut channel,
        retry,
        raw,
        ..
    } = Tier::open(&h, "due").await;
    let mut sent = Vec::new();
    for due in [
        i64::MAX.to_string(),
        i64::MIN.to_string(),
        "soon-ish".into(),
    ] {
        let message = Message::new(MessageHeader::new(&topic, MessageType::Event), "{}");
        let mut headers = OwnedHeaders::new();
        for (key, value) in wire::encode(&message.header, wire::CloudEventsBinding::Kafka) {
            headers = headers.insert(Header {
                key: &key,
                value: Some(value.as_bytes()),
            });
        }
        headers = headers.insert(Header {
            key: brighter_kafka::NOT_BEFORE,
            value: Some(due.as_bytes()),
        });
        headers = headers.insert(Header {
            key: brighter_kafka::DUE,
            value: Some(due.as_bytes()),
        });
        send_raw(&raw, &retry, headers).await;
        sent.push(message.id());
    }
    let got = receive_acked(channel.as_mut(), sent.len(), |m| m.id()).await;
    assert_eq!(got, sent, "all due now, in order");
    channel.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_a_few_bytes_over_the_size_limit_goes_without_its_header_bag() {
    // Before: the copy (the original plus the reason and origin headers) was
    // over message.max.bytes where the original was not; the forward failed,
    // the message came back and failed again, for ever.
    let h = kafka().await;
    let (topic, channel_name) = (unique_name("edge"), unique_name("edge-q"));
    let mut channel = h
        .factory
        .create_channel(&ChannelSpec::new(&channel_name, &topic, &channel_name))
        .await
        .unwrap();
    // The body within the producer's own limit (message.max.bytes, 1,000,000,
    // which counts the payload), the headers taking the record to the
    // broker's limit (1 MiB and 12 bytes for the whole batch).
    let make = |pad: usize| {
        let mut m = Message::new(
            MessageHeader::new(&topic, MessageType::Event),
            vec![b'x'; 990_000],
        );
        for i in 0..9 {
            m.header.bag.insert(format!("h{i:02}"), "v".repeat(1_000));
        }
        m.header.bag.insert("pad".into(), "p".repeat(pad));
        m
    };
    // The largest padding the broker takes, to the byte.
    let scratch = unique_name("scratch");
    ensure_topics(&h.config, &[&scratch]).await.unwrap();
    let (mut fits, mut over) = (0usize, 200_000usize);
    while over - fits > 1 {
        let mid = (fits + over) / 2;
        let mut probe = make(mid);
        probe.header.topic = scratch.as_str().into();
        match h.producer.send(&probe).await {
            Ok(()) => fits = mid,
            Err(Error::Refused { .. }) => over = mid,
            Err(other) => panic!("{other:?}"),
        }
    }
    // 30 bytes under the limit: the copy's extra headers push it over.
    let original = make(fits - 30);
    h.producer.send(&original).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let delivery = loop {
        assert!(Instant::now() < deadline, "nothing arrived");
        if let Some(d) = channel.receive(Duration::from_millis(500)).await.unwrap() {
            break d;
        }
    };
    assert_eq!(delivery.message.id(), original.id());
    channel.reject(delivery, "handler gave up").await.unwrap();
    channel.close().await.unwrap();
    let parked = h
        .read_all(&KafkaChannelFactory::dead_letter_topic(&channel_name))
        .await
        .unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].message.id(), original.id());
    assert_eq!(parked[0].reason, "handler gave up");
    assert_eq!(parked[0].message.body, original.body, "the body is whole");
    // The framework's own headers stay out of the bag (the copy carries
    // `HEADERS_DROPPED` beside them); the original's bag was left out.
    let bag = &parked[0].message.header.bag;
    assert!(
        !bag.contains_key("pad") && !bag.contains_key("h00"),
        "the full copy went through: the test's message was not at the edge (bag of {})",
        bag.len()
    );
}

/// `headers` with one more header whose name is not UTF-8, as a client that
/// writes names as bytes can (librdkafka in C, Go's clients); rdkafka's safe
/// API only writes `&str` names.
#[allow(unsafe_code)]
fn with_a_binary_name(headers: rdkafka::message::OwnedHeaders) -> rdkafka::message::OwnedHeaders {
    use rdkafka::bindings::{rd_kafka_header_add, rd_kafka_headers_t, rd_kafka_resp_err_t};
    let name = b"\xffbinary\xfe";
    let value = b"kept";
    let native = std::ptr::from_ref(headers.as_borrowed())
        .cast::<rd_kafka_headers_t>()
        .cast_mut();
    // SAFETY: a `BorrowedHeaders` reference is the address of the native
    // headers (rdkafka converts it the same way), owned by `headers`, which
    // outlives the call; librdkafka copies the name and the value.
    let err = unsafe {
        rd_kafka_header_add(
            native,
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        )
    };
    assert_eq!(err, rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_kept_in_the_bag_and_stops_nothing() {
    // Before: rdkafka's header reader unwraps the name's UTF-8, so one such
    // record (from the main topic or a retry tier) panicked the consumer.
    use rdkafka::message::Header;
    let h = kafka().await;
    let Tier {
        topic,
        channel_name,
        mut channel,
        retry,
        raw,
    } = Tier::open(&h, "binary-name").await;
    let mut sent = Vec::new();
    for (to, binary) in [
        (&topic, false),
        (&topic, true),
        (&retry, true),
        (&topic, false),
    ] {
        let message = Message::new(MessageHeader::new(&topic, MessageType::Event), "{}");
        let mut headers = brighter_kafka::encode_headers(&message);
        if to == &retry {
            headers = headers.insert(Header {
                key: brighter_kafka::DUE,
                value: Some(b"0".as_slice()),
            });
        }
        if binary {
            headers = with_a_binary_name(headers);
        }
        send_raw(&raw, to, headers).await;
        sent.push((message.id(), binary));
    }
    let mut got = receive_acked(channel.as_mut(), sent.len(), |m| {
        let kept = m.header.bag.get("\u{fffd}binary\u{fffd}");
        (m.id(), kept.map(String::as_str) == Some("kept"))
    })
    .await;
    got.sort();
    sent.sort();
    assert_eq!(
        got, sent,
        "every record arrived, the binary name in its bag"
    );
    assert!(
        h.invalid_messages(&topic, &channel_name)
            .await
            .unwrap()
            .is_empty(),
        "nothing was unreadable"
    );
    channel.close().await.unwrap();
}
