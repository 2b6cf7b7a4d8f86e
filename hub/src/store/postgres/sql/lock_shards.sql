-- Locks the row of every shard in an append group and reads its lease and
-- head.
--
-- Concurrency contract: the rows are locked in shard_no order, so two group
-- commits (of this replica or another) that touch the same shards can never
-- deadlock; the locks are held until the append transaction ends. Holding a
-- shard's row lock is what makes its sequences gapless and its epoch a fence:
-- the epoch read here cannot change before the transaction commits, and
-- advance_heads.sql re-checks it in the same transaction.
SELECT shard_no, shard_id, epoch, owner, head_sequence, head_hash
FROM shards
WHERE shard_id = ANY($1::text[])
ORDER BY shard_no
FOR UPDATE
