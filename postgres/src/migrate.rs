//! Runs an idempotent schema script under an advisory lock, so that several
//! processes, and the outbox and inbox crates, can migrate one database at once.

use brighter_core::Error;
use sqlx::PgPool;

/// The advisory lock key every brighter Postgres migration takes.
const MIGRATION_LOCK: i64 = 0x6272_6967_6874; // "bright"

/// Runs `sql` (several statements) in one transaction holding the migration lock.
pub async fn run_migration(pool: &PgPool, sql: &str) -> Result<(), Error> {
    let store = |what: &'static str| move |e: sqlx::Error| Error::store(what, e);
    let mut tx = pool.begin().await.map_err(store("begin migration"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(store("take the migration lock"))?;
    // A plain string runs through the simple query protocol, which takes
    // several statements (and, unlike `raw_sql`, keeps this future `Send`).
    sqlx::Executor::execute(&mut *tx, sql)
        .await
        .map_err(store("run migration"))?;
    tx.commit().await.map_err(store("commit migration"))
}
