//! Timeouts, batch sizes and backoff of the [`Subscriber`](super::Subscriber)
//! runtime and the shipped sinks, each with the reason for its value. Every
//! one is a default of [`SubscriberConfig`](super::SubscriberConfig) or of a
//! sink's configuration.

use std::time::Duration;

/// Events delivered between two hub checkpoint commits: one commit (a
/// round trip and a PostgreSQL write on the hub) per thousand events keeps
/// its cost far below the delivery's, and bounds what an at-least-once sink
/// repeats after a crash.
pub const CHECKPOINT_EVENTS: u64 = 1_000;

/// Longest time delivered events wait for their checkpoint commit, so a
/// quiet stream's checkpoint (and the lag operators see) still moves.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Idle interval after which the hub sends a progress frame; the runtime
/// reopens a stream that stays silent for [`SILENCE_FACTOR`] of them.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Progress intervals of silence after which a stream is taken for dead
/// (HTTP/2 keepalive usually notices first).
pub const SILENCE_FACTOR: u32 = 3;

/// Deadline of every unary hub call (checkpoints) and of opening a stream:
/// the hub answers in milliseconds; three seconds rides out a replica's
/// pause without hiding a dead one.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest wait for a TCP (and TLS) connection to a hub endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Deadline of one sink call (a batch's transaction, a flush): a batch is at
/// most one hub frame (3 MiB), which a healthy database or disk takes well
/// under a second to store. A call that runs past it counts as a transient
/// failure of unknown outcome, and the batch is handed over again.
pub const SINK_TIMEOUT: Duration = Duration::from_secs(30);

/// First pause before reconnecting or retrying a failed sink call; doubles
/// up to [`BACKOFF_MAX`], with jitter so many sinks do not retry in step.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest pause between reconnections or sink retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// HTTP/2 keepalive ping interval and timeout: a hub that vanished without
/// closing the connection is noticed within their sum, even while idle.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a keepalive ping may go unanswered.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// NDJSON sink: a file is rotated once it holds this many bytes (64 MiB
/// keeps files easy to ship and to `grep`).
pub const NDJSON_ROTATE_BYTES: u64 = 64 * 1024 * 1024;

/// PostgreSQL projection: rows from which a run of whole-item writes is
/// written with `COPY` rather than one array upsert. `COPY` inserts rows in
/// multi-row batches (one WAL record per batch, no conflict check per row)
/// but costs three more round trips (a savepoint, the copy's start, its
/// release) and, when an item of the run is already in the table, a second
/// attempt by upsert. A catch-up frame of enqueues (hundreds to thousands
/// of rows) gains; a live frame of a few events would not.
pub const PROJECTION_COPY_MIN_ROWS: usize = 256;

/// Batches a PostgreSQL projection writes at once, each in its own
/// transaction on its own pooled connection (at most the pool's size): the
/// next batch copies its new rows while the one before still writes and
/// commits, and locks the position only after that one committed. Two
/// keeps both of this machine's cores busy during catch-up and bounds what
/// is kept to apply again after a failure to two frames (3 MiB each).
pub const PROJECTION_BATCHES_IN_FLIGHT: usize = 2;
