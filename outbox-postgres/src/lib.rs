//! # brighter-outbox-postgres
//!
//! The transactional outbox in Postgres (sqlx): messages are inserted in the
//! caller's transaction, so they commit with the business data or not at all, and
//! [`PgSweeper`] sends whatever was not sent at once, even after a crash.
//! [`PgUnitOfWork`] runs a handler in one transaction shared by its own writes,
//! its inbox record and its outgoing messages.
//!
//! Schema and table names are configurable and validated ([`Identifier`]); the
//! schema is created by idempotent migrations run under an advisory lock.

#![forbid(unsafe_code)]

mod claim;
mod inspect;
mod outbox;
mod row;
mod sweeper;
mod unit;
mod unit_of_work;

pub use brighter_core::{Retention, RunningSweeper, SweepReport, SweeperStats};
pub use brighter_postgres::{
    Identifier, is_unavailable, pg_connection, pg_error, render, run_migration,
};
pub use inspect::{EntryState, OutboxStats, TopicCounts};
pub use outbox::{PgOutbox, PgOutboxBuilder};
pub use sweeper::PgSweeper;
pub use unit::{PgHandler, PgHandlerFn, PgTx, PgUnit, PgUnitHandler, pg_handler_fn};
pub use unit_of_work::{PgUnitOfWork, UnitOfWorkHandler, pg_transaction};
