//! Subscriptions: which channel a request type is consumed from, how many
//! performers consume it, and the pump's limits for it.

use std::any::type_name;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::command::processor::CommandProcessor;
use crate::conversation::slip::{RoutingSlip, follow};
use crate::dispatch::channel::{ChannelFactory, ChannelSpec};
use crate::error::Error;
use crate::message::mapper::{JsonMapper, MessageMapper};
use crate::message::transform::Transform;
use crate::message::{Message, MessageType};
use crate::operate::asyncapi::DescribedSubscription;
use crate::{Command, Event, Request, RequestContext};

/// Default of [`Subscription::max_body_size`]: 16 MiB.
pub const DEFAULT_MAX_BODY_SIZE: usize = 16 * 1024 * 1024;

/// Default of [`Subscription::max_header_count`].
pub const DEFAULT_MAX_HEADER_COUNT: usize = 1024;

/// Why the pump could not hand a message to the pipeline, or how the pipeline failed.
pub(crate) enum DispatchError {
    /// The message cannot be mapped to the request type.
    Unacceptable(String),
    /// The pipeline failed (or steered the pump with an outcome).
    Handler(Error),
}

/// Maps a message to the subscription's request type and dispatches it.
#[async_trait]
pub(crate) trait Dispatch: Send + Sync + 'static {
    fn request_type(&self) -> &'static str;
    /// The request type's short name.
    fn message(&self) -> &'static str;
    /// Command or event.
    fn kind(&self) -> MessageType;
    /// The request type's JSON Schema, if it has one.
    fn schema(&self) -> Option<serde_json::Value>;
    fn check(&self, processor: &CommandProcessor) -> Result<(), Error>;
    async fn dispatch(
        &self,
        processor: &CommandProcessor,
        message: Arc<Message>,
    ) -> Result<(), DispatchError>;
}

/// Runs a mapped request through the processor (`send_with` or `publish_with`).
type Run<R> = for<'a> fn(
    &'a CommandProcessor,
    &'a R,
    &'a mut RequestContext,
) -> BoxFuture<'a, Result<(), Error>>;

/// Maps messages to `R` and dispatches them as a command or an event.
struct TypedDispatch<R> {
    /// "command" or "event", for errors.
    kind: &'static str,
    handled: fn(&CommandProcessor) -> bool,
    run: Run<R>,
    /// The mapper when the processor has none registered for `R`.
    json: Arc<dyn MessageMapper<R>>,
}

impl<R: Command + Serialize + DeserializeOwned> TypedDispatch<R> {
    fn command() -> Self {
        TypedDispatch {
            kind: "command",
            handled: CommandProcessor::handles_command::<R>,
            run: |processor, request, ctx| Box::pin(processor.send_with(request, ctx)),
            json: Arc::new(JsonMapper),
        }
    }
}

impl<R: Event + Serialize + DeserializeOwned> TypedDispatch<R> {
    fn event() -> Self {
        TypedDispatch {
            kind: "event",
            handled: CommandProcessor::handles_event::<R>,
            run: |processor, request, ctx| Box::pin(processor.publish_with(request, ctx)),
            json: Arc::new(JsonMapper),
        }
    }
}

#[async_trait]
impl<R: Request> Dispatch for TypedDispatch<R> {
    fn request_type(&self) -> &'static str {
        type_name::<R>()
    }

    fn message(&self) -> &'static str {
        crate::messenger::short_type_name::<R>()
    }

    fn kind(&self) -> MessageType {
        if self.kind == "event" {
            MessageType::Event
        } else {
            MessageType::Command
        }
    }

    fn schema(&self) -> Option<serde_json::Value> {
        R::json_schema()
    }

    fn check(&self, processor: &CommandProcessor) -> Result<(), Error> {
        if !(self.handled)(processor) {
            return Err(Error::configuration(format!(
                "subscription for {} {} but no handler is registered",
                self.kind,
                type_name::<R>()
            )));
        }
        Ok(())
    }

    async fn dispatch(
        &self,
        processor: &CommandProcessor,
        message: Arc<Message>,
    ) -> Result<(), DispatchError> {
        let mapper = processor.messenger().mapper::<R>().unwrap_or(&self.json);
        let request = mapper
            .to_request(&message)
            .map_err(|e| DispatchError::Unacceptable(e.to_string()))?;
        // A routing slip is read before the handler runs: one that cannot be
        // read makes the message unacceptable, as a body that cannot be.
        let slip =
            RoutingSlip::of(&message).map_err(|e| DispatchError::Unacceptable(e.to_string()))?;
        let mut ctx = RequestContext::from_message(Arc::clone(&message));
        let result = (self.run)(processor, &request, &mut ctx).await;
        match slip {
            None => result,
            // Boxed: a slip's state stays out of every message's future.
            Some(slip) => Box::pin(follow(processor.messenger(), &message, &slip, result)).await,
        }
        .map_err(DispatchError::Handler)
    }
}

