-- The hub's predicted append transaction for one 1-event batch, as pgbench
-- runs it: BEGIN, shard lock, fenced head update with NOTIFY, event insert,
-- producer record insert and COMMIT pipelined in one round trip.
\startpipeline
BEGIN;
SELECT shard_no, epoch, owner, head_sequence, head_hash FROM shards WHERE shard_no = 1 FOR UPDATE;
WITH advanced AS (
    UPDATE shards SET head_sequence = head_sequence + 1, head_hash = '\x0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102'
    WHERE shard_no = 1 AND epoch = 1 AND owner IS NOT NULL
    RETURNING shard_id, head_sequence
)
SELECT count(pg_notify('omnirelay_bench', shard_id || ' ' || head_sequence)) FROM advanced;
INSERT INTO events SELECT 1, head_sequence, 1, now(), '\x0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f01020304', '\x0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102' FROM shards WHERE shard_no = 1;
INSERT INTO producer_batches SELECT 1, 'p', head_sequence, head_sequence, head_sequence, '\x0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102' FROM shards WHERE shard_no = 1;
COMMIT;
\endpipeline
