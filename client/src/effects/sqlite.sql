-- The SQLite deterministic state store: one row per effect id.
--
-- Concurrency contract: `try_add` is a single INSERT .. ON CONFLICT DO
-- NOTHING, atomic under SQLite's database write lock, so of concurrent adds
-- for one key (from any connection or process) exactly one inserts.
CREATE TABLE IF NOT EXISTS effects (
    key         TEXT    PRIMARY KEY,
    kind        TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    recorded_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
