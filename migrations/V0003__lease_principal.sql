-- A shard lease remembers the principal that took it: only that principal
-- may renew or release it, and a live lease cannot be re-acquired under its
-- owner id by anyone else (see docs/security.md).
--
-- Nullable (rule 4): leases granted before this migration, and by replicas
-- of the previous release during a rolling upgrade, carry none; the first
-- renewal or re-acquisition by the holder's owner id records the principal
-- that made it. A lease with a principal is never adopted by another.
ALTER TABLE shards ADD COLUMN owner_principal text;
