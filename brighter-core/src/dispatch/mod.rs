//! The service activator: a [`Dispatcher`] owns subscriptions and runs each with
//! its performers (reactor loops) under a supervisor.

pub(crate) mod channel;
mod health;
pub(crate) mod outcome;
mod performer;
mod subscription;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use health::{InHand, SubscriptionHealth, SubscriptionState};
pub use outcome::Outcome;
pub use subscription::{DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_HEADER_COUNT, Subscription};

use crate::command::processor::CommandProcessor;
use crate::error::Error;
use crate::sync::instant_after;
use health::Stats;

struct Entry {
    subscription: Subscription,
    stats: Arc<Stats>,
}

struct Running {
    token: CancellationToken,
    supervisors: Vec<JoinHandle<()>>,
}

/// What a shutdown (or a stop) could not finish within its drain timeout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Messages still in hand when the drain timeout passed. Their performers
    /// were stopped without settling them, so the broker delivers them again
    /// (to this service when it is back, or to another instance).
    pub abandoned: Vec<Abandoned>,
}

impl ShutdownReport {
    /// Every performer finished and settled its message in time.
    pub fn is_clean(&self) -> bool {
        self.abandoned.is_empty()
    }
}

/// A message a shutdown stopped waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    /// The subscription it was received on.
    pub subscription: String,
    /// The message, its performer and how long it had been held.
    pub in_hand: InHand,
}

/// Records `sub`'s lag every `lag_interval` until `token` is cancelled,
/// while a performer has its channel open (so its queue or topic exists).
async fn watch_lag(
    sub: Subscription,
    telemetry: crate::Telemetry,
    stats: Arc<Stats>,
    token: CancellationToken,
) {
    let spec = sub.spec();
    loop {
        if stats.running.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            match sub.factory.lag(&spec).await {
                Ok(Some(lag)) => telemetry.record_lag(&sub.topic, &sub.name, lag),
                Ok(None) => return,
                Err(error) => {
                    tracing::debug!(subscription = %sub.name, %error, "could not read the lag");
                }
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(sub.lag_interval) => {}
        }
    }
}

/// The default [`drain_timeout`](DispatcherBuilder::drain_timeout).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs subscriptions: each has `performers` reactors consuming its channel, and
/// each reactor handles one message at a time, in order, acking only after the
/// handler's work is done.
///
/// ```
/// # use std::time::Duration;
/// # use brighter_core::*;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Greet { id: uuid::Uuid }
/// # impl Request for Greet { fn id(&self) -> uuid::Uuid { self.id } }
/// # impl Command for Greet {}
/// # struct GreetHandler;
/// # impl Handler<Greet> for GreetHandler {
/// #     async fn handle(&self, _: &Greet, _: &mut RequestContext) -> Result<(), Error> { Ok(()) }
/// # }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let broker = InMemoryBroker::new();
/// let processor = CommandProcessor::builder()
///     .command(GreetHandler)
///     
///     .publication::<Greet>(Publication::command("greetings"))
///     .producer(broker.clone())
///     .build()?;
/// let dispatcher = Dispatcher::builder(processor.clone())
///     .subscription(Subscription::command::<Greet>("greetings", "greetings", broker.clone()))
///     .build()?;
/// dispatcher.start().await?;
/// processor.post(&Greet { id: uuid::Uuid::now_v7() }).await?;
/// # tokio::time::sleep(Duration::from_millis(100)).await;
/// dispatcher.shutdown().await;
/// # Ok::<(), Error>(()) }).unwrap();
/// ```
pub struct Dispatcher {
    processor: CommandProcessor,
    entries: Vec<Entry>,
    drain_timeout: Duration,
    running: tokio::sync::Mutex<HashMap<String, Running>>,
}

