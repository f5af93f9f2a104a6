//! # e2e
//!
//! brighter end to end, across crates: `tests/postgres.rs` (the Postgres outbox
//! and sweeper with the inbox and a unit of work, against real brokers),
//! `tests/telemetry.rs` (one trace from `deposit_post` through the sweeper to
//! the consumer, over each transport) and `benches/e2e.rs` (sweeper drain,
//! inbox consume and `post` → handled latency against the raw clients). It
//! exists so that the store and transport crates depend on core alone.
