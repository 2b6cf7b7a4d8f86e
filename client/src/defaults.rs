//! Every limit and timeout of the lease queue, with the reason for its value.
//!
//! Queue-level values are defaults of [`QueueConfig`](crate::queue::QueueConfig)
//! and can be changed per queue; payload limits are fixed because they are part
//! of the wire contract (`resourcelease.proto` documents them).

use std::time::Duration;

/// Longest `resource_type`, in bytes: resource kinds are short names
/// ("table", "workflow"); 128 leaves room for dotted namespaces.
pub const RESOURCE_TYPE_MAX_BYTES: usize = 128;

/// Longest `resource_id`, in bytes: long enough for URIs and composite keys,
/// short enough that the per-resource lease index stays small.
pub const RESOURCE_ID_MAX_BYTES: usize = 512;

/// Longest `partition_key`, in bytes: a routing hint, never a document.
pub const PARTITION_KEY_MAX_BYTES: usize = 256;

/// Longest `request_id`, in bytes: fits UUIDs, ULIDs and composed keys.
pub const REQUEST_ID_MAX_BYTES: usize = 256;

/// Most attributes per item: attributes are labels, not a second body.
pub const ATTRIBUTES_MAX_COUNT: usize = 64;

/// Longest attribute key, in bytes.
pub const ATTRIBUTE_KEY_MAX_BYTES: usize = 128;

/// Longest attribute value, in bytes.
pub const ATTRIBUTE_VALUE_MAX_BYTES: usize = 1024;

/// Largest item body, in bytes (1 MiB): the contracts' one limit
/// ([`MAX_ITEM_BODY_BYTES`](omnirelay_proto::limits::MAX_ITEM_BODY_BYTES)),
/// which the hub's event limit leaves room for, so an item a node accepts is
/// never refused by the log. Bigger payloads belong in object storage, with
/// a reference in the body.
pub const BODY_MAX_BYTES: usize = omnirelay_proto::limits::MAX_ITEM_BODY_BYTES;

/// Longest error text a worker may attach to `fail`, in bytes: enough for a
/// message and a short chain of causes; the attempt history keeps every one.
pub const ERROR_MAX_BYTES: usize = 4096;

/// Most progress entries per heartbeat, and the longest key/value (bytes):
/// progress is a status line for operators, recorded in the log.
pub const PROGRESS_MAX_ENTRIES: usize = 32;

/// Longest progress key or value, in bytes.
pub const PROGRESS_ENTRY_MAX_BYTES: usize = 1024;

/// Longest enqueue delay: one week. Longer delays are schedules, which belong
/// in a scheduler, and would pin items in memory for too long.
pub const ENQUEUE_DELAY_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// Items a queue holds (pending + leased) by default: bounded so a stuck
/// consumer fills the queue and producers get RESOURCE_EXHAUSTED instead of
/// the node running out of memory.
pub const CAPACITY: u64 = 100_000;

/// Pending depth at which backpressure turns on by default: 80% of capacity,
/// so producers slow down before the hard limit rejects them.
pub const HIGH_WATERMARK: u64 = 80_000;

/// Pending depth at which backpressure turns off again by default: 60% of
/// capacity. The gap to the high watermark (hysteresis) stops the signal
/// flapping while consumers work the backlog down.
pub const LOW_WATERMARK: u64 = 60_000;

/// Leases granted per item before a failure or expiry dead-letters it: enough
/// to ride out transient faults, few enough that a poison item stops burning
/// workers within minutes (with the default backoff).
pub const MAX_ATTEMPTS: u32 = 5;

/// Lease duration when the worker does not ask for one: long enough for
/// typical jobs between heartbeats, short enough that a dead worker's item is
/// retried within half a minute.
pub const LEASE_DURATION: Duration = Duration::from_secs(30);

/// Longest lease a worker may ask for (requests are clamped): a crashed
/// worker holds its item at most this long.
pub const LEASE_DURATION_MAX: Duration = Duration::from_secs(600);

/// Shortest lease: shorter leases expire before a heartbeat can round-trip.
pub const LEASE_DURATION_MIN: Duration = Duration::from_millis(100);

/// Longest long-poll wait of one `lease` call (requests are clamped): below
/// common proxy idle timeouts (60 s), so a waiting worker's connection is not
/// cut by infrastructure.
pub const LEASE_WAIT_MAX: Duration = Duration::from_secs(50);

/// First retry delay of the exponential backoff after a failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// Longest backoff delay: retries of a persistently failing item still happen
/// every few minutes, so recovery of a dependency is noticed quickly.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Longest explicit requeue delay a worker may ask for in `fail`; as for
/// enqueue delays, longer waits belong in a scheduler.
pub const REQUEUE_DELAY_MAX: Duration = ENQUEUE_DELAY_MAX;

