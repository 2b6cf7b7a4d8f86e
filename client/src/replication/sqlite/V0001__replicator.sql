-- The SQLite replicator's log: per shard its head, low-water mark, epoch and
-- lease; its events (encoded `replication.v1.ReplicationEvent`, with the
-- log-assigned sequence left out); each recent producer's last batch (for
-- retry recognition); its newest snapshot.
--
-- Concurrency contract: one connection, on one dedicated thread, holding the
-- database file's exclusive lock for the life of the replicator; every
-- write happens in that connection's transactions, one at a time, so no row
-- needs locking. Lease expiry is in milliseconds since the Unix epoch, by
-- this process's clock (the only clock a single-node log has).

CREATE TABLE shards (
    shard            TEXT    PRIMARY KEY,
    head             INTEGER NOT NULL DEFAULT 0 CHECK (head >= 0),
    low              INTEGER NOT NULL DEFAULT 1 CHECK (low >= 1 AND low <= head + 1),
    epoch            INTEGER NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    owner            TEXT,
    lease_expires_ms INTEGER
) STRICT, WITHOUT ROWID;

CREATE TABLE events (
    shard    TEXT    NOT NULL,
    sequence INTEGER NOT NULL,
    data     BLOB    NOT NULL,
    PRIMARY KEY (shard, sequence)
) STRICT, WITHOUT ROWID;

-- The last batch of each of a shard's recent producers: `stamp` is the head
-- after it, so the oldest are pruned first.
CREATE TABLE producers (
    shard        TEXT    NOT NULL,
    producer     TEXT    NOT NULL,
    producer_seq INTEGER NOT NULL,
    first        INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    stamp        INTEGER NOT NULL,
    PRIMARY KEY (shard, producer)
) STRICT, WITHOUT ROWID;

CREATE TABLE snapshots (
    shard    TEXT    PRIMARY KEY,
    sequence INTEGER NOT NULL,
    data     BLOB    NOT NULL
) STRICT, WITHOUT ROWID;
