-- Grants a shard's lease to $2 for $3 milliseconds if it is free, lapsed or
-- already $2's, bumping the epoch; creates the shard on first use. Returns no
-- row when someone else holds an unexpired lease.
--
-- Concurrency contract: INSERT ... ON CONFLICT DO UPDATE locks the shard's
-- row, so concurrent acquires serialize on it and exactly one of them sees a
-- free lease; expiry is judged by this server's now() alone.
INSERT INTO shards (shard_id, epoch, owner, lease_expires_at)
VALUES ($1, 1, $2, now() + $3::bigint::float8 * interval '1 millisecond')
ON CONFLICT (shard_id) DO UPDATE
SET epoch = shards.epoch + 1,
    owner = excluded.owner,
    lease_expires_at = excluded.lease_expires_at
WHERE shards.owner IS NULL
   OR shards.lease_expires_at <= now()
   OR shards.owner = excluded.owner
RETURNING shard_id, owner, epoch, head_sequence, lease_expires_at
