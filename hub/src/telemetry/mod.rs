//! Logs and metrics: the hub's metric catalog (names in one place) and its
//! label vocabularies ([`AppendOutcome`], [`DbOperation`], [`ReadPurpose`],
//! [`Fault`]), the recording functions, the Prometheus recorder behind
//! `/metrics`, and the counters tests and benchmarks read in-process;
//! [`traces`] holds the request span and the tracing subscriber with its
//! optional OTLP export.
//!
//! Telemetry sits below the store: it names no store type, and the store
//! classifies its own results into these vocabularies
//! ([`AppendOutcome::of`], [`Fault::of`]) and records through the functions
//! here.
//!
//! Names follow DESIGN.md §7: `omnirelay_hub_*`, base units (seconds),
//! counters end in `_total`.
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `omnirelay_hub_append_batches_total{outcome}` | counter | batches answered, by [`AppendOutcome`] |
//! | `omnirelay_hub_append_events_total` | counter | events durably appended (not retries) |
//! | `omnirelay_hub_append_latency_seconds` | histogram | receiving a batch to answering it |
//! | `omnirelay_hub_group_commit_batches` | histogram | batches per group commit |
//! | `omnirelay_hub_group_commit_events` | histogram | events per group commit |
//! | `omnirelay_hub_group_commit_seconds` | histogram | one group commit, queue to answer |
//! | `omnirelay_hub_append_predictions_total{outcome}` | counter | predicted append groups: `hit`, or `refused` by the fence and redone with locks |
//! | `omnirelay_hub_db_reads_total{purpose}` | counter | event-range queries: `tail` (shared live tail), `catch_up` (one subscriber) or `range` |
//! | `omnirelay_hub_events_delivered_total` | counter | events sent to subscribers |
//! | `omnirelay_hub_subscribers` | gauge | open subscriptions on this replica |
//! | `omnirelay_hub_subscription_memory_bytes` | gauge | bytes held for subscriptions (queued frames, allowances, the live tails' recent events) |
//! | `omnirelay_hub_subscription_memory_limit_bytes` | gauge | `--subscription-memory` |
//! | `omnirelay_hub_subscriptions_ended_total{reason}` | counter | subscriptions ended or refused by the hub: `memory` (furthest behind when memory ran short), `stalled`, `refused` (no memory to admit it) |
//! | `omnirelay_hub_tail_feeds` | gauge | live-tail feeds (followed shards) on this replica |
//! | `omnirelay_hub_subscriber_lag_events{subscriber,shard}` | gauge | events between a shard's head and what a subscriber was sent |
//! | `omnirelay_hub_db_latency_seconds{operation}` | histogram | store operations, by [`DbOperation`] |
//! | `omnirelay_hub_db_errors_total{operation}` | counter | store operations that failed |
//! | `omnirelay_hub_store_unavailable_total{fault}` | counter | requests and batches answered UNAVAILABLE because of the store, by [`Fault`] |
//! | `omnirelay_hub_db_pool_connections` | gauge | connections the PostgreSQL pool holds |
//! | `omnirelay_hub_db_pool_available` | gauge | idle pooled connections |
//! | `omnirelay_hub_db_pool_waiting` | gauge | requests waiting for a connection |
//! | `omnirelay_hub_db_pool_max_connections` | gauge | the pool's maximum |
//! | `omnirelay_hub_ready` | gauge | 1 when ready (store reachable, schema current, not shutting down) |
//! | `omnirelay_hub_tls_handshake_failures_total{reason}` | counter | TLS connections refused |
//!
//! The recorder is process-global (the `metrics` facade has one):
//! [`prometheus`] installs it on first use and returns a handle that renders
//! the text exposition format, served on the admin server's own route; the
//! exporter never opens a listener of its own.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use omnirelay_proto::hub::v1::AppendErrorCode;

pub mod traces;

