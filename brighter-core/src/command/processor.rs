//! The command processor: dispatches commands to their one handler and events to
//! all of theirs, through each registration's pipeline.

use std::any::{Any, TypeId, type_name};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::join_all;
use rustc_hash::FxHashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::command::handler::{DynHandler, Handler};
use crate::command::pipeline::{
    CircuitBreaker, CircuitBreakerConfig, FeatureFlags, Identity, Pipeline, Resources, Step,
};
use crate::dispatch::channel::ChannelFactory;
use crate::error::Error;
use crate::message::mapper::MessageMapper;
use crate::message::publication::Publication;
use crate::messenger::producer::Producer;
use crate::messenger::{Messenger, MessengerBuilder, short_type_name};
use crate::store::inbox::Inbox;
use crate::store::{Outbox, Transaction};
use crate::telemetry::{Telemetry, traced};
use crate::{Command, Event, Request};
use crate::{Message, RequestContext};

type Handlers<R> = Vec<Box<dyn DynHandler<R>>>;

/// Handlers by request type; built once, read without locks.
#[derive(Default)]
pub(crate) struct Registry {
    commands: FxHashMap<TypeId, Box<dyn Any + Send + Sync>>,
    events: FxHashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl Registry {
    fn add<R: Request>(
        map: &mut FxHashMap<TypeId, Box<dyn Any + Send + Sync>>,
        handler: Box<dyn DynHandler<R>>,
    ) {
        map.entry(TypeId::of::<R>())
            .or_insert_with(|| Box::new(Handlers::<R>::new()))
            .downcast_mut::<Handlers<R>>()
            .expect("entries are keyed by the TypeId of their request type")
            .push(handler);
    }

    /// Adds `handler` of `R`, as an event handler or as a command's.
    pub(crate) fn add_handler<R: Request>(&mut self, handler: Box<dyn DynHandler<R>>, event: bool) {
        let map = if event {
            &mut self.events
        } else {
            &mut self.commands
        };
        Registry::add::<R>(map, handler);
    }

    fn handlers<R: Request>(
        map: &FxHashMap<TypeId, Box<dyn Any + Send + Sync>>,
    ) -> &[Box<dyn DynHandler<R>>] {
        map.get(&TypeId::of::<R>())
            .and_then(|entry| entry.downcast_ref::<Handlers<R>>())
            .map_or(&[], Vec::as_slice)
    }

    fn command<R: Request>(&self) -> Result<&dyn DynHandler<R>, Error> {
        match Self::handlers::<R>(&self.commands) {
            [one] => Ok(one.as_ref()),
            [] => Err(Error::NoHandler {
                request_type: type_name::<R>(),
            }),
            many => Err(Error::MultipleHandlers {
                request_type: type_name::<R>(),
                count: many.len(),
            }),
        }
    }

    fn has_command<R: Request>(&self) -> bool {
        !Self::handlers::<R>(&self.commands).is_empty()
    }

    fn has_event<R: Request>(&self) -> bool {
        !Self::handlers::<R>(&self.events).is_empty()
    }
}

/// How a request went through the processor (for the test kit's recorder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Went {
    /// `send`: to its one handler.
    Sent,
    /// `publish`: to all its handlers.
    Published,
}

pub(crate) struct Inner {
    registry: Registry,
    pub(crate) resources: Resources,
    pub(crate) messenger: Messenger,
    pub(crate) telemetry: Telemetry,
    /// The test kit's log of what was sent and published.
    #[cfg(feature = "testing")]
    pub(crate) recorder: Option<Arc<crate::testing::Recorder>>,
}

