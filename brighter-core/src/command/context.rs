//! The context that travels with one request through the pipeline.

use std::sync::Arc;

use uuid::Uuid;

use crate::command::processor::Inner;
use crate::message::Message;
use crate::store::Transaction;

/// Context for one request as it goes through the pipeline: data (the
/// correlation id, a typed bag, the message it came from on the consumer side,
/// the current tracing span, the unit of work's transaction) and verbs to
/// continue the conversation: [`send`](Self::send), [`publish`](Self::publish),
/// [`post`](Self::post), [`deposit_post`](Self::deposit_post),
/// [`reply`](Self::reply) and [`call`](Self::call).
///
/// ```
/// use brighter_core::RequestContext;
///
/// #[derive(Clone)]
/// struct TenantId(u32);
///
/// let mut ctx = RequestContext::new();
/// ctx.bag_mut().insert(TenantId(7));
/// assert_eq!(ctx.bag().get::<TenantId>().map(|t| t.0), Some(7));
/// assert!(ctx.message().is_none());
/// ```
pub struct RequestContext {
    pub(crate) correlation_id: Option<Uuid>,
    bag: http::Extensions,
    pub(crate) message: Option<Arc<Message>>,
    pub(crate) span: tracing::Span,
    /// What the verbs send through: set when the processor dispatches.
    pub(crate) handle: Option<Arc<Inner>>,
    /// Only reached through `&mut self` (`Mutex::get_mut`, no locking): the mutex
    /// only makes the context `Sync` around a transaction that is `Send` alone.
    transaction: std::sync::Mutex<Option<Box<dyn Transaction>>>,
    deposited: Vec<Uuid>,
    /// Set on a context lent by value (to a closure handler): where its
    /// transaction and deposited ids go back when it is dropped.
    lent: Option<Arc<std::sync::Mutex<Option<Lent>>>>,
}

/// What a lent context hands back when dropped.
type Lent = (Option<Box<dyn Transaction>>, Vec<Uuid>);

impl Drop for RequestContext {
    fn drop(&mut self) {
        if let Some(back) = self.lent.take() {
            let returned = (self.slot().take(), std::mem::take(&mut self.deposited));
            *crate::sync::lock(&back) = Some(returned);
        }
    }
}

/// A clone has the same correlation id, bag, message and span, and sends
/// through the same processor, but has no transaction: a transaction belongs
/// to one handler at a time.
impl Clone for RequestContext {
    fn clone(&self) -> Self {
        RequestContext {
            correlation_id: self.correlation_id,
            bag: self.bag.clone(),
            message: self.message.clone(),
            span: self.span.clone(),
            handle: self.handle.clone(),
            transaction: std::sync::Mutex::new(None),
            deposited: Vec::new(),
            lent: None,
        }
    }
}

impl std::fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestContext")
            .field("correlation_id", &self.correlation_id)
            .field("bag", &self.bag)
            .field("message", &self.message.as_ref().map(|m| m.id()))
            .field("span", &self.span)
            .field("has_transaction", &self.has_transaction())
            .field("deposited", &self.deposited)
            .finish_non_exhaustive()
    }
}

impl Default for RequestContext {
    fn default() -> Self {
        RequestContext::new()
    }
}

impl RequestContext {
    /// An empty context: the processor fills in the correlation id (the request id
    /// unless one was set), and what the verbs send through, when the request is
    /// dispatched.
    pub fn new() -> Self {
        RequestContext {
            correlation_id: None,
            bag: http::Extensions::new(),
            message: None,
            span: tracing::Span::none(),
            handle: None,
            transaction: std::sync::Mutex::new(None),
            deposited: Vec::new(),
            lent: None,
        }
    }

