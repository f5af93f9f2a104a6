//! The inbox as a typed unit of work writes it: a record inserted on the
//! unit's own connection, so it commits with the handler's effects.

use async_trait::async_trait;
use brighter_core::{Error, InboxEntry};
use sqlx::PgConnection;

/// An inbox that records on a caller's Postgres connection (the Postgres
/// inbox implements it); a typed unit of work writes its record with it.
#[async_trait]
pub trait PgInboxWriter: Send + Sync + 'static {
    /// Records `entry` as handled on `conn`; fails with
    /// [`Error::Duplicate`] when its id and context key already were.
    async fn record(&self, conn: &mut PgConnection, entry: &InboxEntry) -> Result<(), Error>;
}
