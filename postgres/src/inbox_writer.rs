//! The inbox as a typed unit of work writes it: a record inserted on the
//! unit's own connection, so it commits with the handler's effects.

use async_trait::async_trait;
use brighter_core::Error;
use sqlx::PgConnection;
use uuid::Uuid;

/// An inbox that records on a caller's Postgres connection (the Postgres
/// inbox implements it); a typed unit of work writes its record with it.
#[async_trait]
pub trait PgInboxWriter: Send + Sync + 'static {
    /// Records `id` as handled in `context_key` on `conn`; fails with
    /// [`Error::Duplicate`] when it already was.
    async fn record(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
        context_key: &str,
    ) -> Result<(), Error>;
}
