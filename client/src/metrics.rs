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
            lease_wait: metrics::histogram!(LEASE_WAIT, SHARD_LABEL => shard),
        }
    }
}
