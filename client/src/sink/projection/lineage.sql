-- The lineage sink's table, created when it opens (idempotent). Rows are
-- only inserted, by a batch's transaction that holds the shard's row of
-- omnirelay_projection_checkpoints (name 'lineage/{lineage}') locked.
CREATE TABLE IF NOT EXISTS omnirelay_lineage (
    lineage text NOT NULL,
    shard text NOT NULL,
    sequence bigint NOT NULL,
    -- One row per item the event concerns (0, 1, ...).
    ordinal integer NOT NULL,
    recorded_at timestamptz,
    principal text NOT NULL,
    peer_id text NOT NULL,
    kind text NOT NULL,
    item_id text,
    resource_type text,
    resource_id text,
    owner text,
    fencing_token bigint,
    detail jsonb NOT NULL,
    PRIMARY KEY (lineage, shard, sequence, ordinal)
);

CREATE INDEX IF NOT EXISTS omnirelay_lineage_resource
    ON omnirelay_lineage (lineage, resource_type, resource_id);
CREATE INDEX IF NOT EXISTS omnirelay_lineage_item
    ON omnirelay_lineage (lineage, shard, item_id);
CREATE INDEX IF NOT EXISTS omnirelay_lineage_principal
    ON omnirelay_lineage (lineage, principal, recorded_at);
