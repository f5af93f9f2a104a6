-- Saga store schema. {schema}, {table}, {ended_index} are validated SQL
-- identifiers, substituted quoted. Idempotent: runs on every start.
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {schema}.{table} (
    saga       text        NOT NULL,
    key        text        NOT NULL,
    state      jsonb       NOT NULL,
    version    bigint      NOT NULL,
    status     text        NOT NULL DEFAULT 'running',
    reason     text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga, key)
);

-- The retention sweep reads ended instances by age.
CREATE INDEX IF NOT EXISTS {ended_index} ON {schema}.{table} (updated_at) WHERE status <> 'running';
