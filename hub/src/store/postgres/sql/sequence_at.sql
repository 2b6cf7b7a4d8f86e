-- The first stored event of shard $1 recorded at or after $2. Walks the
-- shard's primary-key range from its low end (recorded_at has no index:
-- starting from a time is rare, and an index would tax every append).
--
-- Concurrency contract: a plain read of committed state; no lock.
SELECT e.sequence
FROM shards s
JOIN events e ON e.shard_no = s.shard_no
WHERE s.shard_id = $1 AND e.recorded_at >= $2
ORDER BY e.sequence
LIMIT 1