/// Batches answered, by outcome.
pub const APPEND_BATCHES: &str = "omnirelay_hub_append_batches_total";
/// Events durably appended.
pub const APPEND_EVENTS: &str = "omnirelay_hub_append_events_total";
/// Predicted append groups, by outcome (`hit`, `refused`).
pub const APPEND_PREDICTIONS: &str = "omnirelay_hub_append_predictions_total";
/// Time from receiving an append batch to answering it.
pub const APPEND_LATENCY: &str = "omnirelay_hub_append_latency_seconds";
/// Gauge: live-tail feeds this replica runs (one per followed shard).
pub const TAIL_FEEDS: &str = "omnirelay_hub_tail_feeds";
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
/// Gauge: bytes held for subscriptions, from the subscription memory budget.
pub const SUBSCRIPTION_MEMORY: &str = "omnirelay_hub_subscription_memory_bytes";
/// Gauge: the subscription memory budget (`--subscription-memory`).
pub const SUBSCRIPTION_MEMORY_LIMIT: &str = "omnirelay_hub_subscription_memory_limit_bytes";
/// Subscriptions the hub ended or refused, by `reason`: `memory`,
/// `stalled`, `refused`.
pub const SUBSCRIPTIONS_ENDED: &str = "omnirelay_hub_subscriptions_ended_total";
/// Events between a shard's head and a subscriber's position, by
/// `subscriber` and `shard`.
pub const SUBSCRIBER_LAG_EVENTS: &str = "omnirelay_hub_subscriber_lag_events";
/// Duration of store operations, by `operation`.
pub const DB_LATENCY: &str = "omnirelay_hub_db_latency_seconds";
/// Store operations that failed, by `operation`.
pub const DB_ERRORS: &str = "omnirelay_hub_db_errors_total";
/// Requests and append batches answered UNAVAILABLE because of the store,
/// by `fault` (disk full, read-only, I/O, timeout, unreachable, ...).
pub const STORE_UNAVAILABLE: &str = "omnirelay_hub_store_unavailable_total";
/// Connections the pool holds (idle and in use).
pub const DB_POOL_CONNECTIONS: &str = "omnirelay_hub_db_pool_connections";
/// Idle connections in the pool.
pub const DB_POOL_AVAILABLE: &str = "omnirelay_hub_db_pool_available";
/// Requests waiting for a pooled connection.
pub const DB_POOL_WAITING: &str = "omnirelay_hub_db_pool_waiting";
/// The pool's configured maximum.
pub const DB_POOL_MAX: &str = "omnirelay_hub_db_pool_max_connections";
/// 1 when the replica is ready, else 0.
pub const READY: &str = "omnirelay_hub_ready";
/// TLS connections refused, by `reason`: `timeout`, `handshake` (bad or
/// missing client certificate, protocol error) or `principal` (no usable
/// subject alternative name).
pub const TLS_HANDSHAKE_FAILURES: &str = "omnirelay_hub_tls_handshake_failures_total";

/// Label: outcome of an append batch.
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: why events were read.
pub const LABEL_PURPOSE: &str = "purpose";
/// Label: store operation.
pub const LABEL_OPERATION: &str = "operation";
/// Label: subscriber id.
pub const LABEL_SUBSCRIBER: &str = "subscriber";
/// Label: shard id.
pub const LABEL_SHARD: &str = "shard";
/// Label: why something was refused.
pub const LABEL_REASON: &str = "reason";
/// Label: the kind of store outage ([`Fault::label`]).
pub const LABEL_FAULT: &str = "fault";

/// How an append batch ended, the `outcome` label of [`APPEND_BATCHES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Written.
    Appended,
    /// A retry of a batch already written; nothing new written.
    Duplicate,
    /// Rejected: the epoch is not the shard's current one.
    StaleEpoch,
    /// Rejected: the shard has no lease holder.
    NoLease,
    /// Rejected: the producer sequence skips ahead.
    OutOfOrder,
    /// Rejected: the batch expected another first sequence than the shard's
    /// next.
    HeadMismatch,
    /// Rejected: malformed.
    Invalid,
    /// Failed: the store is unavailable, overloaded or closing.
    Unavailable,
    /// Failed otherwise (a bug or corruption).
    Failed,
}

impl AppendOutcome {
    /// Every outcome, to pre-register the counter's series.
    pub const ALL: [AppendOutcome; 9] = [
        AppendOutcome::Appended,
        AppendOutcome::Duplicate,
        AppendOutcome::StaleEpoch,
        AppendOutcome::NoLease,
        AppendOutcome::OutOfOrder,
        AppendOutcome::HeadMismatch,
        AppendOutcome::Invalid,
        AppendOutcome::Unavailable,
        AppendOutcome::Failed,
    ];

