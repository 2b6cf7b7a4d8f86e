-- For each batch of an append group (by position `ord`), the producer's
-- latest recorded batch on the shard and the record of this very batch if it
-- was written before (a retry).
--
-- Concurrency contract: runs after lock_shards.sql in the same transaction
-- (READ COMMITTED). Records of a shard are only written under its row lock,
-- so this statement's snapshot, taken after the locks were granted, sees
-- every batch committed before ours; no lock is needed here.
SELECT q.ord,
       latest.producer_seq AS latest_seq,
       hit.first_sequence,
       hit.last_sequence,
       hit.last_hash
FROM unnest($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS q (shard_id, producer_id, producer_seq, ord)
JOIN shards s ON s.shard_id = q.shard_id
LEFT JOIN LATERAL (
    SELECT b.producer_seq
    FROM producer_batches b
    WHERE b.shard_no = s.shard_no AND b.producer_id = q.producer_id
    ORDER BY b.producer_seq DESC
    LIMIT 1
) latest ON true
LEFT JOIN producer_batches hit
    ON hit.shard_no = s.shard_no AND hit.producer_id = q.producer_id AND hit.producer_seq = q.producer_seq
