-- The hash of one event (what a checkpoint or a snapshot at it records).
--
-- Concurrency contract: a read on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; it sees every committed
-- write and never another operation's half-done transaction.
SELECT hash
FROM events
WHERE shard_no = ?1
AND sequence = ?2
