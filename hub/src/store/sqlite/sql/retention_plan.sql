-- What retention may trim below: the newest snapshot and the oldest checkpoint
-- updated since the cut-off.
--
-- Concurrency contract: runs in retention's IMMEDIATE transaction on the
-- store's one connection, which runs operations one at a time in the order
-- they were called and holds the file in exclusive locking mode, so no other
-- writer exists; the plan and the trims see one state and commit together.
SELECT (SELECT max(sequence)
FROM snapshots
WHERE shard_no = ?1), (SELECT min(sequence)
FROM checkpoints
WHERE shard_no = ?1
AND updated_at >= ?2)
