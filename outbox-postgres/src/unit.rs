//! The typed unit of work: a handler gets the Postgres transaction as a
//! typed value ([`PgTx`]), its inbox record and its messages are inserted on
//! that transaction through the stores' own executor-generic inserts, and
//! nothing on the way is downcast. A transaction of another type cannot be
//! handed to it: that is a compile error, not a run-time one.
//!
//! ```compile_fail
//! # async fn example(outbox: brighter_outbox_postgres::PgOutbox, message: brighter_core::Message) {
//! // The Postgres outbox inserts on a Postgres executor only: an in-memory
//! // transaction (or any other type) does not compile.
//! let mut tx = brighter_core::InMemoryTransaction::new();
//! outbox.insert(&mut tx, &[message]).await.unwrap();
//! # }
//! ```
//!
//! ```compile_fail
//! # use brighter_core::{CommandProcessor, Error, RequestContext};
//! # use brighter_outbox_postgres::{PgHandler, PgTx};
//! # #[derive(brighter_core::Command, serde::Serialize, serde::Deserialize)]
//! # struct Reserve { id: uuid::Uuid }
//! struct ReserveHandler;
//! impl PgHandler<Reserve> for ReserveHandler {
//!     async fn handle(&self, _: &Reserve, _: &mut RequestContext, _: &mut PgTx<'_>) -> Result<(), Error> {
//!         Ok(())
//!     }
//! }
//! // A handler written for a Postgres unit of work needs one: without a
//! // PgUnit step it does not compile.
//! let _ = CommandProcessor::builder().command(ReserveHandler);
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use brighter_core::pipeline::{OnDuplicate, Resources, Step};
use brighter_core::{Error, Handler, InboxEntry, Request, RequestContext};
use brighter_postgres::{PgInboxWriter, pg_error};
use futures::future::BoxFuture;
use sqlx::{PgConnection, Postgres};
use uuid::Uuid;

use crate::outbox::PgOutbox;
use crate::unit_of_work::finish;

/// A handler that runs in a Postgres unit of work ([`PgUnit`]) and is given
/// its transaction.
pub trait PgHandler<R: Request>: Send + Sync + 'static {
    /// Handles `request`; its own statements run on [`PgTx::conn`], its
    /// messages go in with [`PgTx::deposit_post`]; all of it commits together,
    /// with the inbox record, or none of it does.
    fn handle(
        &self,
        request: &R,
        ctx: &mut RequestContext,
        tx: &mut PgTx<'_>,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The transaction of a unit of work, as a handler sees it.
pub struct PgTx<'u> {
    tx: sqlx::Transaction<'static, Postgres>,
    outbox: &'u PgOutbox,
    deposited: Vec<Uuid>,
}

impl std::fmt::Debug for PgTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTx")
            .field("deposited", &self.deposited)
            .finish_non_exhaustive()
    }
}

impl PgTx<'_> {
    /// The transaction's connection, for the handler's own statements:
    /// `sqlx::query(..).execute(tx.conn())`.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Deposits `request` in this transaction, continuing the conversation of
    /// `ctx`; it is sent once the unit of work commits (or by the sweeper).
    pub async fn deposit_post<R: Request>(
        &mut self,
        ctx: &RequestContext,
        request: &R,
    ) -> Result<Uuid, Error> {
        let message = ctx.message_for(request).await?;
        self.outbox
            .insert(&mut *self.tx, std::slice::from_ref(&message))
            .await?;
        self.deposited.push(message.id());
        Ok(message.id())
    }
}

/// Step: a typed unit of work around a [`PgHandler`]. Begins a transaction on
/// the outbox's pool, inserts the inbox record first (when an inbox is given:
/// a duplicate is skipped or fails, as [`OnDuplicate`] says), runs the
/// handler with the transaction, commits, then sends the messages deposited
/// in it. A failure rolls everything back. Dropped mid-way (a timeout
/// outside it), the transaction rolls back and nothing is left behind.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), brighter_core::Error> {
/// use brighter_core::pipeline::{Pipeline, Retry};
/// use brighter_outbox_postgres::{PgOutbox, PgUnit};
/// let outbox = PgOutbox::builder(pool).build().await?;
/// let pipeline = Pipeline::new()
///     .step(Retry::new(3)) // each attempt is a unit of work of its own
///     .step(PgUnit::new(outbox));
/// // .inbox(PgInbox, "reserve-stock") to record the message once, in the same transaction
/// # let _ = pipeline; Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct PgUnit {
    outbox: PgOutbox,
    inbox: Option<(Arc<dyn PgInboxWriter>, String)>,
    on_duplicate: OnDuplicate,
}

