-- Grants the shard to a new holder under the next epoch.
--
-- Concurrency contract: runs in acquire's IMMEDIATE transaction on the store's
-- one connection, which runs operations one at a time in the order they were
-- called and holds the file in exclusive locking mode, so no other writer
-- exists, so the read of the row and this write cannot race.
UPDATE shards
SET epoch = epoch + 1, owner = ?2, lease_expires_at = ?3, owner_principal = ?4
WHERE shard_id = ?1
