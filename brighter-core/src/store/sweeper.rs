//! The outbox sweeper, written once for every outbox: it sends what
//! `clear_outbox` did not (a crash, a broker that was down). Each worker claims
//! a batch from the store ([`Outbox::claim`]), sends what may go now through
//! the messenger's one send path, marks what the broker confirmed, and
//! releases the claim; so sweepers in several processes never send a message
//! concurrently and never wait for each other.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::Error;
use crate::messenger::{Messenger, SweeperRunning, due_now};
use crate::store::{ClaimRequest, Outbox, SendFailure, Wake};

/// How many failed attempts park an outbox message by default (see
/// [`OutboxSweeper::park_after`]).
pub const DEFAULT_PARK_AFTER: u32 = 10;

/// What the sweeper does with dispatched messages once they are old enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Delete messages dispatched more than this long ago.
    Delete(Duration),
    /// Archive messages dispatched more than this long ago (the Postgres
    /// outbox moves them to `<table>_archive`; others delete them).
    Archive(Duration),
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Messages claimed.
    pub claimed: usize,
    /// Messages sent and marked dispatched.
    pub sent: usize,
    /// Messages whose send failed (attempts and last error recorded).
    pub failed: usize,
    /// Messages claimed but not sent: an earlier message of their partition
    /// key is outstanding outside the claim, or failed in this one.
    pub held_back: usize,
    /// Failed messages parked in this sweep (see [`OutboxSweeper::park_after`]).
    pub parked: usize,
}

/// Backoff per topic while its broker fails, so other topics keep flowing.
#[derive(Debug)]
struct TopicBackoff {
    first: Duration,
    max: Duration,
    topics: HashMap<String, (Instant, Duration)>,
}

