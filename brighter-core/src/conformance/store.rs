//! The store conformance suite: the same checks for every outbox and every
//! inbox (commit and roll back with the caller's transaction, duplicates
//! refused, claims that exclude each other, hold-back per partition key,
//! dispatched and failed marks, retention, wake-ups), as the transport suite
//! does for transports. A store crate implements [`OutboxHarness`] or
//! [`InboxHarness`] and expands [`outbox_conformance_tests!`](crate::outbox_conformance_tests)
//! or [`inbox_conformance_tests!`](crate::inbox_conformance_tests):
//!
//! ```ignore
//! async fn harness() -> MyStore { MyStore::connect().await }
//! brighter_core::outbox_conformance_tests!(harness);
//! ```

// The checks are test code: a failed expectation panics, as in a test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::{
    ClaimRequest, Error, Inbox, Message, MessageHeader, MessageType, Outbox, SendFailure,
    Transaction, Wake,
};

/// A transaction both the store and the harness know: begun, committed and
/// rolled back by the harness, joined by the store.
#[async_trait]
pub trait TransactionHarness: Send + Sync + 'static {
    /// Begins a transaction the store under test can join.
    async fn begin(&self) -> Box<dyn Transaction>;
    /// Commits `tx`.
    async fn commit(&self, tx: Box<dyn Transaction>);
    /// Rolls `tx` back.
    async fn rollback(&self, tx: Box<dyn Transaction>);
}

/// What the outbox checks need: a fresh, empty outbox per call, and the
/// transactions it joins.
#[async_trait]
pub trait OutboxHarness: Send + Sync + 'static {
    /// The transactions the outbox joins.
    fn transactions(&self) -> &dyn TransactionHarness;
    /// A new, empty outbox (a schema or table of its own).
    async fn outbox(&self) -> Arc<dyn Outbox>;
}

/// What the inbox checks need: a fresh, empty inbox per call, and the
/// transactions it joins.
#[async_trait]
pub trait InboxHarness: Send + Sync + 'static {
    /// The transactions the inbox joins.
    fn transactions(&self) -> &dyn TransactionHarness;
    /// A new, empty inbox.
    async fn inbox(&self) -> Arc<dyn Inbox>;
}

fn message(topic: &str, key: Option<&str>) -> Message {
    let mut m = Message::new(MessageHeader::new(topic, MessageType::Event), "{}");
    m.header.partition_key = key.map(str::to_owned);
    m
}

fn ids(messages: &[Message]) -> Vec<Uuid> {
    messages.iter().map(Message::id).collect()
}

fn claim_all() -> ClaimRequest {
    ClaimRequest {
        limit: 1000,
        min_age: Duration::ZERO,
        skip_topics: Vec::new(),
    }
}

/// Added in a transaction, a message is there once it commits, and never
/// when the transaction rolls back.
pub async fn outbox_commits_and_rolls_back_with_the_transaction<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let kept = message("t", None);
    let mut tx = h.transactions().begin().await;
    outbox
        .add(std::slice::from_ref(&kept), Some(tx.as_mut()))
        .await
        .unwrap();
    h.transactions().commit(tx).await;
    let dropped = message("t", None);
    let mut tx = h.transactions().begin().await;
    outbox
        .add(std::slice::from_ref(&dropped), Some(tx.as_mut()))
        .await
        .unwrap();
    h.transactions().rollback(tx).await;
    let found = outbox.get(&[kept.id(), dropped.id()]).await.unwrap();
    assert_eq!(
        ids(&found),
        vec![kept.id()],
        "committed kept, rolled back gone"
    );
    assert_eq!(outbox.outstanding_count().await.unwrap(), 1);
}

/// A message id already in the outbox is refused as a duplicate.
pub async fn outbox_refuses_a_duplicate_id<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let m = message("t", None);
    outbox.add(std::slice::from_ref(&m), None).await.unwrap();
    let err = outbox
        .add(std::slice::from_ref(&m), None)
        .await
        .unwrap_err();
    assert!(err.is_duplicate(), "{err}");
    assert_eq!(outbox.outstanding_count().await.unwrap(), 1);
}