/// Dispatches requests to handlers through their pipelines, and sends them as
/// messages through its [`Messenger`] (the outgoing side: outbox, producers).
///
/// Cheap to clone: clones share one processor.
///
/// ```
/// use brighter_core::{CommandProcessor, Command, Error, Handler, Request, RequestContext};
/// use uuid::Uuid;
///
/// struct Greet { id: Uuid, name: String }
/// impl Request for Greet { fn id(&self) -> Uuid { self.id } }
/// impl Command for Greet {}
///
/// struct GreetHandler;
/// impl Handler<Greet> for GreetHandler {
///     async fn handle(&self, cmd: &Greet, _: &mut RequestContext) -> Result<(), Error> {
///         println!("hello, {}", cmd.name);
///         Ok(())
///     }
/// }
///
/// # tokio_test_block_on(async {
/// let processor = CommandProcessor::builder().command(GreetHandler).build()?;
/// processor.send(&Greet { id: Uuid::now_v7(), name: "Ada".into() }).await?;
/// # Ok::<(), Error>(()) }).unwrap();
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct CommandProcessor {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for CommandProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandProcessor")
            .field("commands", &self.inner.registry.commands.len())
            .field("events", &self.inner.registry.events.len())
            .finish_non_exhaustive()
    }
}

impl CommandProcessor {
    /// Starts configuring a processor.
    pub fn builder() -> CommandProcessorBuilder {
        CommandProcessorBuilder::default()
    }

    /// Runs the one handler registered for `command`, in a fresh context.
    ///
    /// Fails with [`Error::NoHandler`] or [`Error::MultipleHandlers`] when not exactly
    /// one is registered, and with the pipeline's error when it fails. A panic in the
    /// handler is caught and returned as [`Error::Panicked`].
    pub async fn send<C: Command>(&self, command: &C) -> Result<(), Error> {
        // The hot path: `send_with` inlined by hand, one future layer less.
        let handler = self.inner.registry.command()?;
        let mut ctx = RequestContext::new();
        ctx.prepare(command.id(), &self.inner);
        self.record::<C>(Went::Sent, command.id(), &ctx);
        let span = self.request_span::<C>("send", &ctx);
        let future = AssertUnwindSafe(handler.handle_dyn(command, &mut ctx)).catch_unwind();
        match span {
            None => settle(future.await),
            Some(span) => traced(Some(span), async { settle(future.await) }).await,
        }
    }

    /// [`send`](Self::send) with the caller's context.
    pub async fn send_with<C: Command>(
        &self,
        command: &C,
        ctx: &mut RequestContext,
    ) -> Result<(), Error> {
        let handler = self.inner.registry.command()?;
        ctx.prepare(command.id(), &self.inner);
        self.record::<C>(Went::Sent, command.id(), ctx);
        let span = self.request_span::<C>("send", ctx);
        traced(span, guarded(handler.handle_dyn(command, ctx))).await
    }

