//! The test kit, for a service's own tests: an in-memory processor and
//! dispatcher that record what was sent, published, posted and dead-lettered,
//! and [`TestKit::until_quiet`], which waits until no message is in flight or
//! due.
//!
//! [`TestKit::processor`] is a [`CommandProcessorBuilder`] already given the
//! kit's producer, outbox and reply channels: register the handlers and
//! publications under test on it. Subscriptions take [`TestKit::channels`].
//!
//! ```
//! use std::time::Duration;
//! use brighter_core::testing::TestKit;
//! use brighter_core::{
//!     Command, Dispatcher, Error, Event, Handler, Publication, RequestContext, Subscription,
//! };
//! use brighter_core::uuid::Uuid;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Command, Serialize, Deserialize)]
//! struct PlaceOrder { id: Uuid, item: String }
//! #[derive(Event, Serialize, Deserialize)]
//! struct OrderPlaced { id: Uuid, item: String }
//!
//! // The handler under test: it publishes an event for each order.
//! struct Orders;
//! impl Handler<PlaceOrder> for Orders {
//!     async fn handle(&self, order: &PlaceOrder, ctx: &mut RequestContext) -> Result<(), Error> {
//!         ctx.post(&OrderPlaced { id: Uuid::now_v7(), item: order.item.clone() }).await?;
//!         Ok(())
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let kit = TestKit::new();
//! let processor = kit
//!     .processor()
//!     .command(Orders)
//!     .publication::<PlaceOrder>(Publication::command("orders"))
//!     .publication::<OrderPlaced>(Publication::event("orders.placed"))
//!     .build()?;
//! let dispatcher = Dispatcher::builder(processor.clone())
//!     .subscription(Subscription::command::<PlaceOrder>("orders", "orders", kit.channels()))
//!     .build()?;
//! dispatcher.start().await?;
//! kit.until_subscribed(&dispatcher, Duration::from_secs(5)).await?;
//!
//! processor.post(&PlaceOrder { id: Uuid::now_v7(), item: "tea".into() }).await?;
//! kit.until_quiet(Duration::from_secs(5)).await?;
//!
//! assert_eq!(kit.posted_to("orders").len(), 1);
//! let placed = kit.posted_to("orders.placed");
//! assert_eq!(placed.len(), 1);
//! assert_eq!(placed[0].body_json::<OrderPlaced>()?.item, "tea");
//! assert!(kit.dead_lettered().is_empty());
//! dispatcher.shutdown().await;
//! # Ok::<(), Error>(()) }).unwrap();
//! ```

use std::any::type_name;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::command::processor::Went;
use crate::error::Error;
use crate::memory::{InMemoryBroker, InMemoryOutbox, ParkedMessage};
use crate::message::Message;
use crate::messenger::producer::Producer;
use crate::store::Outbox;
use crate::{ChannelFactory, CommandProcessor, CommandProcessorBuilder, Dispatcher, Request};

/// How a recorded request went through the processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// With `send`, to its one handler, in this process.
    Sent,
    /// With `publish`, to its handlers, in this process.
    Published,
}

/// A request the processor sent or published in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// `send` or `publish`.
    pub how: How,
    /// The request's Rust type, as `std::any::type_name` spells it.
    pub request_type: &'static str,
    /// The request's id.
    pub id: Uuid,
    /// The conversation it belongs to.
    pub correlation_id: Uuid,
}

/// The log the processor writes sends and publishes to.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    requests: Mutex<Vec<Recorded>>,
    posted: Mutex<Vec<Message>>,
}

impl Recorder {
    pub(crate) fn record(
        &self,
        went: Went,
        request_type: &'static str,
        id: Uuid,
        correlation_id: Uuid,
    ) {
        let how = match went {
            Went::Sent => How::Sent,
            Went::Published => How::Published,
        };
        crate::sync::lock(&self.requests).push(Recorded {
            how,
            request_type,
            id,
            correlation_id,
        });
    }
}

/// The kit's producer: records each message, then hands it to the in-memory
/// broker. A message for a topic no queue is bound to is recorded and
/// dropped, not refused, so a test of a handler need not subscribe to all it
/// posts.
#[derive(Debug, Clone)]
struct RecordingProducer {
    broker: InMemoryBroker,
    recorder: Arc<Recorder>,
}

