//! Transactional Postgres outbox and sweeper (sqlx). Not built yet: see the Postgres outbox/inbox issue.
