//! The saga conformance suite: the same checks for every saga store, both
//! of the store contract (create only when asked, lock an instance for its
//! step, refuse a stale version, roll back, retention) and of the sagas run
//! on it through a processor (a step's state, inbox record and messages
//! commit together; correlation; start vs not found; one instance's steps
//! serialize while other instances' run in parallel; a timeout fires once
//! and is ignored after completion). A store crate implements
//! [`SagaHarness`] and expands
//! [`saga_conformance_tests!`](crate::saga_conformance_tests).

// The checks are test code: a failed expectation panics, as in a test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    Command, CommandProcessor, Dispatcher, Error, Event, InMemoryBroker, Inbox, Outbox,
    OutboxSweeper, Publication, Request, RequestContext, Saga, SagaBuilder, SagaContext,
    SagaInstance, SagaNotFound, SagaStatus, SagaStep, SagaStore, Subscription,
};

/// A store under test, with the inbox and outbox that join its
/// transactions, each fresh (a schema or table of its own) per call.
#[derive(Clone)]
pub struct SagaParts {
    /// The saga store.
    pub store: Arc<dyn SagaStore>,
    /// An inbox whose transactions are the store's.
    pub inbox: Arc<dyn Inbox>,
    /// An outbox whose transactions are the store's.
    pub outbox: Arc<dyn Outbox>,
}

impl std::fmt::Debug for SagaParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaParts").finish_non_exhaustive()
    }
}

/// What the saga checks need: fresh parts per call.
#[async_trait]
pub trait SagaHarness: Send + Sync + 'static {
    /// A new, empty saga store with its inbox and outbox.
    async fn parts(&self) -> SagaParts;
}

const NAME: &str = "conformance";

// --------------------------------------------------------------- the store

/// An instance that does not exist is created only when the load asks for
/// it; saved and committed, it is there at version 1; a later step sees it
/// with its state and status.
pub async fn an_instance_is_created_only_when_asked<H: SagaHarness>(h: &H) {
    let store = h.parts().await.store;
    let mut tx = store.begin().await.unwrap();
    assert!(
        store
            .load(tx.as_mut(), NAME, "a", false)
            .await
            .unwrap()
            .is_none(),
        "created without being asked"
    );
    let mut instance = store
        .load(tx.as_mut(), NAME, "a", true)
        .await
        .unwrap()
        .expect("created when asked");
    assert!(instance.is_new());
    instance.state = serde_json::json!({"n": 1});
    instance.status = SagaStatus::Failed("no stock".into());
    assert_eq!(store.save(tx.as_mut(), &instance).await.unwrap(), 1);
    store.commit(tx).await.unwrap();
    let stored = store.get(NAME, "a").await.unwrap().expect("stored");
    assert_eq!(stored.version, 1);
    assert_eq!(stored.state, serde_json::json!({"n": 1}));
    assert_eq!(stored.status, SagaStatus::Failed("no stock".into()));
    let mut tx = store.begin().await.unwrap();
    let loaded = store
        .load(tx.as_mut(), NAME, "a", false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (loaded.version, loaded.state),
        (1, serde_json::json!({"n": 1}))
    );
    store.rollback(tx).await.unwrap();
    assert!(store.get(NAME, "b").await.unwrap().is_none());
    assert!(
        store.get("other-saga", "a").await.unwrap().is_none(),
        "keyed by saga and key"
    );
}

/// A step rolled back leaves nothing: no new instance, no changed state.
pub async fn a_rolled_back_step_leaves_nothing<H: SagaHarness>(h: &H) {
    let store = h.parts().await.store;
    let mut tx = store.begin().await.unwrap();
    let mut new = store
        .load(tx.as_mut(), NAME, "new", true)
        .await
        .unwrap()
        .unwrap();
    new.state = serde_json::json!(1);
    store.save(tx.as_mut(), &new).await.unwrap();
    store.rollback(tx).await.unwrap();
    assert!(store.get(NAME, "new").await.unwrap().is_none());

    let mut tx = store.begin().await.unwrap();
    let mut kept = store
        .load(tx.as_mut(), NAME, "kept", true)
        .await
        .unwrap()
        .unwrap();
    kept.state = serde_json::json!("first");
    store.save(tx.as_mut(), &kept).await.unwrap();
    store.commit(tx).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    let mut kept = store
        .load(tx.as_mut(), NAME, "kept", false)
        .await
        .unwrap()
        .unwrap();
    kept.state = serde_json::json!("second");
    store.save(tx.as_mut(), &kept).await.unwrap();
    drop(tx);
    let stored = store.get(NAME, "kept").await.unwrap().unwrap();
    assert_eq!(
        (stored.version, stored.state),
        (1, serde_json::json!("first"))
    );
}

