-- The producer's newest recorded batch on the shard (the producer-sequence
-- check).
--
-- Concurrency contract: runs in the append group's IMMEDIATE transaction,
-- inside the batch's savepoint, on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; what it reads cannot
-- change before the group commits, and a refused batch's savepoint rolls back.
SELECT max(producer_seq)
FROM producer_batches
WHERE shard_no = ?1
AND producer_id = ?2
