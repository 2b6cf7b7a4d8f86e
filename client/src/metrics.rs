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