    /// Runs every handler registered for `event` concurrently, each with its own
    /// copy of a fresh context. All run even when some fail; the failures come
    /// back together in [`Error::Publish`]. No handler is not an error.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<(), Error> {
        let mut ctx = RequestContext::new();
        self.publish_with(event, &mut ctx).await
    }

    /// [`publish`](Self::publish) with the caller's context (each handler gets a copy).
    pub async fn publish_with<E: Event>(
        &self,
        event: &E,
        ctx: &mut RequestContext,
    ) -> Result<(), Error> {
        let handlers = Registry::handlers::<E>(&self.inner.registry.events);
        ctx.prepare(event.id(), &self.inner);
        self.record::<E>(Went::Published, event.id(), ctx);
        if handlers.is_empty() {
            return Ok(());
        }
        let span = self.request_span::<E>("publish", ctx);
        traced(span, self.run_event_handlers(handlers, event, ctx)).await
    }

    async fn run_event_handlers<E: Event>(
        &self,
        handlers: &[Box<dyn DynHandler<E>>],
        event: &E,
        ctx: &mut RequestContext,
    ) -> Result<(), Error> {
        let errors: Vec<Error> = match handlers {
            [] => return Ok(()),
            [one] => return guarded(one.handle_dyn(event, ctx)).await,
            many => join_all(many.iter().map(|handler| {
                let mut own = ctx.clone();
                async move { guarded(handler.handle_dyn(event, &mut own)).await }
            }))
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect(),
        };
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Publish {
                request_type: type_name::<E>(),
                handlers: handlers.len(),
                errors,
            })
        }
    }

    /// Whether a handler is registered for the command type `R`.
    pub fn handles_command<R: Command>(&self) -> bool {
        self.inner.registry.has_command::<R>()
    }

    /// Whether a handler is registered for the event type `R`.
    pub fn handles_event<R: Event>(&self) -> bool {
        self.inner.registry.has_event::<R>()
    }

    /// What the processor was configured with.
    pub fn resources(&self) -> &Resources {
        &self.inner.resources
    }

    /// The processor's tracer and metric instruments, for sweepers and transports
    /// that run with it.
    pub fn telemetry(&self) -> &Telemetry {
        &self.inner.telemetry
    }

    /// The outgoing side: publications, mappers, producers, the outbox, and
    /// every way a message leaves. Sweepers send through it.
    pub fn messenger(&self) -> &Messenger {
        &self.inner.messenger
    }

    /// The outbox this processor deposits into.
    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        self.inner.messenger.outbox()
    }

    /// The producer messages to `topic` are sent with (see [`Messenger::producer_for`]).
    pub fn producer_for(&self, topic: &str) -> Result<&Arc<dyn Producer>, Error> {
        self.inner.messenger.producer_for(topic)
    }

    /// Maps `request` to a message and adds it to the outbox, in `tx` when given
    /// (so it commits or rolls back with the caller's own writes). Returns the
    /// message id. Nothing is sent yet: call [`clear_outbox`](Self::clear_outbox)
    /// after committing, or let a sweeper send it. Inside a handler, use
    /// [`RequestContext::deposit_post`], which joins the unit of work.
    pub async fn deposit_post<R: Request>(
        &self,
        request: &R,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<Uuid, Error> {
        self.inner.messenger.deposit_post(request, tx).await
    }

    /// Deposits many requests in one outbox write; returns their ids in order.
    pub async fn deposit_post_batch<R: Request>(
        &self,
        requests: &[R],
        tx: Option<&mut dyn Transaction>,
    ) -> Result<Vec<Uuid>, Error> {
        self.inner.messenger.deposit_post_batch(requests, tx).await
    }

    /// Sends the outstanding messages among `ids` and marks the confirmed ones
    /// dispatched (see [`Messenger::clear_outbox`]).
    pub async fn clear_outbox(&self, ids: &[Uuid]) -> Result<(), Error> {
        self.inner.messenger.clear_outbox(ids).await
    }

    /// Sends up to `limit` outstanding messages added at least `min_age` ago
    /// (see [`Messenger::clear_outstanding`]).
    pub async fn clear_outstanding(&self, min_age: Duration, limit: usize) -> Result<usize, Error> {
        self.inner.messenger.clear_outstanding(min_age, limit).await
    }

    /// Sends one message through the producer of its topic (see
    /// [`Messenger::send_message`]).
    pub async fn send_message(
        &self,
        message: Message,
        timeout: Option<Duration>,
    ) -> Result<(), Error> {
        self.inner.messenger.send_message(message, timeout).await
    }

    /// Deposits `request` and sends it at once (`deposit_post` + `clear_outbox`).
    /// Succeeds once the message is in the outbox: when sending fails, the
    /// message stays there (failure recorded) for a sweeper to send, and the
    /// id is returned all the same (see [`Messenger::post`]).
    pub async fn post<R: Request>(&self, request: &R) -> Result<Uuid, Error> {
        self.inner.messenger.post(request).await
    }

    /// [`post`](Self::post) in the conversation of `ctx` (its correlation id),
    /// outside any transaction: for callers that carry a correlation id of
    /// their own. Inside a handler, use [`RequestContext::post`].
    pub async fn post_with<R: Request>(
        &self,
        request: &R,
        ctx: &RequestContext,
    ) -> Result<Uuid, Error> {
        self.inner
            .messenger
            .post_in(request, ctx.correlation_id, Duration::ZERO)
            .await
    }

    /// Posts `request` to be delivered no earlier than `delay` from now (see
    /// [`post_scheduled`](Self::post_scheduled)).
    pub async fn post_with_delay<R: Request>(
        &self,
        request: &R,
        delay: Duration,
    ) -> Result<Uuid, Error> {
        self.inner.messenger.post_with_delay(request, delay).await
    }

    /// Posts `request` to be delivered when `due` (a delay or a time); returns
    /// at once. The outbox holds it and a sweeper sends it when due (see
    /// [`Messenger::post_scheduled`]).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use brighter_core::{CommandProcessor, Event, InMemoryBroker, Publication, OutboxSweeper};
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Event)]
    /// # struct Reminder { id: brighter_core::uuid::Uuid }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let broker = InMemoryBroker::new();
    /// let processor = CommandProcessor::builder()
    ///     .publication::<Reminder>(Publication::event("reminders"))
    ///     .producer(broker.clone())
    ///     .build()
    ///     .unwrap();
    /// let sweeper = OutboxSweeper::new(&processor).start().await.unwrap();
    /// let reminder = Reminder { id: brighter_core::uuid::Uuid::now_v7() };
    /// let id = processor.post_scheduled(&reminder, Duration::from_secs(3600)).await.unwrap();
    /// // Changed our mind: it never goes.
    /// assert!(processor.cancel_scheduled(id).await.unwrap());
    /// sweeper.stop().await;
    /// # });
    /// ```
    pub async fn post_scheduled<R: Request>(
        &self,
        request: &R,
        due: impl Into<crate::Due>,
    ) -> Result<Uuid, Error> {
        self.inner.messenger.post_scheduled(request, due).await
    }

    /// Deposits `request` scheduled for `due`, in `tx` when given (see
    /// [`Messenger::deposit_post_scheduled`]).
    pub async fn deposit_post_scheduled<R: Request>(
        &self,
        request: &R,
        due: impl Into<crate::Due>,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<Uuid, Error> {
        self.inner
            .messenger
            .deposit_post_scheduled(request, due, tx)
            .await
    }

    /// Cancels scheduled message `id` if it has not been sent; `true` when it
    /// was cancelled (see [`Outbox::cancel_scheduled`](crate::Outbox::cancel_scheduled)).
    pub async fn cancel_scheduled(&self, id: Uuid) -> Result<bool, Error> {
        self.inner.messenger.cancel_scheduled(id).await
    }

    /// Plans a routing slip whose messages are mapped and addressed by this
    /// processor's publications and mappers (see
    /// [`RoutingSlipBuilder`](crate::RoutingSlipBuilder)).
    pub fn routing_slip(&self) -> crate::RoutingSlipBuilder<'_> {
        crate::RoutingSlipBuilder::new(&self.inner.messenger)
    }

    /// Posts the first step of `slip` (through the outbox, as `post` does),
    /// in a conversation of its own (the slip's id as correlation id);
    /// returns its message id. Each step's handler is then reached through a
    /// subscription as usual, and the framework forwards the slip.
    pub async fn post_routing_slip(&self, slip: &crate::RoutingSlip) -> Result<Uuid, Error> {
        self.inner.messenger.post_routing_slip(slip, None).await
    }

    /// Request-reply (see [`Messenger::call`]).
    pub async fn call<Req, Resp>(&self, request: &Req, timeout: Duration) -> Result<Resp, Error>
    where
        Req: Request,
        Resp: Request + Serialize + DeserializeOwned,
    {
        self.inner.messenger.call(request, timeout).await
    }

    /// Closes the reply channel of `call` (see [`Messenger::close_replies`]):
    /// part of a service's shutdown.
    pub async fn close_replies(&self) {
        self.inner.messenger.close_replies().await;
    }

    /// Tells the test kit's recorder, when there is one, what went through.
    #[inline]
    fn record<R: Request>(&self, kind: Went, id: Uuid, ctx: &RequestContext) {
        #[cfg(feature = "testing")]
        if let Some(recorder) = &self.inner.recorder {
            recorder.record(kind, type_name::<R>(), id, ctx.correlation_id());
        }
        #[cfg(not(feature = "testing"))]
        let _ = (kind, type_name::<R>(), id, ctx);
    }

    /// The internal `<operation> <Type>` span for dispatching a request, under the
    /// current OpenTelemetry context; `None` when tracing is off.
    fn request_span<R: Request>(
        &self,
        operation: &'static str,
        ctx: &RequestContext,
    ) -> Option<opentelemetry::Context> {
        let telemetry = &self.inner.telemetry;
        if !telemetry.tracing_enabled() {
            return None;
        }
        let short = short_type_name::<R>();
        telemetry.start_span(
            || format!("{operation} {short}"),
            opentelemetry::trace::SpanKind::Internal,
            &opentelemetry::Context::current(),
            || {
                use crate::telemetry::attributes as attr;
                let mut attributes = vec![
                    opentelemetry::KeyValue::new(attr::REQUEST_TYPE, type_name::<R>()),
                    opentelemetry::KeyValue::new(attr::OPERATION_NAME, operation),
                ];
                if let Some(correlation_id) = ctx.correlation_id {
                    attributes.push(opentelemetry::KeyValue::new(
                        attr::CONVERSATION_ID,
                        correlation_id.to_string(),
                    ));
                }
                attributes
            },
        )
    }
}