    /// The error code a producer is answered with for this outcome
    /// (`AppendError.code`); `None` for the two that are not errors.
    /// [`AppendOutcome::Failed`] is `INTERNAL`.
    pub fn code(self) -> Option<AppendErrorCode> {
        Some(match self {
            AppendOutcome::Appended | AppendOutcome::Duplicate => return None,
            AppendOutcome::StaleEpoch => AppendErrorCode::StaleEpoch,
            AppendOutcome::NoLease => AppendErrorCode::NoLease,
            AppendOutcome::OutOfOrder => AppendErrorCode::OutOfOrder,
            AppendOutcome::HeadMismatch => AppendErrorCode::HeadMismatch,
            AppendOutcome::Invalid => AppendErrorCode::Invalid,
            AppendOutcome::Unavailable => AppendErrorCode::Unavailable,
            AppendOutcome::Failed => AppendErrorCode::Internal,
        })
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            AppendOutcome::Appended => "appended",
            AppendOutcome::Duplicate => "duplicate",
            AppendOutcome::StaleEpoch => "stale_epoch",
            AppendOutcome::NoLease => "no_lease",
            AppendOutcome::OutOfOrder => "out_of_order",
            AppendOutcome::HeadMismatch => "head_mismatch",
            AppendOutcome::Invalid => "invalid",
            AppendOutcome::Unavailable => "unavailable",
            AppendOutcome::Failed => "failed",
        }
    }
}

/// What kind of outage made a store operation fail as
/// [`StoreError::Unavailable`](crate::store::StoreError::Unavailable): a closed set, so answers to clients can
/// name it with fixed text (never a driver's message) and metrics can label
/// it. The full cause goes to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The disk under the database is full (SQLite's "database or disk is
    /// full", PostgreSQL's `disk_full`).
    DiskFull,
    /// The database cannot be written: a read-only file, or a PostgreSQL
    /// server in read-only mode (a standby).
    ReadOnly,
    /// The database reported an I/O error.
    Io,
    /// The database did not answer within its deadline.
    Timeout,
    /// The database cannot be reached, or is shutting down or starting up.
    Unreachable,
    /// The database is out of connections or memory.
    Exhausted,
    /// Anything else.
    Other,
}

impl Fault {
    /// Every fault, to pre-register metric series.
    pub const ALL: [Fault; 7] = [
        Fault::DiskFull,
        Fault::ReadOnly,
        Fault::Io,
        Fault::Timeout,
        Fault::Unreachable,
        Fault::Exhausted,
        Fault::Other,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Fault::DiskFull => "disk_full",
            Fault::ReadOnly => "read_only",
            Fault::Io => "io",
            Fault::Timeout => "timeout",
            Fault::Unreachable => "unreachable",
            Fault::Exhausted => "exhausted",
            Fault::Other => "other",
        }
    }

    /// The cause as told to clients and operators.
    pub fn describe(self) -> &'static str {
        match self {
            Fault::DiskFull => "database or disk is full",
            Fault::ReadOnly => "the database is read-only",
            Fault::Io => "the database had an I/O error",
            Fault::Timeout => "the database did not answer in time",
            Fault::Unreachable => "the database cannot be reached",
            Fault::Exhausted => "the database is out of connections or memory",
            Fault::Other => "the database failed",
        }
    }

    /// Whether this fault stops writes while reads may still work, so that
    /// a replica seeing it on appends is not ready even though its read
    /// probe passes.
    pub fn blocks_writes(self) -> bool {
        matches!(self, Fault::DiskFull | Fault::ReadOnly | Fault::Io)
    }
}

/// A store operation, the `operation` label of [`DB_LATENCY`] and
/// [`DB_ERRORS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbOperation {
    /// One group-commit transaction of append batches.
    Append,
    /// A catch-up, tail or replay read of a range of events.
    ReadRange,
    /// Reading or committing checkpoints.
    Checkpoint,
    /// Acquiring, renewing, releasing or reading shard leases and state.
    ShardLease,
    /// Storing or reading a snapshot.
    Snapshot,
    /// Trimming events below the retention floor.
    Retention,
    /// The readiness probe.
    Probe,
}

impl DbOperation {
    /// Every operation, to pre-register the series.
    pub const ALL: [DbOperation; 7] = [
        DbOperation::Append,
        DbOperation::ReadRange,
        DbOperation::Checkpoint,
        DbOperation::ShardLease,
        DbOperation::Snapshot,
        DbOperation::Retention,
        DbOperation::Probe,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DbOperation::Append => "append",
            DbOperation::ReadRange => "read_range",
            DbOperation::Checkpoint => "checkpoint",
            DbOperation::ShardLease => "shard_lease",
            DbOperation::Snapshot => "snapshot",
            DbOperation::Retention => "retention",
            DbOperation::Probe => "probe",
        }
    }
}