/// A save whose version is not the stored one is refused.
pub async fn a_stale_version_is_refused<H: SagaHarness>(h: &H) {
    let store = h.parts().await.store;
    let mut tx = store.begin().await.unwrap();
    let instance = store
        .load(tx.as_mut(), NAME, "s", true)
        .await
        .unwrap()
        .unwrap();
    store.save(tx.as_mut(), &instance).await.unwrap();
    store.commit(tx).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    let mut instance = store
        .load(tx.as_mut(), NAME, "s", false)
        .await
        .unwrap()
        .unwrap();
    instance.version = 0;
    assert!(
        store.save(tx.as_mut(), &instance).await.is_err(),
        "stale save accepted"
    );
    drop(tx);
    assert_eq!(store.get(NAME, "s").await.unwrap().unwrap().version, 1);
}

/// A loaded instance is locked until its step ends: another load of it
/// waits (and then sees what the first saved), a load of another instance
/// does not; two loads that both create one make one instance.
pub async fn a_loaded_instance_is_locked_until_its_step_ends<H: SagaHarness>(h: &H) {
    let store = h.parts().await.store;
    let mut first = store.begin().await.unwrap();
    let mut held = store
        .load(first.as_mut(), NAME, "held", true)
        .await
        .unwrap()
        .unwrap();
    let second = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut tx = store.begin().await.unwrap();
            let mut instance = store
                .load(tx.as_mut(), NAME, "held", true)
                .await
                .unwrap()
                .unwrap();
            let seen = instance.version;
            store.save(tx.as_mut(), &instance).await.unwrap();
            instance.version += 1;
            store.commit(tx).await.unwrap();
            seen
        })
    };
    // Another instance is not held up.
    let mut other = store.begin().await.unwrap();
    let free = tokio::time::timeout(
        Duration::from_secs(5),
        store.load(other.as_mut(), NAME, "free", true),
    )
    .await;
    assert!(free.is_ok(), "another instance waited for the locked one");
    drop(other);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "a second step loaded a locked instance"
    );
    held.state = serde_json::json!("first");
    store.save(first.as_mut(), &held).await.unwrap();
    store.commit(first).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second step never got the instance")
        .unwrap();
    assert_eq!(seen, 1, "the second step saw the first one's save");
    let stored = store.get(NAME, "held").await.unwrap().unwrap();
    assert_eq!(stored.version, 2, "one instance, saved twice");
}

/// Ended instances go after their retention; running ones stay.
pub async fn ended_instances_are_deleted_after_retention<H: SagaHarness>(h: &H) {
    let store = h.parts().await.store;
    for (key, status) in [
        ("done", SagaStatus::Completed),
        ("failed", SagaStatus::Failed("x".into())),
        ("running", SagaStatus::Running),
    ] {
        let mut tx = store.begin().await.unwrap();
        let mut instance = store
            .load(tx.as_mut(), NAME, key, true)
            .await
            .unwrap()
            .unwrap();
        instance.status = status;
        store.save(tx.as_mut(), &instance).await.unwrap();
        store.commit(tx).await.unwrap();
    }
    assert_eq!(
        store.delete_ended(Duration::from_secs(3600)).await.unwrap(),
        0,
        "deleted before the retention"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.delete_ended(Duration::ZERO).await.unwrap(), 2);
    assert!(store.get(NAME, "done").await.unwrap().is_none());
    assert!(store.get(NAME, "running").await.unwrap().is_some());
}

// ----------------------------------------------------- sagas on the store

/// Starts an instance under `key`; posts a [`Noted`] and, with `timeout`,
/// schedules an [`Expire`] that far ahead.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Begin {
    /// Request id.
    pub id: Uuid,
    /// The instance.
    pub key: String,
    /// Schedule an `Expire` this many milliseconds ahead.
    pub timeout_ms: Option<u64>,
}

/// Counts one more on an existing instance; `fail` posts a [`Noted`], then
/// fails the step; `hold` waits for the test to let it go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bump {
    /// Request id.
    pub id: Uuid,
    /// The instance.
    pub key: String,
    /// Fail the step after changing the state and posting.
    pub fail: bool,
    /// Wait in the step until released.
    pub hold: bool,
}

/// Completes the instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finish {
    /// Request id.
    pub id: Uuid,
    /// The instance.
    pub key: String,
}

/// The timeout the instance schedules to itself: it fails the instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expire {
    /// Request id.
    pub id: Uuid,
    /// The instance.
    pub key: String,
}

