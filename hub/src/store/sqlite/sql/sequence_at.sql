-- The first sequence of a shard recorded at or after a time.
--
-- Concurrency contract: a read on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; it sees every committed
-- write and never another operation's half-done transaction.
SELECT e.sequence
FROM shards s
JOIN events e ON e.shard_no = s.shard_no
WHERE s.shard_id = ?1
AND e.recorded_at >= ?2
ORDER BY e.sequence
LIMIT 1
