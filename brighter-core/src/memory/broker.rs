//! The in-memory transport: a broker in the process with topics and queues. A
//! topic delivers to every queue bound to it (independent subscribers); channels
//! on the same queue compete for its messages. Supports ack, requeue with a real
//! delay, dead letter and invalid-message lists with reasons, and redelivery of
//! un-acked messages when a consumer goes away. A send to a topic no queue is
//! bound to fails with `Error::Unroutable`, as a mandatory RabbitMQ publish
//! does. First-class for samples and users' tests; not a test double.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::dispatch::channel::{Channel, ChannelFactory, ChannelSpec, Delivery};
use crate::error::Error;
use crate::message::Message;
use crate::messenger::producer::Producer;
use crate::sync::instant_after;

/// A message moved aside with the reason (dead letter or invalid message).
#[derive(Debug, Clone)]
pub struct ParkedMessage {
    /// The message.
    pub message: Message,
    /// Why it was moved aside.
    pub reason: String,
}

#[derive(Debug, Default)]
struct Queue {
    topic: String,
    /// Ready messages by sequence number: FIFO, and a redelivered message keeps
    /// its place ahead of later ones.
    ready: BTreeMap<u64, Message>,
    /// Requeued or delayed messages by (due time, sequence).
    delayed: BTreeMap<(Instant, u64), Message>,
    /// Delivered, not yet settled: tag -> (sequence, consumer, message).
    in_flight: HashMap<u64, (u64, u64, Message)>,
    dead_letters: Vec<ParkedMessage>,
    invalid: Vec<ParkedMessage>,
    consumers: usize,
    auto_delete: bool,
    notify: Arc<Notify>,
}

impl Queue {
    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), message) = entry.remove_entry();
            self.ready.insert(seq, message);
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.delayed.keys().next().map(|(due, _)| *due)
    }
}

#[derive(Debug, Default)]
struct State {
    /// topic -> queue names bound to it
    bindings: HashMap<String, Vec<String>>,
    queues: HashMap<String, Queue>,
    next_seq: u64,
    next_tag: u64,
    next_consumer: u64,
}

impl State {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn declare(&mut self, topic: &str, queue: &str, auto_delete: bool) -> Result<(), Error> {
        if let Some(existing) = self.queues.get(queue) {
            if existing.topic != topic {
                return Err(Error::configuration(format!(
                    "in-memory queue '{queue}' is bound to topic '{}', not '{topic}'",
                    existing.topic
                )));
            }
            return Ok(());
        }
        self.queues.insert(
            queue.to_owned(),
            Queue {
                topic: topic.to_owned(),
                auto_delete,
                ..Queue::default()
            },
        );
        self.bindings
            .entry(topic.to_owned())
            .or_default()
            .push(queue.to_owned());
        Ok(())
    }

    fn remove_queue(&mut self, queue: &str) {
        if let Some(q) = self.queues.remove(queue)
            && let Some(bound) = self.bindings.get_mut(&q.topic)
        {
            bound.retain(|name| name != queue);
        }
    }
}

/// The in-memory broker. Cheap to clone: clones share one broker.
///
/// ```
/// use std::time::Duration;
/// use brighter_core::{ChannelFactory, ChannelSpec, InMemoryBroker, Message, MessageHeader, MessageType, Producer};
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let broker = InMemoryBroker::new();
/// let mut channel = broker.create_channel(&ChannelSpec::new("s", "greetings", "greetings.q")).await.unwrap();
/// broker.send(&Message::new(MessageHeader::new("greetings", MessageType::Command), "hi")).await.unwrap();
/// let delivery = channel.receive(Duration::from_secs(1)).await.unwrap().unwrap();
/// assert_eq!(&delivery.message.body[..], b"hi");
/// channel.ack(&delivery).await.unwrap();
/// # });
/// ```
#[derive(Debug, Clone, Default)]
pub struct InMemoryBroker {
    state: Arc<Mutex<State>>,
}