/// What a step posts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Noted {
    /// Request id.
    pub id: Uuid,
    /// The instance.
    pub key: String,
}

macro_rules! request {
    ($($name:ident: $kind:ident),*) => {$(
        impl Request for $name {
            fn id(&self) -> Uuid {
                self.id
            }
        }
        impl $kind for $name {}
    )*};
}
request!(Begin: Command, Bump: Command, Finish: Command, Expire: Command, Noted: Event);

/// The state of a conformance instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Bumps counted.
    pub count: u64,
    /// Expires handled.
    pub expired: u32,
    /// The id of the timeout `Begin` scheduled.
    pub timeout: Option<Uuid>,
}

#[derive(Default)]
struct Gate {
    entered: Notify,
    release: Notify,
}

struct Counter {
    gate: Arc<Gate>,
}

impl Saga for Counter {
    type State = Tally;
    const NAME: &'static str = NAME;
}

impl SagaStep<Begin> for Counter {
    fn correlate(&self, m: &Begin, _: &RequestContext) -> String {
        m.key.clone()
    }
    async fn handle(&self, m: &Begin, saga: &mut SagaContext<'_, Tally>) -> Result<(), Error> {
        saga.post(&Noted {
            id: Uuid::now_v7(),
            key: m.key.clone(),
        })
        .await?;
        if let Some(ms) = m.timeout_ms {
            let expire = Expire {
                id: Uuid::now_v7(),
                key: m.key.clone(),
            };
            saga.schedule(&expire, Duration::from_millis(ms)).await?;
            saga.state_mut().timeout = Some(expire.id);
        }
        Ok(())
    }
}

impl SagaStep<Bump> for Counter {
    fn correlate(&self, m: &Bump, _: &RequestContext) -> String {
        m.key.clone()
    }
    async fn handle(&self, m: &Bump, saga: &mut SagaContext<'_, Tally>) -> Result<(), Error> {
        if m.hold {
            self.gate.entered.notify_one();
            self.gate.release.notified().await;
        }
        let before = saga.state().count;
        // Give an interleaving step every chance to read the same count.
        tokio::time::sleep(Duration::from_millis(5)).await;
        saga.state_mut().count = before + 1;
        if m.fail {
            saga.post(&Noted {
                id: Uuid::now_v7(),
                key: m.key.clone(),
            })
            .await?;
            return Err(Error::handler("the step failed after posting"));
        }
        Ok(())
    }
}

impl SagaStep<Finish> for Counter {
    fn correlate(&self, m: &Finish, _: &RequestContext) -> String {
        m.key.clone()
    }
    async fn handle(&self, _: &Finish, saga: &mut SagaContext<'_, Tally>) -> Result<(), Error> {
        saga.complete();
        Ok(())
    }
}

impl SagaStep<Expire> for Counter {
    fn correlate(&self, m: &Expire, _: &RequestContext) -> String {
        m.key.clone()
    }
    async fn handle(&self, _: &Expire, saga: &mut SagaContext<'_, Tally>) -> Result<(), Error> {
        saga.state_mut().expired += 1;
        saga.fail("timed out");
        Ok(())
    }
}

struct Rig {
    parts: SagaParts,
    processor: CommandProcessor,
    gate: Arc<Gate>,
    broker: InMemoryBroker,
    topic: String,
}

async fn rig<H: SagaHarness>(h: &H, not_found: SagaNotFound) -> Rig {
    let parts = h.parts().await;
    let gate = Arc::new(Gate::default());
    let broker = InMemoryBroker::new();
    let topic = super::unique_name("saga");
    let saga = SagaBuilder::new(
        Counter {
            gate: Arc::clone(&gate),
        },
        Arc::clone(&parts.store),
    )
    .starts::<Begin>()
    .handles::<Bump>()
    .handles::<Finish>()
    .handles::<Expire>()
    .not_found(not_found);
    let processor = CommandProcessor::builder()
        .saga(saga)
        .inbox(Arc::clone(&parts.inbox))
        .outbox(Arc::clone(&parts.outbox))
        .publication::<Noted>(Publication::event(format!("{topic}.noted")))
        .publication::<Expire>(Publication::command(format!("{topic}.expire")))
        .producer(broker.clone())
        .build()
        .unwrap();
    broker.declare(&format!("{topic}.noted"), "notes").unwrap();
    Rig {
        parts,
        processor,
        gate,
        broker,
        topic,
    }
}