impl From<&CommandProcessor> for Messenger {
    fn from(processor: &CommandProcessor) -> Messenger {
        processor.inner.messenger.clone()
    }
}

impl From<CommandProcessor> for Messenger {
    fn from(processor: CommandProcessor) -> Messenger {
        processor.inner.messenger.clone()
    }
}

/// The verbs a handler continues its conversation with: they send through the
/// processor that dispatched the request, with its correlation id.
impl RequestContext {
    fn processor(&self) -> Result<CommandProcessor, Error> {
        self.handle
            .clone()
            .map(|inner| CommandProcessor { inner })
            .ok_or_else(|| {
                Error::configuration(
                    "this context was not dispatched by a command processor: it has nothing to send through",
                )
            })
    }

    /// Sends `command` to its one handler, in a child context (same
    /// conversation, no transaction).
    pub async fn send<C: Command>(&self, command: &C) -> Result<(), Error> {
        let processor = self.processor()?;
        processor.send_with(command, &mut self.child()).await
    }

    /// Publishes `event` to all its handlers, in a child context.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<(), Error> {
        let processor = self.processor()?;
        processor.publish_with(event, &mut self.child()).await
    }

    /// Deposits `request` in the outbox, continuing this conversation. In a
    /// unit of work the message joins its transaction: it commits with the
    /// handler's own writes and its inbox record, and the unit of work sends it
    /// after the commit. Without one it is added outside any transaction (and
    /// left to a sweeper, or [`CommandProcessor::clear_outbox`]).
    pub async fn deposit_post<R: Request>(&mut self, request: &R) -> Result<Uuid, Error> {
        let processor = self.processor()?;
        let correlation_id = self.correlation_id;
        let in_transaction = self.has_transaction();
        let messages = processor
            .inner
            .messenger
            .deposit(
                std::slice::from_ref(request),
                correlation_id,
                Duration::ZERO,
                self.transaction_mut(),
            )
            .await?;
        let id = messages[0].id();
        if in_transaction {
            self.record_deposited(&[id]);
        }
        Ok(id)
    }

    /// The message `request` becomes when posted in this conversation (see
    /// [`Messenger::message_for`]): for a typed unit of work that inserts it
    /// into its own transaction.
    pub async fn message_for<R: Request>(&self, request: &R) -> Result<Message, Error> {
        let processor = self.processor()?;
        processor
            .inner
            .messenger
            .message_for(request, self.correlation_id)
            .await
    }

    /// Posts `request` at once, outside any transaction, continuing this
    /// conversation (see [`CommandProcessor::post`]).
    pub async fn post<R: Request>(&self, request: &R) -> Result<Uuid, Error> {
        let processor = self.processor()?;
        processor
            .inner
            .messenger
            .post_in(request, self.correlation_id, Duration::ZERO)
            .await
    }

    /// Deposits `request` scheduled for `due` (a delay or a time),
    /// continuing this conversation: in a unit of work it commits with the
    /// handler's writes, and a sweeper sends it when due (a timeout a saga
    /// step sets itself, a reminder). Returns the id, for
    /// [`CommandProcessor::cancel_scheduled`].
    pub async fn deposit_post_scheduled<R: Request>(
        &mut self,
        request: &R,
        due: impl Into<crate::Due>,
    ) -> Result<Uuid, Error> {
        let processor = self.processor()?;
        let correlation_id = self.correlation_id;
        let messages = processor
            .inner
            .messenger
            .deposit(
                std::slice::from_ref(request),
                correlation_id,
                due.into().delay(),
                self.transaction_mut(),
            )
            .await?;
        Ok(messages[0].id())
    }

    /// Posts `request` to be delivered no earlier than `delay` from now,
    /// continuing this conversation.
    pub async fn post_with_delay<R: Request>(
        &self,
        request: &R,
        delay: Duration,
    ) -> Result<Uuid, Error> {
        let processor = self.processor()?;
        processor
            .inner
            .messenger
            .post_in(request, self.correlation_id, delay)
            .await
    }

    /// Sends `response` to the reply-to channel of the request being handled,
    /// with its correlation id. For handlers of requests sent with `call`.
    pub async fn reply<Resp>(&self, response: &Resp) -> Result<(), Error>
    where
        Resp: Request + Serialize + DeserializeOwned,
    {
        let processor = self.processor()?;
        let request = self.message().ok_or_else(|| {
            Error::configuration(
                "reply needs the request's message: only requests from a subscription can be replied to",
            )
        })?;
        processor.inner.messenger.reply(request, response).await
    }

    /// Deposits the reply to the request being handled (to its reply-to
    /// channel, with its correlation id) in the context's transaction: sent
    /// once the unit of work commits. Returns the reply's id.
    pub async fn deposit_reply<Resp>(&mut self, response: &Resp) -> Result<Uuid, Error>
    where
        Resp: Request + Serialize + DeserializeOwned,
    {
        let processor = self.processor()?;
        let request = self.message.clone().ok_or_else(|| {
            Error::configuration(
                "reply needs the request's message: only requests from a subscription can be replied to",
            )
        })?;
        let in_transaction = self.has_transaction();
        let id = processor
            .inner
            .messenger
            .deposit_reply(&request, response, self.transaction_mut())
            .await?;
        if in_transaction {
            self.record_deposited(&[id]);
        } else {
            processor.inner.messenger.clear_outbox(&[id]).await?;
        }
        Ok(id)
    }

    /// Posts the first step of `slip` in this conversation (see
    /// [`CommandProcessor::post_routing_slip`]).
    pub async fn post_routing_slip(&self, slip: &crate::RoutingSlip) -> Result<Uuid, Error> {
        let processor = self.processor()?;
        processor
            .inner
            .messenger
            .post_routing_slip(slip, self.correlation_id)
            .await
    }

    /// Request-reply from inside a handler (see [`CommandProcessor::call`]).
    pub async fn call<Req, Resp>(&self, request: &Req, timeout: Duration) -> Result<Resp, Error>
    where
        Req: Request,
        Resp: Request + Serialize + DeserializeOwned,
    {
        let processor = self.processor()?;
        processor.inner.messenger.call(request, timeout).await
    }

    /// Sends the messages deposited in this context's transaction; for a unit
    /// of work to call once it committed. What fails to send stays in the
    /// outbox for a sweeper, and the error is returned.
    pub async fn clear_deposited(&mut self) -> Result<(), Error> {
        let ids = self.take_deposited();
        if ids.is_empty() {
            return Ok(());
        }
        let processor = self.processor()?;
        processor.inner.messenger.clear_outbox(&ids).await
    }
}

