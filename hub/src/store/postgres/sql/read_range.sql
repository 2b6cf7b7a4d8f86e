-- Reads a shard's head and low-water mark together with up to $4 + 1 events
-- from sequence $2 - 1 (the anchor, whose hash verifies the first requested
-- event; absent when it was trimmed) through $3, stopping once the bodies
-- from $2 on reach $5 bytes: an event is returned while the bodies before it
-- (the anchor's not counted) total less than $5, so at least one is.
--
-- Concurrency contract: one statement, so the shard row and the events come
-- from one snapshot: a concurrent trim or append is seen wholly or not at
-- all. No lock; readers never block appends.
SELECT s.shard_no, s.head_sequence, s.low_sequence, s.low_prev_hash,
       e.sequence, e.epoch, e.recorded_at, e.body, e.hash
FROM shards s
LEFT JOIN LATERAL (
    SELECT w.sequence, w.epoch, w.recorded_at, w.body, w.hash
    FROM (
        SELECT ev.sequence, ev.epoch, ev.recorded_at, ev.body, ev.hash,
               coalesce(sum(octet_length(ev.body)) FILTER (WHERE ev.sequence >= $2::bigint)
                            OVER (ORDER BY ev.sequence ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                   AS bytes_before
        FROM events ev
        WHERE ev.shard_no = s.shard_no
          AND ev.sequence >= $2::bigint - 1
          AND ev.sequence <= $3::bigint
        ORDER BY ev.sequence
        LIMIT $4::bigint + 1
    ) w
    WHERE w.bytes_before < greatest($5::bigint, 1)
) e ON true
WHERE s.shard_id = $1
ORDER BY e.sequence
