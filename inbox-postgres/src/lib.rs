//! Postgres inbox for once-only handling (sqlx). Not built yet: see the Postgres outbox/inbox issue.
