//! The validation step: rejects an invalid request before the handler runs.

use super::{Resources, Step};
use crate::command::handler::Handler;
use crate::error::Error;
use crate::{Request, RequestContext};

/// Checks a request. Any `Fn(&R) -> Result<(), String>` is one.
pub trait Validator<R>: Send + Sync + 'static {
    /// `Err(reason)` when the request is invalid.
    fn validate(&self, request: &R) -> Result<(), String>;
}

impl<R, F> Validator<R> for F
where
    F: Fn(&R) -> Result<(), String> + Send + Sync + 'static,
{
    fn validate(&self, request: &R) -> Result<(), String> {
        self(request)
    }
}

/// Step: runs the validator; an invalid request fails with [`Error::Validation`],
/// which is not retryable, and the handler never sees it.
#[derive(Debug, Clone)]
#[must_use]
pub struct Validate<V> {
    validator: V,
}

impl<V> Validate<V> {
    /// A validation step with `validator`.
    pub fn new(validator: V) -> Self {
        Validate { validator }
    }
}

/// The handler made by [`Validate`].
pub struct ValidatedHandler<H, V> {
    inner: H,
    validator: V,
}

impl<H: Send + 'static, V: Send + 'static> Step<H> for Validate<V> {
    type Handler = ValidatedHandler<H, V>;

    fn wrap(self, inner: H, _resources: &Resources) -> Result<Self::Handler, Error> {
        Ok(ValidatedHandler {
            inner,
            validator: self.validator,
        })
    }
}

impl<R: Request, H: Handler<R>, V: Validator<R>> Handler<R> for ValidatedHandler<H, V> {
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        self.validator
            .validate(request)
            .map_err(Error::Validation)?;
        self.inner.handle(request, ctx).await
    }
}
