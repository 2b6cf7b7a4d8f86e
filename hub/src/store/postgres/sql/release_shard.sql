-- Frees the lease held by $2 at epoch $3. The epoch stays; the next grant
-- bumps it.
--
-- Concurrency contract: a single-row UPDATE under the row lock it takes.
UPDATE shards
SET owner = NULL, lease_expires_at = NULL
WHERE shard_id = $1 AND owner = $2 AND epoch = $3