/// Runs a handler future, turning a panic into [`Error::Panicked`].
pub(crate) async fn guarded<F: Future<Output = Result<(), Error>>>(future: F) -> Result<(), Error> {
    settle(AssertUnwindSafe(future).catch_unwind().await)
}

/// The result of a handler future run under `catch_unwind`.
fn settle(outcome: std::thread::Result<Result<(), Error>>) -> Result<(), Error> {
    match outcome {
        Ok(result) => result,
        Err(panic) => Err(Error::Panicked(panic_message(panic.as_ref()))),
    }
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// A handler waiting for the processor's resources to be registered.
pub(crate) trait Registration: Send {
    fn register(
        self: Box<Self>,
        resources: &Resources,
        registry: &mut Registry,
    ) -> Result<(), Error>;
}

struct PipelineRegistration<R, S, H> {
    pipeline: Pipeline<S>,
    handler: H,
    event: bool,
    _request: PhantomData<fn(R)>,
}

impl<R, S, H> Registration for PipelineRegistration<R, S, H>
where
    R: Request,
    H: Send + 'static,
    S: Step<H> + Send,
    S::Handler: Handler<R>,
{
    fn register(
        self: Box<Self>,
        resources: &Resources,
        registry: &mut Registry,
    ) -> Result<(), Error> {
        let handler = self
            .pipeline
            .wrap(self.handler, resources)
            .map_err(|e| match e {
                Error::Configuration(reason) => Error::Configuration(format!(
                    "pipeline of a handler for {}: {reason}",
                    type_name::<R>()
                )),
                other => other,
            })?;
        registry.add_handler::<R>(Box::new(handler), self.event);
        Ok(())
    }
}

/// Configures a [`CommandProcessor`]: handlers with their pipelines, and what the
/// pipelines may use (named circuit breakers, feature flags, an inbox), plus the
/// messaging configuration (publications, producers, outbox).
#[must_use]
#[derive(Default)]
pub struct CommandProcessorBuilder {
    registrations: Vec<Box<dyn Registration>>,
    resources: Resources,
    errors: Vec<String>,
    messenger: MessengerBuilder,
    telemetry: Option<Telemetry>,
    #[cfg(feature = "testing")]
    recorder: Option<Arc<crate::testing::Recorder>>,
}

impl fmt::Debug for CommandProcessorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandProcessorBuilder")
            .field("registrations", &self.registrations.len())
            .field("resources", &self.resources)
            .finish_non_exhaustive()
    }
}

