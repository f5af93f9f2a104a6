//! The inbox step: once-only handling. A request whose id the inbox already
//! recorded for this context is skipped (or fails); a handled one is recorded.

use std::any::type_name;
use std::sync::Arc;

use super::{Resources, Step};
use crate::command::handler::Handler;
use crate::error::Error;
use crate::store::inbox::{Inbox, InboxEntry};
use crate::{Request, RequestContext};

/// What the inbox step does with a request it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDuplicate {
    /// Skip the handler and succeed (the message is acked), logging a warning.
    #[default]
    Skip,
    /// Fail with [`Error::Duplicate`] (the message is dead-lettered with that reason).
    Error,
}

/// Step: once-only handling by (request id, context key). Building the processor
/// fails when no inbox is configured.
///
/// - With a transaction in the context (put there by a unit-of-work step declared
///   before this one), the inbox record is added in that transaction *before* the
///   handler runs; a duplicate is found by the insert itself. The record and the
///   handler's effects then commit together or not at all, whatever crashes.
/// - Without one, the inbox is checked before the handler and written after it
///   succeeded (a crash in between can run the handler again).
#[derive(Debug, Clone)]
#[must_use]
pub struct UseInbox {
    context_key: String,
    on_duplicate: OnDuplicate,
}

impl UseInbox {
    /// Once-only handling within `context_key` (usually the handler's name, so
    /// two handlers of one event each handle it once).
    pub fn new(context_key: impl Into<String>) -> Self {
        UseInbox {
            context_key: context_key.into(),
            on_duplicate: OnDuplicate::Skip,
        }
    }

    /// What to do with a duplicate.
    pub fn on_duplicate(mut self, action: OnDuplicate) -> Self {
        self.on_duplicate = action;
        self
    }
}

/// The handler made by [`UseInbox`].
pub struct InboxHandler<H> {
    inner: H,
    inbox: Arc<dyn Inbox>,
    context_key: String,
    on_duplicate: OnDuplicate,
    telemetry: crate::Telemetry,
}

impl<H: Send + 'static> Step<H> for UseInbox {
    type Handler = InboxHandler<H>;

    fn wrap(self, inner: H, resources: &Resources) -> Result<Self::Handler, Error> {
        if self.context_key.trim().is_empty() {
            return Err(Error::configuration("inbox step: context key is empty"));
        }
        let inbox = resources.inbox().cloned().ok_or_else(|| {
            Error::configuration(format!(
                "pipeline uses the inbox (context '{}') but no inbox is configured",
                self.context_key
            ))
        })?;
        Ok(InboxHandler {
            inner,
            inbox,
            context_key: self.context_key,
            on_duplicate: self.on_duplicate,
            telemetry: resources.telemetry(),
        })
    }
}

impl<H> InboxHandler<H> {
    fn duplicate<R>(&self, id: uuid::Uuid) -> Result<(), Error> {
        self.telemetry.record_duplicate(&self.context_key);
        match self.on_duplicate {
            OnDuplicate::Skip => {
                tracing::warn!(
                    request.r#type = type_name::<R>(),
                    request.id = %id,
                    context = %self.context_key,
                    "duplicate request skipped: already handled"
                );
                Ok(())
            }
            OnDuplicate::Error => Err(Error::Duplicate {
                id,
                context_key: self.context_key.clone(),
            }),
        }
    }
}

impl<R: Request, H: Handler<R>> Handler<R> for InboxHandler<H> {
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        let id = request.id();
        let entry = InboxEntry::of(request, ctx, &self.context_key);
        if let Some(tx) = ctx.transaction_mut() {
            return match self.inbox.record(&entry, Some(tx)).await {
                Ok(()) => self.inner.handle(request, ctx).await,
                Err(e) if e.is_duplicate() => self.duplicate::<R>(id),
                Err(e) => Err(e),
            };
        }
        if self.inbox.exists(id, &self.context_key).await? {
            return self.duplicate::<R>(id);
        }
        self.inner.handle(request, ctx).await?;
        match self.inbox.record(&entry, None).await {
            // Handled concurrently by another consumer between our check and now.
            Err(e) if e.is_duplicate() => self.duplicate::<R>(id),
            other => other,
        }
    }
}