impl Rig {
    async fn tally(&self, key: &str) -> Option<(SagaInstance, Tally)> {
        let instance = self.parts.store.get(NAME, key).await.unwrap()?;
        let tally = serde_json::from_value(instance.state.clone()).unwrap_or_default();
        Some((instance, tally))
    }

    async fn begin(&self, key: &str) -> Uuid {
        let id = Uuid::now_v7();
        self.processor
            .send(&Begin {
                id,
                key: key.into(),
                timeout_ms: None,
            })
            .await
            .unwrap();
        id
    }

    async fn bump(&self, key: &str) -> Result<(), Error> {
        self.processor
            .send(&Bump {
                id: Uuid::now_v7(),
                key: key.into(),
                fail: false,
                hold: false,
            })
            .await
    }
}

/// A step's state, its inbox record and the messages it posted commit
/// together; a step that fails leaves none of them; a redelivered message
/// is skipped.
pub async fn a_step_commits_state_inbox_and_messages_together<H: SagaHarness>(h: &H) {
    let rig = rig(h, SagaNotFound::DeadLetter).await;
    let begin = Begin {
        id: Uuid::now_v7(),
        key: "k".into(),
        timeout_ms: None,
    };
    rig.processor.send(&begin).await.unwrap();
    let (instance, tally) = rig.tally("k").await.expect("started");
    assert_eq!((instance.version, tally.count), (1, 0));
    assert!(
        rig.parts
            .inbox
            .exists(begin.id, "saga:conformance")
            .await
            .unwrap()
    );
    assert_eq!(
        rig.broker.waiting("notes"),
        1,
        "the step's message was sent"
    );

    let failing = Bump {
        id: Uuid::now_v7(),
        key: "k".into(),
        fail: true,
        hold: false,
    };
    let err = rig.processor.send(&failing).await.unwrap_err();
    assert!(err.to_string().contains("failed after posting"), "{err}");
    let (instance, tally) = rig.tally("k").await.unwrap();
    assert_eq!((instance.version, tally.count), (1, 0), "state unchanged");
    assert!(
        !rig.parts
            .inbox
            .exists(failing.id, "saga:conformance")
            .await
            .unwrap(),
        "inbox record of a failed step"
    );
    assert_eq!(
        rig.parts.outbox.outstanding_count().await.unwrap(),
        0,
        "a failed step's message in the outbox"
    );
    assert_eq!(
        rig.broker.waiting("notes"),
        1,
        "a failed step's message sent"
    );

    // The same Begin again (a redelivery): skipped, nothing posted twice.
    rig.processor.send(&begin).await.unwrap();
    assert_eq!(rig.tally("k").await.unwrap().0.version, 1, "handled twice");
    assert_eq!(rig.parts.outbox.outstanding_count().await.unwrap(), 0);
    assert_eq!(rig.broker.waiting("notes"), 1, "posted twice");
}

/// Each message goes to the instance its key names.
pub async fn messages_are_correlated_to_their_instance<H: SagaHarness>(h: &H) {
    let rig = rig(h, SagaNotFound::DeadLetter).await;
    rig.begin("one").await;
    rig.begin("two").await;
    for _ in 0..3 {
        rig.bump("one").await.unwrap();
    }
    rig.bump("two").await.unwrap();
    assert_eq!(rig.tally("one").await.unwrap().1.count, 3);
    assert_eq!(rig.tally("two").await.unwrap().1.count, 1);
}

/// A starting message creates the instance; a message that does not start
/// one, for an instance that does not exist, is dead-lettered with the
/// reason, or ignored (acknowledged, nothing created) when the saga says so.
pub async fn a_message_without_an_instance_is_dead_lettered_or_ignored<H: SagaHarness>(h: &H) {
    let rig = rig(h, SagaNotFound::DeadLetter).await;
    let err = rig.bump("nobody").await.unwrap_err();
    let reason = match err.outcome() {
        Some(crate::Outcome::Reject(reason)) => reason.clone(),
        other => panic!("not a rejection: {err} ({other:?})"),
    };
    assert!(
        reason.contains("no instance 'nobody'") && reason.contains("Bump"),
        "{reason}"
    );
    assert!(rig.tally("nobody").await.is_none());

    let ignoring = self::rig(h, SagaNotFound::Ignore).await;
    ignoring.bump("nobody").await.unwrap();
    assert!(
        ignoring.tally("nobody").await.is_none(),
        "created by a non-starting message"
    );
    ignoring.begin("somebody").await;
    assert!(ignoring.tally("somebody").await.is_some(), "not started");
}

