-- Inbox schema. {schema}, {table}, {handled_index} are validated SQL identifiers,
-- substituted quoted. Idempotent: runs on every start.
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {schema}.{table} (
    message_id  uuid        NOT NULL,
    context_key text        NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, context_key)
);

CREATE INDEX IF NOT EXISTS {handled_index} ON {schema}.{table} (handled_at);