impl std::fmt::Debug for PgUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgUnit")
            .field("outbox", &self.outbox)
            .field("inbox", &self.inbox.as_ref().map(|(_, key)| key))
            .finish_non_exhaustive()
    }
}

impl PgUnit {
    /// Units of work on `outbox`'s pool, depositing into it.
    pub fn new(outbox: PgOutbox) -> Self {
        PgUnit {
            outbox,
            inbox: None,
            on_duplicate: OnDuplicate::Skip,
        }
    }

    /// Records each request in `inbox` under `context_key`, in the unit's
    /// transaction, before the handler runs.
    pub fn inbox(mut self, inbox: impl PgInboxWriter, context_key: impl Into<String>) -> Self {
        self.inbox = Some((Arc::new(inbox), context_key.into()));
        self
    }

    /// What a duplicate does (default: skipped with a warning).
    pub fn on_duplicate(mut self, action: OnDuplicate) -> Self {
        self.on_duplicate = action;
        self
    }
}

/// The handler made by [`PgUnit`].
pub struct PgUnitHandler<H> {
    inner: H,
    unit: PgUnit,
    telemetry: brighter_core::Telemetry,
}

impl<H: Send + 'static> Step<H> for PgUnit {
    type Handler = PgUnitHandler<H>;

    fn wrap(self, inner: H, resources: &Resources) -> Result<Self::Handler, Error> {
        if let Some((_, key)) = &self.inbox
            && key.trim().is_empty()
        {
            return Err(Error::configuration(
                "unit of work: inbox context key is empty",
            ));
        }
        Ok(PgUnitHandler {
            inner,
            unit: self,
            telemetry: resources.telemetry(),
        })
    }
}

impl<R: Request, H: PgHandler<R>> Handler<R> for PgUnitHandler<H> {
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        let unit = &self.unit;
        let tx = unit
            .outbox
            .pool()
            .begin()
            .await
            .map_err(|e| pg_error("begin the unit of work", e))?;
        let mut tx = PgTx {
            tx,
            outbox: &unit.outbox,
            deposited: Vec::new(),
        };
        if let Some((inbox, key)) = &unit.inbox {
            let entry = InboxEntry::of(request, ctx, key);
            match inbox.record(tx.conn(), &entry).await {
                Ok(()) => {}
                Err(e) if e.is_duplicate() => {
                    self.telemetry.record_duplicate(key);
                    let _ = tx.tx.rollback().await;
                    return match unit.on_duplicate {
                        OnDuplicate::Skip => {
                            tracing::warn!(id = %request.id(), context = %key, "duplicate request skipped: already handled");
                            Ok(())
                        }
                        _ => Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
        }
        let result = self.inner.handle(request, ctx, &mut tx).await;
        let PgTx { tx, deposited, .. } = tx;
        finish(tx, deposited, result, ctx).await
    }
}

/// A [`PgHandler`] made from a closure that returns a boxed future:
/// `pg_handler_fn(|request, ctx, tx| Box::pin(async move { .. }))`.
pub fn pg_handler_fn<R, F>(f: F) -> PgHandlerFn<R, F>
where
    R: Request,
    F: for<'a, 'u> Fn(
            &'a R,
            &'a mut RequestContext,
            &'a mut PgTx<'u>,
        ) -> BoxFuture<'a, Result<(), Error>>
        + Send
        + Sync
        + 'static,
{
    PgHandlerFn {
        f,
        _request: PhantomData,
    }
}

/// The handler returned by [`pg_handler_fn`].
pub struct PgHandlerFn<R, F> {
    f: F,
    _request: PhantomData<fn(R)>,
}

impl<R, F> PgHandler<R> for PgHandlerFn<R, F>
where
    R: Request,
    F: for<'a, 'u> Fn(
            &'a R,
            &'a mut RequestContext,
            &'a mut PgTx<'u>,
        ) -> BoxFuture<'a, Result<(), Error>>
        + Send
        + Sync
        + 'static,
{
    async fn handle(
        &self,
        request: &R,
        ctx: &mut RequestContext,
        tx: &mut PgTx<'_>,
    ) -> Result<(), Error> {
        (self.f)(request, ctx, tx).await
    }
}
