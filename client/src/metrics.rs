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
    pub(crate) fn new(shard: &ShardId) -> Self {
        let shard = shard.to_string();
        Self {
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
            lag_seconds: metrics::gauge!(REPLICATION_LAG_SECONDS, SHARD_LABEL => shard),
        }
    }
}
