//! [`PgSweeper`]: sends outbox rows that were not sent at once (a crash, a broker
//! that was down). Each worker claims a batch with `FOR UPDATE SKIP LOCKED`, sends
//! it, marks what the broker confirmed, and commits; so sweepers in several
//! processes never send a row concurrently and never wait for each other.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brighter_core::{CommandProcessor, Error, Message};
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::outbox::{PgOutbox, millis, store};
use crate::row::{OutboxRow, from_row};

/// What the sweeper does with dispatched rows once they are old enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Delete rows dispatched more than this long ago.
    Delete(Duration),
    /// Move rows dispatched more than this long ago to `<table>_archive`.
    Archive(Duration),
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows sent and marked dispatched.
    pub sent: usize,
    /// Rows whose send failed (attempts and last error recorded).
    pub failed: usize,
    /// Rows claimed but not sent: an earlier row of their partition key is not
    /// dispatched yet, or an earlier row of their key failed in this batch.
    pub held_back: usize,
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
    notified: AtomicU64,
}

impl SweeperStats {
    /// Rows sent and marked dispatched.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Failed sends.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    /// Notifications received.
    pub fn notified(&self) -> u64 {
        self.notified.load(Ordering::Relaxed)
    }
}

/// The outbox sweeper for [`PgOutbox`].
///
/// - claims outstanding rows oldest first, `batch_size` at a time, with
///   `FOR UPDATE SKIP LOCKED`, and holds the claim until the batch is marked;
/// - sends through the processor's producer for each topic, all partition keys
///   in flight at once, and for each key one message at a time: a later message
///   of a key is sent only after the earlier one was confirmed, and never while
///   an earlier row of its key is outstanding outside this batch (only the
///   sweeper holding a key's oldest outstanding row sends that key);
/// - wakes on `LISTEN/NOTIFY` within milliseconds of a commit, and polls every
///   `poll_interval` in case a notification was missed;
/// - backs off per topic while sends to it fail, without stalling other topics;
/// - leaves rows younger than `min_age` to the writer's own `clear_outbox`;
/// - deletes or archives dispatched rows older than the retention.
///
/// A crash between sending and marking leaves the claim uncommitted: the rows
/// are sent again (at least once); consumers drop the duplicate with an inbox.
#[must_use]
pub struct PgSweeper {
    outbox: PgOutbox,
    processor: CommandProcessor,
    workers: usize,
    batch_size: usize,
    min_age: Duration,
    poll_interval: Duration,
    send_timeout: Duration,
    retention: Option<Retention>,
    cleanup_interval: Duration,
    backoff: Arc<Mutex<TopicBackoff>>,
}

