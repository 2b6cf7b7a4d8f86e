-- Deletes trimmed batches' records, keeping each producer's newest (its
-- sequence check needs it).
--
-- Concurrency contract: runs in retention's IMMEDIATE transaction on the
-- store's one connection, which runs operations one at a time in the order
-- they were called and holds the file in exclusive locking mode, so no other
-- writer exists; the plan and the trims see one state and commit together.
DELETE
FROM producer_batches
WHERE shard_no = ?1
AND last_sequence <= ?2
AND producer_seq < (SELECT max(l.producer_seq)
FROM producer_batches l
WHERE l.shard_no = producer_batches.shard_no
AND l.producer_id = producer_batches.producer_id)
