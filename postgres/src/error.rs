//! sqlx errors as the framework's errors: the database being away is
//! [`Error::Unavailable`](brighter_core::Error::Unavailable) (the pump waits for
//! it), anything else a store error; and the caller's transaction as a
//! Postgres connection.

use brighter_core::{Error, Transaction};
use sqlx::{PgConnection, Postgres};

/// Whether `error` says the database cannot be reached right now (rather than
/// that the statement is wrong): I/O and TLS failures, pool time-outs, a closed
/// pool, and the SQLSTATEs of connection exceptions (class 08), shutdowns
/// (57P01-57P03) and too many connections (53300).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// An sqlx error while doing `context`, as the framework's error:
/// [`Error::Unavailable`] when the database cannot be reached (see
/// [`is_unavailable`]), so a message pump waits for it instead of
/// dead-lettering the message; [`Error::Store`] otherwise. Handlers can use it
/// for their own statements.
pub fn pg_error(context: &str, error: sqlx::Error) -> Error {
    if is_unavailable(&error) {
        Error::unavailable(context, error)
    } else {
        Error::store(context, error)
    }
}

/// Downcasts a caller's transaction to what the Postgres stores work with: a
/// `sqlx::Transaction<'static, Postgres>` or a `PgConnection`.
pub fn pg_connection<'a>(
    tx: &'a mut dyn Transaction,
    store: &str,
) -> Result<&'a mut PgConnection, Error> {
    let any = tx.as_any_mut();
    if any.is::<sqlx::Transaction<'static, Postgres>>() {
        return any
            .downcast_mut::<sqlx::Transaction<'static, Postgres>>()
            .map(|tx| &mut **tx)
            .ok_or_else(|| Error::configuration("transaction changed type while borrowed"));
    }
    any.downcast_mut::<PgConnection>().ok_or_else(|| {
        Error::configuration(format!(
            "{store} needs a sqlx::Transaction<'static, Postgres> or a PgConnection, and was given another type"
        ))
    })
}
