-- Raises the shard's low-water mark past ?2, keeping the hash of event ?2 for
-- the link of the first event kept.
--
-- Concurrency contract: runs in retention's IMMEDIATE transaction on the
-- store's one connection, which runs operations one at a time in the order
-- they were called and holds the file in exclusive locking mode, so no other
-- writer exists; the plan and the trims see one state and commit together.
UPDATE shards
SET low_sequence = ?2 + 1, low_prev_hash = (SELECT hash
FROM events
WHERE shard_no = ?1
AND sequence = ?2)
WHERE shard_no = ?1
