//! The hub's metrics: names in one place, recorded through the `metrics`
//! facade (exported by whatever recorder the binary installs), and the
//! counters tests and benchmarks read in-process.
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `omnirelay_hub_append_batches_total{outcome}` | counter | batches answered, by outcome |
//! | `omnirelay_hub_append_events_total` | counter | events durably appended (not retries) |
//! | `omnirelay_hub_group_commit_batches` | histogram | batches per group commit |
//! | `omnirelay_hub_group_commit_events` | histogram | events per group commit |
//! | `omnirelay_hub_group_commit_seconds` | histogram | one group commit, queue to answer |
//! | `omnirelay_hub_db_reads_total{purpose}` | counter | event-range queries: `tail` (shared live tail) or `catch_up` (one subscriber) |
//! | `omnirelay_hub_events_delivered_total` | counter | events sent to subscribers |
//! | `omnirelay_hub_subscribers` | gauge | open subscriptions |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::{AppendAck, StoreError};

/// Batches answered, by outcome.
pub const APPEND_BATCHES: &str = "omnirelay_hub_append_batches_total";
/// Events durably appended.
pub const APPEND_EVENTS: &str = "omnirelay_hub_append_events_total";
/// Batches per group commit.
pub const GROUP_BATCHES: &str = "omnirelay_hub_group_commit_batches";
/// Events per group commit.
pub const GROUP_EVENTS: &str = "omnirelay_hub_group_commit_events";
/// Duration of a group commit.
pub const GROUP_SECONDS: &str = "omnirelay_hub_group_commit_seconds";
/// Event-range queries, by purpose.
pub const DB_READS: &str = "omnirelay_hub_db_reads_total";
/// Events delivered to subscribers.
pub const EVENTS_DELIVERED: &str = "omnirelay_hub_events_delivered_total";
/// Open subscriptions.
pub const SUBSCRIBERS: &str = "omnirelay_hub_subscribers";

/// Why the hub read events from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPurpose {
    /// The shared live tail of a shard (once per replica, whatever the number
    /// of subscribers).
    Tail,
    /// One subscriber catching up (or falling back after lagging).
    CatchUp,
    /// A `ReadRange` request or a verification walk.
    Range,
}

impl ReadPurpose {
    fn label(self) -> &'static str {
        match self {
            ReadPurpose::Tail => "tail",
            ReadPurpose::CatchUp => "catch_up",
            ReadPurpose::Range => "range",
        }
    }
}

/// In-process counters of one hub, mirrored to the metrics facade; tests and
/// benchmarks read them to check that reads grow with events, not with
/// subscribers.
#[derive(Debug, Default)]
pub struct HubCounters {
    tail_reads: AtomicU64,
    catch_up_reads: AtomicU64,
    range_reads: AtomicU64,
    events_delivered: AtomicU64,
}

/// A copy of [`HubCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Event-range queries made by the shared live tails.
    pub tail_reads: u64,
    /// Event-range queries made by subscribers catching up.
    pub catch_up_reads: u64,
    /// Event-range queries made for `ReadRange` and verification.
    pub range_reads: u64,
    /// Events sent to subscribers.
    pub events_delivered: u64,
}

impl HubCounters {
    /// Counts one event-range query.
    pub fn read(&self, purpose: ReadPurpose) {
        let counter = match purpose {
            ReadPurpose::Tail => &self.tail_reads,
            ReadPurpose::CatchUp => &self.catch_up_reads,
            ReadPurpose::Range => &self.range_reads,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(DB_READS, "purpose" => purpose.label()).increment(1);
    }

    /// Counts events sent to a subscriber.
    pub fn delivered(&self, events: u64) {
        self.events_delivered.fetch_add(events, Ordering::Relaxed);
        metrics::counter!(EVENTS_DELIVERED).increment(events);
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            tail_reads: self.tail_reads.load(Ordering::Relaxed),
            catch_up_reads: self.catch_up_reads.load(Ordering::Relaxed),
            range_reads: self.range_reads.load(Ordering::Relaxed),
            events_delivered: self.events_delivered.load(Ordering::Relaxed),
        }
    }
}

/// Records one group commit.
pub(crate) fn group_committed(batches: usize, events: usize, took: Duration) {
    metrics::histogram!(GROUP_BATCHES).record(batches as f64);
    metrics::histogram!(GROUP_EVENTS).record(events as f64);
    metrics::histogram!(GROUP_SECONDS).record(took.as_secs_f64());
}

/// Records one answered batch.
pub(crate) fn batch_answered(result: &Result<AppendAck, StoreError>, events: usize) {
    let outcome = match result {
        Ok(ack) if ack.duplicate => "duplicate",
        Ok(_) => {
            metrics::counter!(APPEND_EVENTS).increment(events as u64);
            "appended"
        }
        Err(StoreError::StaleEpoch { .. }) => "stale_epoch",
        Err(StoreError::NoLease { .. }) => "no_lease",
        Err(StoreError::OutOfOrder { .. }) => "out_of_order",
        Err(StoreError::Invalid(_)) => "invalid",
        Err(StoreError::Unavailable { .. } | StoreError::Overloaded { .. } | StoreError::Closed) => "unavailable",
        Err(_) => "failed",
    };
    metrics::counter!(APPEND_BATCHES, "outcome" => outcome).increment(1);
}
