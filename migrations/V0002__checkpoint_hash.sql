-- Checkpoints remember the chain hash of the event they stop at (sent by the
-- subscriber, else the log's at commit time), so a log rewritten below a
-- checkpoint no longer matches it and `omnirelay-hub verify` says so.
--
-- Nullable (rule 4): checkpoints committed before this migration, and by
-- replicas of the previous release during a rolling upgrade, carry none.
ALTER TABLE checkpoints
    ADD COLUMN hash bytea CHECK (hash IS NULL OR octet_length(hash) = 32);
