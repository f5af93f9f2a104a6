//! The service activator: a [`Dispatcher`] owns subscriptions and runs each with
//! its performers (reactor loops) under a supervisor.

pub(crate) mod channel;
mod health;
pub(crate) mod outcome;
mod performer;
mod subscription;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use health::{SubscriptionHealth, SubscriptionState};
pub use outcome::Outcome;
pub use subscription::{DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_HEADER_COUNT, Subscription};

use crate::command::processor::CommandProcessor;
use crate::error::Error;
use health::Stats;

struct Entry {
    subscription: Subscription,
    stats: Arc<Stats>,
}

struct Running {
    token: CancellationToken,
    supervisors: Vec<JoinHandle<()>>,
}

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
    running: tokio::sync::Mutex<HashMap<String, Running>>,
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
}

impl DispatcherBuilder {
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
        entry.stats.set_state(SubscriptionState::Running);
        tracing::info!(subscription = %name, performers = sub.performers, topic = %sub.topic, "subscription started");
        running.insert(name.to_owned(), Running { token, supervisors });
        Ok(())
    }

    /// Stops one subscription gracefully: performers stop receiving, finish and
    /// settle the message in hand, close their channels; then this returns.
    pub async fn stop_subscription(&self, name: &str) -> Result<(), Error> {
        let entry = self.entry(name)?;
        let Some(running) = self.running.lock().await.remove(name) else {
            return Ok(());
        };
        running.token.cancel();
        for supervisor in running.supervisors {
            if let Err(error) = supervisor.await {
                tracing::error!(subscription = %name, %error, "supervisor ended abnormally");
            }
        }
        if !matches!(
            entry.stats.snapshot(name, 0).state,
            SubscriptionState::Failed(_)
        ) {
            entry.stats.set_state(SubscriptionState::Stopped);
        }
        tracing::info!(subscription = %name, "subscription stopped");
        Ok(())
    }

    /// Stops every subscription gracefully and waits for in-flight work to be
    /// finished and acknowledged.
    pub async fn shutdown(&self) {
        for entry in &self.entries {
            // Names come from `entries`, so the lookup cannot fail.
            let _ = self.stop_subscription(&entry.subscription.name).await;
        }
    }

    /// Health of every subscription.
    pub fn health(&self) -> Vec<SubscriptionHealth> {
        self.entries
            .iter()
            .map(|e| {
                e.stats
                    .snapshot(&e.subscription.name, e.subscription.performers)
            })
            .collect()
    }

    /// Health of one subscription.
    pub fn subscription_health(&self, name: &str) -> Option<SubscriptionHealth> {
        self.entry(name)
            .ok()
            .map(|e| e.stats.snapshot(name, e.subscription.performers))
    }
}
