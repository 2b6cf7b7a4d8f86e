-- The PostgreSQL projection's tables, created by the sink when it opens
-- (idempotent). One database may hold several projections, told apart by
-- `projection`.
--
-- Concurrency: a batch's transaction locks its (projection, shard) row of
-- omnirelay_projection_checkpoints first, so two sinks running by mistake
-- with one projection name serialize per shard, and the second skips what
-- the first applied.
CREATE TABLE IF NOT EXISTS omnirelay_projection_checkpoints (
    projection text NOT NULL,
    shard text NOT NULL,
    -- Last sequence whose effects are in omnirelay_projection_items.
    sequence bigint NOT NULL,
    -- Chain hash of the event at `sequence` (empty before the first).
    hash bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, shard)
);

CREATE TABLE IF NOT EXISTS omnirelay_projection_items (
    projection text NOT NULL,
    shard text NOT NULL,
    item_id text NOT NULL,
    -- 'pending', 'leased' or 'dead_lettered'.
    state text NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    partition_key text NOT NULL,
    request_id text NOT NULL,
    attributes jsonb NOT NULL,
    body bytea NOT NULL,
    priority integer NOT NULL,
    attempt integer NOT NULL,
    enqueued_at timestamptz,
    not_before timestamptz,
    owner text,
    lease_id text,
    fencing_token bigint,
    lease_expires_at timestamptz,
    last_error text NOT NULL DEFAULT '',
    -- Sequence of the last event that changed the row.
    updated_sequence bigint NOT NULL,
    PRIMARY KEY (projection, shard, item_id)
);

CREATE INDEX IF NOT EXISTS omnirelay_projection_items_resource
    ON omnirelay_projection_items (projection, resource_type, resource_id);
