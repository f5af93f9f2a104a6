-- Inbox schema. {schema}, {table}, {handled_index} are validated SQL identifiers,
-- substituted quoted. Idempotent: runs on every start, and upgrades a table of
-- an earlier version in place (its rows keep their key and time; the columns
-- they did not have stay NULL).
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {schema}.{table} (
    message_id  uuid        NOT NULL,
    context_key text        NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, context_key)
);

CREATE INDEX IF NOT EXISTS {handled_index} ON {schema}.{table} (handled_at);

-- What rebuilding a conversation needs (added in 0.2).
ALTER TABLE {schema}.{table}
    ADD COLUMN IF NOT EXISTS correlation_id uuid,
    ADD COLUMN IF NOT EXISTS request_type   text,
    ADD COLUMN IF NOT EXISTS message_type   text,
    ADD COLUMN IF NOT EXISTS topic          text;
