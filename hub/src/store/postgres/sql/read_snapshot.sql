-- The newest snapshot of shard $1 at or below sequence $2.
--
-- Concurrency contract: a plain read of committed state; no lock.
SELECT sn.sequence, sn.data, sn.hash, sn.created_at
FROM snapshots sn
JOIN shards s ON s.shard_no = sn.shard_no
WHERE s.shard_id = $1 AND sn.sequence <= $2
ORDER BY sn.sequence DESC
LIMIT 1
