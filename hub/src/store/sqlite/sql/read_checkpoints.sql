-- Every checkpoint, or one subscriber's, in subscriber and shard order.
--
-- Concurrency contract: a read on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; it sees every committed
-- write and never another operation's half-done transaction.
SELECT c.subscriber_id, s.shard_id, c.sequence, c.updated_at, c.hash
FROM checkpoints c
JOIN shards s ON s.shard_no = c.shard_no
WHERE (?1 IS NULL OR c.subscriber_id = ?1)
ORDER BY c.subscriber_id, s.shard_id