impl fmt::Debug for PgSweeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSweeper")
            .field("outbox", &self.outbox)
            .field("workers", &self.workers)
            .field("batch_size", &self.batch_size)
            .field("min_age", &self.min_age)
            .field("poll_interval", &self.poll_interval)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl PgSweeper {
    /// A sweeper of `outbox` sending through `processor`'s producers: 2 workers,
    /// batches of 100, rows older than 1 s, polling every 1 s, topic backoff from
    /// 100 ms to 30 s, no cleanup.
    pub fn new(outbox: PgOutbox, processor: CommandProcessor) -> Self {
        PgSweeper {
            outbox,
            processor,
            workers: 2,
            batch_size: 100,
            min_age: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            send_timeout: Duration::from_secs(30),
            retention: None,
            cleanup_interval: Duration::from_secs(60),
            backoff: Arc::new(Mutex::new(TopicBackoff {
                first: Duration::from_millis(100),
                max: Duration::from_secs(30),
                topics: HashMap::new(),
            })),
        }
    }

    /// Concurrent claim-send-mark loops; more overlap database and broker time.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Rows per claim.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Rows younger than this are left to the writer's `clear_outbox`.
    pub fn min_age(mut self, min_age: Duration) -> Self {
        self.min_age = min_age;
        self
    }

    /// How often to look for rows when no notification came.
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
        if let Ok(mut backoff) = self.backoff.lock() {
            backoff.first = first;
            backoff.max = max.max(first);
        }
        self
    }

    /// Delete or archive dispatched rows after a retention, checked every `every`.
    pub fn retention(mut self, retention: Retention, every: Duration) -> Self {
        self.retention = Some(retention);
        self.cleanup_interval = every;
        self
    }

    fn backoff(&self) -> std::sync::MutexGuard<'_, TopicBackoff> {
        // Every critical section is a single map update.
        self.backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One claim-send-mark cycle.
    pub async fn sweep_once(&self) -> Result<SweepReport, Error> {
        let tables = &self.outbox.tables;
        let blocked_topics = self.backoff().blocked();
        let mut tx = tables.pool.begin().await.map_err(store("begin a sweep"))?;
        let rows = sqlx::query(&tables.sql.claim)
            .bind(millis(self.min_age))
            .bind(i64::try_from(self.batch_size).unwrap_or(i64::MAX))
            .bind(blocked_topics)
            .fetch_all(&mut *tx)
            .await
            .map_err(store("claim outbox rows"))?;
        let mut report = SweepReport {
            claimed: rows.len(),
            ..SweepReport::default()
        };
        if rows.is_empty() {
            tx.commit().await.map_err(store("end a sweep"))?;
            return Ok(report);
        }
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            match from_row(row) {
                Ok(row) => claimed.push(row),
                // Left outstanding and visible in the table; it holds back its key.
                Err(e) => {
                    tracing::error!(error = %e, "outbox sweeper: cannot decode a row; skipped")
                }
            }
        }

        let (ready, held) = split_by_key_order(&tables.sql.key_positions, &mut tx, claimed).await?;
        report.held_back = held.len();

        let outcome = send_in_key_order(
            &self.processor,
            ready.into_iter().map(|r| r.message).collect(),
            self.send_timeout,
        )
        .await;
        report.held_back += outcome.not_tried;
        report.sent = outcome.sent.len();
        report.failed = outcome.failed.len();
        if !outcome.sent.is_empty() {
            sqlx::query(&tables.sql.mark_dispatched)
                .bind(&outcome.sent)
                .bind(chrono::Utc::now())
                .execute(&mut *tx)
                .await
                .map_err(store("mark outbox rows dispatched"))?;
        }
        if !outcome.failed.is_empty() {
            let (ids, errors): (Vec<Uuid>, Vec<String>) = outcome
                .failed
                .iter()
                .map(|(id, _, e)| (*id, e.clone()))
                .unzip();
            sqlx::query(&tables.sql.mark_failed_many)
                .bind(ids)
                .bind(errors)
                .execute(&mut *tx)
                .await
                .map_err(store("record outbox send failures"))?;
        }
        tx.commit().await.map_err(store("commit a sweep"))?;

        // Once per topic, however many of its messages failed: found by the
        // chaos suite, where one failed batch of 40 messages backed the topic off
        // for the maximum (30 s) after a RabbitMQ restart of 7 s.
        let failed_topics: std::collections::BTreeSet<&str> =
            outcome.failed.iter().map(|(_, t, _)| t.as_str()).collect();
        let mut backoff = self.backoff();
        for topic in failed_topics {
            backoff.failed(topic);
        }
        for topic in &outcome.ok_topics {
            if !outcome.failed.iter().any(|(_, t, _)| t == topic) {
                backoff.succeeded(topic);
            }
        }
        Ok(report)
    }

    /// Starts listening for notifications, then the workers (and the cleanup
    /// when a retention is set). Returns once the listener is subscribed.
    pub async fn start(self) -> Result<RunningSweeper, Error> {
        let token = CancellationToken::new();
        let stats = Arc::new(SweeperStats::default());
        let mut listener = PgListener::connect_with(self.outbox.pool())
            .await
            .map_err(store("connect the outbox listener"))?;
        listener
            .listen(self.outbox.channel())
            .await
            .map_err(store("LISTEN on the outbox channel"))?;
        let (wake, _) = watch::channel(0u64);
        let wake = Arc::new(wake);
        let mut tasks = vec![tokio::spawn(listen(
            listener,
            Arc::clone(&wake),
            token.clone(),
            Arc::clone(&stats),
        ))];
        let sweeper = Arc::new(self);
        for _ in 0..sweeper.workers {
            tasks.push(tokio::spawn(work(
                Arc::clone(&sweeper),
                wake.subscribe(),
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
        })
    }
}

/// Splits claimed rows into those that may be sent now and those held back. For
/// each partition key, the outstanding rows of that key up to the last one
/// claimed are read; only the leading run of them that this batch holds may go.
/// A row of the key that another sweeper holds (or that is not visible yet)
/// stops the run, so a later message of a key never goes before an earlier one.
/// Only the holder of a key's oldest outstanding row can pass, so this also
/// keeps several sweepers from sending one key at once.
async fn split_by_key_order(
    sql: &str,
    tx: &mut sqlx::PgConnection,
    claimed: Vec<OutboxRow>,
) -> Result<(Vec<OutboxRow>, Vec<OutboxRow>), Error> {
    let mut last: HashMap<String, i64> = HashMap::new();
    for row in &claimed {
        if let Some(key) = &row.message.header.partition_key {
            last.insert(key.clone(), row.position);
        }
    }
    if last.is_empty() {
        return Ok((claimed, Vec::new()));
    }
    let (keys, lasts): (Vec<String>, Vec<i64>) = last.into_iter().unzip();
    let outstanding: Vec<(String, i64)> = sqlx::query_as(sql)
        .bind(keys)
        .bind(lasts)
        .fetch_all(&mut *tx)
        .await
        .map_err(store("read partition key order"))?;
    let mut by_key: HashMap<&str, Vec<i64>> = HashMap::new();
    for (key, position) in &outstanding {
        by_key.entry(key.as_str()).or_default().push(*position);
    }
    // Claimed rows are in position order; walk each key's outstanding list in step.
    let mut next_index: HashMap<String, usize> = HashMap::new();
    let mut stopped: HashSet<String> = HashSet::new();
    let (mut ready, mut held) = (Vec::new(), Vec::new());
    for row in claimed {
        let Some(key) = row.message.header.partition_key.clone() else {
            ready.push(row);
            continue;
        };
        let index = next_index.entry(key.clone()).or_insert(0);
        let expected = by_key
            .get(key.as_str())
            .and_then(|p| p.get(*index))
            .copied();
        if !stopped.contains(&key) && expected == Some(row.position) {
            *index += 1;
            ready.push(row);
        } else {
            stopped.insert(key);
            held.push(row);
        }
    }
    Ok((ready, held))
}

/// What sending a batch did.
struct SendOutcome {
    sent: Vec<Uuid>,
    failed: Vec<(Uuid, String, String)>,
    ok_topics: Vec<String>,
    /// Messages not tried because an earlier one of their key failed.
    not_tried: usize,
}

/// Sends `messages` (in outbox order) through the messenger's one send path,
/// which keeps per-key order.
async fn send_in_key_order(
    processor: &CommandProcessor,
    messages: Vec<Message>,
    timeout: Duration,
) -> SendOutcome {
    let report = processor.messenger().send(messages, Some(timeout)).await;
    let mut outcome = SendOutcome {
        sent: Vec::with_capacity(report.sent.len()),
        failed: Vec::with_capacity(report.failed.len()),
        ok_topics: Vec::new(),
        not_tried: report.not_tried.len(),
    };
    for (id, topic) in report.sent {
        outcome.sent.push(id);
        if !outcome.ok_topics.contains(&topic) {
            outcome.ok_topics.push(topic);
        }
    }
    for (id, topic, error) in report.failed {
        tracing::warn!(%id, %topic, %error, "outbox sweeper: send failed");
        outcome.failed.push((id, topic, error.to_string()));
    }
    outcome
}

async fn listen(
    mut listener: PgListener,
    wake: Arc<watch::Sender<u64>>,
    token: CancellationToken,
    stats: Arc<SweeperStats>,
) {
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            notification = listener.recv() => match notification {
                Ok(_) => {
                    stats.notified.fetch_add(1, Ordering::Relaxed);
                    wake.send_modify(|n| *n = n.wrapping_add(1));
                }
                Err(error) => {
                    // PgListener reconnects on the next recv; notifications sent
                    // meanwhile are lost, which the workers' polling covers.
                    tracing::warn!(%error, "outbox listener lost its connection; reconnecting");
                    tokio::select! {
                        () = token.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            },
        }
    }
}

async fn pause(token: &CancellationToken, delay: Duration) {
    tokio::select! {
        () = token.cancelled() => {}
        () = tokio::time::sleep(delay) => {}
    }
}

async fn work(
    sweeper: Arc<PgSweeper>,
    mut wake: watch::Receiver<u64>,
    token: CancellationToken,
    stats: Arc<SweeperStats>,
) {
    let mut error_delay = Duration::from_millis(100);
    let mut gauge_due = tokio::time::Instant::now();
    while !token.is_cancelled() {
        wake.borrow_and_update();
        match sweeper.sweep_once().await {
            Ok(report) => {
                error_delay = Duration::from_millis(100);
                if tokio::time::Instant::now() >= gauge_due {
                    // The outstanding gauge, at most once a second: one count query.
                    gauge_due = tokio::time::Instant::now() + Duration::from_secs(1);
                    if let Ok(outstanding) =
                        brighter_core::Outbox::outstanding_count(&sweeper.outbox).await
                    {
                        sweeper
                            .processor
                            .telemetry()
                            .record_outstanding(outstanding);
                    }
                }
                stats.sent.fetch_add(report.sent as u64, Ordering::Relaxed);
                stats
                    .failed
                    .fetch_add(report.failed as u64, Ordering::Relaxed);
                if report.claimed >= sweeper.batch_size && report.sent > 0 {
                    continue; // more waiting: go on at once
                }
                if report.held_back > 0 {
                    // Another sweeper is sending an earlier row of a key: look again soon.
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
        tokio::select! {
            () = token.cancelled() => return,
            changed = wake.changed() => match changed {
                // A commit was announced: let it age past min_age, then sweep.
                Ok(()) => if !sweeper.min_age.is_zero() { pause(&token, sweeper.min_age).await },
                Err(_) => pause(&token, sweeper.poll_interval).await,
            },
            () = tokio::time::sleep(sweeper.poll_interval) => {}
        }
    }
}

async fn clean(sweeper: Arc<PgSweeper>, retention: Retention, token: CancellationToken) {
    loop {
        let result = match retention {
            Retention::Delete(age) => {
                brighter_core::Outbox::delete_dispatched(&sweeper.outbox, age).await
            }
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
}

impl RunningSweeper {
    /// Its counters.
    pub fn stats(&self) -> &SweeperStats {
        &self.stats
    }

    /// Stops: workers finish the batch in hand (commit or roll back), then return.
    pub async fn stop(self) {
        self.token.cancel();
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "outbox sweeper task ended abnormally");
            }
        }
    }
}
