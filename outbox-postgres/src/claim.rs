//! What the core sweeper needs from the Postgres outbox: a claim is one
//! transaction holding the claimed rows (`FOR UPDATE SKIP LOCKED`) until they
//! are marked; the watch is a `LISTEN` on the outbox's channel.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use brighter_core::{ClaimRequest, Claimed, Error, OutboxClaim, SendFailure, Wake};
use sqlx::Postgres;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::outbox::{PgOutbox, Tables, millis, store};
use crate::row::from_row;
use crate::sweeper::split_by_key_order;

/// Rows claimed by one sweep: the transaction that locks them.
pub(crate) struct PgClaim {
    tables: Arc<Tables>,
    tx: sqlx::Transaction<'static, Postgres>,
    messages: Vec<Claimed>,
}

#[async_trait]
impl OutboxClaim for PgClaim {
    fn take(&mut self) -> Vec<Claimed> {
        std::mem::take(&mut self.messages)
    }

    async fn finish(
        mut self: Box<Self>,
        sent: &[Uuid],
        failed: &[SendFailure],
    ) -> Result<(), Error> {
        let sql = &self.tables.sql;
        if !sent.is_empty() {
            sqlx::query(&sql.mark_dispatched)
                .bind(sent)
                .bind(chrono::Utc::now())
                .execute(&mut *self.tx)
                .await
                .map_err(store("mark outbox rows dispatched"))?;
        }
        if !failed.is_empty() {
            let ids: Vec<Uuid> = failed.iter().map(|f| f.id).collect();
            let errors: Vec<&str> = failed.iter().map(|f| f.error.as_str()).collect();
            let park: Vec<bool> = failed.iter().map(|f| f.park).collect();
            sqlx::query(&sql.mark_failed_many)
                .bind(ids)
                .bind(errors)
                .bind(park)
                .execute(&mut *self.tx)
                .await
                .map_err(store("record outbox send failures"))?;
        }
        self.tx.commit().await.map_err(store("commit a sweep"))
    }
}

impl PgOutbox {
    /// Claims rows as [`brighter_core::Outbox::claim`] says.
    pub(crate) async fn claim_rows(
        &self,
        request: &ClaimRequest,
    ) -> Result<Box<dyn OutboxClaim>, Error> {
        let tables = Arc::clone(&self.tables);
        let mut tx = tables.pool.begin().await.map_err(store("begin a sweep"))?;
        let rows = sqlx::query(&tables.sql.claim)
            .bind(millis(request.min_age))
            .bind(i64::try_from(request.limit).unwrap_or(i64::MAX))
            .bind(&request.skip_topics)
            .fetch_all(&mut *tx)
            .await
            .map_err(store("claim outbox rows"))?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            match from_row(row) {
                Ok(row) => claimed.push(row),
                // Left outstanding and visible in the table; it holds back its key.
                Err(e) => {
                    tracing::error!(error = %e, "outbox sweeper: cannot decode a row; skipped")
                }
            }
        }
        let (ready, held) = split_by_key_order(&tables.sql.key_positions, &mut tx, claimed).await?;
        let messages = ready
            .into_iter()
            .map(|row| Claimed {
                message: row.message,
                held: false,
                attempts: row.attempts,
            })
            .chain(held.into_iter().map(|row| Claimed {
                message: row.message,
                held: true,
                attempts: row.attempts,
            }))
            .collect();
        Ok(Box::new(PgClaim {
            tables,
            tx,
            messages,
        }))
    }

    /// Listens on the outbox's channel and wakes sweepers on each
    /// notification, until `shutdown`; returns once it listens.
    ///
    /// Writers announce a commit only while a sweeper waits for it (see the
    /// outbox's trigger): when every worker of this sweeper waits, the watch
    /// takes the sweepers' advisory lock on its connection, which waits for
    /// the commits of writers that saw no sweeper waiting, then wakes the
    /// workers once more for what those committed. From then on each commit
    /// is announced; the first announcement releases the lock (the workers
    /// sweep, writers stop announcing) and wakes the workers. So a busy
    /// outbox costs its writers no announcements, and a quiet one is swept
    /// within a notification's time of a commit.
    pub(crate) async fn watch_notifications(
        &self,
        wake: Wake,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        // A connection of its own, not the pool's: the sweepers' lock is
        // held by its session, and a pooled connection would go back to the
        // pool still holding it when the watch ends.
        let own = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with((*self.pool().connect_options()).clone())
            .await
            .map_err(store("connect the outbox listener"))?;
        let mut listener = PgListener::connect_with(&own)
            .await
            .map_err(store("connect the outbox listener"))?;
        listener
            .listen(self.channel())
            .await
            .map_err(store("LISTEN on the outbox channel"))?;
        let lock = self.tables.sweeper_lock.clone();
        tokio::spawn(async move {
            watch_loop(&mut listener, &wake, &lock, &shutdown).await;
            // Closing the connection releases the lock whatever happened.
            drop(listener);
            own.close().await;
        });
        Ok(())
    }
}

/// Wakes the workers on notifications and takes and releases the sweepers'
/// lock, until `shutdown` (see [`PgOutbox::watch_notifications`]).
async fn watch_loop(
    listener: &mut PgListener,
    wake: &Wake,
    lock: &str,
    shutdown: &CancellationToken,
) {
    // Whether this watch holds the sweepers' lock (its workers wait).
    let mut holding = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            notification = listener.recv() => match notification {
                Ok(_) => {
                    if holding {
                        holding = false;
                        if let Err(error) = advisory(listener, "pg_advisory_unlock", lock).await {
                            tracing::warn!(%error, "outbox listener: cannot release the sweepers' lock");
                        }
                    }
                    wake.wake();
                }
                Err(error) => {
                    // PgListener reconnects on the next recv; the lock went
                    // with the connection, and notifications sent meanwhile
                    // are lost, which the workers' polling covers.
                    holding = false;
                    tracing::warn!(%error, "outbox listener lost its connection; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    wake.wake();
                }
            },
            () = wake.all_waiting(), if !holding => {
                // Waits for the commits of writers that saw no sweeper
                // waiting (and, with several sweepers, for the one
                // that holds the lock to get busy).
                let taken = tokio::select! {
                    () = shutdown.cancelled() => return,
                    taken = advisory(listener, "pg_advisory_lock", lock) => taken,
                };
                match taken {
                    Ok(()) => {
                        holding = true;
                        // What writers that saw no sweeper waiting committed.
                        wake.wake();
                    }
                    Err(error) => {
                        tracing::warn!(%error, "outbox listener: cannot take the sweepers' lock; polling");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        }
    }
}

/// Runs advisory lock function `function` on the sweepers' lock `lock`.
async fn advisory(listener: &mut PgListener, function: &str, lock: &str) -> Result<(), Error> {
    sqlx::query(&format!("SELECT {function}(hashtextextended($1, 0))"))
        .bind(lock)
        .execute(listener)
        .await
        .map(|_| ())
        .map_err(store("use the sweepers' lock"))
}