/// A subscription: consume `topic` through `channel` with `performers` reactors,
/// map each message to `R` and send (command) or publish (event) it.
///
/// Requeue counts: a message the handler defers is requeued at most
/// `requeue_count` times, so it is handled at most `requeue_count + 1` times; the
/// deferral after that dead-letters it. The header's handled count is the number
/// of requeues so far.
///
/// ```
/// use std::time::Duration;
/// use brighter_core::{InMemoryBroker, Subscription};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Greet { id: uuid::Uuid }
/// # impl brighter_core::Request for Greet { fn id(&self) -> uuid::Uuid { self.id } }
/// # impl brighter_core::Command for Greet {}
/// let broker = InMemoryBroker::new();
/// let subscription = Subscription::command::<Greet>("greetings", "greeting.command", broker)
///     .performers(2)
///     .requeue_count(3)
///     .requeue_delay(Duration::from_secs(1))
///     .unacceptable_message_limit(10);
/// # let _ = subscription;
/// ```
#[derive(Clone)]
#[must_use]
pub struct Subscription {
    pub(crate) name: String,
    pub(crate) topic: String,
    pub(crate) channel: String,
    pub(crate) performers: usize,
    pub(crate) buffer_size: usize,
    pub(crate) requeue_count: u32,
    pub(crate) requeue_delay: Duration,
    pub(crate) unacceptable_limit: Option<u32>,
    pub(crate) empty_channel_delay: Duration,
    pub(crate) receive_timeout: Duration,
    pub(crate) dont_ack_delay: Duration,
    pub(crate) restart_delay: (Duration, Duration),
    pub(crate) settle_attempts: u32,
    pub(crate) in_hand_limit: Duration,
    pub(crate) max_body_size: usize,
    pub(crate) max_header_count: usize,
    pub(crate) lag_interval: Duration,
    pub(crate) transforms: Vec<Arc<dyn Transform>>,
    pub(crate) factory: Arc<dyn ChannelFactory>,
    pub(crate) dispatch: Arc<dyn Dispatch>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .field("request_type", &self.dispatch.request_type())
            .field("topic", &self.topic)
            .field("channel", &self.channel)
            .field("performers", &self.performers)
            .field("buffer_size", &self.buffer_size)
            .field("requeue_count", &self.requeue_count)
            .field("requeue_delay", &self.requeue_delay)
            .field("unacceptable_limit", &self.unacceptable_limit)
            .field("max_body_size", &self.max_body_size)
            .field("max_header_count", &self.max_header_count)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    fn new(
        name: String,
        topic: String,
        factory: Arc<dyn ChannelFactory>,
        dispatch: Arc<dyn Dispatch>,
    ) -> Self {
        Subscription {
            channel: name.clone(),
            name,
            topic,
            performers: 1,
            buffer_size: 10,
            requeue_count: 3,
            requeue_delay: Duration::from_secs(1),
            unacceptable_limit: None,
            empty_channel_delay: Duration::from_millis(50),
            receive_timeout: Duration::from_millis(500),
            dont_ack_delay: Duration::from_secs(1),
            restart_delay: (Duration::from_millis(100), Duration::from_secs(30)),
            settle_attempts: 5,
            in_hand_limit: Duration::from_secs(300),
            max_body_size: DEFAULT_MAX_BODY_SIZE,
            max_header_count: DEFAULT_MAX_HEADER_COUNT,
            lag_interval: Duration::from_secs(5),
            transforms: Vec::new(),
            factory,
            dispatch,
        }
    }

    /// Consumes command `R` from `topic`; the channel (queue / group) is named
    /// after the subscription unless [`channel`](Self::channel) says otherwise.
    pub fn command<R: Command + Serialize + DeserializeOwned>(
        name: impl Into<String>,
        topic: impl Into<String>,
        factory: impl ChannelFactory,
    ) -> Self {
        Subscription::new(
            name.into(),
            topic.into(),
            Arc::new(factory),
            Arc::new(TypedDispatch::<R>::command()),
        )
    }

    /// Consumes event `R` from `topic`, running every handler of it.
    pub fn event<R: Event + Serialize + DeserializeOwned>(
        name: impl Into<String>,
        topic: impl Into<String>,
        factory: impl ChannelFactory,
    ) -> Self {
        Subscription::new(
            name.into(),
            topic.into(),
            Arc::new(factory),
            Arc::new(TypedDispatch::<R>::event()),
        )
    }

    /// The queue / consumer group name; performers on one channel compete.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// How many reactors consume the channel (competing consumers). Default 1.
    pub fn performers(mut self, performers: usize) -> Self {
        self.performers = performers;
        self
    }

    /// How many messages the transport may buffer ahead (prefetch). Default 10.
    pub fn buffer_size(mut self, buffer_size: usize) -> Self {
        self.buffer_size = buffer_size;
        self
    }

    /// How many times a deferred message is requeued before it is dead-lettered. Default 3.
    pub fn requeue_count(mut self, requeue_count: u32) -> Self {
        self.requeue_count = requeue_count;
        self
    }

    /// Delay of a requeue when the handler deferred with a zero delay. Default 1 s.
    pub fn requeue_delay(mut self, delay: Duration) -> Self {
        self.requeue_delay = delay;
        self
    }

