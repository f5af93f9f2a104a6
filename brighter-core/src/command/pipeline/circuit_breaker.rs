//! The circuit breaker step: after a run of failures it fails fast for a while,
//! then lets one trial request through to decide whether to close again.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{Resources, Step};
use crate::command::handler::Handler;
use crate::error::Error;
use crate::{Request, RequestContext};

/// When a breaker opens and for how long.
#[derive(Clone)]
#[must_use]
pub struct CircuitBreakerConfig {
    failure_threshold: u32,
    open_duration: Duration,
    is_failure: Arc<dyn Fn(&Error) -> bool + Send + Sync>,
}

impl fmt::Debug for CircuitBreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerConfig")
            .field("failure_threshold", &self.failure_threshold)
            .field("open_duration", &self.open_duration)
            .finish_non_exhaustive()
    }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig::new(5, Duration::from_secs(30))
    }
}

impl CircuitBreakerConfig {
    /// Opens after `failure_threshold` failures in a row and stays open for
    /// `open_duration`. Failures are errors that are [`Error::is_retryable`]
    /// (handler failures, timeouts, transport errors); validation errors and
    /// outcomes say nothing about the health of what is behind the breaker.
    pub fn new(failure_threshold: u32, open_duration: Duration) -> Self {
        CircuitBreakerConfig {
            failure_threshold,
            open_duration,
            is_failure: Arc::new(Error::is_retryable),
        }
    }

    /// Decides which errors count as failures.
    pub fn failure_if(
        mut self,
        predicate: impl Fn(&Error) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.is_failure = Arc::new(predicate);
        self
    }

    fn validate(&self, name: &str) -> Result<(), Error> {
        if self.failure_threshold == 0 {
            return Err(Error::configuration(format!(
                "circuit breaker '{name}': failure_threshold must be at least 1"
            )));
        }
        if self.open_duration.is_zero() {
            return Err(Error::configuration(format!(
                "circuit breaker '{name}': open_duration must be above zero"
            )));
        }
        Ok(())
    }
}

/// The state of a breaker, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests run; failures are counted.
    Closed,
    /// Requests fail fast with [`Error::CircuitOpen`].
    Open,
    /// The open time is over: the next request is a trial (one at a time).
    HalfOpen,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_running: bool },
}

struct Shared {
    name: String,
    config: CircuitBreakerConfig,
    state: Mutex<State>,
    /// Mirrors "state is Closed", so a closed breaker admits without locking.
    closed: AtomicBool,
    /// Mirrors "state is Closed with no failures", so a success in the common case
    /// records without locking.
    clean: AtomicBool,
}

/// A circuit breaker. Cloning shares the breaker: use one clone in several
/// pipelines (or register it by name with the processor builder and refer to it
/// with [`CircuitBreaker::named`]) to share its state across handlers.
///
/// ```
/// use std::time::Duration;
/// use brighter_core::pipeline::{CircuitBreaker, CircuitBreakerConfig, CircuitState};
///
/// let breaker = CircuitBreaker::new("payments", CircuitBreakerConfig::new(3, Duration::from_secs(10)));
/// assert_eq!(breaker.state(), CircuitState::Closed);
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .finish()
    }
}

enum Permit {
    Normal,
    Trial,
}

impl CircuitBreaker {
    /// A new, closed breaker.
    pub fn new(name: impl Into<String>, config: CircuitBreakerConfig) -> Self {
        CircuitBreaker {
            shared: Arc::new(Shared {
                name: name.into(),
                config,
                state: Mutex::new(State::Closed { failures: 0 }),
                closed: AtomicBool::new(true),
                clean: AtomicBool::new(true),
            }),
        }
    }

