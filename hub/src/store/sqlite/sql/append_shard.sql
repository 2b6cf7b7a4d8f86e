-- The shard row an append is decided on: its number, epoch, holder and head.
--
-- Concurrency contract: runs in the append group's IMMEDIATE transaction,
-- inside the batch's savepoint, on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; what it reads cannot
-- change before the group commits, and a refused batch's savepoint rolls back.
SELECT shard_no, epoch, owner, head_sequence, head_hash
FROM shards
WHERE shard_id = ?1
