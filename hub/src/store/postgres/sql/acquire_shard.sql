-- Grants a shard's lease to owner $2, bound to principal $4, for $3
-- milliseconds if it is free, lapsed, or already $2's under the same
-- principal (or under none: a lease from before principals were recorded),
-- bumping the epoch; creates the shard on first use. Returns no row when
-- someone else holds an unexpired lease, including a live lease under the
-- same owner id taken by another principal.
--
-- Concurrency contract: INSERT ... ON CONFLICT DO UPDATE locks the shard's
-- row, so concurrent acquires serialize on it and exactly one of them sees a
-- free lease; expiry is judged by this server's now() alone.
INSERT INTO shards (shard_id, epoch, owner, owner_principal, lease_expires_at)
VALUES ($1, 1, $2, $4::text, now() + $3::bigint::float8 * interval '1 millisecond')
ON CONFLICT (shard_id) DO UPDATE
SET epoch = shards.epoch + 1,
    owner = excluded.owner,
    owner_principal = excluded.owner_principal,
    lease_expires_at = excluded.lease_expires_at
WHERE shards.owner IS NULL
   OR shards.lease_expires_at <= now()
   OR (shards.owner = excluded.owner
       AND (shards.owner_principal IS NULL OR shards.owner_principal = excluded.owner_principal))
RETURNING shard_id, owner, epoch, head_sequence, lease_expires_at
