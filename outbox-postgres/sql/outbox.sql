-- Outbox schema. {schema}, {table}, {notify_fn}, {trigger} are validated SQL
-- identifiers, substituted quoted; {channel} is substituted inside a string
-- literal and is made of validated identifiers only. Every statement is
-- idempotent: this runs on every start.
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {schema}.{table} (
    position          bigserial   PRIMARY KEY,
    message_id        uuid        NOT NULL UNIQUE,
    topic             text        NOT NULL,
    message_type      text        NOT NULL,
    message_timestamp timestamptz NOT NULL,
    correlation_id    uuid        NOT NULL,
    reply_to          text,
    content_type      text        NOT NULL,
    partition_key     text,
    handled_count     integer     NOT NULL DEFAULT 0,
    delay_ms          bigint      NOT NULL DEFAULT 0,
    header_bag        jsonb       NOT NULL DEFAULT '{}',
    cloud_events      jsonb       NOT NULL DEFAULT '{}',
    trace_context     jsonb       NOT NULL DEFAULT '{}',
    body              bytea       NOT NULL,
    created           timestamptz NOT NULL DEFAULT clock_timestamp(),
    dispatched        timestamptz,
    attempts          integer     NOT NULL DEFAULT 0,
    last_error        text
);

-- `created` is the insert time, not the transaction's start (now()): a row
-- inserted late in a long transaction must not be a sweeper's the moment it
-- commits. Tables made before this are upgraded in place.
ALTER TABLE {schema}.{table} ALTER COLUMN created SET DEFAULT clock_timestamp();

-- When a sweeper parked the row after it failed too often for a reason of
-- its own; parked rows are not claimed and hold back no key until requeued.
ALTER TABLE {schema}.{table} ADD COLUMN IF NOT EXISTS parked timestamptz;

-- When a scheduled row (one with a delay) is due; NULL: send at once. Rows
-- of tables made before this, waiting with a delay, are given theirs.
ALTER TABLE {schema}.{table} ADD COLUMN IF NOT EXISTS due_at timestamptz;
UPDATE {schema}.{table} SET due_at = created + delay_ms * interval '1 millisecond'
    WHERE dispatched IS NULL AND due_at IS NULL AND delay_ms > 0;

-- Until when the writer that sends the row itself (a post, a clear_outbox)
-- holds it: no sweep claims it before.
ALTER TABLE {schema}.{table} ADD COLUMN IF NOT EXISTS leased_until timestamptz;

CREATE INDEX IF NOT EXISTS {due_index}
    ON {schema}.{table} (due_at) WHERE dispatched IS NULL AND due_at IS NOT NULL;

CREATE INDEX IF NOT EXISTS {outstanding_index}
    ON {schema}.{table} (position) WHERE dispatched IS NULL;

CREATE INDEX IF NOT EXISTS {key_index}
    ON {schema}.{table} (partition_key, position) WHERE dispatched IS NULL AND partition_key IS NOT NULL;

CREATE INDEX IF NOT EXISTS {dispatched_index}
    ON {schema}.{table} (dispatched) WHERE dispatched IS NOT NULL;

-- Announces a committed row to the sweepers, only when one waits for
-- announcements: a sweeper whose workers all wait holds the outbox's
-- sweeper lock (an advisory lock), so taking it shared fails. Taken at
-- commit (a deferred trigger), and held until the commit ends, so a
-- sweeper that takes the lock sees every row committed without an
-- announcement. Writers never wait for it.
CREATE OR REPLACE FUNCTION {schema}.{notify_fn}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(hashtextextended('{sweeper_lock}', 0)) THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
    RETURN NULL;
END
$$;
