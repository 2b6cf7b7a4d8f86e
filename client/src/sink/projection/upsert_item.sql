-- Writes an item as enqueued, restored or found in a snapshot. Runs inside a
-- batch's transaction, which holds the shard's checkpoint row lock.
INSERT INTO omnirelay_projection_items (
    projection, shard, item_id, state, resource_type, resource_id, partition_key, request_id,
    attributes, body, priority, attempt, enqueued_at, not_before, owner, lease_id, fencing_token,
    lease_expires_at, last_error, updated_sequence)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, ($9::text)::jsonb, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
ON CONFLICT (projection, shard, item_id) DO UPDATE SET
    state = EXCLUDED.state,
    resource_type = EXCLUDED.resource_type,
    resource_id = EXCLUDED.resource_id,
    partition_key = EXCLUDED.partition_key,
    request_id = EXCLUDED.request_id,
    attributes = EXCLUDED.attributes,
    body = EXCLUDED.body,
    priority = EXCLUDED.priority,
    attempt = EXCLUDED.attempt,
    enqueued_at = EXCLUDED.enqueued_at,
    not_before = EXCLUDED.not_before,
    owner = EXCLUDED.owner,
    lease_id = EXCLUDED.lease_id,
    fencing_token = EXCLUDED.fencing_token,
    lease_expires_at = EXCLUDED.lease_expires_at,
    last_error = EXCLUDED.last_error,
    updated_sequence = EXCLUDED.updated_sequence
