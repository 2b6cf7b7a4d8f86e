-- One lineage row. Events after an item's enqueue name only the item: its
-- resource is copied from the item's earlier row (the lineage's own, so it
-- is there whenever the lineage saw the enqueue). Runs in a batch's
-- transaction, which holds the shard's checkpoint row lock; the ordinal
-- numbers an event's rows in the order they are inserted.
INSERT INTO omnirelay_lineage (
    lineage, shard, sequence, ordinal, recorded_at, principal, peer_id, kind, item_id,
    resource_type, resource_id, owner, fencing_token, detail)
SELECT $1, $2, $3,
    (SELECT count(*) FROM omnirelay_lineage WHERE lineage = $1 AND shard = $2 AND sequence = $3),
    $4, $5, $6, $7, $8,
    COALESCE($9, (SELECT resource_type FROM omnirelay_lineage
                  WHERE lineage = $1 AND shard = $2 AND item_id = $8 AND resource_type IS NOT NULL
                  ORDER BY sequence DESC LIMIT 1)),
    COALESCE($10, (SELECT resource_id FROM omnirelay_lineage
                   WHERE lineage = $1 AND shard = $2 AND item_id = $8 AND resource_id IS NOT NULL
                   ORDER BY sequence DESC LIMIT 1)),
    $11, $12, ($13::text)::jsonb
