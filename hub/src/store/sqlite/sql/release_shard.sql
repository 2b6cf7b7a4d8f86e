-- Releases the lease held by ?2 at epoch ?3 under principal ?4. Changes no row
-- when the caller does not hold it.
--
-- Concurrency contract: one statement on the store's one connection, which
-- runs operations one at a time in the order they were called and holds the
-- file in exclusive locking mode, so no other writer exists; the WHERE clause
-- is the whole check, judged atomically by the statement.
UPDATE shards
SET owner = NULL, owner_principal = NULL, lease_expires_at = NULL
WHERE shard_id = ?1
AND owner = ?2
AND epoch = ?3
AND (owner_principal IS NULL OR owner_principal = ?4)