impl CommandProcessorBuilder {
    /// Registers the handler of command `R`, with no pipeline steps.
    pub fn command<R: Command>(self, handler: impl Handler<R>) -> Self {
        self.command_with(Pipeline::new(), handler)
    }

    /// Registers the handler of command `R` behind `pipeline`.
    pub fn command_with<R, S, H>(self, pipeline: Pipeline<S>, handler: H) -> Self
    where
        R: Command,
        H: Send + 'static,
        S: Step<H> + Send,
        S::Handler: Handler<R>,
    {
        self.register::<R, S, H>(pipeline, handler, false)
    }

    /// Registers a handler of event `R`, with no pipeline steps. Call once per handler.
    pub fn event<R: Event>(self, handler: impl Handler<R>) -> Self {
        self.event_with(Pipeline::<Identity>::new(), handler)
    }

    /// Registers a handler of event `R` behind `pipeline`.
    pub fn event_with<R, S, H>(self, pipeline: Pipeline<S>, handler: H) -> Self
    where
        R: Event,
        H: Send + 'static,
        S: Step<H> + Send,
        S::Handler: Handler<R>,
    {
        self.register::<R, S, H>(pipeline, handler, true)
    }

    fn register<R, S, H>(mut self, pipeline: Pipeline<S>, handler: H, event: bool) -> Self
    where
        R: Request,
        H: Send + 'static,
        S: Step<H> + Send,
        S::Handler: Handler<R>,
    {
        self.registrations
            .push(Box::new(PipelineRegistration::<R, S, H> {
                pipeline,
                handler,
                event,
                _request: PhantomData,
            }));
        self
    }

