//! Logs and metrics: the hub's metric catalog, the Prometheus recorder, and
//! the tracing subscriber the binary installs.
//!
//! Every metric name is a constant in [`names`], so the code recording a
//! metric, the `/metrics` endpoint, the alert rules and the operations guide
//! use one spelling. Names follow DESIGN.md §7: `omnirelay_hub_*`, base
//! units (seconds), counters end in `_total`.
//!
//! The recorder is process-global (the `metrics` facade has one recorder):
//! [`prometheus`] installs it on first use and returns a handle that
//! renders the text exposition format. The hub serves it on its own admin
//! route; the exporter never opens a listener of its own.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::{LogArgs, LogFormat};

/// Metric names and label keys.
pub mod names {
    /// Append batches answered, by `outcome` (see [`super::AppendOutcome`]).
    pub const APPEND_BATCHES: &str = "omnirelay_hub_append_batches_total";
    /// Events durably appended (duplicates of retried batches excluded).
    pub const APPEND_EVENTS: &str = "omnirelay_hub_append_events_total";
    /// Time from receiving a batch to answering it, in seconds.
    pub const APPEND_LATENCY: &str = "omnirelay_hub_append_latency_seconds";
    /// Batches committed together in one transaction (group commit).
    pub const GROUP_COMMIT_BATCHES: &str = "omnirelay_hub_group_commit_batches";
    /// Open Subscribe streams on this replica.
    pub const SUBSCRIBERS: &str = "omnirelay_hub_subscribers";
    /// Events delivered to subscribers.
    pub const SUBSCRIBE_EVENTS: &str = "omnirelay_hub_subscribe_events_total";
    /// Catch-up reads from the store made for subscribers (compare with
    /// delivered events: reads must grow with events, not subscribers).
    pub const SUBSCRIBE_CATCHUP_READS: &str = "omnirelay_hub_subscribe_catchup_reads_total";
    /// Events between a shard's head and what a subscriber was sent, by
    /// `subscriber` and `shard`.
    pub const SUBSCRIBER_LAG_EVENTS: &str = "omnirelay_hub_subscriber_lag_events";
    /// Duration of store operations, in seconds, by `operation` (see
    /// [`super::DbOperation`]).
    pub const DB_LATENCY: &str = "omnirelay_hub_db_latency_seconds";
    /// Store operations that failed, by `operation`.
    pub const DB_ERRORS: &str = "omnirelay_hub_db_errors_total";
    /// Connections the pool holds (idle and in use).
    pub const DB_POOL_CONNECTIONS: &str = "omnirelay_hub_db_pool_connections";
    /// Idle connections in the pool.
    pub const DB_POOL_AVAILABLE: &str = "omnirelay_hub_db_pool_available";
    /// Requests waiting for a pooled connection.
    pub const DB_POOL_WAITING: &str = "omnirelay_hub_db_pool_waiting";
    /// The pool's configured maximum.
    pub const DB_POOL_MAX: &str = "omnirelay_hub_db_pool_max_connections";
    /// 1 when the replica is ready (store reachable, schema current, not
    /// shutting down), else 0.
    pub const READY: &str = "omnirelay_hub_ready";
    /// TLS connections refused, by `reason`: `timeout`, `handshake` (bad or
    /// missing client certificate, protocol error) or `principal` (no usable
    /// subject alternative name).
    pub const TLS_HANDSHAKE_FAILURES: &str = "omnirelay_hub_tls_handshake_failures_total";

    /// Label: outcome of an append batch.
    pub const LABEL_OUTCOME: &str = "outcome";
    /// Label: store operation.
    pub const LABEL_OPERATION: &str = "operation";
    /// Label: subscriber id.
    pub const LABEL_SUBSCRIBER: &str = "subscriber";
    /// Label: shard id.
    pub const LABEL_SHARD: &str = "shard";
    /// Label: why something was refused.
    pub const LABEL_REASON: &str = "reason";
}

/// How an append batch ended, the `outcome` label of
/// [`names::APPEND_BATCHES`]; mirrors the wire's `AppendErrorCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Written.
    Ok,
    /// A retry of a batch already written; nothing new written.
    Duplicate,
    /// Rejected: the epoch is not the shard's current one.
    StaleEpoch,
    /// Rejected: the shard has no lease at that epoch.
    NoLease,
    /// Rejected: malformed.
    Invalid,
    /// Failed: the store is unavailable.
    Unavailable,
}

