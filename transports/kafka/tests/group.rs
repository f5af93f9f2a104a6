//! What only a real Kafka group coordinator and log make meaningful: members
//! joining while a message is in hand, partitions moving to another member,
//! standby members (more members than partitions), and a consumer resuming
//! inside a multi-record batch. Run against Apache Kafka (`scripts/test` starts
//! it); each test has its own topics and group.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use brighter_core::conformance::unique_name;
use brighter_core::{
    Channel, ChannelFactory, ChannelSpec, Command, CommandProcessor, Delivery, Dispatcher, Error,
    Handler, Message, MessageHeader, MessageType, Producer, Publication, Request, RequestContext,
    Subscription,
};
use brighter_kafka::{KafkaChannelFactory, KafkaConfig, KafkaProducer, ensure_topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;
use uuid::Uuid;

const PARTITIONS: i32 = 3;

fn config(partitions: i32) -> KafkaConfig {
    KafkaConfig::from_env().topics(partitions, 1)
}

struct Group {
    config: KafkaConfig,
    producer: KafkaProducer,
    factory: KafkaChannelFactory,
    topic: String,
    group: String,
}

async fn group(name: &str, partitions: i32) -> Group {
    let config = config(partitions);
    let producer = KafkaProducer::new(config.clone()).unwrap();
    let topic = unique_name(name);
    let group = format!("{topic}-g");
    ensure_topics(
        &config,
        &KafkaChannelFactory::channel_topics(&topic, &group)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    Group {
        factory: KafkaChannelFactory::new(config.clone(), producer.clone()),
        config,
        producer,
        topic,
        group,
    }
}

fn keyed(topic: &str, n: u32) -> Message {
    let mut m = Message::new(MessageHeader::new(topic, MessageType::Event), n.to_string());
    m.header.partition_key = Some(format!("k{}", n % 6));
    m
}

impl Group {
    async fn open(&self) -> Box<dyn Channel> {
        self.factory
            .create_channel(&ChannelSpec::new(&self.group, &self.topic, &self.group))
            .await
            .unwrap()
    }

    async fn send(&self, range: std::ops::Range<u32>) -> Vec<Message> {
        let messages: Vec<Message> = range.map(|n| keyed(&self.topic, n)).collect();
        for r in self.producer.send_batch(&messages).await {
            r.unwrap();
        }
        messages
    }

    /// The group's committed offset per partition of the topic (-1: none).
    fn committed(&self, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = self
            .config
            .client()
            .set("group.id", &self.group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        (0..partitions)
            .map(
                |p| match committed.find_partition(&self.topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                },
            )
            .collect()
    }

    /// The end offset (high watermark) of each partition.
    fn ends(&self, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = self.config.client().create().unwrap();
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .collect()
    }

    /// Where each message of the topic sits: id -> (partition, offset).
    fn positions(&self, partitions: i32) -> HashMap<Uuid, (i32, i64)> {
        use rdkafka::Message as _;
        let consumer: BaseConsumer = self
            .config
            .client()
            .set("group.id", unique_name("positions"))
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&self.topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut positions = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let total: i64 = self.ends(partitions).iter().sum();
        while (positions.len() as i64) < total && Instant::now() < deadline {
            if let Some(record) = consumer.poll(Duration::from_millis(200)) {
                let record = record.unwrap().detach();
                let message = brighter_kafka::decode_record(&record).unwrap();
                positions.insert(message.id(), (record.partition(), record.offset()));
            }
        }
        positions
    }
}

/// Receives on `channel`, acking everything except `hold`, until `until` says
/// stop or the deadline passes; records what it saw.
async fn drain(
    channel: &mut dyn Channel,
    seen: &Mutex<Vec<Uuid>>,
    until: impl Fn(usize) -> bool,
    deadline: Instant,
) {
    while Instant::now() < deadline {
        if until(seen.lock().await.len()) {
            return;
        }
        if let Some(d) = channel.receive(Duration::from_millis(200)).await.unwrap() {
            seen.lock().await.push(d.message.id());
            channel.ack(&d).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_while_a_message_is_in_hand_commits_nothing_past_it_and_skips_nothing() {
    let g = group("join-in-hand", PARTITIONS).await;
    let sent = g.send(0..30).await;
    let mut first = g.open().await;
    let mut settled = Vec::new();
    for _ in 0..10 {
        let d = first
            .receive(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        settled.push(d.message.id());
        first.ack(&d).await.unwrap();
    }
    let held: Delivery = first
        .receive(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let (held_partition, held_offset) = g.positions(PARTITIONS)[&held.message.id()];

    // While it is in hand, an auto-commit passes: nothing past it is committed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let committed = g.committed(PARTITIONS)[held_partition as usize];
    assert!(
        committed <= held_offset,
        "partition {held_partition}: committed {committed} past the unsettled message at {held_offset}"
    );

    // A second member joins while the first still has it in hand; the first
    // keeps polling (and settling what else it reads) so the rebalance completes.
    let a = Arc::new(Mutex::new(settled));
    let b = Arc::new(Mutex::new(Vec::new()));
    let joining = {
        let factory = g.factory.clone();
        let spec = ChannelSpec::new(&g.group, &g.topic, &g.group);
        tokio::spawn(async move { factory.create_channel(&spec).await })
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    while !joining.is_finished() && Instant::now() < deadline {
        if let Some(d) = first.receive(Duration::from_millis(200)).await.unwrap() {
            a.lock().await.push(d.message.id());
            first.ack(&d).await.unwrap();
        }
    }
    let mut second = joining.await.unwrap().unwrap();
    let all = |a: &[Uuid], b: &[Uuid]| a.iter().chain(b).copied().collect::<HashSet<_>>();
    let deadline = Instant::now() + Duration::from_secs(45);
    while all(&a.lock().await, &b.lock().await).len() < sent.len() && Instant::now() < deadline {
        drain(
            first.as_mut(),
            &a,
            |_| false,
            Instant::now() + Duration::from_millis(300),
        )
        .await;
        drain(
            second.as_mut(),
            &b,
            |_| false,
            Instant::now() + Duration::from_millis(300),
        )
        .await;
    }

    // The message held across the rebalance is settled late, after its
    // partition was taken away and handed out again: that must move nothing.
    first.ack(&held).await.unwrap();
    let ends = g.ends(PARTITIONS);
    for _ in 0..2 {
        drain(
            first.as_mut(),
            &a,
            |_| false,
            Instant::now() + Duration::from_millis(600),
        )
        .await;
        drain(
            second.as_mut(),
            &b,
            |_| false,
            Instant::now() + Duration::from_millis(600),
        )
        .await;
    }
    first.close().await.unwrap();
    second.close().await.unwrap();
    let handled = all(&a.lock().await, &b.lock().await);
    assert_eq!(handled.len(), 30, "every message handled, none skipped");
    assert!(
        handled.contains(&held.message.id()),
        "the message in hand during the rebalance was read again by its partition's owner"
    );
    assert_eq!(
        g.committed(PARTITIONS),
        ends,
        "settling the held message late moved no offset back"
    );
    println!(
        "held partition {held_partition} offset {held_offset} (committed there meanwhile: {committed}); first member handled {}, second {}",
        a.lock().await.len(),
        b.lock().await.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_a_partition_does_not_commit_it_when_it_closes() {
    let g = group("stale-offsets", PARTITIONS).await;
    g.send(0..30).await;
    let mut first = g.open().await;
    let seen = Mutex::new(Vec::new());
    drain(
        first.as_mut(),
        &seen,
        |n| n >= 30,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    assert_eq!(seen.lock().await.len(), 30);

    // A second member takes some partitions; the first polls meanwhile.
    let joining = {
        let factory = g.factory.clone();
        let spec = ChannelSpec::new(&g.group, &g.topic, &g.group);
        tokio::spawn(async move { factory.create_channel(&spec).await })
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    while !joining.is_finished() && Instant::now() < deadline {
        if let Some(d) = first.receive(Duration::from_millis(200)).await.unwrap() {
            first.ack(&d).await.unwrap();
        }
    }
    let mut second = joining.await.unwrap().unwrap();

    // More messages, handled by whichever member owns their partition now.
    g.send(30..60).await;
    let (a, b) = (Mutex::new(Vec::new()), Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(45);
    while a.lock().await.len() + b.lock().await.len() < 30 && Instant::now() < deadline {
        drain(
            first.as_mut(),
            &a,
            |_| false,
            Instant::now() + Duration::from_millis(300),
        )
        .await;
        drain(
            second.as_mut(),
            &b,
            |_| false,
            Instant::now() + Duration::from_millis(300),
        )
        .await;
    }
    assert_eq!(a.lock().await.len() + b.lock().await.len(), 30);
    assert!(
        !b.lock().await.is_empty(),
        "the second member got a partition"
    );

    // The second member closes first, committing where it got to; then the
    // first, which settled those partitions' older messages before it lost them.
    second.close().await.unwrap();
    drop(second);
    let ends = g.ends(PARTITIONS);
    assert_eq!(g.committed(PARTITIONS), ends, "all committed up to the end");
    first.close().await.unwrap();
    assert_eq!(
        g.committed(PARTITIONS),
        ends,
        "closing the first member moved no partition's offset back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resuming_inside_a_multi_record_batch_reads_the_rest_of_it() {
    // One partition, and a producer that lingers so the 20 messages sent at
    // once travel as one record batch.
    let g = {
        let mut g = group("mid-batch", 1).await;
        g.producer = KafkaProducer::new(g.config.clone().set("linger.ms", "200")).unwrap();
        g
    };
    let sent = g.send(0..20).await;
    let mut first = g.open().await;
    for message in &sent[..7] {
        let d = first
            .receive(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.message.id(), message.id());
        first.ack(&d).await.unwrap();
    }
    first.close().await.unwrap();
    drop(first);
    assert_eq!(g.committed(1), vec![7], "committed inside the batch");

    let mut second = g.open().await;
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rest.len() < 13 && Instant::now() < deadline {
        if let Some(d) = second.receive(Duration::from_millis(500)).await.unwrap() {
            rest.push(d.message.id());
            second.ack(&d).await.unwrap();
        }
    }
    second.close().await.unwrap();
    let expected: Vec<Uuid> = sent[7..].iter().map(Message::id).collect();
    assert_eq!(rest, expected, "the rest of the batch, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_members_than_partitions_join_and_the_extra_one_waits_as_a_standby() {
    let g = Arc::new(group("standby", PARTITIONS).await);
    // Each member joins and then keeps polling, as a performer does, so the
    // rebalances that the later members' joins start can complete.
    // The fourth joins once the first three share the partitions.
    let seen: Arc<Mutex<Vec<(usize, Uuid)>>> = Arc::default();
    let members: Vec<_> = (0..4)
        .map(|member| {
            let (g, seen) = (Arc::clone(&g), Arc::clone(&seen));
            tokio::spawn(async move {
                if member == 3 {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                let spec = ChannelSpec::new(&g.group, &g.topic, &g.group);
                let mut channel = g.factory.create_channel(&spec).await?;
                let deadline = Instant::now() + Duration::from_secs(60);
                while seen.lock().await.len() < 30 && Instant::now() < deadline {
                    if let Some(d) = channel.receive(Duration::from_millis(200)).await? {
                        seen.lock().await.push((member, d.message.id()));
                        channel.ack(&d).await?;
                    }
                }
                channel.close().await?;
                Ok::<_, Error>(())
            })
        })
        .collect();
    // Send once all four are in the group (the first 30 s of a member that
    // cannot join would otherwise hide here).
    tokio::time::sleep(Duration::from_secs(6)).await;
    g.send(0..30).await;
    for member in members {
        member
            .await
            .unwrap()
            .expect("every member joins, the fourth as a standby, and consumes without error");
    }
    let seen = seen.lock().await.clone();
    let ids: HashSet<Uuid> = seen.iter().map(|(_, id)| *id).collect();
    let busy: HashSet<usize> = seen.iter().map(|(member, _)| *member).collect();
    assert_eq!(seen.len(), 30, "every message handled once");
    assert_eq!(ids.len(), 30);
    assert!(
        busy.len() <= 3,
        "at most one member per partition got messages: {busy:?}"
    );
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Tick {
    id: Uuid,
}
impl Request for Tick {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Tick {}

#[derive(Clone, Default)]
struct CountTicks(Arc<Mutex<HashSet<Uuid>>>);

impl Handler<Tick> for CountTicks {
    async fn handle(&self, tick: &Tick, _: &mut RequestContext) -> Result<(), Error> {
        self.0.lock().await.insert(tick.id);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pump_with_more_performers_than_partitions_runs_them_all_without_restarts() {
    let g = group("standby-pump", PARTITIONS).await;
    let handled = CountTicks::default();
    let processor = CommandProcessor::builder()
        .command(handled.clone())
        .publication::<Tick>(Publication::command(&g.topic))
        .producer(g.producer.clone())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Tick>("ticks", &g.topic, g.factory.clone())
                .channel(&g.group)
                .performers(4),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let all_running = async {
        loop {
            let health = dispatcher.subscription_health("ticks").unwrap();
            if health.performers_running == 4 {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let health = tokio::time::timeout(Duration::from_secs(20), all_running)
        .await
        .expect("all four performers have their channel open, the fourth as a standby");
    assert!(health.is_healthy(), "{health:?}");
    for _ in 0..30 {
        processor.post(&Tick { id: Uuid::now_v7() }).await.unwrap();
    }
    // Wait for the pump's count, not the handler's: a message is counted
    // handled once it is acked, after the handler returned.
    let deadline = Instant::now() + Duration::from_secs(30);
    while dispatcher.subscription_health("ticks").unwrap().handled < 30 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = dispatcher.subscription_health("ticks").unwrap();
    dispatcher.shutdown().await;
    assert_eq!(handled.0.lock().await.len(), 30);
    assert_eq!(health.restarts, 0, "{health:?}");
    assert_eq!(health.handled, 30);
}
