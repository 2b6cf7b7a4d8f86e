-- Extends the lease held by ?2 at epoch ?3 until ?4, when it was taken by
-- principal ?5 (or by none, which ?5 then adopts). Changes no row when the
-- caller does not hold it.
--
-- Concurrency contract: one statement on the store's one connection, which
-- runs operations one at a time in the order they were called and holds the
-- file in exclusive locking mode, so no other writer exists; the WHERE clause
-- is the whole check, judged atomically by the statement.
UPDATE shards
SET lease_expires_at = ?4, owner_principal = coalesce(owner_principal, ?5)
WHERE shard_id = ?1
AND owner = ?2
AND epoch = ?3
AND (owner_principal IS NULL OR owner_principal = ?5)