impl InMemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        InMemoryBroker::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before any call that
        // could panic; recover from poisoning rather than take the process down.
        crate::sync::lock(&self.state)
    }

    /// Declares `queue` bound to `topic` (idempotent). Channels declare their queue
    /// themselves; declare ahead when messages may be sent before a consumer starts.
    pub fn declare(&self, topic: &str, queue: &str) -> Result<(), Error> {
        self.lock().declare(topic, queue, false)
    }

    /// Messages moved to the dead-letter list of `queue`, with reasons.
    pub fn dead_letters(&self, queue: &str) -> Vec<ParkedMessage> {
        self.lock()
            .queues
            .get(queue)
            .map(|q| q.dead_letters.clone())
            .unwrap_or_default()
    }

    /// Messages moved to the invalid-message list of `queue`, with reasons.
    pub fn invalid_messages(&self, queue: &str) -> Vec<ParkedMessage> {
        self.lock()
            .queues
            .get(queue)
            .map(|q| q.invalid.clone())
            .unwrap_or_default()
    }

    /// Messages waiting in `queue` (ready or delayed), not counting in-flight ones.
    pub fn waiting(&self, queue: &str) -> usize {
        self.lock()
            .queues
            .get(queue)
            .map_or(0, |q| q.ready.len() + q.delayed.len())
    }

    /// Messages delivered from `queue` and not settled yet.
    pub fn in_flight(&self, queue: &str) -> usize {
        self.lock()
            .queues
            .get(queue)
            .map_or(0, |q| q.in_flight.len())
    }

    /// Messages ready, in flight, or delayed and due by `deadline`, over every
    /// queue (for the test kit's `until_quiet`).
    #[cfg(feature = "testing")]
    pub(crate) fn busy_by(&self, deadline: Instant) -> usize {
        self.lock()
            .queues
            .values()
            .map(|q| {
                q.ready.len()
                    + q.in_flight.len()
                    + q.delayed
                        .keys()
                        .take_while(|(due, _)| *due <= deadline)
                        .count()
            })
            .sum()
    }

    /// Every queue's dead letters, with the queue's name, by queue name.
    #[cfg(feature = "testing")]
    pub(crate) fn all_dead_letters(&self) -> Vec<(String, ParkedMessage)> {
        let state = self.lock();
        let mut queues: Vec<(&String, &Queue)> = state.queues.iter().collect();
        queues.sort_by_key(|(name, _)| *name);
        queues
            .into_iter()
            .flat_map(|(name, queue)| {
                queue
                    .dead_letters
                    .iter()
                    .chain(&queue.invalid)
                    .map(move |parked| (name.clone(), parked.clone()))
            })
            .collect()
    }

    fn publish(&self, message: &Message) -> Result<(), Error> {
        message.validate_for_send()?;
        let mut state = self.lock();
        let queues = state
            .bindings
            .get(message.header.topic.as_str())
            .cloned()
            .unwrap_or_default();
        if queues.is_empty() {
            // As RabbitMQ with a mandatory publish: refused, not dropped.
            return Err(Error::unroutable(message.header.topic.as_str()));
        }
        let due = (!message.header.delay.is_zero()).then(|| instant_after(message.header.delay));
        for name in queues {
            let seq = state.seq();
            if let Some(queue) = state.queues.get_mut(&name) {
                match due {
                    Some(due) => {
                        queue.delayed.insert((due, seq), message.clone());
                    }
                    None => {
                        queue.ready.insert(seq, message.clone());
                    }
                }
                queue.notify.notify_waiters();
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Producer for InMemoryBroker {
    fn system(&self) -> &'static str {
        "memory"
    }

    async fn send(&self, message: &Message) -> Result<(), Error> {
        self.publish(message)
    }
}

#[async_trait]
impl ChannelFactory for InMemoryBroker {
    async fn lag(&self, spec: &ChannelSpec) -> Result<Option<u64>, Error> {
        Ok(Some(self.waiting(&spec.channel) as u64))
    }

    async fn create_channel(&self, spec: &ChannelSpec) -> Result<Box<dyn Channel>, Error> {
        let mut state = self.lock();
        state.declare(&spec.topic, &spec.channel, spec.auto_delete)?;
        state.next_consumer += 1;
        let consumer = state.next_consumer;
        let notify = match state.queues.get_mut(&spec.channel) {
            Some(queue) => {
                queue.consumers += 1;
                Arc::clone(&queue.notify)
            }
            None => {
                return Err(Error::configuration(
                    "in-memory queue vanished while declaring it",
                ));
            }
        };
        Ok(Box::new(InMemoryChannel {
            broker: self.clone(),
            queue: spec.channel.clone(),
            consumer,
            notify,
            closed: false,
        }))
    }
}

/// A consumer on an in-memory queue. Dropping it (or `close`) returns its
/// unsettled messages to the queue, ahead of later ones.
#[derive(Debug)]
pub struct InMemoryChannel {
    broker: InMemoryBroker,
    queue: String,
    consumer: u64,
    notify: Arc<Notify>,
    closed: bool,
}

impl InMemoryChannel {
    fn with_queue<T>(
        &self,
        f: impl FnOnce(&mut State, &str) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut state = self.broker.lock();
        if !state.queues.contains_key(&self.queue) {
            return Err(Error::transport(
                format!("in-memory queue '{}'", self.queue),
                "queue no longer exists",
            ));
        }
        f(&mut state, &self.queue)
    }

    fn settle(&self, delivery: &Delivery) -> Result<(u64, Message), Error> {
        self.with_queue(|state, queue| {
            let q = state.queues.get_mut(queue).ok_or(Error::Shutdown)?;
            match q.in_flight.remove(&delivery.tag) {
                Some((seq, consumer, message)) if consumer == self.consumer => Ok((seq, message)),
                Some(other) => {
                    q.in_flight.insert(delivery.tag, other);
                    Err(Error::transport(
                        "settle",
                        "delivery belongs to another consumer",
                    ))
                }
                None => Err(Error::transport(
                    "settle",
                    format!(
                        "delivery {} is not in flight (already settled?)",
                        delivery.tag
                    ),
                )),
            }
        })
    }

    /// The first ready message (due delayed ones made ready first), now in
    /// flight: `Err(delivery)`; else `Ok` with when the next delayed one is
    /// due, if any.
    fn take_ready(&self) -> Result<Result<Option<Instant>, Delivery>, Error> {
        self.with_queue(|state, queue| {
            state.next_tag += 1;
            let tag = state.next_tag;
            let q = state.queues.get_mut(queue).ok_or(Error::Shutdown)?;
            q.promote_due(Instant::now());
            match q.ready.pop_first() {
                Some((seq, message)) => {
                    q.in_flight
                        .insert(tag, (seq, self.consumer, message.clone()));
                    Ok(Err(Delivery::new(message, tag)))
                }
                None => Ok(Ok(q.next_due())),
            }
        })
    }

    fn release_all(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut state = self.broker.lock();
        let remove = match state.queues.get_mut(&self.queue) {
            Some(q) => {
                let mine: Vec<u64> = q
                    .in_flight
                    .iter()
                    .filter(|(_, (_, consumer, _))| *consumer == self.consumer)
                    .map(|(tag, _)| *tag)
                    .collect();
                for tag in mine {
                    if let Some((seq, _, message)) = q.in_flight.remove(&tag) {
                        q.ready.insert(seq, message);
                    }
                }
                q.consumers = q.consumers.saturating_sub(1);
                q.notify.notify_waiters();
                q.auto_delete && q.consumers == 0
            }
            None => false,
        };
        if remove {
            state.remove_queue(&self.queue);
        }
    }
}

impl Drop for InMemoryChannel {
    fn drop(&mut self) {
        self.release_all();
    }
}

#[async_trait]
impl Channel for InMemoryChannel {
    fn system(&self) -> &'static str {
        "memory"
    }

    async fn receive(&mut self, timeout: Duration) -> Result<Option<Delivery>, Error> {
        let deadline = instant_after(timeout);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_due = self.take_ready()?;
            let wake_at = match next_due {
                Err(delivery) => return Ok(Some(delivery)),
                Ok(Some(due)) => due.min(deadline),
                Ok(None) => deadline,
            };
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    fn try_receive(&mut self) -> Option<Result<Delivery, Error>> {
        match self.take_ready() {
            Ok(Err(delivery)) => Some(Ok(delivery)),
            // None ready: `receive` waits for one.
            Ok(Ok(_)) => None,
            Err(error) => Some(Err(error)),
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), Error> {
        self.settle(delivery).map(|_| ())
    }

    fn try_ack(&mut self, delivery: &Delivery) -> Option<Result<(), Error>> {
        Some(self.settle(delivery).map(|_| ()))
    }

    async fn requeue(&mut self, delivery: Delivery, delay: Duration) -> Result<(), Error> {
        self.settle(&delivery)?;
        let message = delivery.into_message();
        self.with_queue(|state, queue| {
            let seq = state.seq();
            let q = state.queues.get_mut(queue).ok_or(Error::Shutdown)?;
            q.delayed.insert((instant_after(delay), seq), message);
            q.notify.notify_waiters();
            Ok(())
        })
    }

    async fn reject(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error> {
        let (_, message) = self.settle(&delivery)?;
        self.with_queue(|state, queue| {
            let q = state.queues.get_mut(queue).ok_or(Error::Shutdown)?;
            q.dead_letters.push(ParkedMessage {
                message,
                reason: reason.to_owned(),
            });
            Ok(())
        })
    }

    async fn invalid(&mut self, delivery: Delivery, reason: &str) -> Result<(), Error> {
        let (_, message) = self.settle(&delivery)?;
        self.with_queue(|state, queue| {
            let q = state.queues.get_mut(queue).ok_or(Error::Shutdown)?;
            q.invalid.push(ParkedMessage {
                message,
                reason: reason.to_owned(),
            });
            Ok(())
        })
    }

    async fn nack(&mut self, delivery: Delivery) -> Result<(), Error> {
        let (seq, message) = self.settle(&delivery)?;
        self.with_queue(|state, queue| {
            let q = state.queues.get_mut(queue).ok_or(Error::Shutdown)?;
            q.ready.insert(seq, message);
            q.notify.notify_waiters();
            Ok(())
        })
    }

    async fn close(&mut self) -> Result<(), Error> {
        self.release_all();
        Ok(())
    }
}
