-- The shards whose id starts with ?1, in id order.
--
-- Concurrency contract: a read on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; it sees every committed
-- write and never another operation's half-done transaction.
SELECT shard_id, owner, epoch, head_sequence, lease_expires_at, head_hash, low_sequence, low_prev_hash
FROM shards
WHERE substr(shard_id, 1, length(?1)) = ?1
ORDER BY shard_id
