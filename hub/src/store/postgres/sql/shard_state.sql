-- Reads one shard's lease, head and low-water mark.
--
-- Concurrency contract: a plain read of committed state; no lock.
SELECT shard_id, owner, epoch, head_sequence, lease_expires_at, head_hash, low_sequence, low_prev_hash
FROM shards
WHERE shard_id = $1
