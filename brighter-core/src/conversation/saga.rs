//! Process managers (sagas): a conversation with stored state. A saga
//! declares its state, the messages that start it and the messages it
//! handles, and how each message finds its instance. For every message the
//! framework loads the instance, runs the saga's step with the state and a
//! context that can send, post, schedule and reply, and saves the new state:
//! the load, the save, the inbox record and the step's outgoing messages
//! commit in one transaction of the [`SagaStore`], so a crash leaves all of a
//! step or none of it, and a redelivered message does nothing twice.

use std::any::type_name;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::command::handler::Handler;
use crate::command::pipeline::Resources;
use crate::command::processor::{Registration, Registry};
use crate::error::Error;
use crate::store::Due;
use crate::store::inbox::{Inbox, InboxEntry};
use crate::store::saga::{SagaStatus, SagaStore};
use crate::{Command, Event, Request, RequestContext};

/// A process manager: its name and the state each instance keeps between
/// steps. Say what it does with each message by implementing [`SagaStep`],
/// and register it with [`SagaBuilder`].
///
/// ```
/// use brighter_core::{Error, Saga, SagaContext, SagaStep};
/// # #[derive(brighter_core::Command, serde::Serialize, serde::Deserialize)]
/// # struct PlaceOrder { id: uuid::Uuid, order_id: uuid::Uuid }
/// # #[derive(brighter_core::Event, serde::Serialize, serde::Deserialize)]
/// # struct PaymentTaken { id: uuid::Uuid, order_id: uuid::Uuid }
/// #[derive(Default, serde::Serialize, serde::Deserialize)]
/// struct Order { paid: bool }
///
/// struct OrderSaga;
/// impl Saga for OrderSaga {
///     type State = Order;
///     const NAME: &'static str = "order";
/// }
/// impl SagaStep<PlaceOrder> for OrderSaga {
///     // Instances are keyed by the order id (by default: the correlation id).
///     fn correlate(&self, cmd: &PlaceOrder, _: &brighter_core::RequestContext) -> String {
///         cmd.order_id.to_string()
///     }
///     async fn handle(&self, _: &PlaceOrder, _: &mut SagaContext<'_, Order>) -> Result<(), Error> {
///         Ok(())
///     }
/// }
/// impl SagaStep<PaymentTaken> for OrderSaga {
///     fn correlate(&self, event: &PaymentTaken, _: &brighter_core::RequestContext) -> String {
///         event.order_id.to_string()
///     }
///     async fn handle(&self, _: &PaymentTaken, saga: &mut SagaContext<'_, Order>) -> Result<(), Error> {
///         saga.state_mut().paid = true;
///         saga.complete();
///         Ok(())
///     }
/// }
/// ```
pub trait Saga: Send + Sync + 'static {
    /// What an instance keeps between steps (stored as JSON). A new instance
    /// starts with `State::default()`.
    type State: Serialize + DeserializeOwned + Default + Send + Sync + 'static;

    /// The saga's name: instances are stored under (name, key), and the inbox
    /// records its messages under `saga:<name>`. Keep it stable.
    const NAME: &'static str;
}

/// What a saga does with message `M`.
pub trait SagaStep<M: Request>: Saga {
    /// The key of the instance `message` belongs to. By default the
    /// conversation's correlation id, which every message sent in a handler
    /// (and the saga's own) carries on.
    fn correlate(&self, message: &M, ctx: &RequestContext) -> String {
        let _ = message;
        ctx.correlation_id().to_string()
    }

    /// One step: read and change the state, send, post, schedule or reply
    /// through `saga`, complete or fail the instance. Return an error and
    /// nothing of the step is kept: no state change, no inbox record, no
    /// message (the message is then retried or dead-lettered as any other).
    fn handle(
        &self,
        message: &M,
        saga: &mut SagaContext<'_, Self::State>,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// What happens to a message for an instance that does not exist, when the
/// message does not start one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SagaNotFound {
    /// Acknowledge it with a log line (`saga instance not found; message ignored`).
    Ignore,
    /// Dead-letter it with the reason (the default: a message is never dropped silently).
    #[default]
    DeadLetter,
}

/// A saga step's view: the instance's state, its key, and the verbs of the
/// request context, whose messages join the step's transaction (sent once it
/// commits, never when the step fails).
pub struct SagaContext<'a, S> {
    ctx: &'a mut RequestContext,
    state: S,
    key: &'a str,
    new: bool,
    ending: Option<SagaStatus>,
}

