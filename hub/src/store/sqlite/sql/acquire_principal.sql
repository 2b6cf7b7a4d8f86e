-- The principal that took the shard's current lease.
--
-- Concurrency contract: runs in acquire's IMMEDIATE transaction on the store's
-- one connection, which runs operations one at a time in the order they were
-- called and holds the file in exclusive locking mode, so no other writer
-- exists, so the read of the row and this write cannot race.
SELECT owner_principal
FROM shards
WHERE shard_id = ?1
