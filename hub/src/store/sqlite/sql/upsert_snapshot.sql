-- Stores a shard's snapshot at a sequence, replacing one there.
--
-- Concurrency contract: runs in the snapshot's IMMEDIATE transaction on the
-- store's one connection, which runs operations one at a time in the order
-- they were called and holds the file in exclusive locking mode, so no other
-- writer exists, after the shard row was read in the same transaction.
INSERT INTO snapshots (shard_no, sequence, epoch, data, hash, created_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT (shard_no, sequence) DO UPDATE
SET epoch = excluded.epoch, data = excluded.data, hash = excluded.hash, created_at = excluded.created_at
