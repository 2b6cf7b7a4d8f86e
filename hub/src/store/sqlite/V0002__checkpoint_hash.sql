-- Checkpoints remember the chain hash of the event they stop at, as in the
-- PostgreSQL schema (migrations/V0002__checkpoint_hash.sql). NULL for
-- checkpoints committed before this version.
ALTER TABLE checkpoints ADD COLUMN hash BLOB CHECK (hash IS NULL OR length(hash) = 32);
