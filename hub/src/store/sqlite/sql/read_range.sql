-- A page of a shard's events from ?2 (and the one before it, for its link)
-- through ?3, at most ?4 rows.
--
-- Concurrency contract: runs in the read's DEFERRED transaction on the store's
-- one connection, which runs operations one at a time in the order they were
-- called and holds the file in exclusive locking mode, so no other writer
-- exists, so the shard row and the events come from one snapshot.
SELECT sequence, epoch, recorded_at, body, hash
FROM events
WHERE shard_no = ?1
AND sequence >= ?2 - 1
AND sequence <= ?3
ORDER BY sequence
LIMIT ?4
