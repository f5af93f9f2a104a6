//! Messages and the outbox: deposit in a transaction, clear, post, sweeper,
//! backpressure, delayed post, request-reply, mappers, transforms, the inbox.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::pipeline::{OnDuplicate, Pipeline, Retry, UseInbox};
use brighter_core::{
    ClaimCheck, ClaimCheckStore, Command, CommandProcessor, Compression, Dispatcher, Error,
    ErrorKind, Handler, InMemoryBroker, InMemoryClaimCheckStore, InMemoryInbox, InMemoryOutbox,
    InMemoryTransaction, Inbox, JsonMapper, Message, MessageHeader, MessageMapper, MessageType,
    Outbox, OutboxSweeper, Producer, Publication, Request, RequestContext, Subscription, Transform,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PlaceOrder {
    id: Uuid,
    sku: String,
    #[serde(default)]
    quantity: u32,
}
impl Request for PlaceOrder {
    fn id(&self) -> Uuid {
        self.id
    }
    fn partition_key(&self) -> Option<String> {
        Some(self.sku.clone())
    }
}
impl Command for PlaceOrder {}

fn order(sku: &str) -> PlaceOrder {
    PlaceOrder {
        id: Uuid::now_v7(),
        sku: sku.into(),
        quantity: 1,
    }
}

/// A producer that records what it sent and can be switched to fail.
#[derive(Clone, Default)]
struct Recording {
    sent: Arc<Mutex<Vec<Message>>>,
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl Producer for Recording {
    async fn send(&self, message: &Message) -> Result<(), Error> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::transport("send", "broker unreachable"));
        }
        self.sent.lock().unwrap().push(message.clone());
        Ok(())
    }
}

fn processor(outbox: &InMemoryOutbox, producer: &Recording) -> CommandProcessor {
    CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders").source("urn:test:shop"))
        .producer(producer.clone())
        .outbox(outbox.clone())
        .build()
        .unwrap()
}

#[tokio::test]
async fn deposit_commits_or_rolls_back_with_the_callers_transaction() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);

    let mut tx = InMemoryTransaction::new();
    let rolled_back = p.deposit_post(&order("a"), Some(&mut tx)).await.unwrap();
    assert!(
        outbox.entry(rolled_back).is_none(),
        "not visible before commit"
    );
    tx.rollback();
    assert!(
        outbox.entry(rolled_back).is_none(),
        "gone with the rollback"
    );

    let mut tx = InMemoryTransaction::new();
    let committed = p.deposit_post(&order("b"), Some(&mut tx)).await.unwrap();
    tx.commit();
    let entry = outbox.entry(committed).expect("in the outbox after commit");
    assert!(entry.dispatched.is_none());
    assert!(
        producer.sent.lock().unwrap().is_empty(),
        "deposit sends nothing"
    );

    p.clear_outbox(&[committed]).await.unwrap();
    assert!(outbox.entry(committed).unwrap().dispatched.is_some());
    assert_eq!(producer.sent.lock().unwrap()[0].id(), committed);
    // Clearing again sends nothing twice.
    p.clear_outbox(&[committed]).await.unwrap();
    assert_eq!(producer.sent.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_posted_message_carries_a_complete_header() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    let cmd = order("sku-9");
    let id = p.post(&cmd).await.unwrap();
    let sent = producer.sent.lock().unwrap()[0].clone();
    let h = &sent.header;
    assert_eq!(id, cmd.id);
    assert_eq!(h.id, cmd.id);
    assert_eq!(h.topic, "orders");
    assert_eq!(h.message_type, MessageType::Command);
    assert_eq!(
        h.correlation_id, cmd.id,
        "a new conversation: correlation id = id"
    );
    assert_eq!(h.content_type, "application/json");
    assert_eq!(h.partition_key.as_deref(), Some("sku-9"));
    assert_eq!(h.cloud_events.source.as_deref(), Some("urn:test:shop"));
    assert_eq!(h.cloud_events.kind.as_deref(), Some("PlaceOrder"));
    assert_eq!(h.cloud_events.specversion.as_deref(), Some("1.0"));
    let body: PlaceOrder = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body, cmd);

    // Posting inside a conversation keeps its correlation id.
    let conversation = Uuid::now_v7();
    let ctx = RequestContext::new().with_correlation_id(conversation);
    p.post_with(&order("x"), &ctx).await.unwrap();
    assert_eq!(
        producer.sent.lock().unwrap()[1].header.correlation_id,
        conversation
    );
}

#[tokio::test]
async fn batch_deposit_returns_ids_in_order_and_clears_in_order() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    let orders: Vec<PlaceOrder> = (0..5).map(|i| order(&format!("s{i}"))).collect();
    let ids = p.deposit_post_batch(&orders, None).await.unwrap();
    assert_eq!(ids, orders.iter().map(|o| o.id).collect::<Vec<_>>());
    p.clear_outbox(&ids).await.unwrap();
    let sent: Vec<Uuid> = producer
        .sent
        .lock()
        .unwrap()
        .iter()
        .map(Message::id)
        .collect();
    assert_eq!(sent, ids);
}

