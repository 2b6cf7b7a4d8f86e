-- Extends the lease held by $2 at epoch $3 to $4 milliseconds from now, when
-- it was taken by principal $5 (or by none: a lease from before principals
-- were recorded, which $5 then adopts). Returns no row when the caller does
-- not hold it.
--
-- Concurrency contract: a single-row UPDATE; the row lock it takes orders it
-- against a concurrent acquire, so a renew either lands before a takeover
-- (and the takeover then sees an unexpired lease) or fails after it.
UPDATE shards
SET lease_expires_at = now() + $4::bigint::float8 * interval '1 millisecond',
    owner_principal = coalesce(owner_principal, $5::text)
WHERE shard_id = $1 AND owner = $2 AND epoch = $3
  AND (owner_principal IS NULL OR owner_principal = $5::text)
RETURNING shard_id, owner, epoch, head_sequence, lease_expires_at
