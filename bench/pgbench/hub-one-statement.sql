-- The least an append of one 1-event batch must write, as ONE statement in
-- autocommit (one round trip, no BEGIN/COMMIT messages): move the shard's
-- head under its epoch fence, insert the event, insert the producer record.
-- A ceiling for any implementation of the hub's schema, not what the hub
-- sends.
WITH advanced AS (
    UPDATE shards SET head_sequence = head_sequence + 1, head_hash = '\x0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102'
    WHERE shard_no = 1 AND epoch = 1 AND owner IS NOT NULL
    RETURNING shard_id, head_sequence
), event AS (
    INSERT INTO events SELECT 1, head_sequence, 1, now(), '\x0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f01020304', '\x0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102' FROM advanced
), record AS (
    INSERT INTO producer_batches SELECT 1, 'p', head_sequence, head_sequence, head_sequence, '\x0102030405060708090a0b0c0d0e0f0102030405060708090a0b0c0d0e0f0102' FROM advanced
)
SELECT count(pg_notify('omnirelay_bench', shard_id || ' ' || head_sequence)) FROM advanced;
