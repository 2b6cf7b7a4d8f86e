-- One page of checkpoints of subscriber $1 (all when NULL) on shards $2 (all
-- when empty), after the pair ($3, $4) when $3 is not NULL, at most $5 rows.
-- Ordered and compared in byte order (COLLATE "C"), as page tokens are, so a
-- database collation never skips or repeats a checkpoint between pages.
--
-- Concurrency contract: a plain read of committed state; no lock.
SELECT c.subscriber_id, s.shard_id, c.sequence, c.updated_at, c.hash
FROM checkpoints c
JOIN shards s ON s.shard_no = c.shard_no
WHERE ($1::text IS NULL OR c.subscriber_id = $1)
  AND (cardinality($2::text[]) = 0 OR s.shard_id = ANY($2::text[]))
  AND ($3::text IS NULL
       OR (c.subscriber_id COLLATE "C", s.shard_id COLLATE "C") > ($3::text COLLATE "C", $4::text COLLATE "C"))
ORDER BY c.subscriber_id COLLATE "C", s.shard_id COLLATE "C"
LIMIT $5
