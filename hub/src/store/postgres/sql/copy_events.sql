-- Streams the events of a large append group in PostgreSQL's binary COPY
-- format (cheaper per row than an array INSERT once a group holds hundreds of
-- events).
--
-- Concurrency contract: as insert_events.sql: runs in the append transaction
-- while it holds the row lock of every shard it writes to.
COPY events (shard_no, sequence, epoch, recorded_at, body, hash) FROM STDIN (FORMAT binary)
