//! Ad-hoc middleware from a closure: it gets the request, the context and
//! [`Next`] to run the rest of the pipeline.

use std::marker::PhantomData;

use futures::future::BoxFuture;

use super::{Resources, Step};
use crate::command::handler::{DynHandler, Handler};
use crate::error::Error;
use crate::{Request, RequestContext};

/// The rest of the pipeline, for a [`step_fn`] closure to run (or not).
pub struct Next<'a, R> {
    inner: &'a dyn DynHandler<R>,
}

impl<'a, R: Request> Next<'a, R> {
    /// Runs the rest of the pipeline.
    pub async fn run(self, request: &'a R, ctx: &'a mut RequestContext) -> Result<(), Error> {
        self.inner.handle_dyn(request, ctx).await
    }
}

/// A step from a closure. The closure returns a boxed future, so it costs one
/// allocation per request; write a [`Step`] type for hot paths.
///
/// ```
/// use brighter_core::pipeline::{step_fn, Pipeline};
/// # struct Ping { id: uuid::Uuid }
/// # impl brighter_core::Request for Ping { fn id(&self) -> uuid::Uuid { self.id } }
/// let audit = step_fn(|ping: &Ping, ctx, next| {
///     Box::pin(async move {
///         println!("before {}", ping.id);
///         let result = next.run(ping, ctx).await;
///         println!("after {}", ping.id);
///         result
///     })
/// });
/// let pipeline = Pipeline::new().step(audit);
/// # let _ = pipeline;
/// ```
pub fn step_fn<R, F>(f: F) -> StepFn<R, F>
where
    R: Request,
    F: for<'a> Fn(&'a R, &'a mut RequestContext, Next<'a, R>) -> BoxFuture<'a, Result<(), Error>>
        + Send
        + Sync
        + 'static,
{
    StepFn {
        f,
        _request: PhantomData,
    }
}

/// The step returned by [`step_fn`].
pub struct StepFn<R, F> {
    f: F,
    _request: PhantomData<fn(R)>,
}

/// The handler made by a [`StepFn`].
pub struct StepFnHandler<H, R, F> {
    inner: H,
    f: F,
    _request: PhantomData<fn(R)>,
}

impl<H: Send + 'static, R: 'static, F: Send + 'static> Step<H> for StepFn<R, F> {
    type Handler = StepFnHandler<H, R, F>;

    fn wrap(self, inner: H, _resources: &Resources) -> Result<Self::Handler, Error> {
        Ok(StepFnHandler {
            inner,
            f: self.f,
            _request: PhantomData,
        })
    }
}

impl<R, H, F> Handler<R> for StepFnHandler<H, R, F>
where
    R: Request,
    H: Handler<R>,
    F: for<'a> Fn(&'a R, &'a mut RequestContext, Next<'a, R>) -> BoxFuture<'a, Result<(), Error>>
        + Send
        + Sync
        + 'static,
{
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        (self.f)(request, ctx, Next { inner: &self.inner }).await
    }
}
