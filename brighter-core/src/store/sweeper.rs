//! A polling outbox sweeper for any [`Outbox`](crate::Outbox): sends what
//! `clear_outbox` did not (a crash, a broker that was down). Backends may offer
//! their own, smarter sweeper (the Postgres one claims rows with
//! `FOR UPDATE SKIP LOCKED` and wakes on `LISTEN/NOTIFY`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::command::processor::CommandProcessor;
use crate::error::Error;

/// Sends outstanding outbox messages on an interval, oldest first, through the
/// processor's producers; backs off while sends fail.
///
/// ```
/// # use std::time::Duration;
/// # use brighter_core::{CommandProcessor, OutboxSweeper};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let processor = CommandProcessor::builder().build().unwrap();
/// let sweeper = OutboxSweeper::new(processor)
///     .interval(Duration::from_millis(500))
///     .min_age(Duration::from_secs(5))
///     .batch_size(100);
/// assert_eq!(sweeper.sweep_once().await.unwrap(), 0);
/// # });
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct OutboxSweeper {
    processor: CommandProcessor,
    interval: Duration,
    min_age: Duration,
    batch_size: usize,
    max_backoff: Duration,
}

impl OutboxSweeper {
    /// A sweeper for `processor`'s outbox: every second, messages older than 5 s
    /// (so the writer's own `clear_outbox` normally sends first), 100 at a time.
    pub fn new(processor: CommandProcessor) -> Self {
        OutboxSweeper {
            processor,
            interval: Duration::from_secs(1),
            min_age: Duration::from_secs(5),
            batch_size: 100,
            max_backoff: Duration::from_secs(60),
        }
    }

    /// Time between passes.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Only messages at least this old are swept.
    pub fn min_age(mut self, min_age: Duration) -> Self {
        self.min_age = min_age;
        self
    }

    /// Messages per pass.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// One pass: sends up to a batch; returns how many were sent.
    pub async fn sweep_once(&self) -> Result<usize, Error> {
        let sent = self
            .processor
            .clear_outstanding(self.min_age, self.batch_size)
            .await?;
        let outstanding = self.processor.outbox().outstanding_count().await?;
        self.processor.telemetry().record_outstanding(outstanding);
        Ok(sent)
    }

    /// Sweeps until `shutdown` is cancelled. A full batch is followed at once by
    /// another pass; failures double the wait, up to a minute.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut wait = self.interval;
        loop {
            match self.sweep_once().await {
                Ok(sent) if sent >= self.batch_size => {
                    wait = self.interval;
                    continue;
                }
                Ok(_) => wait = self.interval,
                Err(error) => {
                    tracing::warn!(%error, ?wait, "outbox sweep failed; backing off");
                    wait = (wait * 2).min(self.max_backoff);
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