/// How often the sweeper looks for expired leases. Expiry is also checked on
/// every `lease` call, so this bounds only how late an idle queue notices.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// Most leases expired in one sweep batch: bounds how long the sweeper holds
/// the shard (and the size of one replication batch) after a mass expiry.
pub const SWEEP_BATCH_MAX: usize = 256;

/// How long completions are remembered, for idempotent `complete` retries and
/// `request_id` deduplication after an item is gone: covers client retry
/// loops with generous backoff.
pub const COMPLETED_RETENTION: Duration = Duration::from_secs(300);

/// Most completions remembered, whatever their age: caps the memory of the
/// window above at high throughput (about 100 bytes each).
pub const COMPLETED_RETAINED_MAX: usize = 100_000;

/// Default page size of `ListDeadLetters`.
pub const DEAD_LETTER_PAGE_SIZE: u32 = 100;

/// Largest page of `ListDeadLetters`: keeps one response well below gRPC's
/// default 4 MiB message limit for typical items.
pub const DEAD_LETTER_PAGE_MAX: u32 = 1000;

/// Longest wait for in-flight leases in a `drain` with mode `wait`: a drain
/// is an operator action and should answer within a lease duration or two.
pub const DRAIN_WAIT_MAX: Duration = Duration::from_secs(600);

/// Drain wait when the request does not say: one default lease duration, by
/// which a live worker has heartbeated or finished.
pub const DRAIN_WAIT: Duration = LEASE_DURATION;

/// Transitions the backpressure diagnostics listener keeps for late readers
/// and buffers per subscriber: a dashboard that falls further behind sees
/// that it lagged instead of slowing the queue.
pub const BACKPRESSURE_TRANSITIONS_KEPT: usize = 256;

/// Batches a queue keeps in flight to its replicator before it coalesces
/// new commands into one open batch. Eight overlap enough round trips to
/// keep the hub's group commit fed (each of its transactions takes every
/// batch that arrived meanwhile), while commands arriving during a full
/// window share one batch, so a busy shard sends fewer, larger batches.
pub const REPLICATION_WINDOW: usize = 8;

/// Most events the open batch collects while the window is full. Past it,
/// enqueues are refused with RESOURCE_EXHAUSTED and other commands wait for
/// room: the memory a stalled log can pin per shard is this batch plus the
/// window. Half the hub's 10,000 events per batch, so a command's own
/// events (at most a few hundred) still fit.
pub const OPEN_BATCH_MAX_EVENTS: usize = 5_000;

/// Most bytes (estimated from the events' bodies and strings) the open
/// batch collects while the window is full; with the largest single command
/// (a restore, up to 16 MiB) added it stays under the hub's 24 MiB batch.
pub const OPEN_BATCH_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Events read per page when a queue rebuilds from its log: large enough
/// that a million-event replay is a few hundred round trips, small enough
/// that a page stays a few megabytes.
pub const RECOVERY_PAGE_EVENTS: usize = 5_000;

/// Events after which a node writes a snapshot of a queue to its log. A
/// rebuild replays at most this many events after loading the snapshot
/// (about 20 ms of apply), and retention can trim everything older.
pub const SNAPSHOT_EVERY_EVENTS: u64 = 10_000;

/// Longest a node waits before snapshotting a queue that changed at all,
/// so a quiet shard's log is trimmed too.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(300);

/// How long a node's lease on a shard lasts without renewal: the longest a
/// shard goes unserved after its owner dies (a successor can acquire it
/// once the lease lapsed), and the shortest pause that does not cost a
/// healthy owner its shards. Ten seconds is a third of Kafka's default
/// session timeout and survives two missed renewals at a third of it.
pub const SHARD_LEASE_TTL: Duration = Duration::from_secs(10);

/// Events the sidecar's in-memory replicator keeps per shard: ten times the
/// snapshot interval, so a rebuild always finds its snapshot's tail, and a
/// long-running node's memory stays bounded.
pub const MEMORY_RETENTION_EVENTS: usize = 100_000;

/// Most item ids one `PurgeDrained` call names: an id is 32 characters, so
/// 10,000 keep the request (about 360 KB) and its event far below their
/// limits; a larger drain is purged in several calls.
pub const PURGE_DRAINED_MAX: usize = 10_000;

/// Stale entries the queue's lazily-deleted heaps (ready items, lease
/// expiries) may hold beyond twice their live entries before they are
/// compacted: compaction is linear, so the slack makes it rare for small
/// queues, and the factor of two keeps its cost amortized constant per entry
/// and memory within three times the live size.
pub(crate) const INDEX_STALE_SLACK: usize = 64;
