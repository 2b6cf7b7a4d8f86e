-- Moves each written shard's head, guarded by the epoch every accepted batch
-- carried and by the head the writes were chained to, and announces the new
-- heads to other replicas (NOTIFY is delivered at commit, never for a
-- rolled-back transaction). Returns how many shards moved; if the fence
-- refused any of the $7 updates, raises instead, which aborts the
-- transaction (and the COMMIT pipelined after this statement becomes a
-- rollback).
--
-- Concurrency contract: runs in the append transaction under the shards' row
-- locks (lock_shards.sql). The guard is the fence itself, judged by
-- PostgreSQL on the locked row: `epoch = u.epoch AND owner IS NOT NULL`
-- rejects a stale or released lease, and `head_sequence = u.prev` rejects
-- writes chained to a head that is no longer the shard's (a committer's
-- predicted group, see the committer module, when another writer moved it).
WITH advanced AS (
    UPDATE shards s
    SET head_sequence = u.head, head_hash = u.hash
    FROM unnest($1::integer[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bytea[])
        AS u (shard_no, epoch, prev, head, hash)
    WHERE s.shard_no = u.shard_no
      AND s.epoch = u.epoch
      AND s.owner IS NOT NULL
      AND s.head_sequence = u.prev
      AND u.head > u.prev
    RETURNING s.shard_id, s.head_sequence
),
notified AS (
    SELECT count(pg_notify($6, shard_id || ' ' || head_sequence)) AS moved
    FROM advanced
)
SELECT CASE WHEN moved = $7::bigint THEN moved ELSE omnirelay_fence_refused(moved, $7::bigint) END AS moved
FROM notified
