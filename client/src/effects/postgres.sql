-- The PostgreSQL deterministic state store: one row per effect id.
--
-- Concurrency contract: `try_add` is a single INSERT .. ON CONFLICT DO
-- NOTHING; the primary key's unique index makes exactly one of concurrent
-- inserts for a key succeed, from any number of connections and nodes.
-- No row is locked beyond the statement.
CREATE TABLE IF NOT EXISTS omnirelay_effects (
    key         text   PRIMARY KEY,
    kind        text   NOT NULL,
    version     bigint NOT NULL,
    payload     bytea  NOT NULL,
    recorded_at bigint NOT NULL
);