impl TopicBackoff {
    fn blocked(&self) -> Vec<String> {
        let now = Instant::now();
        self.topics
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// Sends to `topic` failed in one sweep: back off for the first delay, or
    /// twice the last one. A failure from a sweep that began before the topic was
    /// blocked (another worker's) leaves the backoff as it is.
    fn failed(&mut self, topic: &str) {
        let now = Instant::now();
        let delay = match self.topics.get(topic) {
            None => self.first,
            Some((until, delay)) if *until > now => *delay,
            Some((_, delay)) => (*delay * 2).min(self.max),
        };
        tracing::warn!(
            topic,
            ?delay,
            "outbox sweeper: sends to topic failing; backing off"
        );
        self.topics.insert(topic.to_owned(), (now + delay, delay));
    }

    fn succeeded(&mut self, topic: &str) {
        self.topics.remove(topic);
    }
}

/// Counters of a running sweeper.
#[derive(Debug, Default)]
pub struct SweeperStats {
    sent: AtomicU64,
    failed: AtomicU64,
    parked: AtomicU64,
    notified: AtomicU64,
}

impl SweeperStats {
    /// Messages sent and marked dispatched.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Failed sends.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    /// Messages this sweeper parked ([`OutboxSweeper::park_after`]).
    pub fn parked(&self) -> u64 {
        self.parked.load(Ordering::Relaxed)
    }
    /// Wake-ups from the store's watch (notifications).
    pub fn notified(&self) -> u64 {
        self.notified.load(Ordering::Relaxed)
    }
}

/// The outbox sweeper, for any [`Outbox`].
///
/// - claims outstanding messages oldest first, `batch_size` at a time, and
///   holds the claim until the batch is marked (Postgres: `FOR UPDATE SKIP
///   LOCKED` in one transaction);
/// - sends through the messenger's one send path, all partition keys in flight
///   at once and each key one message at a time; a message the store says is
///   held (an earlier message of its key is outstanding outside the claim) is
///   not sent in this sweep;
/// - wakes on the store's watch (Postgres: `LISTEN/NOTIFY`) and polls every
///   `poll_interval` in case a notification was missed;
/// - backs off per topic while sends to it fail, without stalling other topics;
/// - parks a message that keeps failing for a reason of its own
///   ([`park_after`](Self::park_after)), so it blocks neither its key nor its
///   topic;
/// - never sends what a writer holds: with an outbox that leases
///   ([`Outbox::leases`]: the in-memory and Postgres ones), a post's message
///   is its writer's until it sent it or gave up, and `clear_outbox` takes
///   what it sends, so a sweeper sends any other message as soon as it
///   commits; with one that does not, it leaves messages younger than
///   `min_age` to the writer;
/// - sends a scheduled message when it is due (not `min_age` later: no writer
///   sends scheduled messages), waking at the earliest due time
///   ([`Outbox::next_due`]) as well as on the watch and the poll;
/// - deletes or archives dispatched messages older than the retention.
///
/// A crash between sending and marking leaves the claim unfinished: the
/// messages are sent again (at least once); consumers drop the duplicate with
/// an inbox.
///
/// ```
/// # use std::time::Duration;
/// # use brighter_core::{CommandProcessor, OutboxSweeper};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let processor = CommandProcessor::builder().build().unwrap();
/// let sweeper = OutboxSweeper::new(&processor)
///     .poll_interval(Duration::from_millis(500))
///     .min_age(Duration::from_secs(5))
///     .batch_size(100);
/// assert_eq!(sweeper.sweep_once().await.unwrap().sent, 0);
/// # });
/// ```
#[must_use]
pub struct OutboxSweeper {
    outbox: Arc<dyn Outbox>,
    messenger: Messenger,
    workers: usize,
    batch_size: usize,
    /// `None`: by the outbox ([`OutboxSweeper::min_age`]).
    min_age: Option<Duration>,
    poll_interval: Duration,
    send_timeout: Duration,
    retention: Option<Retention>,
    cleanup_interval: Duration,
    park_after: u32,
    backoff: Arc<Mutex<TopicBackoff>>,
}

impl fmt::Debug for OutboxSweeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxSweeper")
            .field("workers", &self.workers)
            .field("batch_size", &self.batch_size)
            .field("min_age", &self.min_age)
            .field("poll_interval", &self.poll_interval)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl OutboxSweeper {
    /// A sweeper of `messenger`'s outbox, sending through its producers: 2
    /// workers, batches of 500, messages as soon as they commit (older than
    /// 1 s with an outbox that does not lease), polling every 1 s, a 30 s
    /// send timeout, topic backoff from 100 ms to 30 s, no cleanup.
    pub fn new(messenger: impl Into<Messenger>) -> Self {
        let messenger = messenger.into();
        OutboxSweeper {
            outbox: Arc::clone(messenger.outbox()),
            messenger,
            workers: 2,
            // A claim's round trips are paid per batch: with 500, two workers
            // drain a backlog to Kafka and RabbitMQ at least as fast as a raw
            // relay of 500-row claims (with 100, at 0.5 of it).
            batch_size: 500,
            min_age: None,
            poll_interval: Duration::from_secs(1),
            send_timeout: Duration::from_secs(30),
            retention: None,
            cleanup_interval: Duration::from_secs(60),
            park_after: DEFAULT_PARK_AFTER,
            backoff: Arc::new(Mutex::new(TopicBackoff {
                first: Duration::from_millis(100),
                max: Duration::from_secs(30),
                topics: HashMap::new(),
            })),
        }
    }

    /// Parks a message once it has failed `attempts` times, the last time for
    /// a reason of its own ([`Error::is_message_fault`]: no queue is bound to
    /// its topic, the broker refused it as too large or malformed): no sweep
    /// claims it again, its partition key goes on without it, and it waits,
    /// counted in [`Outbox::parked_count`], the `brighter.outbox.parked`
    /// metric and [`SweeperStats::parked`], until
    /// [`Outbox::requeue_parked`] puts it back in line. Failures because a
    /// service is away (a broker outage) never park a message. Default
    /// [`DEFAULT_PARK_AFTER`]; at least 1.
    pub fn park_after(mut self, attempts: u32) -> Self {
        self.park_after = attempts.max(1);
        self
    }

    /// Sweeps `outbox` rather than the messenger's own.
    pub fn outbox(mut self, outbox: impl Outbox) -> Self {
        self.outbox = Arc::new(outbox);
        self
    }

    /// Concurrent claim-send-mark loops; more overlap store and broker time.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Messages per claim.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Messages younger than this are left alone (to a writer's
    /// `clear_outbox`). By default none with an outbox that leases what its
    /// writers send ([`Outbox::leases`]), else 1 s.
    pub fn min_age(mut self, min_age: Duration) -> Self {
        self.min_age = Some(min_age);
        self
    }

    /// The `min_age` in force: set, or the outbox's default.
    fn effective_min_age(&self) -> Duration {
        self.min_age.unwrap_or(if self.outbox.leases() {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        })
    }

    /// How often to look for messages when no wake-up came.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long one send may take before it counts as failed.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// First and longest pause of a topic whose sends fail.
    pub fn topic_backoff(self, first: Duration, max: Duration) -> Self {
        {
            let mut backoff = self.lock_backoff();
            backoff.first = first;
            backoff.max = max.max(first);
        }
        self
    }

    /// Delete or archive dispatched messages after a retention, checked every `every`.
    pub fn retention(mut self, retention: Retention, every: Duration) -> Self {
        self.retention = Some(retention);
        self.cleanup_interval = every;
        self
    }

    fn lock_backoff(&self) -> std::sync::MutexGuard<'_, TopicBackoff> {
        // Every critical section is a single map update.
        crate::sync::lock(&self.backoff)
    }

