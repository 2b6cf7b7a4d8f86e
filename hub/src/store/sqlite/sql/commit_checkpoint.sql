-- Moves a subscriber's checkpoint forward (never back), with its hash.
--
-- Concurrency contract: one statement on the store's one connection, which
-- runs operations one at a time in the order they were called and holds the
-- file in exclusive locking mode, so no other writer exists; the WHERE clause
-- is the whole check, judged atomically by the statement.
INSERT INTO checkpoints (subscriber_id, shard_no, sequence, updated_at, hash)
VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (subscriber_id, shard_no) DO UPDATE
SET sequence = excluded.sequence, updated_at = excluded.updated_at, hash = excluded.hash
WHERE checkpoints.sequence < excluded.sequence
