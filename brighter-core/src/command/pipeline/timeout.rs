//! The timeout step: cancels the inner handler's future when it runs too long.

use std::time::Duration;

use super::{Resources, Step};
use crate::command::handler::Handler;
use crate::error::Error;
use crate::{Request, RequestContext};

/// Step: drops (cancels) the rest of the pipeline after `duration` and fails with
/// [`Error::Timeout`], which is retryable.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Timeout {
    duration: Duration,
}

impl Timeout {
    /// A timeout of `duration` (must be above zero).
    pub fn new(duration: Duration) -> Self {
        Timeout { duration }
    }
}

/// The handler made by [`Timeout`].
#[derive(Debug)]
pub struct TimeoutHandler<H> {
    inner: H,
    duration: Duration,
}

impl<H: Send + 'static> Step<H> for Timeout {
    type Handler = TimeoutHandler<H>;

    fn wrap(self, inner: H, _resources: &Resources) -> Result<Self::Handler, Error> {
        if self.duration.is_zero() {
            return Err(Error::configuration("timeout: duration must be above zero"));
        }
        Ok(TimeoutHandler {
            inner,
            duration: self.duration,
        })
    }
}

impl<R: Request, H: Handler<R>> Handler<R> for TimeoutHandler<H> {
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        match tokio::time::timeout(self.duration, self.inner.handle(request, ctx)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(Error::Timeout(self.duration)),
        }
    }
}
