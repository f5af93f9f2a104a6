//! The fallback step: when the rest of the pipeline fails, runs a fallback handler
//! that gets the error.

use std::future::Future;
use std::marker::PhantomData;

use super::{Resources, Step};
use crate::command::handler::Handler;
use crate::error::Error;
use crate::{Request, RequestContext};

/// Handles a request whose pipeline failed with `error`. Its result is the result
/// of the request.
pub trait FallbackHandler<R: Request>: Send + Sync + 'static {
    /// Called with the error the rest of the pipeline failed with.
    fn fallback(
        &self,
        request: &R,
        ctx: &mut RequestContext,
        error: Error,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// Step: on failure of the steps and handler inside it, runs the fallback. Outcomes
/// (defer, reject, don't-ack) are deliberate and pass through untouched.
#[derive(Debug, Clone)]
#[must_use]
pub struct Fallback<F> {
    fallback: F,
}

impl<F> Fallback<F> {
    /// A fallback step running `fallback`.
    pub fn new(fallback: F) -> Self {
        Fallback { fallback }
    }
}

/// The handler made by [`Fallback`].
pub struct WithFallback<H, F> {
    inner: H,
    fallback: F,
}

impl<H: Send + 'static, F: Send + 'static> Step<H> for Fallback<F> {
    type Handler = WithFallback<H, F>;

    fn wrap(self, inner: H, _resources: &Resources) -> Result<Self::Handler, Error> {
        Ok(WithFallback {
            inner,
            fallback: self.fallback,
        })
    }
}

impl<R: Request, H: Handler<R>, F: FallbackHandler<R>> Handler<R> for WithFallback<H, F> {
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        match self.inner.handle(request, ctx).await {
            Err(error) if !error.is_outcome() => {
                tracing::info!(%error, "running fallback");
                self.fallback.fallback(request, ctx, error).await
            }
            result => result,
        }
    }
}

/// A fallback handler from an async closure taking the request (cloned), the
/// context (cloned) and the error.
pub fn fallback_fn<R, F, Fut>(f: F) -> FallbackFn<R, F>
where
    R: Request + Clone,
    F: Fn(R, RequestContext, Error) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send,
{
    FallbackFn {
        f,
        _request: PhantomData,
    }
}

/// The fallback handler returned by [`fallback_fn`].
pub struct FallbackFn<R, F> {
    f: F,
    _request: PhantomData<fn(R)>,
}

impl<R, F, Fut> FallbackHandler<R> for FallbackFn<R, F>
where
    R: Request + Clone,
    F: Fn(R, RequestContext, Error) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send,
{
    fn fallback(
        &self,
        request: &R,
        ctx: &mut RequestContext,
        error: Error,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        (self.f)(request.clone(), ctx.clone(), error)
    }
}