/// Every header field and the body come back as they went in, whether the
/// message was added alone or with others, with a partition key or without
/// (stores may write each of these with a statement of its own).
pub async fn outbox_keeps_every_header_field<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let full = |key: Option<&str>| {
        let mut m = message("orders.placed", key);
        m.header.reply_to = Some("replies".into());
        m.header.handled_count = 2;
        m.header.bag.insert("tenant".into(), "acme".into());
        m.header
            .bag
            .insert("quoted \"key\"".into(), "grüße ✓ \\ \"".into());
        m.header.cloud_events.source = Some("urn:test".into());
        m.header.cloud_events.kind = Some("com.example.placed".into());
        m.header.cloud_events.subject = Some(key.unwrap_or("none").into());
        m.header.cloud_events.dataschema = Some("https://example.com/schema.json".into());
        m.header.cloud_events.specversion = Some("1.0".into());
        m.header.trace.traceparent =
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        m.header.trace.tracestate = Some("vendor=value".into());
        m.header.trace.baggage = Some("user=alice".into());
        m
    };
    let adds = [
        vec![full(None)],
        vec![full(Some("order-7"))],
        vec![full(None), full(None)],
        vec![full(Some("order-8")), full(None)],
    ];
    for added in &adds {
        outbox.add(added, None).await.unwrap();
    }
    for m in adds.iter().flatten() {
        let back = outbox.get(&[m.id()]).await.unwrap().remove(0);
        let mut expected = m.header.clone();
        // Stores keep timestamps to the microsecond.
        expected.timestamp = back.header.timestamp;
        assert_eq!(back.header, expected);
        assert_eq!(back.body, m.body);
    }
}

/// A claim returns outstanding messages oldest first, up to its limit, none
/// younger than `min_age`, none of a skipped topic; finishing it marks what
/// was sent dispatched and counts a failed attempt.
pub async fn a_claim_returns_the_oldest_first_and_finish_marks_them<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let messages: Vec<Message> = (0..5).map(|_| message("t", None)).collect();
    for m in &messages {
        outbox.add(std::slice::from_ref(m), None).await.unwrap();
    }
    let skipped = message("backing-off", None);
    outbox
        .add(std::slice::from_ref(&skipped), None)
        .await
        .unwrap();
    let young = ClaimRequest {
        min_age: Duration::from_secs(3600),
        ..claim_all()
    };
    let mut claim = outbox.claim(&young).await.unwrap();
    assert!(claim.take().is_empty(), "nothing is an hour old");
    claim.finish(&[], &[]).await.unwrap();

    let request = ClaimRequest {
        limit: 3,
        skip_topics: vec!["backing-off".into()],
        ..claim_all()
    };
    let mut claim = outbox.claim(&request).await.unwrap();
    let claimed: Vec<Uuid> = claim.take().iter().map(|c| c.message.id()).collect();
    assert_eq!(claimed, ids(&messages[..3]), "oldest first, limit 3");
    claim
        .finish(
            &[messages[0].id(), messages[1].id()],
            &[SendFailure {
                id: messages[2].id(),
                error: "broker away".into(),
                park: false,
            }],
        )
        .await
        .unwrap();
    let outstanding = outbox.get(&ids(&messages)).await.unwrap();
    assert_eq!(
        ids(&outstanding),
        ids(&messages[2..]),
        "sent ones dispatched"
    );
    assert_eq!(outbox.outstanding_count().await.unwrap(), 4);
}

