//! The tracing step: a span per request with its type and id, and a log line for
//! its result.

use std::any::type_name;

use std::future::Future;

use futures::future::Either;
use tracing::Instrument;

use super::{Resources, Step};
use crate::command::handler::Handler;
use crate::error::Error;
use crate::{Request, RequestContext};

/// Step: runs the rest of the pipeline inside a `handle <type>` span with the
/// request type, id and correlation id, and logs failures.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTracing;

/// The handler made by [`RequestTracing`].
#[derive(Debug)]
pub struct TracedHandler<H> {
    inner: H,
}

impl<H: Send + 'static> Step<H> for RequestTracing {
    type Handler = TracedHandler<H>;

    fn wrap(self, inner: H, _resources: &Resources) -> Result<Self::Handler, Error> {
        Ok(TracedHandler { inner })
    }
}

impl<R: Request, H: Handler<R>> Handler<R> for TracedHandler<H> {
    fn handle(
        &self,
        request: &R,
        ctx: &mut RequestContext,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let span = tracing::info_span!(
            "handle",
            request.r#type = type_name::<R>(),
            request.id = %request.id(),
            messaging.message.conversation_id = %ctx.correlation_id(),
        );
        // With the span disabled (no subscriber wants it), add nothing: not even a
        // future layer of our own.
        if span.is_disabled() {
            return Either::Left(self.inner.handle(request, ctx));
        }
        Either::Right(async move {
            let outer = std::mem::replace(&mut ctx.span, span.clone());
            let result = self
                .inner
                .handle(request, ctx)
                .instrument(span.clone())
                .await;
            ctx.span = outer;
            if let Err(error) = &result {
                if error.is_outcome() {
                    tracing::debug!(parent: &span, %error, "request outcome");
                } else {
                    tracing::warn!(parent: &span, %error, "request failed");
                }
            }
            result
        })
    }
}
