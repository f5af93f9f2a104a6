//! The policy pipeline: ordered steps declared per handler registration. A step
//! wraps the handler (or the next step) in another handler, like a tower `Layer`.
//! Steps are resolved when the processor is built, so a step that needs something
//! that was not configured (a named circuit breaker, feature flags, an inbox) is
//! an error at start-up, not at the first request.
//!
//! ```
//! use std::time::Duration;
//! use brighter_core::pipeline::{Pipeline, RequestTracing, Retry, Timeout};
//!
//! let pipeline = Pipeline::new()
//!     .step(RequestTracing)                                        // runs first
//!     .step(Retry::new(3).backoff(Duration::from_millis(50), Duration::from_secs(1)))
//!     .step(Timeout::new(Duration::from_secs(5)));                 // closest to the handler
//! # let _ = pipeline;
//! ```

mod circuit_breaker;
mod fallback;
mod feature_switch;
mod inbox_step;
mod retry;
mod step_fn;
mod timeout;
mod tracing_step;
mod validation;

use std::collections::HashMap;
use std::sync::Arc;

pub use circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerHandler, CircuitState, NamedCircuitBreaker,
};
pub use fallback::{Fallback, FallbackFn, FallbackHandler, WithFallback, fallback_fn};
pub use feature_switch::{FeatureFlags, FeatureSwitch, FeatureSwitchHandler};
pub use inbox_step::{InboxHandler, OnDuplicate, UseInbox};
pub use retry::{Retry, RetryHandler};
pub use step_fn::{Next, StepFn, StepFnHandler, step_fn};
pub use timeout::{Timeout, TimeoutHandler};
pub use tracing_step::{RequestTracing, TracedHandler};
pub use validation::{Validate, ValidatedHandler, Validator};

use crate::error::Error;
use crate::store::inbox::Inbox;

/// A pipeline step: turns the inner handler `H` into a handler that adds a policy
/// around it. Implement it to write your own step; `resources` holds what the
/// processor was configured with.
pub trait Step<H>: Send + 'static {
    /// The handler this step produces around `H`.
    type Handler;

    /// Wraps `inner`. Fail with [`Error::Configuration`] when the step cannot work.
    fn wrap(self, inner: H, resources: &Resources) -> Result<Self::Handler, Error>;
}

/// What the processor was configured with, for steps to resolve at build time.
#[derive(Default, Clone)]
pub struct Resources {
    pub(crate) breakers: HashMap<String, CircuitBreaker>,
    pub(crate) feature_flags: Option<Arc<dyn FeatureFlags>>,
    pub(crate) inbox: Option<Arc<dyn Inbox>>,
    pub(crate) extensions: http::Extensions,
    pub(crate) telemetry: Option<crate::Telemetry>,
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resources")
            .field("breakers", &self.breakers.keys().collect::<Vec<_>>())
            .field("feature_flags", &self.feature_flags.is_some())
            .field("inbox", &self.inbox.is_some())
            .finish_non_exhaustive()
    }
}

impl Resources {
    /// The circuit breaker registered under `name`.
    pub fn circuit_breaker(&self, name: &str) -> Option<&CircuitBreaker> {
        self.breakers.get(name)
    }

    /// The configured feature flags.
    pub fn feature_flags(&self) -> Option<&Arc<dyn FeatureFlags>> {
        self.feature_flags.as_ref()
    }

    /// The configured inbox.
    pub fn inbox(&self) -> Option<&Arc<dyn Inbox>> {
        self.inbox.as_ref()
    }

    /// The processor's telemetry, for steps that count what they do (a
    /// disabled one outside a processor's build).
    pub fn telemetry(&self) -> crate::Telemetry {
        self.telemetry
            .clone()
            .unwrap_or_else(crate::Telemetry::disabled)
    }

    /// Values of users' own steps, added with `CommandProcessorBuilder::resource`.
    pub fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }
}

/// An ordered list of steps; the first declared runs first (outermost).
#[derive(Debug, Clone)]
#[must_use]
pub struct Pipeline<S> {
    steps: S,
}

impl Default for Pipeline<Identity> {
    fn default() -> Self {
        Pipeline::new()
    }
}

impl Pipeline<Identity> {
    /// An empty pipeline: the handler runs as it is.
    pub fn new() -> Self {
        Pipeline { steps: Identity }
    }
}

impl<S> Pipeline<S> {
    /// Adds a step after (inside) the ones declared so far.
    pub fn step<T>(self, step: T) -> Pipeline<Stack<T, S>> {
        Pipeline {
            steps: Stack {
                inner: step,
                outer: self.steps,
            },
        }
    }

    /// Wraps `handler` in the steps.
    pub fn wrap<H>(self, handler: H, resources: &Resources) -> Result<S::Handler, Error>
    where
        S: Step<H>,
    {
        self.steps.wrap(handler, resources)
    }
}

/// The empty step list.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl<H: Send + 'static> Step<H> for Identity {
    type Handler = H;

    fn wrap(self, inner: H, _resources: &Resources) -> Result<H, Error> {
        Ok(inner)
    }
}

/// Two steps: `outer` wraps what `inner` made.
#[derive(Debug, Clone)]
pub struct Stack<Inner, Outer> {
    inner: Inner,
    outer: Outer,
}

impl<H, Inner, Outer> Step<H> for Stack<Inner, Outer>
where
    Inner: Step<H>,
    Outer: Step<Inner::Handler>,
{
    type Handler = Outer::Handler;

    fn wrap(self, inner: H, resources: &Resources) -> Result<Self::Handler, Error> {
        let wrapped = self.inner.wrap(inner, resources)?;
        self.outer.wrap(wrapped, resources)
    }
}