impl<S> std::fmt::Debug for SagaContext<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaContext")
            .field("key", &self.key)
            .field("new", &self.new)
            .field("ending", &self.ending)
            .finish_non_exhaustive()
    }
}

impl<S> SagaContext<'_, S> {
    /// The instance's state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The instance's state, to change; saved when the step succeeds.
    pub fn state_mut(&mut self) -> &mut S {
        &mut self.state
    }

    /// The instance's key.
    pub fn key(&self) -> &str {
        self.key
    }

    /// Whether this step created the instance (a starting message, no
    /// instance before).
    pub fn is_new(&self) -> bool {
        self.new
    }

    /// Ends the instance as completed when the step succeeds: its state is
    /// kept, marked completed, and later messages for it (a timeout that is
    /// no longer needed) are ignored.
    pub fn complete(&mut self) {
        self.ending = Some(SagaStatus::Completed);
    }

    /// Ends the instance as failed, with `reason`, when the step succeeds
    /// (what the step sent still goes: a compensation, a notification).
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.ending = Some(SagaStatus::Failed(reason.into()));
    }

    /// The request context: the correlation id, the message being handled,
    /// the bag, and the step's transaction for the saga's own writes
    /// (`pg_transaction(saga.context())` with the Postgres store).
    pub fn context(&mut self) -> &mut RequestContext {
        self.ctx
    }

    /// Posts `request` in this conversation: it joins the step's
    /// transaction, and is sent once the step commits.
    pub async fn post<R: Request>(&mut self, request: &R) -> Result<Uuid, Error> {
        self.ctx.deposit_post(request).await
    }

    /// Schedules `request` for `due` (a delay or a time) in this
    /// conversation: it joins the step's transaction and the outbox sends it
    /// when due. A timeout to itself: schedule a message the saga handles;
    /// if the instance has ended by then, it is ignored.
    pub async fn schedule<R: Request>(
        &mut self,
        request: &R,
        due: impl Into<Due>,
    ) -> Result<Uuid, Error> {
        self.ctx.deposit_post_scheduled(request, due).await
    }

    /// Sends `command` to its handler in this process, now (outside the
    /// step's transaction).
    pub async fn send<C: Command>(&self, command: &C) -> Result<(), Error> {
        self.ctx.send(command).await
    }

    /// Publishes `event` to its handlers in this process, now (outside the
    /// step's transaction).
    pub async fn publish<E: Event>(&self, event: &E) -> Result<(), Error> {
        self.ctx.publish(event).await
    }

    /// Replies to the message being handled (to its reply-to channel, with
    /// its correlation id): the reply joins the step's transaction and is
    /// sent once the step commits.
    pub async fn reply<R>(&mut self, response: &R) -> Result<Uuid, Error>
    where
        R: Request + Serialize + DeserializeOwned,
    {
        self.ctx.deposit_reply(response).await
    }
}

/// What every step of one saga shares.
struct Shared<S> {
    saga: S,
    store: Arc<dyn SagaStore>,
    not_found: SagaNotFound,
    inbox_key: String,
}

/// A registration waiting for the saga's settings and the processor's
/// resources.
type Pending<S> = Box<dyn FnOnce(Arc<Shared<S>>) -> Box<dyn Registration> + Send>;