#[tokio::test]
async fn a_duplicate_request_id_is_refused_by_the_outbox() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    let cmd = order("a");
    p.deposit_post(&cmd, None).await.unwrap();
    let err = p.deposit_post(&cmd, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Duplicate);
    assert_eq!(outbox.entries().len(), 1);
}

#[tokio::test]
async fn a_failed_send_stays_in_the_outbox_and_the_sweeper_sends_it_later() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    producer.failing.store(true, Ordering::SeqCst);
    // Deposited is posted: the send failure is recorded with the message.
    p.post(&order("a")).await.unwrap();
    let entry = &outbox.entries()[0];
    assert!(entry.dispatched.is_none());
    assert_eq!(entry.attempts, 1);
    assert!(
        entry
            .last_error
            .as_deref()
            .unwrap()
            .contains("broker unreachable")
    );

    // No topic backoff, so the second sweep tries again at once.
    let sweeper = OutboxSweeper::new(&p)
        .min_age(Duration::ZERO)
        .topic_backoff(Duration::ZERO, Duration::ZERO);
    assert_eq!(
        sweeper.sweep_once().await.unwrap().failed,
        1,
        "still failing"
    );
    assert_eq!(outbox.entries()[0].attempts, 2);
    producer.failing.store(false, Ordering::SeqCst);
    assert_eq!(sweeper.sweep_once().await.unwrap().sent, 1);
    assert!(outbox.entries()[0].dispatched.is_some());
    assert_eq!(
        sweeper.sweep_once().await.unwrap().claimed,
        0,
        "nothing left"
    );
}

#[tokio::test]
async fn the_sweeper_leaves_young_messages_to_their_writer() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    p.deposit_post(&order("a"), None).await.unwrap();
    let sweeper = OutboxSweeper::new(p).min_age(Duration::from_secs(60));
    assert_eq!(sweeper.sweep_once().await.unwrap().claimed, 0);
    assert!(producer.sent.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_sweeper_runs_until_shut_down() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    for i in 0..7 {
        p.deposit_post(&order(&i.to_string()), None).await.unwrap();
    }
    let shutdown = tokio_util_token();
    let task = tokio::spawn(
        OutboxSweeper::new(p)
            .min_age(Duration::ZERO)
            .batch_size(3)
            .poll_interval(Duration::from_millis(10))
            .run(shutdown.clone()),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while producer.sent.lock().unwrap().len() < 7 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(producer.sent.lock().unwrap().len(), 7);
    assert_eq!(outbox.outstanding_count().await.unwrap(), 0);
}

fn tokio_util_token() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}

#[tokio::test]
async fn the_outbox_limit_gives_backpressure() {
    let outbox = InMemoryOutbox::new();
    let p = CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders"))
        .producer(Recording::default())
        .outbox(outbox.clone())
        .outbox_limit(2)
        .build()
        .unwrap();
    p.deposit_post(&order("a"), None).await.unwrap();
    p.deposit_post(&order("b"), None).await.unwrap();
    let err = p.deposit_post(&order("c"), None).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Backpressure {
                outstanding: 2,
                limit: 2
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(
        outbox.entries().len(),
        2,
        "the refused message was not added"
    );
}

#[tokio::test]
async fn dispatched_messages_are_cleaned_up_and_outstanding_ones_kept() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    let sent = p.post(&order("a")).await.unwrap();
    let kept = p.deposit_post(&order("b"), None).await.unwrap();
    assert_eq!(
        outbox
            .delete_dispatched(Duration::from_secs(3600))
            .await
            .unwrap(),
        0,
        "not old enough"
    );
    assert_eq!(outbox.delete_dispatched(Duration::ZERO).await.unwrap(), 1);
    assert!(outbox.entry(sent).is_none());
    assert!(
        outbox.entry(kept).is_some(),
        "outstanding messages are never deleted"
    );
    let outstanding = outbox.outstanding(Duration::ZERO, 10).await.unwrap();
    assert_eq!(
        outstanding.iter().map(Message::id).collect::<Vec<_>>(),
        vec![kept]
    );
}

#[test]
fn publication_configuration_errors_fail_at_build() {
    // No mapper registered: the publication writes JSON.
    CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders"))
        .producer(Recording::default())
        .build()
        .expect("JSON is the default mapper");

    let missing_producer = CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders"))
        .build()
        .unwrap_err();
    assert!(
        missing_producer
            .to_string()
            .contains("no producer for topic 'orders'"),
        "{missing_producer}"
    );

    let unknown_named = CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders").producer("kafka"))
        .producer(Recording::default())
        .build()
        .unwrap_err();
    assert!(
        unknown_named.to_string().contains("'kafka'"),
        "{unknown_named}"
    );
}

