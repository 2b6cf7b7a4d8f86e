-- Checkpoints of subscriber $1 (all when NULL) on shards $2 (all when empty).
--
-- Concurrency contract: a plain read of committed state; no lock.
SELECT c.subscriber_id, s.shard_id, c.sequence, c.updated_at, c.hash
FROM checkpoints c
JOIN shards s ON s.shard_no = c.shard_no
WHERE ($1::text IS NULL OR c.subscriber_id = $1)
  AND (cardinality($2::text[]) = 0 OR s.shard_id = ANY($2::text[]))
ORDER BY c.subscriber_id, s.shard_id
