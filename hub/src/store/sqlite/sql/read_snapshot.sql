-- A shard's newest snapshot at or below a sequence.
--
-- Concurrency contract: a read on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; it sees every committed
-- write and never another operation's half-done transaction.
SELECT sn.sequence, sn.data, sn.hash, sn.created_at
FROM snapshots sn
JOIN shards s ON s.shard_no = sn.shard_no
WHERE s.shard_id = ?1
AND sn.sequence <= ?2
ORDER BY sn.sequence DESC
LIMIT 1
