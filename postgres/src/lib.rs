//! # brighter-postgres
//!
//! What the Postgres stores of brighter share, so that neither depends on the
//! other: validated SQL identifiers, migrations under one advisory lock, and
//! the classification of sqlx errors (the database away, or a statement that
//! failed).

#![forbid(unsafe_code)]

mod error;
mod identifier;
mod migrate;

pub use error::{is_unavailable, pg_connection, pg_error};
pub use identifier::{Identifier, render};
pub use migrate::run_migration;
