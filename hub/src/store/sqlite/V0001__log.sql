-- The embedded store's log: the same tables as the PostgreSQL schema
-- (migrations/V0001__log.sql), in SQLite's types. Times are microseconds
-- since the Unix epoch, by the hub's clock (the only clock a single-replica
-- store has).
--
-- Concurrency contract: one connection, on one dedicated thread, holding the
-- database file's exclusive lock for the life of the store; every write to
-- a shard happens in that connection's transactions, one at a time. There is
-- nothing to lock row by row.

CREATE TABLE shards (
    shard_no         INTEGER PRIMARY KEY,
    shard_id         TEXT    NOT NULL UNIQUE,
    epoch            INTEGER NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    owner            TEXT,
    lease_expires_at INTEGER,
    head_sequence    INTEGER NOT NULL DEFAULT 0 CHECK (head_sequence >= 0),
    head_hash        BLOB    NOT NULL,
    low_sequence     INTEGER NOT NULL DEFAULT 1,
    low_prev_hash    BLOB    NOT NULL,
    created_at       INTEGER NOT NULL,
    CHECK ((owner IS NULL) = (lease_expires_at IS NULL)),
    CHECK (low_sequence >= 1 AND low_sequence <= head_sequence + 1)
) STRICT;

CREATE TABLE events (
    shard_no    INTEGER NOT NULL,
    sequence    INTEGER NOT NULL,
    epoch       INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    hash        BLOB    NOT NULL,
    PRIMARY KEY (shard_no, sequence)
) STRICT, WITHOUT ROWID;

CREATE TABLE producer_batches (
    shard_no       INTEGER NOT NULL,
    producer_id    TEXT    NOT NULL,
    producer_seq   INTEGER NOT NULL,
    first_sequence INTEGER NOT NULL,
    last_sequence  INTEGER NOT NULL,
    last_hash      BLOB    NOT NULL,
    PRIMARY KEY (shard_no, producer_id, producer_seq)
) STRICT, WITHOUT ROWID;

CREATE TABLE checkpoints (
    subscriber_id TEXT    NOT NULL,
    shard_no      INTEGER NOT NULL REFERENCES shards (shard_no),
    sequence      INTEGER NOT NULL CHECK (sequence >= 0),
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (subscriber_id, shard_no)
) STRICT, WITHOUT ROWID;

CREATE INDEX checkpoints_by_shard ON checkpoints (shard_no, sequence);

CREATE TABLE snapshots (
    shard_no   INTEGER NOT NULL REFERENCES shards (shard_no),
    sequence   INTEGER NOT NULL CHECK (sequence >= 1),
    epoch      INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    hash       BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (shard_no, sequence)
) STRICT, WITHOUT ROWID;