/// Records one store operation's duration, and its failure if it failed.
pub fn record_db_operation(operation: DbOperation, elapsed: Duration, ok: bool) {
    metrics::histogram!(DB_LATENCY, LABEL_OPERATION => operation.label()).record(elapsed.as_secs_f64());
    if !ok {
        metrics::counter!(DB_ERRORS, LABEL_OPERATION => operation.label()).increment(1);
    }
}

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
    /// Every purpose, to pre-register the series.
    pub const ALL: [ReadPurpose; 3] = [ReadPurpose::Tail, ReadPurpose::CatchUp, ReadPurpose::Range];

    /// The label value.
    pub fn label(self) -> &'static str {
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
        metrics::counter!(DB_READS, LABEL_PURPOSE => purpose.label()).increment(1);
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

/// The lag gauge of one subscriber on one shard ([`SUBSCRIBER_LAG_EVENTS`]),
/// reset to zero when the follower it belongs to goes away (the subscriber
/// disconnected from this replica, which no longer knows its lag).
pub(crate) struct SubscriberLag(metrics::Gauge);

impl SubscriberLag {
    pub(crate) fn new(subscriber: &crate::log::ids::SubscriberId, shard: &crate::log::ids::ShardId) -> Self {
        Self(metrics::gauge!(
            SUBSCRIBER_LAG_EVENTS,
            LABEL_SUBSCRIBER => subscriber.to_string(),
            LABEL_SHARD => shard.to_string()
        ))
    }

    /// Records the events between the shard's head and the last delivered.
    pub(crate) fn set(&self, head: crate::log::ids::Sequence, delivered: crate::log::ids::Sequence) {
        self.0.set(head.0.saturating_sub(delivered.0) as f64);
    }
}

impl Drop for SubscriberLag {
    fn drop(&mut self) {
        self.0.set(0.0);
    }
}

/// Counts an answer that the store is unavailable, by its fault.
pub(crate) fn store_unavailable(fault: Fault) {
    metrics::counter!(STORE_UNAVAILABLE, LABEL_FAULT => fault.label()).increment(1);
}

/// Records one group commit.
pub(crate) fn group_committed(batches: usize, events: usize, took: Duration) {
    metrics::histogram!(GROUP_BATCHES).record(batches as f64);
    metrics::histogram!(GROUP_EVENTS).record(events as f64);
    metrics::histogram!(GROUP_SECONDS).record(took.as_secs_f64());
}

/// Records whether a committer's predicted append group was written (`hit`)
/// or refused by PostgreSQL's fence and redone with locks (`refused`).
pub(crate) fn append_predicted(written: bool) {
    let outcome = if written { "hit" } else { "refused" };
    metrics::counter!(APPEND_PREDICTIONS, LABEL_OUTCOME => outcome).increment(1);
}

/// Records one answered batch of `events` events.
pub(crate) fn batch_answered(outcome: AppendOutcome, events: usize) {
    if outcome == AppendOutcome::Appended {
        metrics::counter!(APPEND_EVENTS).increment(events as u64);
    }
    metrics::counter!(APPEND_BATCHES, LABEL_OUTCOME => outcome.label()).increment(1);
}

/// Latency buckets in seconds: from half a millisecond (a group commit on a
/// local disk) to ten seconds (a pool wait timing out).
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Group sizes: powers of two up to the group limits
/// ([`crate::defaults::MAX_GROUP_BATCHES`], [`crate::defaults::MAX_GROUP_EVENTS`]).
const GROUP_SIZE_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the global recorder and
/// describing the catalog on first use.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS.get_or_init(install).clone()
}

fn install() -> PrometheusHandle {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|builder| builder.set_buckets_for_metric(Matcher::Full(GROUP_BATCHES.into()), GROUP_SIZE_BUCKETS))
        .and_then(|builder| builder.set_buckets_for_metric(Matcher::Full(GROUP_EVENTS.into()), GROUP_SIZE_BUCKETS))
        .expect("the bucket lists are constant and not empty")
        .build_recorder();
    let handle = recorder.handle();
    if let Err(err) = metrics::set_global_recorder(recorder) {
        // Someone embedding the hub installed their own recorder first; the
        // hub's metrics then go there and /metrics renders only this
        // (empty) registry.
        tracing::warn!(error = %err, "a metrics recorder was already installed; /metrics will be empty");
    }
    describe_catalog();
    handle
}