    /// A step that uses the breaker registered under `name` with
    /// `CommandProcessorBuilder::circuit_breaker`; building the processor fails if
    /// there is none.
    pub fn named(name: impl Into<String>) -> NamedCircuitBreaker {
        NamedCircuitBreaker { name: name.into() }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        match *self.lock() {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { until } if Instant::now() < until => CircuitState::Open,
            State::Open { .. } | State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    pub(crate) fn validate_config(&self) -> Result<(), Error> {
        self.shared.config.validate(&self.shared.name)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a plain value updated in one assignment: a panic elsewhere
        // while the lock was held cannot leave it half-written.
        crate::sync::lock(&self.shared.state)
    }

    #[inline]
    fn acquire(&self) -> Result<Permit, Error> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Ok(Permit::Normal);
        }
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Ok(Permit::Normal),
            State::Open { until } if Instant::now() < until => Err(self.open_error()),
            State::Open { .. }
            | State::HalfOpen {
                trial_running: false,
            } => {
                self.set(
                    &mut state,
                    State::HalfOpen {
                        trial_running: true,
                    },
                );
                Ok(Permit::Trial)
            }
            State::HalfOpen {
                trial_running: true,
            } => Err(self.open_error()),
        }
    }

    #[inline]
    fn record(&self, permit: &Permit, result: &Result<(), Error>) {
        let failed = matches!(result, Err(e) if (self.shared.config.is_failure)(e));
        if !failed && matches!(permit, Permit::Normal) && self.shared.clean.load(Ordering::Acquire)
        {
            return;
        }
        let mut state = self.lock();
        let next = match (permit, failed, *state) {
            (Permit::Trial, false, State::HalfOpen { .. })
            | (Permit::Normal, false, State::Closed { .. }) => State::Closed { failures: 0 },
            (Permit::Trial, true, State::HalfOpen { .. }) => {
                tracing::warn!(breaker = %self.shared.name, "trial request failed; circuit breaker open again");
                self.open_state()
            }
            (Permit::Normal, true, State::Closed { failures }) => {
                let failures = failures + 1;
                if failures >= self.shared.config.failure_threshold {
                    tracing::warn!(breaker = %self.shared.name, failures, "circuit breaker opened");
                    self.open_state()
                } else {
                    State::Closed { failures }
                }
            }
            // A result from before the state changed under it, e.g. a request admitted
            // while closed that finishes after the breaker opened: it changes nothing.
            (_, _, current) => current,
        };
        self.set(&mut state, next);
    }

    fn set(&self, state: &mut State, next: State) {
        *state = next;
        let (closed, clean) = match next {
            State::Closed { failures } => (true, failures == 0),
            _ => (false, false),
        };
        self.shared.closed.store(closed, Ordering::Release);
        self.shared.clean.store(clean, Ordering::Release);
    }

    fn cancel_trial(&self) {
        let mut state = self.lock();
        if let State::HalfOpen {
            trial_running: true,
        } = *state
        {
            self.set(
                &mut state,
                State::HalfOpen {
                    trial_running: false,
                },
            );
        }
    }

    fn open_state(&self) -> State {
        State::Open {
            until: Instant::now() + self.shared.config.open_duration,
        }
    }

    fn open_error(&self) -> Error {
        Error::CircuitOpen {
            name: self.shared.name.clone(),
        }
    }
}

/// Puts a half-open breaker back to "no trial running" when a trial request's
/// future is dropped before it finished (e.g. cancelled by an outer timeout).
struct TrialGuard<'a> {
    breaker: &'a CircuitBreaker,
    armed: bool,
}

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.cancel_trial();
        }
    }
}

/// The handler made by a circuit breaker step.
pub struct CircuitBreakerHandler<H> {
    inner: H,
    breaker: CircuitBreaker,
}

impl<H: Send + 'static> Step<H> for CircuitBreaker {
    type Handler = CircuitBreakerHandler<H>;

    fn wrap(self, inner: H, _resources: &Resources) -> Result<Self::Handler, Error> {
        self.shared.config.validate(&self.shared.name)?;
        Ok(CircuitBreakerHandler {
            inner,
            breaker: self,
        })
    }
}

/// Step: the breaker registered with the processor under this name.
#[derive(Debug, Clone)]
#[must_use]
pub struct NamedCircuitBreaker {
    name: String,
}

impl<H: Send + 'static> Step<H> for NamedCircuitBreaker {
    type Handler = CircuitBreakerHandler<H>;

    fn wrap(self, inner: H, resources: &Resources) -> Result<Self::Handler, Error> {
        let breaker = resources
            .circuit_breaker(&self.name)
            .cloned()
            .ok_or_else(|| {
                Error::configuration(format!(
                    "pipeline uses circuit breaker '{}' but none is registered with that name",
                    self.name
                ))
            })?;
        breaker.wrap(inner, resources)
    }
}

impl<R: Request, H: Handler<R>> Handler<R> for CircuitBreakerHandler<H> {
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        match self.breaker.acquire()? {
            Permit::Normal => {
                let result = self.inner.handle(request, ctx).await;
                self.breaker.record(&Permit::Normal, &result);
                result
            }
            Permit::Trial => {
                let mut guard = TrialGuard {
                    breaker: &self.breaker,
                    armed: true,
                };
                let result = self.inner.handle(request, ctx).await;
                guard.armed = false;
                self.breaker.record(&Permit::Trial, &result);
                result
            }
        }
    }
}
