-- Deletes the snapshots below the newest one kept.
--
-- Concurrency contract: runs in retention's IMMEDIATE transaction on the
-- store's one connection, which runs operations one at a time in the order
-- they were called and holds the file in exclusive locking mode, so no other
-- writer exists; the plan and the trims see one state and commit together.
DELETE
FROM snapshots
WHERE shard_no = ?1
AND sequence < ?2
