//! Queue metrics, recorded through the `metrics` crate and labelled by shard.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `omnirelay_resourcelease_pending` | gauge | items waiting to be leased |
//! | `omnirelay_resourcelease_active` | gauge | items leased |
//! | `omnirelay_resourcelease_dead_letters` | gauge | items in the dead-letter list |
//! | `omnirelay_resourcelease_backpressure_transitions_total` | counter | backpressure flips |
//! | `omnirelay_resourcelease_expired_total` | counter | leases that lapsed |
//! | `omnirelay_resourcelease_dead_lettered_total` | counter | items dead-lettered |
//! | `omnirelay_resourcelease_lease_wait_seconds` | histogram | time a granted `lease` call waited |
//! | `omnirelay_resourcelease_replication_events_total` | counter | events the replicator acknowledged as durable |
//! | `omnirelay_resourcelease_replication_batches_in_flight` | gauge | batches sent and not yet acknowledged |
//! | `omnirelay_resourcelease_replication_append_seconds` | histogram | from sending a batch to its acknowledgement |
//! | `omnirelay_resourcelease_replication_retries_total` | counter | batches the hub replicator sent again (same producer sequence) |
//! | `omnirelay_resourcelease_replication_lag_events` | gauge | events decided (and applied) but not yet durable |
//! | `omnirelay_resourcelease_replication_lag_seconds` | gauge | age of the oldest batch not yet durable |
//! | `omnirelay_resourcelease_replication_fenced_total` | counter | times the shard fenced itself, by `reason` |
//! | `omnirelay_resourcelease_recovery_seconds` | histogram | rebuilding the queue from its log (snapshot plus tail) |
//! | `omnirelay_resourcelease_snapshots_total` | counter | snapshots written to the log, by `outcome` |
//! | `omnirelay_resourcelease_backpressure_active` | gauge | 1 while under backpressure (sampled when a node's `/metrics` is read) |
//! | `omnirelay_resourcelease_high_watermark` | gauge | the queue's high watermark (sampled likewise) |
//! | `omnirelay_rpc_duration_seconds{procedure,outcome}` | histogram | one unary call through the mesh middleware (`outcome`: `ok` or `error`) |
//!
//! Handles are registered once per queue, when it is built: install the
//! recorder (for example `metrics-exporter-prometheus`) before building
//! queues, or their metrics go nowhere.

use metrics::{Counter, Gauge, Histogram};

use crate::ids::ShardId;

/// Gauge: items waiting to be leased, per shard.
pub const PENDING: &str = "omnirelay_resourcelease_pending";
/// Gauge: items leased, per shard.
pub const ACTIVE: &str = "omnirelay_resourcelease_active";
/// Gauge: items in the dead-letter list, per shard.
pub const DEAD_LETTERS: &str = "omnirelay_resourcelease_dead_letters";
/// Counter: backpressure transitions, per shard.
pub const BACKPRESSURE_TRANSITIONS: &str = "omnirelay_resourcelease_backpressure_transitions_total";
/// Counter: expired leases, per shard.
pub const EXPIRED: &str = "omnirelay_resourcelease_expired_total";
/// Counter: dead-lettered items, per shard.
pub const DEAD_LETTERED: &str = "omnirelay_resourcelease_dead_lettered_total";
/// Histogram: seconds a granted `lease` call waited for its item, per shard.
pub const LEASE_WAIT: &str = "omnirelay_resourcelease_lease_wait_seconds";

/// Counter: events acknowledged as durable by the replicator, per shard.
pub const REPLICATION_EVENTS: &str = "omnirelay_resourcelease_replication_events_total";
/// Gauge: batches sent to the replicator and not yet acknowledged, per shard.
pub const REPLICATION_IN_FLIGHT: &str = "omnirelay_resourcelease_replication_batches_in_flight";
/// Histogram: seconds from sending a batch to its acknowledgement, per shard.
pub const REPLICATION_APPEND: &str = "omnirelay_resourcelease_replication_append_seconds";
/// Counter: batches sent again with the same producer sequence, per shard.
pub const REPLICATION_RETRIES: &str = "omnirelay_resourcelease_replication_retries_total";
/// Gauge: events decided and applied but not yet durable, per shard.
pub const REPLICATION_LAG_EVENTS: &str = "omnirelay_resourcelease_replication_lag_events";
/// Gauge: seconds the oldest not-yet-durable batch has waited, per shard.
pub const REPLICATION_LAG_SECONDS: &str = "omnirelay_resourcelease_replication_lag_seconds";
/// Counter: times a shard fenced itself, per shard and `reason`.
pub const REPLICATION_FENCED: &str = "omnirelay_resourcelease_replication_fenced_total";
/// Histogram: seconds a rebuild from the log took, per shard.
pub const RECOVERY: &str = "omnirelay_resourcelease_recovery_seconds";
/// Counter: snapshots, per shard and `outcome` (`written`, `failed`, `too_large`).
pub const SNAPSHOTS: &str = "omnirelay_resourcelease_snapshots_total";
/// Gauge: 1 while the queue is under backpressure, else 0, per shard.
pub const BACKPRESSURE_ACTIVE: &str = "omnirelay_resourcelease_backpressure_active";
/// Gauge: the queue's high watermark, per shard (alerts compare pending with it).
pub const HIGH_WATERMARK: &str = "omnirelay_resourcelease_high_watermark";
/// Histogram: seconds per unary call through the mesh middleware, by
/// `procedure` and `outcome` (`ok` or `error`); session messages are not in it.
pub const RPC_DURATION: &str = "omnirelay_rpc_duration_seconds";

