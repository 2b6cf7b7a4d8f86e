-- Stores (or replaces) the snapshot of shard number $1 at sequence $2.
--
-- Concurrency contract: runs in the snapshot transaction after
-- lock_shard_for_snapshot.sql; the primary key makes a concurrent store of
-- the same sequence a replace, last writer wins.
INSERT INTO snapshots (shard_no, sequence, epoch, data, hash, created_at)
VALUES ($1, $2, $3, $4, $5, now())
ON CONFLICT (shard_no, sequence) DO UPDATE
SET epoch = excluded.epoch, data = excluded.data, hash = excluded.hash, created_at = excluded.created_at
RETURNING created_at