/// Registers a saga with a processor: which messages start it, which it
/// handles, and where its instances are stored. Each message type becomes a
/// handler of the processor (a command's one handler, or one of an
/// event's), so subscriptions and `send` reach it as they reach any handler.
/// The processor needs an inbox (`.inbox(..)`) whose transactions are the
/// store's: a saga step records its message there in its own transaction.
///
/// ```
/// # use brighter_core::{Error, Saga, SagaContext, SagaStep};
/// # #[derive(brighter_core::Command, serde::Serialize, serde::Deserialize)]
/// # struct PlaceOrder { id: uuid::Uuid }
/// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct Order;
/// # struct OrderSaga;
/// # impl Saga for OrderSaga { type State = Order; const NAME: &'static str = "order"; }
/// # impl SagaStep<PlaceOrder> for OrderSaga {
/// #     async fn handle(&self, _: &PlaceOrder, _: &mut SagaContext<'_, Order>) -> Result<(), Error> { Ok(()) }
/// # }
/// use brighter_core::{CommandProcessor, InMemoryInbox, InMemorySagaStore, SagaBuilder, SagaNotFound};
/// let processor = CommandProcessor::builder()
///     .inbox(InMemoryInbox::new())
///     .saga(
///         SagaBuilder::new(OrderSaga, InMemorySagaStore::new())
///             .starts::<PlaceOrder>()
///             .not_found(SagaNotFound::Ignore),
///     )
///     .build()
///     .unwrap();
/// # let _ = processor;
/// ```
#[must_use]
pub struct SagaBuilder<S: Saga> {
    saga: S,
    store: Arc<dyn SagaStore>,
    not_found: SagaNotFound,
    pending: Vec<(&'static str, Pending<S>)>,
}

impl<S: Saga> std::fmt::Debug for SagaBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaBuilder")
            .field("saga", &S::NAME)
            .field("not_found", &self.not_found)
            .field(
                "messages",
                &self
                    .pending
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl<S: Saga> SagaBuilder<S> {
    /// Saga `saga`, its instances kept in `store`.
    pub fn new(saga: S, store: impl SagaStore) -> Self {
        SagaBuilder {
            saga,
            store: Arc::new(store),
            not_found: SagaNotFound::default(),
            pending: Vec::new(),
        }
    }

    /// Command `C` starts an instance when none exists for its key (and is
    /// handled by the existing one when one does).
    pub fn starts<C: Command>(self) -> Self
    where
        S: SagaStep<C>,
    {
        self.add::<C>(true, false)
    }

    /// Command `C` is handled by an existing instance.
    pub fn handles<C: Command>(self) -> Self
    where
        S: SagaStep<C>,
    {
        self.add::<C>(false, false)
    }

    /// Event `E` starts an instance when none exists for its key.
    pub fn starts_event<E: Event>(self) -> Self
    where
        S: SagaStep<E>,
    {
        self.add::<E>(true, true)
    }

    /// Event `E` is handled by an existing instance.
    pub fn handles_event<E: Event>(self) -> Self
    where
        S: SagaStep<E>,
    {
        self.add::<E>(false, true)
    }

    /// What a message for an instance that does not exist does, when it
    /// does not start one (default: dead-lettered with the reason).
    pub fn not_found(mut self, action: SagaNotFound) -> Self {
        self.not_found = action;
        self
    }

    fn add<M: Request>(mut self, starts: bool, event: bool) -> Self
    where
        S: SagaStep<M>,
    {
        let make: Pending<S> = Box::new(move |shared| {
            Box::new(SagaRegistration::<S, M> {
                shared,
                starts,
                event,
                _message: PhantomData,
            })
        });
        self.pending.push((type_name::<M>(), make));
        self
    }

    /// The handler registrations, or why the saga cannot work.
    pub(crate) fn into_registrations(self) -> Result<Vec<Box<dyn Registration>>, Error> {
        let name = S::NAME;
        if name.trim().is_empty() {
            return Err(Error::configuration("a saga has an empty name"));
        }
        if self.pending.is_empty() {
            return Err(Error::configuration(format!(
                "saga '{name}' handles no message: add .starts::<M>() or .handles::<M>()"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for (message, _) in &self.pending {
            if !seen.insert(*message) {
                return Err(Error::configuration(format!(
                    "saga '{name}' registers {message} twice"
                )));
            }
        }
        let shared = Arc::new(Shared {
            saga: self.saga,
            store: self.store,
            not_found: self.not_found,
            inbox_key: format!("saga:{name}"),
        });
        Ok(self
            .pending
            .into_iter()
            .map(|(_, make)| make(Arc::clone(&shared)))
            .collect())
    }
}

struct SagaRegistration<S, M> {
    shared: Arc<Shared<S>>,
    starts: bool,
    event: bool,
    _message: PhantomData<fn(M)>,
}

impl<S: SagaStep<M>, M: Request> Registration for SagaRegistration<S, M> {
    fn register(
        self: Box<Self>,
        resources: &Resources,
        registry: &mut Registry,
    ) -> Result<(), Error> {
        let inbox = resources.inbox().cloned().ok_or_else(|| {
            Error::configuration(format!(
                "saga '{}' needs an inbox, whose transactions are its store's: configure one with .inbox(..)",
                S::NAME
            ))
        })?;
        let handler = SagaHandler::<S, M> {
            shared: self.shared,
            inbox,
            starts: self.starts,
            telemetry: resources.telemetry(),
            _message: PhantomData,
        };
        registry.add_handler::<M>(Box::new(handler), self.event);
        Ok(())
    }
}

/// The handler a saga is for message `M`: one step as one unit of work.
struct SagaHandler<S, M> {
    shared: Arc<Shared<S>>,
    inbox: Arc<dyn Inbox>,
    starts: bool,
    telemetry: crate::Telemetry,
    _message: PhantomData<fn(M)>,
}

impl<S: SagaStep<M>, M: Request> Handler<M> for SagaHandler<S, M> {
    async fn handle(&self, message: &M, ctx: &mut RequestContext) -> Result<(), Error> {
        let shared = &*self.shared;
        let name = S::NAME;
        let key = shared.saga.correlate(message, ctx);
        if key.is_empty() {
            return Err(Error::reject(format!(
                "saga '{name}': {} {} has an empty correlation key",
                type_name::<M>(),
                message.id()
            )));
        }
        let store = &shared.store;
        let mut tx = store.begin().await?;
        let entry = InboxEntry::of(message, ctx, &shared.inbox_key);
        match self.inbox.record(&entry, Some(tx.as_mut())).await {
            Ok(()) => {}
            Err(e) if e.is_duplicate() => {
                self.telemetry.record_duplicate(&shared.inbox_key);
                store.rollback(tx).await?;
                tracing::warn!(saga = name, %key, id = %message.id(), "duplicate message skipped: the saga already handled it");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let instance = store.load(tx.as_mut(), name, &key, self.starts).await?;
        let mut instance = match instance {
            Some(instance) if instance.status.has_ended() => {
                // Recorded as handled: a late message (a timeout no longer
                // needed) is ignored once, not on every redelivery.
                store.commit(tx).await?;
                tracing::info!(saga = name, %key, status = instance.status.as_str(), message = type_name::<M>(), "saga instance has ended; message ignored");
                return Ok(());
            }
            Some(instance) => instance,
            None => {
                let reason = format!(
                    "saga '{name}' has no instance '{key}', and {} does not start one",
                    type_name::<M>()
                );
                return match shared.not_found {
                    SagaNotFound::Ignore => {
                        store.commit(tx).await?;
                        tracing::info!(saga = name, %key, id = %message.id(), "saga instance not found; message ignored: {reason}");
                        Ok(())
                    }
                    SagaNotFound::DeadLetter => {
                        store.rollback(tx).await?;
                        Err(Error::reject(reason))
                    }
                };
            }
        };
        let state = if instance.is_new() {
            S::State::default()
        } else {
            match serde_json::from_value(instance.state.clone()) {
                Ok(state) => state,
                Err(e) => {
                    store.rollback(tx).await?;
                    return Err(Error::fatal(format!(
                        "saga '{name}' instance '{key}': stored state is not a {}: {e}",
                        type_name::<S::State>()
                    )));
                }
            }
        };
        let outer = ctx.set_transaction(tx);
        let mut step = SagaContext {
            ctx,
            state,
            key: &key,
            new: instance.is_new(),
            ending: None,
        };
        let result = shared.saga.handle(message, &mut step).await;
        let SagaContext { state, ending, .. } = step;
        let tx = ctx.take_transaction();
        let deposited = ctx.take_deposited();
        if let Some(outer) = outer {
            ctx.set_transaction(outer);
        }
        let Some(mut tx) = tx else {
            return Err(Error::configuration(format!(
                "saga '{name}': the step's transaction was taken out of its context"
            )));
        };
        if let Err(error) = result {
            store.rollback(tx).await?;
            return Err(error);
        }
        instance.state = match serde_json::to_value(&state) {
            Ok(state) => state,
            Err(e) => {
                store.rollback(tx).await?;
                return Err(Error::fatal(format!(
                    "saga '{name}': cannot store its state as JSON: {e}"
                )));
            }
        };
        if let Some(ending) = ending {
            instance.status = ending;
        }
        store.save(tx.as_mut(), &instance).await?;
        store.commit(tx).await?;
        tracing::debug!(saga = name, %key, message = type_name::<M>(), status = instance.status.as_str(), "saga step committed");
        if !deposited.is_empty() {
            let mut sender = ctx.child();
            sender.record_deposited(&deposited);
            if let Err(error) = sender.clear_deposited().await {
                tracing::warn!(%error, "messages of the saga step stay in the outbox for the sweeper");
            }
        }
        Ok(())
    }
}