/// Two claims at once never get the same message; a dropped claim releases
/// its messages unmarked.
pub async fn claims_exclude_each_other_and_a_dropped_claim_releases<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let messages: Vec<Message> = (0..4).map(|_| message("t", None)).collect();
    outbox.add(&messages, None).await.unwrap();
    let request = ClaimRequest {
        limit: 2,
        ..claim_all()
    };
    let mut first = outbox.claim(&request).await.unwrap();
    let mut second = outbox.claim(&request).await.unwrap();
    let a: Vec<Uuid> = first.take().iter().map(|c| c.message.id()).collect();
    let b: Vec<Uuid> = second.take().iter().map(|c| c.message.id()).collect();
    assert_eq!(a, ids(&messages[..2]));
    assert_eq!(
        b,
        ids(&messages[2..]),
        "the second claim skips what the first holds"
    );
    drop(first);
    second.finish(&b, &[]).await.unwrap();
    let mut again = outbox.claim(&claim_all()).await.unwrap();
    let c: Vec<Uuid> = again.take().iter().map(|c| c.message.id()).collect();
    assert_eq!(c, a, "released by the dropped claim, not marked");
    again.finish(&c, &[]).await.unwrap();
    assert_eq!(outbox.outstanding_count().await.unwrap(), 0);
}

/// Per partition key, a message whose earlier message of the key is held by
/// another claim comes back held; keys without one, and keyless messages, may go.
pub async fn a_claim_holds_back_a_key_whose_earlier_message_is_claimed_elsewhere<
    H: OutboxHarness,
>(
    h: &H,
) {
    let outbox = h.outbox().await;
    let k1 = message("t", Some("k"));
    let k2 = message("t", Some("k"));
    let other = message("t", Some("other"));
    let keyless = message("t", None);
    for m in [&k1, &k2, &other, &keyless] {
        outbox.add(std::slice::from_ref(m), None).await.unwrap();
    }
    let mut first = outbox
        .claim(&ClaimRequest {
            limit: 1,
            ..claim_all()
        })
        .await
        .unwrap();
    let held_first: Vec<Uuid> = first.take().iter().map(|c| c.message.id()).collect();
    assert_eq!(held_first, vec![k1.id()]);
    let mut second = outbox.claim(&claim_all()).await.unwrap();
    let claimed = second.take();
    let held: Vec<Uuid> = claimed
        .iter()
        .filter(|c| c.held)
        .map(|c| c.message.id())
        .collect();
    let free: Vec<Uuid> = claimed
        .iter()
        .filter(|c| !c.held)
        .map(|c| c.message.id())
        .collect();
    assert_eq!(held, vec![k2.id()], "k's second waits for its first");
    assert!(free.contains(&other.id()) && free.contains(&keyless.id()));
    second.finish(&free, &[]).await.unwrap();
    first.finish(&held_first, &[]).await.unwrap();
    let mut last = outbox.claim(&claim_all()).await.unwrap();
    let rest = last.take();
    assert_eq!(rest.len(), 1);
    assert!(!rest[0].held, "k's first is dispatched: its second may go");
    last.finish(&[rest[0].message.id()], &[]).await.unwrap();
}

/// A writer's send of fresh messages (post, `clear_outbox`) holds back a
/// keyed message whose key has an earlier outstanding message outside the
/// send, whoever holds it; the earlier ones of the key within the send, other
/// keys and keyless messages may go.
pub async fn a_send_holds_back_a_key_with_an_earlier_outstanding_message<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let failed_before = message("t", Some("k"));
    let k_later = message("t", Some("k"));
    let j1 = message("t", Some("j"));
    let j2 = message("t", Some("j"));
    let keyless = message("t", None);
    for m in [&failed_before, &k_later, &j1, &j2, &keyless] {
        outbox.add(std::slice::from_ref(m), None).await.unwrap();
    }
    let fresh = [k_later.clone(), j1, j2, keyless];
    let held = outbox.held_back(&fresh).await.unwrap();
    assert_eq!(
        held.into_iter().collect::<Vec<_>>(),
        vec![k_later.id()],
        "only k waits: its first is outstanding outside this send"
    );
    outbox
        .mark_dispatched(&[failed_before.id()], chrono::Utc::now())
        .await
        .unwrap();
    assert!(
        outbox.held_back(&fresh).await.unwrap().is_empty(),
        "once k's first is dispatched, its second may go"
    );
}

