-- Writes the events of every accepted batch of an append group, in one
-- statement (arrays, so the row count does not change the statement).
--
-- Concurrency contract: runs in the append transaction while it holds the
-- row lock of every shard it writes to (lock_shards.sql); the sequences were
-- assigned from the locked heads, so the primary key can never collide with
-- another writer's rows.
INSERT INTO events (shard_no, sequence, epoch, recorded_at, body, hash)
SELECT *
FROM unnest($1::integer[], $2::bigint[], $3::bigint[], $4::timestamptz[], $5::bytea[], $6::bytea[])
