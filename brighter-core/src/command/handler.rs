//! Handlers: the user code a request is dispatched to. Implement [`Handler`] on a
//! type, or wrap an async closure with [`handler_fn`].

use std::future::Future;
use std::marker::PhantomData;

use futures::future::BoxFuture;

use crate::error::Error;
use crate::{Request, RequestContext};

/// Handles requests of type `R`. Pipeline steps are handlers that wrap handlers.
///
/// ```
/// use brighter_core::{Command, Error, Handler, Request, RequestContext};
/// use uuid::Uuid;
///
/// struct Greet { id: Uuid, name: String }
/// impl Request for Greet { fn id(&self) -> Uuid { self.id } }
/// impl Command for Greet {}
///
/// struct GreetHandler;
/// impl Handler<Greet> for GreetHandler {
///     async fn handle(&self, cmd: &Greet, _ctx: &mut RequestContext) -> Result<(), Error> {
///         println!("hello, {}", cmd.name);
///         Ok(())
///     }
/// }
/// ```
pub trait Handler<R: Request>: Send + Sync + 'static {
    /// Handles one request. Return one of the outcome errors
    /// ([`Error::defer`], [`Error::reject`], [`Error::dont_ack`]) to steer a message pump.
    fn handle(
        &self,
        request: &R,
        ctx: &mut RequestContext,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// A handler behind a pointer, with the future boxed: the one type erasure per
/// dispatched request.
pub(crate) trait DynHandler<R>: Send + Sync {
    fn handle_dyn<'a>(
        &'a self,
        request: &'a R,
        ctx: &'a mut RequestContext,
    ) -> BoxFuture<'a, Result<(), Error>>;
}

impl<R: Request, H: Handler<R>> DynHandler<R> for H {
    fn handle_dyn<'a>(
        &'a self,
        request: &'a R,
        ctx: &'a mut RequestContext,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.handle(request, ctx))
    }
}

/// A handler made from an async closure that takes the request (cloned for
/// each call) and its context by value. The context is lent, not copied: it
/// holds the transaction of a unit of work around the handler, so the
/// closure's `deposit_post` joins that transaction, and what it deposited
/// goes back to the unit of work when the closure's future ends (keep the
/// context within the future: one moved into a spawned task takes the
/// transaction with it, and the unit of work fails).
///
/// ```
/// use brighter_core::{handler_fn, Error, RequestContext};
/// # #[derive(Clone)] struct Ping { id: uuid::Uuid }
/// # impl brighter_core::Request for Ping { fn id(&self) -> uuid::Uuid { self.id } }
/// let handler = handler_fn(|ping: Ping, _ctx: RequestContext| async move {
///     println!("ping {}", ping.id);
///     Ok::<_, Error>(())
/// });
/// ```
pub fn handler_fn<R, F, Fut>(f: F) -> HandlerFn<R, F>
where
    R: Request + Clone,
    F: Fn(R, RequestContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send,
{
    HandlerFn {
        f,
        _request: PhantomData,
    }
}

/// The handler returned by [`handler_fn`].
pub struct HandlerFn<R, F> {
    f: F,
    _request: PhantomData<fn(R)>,
}

impl<R, F, Fut> Handler<R> for HandlerFn<R, F>
where
    R: Request + Clone,
    F: Fn(R, RequestContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send,
{
    fn handle(
        &self,
        request: &R,
        ctx: &mut RequestContext,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        // The closure takes its context by value: lend it this one, with the
        // transaction (a unit of work's), and take back what it deposited.
        ctx.lend(async |lent| (self.f)(request.clone(), lent).await)
    }
}