/// A message that keeps failing is parked when the sweep says so: no claim
/// takes it, it holds back nothing, it is counted and listed with its last
/// error, and a requeue puts it back in line with its attempts reset.
pub async fn a_parked_message_is_left_alone_until_requeued<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let poison = message("t", Some("k"));
    let next = message("t", Some("k"));
    outbox
        .add(std::slice::from_ref(&poison), None)
        .await
        .unwrap();
    outbox.add(std::slice::from_ref(&next), None).await.unwrap();
    let mut claim = outbox.claim(&claim_all()).await.unwrap();
    let claimed = claim.take();
    assert_eq!(claimed[0].attempts, 0);
    claim
        .finish(
            &[],
            &[SendFailure {
                id: poison.id(),
                error: "message too large".into(),
                park: true,
            }],
        )
        .await
        .unwrap();
    assert_eq!(outbox.parked_count().await.unwrap(), 1);
    assert_eq!(
        outbox.outstanding_count().await.unwrap(),
        1,
        "parked is not outstanding"
    );
    let parked = outbox.parked(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].id, poison.id());
    assert_eq!(parked[0].attempts, 1);
    assert_eq!(parked[0].last_error.as_deref(), Some("message too large"));
    let mut claim = outbox.claim(&claim_all()).await.unwrap();
    let claimed = claim.take();
    assert_eq!(claimed.len(), 1, "the parked one is not claimed");
    assert_eq!(claimed[0].message.id(), next.id());
    assert!(!claimed[0].held, "and it no longer holds back its key");
    claim.finish(&[next.id()], &[]).await.unwrap();

    assert_eq!(
        outbox
            .requeue_parked(&[poison.id(), next.id()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(outbox.parked_count().await.unwrap(), 0);
    let mut claim = outbox.claim(&claim_all()).await.unwrap();
    let claimed = claim.take();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].message.id(), poison.id());
    assert_eq!(claimed[0].attempts, 0, "attempts start again");
    claim.finish(&[poison.id()], &[]).await.unwrap();
}

/// A message's age, for `min_age`, counts from when it was added, not from
/// when its transaction began: a message added late in a long transaction is
/// young when it commits, and left to its writer's own `clear_outbox`.
pub async fn min_age_counts_from_the_add_not_from_the_transaction_start<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let mut tx = h.transactions().begin().await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // a long transaction
    let late = message("t", None);
    outbox
        .add(std::slice::from_ref(&late), Some(tx.as_mut()))
        .await
        .unwrap();
    h.transactions().commit(tx).await;
    let request = ClaimRequest {
        min_age: Duration::from_secs(1),
        ..claim_all()
    };
    let mut claim = outbox.claim(&request).await.unwrap();
    let claimed = claim.take();
    claim.finish(&[], &[]).await.unwrap();
    assert!(
        claimed.is_empty(),
        "a message added a moment ago is not a second old, however long its transaction ran"
    );
}

/// Dispatched messages are deleted after the retention; outstanding ones never.
pub async fn delete_dispatched_removes_only_dispatched_messages<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let sent = message("t", None);
    let waiting = message("t", None);
    outbox
        .add(&[sent.clone(), waiting.clone()], None)
        .await
        .unwrap();
    outbox
        .mark_dispatched(
            &[sent.id()],
            chrono::Utc::now() - chrono::Duration::seconds(120),
        )
        .await
        .unwrap();
    assert_eq!(
        outbox
            .delete_dispatched(Duration::from_secs(3600))
            .await
            .unwrap(),
        0,
        "not old enough"
    );
    assert_eq!(
        outbox
            .delete_dispatched(Duration::from_secs(60))
            .await
            .unwrap(),
        1
    );
    assert_eq!(outbox.outstanding_count().await.unwrap(), 1);
    assert_eq!(
        ids(&outbox.get(&[waiting.id()]).await.unwrap()),
        vec![waiting.id()]
    );
}