/// Latency buckets in seconds for the node's histograms: from a millisecond
/// (a call answered from memory) to a minute (a long-poll's wait).
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Samples a queue's backpressure state into [`BACKPRESSURE_ACTIVE`] and
/// [`HIGH_WATERMARK`] (gauges read at scrape time rather than kept current).
pub fn record_backpressure(signal: &crate::backpressure::BackpressureSignal) {
    let shard = signal.shard.to_string();
    metrics::gauge!(BACKPRESSURE_ACTIVE, SHARD_LABEL => shard.clone()).set(if signal.active { 1.0 } else { 0.0 });
    metrics::gauge!(HIGH_WATERMARK, SHARD_LABEL => shard).set(signal.high as f64);
}

/// The label every queue metric carries.
pub const SHARD_LABEL: &str = "shard";

/// One queue's metric handles.
#[derive(Clone)]
pub(crate) struct QueueMetrics {
    pub(crate) pending: Gauge,
    pub(crate) active: Gauge,
    pub(crate) dead_letters: Gauge,
    pub(crate) backpressure_transitions: Counter,
    pub(crate) expired: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) lease_wait: Histogram,
    pub(crate) replicated: Counter,
    pub(crate) in_flight: Gauge,
    pub(crate) append: Histogram,
    pub(crate) lag_events: Gauge,
    pub(crate) lag_seconds: Gauge,
}

impl QueueMetrics {
    /// Registers the handles of `shard`'s queue, and its fence counter at
    /// zero for each of `fence_reasons` (the queue's `FenceReason` labels,
    /// passed in so this catalog stays below the queue).
    pub(crate) fn new(shard: &ShardId, fence_reasons: impl IntoIterator<Item = &'static str>) -> Self {
        let shard = shard.to_string();
        let handles = Self {
            pending: metrics::gauge!(PENDING, SHARD_LABEL => shard.clone()),
            active: metrics::gauge!(ACTIVE, SHARD_LABEL => shard.clone()),
            dead_letters: metrics::gauge!(DEAD_LETTERS, SHARD_LABEL => shard.clone()),
            backpressure_transitions: metrics::counter!(BACKPRESSURE_TRANSITIONS, SHARD_LABEL => shard.clone()),
            expired: metrics::counter!(EXPIRED, SHARD_LABEL => shard.clone()),
            dead_lettered: metrics::counter!(DEAD_LETTERED, SHARD_LABEL => shard.clone()),
            lease_wait: metrics::histogram!(LEASE_WAIT, SHARD_LABEL => shard.clone()),
            replicated: metrics::counter!(REPLICATION_EVENTS, SHARD_LABEL => shard.clone()),
            in_flight: metrics::gauge!(REPLICATION_IN_FLIGHT, SHARD_LABEL => shard.clone()),
            append: metrics::histogram!(REPLICATION_APPEND, SHARD_LABEL => shard.clone()),
            lag_events: metrics::gauge!(REPLICATION_LAG_EVENTS, SHARD_LABEL => shard.clone()),
            lag_seconds: metrics::gauge!(REPLICATION_LAG_SECONDS, SHARD_LABEL => shard.clone()),
        };
        // Counters bumped elsewhere (the hub replicator, fences) exist from
        // the start, at zero, so dashboards and alerts see every series.
        metrics::counter!(REPLICATION_RETRIES, SHARD_LABEL => shard.clone()).increment(0);
        for reason in fence_reasons {
            metrics::counter!(REPLICATION_FENCED, SHARD_LABEL => shard.clone(), "reason" => reason).increment(0);
        }
        handles
    }
}
