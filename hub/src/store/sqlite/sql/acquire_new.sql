-- Creates a shard at epoch 1, leased to the caller.
--
-- Concurrency contract: runs in acquire's IMMEDIATE transaction on the store's
-- one connection, which runs operations one at a time in the order they were
-- called and holds the file in exclusive locking mode, so no other writer
-- exists, so the read of the row and this write cannot race.
INSERT INTO shards (shard_id, epoch, owner, lease_expires_at, head_hash, low_prev_hash, created_at, owner_principal)
VALUES (?1, 1, ?2, ?3, ?4, ?4, ?5, ?6)