/// A sweeper watching the outbox is woken when a message is added.
pub async fn watch_wakes_on_add<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (wake, mut woken) = Wake::new();
    outbox.watch(wake, shutdown.clone()).await.unwrap();
    outbox.add(&[message("t", None)], None).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), woken.changed()).await;
    shutdown.cancel();
    assert!(
        got.is_ok_and(|changed| changed.is_ok()),
        "no wake-up within 10 s of an add"
    );
}

/// A message added with a delay is scheduled: no claim returns it, `get`
/// does not, it is not counted outstanding and `next_due` says when it is
/// due; once due, a claim returns it whatever its `min_age`.
pub async fn a_scheduled_message_is_claimed_only_once_due<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let mut m = message("t", None);
    let delay = Duration::from_millis(1500);
    m.header.delay = delay;
    let added = chrono::Utc::now();
    outbox.add(std::slice::from_ref(&m), None).await.unwrap();
    let mut claim = outbox.claim(&claim_all()).await.unwrap();
    assert!(claim.take().is_empty(), "claimed before it was due");
    claim.finish(&[], &[]).await.unwrap();
    assert!(
        outbox.get(&[m.id()]).await.unwrap().is_empty(),
        "get returned a scheduled message"
    );
    assert_eq!(outbox.outstanding_count().await.unwrap(), 0);
    let due = outbox.next_due().await.unwrap().expect("a due time");
    let after = (due - added).to_std().unwrap_or_default();
    assert!(
        after >= delay - Duration::from_millis(50) && after < delay + Duration::from_secs(5),
        "due {after:?} after the add, scheduled {delay:?}"
    );
    tokio::time::sleep(delay + Duration::from_millis(200)).await;
    let hour_old = ClaimRequest {
        min_age: Duration::from_secs(3600),
        ..claim_all()
    };
    let mut claim = outbox.claim(&hour_old).await.unwrap();
    let claimed = claim.take();
    assert_eq!(
        claimed.len(),
        1,
        "a due message is claimed whatever min_age"
    );
    assert!(!claimed[0].held);
    claim.finish(&[m.id()], &[]).await.unwrap();
    assert_eq!(
        outbox.next_due().await.unwrap(),
        None,
        "nothing left scheduled"
    );
}

/// A scheduled message holds back no message of its partition key until it
/// is due: a later message of the key goes first.
pub async fn a_scheduled_message_holds_back_no_key_until_due<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let mut later = message("t", Some("k"));
    later.header.delay = Duration::from_secs(3600);
    let now = message("t", Some("k"));
    outbox
        .add(std::slice::from_ref(&later), None)
        .await
        .unwrap();
    outbox.add(std::slice::from_ref(&now), None).await.unwrap();
    assert!(
        outbox
            .held_back(std::slice::from_ref(&now))
            .await
            .unwrap()
            .is_empty()
    );
    let mut claim = outbox.claim(&claim_all()).await.unwrap();
    let claimed = claim.take();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].message.id(), now.id());
    assert!(!claimed[0].held, "held back by a message due in an hour");
    claim.finish(&[now.id()], &[]).await.unwrap();
}