    /// How long an idle worker waits before it sweeps again: the poll
    /// interval, or less when a scheduled message falls due sooner. A due
    /// time already past (a due message whose send failed, or a topic backing
    /// off) does not shorten it: the poll retries those.
    async fn until_next_due(&self) -> Duration {
        let due = match self.outbox.next_due().await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(%error, "outbox sweeper: cannot read the next due time; polling");
                None
            }
        };
        let until = due
            .and_then(|due| (due - chrono::Utc::now()).to_std().ok())
            .filter(|until| !until.is_zero());
        until.map_or(self.poll_interval, |until| until.min(self.poll_interval))
    }

    /// One claim-send-mark cycle.
    pub async fn sweep_once(&self) -> Result<SweepReport, Error> {
        let request = ClaimRequest {
            limit: self.batch_size,
            min_age: self.effective_min_age(),
            skip_topics: self.lock_backoff().blocked(),
        };
        let mut claim = self.outbox.claim(&request).await?;
        let claimed = claim.take();
        let mut report = SweepReport {
            claimed: claimed.len(),
            ..SweepReport::default()
        };
        if claimed.is_empty() {
            claim.finish(&[], &[]).await?;
            return Ok(report);
        }
        let (ready, held): (Vec<_>, Vec<_>) = claimed.into_iter().partition(|c| !c.held);
        report.held_back = held.len();
        let attempts: HashMap<Uuid, u32> =
            ready.iter().map(|c| (c.message.id(), c.attempts)).collect();
        let sent = self
            .messenger
            .send(
                ready.into_iter().map(|c| due_now(c.message)).collect(),
                Some(self.send_timeout),
            )
            .await;
        report.held_back += sent.not_tried.len();
        report.sent = sent.sent.len();
        report.failed = sent.failed.len();
        let sent_ids: Vec<Uuid> = sent.sent.iter().map(|(id, _)| *id).collect();
        let failed: Vec<SendFailure> = sent
            .failed
            .iter()
            .map(|(id, topic, error)| {
                let tries = attempts.get(id).copied().unwrap_or(0).saturating_add(1);
                let park = error.is_message_fault() && tries >= self.park_after;
                if park {
                    tracing::error!(%id, %topic, %error, attempts = tries, "outbox sweeper: message parked; requeue it with Outbox::requeue_parked once the cause is fixed");
                    self.messenger.telemetry().record_parked(topic);
                } else {
                    tracing::warn!(%id, %topic, %error, attempts = tries, "outbox sweeper: send failed");
                }
                SendFailure {
                    id: *id,
                    error: error.to_string(),
                    park,
                }
            })
            .collect();
        report.parked = failed.iter().filter(|f| f.park).count();
        claim.finish(&sent_ids, &failed).await?;

        // Once per topic, however many of its messages failed: found by the
        // chaos suite, where one failed batch of 40 messages backed the topic off
        // for the maximum (30 s) after a RabbitMQ restart of 7 s.
        // A message refused for what it is says nothing about its topic; an
        // unroutable one does (its route is the topic).
        let failed_topics: BTreeSet<&str> = sent
            .failed
            .iter()
            .filter(|(_, _, e)| !e.is_message_fault() || matches!(e, Error::Unroutable { .. }))
            .map(|(_, t, _)| t.as_str())
            .collect();
        let mut backoff = self.lock_backoff();
        for topic in &failed_topics {
            backoff.failed(topic);
        }
        for (_, topic) in &sent.sent {
            if !failed_topics.contains(topic.as_str()) {
                backoff.succeeded(topic);
            }
        }
        Ok(report)
    }

    /// Starts watching the store for new messages, then the workers (and the
    /// cleanup when a retention is set). Returns once the watch is set up.
    pub async fn start(self) -> Result<RunningSweeper, Error> {
        let token = CancellationToken::new();
        let stats = Arc::new(SweeperStats::default());
        let (wake, first) = Wake::new();
        wake.workers(self.workers);
        self.outbox.watch(wake.clone(), token.clone()).await?;
        let running = self.messenger.sweeper_running();
        let sweeper = Arc::new(self);
        let mut tasks = Vec::with_capacity(sweeper.workers + 1);
        let mut first = Some(first);
        for index in 0..sweeper.workers {
            let receiver = first.take().unwrap_or_else(|| wake.subscribe());
            tasks.push(tokio::spawn(work(
                index,
                Arc::clone(&sweeper),
                (wake.clone(), receiver),
                token.clone(),
                Arc::clone(&stats),
            )));
        }
        if let Some(retention) = sweeper.retention {
            tasks.push(tokio::spawn(clean(
                Arc::clone(&sweeper),
                retention,
                token.clone(),
            )));
        }
        Ok(RunningSweeper {
            token,
            tasks,
            stats,
            _running: running,
        })
    }

    /// Runs until `shutdown` is cancelled, then stops as
    /// [`RunningSweeper::stop`] does. A sweeper that cannot start logs why and
    /// returns.
    pub async fn run(self, shutdown: CancellationToken) {
        match self.start().await {
            Ok(running) => {
                shutdown.cancelled().await;
                running.stop().await;
            }
            Err(error) => tracing::error!(%error, "outbox sweeper could not start"),
        }
    }
}

