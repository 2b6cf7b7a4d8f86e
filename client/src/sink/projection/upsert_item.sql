-- Writes items as enqueued, restored or found in a snapshot: one row per
-- element of the arrays $3.. (one statement for a run of a frame's item
-- writes). Runs inside a batch's transaction, which holds the shard's
-- checkpoint row lock. An item appears at most once per statement (ON
-- CONFLICT cannot change a row twice); the sink splits runs to keep that.
INSERT INTO omnirelay_projection_items (
    projection, shard, item_id, state, resource_type, resource_id, partition_key, request_id,
    attributes, body, priority, attempt, enqueued_at, not_before, owner, lease_id, fencing_token,
    lease_expires_at, last_error, updated_sequence)
SELECT $1, $2, r.item_id, r.state, r.resource_type, r.resource_id, r.partition_key, r.request_id,
    r.attributes::jsonb, r.body, r.priority, r.attempt, r.enqueued_at, r.not_before, r.owner, r.lease_id,
    r.fencing_token, r.lease_expires_at, r.last_error, r.updated_sequence
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::bytea[],
    $11::int4[], $12::int4[], $13::timestamptz[], $14::timestamptz[], $15::text[], $16::text[], $17::int8[],
    $18::timestamptz[], $19::text[], $20::int8[])
    AS r(item_id, state, resource_type, resource_id, partition_key, request_id, attributes, body, priority,
    attempt, enqueued_at, not_before, owner, lease_id, fencing_token, lease_expires_at, last_error,
    updated_sequence)
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
