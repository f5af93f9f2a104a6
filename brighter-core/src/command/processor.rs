//! The command processor: dispatches commands to their one handler and events to
//! all of theirs, through each registration's pipeline.

use std::any::{Any, TypeId, type_name};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::join_all;
use rustc_hash::FxHashMap;

use crate::command::handler::{DynHandler, Handler};
use crate::command::pipeline::{
    CircuitBreaker, CircuitBreakerConfig, FeatureFlags, Identity, Pipeline, Resources, Step,
};
use crate::error::Error;
use crate::store::inbox::Inbox;
use crate::telemetry::{Telemetry, traced};
use crate::{Command, Event, Request, RequestContext};

type Handlers<R> = Vec<Box<dyn DynHandler<R>>>;

/// Handlers by request type; built once, read without locks.
#[derive(Default)]
struct Registry {
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

pub(crate) struct Inner {
    registry: Registry,
    pub(crate) resources: Resources,
    pub(crate) messaging: crate::messenger::Messaging,
    pub(crate) telemetry: Telemetry,
}

/// Dispatches requests to handlers through their pipelines, and (see the
/// messaging methods) sends them as messages through the outbox.
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
/// let processor = CommandProcessor::builder().command::<Greet>(GreetHandler).build()?;
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
        let handler = self.inner.registry.command::<C>()?;
        let mut ctx = RequestContext::new();
        ctx.prepare(command.id(), self);
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
        let handler = self.inner.registry.command::<C>()?;
        ctx.prepare(command.id(), self);
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
        ctx.prepare(event.id(), self);
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
        let short = crate::messenger::short_type_name::<R>();
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

trait Registration: Send {
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
        let map = if self.event {
            &mut registry.events
        } else {
            &mut registry.commands
        };
        Registry::add::<R>(map, Box::new(handler));
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
    breaker_errors: Vec<String>,
    pub(crate) messaging: crate::messenger::MessagingBuilder,
    telemetry: Option<Telemetry>,
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
        self.command_with::<R, _, _>(Pipeline::new(), handler)
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
        self.event_with::<R, _, _>(Pipeline::<Identity>::new(), handler)
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
            self.breaker_errors
                .push(format!("circuit breaker '{name}' is registered twice"));
        }
        self.resources
            .breakers
            .insert(name.clone(), CircuitBreaker::new(name, config));
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

    /// A value for users' own steps to find in [`Resources::extensions`] at build time.
    pub fn resource<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.resources.extensions.insert(value);
        self
    }

    /// Resolves every pipeline and builds the processor. Fails with
    /// [`Error::Configuration`] when a pipeline or the messaging configuration
    /// cannot work.
    pub fn build(self) -> Result<CommandProcessor, Error> {
        if let Some(reason) = self.breaker_errors.first() {
            return Err(Error::configuration(reason.clone()));
        }
        // Registered breakers are checked even when no pipeline uses them yet.
        for breaker in self.resources.breakers.values() {
            breaker.validate_config()?;
        }
        let mut registry = Registry::default();
        for registration in self.registrations {
            registration.register(&self.resources, &mut registry)?;
        }
        let messaging = self.messaging.build()?;
        Ok(CommandProcessor {
            inner: Arc::new(Inner {
                registry,
                resources: self.resources,
                messaging,
                telemetry: self.telemetry.unwrap_or_else(Telemetry::global),
            }),
        })
    }
}