async fn pause(token: &CancellationToken, delay: Duration) {
    tokio::select! {
        () = token.cancelled() => {}
        () = tokio::time::sleep(delay) => {}
    }
}

/// One worker: sweeps while there is work, then waits for a wake-up or the
/// poll interval.
async fn work(
    index: usize,
    sweeper: Arc<OutboxSweeper>,
    (waker, mut wake): (Wake, watch::Receiver<u64>),
    token: CancellationToken,
    stats: Arc<SweeperStats>,
) {
    let mut error_delay = Duration::from_millis(100);
    let mut gauge_due = Instant::now();
    while !token.is_cancelled() {
        wake.borrow_and_update();
        match sweeper.sweep_once().await {
            Ok(report) => {
                error_delay = Duration::from_millis(100);
                // The outbox's gauges, by the first worker alone.
                if index == 0 && Instant::now() >= gauge_due {
                    // The outstanding gauge, at most once a second: one count query.
                    gauge_due = Instant::now() + Duration::from_secs(1);
                    let telemetry = sweeper.messenger.telemetry();
                    if let Ok(outstanding) = sweeper.outbox.outstanding_count().await {
                        telemetry.record_outstanding(outstanding);
                    }
                    if let (Ok(oldest), Ok(parked)) = (
                        sweeper.outbox.oldest_outstanding().await,
                        sweeper.outbox.parked_count().await,
                    ) {
                        let waited = oldest
                            .and_then(|at| (chrono::Utc::now() - at).to_std().ok())
                            .unwrap_or_default();
                        telemetry.record_outbox_health(waited, parked);
                    }
                }
                stats.sent.fetch_add(report.sent as u64, Ordering::Relaxed);
                stats
                    .failed
                    .fetch_add(report.failed as u64, Ordering::Relaxed);
                stats
                    .parked
                    .fetch_add(report.parked as u64, Ordering::Relaxed);
                if report.claimed >= sweeper.batch_size && report.sent > 0 {
                    continue; // more waiting: go on at once
                }
                if report.held_back > 0 {
                    // Another sweeper is sending an earlier message of a key: look again soon.
                    pause(&token, sweeper.poll_interval.min(Duration::from_millis(20))).await;
                    continue;
                }
            }
            Err(error) => {
                tracing::warn!(%error, delay = ?error_delay, "outbox sweep failed");
                pause(&token, error_delay).await;
                error_delay = (error_delay * 2).min(Duration::from_secs(30));
                continue;
            }
        }
        let idle = sweeper.until_next_due().await;
        // Found nothing more: waiting (which the watch may tell writers).
        waker.waiting(index, true);
        let waited = tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(idle) => None,
            changed = wake.changed() => Some(changed),
        };
        waker.waiting(index, false);
        if let Some(changed) = waited {
            match changed {
                // New messages were announced: let them age past min_age, then sweep.
                Ok(()) => {
                    stats.notified.fetch_add(1, Ordering::Relaxed);
                    let min_age = sweeper.effective_min_age();
                    if !min_age.is_zero() {
                        pause(&token, min_age).await;
                    }
                }
                Err(_) => pause(&token, sweeper.poll_interval).await,
            }
        }
    }
}

async fn clean(sweeper: Arc<OutboxSweeper>, retention: Retention, token: CancellationToken) {
    loop {
        let result = match retention {
            Retention::Delete(age) => sweeper.outbox.delete_dispatched(age).await,
            Retention::Archive(age) => sweeper.outbox.archive_dispatched(age).await,
        };
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, ?retention, "outbox cleanup"),
            Err(error) => tracing::warn!(%error, "outbox cleanup failed"),
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(sweeper.cleanup_interval) => {}
        }
    }
}

/// A started sweeper; stop it with [`stop`](RunningSweeper::stop).
#[derive(Debug)]
pub struct RunningSweeper {
    token: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    stats: Arc<SweeperStats>,
    /// Counts this sweeper on its messenger while it runs.
    _running: SweeperRunning,
}

impl RunningSweeper {
    /// Its counters.
    pub fn stats(&self) -> &SweeperStats {
        &self.stats
    }

    /// Stops: workers finish the batch in hand (mark and release it), then return.
    pub async fn stop(self) {
        self.token.cancel();
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "outbox sweeper task ended abnormally");
            }
        }
    }
}
