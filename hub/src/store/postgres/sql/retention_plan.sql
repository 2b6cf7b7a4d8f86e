-- Locks a shard for trimming and reads what bounds the trim: its newest
-- snapshot and its oldest checkpoint updated within the last $2 milliseconds.
--
-- Concurrency contract: FOR UPDATE on the shard row serializes the trim with
-- appends, snapshot stores and other replicas' retention runs on this shard;
-- the lock is held until retention_trim.sql commits.
SELECT s.shard_no, s.low_sequence, s.head_sequence,
       (SELECT max(sn.sequence) FROM snapshots sn WHERE sn.shard_no = s.shard_no) AS newest_snapshot,
       (SELECT min(c.sequence) FROM checkpoints c
        WHERE c.shard_no = s.shard_no
          AND c.updated_at >= now() - $2::bigint::float8 * interval '1 millisecond') AS oldest_checkpoint
FROM shards s
WHERE s.shard_id = $1
FOR UPDATE OF s
