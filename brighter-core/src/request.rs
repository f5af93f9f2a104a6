//! Requests (commands and events) and the context that travels with one
//! through the pipeline.

use std::sync::Arc;

use uuid::Uuid;

use crate::message::Message;
use crate::processor::CommandProcessor;

/// Anything the command processor can dispatch: it has a unique id.
///
/// Implement [`Command`] or [`Event`] on top of it to say how it is dispatched.
pub trait Request: Send + Sync + 'static {
    /// The request's unique id. It becomes the message id when the request is
    /// posted, and is the inbox key on the consumer side; make it with
    /// `Uuid::now_v7()` so message ids are time-ordered.
    fn id(&self) -> Uuid;

    /// Messages with the same partition key are delivered in order (Kafka record
    /// key, RabbitMQ consistent ordering within a queue). `None` by default.
    fn partition_key(&self) -> Option<String> {
        None
    }
}

/// A request with exactly one handler: `send` runs it, `post` sends it as a message.
pub trait Command: Request {}

/// A request with any number of handlers: `publish` runs them all.
pub trait Event: Request {}

/// Context for one request as it goes through the pipeline: correlation id, a
/// typed bag, the message it came from (on the consumer side), the current
/// tracing span and a handle to the processor (so a handler can send more).
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
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub(crate) correlation_id: Option<Uuid>,
    bag: http::Extensions,
    message: Option<Arc<Message>>,
    pub(crate) span: tracing::Span,
    pub(crate) processor: Option<CommandProcessor>,
}

impl Default for RequestContext {
    fn default() -> Self {
        RequestContext::new()
    }
}

impl RequestContext {
    /// An empty context: the processor fills in the correlation id (the request id
    /// unless one was set) and itself when the request is dispatched.
    pub fn new() -> Self {
        RequestContext {
            correlation_id: None,
            bag: http::Extensions::new(),
            message: None,
            span: tracing::Span::none(),
            processor: None,
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
        RequestContext {
            correlation_id: Some(message.header.correlation_id),
            message: Some(message),
            ..RequestContext::new()
        }
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

    /// The processor dispatching this request, so a handler can send, publish or
    /// post further requests in the same conversation.
    pub fn processor(&self) -> Option<&CommandProcessor> {
        self.processor.as_ref()
    }

    /// Fills in what the processor owns before handlers run.
    pub(crate) fn prepare(&mut self, request_id: Uuid, processor: &CommandProcessor) {
        if self.correlation_id.is_none() {
            self.correlation_id = Some(request_id);
        }
        if self.processor.is_none() {
            self.processor = Some(processor.clone());
        }
    }

    /// A child context for a follow-up request: same correlation id and processor,
    /// empty bag, no originating message.
    pub fn child(&self) -> RequestContext {
        RequestContext {
            correlation_id: self.correlation_id,
            bag: http::Extensions::new(),
            message: None,
            span: tracing::Span::none(),
            processor: self.processor.clone(),
        }
    }
}