impl Dispatcher {
    /// Its subscriptions, as the AsyncAPI document shows them.
    pub fn subscriptions(&self) -> Vec<crate::operate::asyncapi::DescribedSubscription> {
        self.entries
            .iter()
            .map(|e| e.subscription.describe())
            .collect()
    }
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field(
                "subscriptions",
                &self
                    .entries
                    .iter()
                    .map(|e| &e.subscription)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Configures a [`Dispatcher`].
#[must_use]
#[derive(Debug)]
pub struct DispatcherBuilder {
    processor: CommandProcessor,
    subscriptions: Vec<Subscription>,
    drain_timeout: Duration,
}

impl DispatcherBuilder {
    /// How long [`shutdown`](Dispatcher::shutdown) and
    /// [`stop_subscription`](Dispatcher::stop_subscription) wait for the
    /// messages in hand to be finished and settled before they stop the
    /// performers anyway and report the messages as abandoned. Default 30 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Adds a subscription.
    pub fn subscription(mut self, subscription: Subscription) -> Self {
        self.subscriptions.push(subscription);
        self
    }

    /// Checks every subscription (unique names, sane limits, a mapper and a
    /// handler for its request type) and builds the dispatcher, not started.
    pub fn build(self) -> Result<Dispatcher, Error> {
        let mut entries: Vec<Entry> = Vec::new();
        for subscription in self.subscriptions {
            subscription.check(&self.processor)?;
            if entries
                .iter()
                .any(|e| e.subscription.name == subscription.name)
            {
                return Err(Error::configuration(format!(
                    "two subscriptions are named '{}'",
                    subscription.name
                )));
            }
            entries.push(Entry {
                subscription,
                stats: Arc::default(),
            });
        }
        Ok(Dispatcher {
            processor: self.processor,
            entries,
            drain_timeout: self.drain_timeout,
            running: tokio::sync::Mutex::new(HashMap::new()),
        })
    }
}

impl Dispatcher {
    /// Starts configuring a dispatcher that dispatches through `processor`.
    pub fn builder(processor: CommandProcessor) -> DispatcherBuilder {
        DispatcherBuilder {
            processor,
            subscriptions: Vec::new(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry, Error> {
        self.entries
            .iter()
            .find(|e| e.subscription.name == name)
            .ok_or_else(|| Error::configuration(format!("no subscription named '{name}'")))
    }

    /// Starts every subscription that is not running.
    pub async fn start(&self) -> Result<(), Error> {
        for entry in &self.entries {
            self.start_subscription(&entry.subscription.name).await?;
        }
        Ok(())
    }

    /// Starts one subscription (no-op when it is running).
    pub async fn start_subscription(&self, name: &str) -> Result<(), Error> {
        let entry = self.entry(name)?;
        let mut running = self.running.lock().await;
        if running.contains_key(name) {
            return Ok(());
        }
        let token = CancellationToken::new();
        let sub = &entry.subscription;
        let supervisors = (0..sub.performers)
            .map(|index| {
                tokio::spawn(performer::supervise(
                    sub.clone(),
                    self.processor.clone(),
                    token.clone(),
                    Arc::clone(&entry.stats),
                    index,
                ))
            })
            .collect();
        if !sub.lag_interval.is_zero() {
            tokio::spawn(watch_lag(
                sub.clone(),
                self.processor.telemetry().clone(),
                Arc::clone(&entry.stats),
                token.clone(),
            ));
        }
        entry.stats.set_state(SubscriptionState::Running);
        tracing::info!(subscription = %name, performers = sub.performers, topic = %sub.topic, "subscription started");
        running.insert(name.to_owned(), Running { token, supervisors });
        Ok(())
    }

    /// Stops one subscription gracefully: its performers stop receiving,
    /// finish and settle the message in hand and close their channels, then
    /// this returns; what is not finished within the drain timeout is
    /// abandoned (left for redelivery) and reported.
    pub async fn stop_subscription(&self, name: &str) -> Result<ShutdownReport, Error> {
        let entry = self.entry(name)?;
        let Some(running) = self.running.lock().await.remove(name) else {
            return Ok(ShutdownReport::default());
        };
        running.token.cancel();
        let mut report = ShutdownReport::default();
        let deadline = instant_after(self.drain_timeout);
        Self::drain(entry, running, deadline, &mut report).await;
        Ok(report)
    }

    /// Waits until `deadline` for the performers of `entry` to finish, then
    /// stops the rest and reports their messages as abandoned.
    async fn drain(
        entry: &Entry,
        running: Running,
        deadline: Instant,
        report: &mut ShutdownReport,
    ) {
        let name = &entry.subscription.name;
        let mut late = Vec::new();
        for mut supervisor in running.supervisors {
            match tokio::time::timeout_at(deadline, &mut supervisor).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(subscription = %name, %error, "supervisor ended abnormally");
                }
                Err(_) => late.push(supervisor),
            }
        }
        if !late.is_empty() {
            for in_hand in entry.stats.abandon_in_hand() {
                tracing::warn!(subscription = %name, id = %in_hand.id, held = ?in_hand.held, "drain timeout: message abandoned, left for redelivery");
                report.abandoned.push(Abandoned {
                    subscription: name.clone(),
                    in_hand,
                });
            }
            for supervisor in late {
                supervisor.abort();
                let _ = supervisor.await;
            }
        }
        if !matches!(entry.stats.state(), SubscriptionState::Failed(_)) {
            entry.stats.set_state(SubscriptionState::Stopped);
        }
        tracing::info!(subscription = %name, "subscription stopped");
    }

    /// Stops every subscription: first intake everywhere (no performer takes
    /// another message), then waits for the messages in hand to be finished
    /// and acknowledged, up to the drain timeout
    /// ([`DispatcherBuilder::drain_timeout`]) for all of them together; what
    /// is still in hand then is abandoned (left for redelivery) and reported.
    pub async fn shutdown(&self) -> ShutdownReport {
        let stopping: Vec<(String, Running)> = self.running.lock().await.drain().collect();
        for (_, running) in &stopping {
            running.token.cancel();
        }
        let deadline = instant_after(self.drain_timeout);
        let mut report = ShutdownReport::default();
        for (name, running) in stopping {
            if let Ok(entry) = self.entry(&name) {
                Self::drain(entry, running, deadline, &mut report).await;
            }
        }
        report
    }

    /// Health of every subscription.
    pub fn health(&self) -> Vec<SubscriptionHealth> {
        self.entries
            .iter()
            .map(|e| e.stats.snapshot(&e.subscription))
            .collect()
    }

    /// Health of one subscription.
    pub fn subscription_health(&self, name: &str) -> Option<SubscriptionHealth> {
        self.entry(name)
            .ok()
            .map(|e| e.stats.snapshot(&e.subscription))
    }
}