/// Concurrent messages for one instance never interleave: every step sees
/// the one before it.
pub async fn concurrent_messages_for_one_instance_serialize<H: SagaHarness>(h: &H) {
    let rig = rig(h, SagaNotFound::DeadLetter).await;
    rig.begin("busy").await;
    const N: u64 = 16;
    let bumps = (0..N).map(|_| rig.bump("busy"));
    for result in futures::future::join_all(bumps).await {
        result.unwrap();
    }
    let (instance, tally) = rig.tally("busy").await.unwrap();
    assert_eq!(tally.count, N, "a step was lost to an interleaving one");
    assert_eq!(instance.version, 1 + N as i64);
}

/// While one instance's step is held, another instance's steps run.
pub async fn steps_of_different_instances_run_in_parallel<H: SagaHarness>(h: &H) {
    let rig = rig(h, SagaNotFound::DeadLetter).await;
    rig.begin("held").await;
    rig.begin("free").await;
    let held = {
        let processor = rig.processor.clone();
        tokio::spawn(async move {
            processor
                .send(&Bump {
                    id: Uuid::now_v7(),
                    key: "held".into(),
                    fail: false,
                    hold: true,
                })
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), rig.gate.entered.notified())
        .await
        .expect("the held step never started");
    tokio::time::timeout(Duration::from_secs(10), rig.bump("free"))
        .await
        .expect("another instance waited for the held one")
        .unwrap();
    assert!(!held.is_finished());
    rig.gate.release.notify_one();
    held.await.unwrap().unwrap();
    assert_eq!(rig.tally("held").await.unwrap().1.count, 1);
    assert_eq!(rig.tally("free").await.unwrap().1.count, 1);
}

/// A timeout a step schedules to itself goes through the outbox and a
/// broker: it fires once for a running instance, and is ignored (the step
/// not run) for one that completed before it came.
pub async fn a_timeout_fires_once_and_is_ignored_after_completion<H: SagaHarness>(h: &H) {
    let rig = rig(h, SagaNotFound::DeadLetter).await;
    let expire_topic = format!("{}.expire", rig.topic);
    let dispatcher = Dispatcher::builder(rig.processor.clone())
        .subscription(
            Subscription::command::<Expire>("expire", &expire_topic, rig.broker.clone())
                .empty_channel_delay(Duration::from_millis(10)),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let sweeper = OutboxSweeper::new(&rig.processor)
        .poll_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    for key in ["late", "done"] {
        rig.processor
            .send(&Begin {
                id: Uuid::now_v7(),
                key: key.into(),
                timeout_ms: Some(700),
            })
            .await
            .unwrap();
    }
    rig.processor
        .send(&Finish {
            id: Uuid::now_v7(),
            key: "done".into(),
        })
        .await
        .unwrap();
    // Both timeouts have come once the inbox recorded them (the one for
    // the completed instance is recorded as handled, and ignored).
    let timeouts = [
        rig.tally("late").await.unwrap().1.timeout.unwrap(),
        rig.tally("done").await.unwrap().1.timeout.unwrap(),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in timeouts {
        while !rig
            .parts
            .inbox
            .exists(id, "saga:conformance")
            .await
            .unwrap()
        {
            assert!(Instant::now() < deadline, "timeout {id} never came");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A second delivery would show by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sweeper.stop().await;
    dispatcher.shutdown().await;
    let (late, late_tally) = rig.tally("late").await.unwrap();
    assert_eq!(late_tally.expired, 1, "the timeout fired once");
    assert_eq!(late.status, SagaStatus::Failed("timed out".into()));
    let (done, done_tally) = rig.tally("done").await.unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    assert_eq!(
        done_tally.expired, 0,
        "the timeout ran for a completed instance"
    );
    assert_eq!(done.version, 2, "saved by Begin and Finish only");
}

/// One test per saga check, each with `$harness().await` for a fresh harness.
#[macro_export]
macro_rules! saga_conformance_tests {
    ($harness:path) => {
        $crate::saga_conformance_tests!(@tests $harness;
            an_instance_is_created_only_when_asked,
            a_rolled_back_step_leaves_nothing,
            a_stale_version_is_refused,
            a_loaded_instance_is_locked_until_its_step_ends,
            ended_instances_are_deleted_after_retention,
            a_step_commits_state_inbox_and_messages_together,
            messages_are_correlated_to_their_instance,
            a_message_without_an_instance_is_dead_lettered_or_ignored,
            concurrent_messages_for_one_instance_serialize,
            steps_of_different_instances_run_in_parallel,
            a_timeout_fires_once_and_is_ignored_after_completion,
        );
    };
    (@tests $harness:path; $($check:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let harness = $harness().await;
                $crate::conformance::saga::$check(&harness).await;
            }
        )*
    };
}
