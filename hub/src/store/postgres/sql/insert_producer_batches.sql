-- Records which sequences each accepted batch received, so a retry of the
-- same (producer_id, producer_seq) is answered with them.
--
-- Concurrency contract: runs in the append transaction under the shards' row
-- locks (lock_shards.sql), like insert_events.sql.
INSERT INTO producer_batches (shard_no, producer_id, producer_seq, first_sequence, last_sequence, last_hash)
SELECT *
FROM unnest($1::integer[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bytea[])
