-- Inserts one event of an accepted batch.
--
-- Concurrency contract: runs in the append group's IMMEDIATE transaction,
-- inside the batch's savepoint, on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; what it reads cannot
-- change before the group commits, and a refused batch's savepoint rolls back.
INSERT INTO events (shard_no, sequence, epoch, recorded_at, body, hash)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
