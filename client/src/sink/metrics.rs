//! Metrics of the [`Subscriber`](super::Subscriber) runtime, labelled by
//! `subscriber` (its id) and `shard`:
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `omnirelay_sink_events_total` | counter | events the sink applied |
//! | `omnirelay_sink_checkpoint_lag_events` | gauge | the shard's head minus the committed checkpoint |
//! | `omnirelay_sink_checkpoint_lag_seconds` | gauge | age (by `recorded_at`) of the oldest delivered event not yet checkpointed; 0 when the checkpoint is at the head |
//! | `omnirelay_sink_errors_total` | counter | failures by `kind`: `gap`, `corrupt`, `ahead_of_hub`, `transient`, `fatal`, `config`, `stream` (a hub stream that broke), `checkpoint` (a checkpoint commit that failed) |
//! | `omnirelay_sink_reconnects_total` | counter | hub streams reopened (by `subscriber` only) |

/// Counter: events the sink applied.
pub const EVENTS: &str = "omnirelay_sink_events_total";
/// Gauge: the shard's head minus the committed checkpoint, in events.
pub const CHECKPOINT_LAG_EVENTS: &str = "omnirelay_sink_checkpoint_lag_events";
/// Gauge: seconds since the oldest delivered, not yet checkpointed event was recorded.
pub const CHECKPOINT_LAG_SECONDS: &str = "omnirelay_sink_checkpoint_lag_seconds";
/// Counter: failures, by `kind`.
pub const ERRORS: &str = "omnirelay_sink_errors_total";
/// Counter: hub streams reopened.
pub const RECONNECTS: &str = "omnirelay_sink_reconnects_total";

/// Label: the subscriber id.
pub const SUBSCRIBER_LABEL: &str = "subscriber";
/// Label: the shard.
pub const SHARD_LABEL: &str = "shard";
/// Label: the error kind.
pub const KIND_LABEL: &str = "kind";
