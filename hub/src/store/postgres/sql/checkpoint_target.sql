-- Reads what a checkpoint commit of shard $1 at sequence $2 is judged
-- against: the shard's number, head and low-water mark, the hash anchoring
-- the first stored event, and the stored hash of the event at $2 (NULL
-- when no such row is stored).
--
-- Concurrency contract: one statement, so the shard row and the event come
-- from one snapshot (a concurrent trim is seen wholly or not at all). No
-- lock: the upsert that follows only moves a checkpoint forward, whatever
-- happened in between.
SELECT s.shard_no, s.head_sequence, s.low_sequence, s.low_prev_hash, e.hash
FROM shards s
LEFT JOIN events e ON e.shard_no = s.shard_no AND e.sequence = $2
WHERE s.shard_id = $1
