-- The hub's log: shards (lease, head, low-water mark), events, producer batch
-- records, subscriber checkpoints and snapshots.
--
-- Every write to a shard's events, producer records, head or low-water mark
-- happens in a transaction that holds that shard's row lock (SELECT ... FOR
-- UPDATE on shards), which is what makes sequences gapless and epochs a fence.

CREATE TABLE shards (
    -- Compact key used by the per-event tables (four bytes instead of the id).
    shard_no         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    shard_id         text        NOT NULL UNIQUE,
    -- Lease: epoch of the latest grant, its holder (NULL when free) and when
    -- it lapses by this server's clock.
    epoch            bigint      NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    owner            text,
    lease_expires_at timestamptz,
    -- Last sequence and its chain hash.
    head_sequence    bigint      NOT NULL DEFAULT 0 CHECK (head_sequence >= 0),
    head_hash        bytea       NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    -- Lowest stored sequence, and the hash of the event just below it, so the
    -- first stored event can be verified after a trim.
    low_sequence     bigint      NOT NULL DEFAULT 1,
    low_prev_hash    bytea       NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT lease_complete CHECK ((owner IS NULL) = (lease_expires_at IS NULL)),
    CONSTRAINT low_within_log CHECK (low_sequence >= 1 AND low_sequence <= head_sequence + 1)
);

-- One row per event. No foreign key to shards: rows are only inserted by the
-- append transaction that holds the shard's row lock, and a per-row key check
-- would cost a lookup on the hottest path.
CREATE TABLE events (
    shard_no    integer     NOT NULL,
    sequence    bigint      NOT NULL,
    epoch       bigint      NOT NULL,
    -- The producer's time (also inside body); indexed by nothing: starting a
    -- subscription from a time scans the shard's key range.
    recorded_at timestamptz NOT NULL,
    -- Canonical ReplicationEvent encoding with sequence, epoch and hashes
    -- cleared.
    body        bytea       NOT NULL,
    -- SHA-256(prev_hash || be64(sequence) || be64(epoch) || body).
    hash        bytea       NOT NULL,
    PRIMARY KEY (shard_no, sequence)
);

-- Which sequences each producer batch received, so a retry is answered with
-- the original sequences. A producer's latest record is never trimmed.
CREATE TABLE producer_batches (
    shard_no       integer NOT NULL,
    producer_id    text    NOT NULL,
    producer_seq   bigint  NOT NULL,
    first_sequence bigint  NOT NULL,
    last_sequence  bigint  NOT NULL,
    last_hash      bytea   NOT NULL,
    PRIMARY KEY (shard_no, producer_id, producer_seq)
);

CREATE TABLE checkpoints (
    subscriber_id text        NOT NULL,
    shard_no      integer     NOT NULL REFERENCES shards (shard_no),
    sequence      bigint      NOT NULL CHECK (sequence >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscriber_id, shard_no)
);

-- Retention looks for the oldest required checkpoint of a shard.
CREATE INDEX checkpoints_by_shard ON checkpoints (shard_no, sequence);

CREATE TABLE snapshots (
    shard_no   integer     NOT NULL REFERENCES shards (shard_no),
    sequence   bigint      NOT NULL CHECK (sequence >= 1),
    epoch      bigint      NOT NULL,
    data       bytea       NOT NULL,
    -- Chain hash of the event at sequence, tying the snapshot to the log.
    hash       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (shard_no, sequence)
);

-- Aborts the calling transaction when an append's epoch fence refused a head
-- update it was asked to make (advance_heads.sql): the whole group then
-- rolls back, and nothing of a fenced batch can be committed.
CREATE FUNCTION omnirelay_fence_refused(moved bigint, expected bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'epoch fence refused % of % shard head updates', expected - moved, expected;
END
$$;
