-- Lists shards whose id starts with $1, in id order.
--
-- Concurrency contract: a plain read of committed state; no lock.
SELECT shard_id, owner, epoch, head_sequence, lease_expires_at, head_hash, low_sequence, low_prev_hash
FROM shards
WHERE starts_with(shard_id, $1)
ORDER BY shard_id