#[tokio::test]
async fn posting_a_type_without_publication_is_a_clear_error() {
    let p = CommandProcessor::builder().build().unwrap();
    let err = p.post(&order("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration);
    assert!(err.to_string().contains("no publication for"), "{err}");
}

#[tokio::test]
async fn named_and_topic_producers_route_messages() {
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Audit {
        id: Uuid,
    }
    impl Request for Audit {
        fn id(&self) -> Uuid {
            self.id
        }
    }
    let (default, kafka) = (Recording::default(), Recording::default());
    let p = CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders").producer("kafka"))
        .publication::<Audit>(Publication::event("audit"))
        .producer(default.clone())
        .named_producer("kafka", kafka.clone())
        .build()
        .unwrap();
    p.post(&order("a")).await.unwrap();
    p.post(&Audit { id: Uuid::now_v7() }).await.unwrap();
    assert_eq!(kafka.sent.lock().unwrap()[0].header.topic, "orders");
    assert_eq!(default.sent.lock().unwrap()[0].header.topic, "audit");
}

#[tokio::test]
async fn a_delayed_post_is_not_delivered_before_its_delay() {
    let broker = InMemoryBroker::new();
    broker.declare("orders", "orders-q").unwrap();
    let p = CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders"))
        .producer(broker.clone())
        .build()
        .unwrap();
    let sweeper = brighter_core::OutboxSweeper::new(&p).start().await.unwrap();
    let delay = Duration::from_millis(500);
    let posted = Instant::now();
    p.post_with_delay(&order("a"), delay).await.unwrap();
    assert!(
        posted.elapsed() < delay,
        "post_with_delay waited for the delay"
    );
    use brighter_core::{ChannelFactory, ChannelSpec};
    let mut channel = broker
        .create_channel(&ChannelSpec::new("s", "orders", "orders-q"))
        .await
        .unwrap();
    assert!(
        channel
            .receive(Duration::from_millis(300))
            .await
            .unwrap()
            .is_none()
    );
    let delivery = channel
        .receive(Duration::from_secs(2))
        .await
        .unwrap()
        .unwrap();
    assert!(posted.elapsed() >= delay);
    // The outbox held it for its delay; the transport did not wait again.
    assert_eq!(delivery.message.header.delay, Duration::ZERO);
    assert!(
        channel
            .receive(Duration::from_millis(1500))
            .await
            .unwrap()
            .is_none(),
        "delivered twice"
    );
    sweeper.stop().await;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Quote {
    id: Uuid,
    sku: String,
}
impl Request for Quote {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Quote {}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Price {
    id: Uuid,
    cents: u64,
}
impl Request for Price {
    fn id(&self) -> Uuid {
        self.id
    }
}

struct Pricer;
impl Handler<Quote> for Pricer {
    async fn handle(&self, quote: &Quote, ctx: &mut RequestContext) -> Result<(), Error> {
        let price = Price {
            id: Uuid::now_v7(),
            cents: quote.sku.len() as u64 * 100,
        };
        ctx.reply(&price).await
    }
}

#[tokio::test]
async fn call_gets_the_reply_with_a_matching_correlation_id() {
    let broker = InMemoryBroker::new();
    let p = CommandProcessor::builder()
        .command(Pricer)
        .publication::<Quote>(Publication::command("quotes"))
        .producer(broker.clone())
        .reply_channels(broker.clone())
        .build()
        .unwrap();
    let dispatcher = Dispatcher::builder(p.clone())
        .subscription(Subscription::command::<Quote>(
            "pricing",
            "quotes",
            broker.clone(),
        ))
        .build()
        .unwrap();
    broker.declare("quotes", "pricing").unwrap();
    dispatcher.start().await.unwrap();
    let price: Price = p
        .call(
            &Quote {
                id: Uuid::now_v7(),
                sku: "abc".into(),
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(price.cents, 300);
    dispatcher.shutdown().await;
}

#[tokio::test]
async fn call_without_a_reply_times_out_clearly() {
    let broker = InMemoryBroker::new();
    broker.declare("quotes", "nobody-answers").unwrap();
    let p = CommandProcessor::builder()
        .publication::<Quote>(Publication::command("quotes"))
        .producer(broker.clone())
        .reply_channels(broker.clone())
        .build()
        .unwrap();
    let started = Instant::now();
    let err = p
        .call::<Quote, Price>(
            &Quote {
                id: Uuid::now_v7(),
                sku: "x".into(),
            },
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CallTimeout);
    assert!(err.to_string().contains("Quote"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    let no_factory = CommandProcessor::builder()
        .publication::<Quote>(Publication::command("quotes"))
        .producer(broker)
        .build()
        .unwrap();
    let err = no_factory
        .call::<Quote, Price>(
            &Quote {
                id: Uuid::now_v7(),
                sku: "x".into(),
            },
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("reply channel"), "{err}");
}

#[test]
fn the_json_mapper_reads_tolerantly() {
    let id = Uuid::now_v7();
    let mut header = MessageHeader::new("orders", MessageType::Command);
    header.content_type = "application/json; charset=utf-8".into();
    // Unknown field ignored, `quantity` missing and defaulted.
    let body = format!(r#"{{"id":"{id}","sku":"a","added_in_v2":true}}"#);
    let message = Message::new(header, body.into_bytes());
    let read: PlaceOrder = JsonMapper.to_request(&message).unwrap();
    assert_eq!(
        read,
        PlaceOrder {
            id,
            sku: "a".into(),
            quantity: 0
        }
    );

    let mut xml = message;
    xml.header.content_type = "application/xml".into();
    let err = MessageMapper::<PlaceOrder>::to_request(&JsonMapper, &xml).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mapping);
}

#[test]
fn the_json_mapper_reads_every_json_content_type_whatever_its_case() {
    let body = format!(r#"{{"id":"{}","sku":"a"}}"#, Uuid::now_v7());
    let read = |content_type: &str| {
        let mut header = MessageHeader::new("orders", MessageType::Command);
        header.content_type = content_type.into();
        MessageMapper::<PlaceOrder>::to_request(&JsonMapper, &Message::new(header, body.clone()))
    };
    for json in [
        "",
        "application/json",
        "Application/JSON",
        " text/json ; charset=utf-8",
        "application/cloudevents+json",
        "APPLICATION/VND.ORDERS+JSON; v=2",
    ] {
        assert!(read(json).is_ok(), "{json:?} is JSON");
    }
    for other in [
        "application/xml",
        "text/plain",
        "application/json-seq",
        "+json",
        "application/+jsonx",
    ] {
        let err = read(other).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mapping, "{other:?} is not JSON");
    }
}

#[test]
fn the_json_mapper_writes_strictly() {
    let nil = PlaceOrder {
        id: Uuid::nil(),
        sku: "a".into(),
        quantity: 1,
    };
    let err = JsonMapper
        .to_message(&nil, &Publication::command("orders"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mapping);
    let err = JsonMapper
        .to_message(&order("a"), &Publication::command(""))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mapping);
}

#[test]
fn headers_deserialize_tolerantly() {
    let id = Uuid::now_v7();
    let json = format!(r#"{{"id":"{id}","topic":"t","from_the_future":1}}"#);
    let header: MessageHeader = serde_json::from_str(&json).unwrap();
    assert_eq!(header.id, id);
    assert_eq!(header.message_type, MessageType::Command);
    assert_eq!(header.handled_count, 0);
    assert_eq!(header.content_type, "application/json");
}

fn big_message(len: usize) -> Message {
    let body: Vec<u8> = (0..len).map(|i| b"abcdefgh"[i % 8]).collect();
    let mut header = MessageHeader::new("t", MessageType::Event);
    header.content_type = "text/plain".into();
    Message::new(header, body)
}

#[tokio::test]
async fn compression_round_trips_above_its_threshold_only() {
    let gzip = Compression::gzip(1024);
    let small = big_message(100);
    assert_eq!(
        gzip.wrap(small.clone()).await.unwrap(),
        small,
        "below threshold: untouched"
    );

    let big = big_message(100_000);
    let wrapped = gzip.wrap(big.clone()).await.unwrap();
    assert!(
        wrapped.body.len() < 2_000,
        "compressed to {}",
        wrapped.body.len()
    );
    assert_eq!(wrapped.header.content_type, "application/gzip");
    assert_eq!(gzip.unwrap(wrapped).await.unwrap(), big);
}

#[tokio::test]
async fn compression_refuses_a_body_that_inflates_past_its_limit() {
    let wrapped = Compression::gzip(0)
        .wrap(big_message(1_000_000))
        .await
        .unwrap();
    let err = Compression::gzip(0)
        .max_decompressed(10_000)
        .unwrap(wrapped)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mapping);
    let mut garbage = big_message(10);
    garbage
        .header
        .bag
        .insert(brighter_core::COMPRESSION_HEADER.into(), "gzip".into());
    let err = Compression::gzip(0).unwrap(garbage).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mapping);
}

#[tokio::test]
async fn claim_check_round_trips_a_large_body_through_the_store() {
    let store = InMemoryClaimCheckStore::new();
    let check = ClaimCheck::new(Arc::new(store.clone()), 1024);
    let big = big_message(50_000);
    let wrapped = check.wrap(big.clone()).await.unwrap();
    assert!(wrapped.body.is_empty());
    let key = wrapped
        .header
        .bag
        .get(brighter_core::CLAIM_CHECK_HEADER)
        .unwrap()
        .clone();
    assert_eq!(store.get(&key).await.unwrap().unwrap(), big.body);
    assert_eq!(check.unwrap(wrapped.clone()).await.unwrap(), big);
    assert_eq!(
        store.len(),
        1,
        "kept by default: the message may be redelivered"
    );

    // Deleting waits for the ack: reading leaves the body where it is.
    let deleting = ClaimCheck::new(Arc::new(store.clone()), 1024).delete_after_ack();
    deleting.unwrap(wrapped.clone()).await.unwrap();
    assert_eq!(store.len(), 1, "read, not yet acked");
    deleting.acked(&wrapped).await.unwrap();
    assert!(store.is_empty());
    let err = deleting.unwrap(wrapped).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Mapping,
        "a missing claim is a mapping error"
    );
}

#[tokio::test]
async fn transforms_wrap_on_post_and_unwrap_in_the_pump() {
    let broker = InMemoryBroker::new();
    let store: Arc<dyn ClaimCheckStore> = Arc::new(InMemoryClaimCheckStore::new());
    let received = Arc::new(Mutex::new(Vec::<PlaceOrder>::new()));
    let seen = received.clone();
    let p = CommandProcessor::builder()
        .command(brighter_core::handler_fn(move |o: PlaceOrder, _| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(o);
                Ok(())
            }
        }))
        .publication::<PlaceOrder>(
            Publication::command("orders")
                .transform(Compression::gzip(256))
                .transform(ClaimCheck::new(Arc::clone(&store), 512)),
        )
        .producer(broker.clone())
        .build()
        .unwrap();
    broker.declare("orders", "orders").unwrap();
    let dispatcher = Dispatcher::builder(p.clone())
        .subscription(
            Subscription::command::<PlaceOrder>("orders", "orders", broker.clone())
                .transform(Compression::gzip(256))
                .transform(ClaimCheck::new(store, 512)),
        )
        .build()
        .unwrap();
    // Random-ish text that stays above 512 bytes after gzip.
    let sku: String = (0..20_000u32)
        .map(|i| char::from(b'a' + ((i * 7919 + i / 13) % 26) as u8))
        .collect();
    let big = PlaceOrder {
        id: Uuid::now_v7(),
        sku,
        quantity: 3,
    };
    p.post(&big).await.unwrap();
    dispatcher.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    dispatcher.shutdown().await;
    assert_eq!(*received.lock().unwrap(), vec![big]);
}

#[tokio::test]
async fn the_inbox_step_handles_a_redelivered_request_once() {
    let inbox = Arc::new(InMemoryInbox::new());
    let calls = Arc::new(AtomicUsize::new(0));
    #[derive(Clone)]
    struct Count(Arc<AtomicUsize>);
    impl Handler<PlaceOrder> for Count {
        async fn handle(&self, _: &PlaceOrder, _: &mut RequestContext) -> Result<(), Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let p = CommandProcessor::builder()
        .inbox(Arc::clone(&inbox))
        .command_with(
            Pipeline::new().step(UseInbox::new("orders")),
            Count(calls.clone()),
        )
        .build()
        .unwrap();
    let cmd = order("a");
    p.send(&cmd).await.unwrap();
    p.send(&cmd).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the duplicate was skipped");
    assert!(inbox.exists(cmd.id, "orders").await.unwrap());
    p.send(&order("b")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let strict = CommandProcessor::builder()
        .inbox(Arc::clone(&inbox))
        .command_with(
            Pipeline::new().step(UseInbox::new("orders").on_duplicate(OnDuplicate::Error)),
            Count(calls.clone()),
        )
        .build()
        .unwrap();
    let err = strict.send(&cmd).await.unwrap_err();
    assert!(err.is_duplicate());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_failed_handler_is_not_recorded_in_the_inbox() {
    let inbox = Arc::new(InMemoryInbox::new());
    let p = CommandProcessor::builder()
        .inbox(Arc::clone(&inbox))
        .command_with(
            Pipeline::new().step(UseInbox::new("orders")),
            brighter_core::handler_fn(|_: PlaceOrder, _| async { Err(Error::handler("nope")) }),
        )
        .build()
        .unwrap();
    let cmd = order("a");
    p.send(&cmd).await.unwrap_err();
    assert!(
        !inbox.exists(cmd.id, "orders").await.unwrap(),
        "a retry must run the handler again"
    );
}

#[test]
fn an_inbox_step_without_an_inbox_fails_at_build() {
    let err = CommandProcessor::builder()
        .command_with(
            Pipeline::new().step(UseInbox::new("orders")),
            brighter_core::handler_fn(|_: PlaceOrder, _| async { Ok(()) }),
        )
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Configuration);
    assert!(err.to_string().contains("no inbox is configured"), "{err}");
}

#[tokio::test]
async fn the_in_memory_outbox_keeps_every_entry_and_orders_outstanding_oldest_first() {
    let outbox = InMemoryOutbox::new();
    let messages: Vec<Message> = (0..100)
        .map(|i| {
            let mut m = big_message(1);
            m.body = Bytes::from(i.to_string());
            m
        })
        .collect();
    for chunk in messages.chunks(10) {
        outbox.add(chunk, None).await.unwrap();
    }
    assert_eq!(outbox.outstanding_count().await.unwrap(), 100);
    let first = outbox.outstanding(Duration::ZERO, 5).await.unwrap();
    assert_eq!(
        first.iter().map(Message::id).collect::<Vec<_>>(),
        messages[..5].iter().map(Message::id).collect::<Vec<_>>()
    );
    let ids: HashSet<Uuid> = outbox.entries().iter().map(|e| e.message.id()).collect();
    assert_eq!(ids.len(), 100);
}

#[tokio::test]
async fn the_in_memory_outbox_lets_dispatched_entries_go_after_its_retention() {
    // A service posting through a broker without a sweeper: with the old
    // outbox every posted message stayed in memory for ever.
    let outbox = InMemoryOutbox::with_retention(Some(Duration::ZERO));
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    for i in 0..1_000 {
        p.post(&order(&i.to_string())).await.unwrap();
    }
    assert_eq!(producer.sent.lock().unwrap().len(), 1_000);
    assert!(
        outbox.entries().len() <= 1,
        "{} entries kept after 1,000 posts",
        outbox.entries().len()
    );

    // Outstanding entries are never dropped, whatever the retention.
    producer.failing.store(true, Ordering::SeqCst);
    let _ = p.post(&order("stuck")).await;
    p.post(&order("after")).await.ok();
    assert!(
        outbox.entries().iter().any(|e| e.dispatched.is_none()),
        "the failed one stays"
    );
}

#[tokio::test]
async fn a_post_whose_send_fails_is_deposited_once_even_under_retry() {
    // A handler that posts a follow-up, behind Retry; the broker is away. The
    // post deposited the message (the sweeper will send it): that is success,
    // so Retry must not run the handler again and deposit a second copy with
    // a new id, which no inbox could catch.
    struct PlaceAndNotify;
    impl Handler<Ship> for PlaceAndNotify {
        async fn handle(&self, _: &Ship, ctx: &mut RequestContext) -> Result<(), Error> {
            ctx.post(&order("follow-up")).await?;
            Ok(())
        }
    }
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    producer.failing.store(true, Ordering::SeqCst);
    let p = CommandProcessor::builder()
        .command_with(
            Pipeline::new().step(Retry::new(3).backoff(Duration::ZERO, Duration::ZERO)),
            PlaceAndNotify,
        )
        .publication::<PlaceOrder>(Publication::command("orders"))
        .producer(producer.clone())
        .outbox(outbox.clone())
        .build()
        .unwrap();
    p.send(&Ship { id: Uuid::now_v7() })
        .await
        .expect("the follow-up is in the outbox: the handler succeeded");
    let entries = outbox.entries();
    assert_eq!(entries.len(), 1, "one deposit, not one per attempt");
    assert!(entries[0].dispatched.is_none());
    assert_eq!(entries[0].attempts, 1, "the failed send is recorded");

    // The same holds for a post outside any handler.
    let id = p.post(&order("direct")).await.expect("deposited");
    assert!(outbox.entry(id).is_some_and(|e| e.dispatched.is_none()));
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ship {
    id: Uuid,
}
impl Request for Ship {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Ship {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PriceChanged {
    id: Uuid,
}
impl Request for PriceChanged {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl brighter_core::Event for PriceChanged {}

#[tokio::test]
async fn a_command_to_a_topic_no_queue_is_bound_to_stays_in_the_outbox_until_one_is() {
    let broker = InMemoryBroker::new();
    let outbox = InMemoryOutbox::new();
    let p = CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders.unbound"))
        .producer(broker.clone())
        .outbox(outbox.clone())
        .build()
        .unwrap();
    // The post succeeds (it is deposited); the message stays outstanding
    // with the reason.
    let id = p.post(&order("b")).await.unwrap();
    let entry = outbox.entry(id).unwrap();
    assert!(entry.dispatched.is_none(), "not marked dispatched");
    let reason = entry.last_error.unwrap();
    assert!(
        reason.contains("no queue is bound to topic 'orders.unbound'"),
        "{reason}"
    );
    // Once a consumer's queue is bound, the sweeper delivers it.
    broker.declare("orders.unbound", "orders-q").unwrap();
    let sweeper = OutboxSweeper::new(&p)
        .min_age(Duration::ZERO)
        .topic_backoff(Duration::ZERO, Duration::ZERO);
    assert_eq!(sweeper.sweep_once().await.unwrap().sent, 1);
    assert!(outbox.entry(id).unwrap().dispatched.is_some());
    assert_eq!(broker.waiting("orders-q"), 1);
}

#[tokio::test]
async fn an_event_publication_may_choose_to_drop_what_no_queue_is_bound_to() {
    let broker = InMemoryBroker::new();
    let outbox = InMemoryOutbox::new();
    let p = CommandProcessor::builder()
        .publication::<PriceChanged>(Publication::event("prices").drop_if_unrouted())
        .producer(broker.clone())
        .outbox(outbox.clone())
        .build()
        .unwrap();
    let id = p.post(&PriceChanged { id: Uuid::now_v7() }).await.unwrap();
    let entry = outbox.entry(id).unwrap();
    assert!(entry.dispatched.is_some(), "dropped counts as sent");
    assert!(entry.last_error.is_none());

    // Never for a command.
    let refused = CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders").drop_if_unrouted())
        .producer(broker.clone())
        .build()
        .expect_err("a command must reach its handler");
    assert!(
        refused.to_string().contains("only events may be dropped"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_claim_checked_message_keeps_its_body_through_a_requeue_until_it_is_acked() {
    let broker = InMemoryBroker::new();
    let store = InMemoryClaimCheckStore::new();
    let attempts = Arc::new(Mutex::new(Vec::<usize>::new()));
    let seen = attempts.clone();
    let p = CommandProcessor::builder()
        .command(brighter_core::handler_fn(move |o: PlaceOrder, _| {
            let seen = seen.clone();
            async move {
                let mut seen = seen.lock().unwrap();
                seen.push(o.sku.len());
                if seen.len() == 1 {
                    return Err(Error::defer(Duration::from_millis(10)));
                }
                Ok(())
            }
        }))
        .publication::<PlaceOrder>(
            Publication::command("orders").transform(ClaimCheck::new(Arc::new(store.clone()), 512)),
        )
        .producer(broker.clone())
        .build()
        .unwrap();
    broker.declare("orders", "orders").unwrap();
    let dispatcher = Dispatcher::builder(p.clone())
        .subscription(
            Subscription::command::<PlaceOrder>("orders", "orders", broker.clone())
                .transform(ClaimCheck::new(Arc::new(store.clone()), 512).delete_after_ack()),
        )
        .build()
        .unwrap();
    p.post(&order(&"x".repeat(4_000))).await.unwrap();
    assert_eq!(store.len(), 1);
    dispatcher.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    dispatcher.shutdown().await;
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![4_000, 4_000],
        "the requeued delivery had its body again"
    );
    assert!(store.is_empty(), "deleted once handled and acked");
    assert!(broker.invalid_messages("orders").is_empty());
}

#[tokio::test]
async fn a_post_never_overtakes_an_earlier_message_of_its_key_that_failed_to_send() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    producer.failing.store(true, Ordering::SeqCst);
    let first = p.post(&order("k")).await.unwrap();
    producer.failing.store(false, Ordering::SeqCst);
    // The broker is back: k's second must still wait for its first.
    let second = p.post(&order("k")).await.unwrap();
    let other = p.post(&order("j")).await.unwrap();
    let sent = |producer: &Recording| -> Vec<Uuid> {
        producer
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(Message::id)
            .collect()
    };
    assert_eq!(sent(&producer), vec![other], "only the other key went");
    assert!(outbox.entry(second).unwrap().dispatched.is_none());
    // clear_outbox of the second alone holds it back too.
    p.clear_outbox(&[second]).await.unwrap();
    assert_eq!(sent(&producer), vec![other]);
    let sweeper = OutboxSweeper::new(&p)
        .min_age(Duration::ZERO)
        .topic_backoff(Duration::ZERO, Duration::ZERO);
    assert_eq!(sweeper.sweep_once().await.unwrap().sent, 2);
    assert_eq!(sent(&producer), vec![other, first, second], "k in order");
}

/// Refuses the messages whose ids it is given, as a broker refuses a record
/// that is too large; sends the rest.
#[derive(Clone, Default)]
struct Refusing {
    refused: Arc<Mutex<HashSet<Uuid>>>,
    sent: Arc<Mutex<Vec<Uuid>>>,
}

#[async_trait]
impl Producer for Refusing {
    async fn send(&self, message: &Message) -> Result<(), Error> {
        if self.refused.lock().unwrap().contains(&message.id()) {
            return Err(Error::Refused {
                reason: "message too large".into(),
            });
        }
        self.sent.lock().unwrap().push(message.id());
        Ok(())
    }
}

#[tokio::test]
async fn a_poison_outbox_message_is_parked_and_blocks_neither_its_key_nor_its_topic() {
    let outbox = InMemoryOutbox::new();
    let producer = Refusing::default();
    let p = CommandProcessor::builder()
        .publication::<PlaceOrder>(Publication::command("orders"))
        .producer(producer.clone())
        .outbox(outbox.clone())
        .build()
        .unwrap();
    let poison = order("k");
    producer.refused.lock().unwrap().insert(poison.id);
    p.deposit_post(&poison, None).await.unwrap();
    let next = p.deposit_post(&order("k"), None).await.unwrap();
    let sweeper = OutboxSweeper::new(&p).min_age(Duration::ZERO).park_after(3);
    for attempt in 1..=2 {
        let report = sweeper.sweep_once().await.unwrap();
        assert_eq!((report.failed, report.parked), (1, 0), "attempt {attempt}");
        assert_eq!(
            report.held_back, 1,
            "k's next waits while its first is retried"
        );
    }
    let report = sweeper.sweep_once().await.unwrap();
    assert_eq!((report.failed, report.parked), (1, 1));
    // Parked: the key and the topic go on at once (no topic backoff for it).
    assert_eq!(sweeper.sweep_once().await.unwrap().sent, 1);
    assert_eq!(*producer.sent.lock().unwrap(), vec![next]);
    assert_eq!(outbox.parked_count().await.unwrap(), 1);
    let parked = outbox.parked(10).await.unwrap();
    assert_eq!(parked[0].id, poison.id);
    assert_eq!(parked[0].attempts, 3);
    assert!(
        parked[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("message too large")
    );
    assert_eq!(sweeper.sweep_once().await.unwrap().claimed, 0, "left alone");
    // Fixed (here: the broker takes it now), requeued, sent.
    producer.refused.lock().unwrap().clear();
    assert_eq!(outbox.requeue_parked(&[poison.id]).await.unwrap(), 1);
    assert_eq!(sweeper.sweep_once().await.unwrap().sent, 1);
    assert_eq!(*producer.sent.lock().unwrap(), vec![next, poison.id]);
}

#[tokio::test]
async fn a_broker_outage_never_parks_a_message() {
    let outbox = InMemoryOutbox::new();
    let producer = Recording::default();
    let p = processor(&outbox, &producer);
    producer.failing.store(true, Ordering::SeqCst);
    let id = p.post(&order("k")).await.unwrap();
    let sweeper = OutboxSweeper::new(&p)
        .min_age(Duration::ZERO)
        .topic_backoff(Duration::ZERO, Duration::ZERO)
        .park_after(2);
    for _ in 0..5 {
        assert_eq!(sweeper.sweep_once().await.unwrap().parked, 0);
    }
    assert_eq!(outbox.entry(id).unwrap().attempts, 6);
    assert_eq!(outbox.parked_count().await.unwrap(), 0);
}

#[test]
fn a_delay_header_beyond_the_longest_supported_delay_counts_as_none() {
    let header = MessageHeader::new("t", MessageType::Event);
    let decode = |delay: &str| {
        // A message without a delay carries no delay header: the one read
        // here is a producer's of its own.
        let mut pairs =
            brighter_core::wire::encode(&header, brighter_core::wire::CloudEventsBinding::Kafka);
        pairs.push((brighter_core::wire::DELAY_MS.to_owned(), delay.to_owned()));
        brighter_core::wire::decode(pairs, |_| None).unwrap().delay
    };
    assert_eq!(decode("3600000"), Duration::from_secs(3600));
    assert_eq!(decode("86400000"), brighter_core::wire::MAX_DELAY);
    assert_eq!(decode("86400001"), Duration::ZERO);
    assert_eq!(decode("1000000000000000000"), Duration::ZERO);
    assert_eq!(decode("18446744073709551615"), Duration::ZERO);
    assert_eq!(decode("-5"), Duration::ZERO);
}

#[tokio::test]
async fn the_in_memory_broker_takes_an_absurd_delay_without_a_panic() {
    let broker = InMemoryBroker::new();
    broker.declare("t", "q").unwrap();
    let mut message = big_message(10);
    message.header.topic = "t".into();
    message.header.delay = Duration::MAX;
    Producer::send(&broker, &message).await.unwrap();
    assert_eq!(broker.waiting("q"), 1, "kept");
    let mut channel = brighter_core::ChannelFactory::create_channel(
        &broker,
        &brighter_core::ChannelSpec::new("q", "t", "q"),
    )
    .await
    .unwrap();
    assert!(
        channel
            .receive(Duration::from_millis(50))
            .await
            .unwrap()
            .is_none(),
        "held back (for a century), not delivered"
    );
}

#[test]
fn reasons_on_parked_copies_are_cut_at_a_character_boundary() {
    use brighter_core::wire::{MAX_REASON_BYTES, bounded_reason};
    assert_eq!(bounded_reason("short"), "short");
    let long = "é".repeat(MAX_REASON_BYTES); // 2 bytes each
    let cut = bounded_reason(&long);
    assert_eq!(cut.len(), MAX_REASON_BYTES);
    let odd = format!("x{long}"); // the limit falls inside a character
    let cut = bounded_reason(&odd);
    assert_eq!(cut.len(), MAX_REASON_BYTES - 1);
    assert!(odd.starts_with(cut));
}
