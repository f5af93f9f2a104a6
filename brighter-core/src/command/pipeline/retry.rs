//! The retry step: tries the inner handler again on retryable errors, with
//! exponential backoff and jitter (delays from `backon`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::{Resources, Step};
use crate::command::handler::Handler;
use crate::error::Error;
use crate::{Request, RequestContext};

type RetryIf = Arc<dyn Fn(&Error) -> bool + Send + Sync>;

/// Step: up to `max_attempts` tries in all, waiting `min_delay * factor^n` (capped
/// at `max_delay`, plus jitter when enabled) between them. Retries only errors for
/// which the retry-if predicate holds (default [`Error::is_retryable`], so
/// validation errors, fatal errors and open breakers are not retried); outcomes
/// (defer, reject, don't-ack) are never retried.
///
/// ```
/// use std::time::Duration;
/// use brighter_core::{Error, pipeline::Retry};
///
/// let retry = Retry::new(5)
///     .backoff(Duration::from_millis(100), Duration::from_secs(5))
///     .jitter(true)
///     .retry_if(|e: &Error| matches!(e, Error::Timeout(_)));
/// # let _ = retry;
/// ```
#[derive(Clone)]
#[must_use]
pub struct Retry {
    max_attempts: u32,
    min_delay: Duration,
    max_delay: Duration,
    factor: f32,
    jitter: bool,
    retry_if: Option<RetryIf>,
}

impl fmt::Debug for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("max_attempts", &self.max_attempts)
            .field("min_delay", &self.min_delay)
            .field("max_delay", &self.max_delay)
            .field("factor", &self.factor)
            .field("jitter", &self.jitter)
            .field("retry_if", &self.retry_if.is_some())
            .finish()
    }
}

impl Retry {
    /// At most `max_attempts` tries in all (the first one included); 100 ms first
    /// delay, doubling, capped at 10 s, with jitter.
    pub fn new(max_attempts: u32) -> Self {
        Retry {
            max_attempts,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            factor: 2.0,
            jitter: true,
            retry_if: None,
        }
    }

    /// First delay and the cap.
    pub fn backoff(mut self, min_delay: Duration, max_delay: Duration) -> Self {
        self.min_delay = min_delay;
        self.max_delay = max_delay;
        self
    }

    /// Growth factor between delays (at least 1.0).
    pub fn factor(mut self, factor: f32) -> Self {
        self.factor = factor;
        self
    }

    /// Adds a random jitter in `[0, delay)` to each delay, so that many retrying
    /// clients do not retry in lock step.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Retries only errors for which `predicate` holds.
    pub fn retry_if(mut self, predicate: impl Fn(&Error) -> bool + Send + Sync + 'static) -> Self {
        self.retry_if = Some(Arc::new(predicate));
        self
    }

    fn backoff_builder(&self) -> Result<ExponentialBuilder, Error> {
        if self.max_attempts == 0 {
            return Err(Error::configuration(
                "retry: max_attempts must be at least 1",
            ));
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(Error::configuration(format!(
                "retry: factor must be a finite number >= 1.0, got {}",
                self.factor
            )));
        }
        if self.min_delay > self.max_delay {
            return Err(Error::configuration(format!(
                "retry: min_delay {:?} is above max_delay {:?}",
                self.min_delay, self.max_delay
            )));
        }
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .with_max_times(self.max_attempts as usize - 1);
        Ok(if self.jitter {
            builder.with_jitter()
        } else {
            builder
        })
    }
}

/// The handler made by [`Retry`].
pub struct RetryHandler<H> {
    inner: H,
    backoff: ExponentialBuilder,
    retry_if: Option<RetryIf>,
    telemetry: crate::Telemetry,
}

impl<H: Send + 'static> Step<H> for Retry {
    type Handler = RetryHandler<H>;

    fn wrap(self, inner: H, resources: &Resources) -> Result<Self::Handler, Error> {
        Ok(RetryHandler {
            inner,
            backoff: self.backoff_builder()?,
            retry_if: self.retry_if,
            telemetry: resources.telemetry(),
        })
    }
}

impl<H> RetryHandler<H> {
    fn should_retry(&self, error: &Error) -> bool {
        if error.is_outcome() {
            return false;
        }
        match &self.retry_if {
            Some(predicate) => predicate(error),
            None => error.is_retryable(),
        }
    }
}

impl<R: Request, H: Handler<R>> Handler<R> for RetryHandler<H> {
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        // Built on the first failure only, and boxed like the sleep below: the
        // common, successful path neither builds them nor carries them in its future.
        let mut delays: Option<Box<backon::ExponentialBackoff>> = None;
        let mut attempt = 1u32;
        loop {
            let error = match self.inner.handle(request, ctx).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if !self.should_retry(&error) {
                return Err(error);
            }
            let next = delays
                .get_or_insert_with(|| Box::new(self.backoff.build()))
                .next();
            let Some(delay) = next else {
                tracing::debug!(attempt, %error, "retries exhausted");
                return Err(error);
            };
            tracing::debug!(attempt, ?delay, %error, "retrying");
            self.telemetry.record_retry(std::any::type_name::<R>());
            Box::pin(tokio::time::sleep(delay)).await;
            attempt += 1;
        }
    }
}