impl AppendOutcome {
    /// Every outcome, to pre-register the counter's series.
    pub const ALL: [AppendOutcome; 6] = [
        AppendOutcome::Ok,
        AppendOutcome::Duplicate,
        AppendOutcome::StaleEpoch,
        AppendOutcome::NoLease,
        AppendOutcome::Invalid,
        AppendOutcome::Unavailable,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            AppendOutcome::Ok => "ok",
            AppendOutcome::Duplicate => "duplicate",
            AppendOutcome::StaleEpoch => "stale_epoch",
            AppendOutcome::NoLease => "no_lease",
            AppendOutcome::Invalid => "invalid",
            AppendOutcome::Unavailable => "unavailable",
        }
    }
}

/// A store operation, the `operation` label of [`names::DB_LATENCY`] and
/// [`names::DB_ERRORS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbOperation {
    /// One group-commit transaction of append batches.
    Append,
    /// A catch-up or replay read of a range of events.
    ReadRange,
    /// Reading or committing checkpoints.
    Checkpoint,
    /// Acquiring, renewing or releasing a shard lease.
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
pub fn record_db_operation(operation: DbOperation, elapsed: std::time::Duration, ok: bool) {
    metrics::histogram!(names::DB_LATENCY, names::LABEL_OPERATION => operation.label()).record(elapsed.as_secs_f64());
    if !ok {
        metrics::counter!(names::DB_ERRORS, names::LABEL_OPERATION => operation.label()).increment(1);
    }
}

/// Latency buckets in seconds: from half a millisecond (a group commit on a
/// local disk) to ten seconds (a pool wait timing out).
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Group-commit size buckets: powers of two up to the largest group worth
/// telling apart.
const GROUP_COMMIT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the global recorder and
/// describing the catalog on first use.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS.get_or_init(install).clone()
}

fn install() -> PrometheusHandle {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|builder| {
            builder.set_buckets_for_metric(Matcher::Full(names::GROUP_COMMIT_BATCHES.into()), GROUP_COMMIT_BUCKETS)
        })
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
    use names::*;
    describe_counter!(APPEND_BATCHES, Unit::Count, "Append batches answered, by outcome.");
    describe_counter!(APPEND_EVENTS, Unit::Count, "Events durably appended.");
    describe_histogram!(APPEND_LATENCY, Unit::Seconds, "Time from receiving an append batch to answering it.");
    describe_histogram!(GROUP_COMMIT_BATCHES, Unit::Count, "Append batches committed in one transaction.");
    describe_gauge!(SUBSCRIBERS, Unit::Count, "Open Subscribe streams on this replica.");
    describe_counter!(SUBSCRIBE_EVENTS, Unit::Count, "Events delivered to subscribers.");
    describe_counter!(SUBSCRIBE_CATCHUP_READS, Unit::Count, "Catch-up reads made for subscribers.");
    describe_gauge!(SUBSCRIBER_LAG_EVENTS, Unit::Count, "Events between a shard's head and a subscriber's position.");
    describe_histogram!(DB_LATENCY, Unit::Seconds, "Duration of store operations, by operation.");
    describe_counter!(DB_ERRORS, Unit::Count, "Store operations that failed, by operation.");
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
    let _ = metrics::histogram!(APPEND_LATENCY);
    let _ = metrics::histogram!(GROUP_COMMIT_BATCHES);
    metrics::gauge!(SUBSCRIBERS).set(0.0);
    metrics::counter!(SUBSCRIBE_EVENTS).absolute(0);
    metrics::counter!(SUBSCRIBE_CATCHUP_READS).absolute(0);
    for operation in DbOperation::ALL {
        let _ = metrics::histogram!(DB_LATENCY, LABEL_OPERATION => operation.label());
        metrics::counter!(DB_ERRORS, LABEL_OPERATION => operation.label()).absolute(0);
    }
    metrics::gauge!(READY).set(0.0);
    for reason in ["timeout", "handshake", "principal"] {
        metrics::counter!(TLS_HANDSHAKE_FAILURES, LABEL_REASON => reason).absolute(0);
    }
}

/// Installs the tracing subscriber for the binary: `--log` filter,
/// `--log-format` text or JSON, to standard error.
pub fn init_tracing(args: &LogArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log {:?} is not a valid filter", args.log))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("install the tracing subscriber: {err}"))
}