/// Describes every metric and registers the series that exist from the
/// start (zero counters, empty histograms), so dashboards and alerts see
/// the whole catalog before the first event.
fn describe_catalog() {
    describe_counter!(APPEND_BATCHES, Unit::Count, "Append batches answered, by outcome.");
    describe_counter!(APPEND_EVENTS, Unit::Count, "Events durably appended.");
    describe_counter!(
        APPEND_PREDICTIONS,
        Unit::Count,
        "Predicted append groups (one round trip), by outcome: hit, or refused by the fence and redone with locks."
    );
    describe_histogram!(APPEND_LATENCY, Unit::Seconds, "Time from receiving an append batch to answering it.");
    describe_histogram!(GROUP_BATCHES, Unit::Count, "Append batches committed in one transaction.");
    describe_histogram!(GROUP_EVENTS, Unit::Count, "Events committed in one transaction.");
    describe_histogram!(GROUP_SECONDS, Unit::Seconds, "Duration of one group commit, queue to answer.");
    describe_counter!(DB_READS, Unit::Count, "Event-range queries, by purpose.");
    describe_counter!(EVENTS_DELIVERED, Unit::Count, "Events delivered to subscribers.");
    describe_gauge!(TAIL_FEEDS, Unit::Count, "Live-tail feeds on this replica (shards followed by its subscribers).");
    describe_gauge!(SUBSCRIBERS, Unit::Count, "Open Subscribe streams on this replica.");
    describe_gauge!(SUBSCRIBER_LAG_EVENTS, Unit::Count, "Events between a shard's head and a subscriber's position.");
    describe_gauge!(SUBSCRIPTION_MEMORY, Unit::Bytes, "Bytes held for subscriptions, within --subscription-memory.");
    describe_gauge!(SUBSCRIPTION_MEMORY_LIMIT, Unit::Bytes, "The subscription memory budget, --subscription-memory.");
    describe_counter!(
        SUBSCRIPTIONS_ENDED,
        Unit::Count,
        "Subscriptions ended or refused by the hub, by reason: memory, stalled, refused."
    );
    describe_histogram!(DB_LATENCY, Unit::Seconds, "Duration of store operations, by operation.");
    describe_counter!(DB_ERRORS, Unit::Count, "Store operations that failed, by operation.");
    describe_counter!(
        STORE_UNAVAILABLE,
        Unit::Count,
        "Requests and append batches answered UNAVAILABLE because of the store, by fault."
    );
    describe_gauge!(DB_POOL_CONNECTIONS, Unit::Count, "Connections the PostgreSQL pool holds.");
    describe_gauge!(DB_POOL_AVAILABLE, Unit::Count, "Idle connections in the PostgreSQL pool.");
    describe_gauge!(DB_POOL_WAITING, Unit::Count, "Requests waiting for a pooled connection.");
    describe_gauge!(DB_POOL_MAX, Unit::Count, "Maximum connections of the PostgreSQL pool.");
    describe_gauge!(READY, Unit::Count, "1 when the replica is ready to serve, else 0.");
    describe_counter!(TLS_HANDSHAKE_FAILURES, Unit::Count, "TLS connections refused, by reason.");

    for outcome in AppendOutcome::ALL {
        metrics::counter!(APPEND_BATCHES, LABEL_OUTCOME => outcome.label()).absolute(0);
    }
    metrics::counter!(APPEND_EVENTS).absolute(0);
    for outcome in ["hit", "refused"] {
        metrics::counter!(APPEND_PREDICTIONS, LABEL_OUTCOME => outcome).absolute(0);
    }
    for histogram in [APPEND_LATENCY, GROUP_BATCHES, GROUP_EVENTS, GROUP_SECONDS] {
        let _ = metrics::histogram!(histogram);
    }
    for purpose in ReadPurpose::ALL {
        metrics::counter!(DB_READS, LABEL_PURPOSE => purpose.label()).absolute(0);
    }
    metrics::counter!(EVENTS_DELIVERED).absolute(0);
    metrics::gauge!(SUBSCRIBERS).set(0.0);
    for reason in ["memory", "stalled", "refused"] {
        metrics::counter!(SUBSCRIPTIONS_ENDED, LABEL_REASON => reason).absolute(0);
    }
    for operation in DbOperation::ALL {
        let _ = metrics::histogram!(DB_LATENCY, LABEL_OPERATION => operation.label());
        metrics::counter!(DB_ERRORS, LABEL_OPERATION => operation.label()).absolute(0);
    }
    for fault in Fault::ALL {
        metrics::counter!(STORE_UNAVAILABLE, LABEL_FAULT => fault.label()).absolute(0);
    }
    metrics::gauge!(READY).set(0.0);
    for reason in ["timeout", "handshake", "principal"] {
        metrics::counter!(TLS_HANDSHAKE_FAILURES, LABEL_REASON => reason).absolute(0);
    }
}
