//! The unit-of-work step: runs the rest of the pipeline in one Postgres
//! transaction that handlers, the inbox and the outbox share; commits on success
//! and then sends the messages deposited in it, rolls back on failure.

use std::sync::{Arc, Weak};

use brighter_core::pipeline::{Resources, Step};
use brighter_core::{Error, Handler, Request, RequestContext};
use sqlx::{PgConnection, PgPool, Postgres};

use brighter_postgres::{is_unavailable, pg_connection};

use crate::outbox::store;

/// Step: begins a transaction, puts it in the request context, runs the rest of
/// the pipeline, and commits it on success (rolls back on error). After commit,
/// the messages deposited in it with `ctx.deposit_post` are sent at once (what
/// fails to send stays for the sweeper).
///
/// Declare it before [`UseInbox`](brighter_core::pipeline::UseInbox) so the inbox
/// row commits with the handler's effects, and after `Retry` so each attempt gets
/// a fresh transaction. A step outside it that cancels it (a `Timeout`) leaves
/// nothing behind: the cancelled attempt's transaction is rolled back, its
/// connection freed, and the next attempt starts afresh. Units of work are not meant to nest: an inner one takes
/// the outer one's list of deposited messages, which the sweeper then sends.
#[derive(Debug, Clone)]
#[must_use]
pub struct PgUnitOfWork {
    pool: PgPool,
}

impl PgUnitOfWork {
    /// Transactions from `pool`.
    pub fn new(pool: PgPool) -> Self {
        PgUnitOfWork { pool }
    }
}

/// The handler made by [`PgUnitOfWork`].
#[derive(Debug)]
pub struct UnitOfWorkHandler<H> {
    inner: H,
    pool: PgPool,
}

impl<H: Send + 'static> Step<H> for PgUnitOfWork {
    type Handler = UnitOfWorkHandler<H>;

    fn wrap(self, inner: H, _resources: &Resources) -> Result<Self::Handler, Error> {
        Ok(UnitOfWorkHandler {
            inner,
            pool: self.pool,
        })
    }
}

/// Marks the context's transaction as a unit of work's, alive while that unit
/// of work's future is: a step outside it that cancels it (a `Timeout`)
/// drops the future, and with it the only strong reference.
#[derive(Clone)]
struct Owner(Weak<()>);

/// Rolls back what a cancelled unit of work left in `ctx`: its transaction
/// (dropping an sqlx transaction rolls it back and frees the connection) and
/// the ids deposited in it, which were rolled back with it.
fn discard_abandoned(ctx: &mut RequestContext) {
    let abandoned = ctx
        .bag()
        .get::<Owner>()
        .is_some_and(|owner| owner.0.strong_count() == 0);
    if abandoned {
        ctx.bag_mut().remove::<Owner>();
        drop(ctx.take_transaction());
        let lost = ctx.take_deposited();
        tracing::debug!(
            deposited = lost.len(),
            "rolled back the transaction of a cancelled unit of work"
        );
    }
}

impl<R: Request, H: Handler<R>> Handler<R> for UnitOfWorkHandler<H> {
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        discard_abandoned(ctx);
        let alive = Arc::new(());
        let outer_owner = ctx.bag_mut().insert(Owner(Arc::downgrade(&alive)));
        let tx = self
            .pool
            .begin()
            .await
            .map_err(store("begin the unit of work"))?;
        let outer = ctx.set_transaction(Box::new(tx));
        let result = self.inner.handle(request, ctx).await;
        let tx = ctx.take_transaction();
        let deposited = ctx.take_deposited();
        if let Some(outer) = outer {
            ctx.set_transaction(outer);
        }
        match outer_owner {
            Some(owner) => ctx.bag_mut().insert(owner),
            None => ctx.bag_mut().remove::<Owner>(),
        };
        drop(alive);
        let tx = tx
            .and_then(|tx| {
                tx.into_any()
                    .downcast::<sqlx::Transaction<'static, Postgres>>()
                    .ok()
            })
            .ok_or_else(|| {
                Error::configuration(
                    "the unit of work's transaction was taken or replaced by a handler",
                )
            })?;
        finish(*tx, deposited, result, ctx).await
    }
}

/// The Postgres transaction of the current unit of work, for a handler's own
/// writes: `sqlx::query(..).execute(pg_transaction(ctx)?)`.
pub fn pg_transaction(ctx: &mut RequestContext) -> Result<&mut PgConnection, Error> {
    let tx = ctx.transaction_mut().ok_or_else(|| {
        Error::configuration(
            "no transaction in the request context: add a PgUnitOfWork step before the handler",
        )
    })?;
    pg_connection(tx, "pg_transaction")
}

/// How every Postgres unit of work ends: on success it commits, then sends
/// what was deposited in it (what fails stays for the sweeper); on failure it
/// rolls back, and when the rollback shows the database went away, the
/// handler's error becomes [`Error::Unavailable`]: whatever the handler made of
/// its failing statement, the cause is the outage, so the message waits for
/// the database rather than the dead-letter queue.
pub(crate) async fn finish(
    tx: sqlx::Transaction<'static, Postgres>,
    deposited: Vec<uuid::Uuid>,
    result: Result<(), Error>,
    ctx: &RequestContext,
) -> Result<(), Error> {
    match result {
        Ok(()) => {
            tx.commit()
                .await
                .map_err(store("commit the unit of work"))?;
            if !deposited.is_empty() {
                let mut sender = ctx.child();
                sender.record_deposited(&deposited);
                if let Err(error) = sender.clear_deposited().await {
                    tracing::warn!(%error, "messages of the unit of work stay in the outbox for the sweeper");
                }
            }
            Ok(())
        }
        Err(error) => match tx.rollback().await {
            Ok(()) => Err(error),
            Err(rollback) if is_unavailable(&rollback) && !error.is_outcome() => {
                tracing::warn!(%error, %rollback, "the database went away during the unit of work");
                Err(Error::unavailable(
                    format!("the unit of work failed ({error}) and could not be rolled back"),
                    rollback,
                ))
            }
            Err(rollback) => {
                tracing::warn!(error = %rollback, "rolling back the unit of work failed");
                Err(error)
            }
        },
    }
}
