//! # brighter-postgres
//!
//! What the Postgres stores of brighter share, so that neither depends on the
//! other: validated SQL identifiers, migrations under one advisory lock, and
//! the classification of sqlx errors (the database away, or a statement that
//! failed), and the inbox contract a typed unit of work writes through.

#![forbid(unsafe_code)]

mod error;
mod identifier;
mod inbox_writer;
mod migrate;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{is_unavailable, pg_connection, pg_error};
pub use identifier::{Identifier, render};
pub use inbox_writer::PgInboxWriter;
pub use migrate::run_migration;
