-- Moves the shard's head to the batch's last event, only at the batch's epoch
-- (the fence again: with one connection nothing can have changed, but the
-- write states its rule).
--
-- Concurrency contract: runs in the append group's IMMEDIATE transaction,
-- inside the batch's savepoint, on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; what it reads cannot
-- change before the group commits, and a refused batch's savepoint rolls back.
UPDATE shards
SET head_sequence = ?2, head_hash = ?3
WHERE shard_no = ?1
AND epoch = ?4
