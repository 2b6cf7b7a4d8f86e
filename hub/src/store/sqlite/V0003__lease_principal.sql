-- A shard lease remembers the principal that took it, as in the PostgreSQL
-- schema (migrations/V0003__lease_principal.sql). NULL for leases granted
-- before this version.
ALTER TABLE shards ADD COLUMN owner_principal TEXT;