    /// Registers a circuit breaker that pipelines refer to with
    /// [`CircuitBreaker::named`]; every pipeline naming it shares it.
    pub fn circuit_breaker(
        mut self,
        name: impl Into<String>,
        config: CircuitBreakerConfig,
    ) -> Self {
        let name = name.into();
        if self.resources.breakers.contains_key(&name) {
            self.errors
                .push(format!("circuit breaker '{name}' is registered twice"));
        }
        self.resources
            .breakers
            .insert(name.clone(), CircuitBreaker::new(name, config));
        self
    }

    /// Registers saga `saga`: a handler for each message it starts with or
    /// handles (see [`SagaBuilder`](crate::SagaBuilder)).
    pub fn saga<S: crate::Saga>(mut self, saga: crate::SagaBuilder<S>) -> Self {
        match saga.into_registrations() {
            Ok(registrations) => self.registrations.extend(registrations),
            Err(error) => self.errors.push(error.to_string()),
        }
        self
    }

    /// Feature flags for [`FeatureSwitch::configured`](crate::command::pipeline::FeatureSwitch::configured) steps.
    pub fn feature_flags(mut self, flags: impl FeatureFlags) -> Self {
        self.resources.feature_flags = Some(Arc::new(flags));
        self
    }

    /// The inbox used by inbox steps.
    pub fn inbox(mut self, inbox: impl Inbox) -> Self {
        self.resources.inbox = Some(Arc::new(inbox));
        self
    }