    /// Stops the performer after this many messages that cannot be mapped. Default: no limit.
    pub fn unacceptable_message_limit(mut self, limit: u32) -> Self {
        self.unacceptable_limit = Some(limit);
        self
    }

    /// Pause after an empty receive. Default 50 ms.
    pub fn empty_channel_delay(mut self, delay: Duration) -> Self {
        self.empty_channel_delay = delay;
        self
    }

    /// How long one receive waits for a message. Default 500 ms.
    pub fn receive_timeout(mut self, timeout: Duration) -> Self {
        self.receive_timeout = timeout;
        self
    }

    /// Pause after a don't-ack outcome, before the next receive. Default 1 s.
    pub fn dont_ack_delay(mut self, delay: Duration) -> Self {
        self.dont_ack_delay = delay;
        self
    }

    /// First and longest wait before the supervisor restarts a failed performer
    /// (doubling in between). Default 100 ms to 30 s.
    pub fn restart_delay(mut self, first: Duration, max: Duration) -> Self {
        self.restart_delay = (first, max);
        self
    }

    /// How many times in a row one message may fail to be settled (its ack,
    /// requeue, dead-letter or invalid-channel publish fails, so the
    /// performer restarts and the message comes back) before the subscription
    /// is reported [`Failed`](crate::SubscriptionState::Failed) with the reason
    /// and that performer stops, instead of taking the same message round for
    /// ever. The restarts in between back off as
    /// [`restart_delay`](Self::restart_delay) says. Default 5; at least 1.
    pub fn settle_attempts(mut self, attempts: u32) -> Self {
        self.settle_attempts = attempts.max(1);
        self
    }

    /// How long a performer may hold one message (handler and settlement)
    /// before [`SubscriptionHealth::is_healthy`](crate::SubscriptionHealth::is_healthy)
    /// says no: a handler that never returns shows in health as the message
    /// it is stuck on. Default 5 minutes.
    pub fn in_hand_limit(mut self, limit: Duration) -> Self {
        self.in_hand_limit = limit;
        self
    }

    /// The largest body a message may have, in bytes, as received and after the
    /// transforms are undone; a larger one goes to the invalid-message channel
    /// unread. Default 16 MiB.
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body_size = bytes;
        self
    }

    /// The most header entries beyond the framework's own (the header bag) a
    /// message may carry; one with more goes to the invalid-message channel
    /// unread. Default 1,024.
    pub fn max_header_count(mut self, count: usize) -> Self {
        self.max_header_count = count;
        self
    }

    /// How often the dispatcher records the subscription's lag (the
    /// `brighter.subscription.lag` gauge: messages waiting for it, asked of
    /// the transport). Default 5 s; zero: never.
    pub fn lag_interval(mut self, every: Duration) -> Self {
        self.lag_interval = every;
        self
    }

    /// Why `message` is over this subscription's limits, if it is.
    pub(crate) fn over_limits(&self, message: &Message) -> Option<String> {
        let body = message.body.len();
        if body > self.max_body_size {
            return Some(format!(
                "body of {body} bytes is over the subscription's limit of {} bytes",
                self.max_body_size
            ));
        }
        let headers = message.header.bag.len();
        if headers > self.max_header_count {
            return Some(format!(
                "{headers} extra header entries are over the subscription's limit of {}",
                self.max_header_count
            ));
        }
        None
    }

    /// Adds a transform to undo when reading (listed in the order they were applied
    /// when writing; undone in reverse).
    pub fn transform(mut self, transform: impl Transform) -> Self {
        self.transforms.push(Arc::new(transform));
        self
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The subscription as the AsyncAPI document shows it.
    pub fn describe(&self) -> DescribedSubscription {
        DescribedSubscription {
            name: self.name.clone(),
            topic: self.topic.clone(),
            channel: self.channel.clone(),
            request_type: self.dispatch.request_type(),
            message: self.dispatch.message(),
            kind: self.dispatch.kind(),
            schema: self.dispatch.schema(),
            endpoint: self.factory.endpoint(),
        }
    }

    pub(crate) fn spec(&self) -> ChannelSpec {
        let mut spec =
            ChannelSpec::new(self.name.clone(), self.topic.clone(), self.channel.clone());
        spec.buffer_size = self.buffer_size;
        spec
    }

    pub(crate) fn check(&self, processor: &CommandProcessor) -> Result<(), Error> {
        let bad = |what: &str| {
            Err(Error::configuration(format!(
                "subscription '{}': {what}",
                self.name
            )))
        };
        if self.name.trim().is_empty() {
            return Err(Error::configuration("a subscription has an empty name"));
        }
        if self.topic.trim().is_empty() {
            return bad("empty topic");
        }
        if self.channel.trim().is_empty() {
            return bad("empty channel name");
        }
        if self.performers == 0 {
            return bad("needs at least one performer");
        }
        if self.buffer_size == 0 {
            return bad("buffer size must be at least 1");
        }
        if self.receive_timeout.is_zero() {
            return bad("receive timeout must be above zero");
        }
        self.dispatch.check(processor).map_err(|e| match e {
            Error::Configuration(reason) => {
                Error::Configuration(format!("subscription '{}': {reason}", self.name))
            }
            other => other,
        })
    }
}