    /// A context whose correlation id is `correlation_id`.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: Uuid) -> Self {
        self.correlation_id = Some(correlation_id);
        self
    }

    /// A context for a request that was mapped from `message`: the message's
    /// correlation id, and the message itself.
    pub fn from_message(message: Arc<Message>) -> Self {
        let mut ctx = RequestContext::new();
        ctx.correlation_id = Some(message.header.correlation_id);
        ctx.message = Some(message);
        ctx
    }

    /// The correlation id. Set before any handler runs; nil only on a context that
    /// was never dispatched.
    pub fn correlation_id(&self) -> Uuid {
        self.correlation_id.unwrap_or_else(Uuid::nil)
    }

    /// The typed bag: values any step or handler put there.
    pub fn bag(&self) -> &http::Extensions {
        &self.bag
    }

    /// The typed bag, to add or take values.
    pub fn bag_mut(&mut self) -> &mut http::Extensions {
        &mut self.bag
    }

    /// The message this request was mapped from, when it came from a consumer.
    pub fn message(&self) -> Option<&Message> {
        self.message.as_deref()
    }

    /// The span of the request being handled, set by the tracing step (or by the
    /// message pump); a disabled span when neither is in the pipeline.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Fills in what the processor owns before handlers run.
    pub(crate) fn prepare(&mut self, request_id: Uuid, processor: &Arc<Inner>) {
        if self.correlation_id.is_none() {
            self.correlation_id = Some(request_id);
        }
        if self.handle.is_none() {
            self.handle = Some(Arc::clone(processor));
        }
    }

    /// A child context for a follow-up request: same correlation id and
    /// processor, empty bag, no originating message, no transaction.
    pub fn child(&self) -> RequestContext {
        RequestContext {
            correlation_id: self.correlation_id,
            bag: http::Extensions::new(),
            message: None,
            span: tracing::Span::none(),
            handle: self.handle.clone(),
            transaction: std::sync::Mutex::new(None),
            deposited: Vec::new(),
            lent: None,
        }
    }

    /// Lends this context by value for the length of `run` (a closure
    /// handler takes its context by value): the lent copy holds the
    /// transaction, and what was deposited in it comes back here when the
    /// copy is dropped, as it is when `run`'s future ends.
    pub(crate) async fn lend<T>(&mut self, run: impl AsyncFnOnce(RequestContext) -> T) -> T {
        let back = Arc::new(std::sync::Mutex::new(None));
        let mut lent = self.clone();
        if let Some(tx) = self.take_transaction() {
            lent.set_transaction(tx);
        }
        lent.lent = Some(Arc::clone(&back));
        let result = run(lent).await;
        let returned = crate::sync::lock(&back).take();
        match returned {
            Some((tx, deposited)) => {
                if let Some(tx) = tx {
                    self.set_transaction(tx);
                }
                self.deposited.extend(deposited);
            }
            // The closure kept its context (moved it into a spawned task):
            // the transaction went with it, which a unit of work reports.
            None => tracing::warn!(
                "a closure handler kept its request context; its transaction is not back"
            ),
        }
        result
    }

    /// Puts a transaction in the context, for the steps and handler inside to
    /// share (a unit-of-work step does this); returns the one it replaces.
    pub fn set_transaction(&mut self, tx: Box<dyn Transaction>) -> Option<Box<dyn Transaction>> {
        self.slot().replace(tx)
    }

    /// Takes the context's transaction out, to commit or roll it back.
    pub fn take_transaction(&mut self) -> Option<Box<dyn Transaction>> {
        self.slot().take()
    }

    /// Whether the context holds a transaction.
    pub fn has_transaction(&self) -> bool {
        crate::sync::lock(&self.transaction).is_some()
    }

    fn slot(&mut self) -> &mut Option<Box<dyn Transaction>> {
        self.transaction
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The context's transaction, for a handler's own writes and for the inbox and
    /// outbox to join. Downcast it with [`downcast_transaction`](crate::downcast_transaction)
    /// or a store crate's helper.
    pub fn transaction_mut(&mut self) -> Option<&mut dyn Transaction> {
        self.slot().as_deref_mut()
    }

    /// Ids of messages deposited in the context's transaction, to clear after
    /// it commits (see [`clear_deposited`](Self::clear_deposited)).
    pub fn take_deposited(&mut self) -> Vec<Uuid> {
        std::mem::take(&mut self.deposited)
    }

    /// Whether messages were deposited in the context's transaction.
    pub fn has_deposited(&self) -> bool {
        !self.deposited.is_empty()
    }

    /// Records messages deposited in the context's transaction, for
    /// [`clear_deposited`](Self::clear_deposited) to send after the commit
    /// (for units of work of your own; `deposit_post` records its own).
    pub fn record_deposited(&mut self, ids: &[Uuid]) {
        self.deposited.extend_from_slice(ids);
    }
}