/// A cancelled scheduled message is gone: never claimed, not due; cancelling
/// it again, an unscheduled message, or one a claim holds and sends, says
/// `false`.
pub async fn a_cancelled_scheduled_message_is_never_claimed<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let mut cancelled = message("t", None);
    cancelled.header.delay = Duration::from_millis(300);
    let plain = message("t", None);
    outbox
        .add(&[cancelled.clone(), plain.clone()], None)
        .await
        .unwrap();
    assert!(outbox.cancel_scheduled(cancelled.id()).await.unwrap());
    assert!(
        !outbox.cancel_scheduled(cancelled.id()).await.unwrap(),
        "cancelled twice"
    );
    assert!(
        !outbox.cancel_scheduled(plain.id()).await.unwrap(),
        "cancelled an unscheduled message"
    );
    assert_eq!(outbox.next_due().await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut claim = outbox.claim(&claim_all()).await.unwrap();
    let claimed: Vec<Uuid> = claim.take().iter().map(|c| c.message.id()).collect();
    assert_eq!(
        claimed,
        vec![plain.id()],
        "the cancelled message was claimed"
    );
    claim.finish(&[plain.id()], &[]).await.unwrap();

    // One a sweeper holds: the cancel answers after the sweep, which sent it.
    let mut held = message("t", None);
    held.header.delay = Duration::from_millis(100);
    outbox.add(std::slice::from_ref(&held), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut claim = outbox.claim(&claim_all()).await.unwrap();
    assert_eq!(claim.take().len(), 1);
    let cancel = {
        let outbox = Arc::clone(&outbox);
        let id = held.id();
        tokio::spawn(async move { outbox.cancel_scheduled(id).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    claim.finish(&[held.id()], &[]).await.unwrap();
    assert!(
        !cancel.await.unwrap(),
        "cancelled a message the sweeper sent"
    );
}

/// Recorded in a transaction, an inbox entry exists once it commits and never
/// when it rolls back; a second record of the same id and key is a duplicate,
/// the same id under another key is not.
pub async fn inbox_records_once_with_the_transaction<H: InboxHarness>(h: &H) {
    let inbox = h.inbox().await;
    let (kept, dropped) = (Uuid::now_v7(), Uuid::now_v7());
    let mut tx = h.transactions().begin().await;
    inbox.add(kept, "handler", Some(tx.as_mut())).await.unwrap();
    h.transactions().commit(tx).await;
    let mut tx = h.transactions().begin().await;
    inbox
        .add(dropped, "handler", Some(tx.as_mut()))
        .await
        .unwrap();
    h.transactions().rollback(tx).await;
    assert!(inbox.exists(kept, "handler").await.unwrap());
    assert!(!inbox.exists(dropped, "handler").await.unwrap());
    let err: Error = inbox.add(kept, "handler", None).await.unwrap_err();
    assert!(err.is_duplicate(), "{err}");
    let mut tx = h.transactions().begin().await;
    let err = inbox
        .add(kept, "handler", Some(tx.as_mut()))
        .await
        .unwrap_err();
    assert!(err.is_duplicate(), "in a transaction too: {err}");
    h.transactions().rollback(tx).await;
    inbox.add(kept, "other-handler", None).await.unwrap();
    assert!(inbox.exists(kept, "other-handler").await.unwrap());
}

/// An inbox entry keeps its conversation: the entries of one correlation id
/// come back, oldest first, with their request type, message type and topic;
/// another conversation's do not.
pub async fn inbox_lists_a_conversation<H: InboxHarness>(h: &H) {
    let inbox = h.inbox().await;
    let (conversation, other) = (Uuid::now_v7(), Uuid::now_v7());
    let first = crate::InboxEntry {
        correlation_id: Some(conversation),
        request_type: Some("PlaceOrder".into()),
        ..crate::InboxEntry::new(Uuid::now_v7(), "orders")
    };
    let second = crate::InboxEntry {
        correlation_id: Some(conversation),
        request_type: Some("PaymentTaken".into()),
        message_type: Some(MessageType::Event),
        topic: Some("payments.taken".into()),
        ..crate::InboxEntry::new(Uuid::now_v7(), "orders.paid")
    };
    let elsewhere = crate::InboxEntry {
        correlation_id: Some(other),
        ..crate::InboxEntry::new(Uuid::now_v7(), "orders")
    };
    inbox.record(&first, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut tx = h.transactions().begin().await;
    inbox.record(&second, Some(tx.as_mut())).await.unwrap();
    h.transactions().commit(tx).await;
    inbox.record(&elsewhere, None).await.unwrap();
    let err = inbox.record(&first, None).await.unwrap_err();
    assert!(err.is_duplicate(), "{err}");
    let found = inbox.by_correlation(conversation).await.unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    for (got, sent) in found.iter().zip([&first, &second]) {
        assert!(got.handled_at.is_some(), "no time recorded");
        let mut got = got.clone();
        got.handled_at = None;
        assert_eq!(&got, sent);
    }
    assert!(inbox.exists(first.id, "orders").await.unwrap());
}

/// Every message of a conversation comes back, whatever its state
/// (outstanding, scheduled, dispatched, parked), in the order added; and the
/// oldest outstanding one says how far behind the outbox is.
pub async fn outbox_lists_a_conversation<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    let conversation = Uuid::now_v7();
    let of = |delay: Duration| {
        let mut m = message("t", None);
        m.header.correlation_id = conversation;
        m.header.delay = delay;
        m
    };
    let (sent, parked, waiting, scheduled) = (
        of(Duration::ZERO),
        of(Duration::ZERO),
        of(Duration::ZERO),
        of(Duration::from_secs(3600)),
    );
    let unrelated = message("t", None);
    assert_eq!(outbox.oldest_outstanding().await.unwrap(), None);
    for m in [&sent, &parked, &waiting, &scheduled, &unrelated] {
        outbox.add(std::slice::from_ref(m), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut claim = outbox.claim(&claim_all()).await.unwrap();
    claim.take();
    claim
        .finish(
            &[sent.id(), unrelated.id()],
            &[SendFailure {
                id: parked.id(),
                error: "refused".into(),
                park: true,
            }],
        )
        .await
        .unwrap();
    let found = outbox.by_correlation(conversation).await.unwrap();
    assert_eq!(
        ids(&found.iter().map(|e| e.message.clone()).collect::<Vec<_>>()),
        vec![sent.id(), parked.id(), waiting.id(), scheduled.id()]
    );
    assert!(found[0].dispatched.is_some(), "dispatched");
    assert!(found[1].parked.is_some() && found[1].last_error.as_deref() == Some("refused"));
    assert!(found[2].dispatched.is_none() && found[2].parked.is_none() && found[2].due.is_none());
    assert!(found[3].due.is_some(), "scheduled");
    let (got, sent) = (&found[2].message.header, &waiting.header);
    assert_eq!(
        (got.topic.as_str(), got.correlation_id, got.message_type),
        (sent.topic.as_str(), sent.correlation_id, sent.message_type),
        "the header comes back"
    );
    let oldest = outbox
        .oldest_outstanding()
        .await
        .unwrap()
        .expect("one outstanding");
    assert_eq!(
        oldest, found[2].created,
        "the waiting one, not the scheduled or parked one"
    );
}

/// A message added for its writer to send is leased to it: no claim returns
/// it until the writer releases it or records a failure (then it is the
/// sweepers' at once). Outboxes that do not lease skip this.
pub async fn a_message_added_to_send_is_no_sweepers_while_leased<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    if !outbox.leases() {
        return;
    }
    let hour = Duration::from_secs(3600);
    let posted: Vec<Message> = (0..3).map(|_| message("t", None)).collect();
    outbox.add_to_send(&posted, hour).await.unwrap();
    let deposited = message("t", None);
    outbox
        .add(std::slice::from_ref(&deposited), None)
        .await
        .unwrap();
    let claimed = |outbox: Arc<dyn Outbox>| async move {
        let mut claim = outbox.claim(&claim_all()).await.unwrap();
        let ids: Vec<Uuid> = claim.take().iter().map(|c| c.message.id()).collect();
        claim.finish(&[], &[]).await.unwrap();
        ids
    };
    assert_eq!(
        claimed(Arc::clone(&outbox)).await,
        vec![deposited.id()],
        "only the deposited one is a sweeper's"
    );
    assert!(
        outbox
            .take_to_send(&ids(&posted), hour)
            .await
            .unwrap()
            .is_empty(),
        "a leased message is taken by no other writer either"
    );
    outbox.release(&[posted[0].id()]).await.unwrap();
    outbox
        .mark_failed(posted[1].id(), "broker away")
        .await
        .unwrap();
    let mut after: Vec<Uuid> = claimed(Arc::clone(&outbox)).await;
    after.sort();
    let mut expected = vec![deposited.id(), posted[0].id(), posted[1].id()];
    expected.sort();
    assert_eq!(
        after, expected,
        "released and failed ones are the sweepers'"
    );
}

/// A writer's `take_to_send` and a sweeper's claim never both get a
/// message: the claim's are skipped by the take, the taken ones by later
/// claims, until their lease ends.
pub async fn take_to_send_and_claims_never_share_a_message<H: OutboxHarness>(h: &H) {
    let outbox = h.outbox().await;
    if !outbox.leases() {
        return;
    }
    let messages: Vec<Message> = (0..4).map(|_| message("t", None)).collect();
    outbox.add(&messages, None).await.unwrap();
    let mut claim = outbox
        .claim(&ClaimRequest {
            limit: 2,
            ..claim_all()
        })
        .await
        .unwrap();
    let held: Vec<Uuid> = claim.take().iter().map(|c| c.message.id()).collect();
    assert_eq!(held, ids(&messages[..2]));
    let taken = outbox
        .take_to_send(&ids(&messages), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(ids(&taken), ids(&messages[2..]), "the claim's are skipped");
    let mut other = outbox.claim(&claim_all()).await.unwrap();
    assert!(other.take().is_empty(), "the taken ones are leased");
    other.finish(&[], &[]).await.unwrap();
    claim.finish(&held, &[]).await.unwrap();
    outbox
        .mark_dispatched(&ids(&taken), chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(outbox.outstanding_count().await.unwrap(), 0);
    // A short lease ends: the message is any sweeper's again.
    let late = message("t", None);
    outbox
        .add_to_send(std::slice::from_ref(&late), Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut claim = outbox.claim(&claim_all()).await.unwrap();
    let after: Vec<Uuid> = claim.take().iter().map(|c| c.message.id()).collect();
    claim.finish(&after, &[]).await.unwrap();
    assert_eq!(after, vec![late.id()], "a lease ends");
}

/// One test per outbox check, each with `$harness().await` for a fresh harness.
#[macro_export]
macro_rules! outbox_conformance_tests {
    ($harness:path) => {
        $crate::outbox_conformance_tests!(@tests $harness;
            outbox_commits_and_rolls_back_with_the_transaction,
            outbox_refuses_a_duplicate_id,
            outbox_keeps_every_header_field,
            a_claim_returns_the_oldest_first_and_finish_marks_them,
            claims_exclude_each_other_and_a_dropped_claim_releases,
            a_claim_holds_back_a_key_whose_earlier_message_is_claimed_elsewhere,
            a_send_holds_back_a_key_with_an_earlier_outstanding_message,
            a_parked_message_is_left_alone_until_requeued,
            delete_dispatched_removes_only_dispatched_messages,
            watch_wakes_on_add,
            min_age_counts_from_the_add_not_from_the_transaction_start,
            a_scheduled_message_is_claimed_only_once_due,
            a_scheduled_message_holds_back_no_key_until_due,
            a_cancelled_scheduled_message_is_never_claimed,
            outbox_lists_a_conversation,
            a_message_added_to_send_is_no_sweepers_while_leased,
            take_to_send_and_claims_never_share_a_message,
        );
    };
    (@tests $harness:path; $($check:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let harness = $harness().await;
                $crate::conformance::store::$check(&harness).await;
            }
        )*
    };
}

/// One test per inbox check, each with `$harness().await` for a fresh harness.
#[macro_export]
macro_rules! inbox_conformance_tests {
    ($harness:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inbox_records_once_with_the_transaction() {
            let harness = $harness().await;
            $crate::conformance::store::inbox_records_once_with_the_transaction(&harness).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn inbox_lists_a_conversation() {
            let harness = $harness().await;
            $crate::conformance::store::inbox_lists_a_conversation(&harness).await;
        }
    };
}
