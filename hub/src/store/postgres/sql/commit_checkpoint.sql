-- Moves subscriber $1's checkpoint on shard number $2 to $3, recording the
-- chain hash $4 of that event, unless it is already there or beyond.
-- Returns no row when it did not move.
--
-- Concurrency contract: the upsert locks the checkpoint row; the guard in
-- the DO UPDATE clause is evaluated on the locked, latest version, so two
-- racing commits can only move the checkpoint forward.
INSERT INTO checkpoints (subscriber_id, shard_no, sequence, updated_at, hash)
VALUES ($1, $2, $3, now(), $4)
ON CONFLICT (subscriber_id, shard_no) DO UPDATE
SET sequence = excluded.sequence, updated_at = excluded.updated_at, hash = excluded.hash
WHERE checkpoints.sequence < excluded.sequence
RETURNING sequence, updated_at, hash
