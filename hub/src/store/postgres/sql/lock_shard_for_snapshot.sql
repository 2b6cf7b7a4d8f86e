-- Reads the shard a snapshot is being stored for, with the hash of the event
-- at the snapshot's sequence $2 (NULL when that event is not stored).
--
-- Concurrency contract: FOR SHARE holds off retention (which locks the row
-- FOR UPDATE) until the snapshot transaction ends, so the event whose hash is
-- read cannot be trimmed in between; appends wait only for this short
-- transaction.
SELECT s.shard_no, s.epoch, s.owner, s.head_sequence, s.low_sequence, s.low_prev_hash,
       (SELECT e.hash FROM events e WHERE e.shard_no = s.shard_no AND e.sequence = $2) AS event_hash
FROM shards s
WHERE s.shard_id = $1
FOR SHARE OF s