    /// Where spans and metrics go: [`Telemetry::global`] (taken when `build` runs)
    /// unless set here; [`Telemetry::disabled`] turns them off.
    pub fn telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// The mapper between `R` and messages, used to post `R` and to read it in
    /// subscriptions. [`JsonMapper`](crate::JsonMapper) works for any serde type.
    pub fn mapper<R: Request>(mut self, mapper: impl MessageMapper<R>) -> Self {
        self.messenger = self.messenger.mapper(mapper);
        self
    }

    /// Where `R` is sent when posted. Needs a producer for the topic, checked
    /// by `build`. The mapper is [`JsonMapper`](crate::JsonMapper) unless
    /// another is registered with [`mapper`](Self::mapper).
    pub fn publication<R>(mut self, publication: Publication) -> Self
    where
        R: Request + Serialize + DeserializeOwned,
    {
        self.messenger = self.messenger.publication::<R>(publication);
        self
    }

    /// The producer for topics with no producer of their own.
    pub fn producer(mut self, producer: impl Producer) -> Self {
        self.messenger = self.messenger.producer(producer);
        self
    }

    /// The producer for `topic`.
    pub fn producer_for_topic(mut self, topic: impl Into<String>, producer: impl Producer) -> Self {
        self.messenger = self.messenger.producer_for_topic(topic, producer);
        self
    }

    /// A producer that publications name with [`Publication::producer`].
    pub fn named_producer(mut self, name: impl Into<String>, producer: impl Producer) -> Self {
        self.messenger = self.messenger.named_producer(name, producer);
        self
    }

    /// The outbox (an [`InMemoryOutbox`](crate::InMemoryOutbox) when none is given).
    pub fn outbox(mut self, outbox: impl Outbox) -> Self {
        self.messenger = self.messenger.outbox(outbox);
        self
    }

    /// At most `limit` outstanding messages: past it, `deposit_post` fails with
    /// [`Error::Backpressure`] instead of letting the outbox grow without bound.
    pub fn outbox_limit(mut self, limit: u64) -> Self {
        self.messenger = self.messenger.outbox_limit(limit);
        self
    }

    /// Where `call` opens its reply channel.
    pub fn reply_channels(mut self, factory: impl ChannelFactory) -> Self {
        self.messenger = self.messenger.reply_channels(factory);
        self
    }

    /// The CloudEvents `source` of messages whose publication sets none.
    pub fn cloud_events_source(mut self, source: impl Into<String>) -> Self {
        self.messenger = self.messenger.cloud_events_source(source);
        self
    }

    /// Records every send and publish in `recorder` (the test kit's).
    #[cfg(feature = "testing")]
    pub(crate) fn recorder(mut self, recorder: Arc<crate::testing::Recorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// A value for users' own steps to find in [`Resources::extensions`] at build time.
    pub fn resource<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.resources.extensions.insert(value);
        self
    }

    /// Resolves every pipeline and builds the processor. Fails with
    /// [`Error::Configuration`] when a pipeline or the messaging configuration
    /// cannot work.
    pub fn build(self) -> Result<CommandProcessor, Error> {
        if let Some(reason) = self.errors.first() {
            return Err(Error::configuration(reason.clone()));
        }
        // Registered breakers are checked even when no pipeline uses them yet.
        for breaker in self.resources.breakers.values() {
            breaker.validate_config()?;
        }
        let telemetry = self.telemetry.unwrap_or_else(Telemetry::global);
        let mut resources = self.resources;
        resources.telemetry = Some(telemetry.clone());
        let mut registry = Registry::default();
        for registration in self.registrations {
            registration.register(&resources, &mut registry)?;
        }
        let messenger = self.messenger.build(telemetry.clone())?;
        Ok(CommandProcessor {
            inner: Arc::new(Inner {
                registry,
                resources,
                messenger,
                telemetry,
                #[cfg(feature = "testing")]
                recorder: self.recorder,
            }),
        })
    }
}