#[async_trait]
impl Producer for RecordingProducer {
    fn system(&self) -> &'static str {
        "memory"
    }

    async fn send(&self, message: &Message) -> Result<(), Error> {
        match self.broker.send(message).await {
            Ok(()) | Err(Error::Unroutable { .. }) => {
                crate::sync::lock(&self.recorder.posted).push(message.clone());
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

/// An in-memory broker and outbox, and a record of what went through them.
/// Cheap to clone: clones share one kit.
#[derive(Debug, Clone, Default)]
pub struct TestKit {
    broker: InMemoryBroker,
    outbox: InMemoryOutbox,
    recorder: Arc<Recorder>,
}

impl TestKit {
    /// An empty kit.
    pub fn new() -> Self {
        TestKit::default()
    }

    /// A processor builder with the kit's producer, outbox and reply channels
    /// (and its recorder): add handlers and publications, then `build`.
    pub fn processor(&self) -> CommandProcessorBuilder {
        CommandProcessor::builder()
            .producer(RecordingProducer {
                broker: self.broker.clone(),
                recorder: Arc::clone(&self.recorder),
            })
            .outbox(self.outbox.clone())
            .reply_channels(self.broker.clone())
            .recorder(Arc::clone(&self.recorder))
    }

    /// The channel factory for subscriptions (the kit's in-memory broker).
    pub fn channels(&self) -> Arc<dyn ChannelFactory> {
        Arc::new(self.broker.clone())
    }

    /// The kit's in-memory broker.
    pub fn broker(&self) -> &InMemoryBroker {
        &self.broker
    }

    /// The kit's in-memory outbox.
    pub fn outbox(&self) -> &InMemoryOutbox {
        &self.outbox
    }

    /// Every request sent or published in this process, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        crate::sync::lock(&self.recorder.requests).clone()
    }

    /// The requests of type `R` sent with `send`, in order.
    pub fn sent<R: Request>(&self) -> Vec<Recorded> {
        self.requests_of::<R>(How::Sent)
    }

    /// The requests of type `R` published with `publish`, in order.
    pub fn published<R: Request>(&self) -> Vec<Recorded> {
        self.requests_of::<R>(How::Published)
    }

    fn requests_of<R: Request>(&self, how: How) -> Vec<Recorded> {
        let name = type_name::<R>();
        crate::sync::lock(&self.recorder.requests)
            .iter()
            .filter(|r| r.how == how && r.request_type == name)
            .cloned()
            .collect()
    }

    /// Every message handed to the broker (by `post`, `clear_outbox`, a
    /// sweeper, a reply), in order.
    pub fn posted(&self) -> Vec<Message> {
        crate::sync::lock(&self.recorder.posted).clone()
    }

    /// The messages handed to the broker for `topic`, in order.
    pub fn posted_to(&self, topic: &str) -> Vec<Message> {
        crate::sync::lock(&self.recorder.posted)
            .iter()
            .filter(|m| m.header.topic == topic)
            .cloned()
            .collect()
    }

    /// Every message the pump dead-lettered or found invalid, with the queue
    /// it came from and the reason, by queue name.
    pub fn dead_lettered(&self) -> Vec<(String, ParkedMessage)> {
        self.broker.all_dead_letters()
    }

    /// Waits until every subscription of `dispatcher` has its channel open
    /// (and so its queue declared: what is posted after this reaches it).
    pub async fn until_subscribed(
        &self,
        dispatcher: &Dispatcher,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let health = dispatcher.health();
            if health.iter().all(|h| h.is_healthy()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let waiting: Vec<String> = health
                    .iter()
                    .filter(|h| !h.is_healthy())
                    .map(|h| format!("{} ({:?})", h.name, h.state))
                    .collect();
                return Err(Error::configuration(format!(
                    "subscriptions not running within {timeout:?}: {}",
                    waiting.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the kit is quiet: no message in the outbox waiting to be
    /// sent or due, none ready or in a handler in the broker, and none
    /// deferred or scheduled to come due before `timeout` ends (those are
    /// waited for). A message due later than that does not count.
    ///
    /// Fails when it is not quiet within `timeout`, saying what was still
    /// going on (e.g. an outbox message that no sweeper sends).
    pub async fn until_quiet(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let wall_deadline = chrono::Utc::now()
            + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
        // Quiet twice in a row: a message moving from the outbox to the broker
        // between the two reads of one look is seen by the next.
        let mut quiet_looks = 0;
        loop {
            let busy = self.busy(deadline, wall_deadline).await?;
            if busy.is_none() {
                quiet_looks += 1;
                if quiet_looks == 2 {
                    return Ok(());
                }
            } else {
                quiet_looks = 0;
            }
            if tokio::time::Instant::now() >= deadline {
                let what = busy.unwrap_or_else(|| "a message moving".to_owned());
                return Err(Error::configuration(format!(
                    "not quiet within {timeout:?}: {what}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What is still going on, if anything: the outbox first, then the broker.
    async fn busy(
        &self,
        deadline: tokio::time::Instant,
        wall_deadline: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<String>, Error> {
        let outstanding = self.outbox.outstanding_count().await?;
        if outstanding > 0 {
            return Ok(Some(format!(
                "{outstanding} message(s) in the outbox not yet sent (is a sweeper running?)"
            )));
        }
        if let Some(due) = self.outbox.next_due().await?
            && due <= wall_deadline
        {
            return Ok(Some(format!(
                "a scheduled message in the outbox is due at {due}"
            )));
        }
        let in_broker = self.broker.busy_by(deadline);
        if in_broker > 0 {
            return Ok(Some(format!(
                "{in_broker} message(s) ready, in a handler or coming due in the broker"
            )));
        }
        Ok(None)
    }
}
