-- Frees the lease held by $2 at epoch $3, when it was taken by principal $4
-- (or by none). The epoch stays; the next grant bumps it.
--
-- Concurrency contract: a single-row UPDATE under the row lock it takes.
UPDATE shards
SET owner = NULL, owner_principal = NULL, lease_expires_at = NULL
WHERE shard_id = $1 AND owner = $2 AND epoch = $3
  AND (owner_principal IS NULL OR owner_principal = $4::text)
