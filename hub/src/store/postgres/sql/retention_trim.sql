-- Trims shard number $1 through sequence $2: deletes the events, the
-- snapshots below $2 (their tail is gone), and producer batch records that
-- end at or below $2 except each producer's latest; moves the low-water mark
-- to $2 + 1 with the hash of event $2 as the new chain anchor. Returns the
-- number of events deleted.
--
-- Concurrency contract: runs in the retention transaction holding the shard
-- row lock (retention_plan.sql). One statement: its sub-statements share one
-- snapshot, so the anchor hash is read before event $2 is deleted.
WITH anchor AS (
    SELECT e.hash FROM events e WHERE e.shard_no = $1 AND e.sequence = $2
),
moved AS (
    UPDATE shards
    SET low_sequence = $2 + 1, low_prev_hash = (SELECT hash FROM anchor)
    WHERE shard_no = $1
    RETURNING 1
),
old_snapshots AS (
    DELETE FROM snapshots WHERE shard_no = $1 AND sequence < $2 RETURNING 1
),
old_batches AS (
    DELETE FROM producer_batches b
    WHERE b.shard_no = $1
      AND b.last_sequence <= $2
      AND b.producer_seq < (SELECT max(l.producer_seq) FROM producer_batches l
                            WHERE l.shard_no = b.shard_no AND l.producer_id = b.producer_id)
    RETURNING 1
),
trimmed AS (
    DELETE FROM events WHERE shard_no = $1 AND sequence <= $2 RETURNING 1
)
SELECT (SELECT count(*) FROM trimmed) AS deleted, (SELECT count(*) FROM moved) AS moved
