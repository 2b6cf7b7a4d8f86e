-- Writes a run of whole items, each new to the table, with binary COPY
-- (columns in this order). Runs inside a batch's transaction, which holds
-- the shard's checkpoint row lock, under a savepoint: an item already in
-- the table fails the copy on the primary key, and the sink rolls back to
-- the savepoint and writes the run with upsert_item.sql instead.
COPY omnirelay_projection_items (
    projection, shard, item_id, state, resource_type, resource_id, partition_key, request_id,
    attributes, body, priority, attempt, enqueued_at, not_before, owner, lease_id, fencing_token,
    lease_expires_at, last_error, updated_sequence)
FROM STDIN (FORMAT binary)
