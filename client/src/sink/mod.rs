//! Sinks: consumers of shard logs, fed by a [`Subscriber`] that follows the
//! replication hub.
//!
//! A [`ReplicationSink`] turns events into effects (rows, lines in a file,
//! HTTP calls). The [`Subscriber`] runtime does everything else:
//!
//! - subscribes to a shard, a list of shards or a shard pattern
//!   (`resourcelease.*`, shards created later included) on the hub, from the
//!   sink's durable checkpoint;
//! - hands the sink each shard's events in order, once per run, as
//!   [`SinkBatch`]es of consecutive events;
//! - checks every event before the sink sees it ([`chain`]): the next
//!   sequence and no other, a `prev_hash` that is the previous event's hash,
//!   and a hash that is the event's own (recomputed). A gap or a broken link
//!   stops the runtime with [`SinkError::Gap`] or [`SinkError::Corrupt`]; it
//!   never skips;
//! - commits the hub checkpoint (with the hash of the event it stops at) in
//!   batches, after [`defaults::CHECKPOINT_EVENTS`] events or
//!   [`defaults::CHECKPOINT_INTERVAL`], whichever comes first, and when
//!   it stops; a commit runs beside delivery (it is a disk sync on the
//!   hub), and while one is under way the next waits for it;
//! - reconnects with backoff, on the next hub endpoint, after a hub replica
//!   dies or the network is cut, and resumes where the sink is;
//! - when the sink's position was trimmed by retention, hands the sink the
//!   hub's snapshot ([`ReplicationSink::apply_snapshot`]) and then the tail.
//!
//! # Delivery modes
//!
//! [`Delivery::AtLeastOnce`]: the sink's effects are made durable by
//! [`ReplicationSink::flush`], which the runtime calls before each checkpoint
//! commit; the checkpoint lives on the hub. After a crash the events after
//! the last committed checkpoint are delivered again, so an effect may happen
//! twice. Each event carries an idempotence key,
//! [`SinkEvent::idempotence_key`] (`{shard}/{sequence}`), unique within the
//! log, that the receiver uses to recognise a repeat. Within one run of the
//! runtime no event is handed over twice, reconnections included.
//!
//! [`Delivery::ExactlyOnce`]: the sink stores its position in the same
//! transaction as the effect of a batch, and reports it from
//! [`ReplicationSink::checkpoints`] at start. The runtime never hands it an
//! event at or below that position. A batch whose transaction failed or
//! timed out (its outcome unknown) is handed over again, so the sink's
//! transaction must also compare the stored position with the batch's
//! first sequence and skip what is already applied (the PostgreSQL
//! projection locks its checkpoint row for that). The hub checkpoint is
//! then only a copy, kept for retention and lag, and never ahead of the
//! sink's: before each hub commit the runtime reads the sink's positions
//! back ([`ReplicationSink::checkpoints`]) and commits those, so a sink may
//! let a batch's commit run while it takes the next (the PostgreSQL
//! projection does); [`ReplicationSink::flush`] is called when the runtime
//! stops or reconnects and must leave every delivered batch committed.
//!
//! Either way the sink's checkpoint is never ahead of its effects, and the
//! log is never skipped.
//!
//! # Shipped sinks
//!
//! - [`NdjsonSink`]: JSON lines in rotated files, with an fsync policy (at
//!   least once).
//! - [`webhook::WebhookSink`]: one HTTP POST per batch, with retries, backoff
//!   and a dead-letter file (at least once).
//! - `projection::ProjectionSink` (feature `postgres`): a PostgreSQL table of
//!   every queue's current items (exactly once), and
//!   `projection::lineage::LineageSink`: who did what to which resource
//!   (exactly once).
//!
//! # Memory and deadlines
//!
//! The runtime decodes and checks the next frame of the hub's stream while
//! the sink works on the one before, and reads no further: it holds at
//! most three frames (the sink's, one checked and waiting, one being read;
//! 3 MiB each at most), so HTTP/2 flow control holds a fast hub back. Hub
//! checkpoint commits run beside delivery, one at a time. Every hub call has a deadline
//! ([`defaults::REQUEST_TIMEOUT`]), a stream that stays silent for three
//! progress intervals is reopened, and every sink call has one too
//! ([`defaults::SINK_TIMEOUT`]).
//!
//! ```no_run
//! use omnirelay_client::replication::HubEndpoint;
//! use omnirelay_client::sink::{NdjsonConfig, NdjsonSink, Selection, Subscriber, SubscriberConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let sink = NdjsonSink::open(NdjsonConfig::new("/var/lib/omnirelay/events")).await?;
//! let config = SubscriberConfig::new(
//!     "audit-file",
//!     [HubEndpoint::new("http://hub:7400")],
//!     Selection::Pattern("resourcelease.*".into()),
//! );
//! let subscriber = Subscriber::new(config, sink)?;
//! let stop = CancellationToken::new();
//! subscriber.run(stop).await?;
//! # Ok(())
//! # }
//! ```

pub mod chain;
pub mod defaults;
pub mod json;
pub mod metrics;
pub mod ndjson;
#[cfg(feature = "postgres")]
pub mod projection;
mod subscriber;
pub mod webhook;

use std::future::Future;

use bytes::Bytes;
use omnirelay_proto::replication::v1 as rpb;

pub use ndjson::{FsyncPolicy, NdjsonConfig, NdjsonSink};
pub use subscriber::{Selection, ShardProgress, Subscriber, SubscriberConfig, SubscriberProgress};

use crate::ids::{Sequence, ShardId};

/// How a sink keeps its position, and so what it guarantees.
/// See the [module docs](self#delivery-modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Effects are flushed before the hub checkpoint moves; a crash repeats
    /// the events after the last checkpoint (use the idempotence key).
    AtLeastOnce,
    /// The sink stores its checkpoint in the transaction of its effects;
    /// each event takes effect once.
    ExactlyOnce,
}

/// One event as a sink receives it: decoded, verified and chained.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkEvent {
    /// Its shard.
    pub shard: ShardId,
    /// Its position in the shard's log.
    pub sequence: Sequence,
    /// Its chain hash (32 bytes), verified.
    pub hash: Bytes,
    /// The event, decoded (fields this build does not know are dropped).
    pub event: rpb::ReplicationEvent,
    /// The event as the hub served it, byte for byte.
    pub raw: Bytes,
}

impl SinkEvent {
    /// The key a receiver uses to recognise an event it already applied:
    /// `{shard}/{sequence}`, unique within the shard's log.
    pub fn idempotence_key(&self) -> String {
        format!("{}/{}", self.shard, self.sequence)
    }
}

/// Consecutive events of one shard, in order, with no gaps. Cheap to
/// clone (the events are shared), so a sink may keep a batch past its
/// `deliver` call: the PostgreSQL projection keeps the one whose commit is
/// under way.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkBatch {
    /// The shard.
    pub shard: ShardId,
    /// The events (never empty).
    pub events: std::sync::Arc<[SinkEvent]>,
}

impl SinkBatch {
    /// Sequence of the first event.
    pub fn first(&self) -> Sequence {
        self.events.first().map_or(Sequence::ZERO, |e| e.sequence)
    }

    /// The last event: the checkpoint an exactly-once sink stores with the
    /// batch's effects.
    pub fn last(&self) -> &SinkEvent {
        self.events.last().expect("a sink batch should never be empty")
    }
}

/// A queue snapshot that replaces events retention trimmed: the state of
/// the shard's queue after `sequence`.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkSnapshot {
    /// The shard.
    pub shard: ShardId,
    /// The snapshot reflects every event up to this one.
    pub sequence: Sequence,
    /// Chain hash of the event at `sequence`.
    pub hash: Bytes,
    /// The queue's state, decoded.
    pub state: rpb::QueueState,
}

/// A sink's stored position on one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkCheckpoint {
    /// The shard.
    pub shard: ShardId,
    /// Last sequence whose effects are stored.
    pub sequence: Sequence,
    /// Hash of the event at `sequence`, when the sink kept it: the first
    /// event delivered after it must link to it.
    pub hash: Option<Bytes>,
}

/// Why a sink or its runtime stopped or failed one call.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The next event of a shard is not the one after the sink's position:
    /// events would be skipped. Never retried.
    #[error("shard {shard}: expected sequence {expected}, the hub sent {got}; events would be skipped")]
    Gap {
        /// The shard.
        shard: ShardId,
        /// The sequence the sink needs next.
        expected: Sequence,
        /// The sequence that arrived.
        got: Sequence,
    },
    /// An event does not hold together (a broken chain link, a wrong hash,
    /// an event that does not decode) or the hub reported corruption.
    /// Never retried.
    #[error("shard {shard}: {reason}")]
    Corrupt {
        /// The shard.
        shard: ShardId,
        /// What is wrong.
        reason: String,
    },
    /// The sink applied events past the end of the hub's log: the hub
    /// refused its position as past the shard's head. The hub's database
    /// was restored to an earlier point (or lost its tail), so the events
    /// after the head are gone from the log while the sink keeps their
    /// effects; new events would reuse their sequences. Never retried: the
    /// sink must be rebuilt from the log (or its own store restored to the
    /// same point) before it resumes.
    #[error(
        "shard {shard}: this sink applied events up to sequence {position}, past the end of the hub's log \
         ({reason}); the hub's log was restored to an earlier point: rebuild the sink from the log (or restore \
         its store to the same point) before resuming"
    )]
    AheadOfHub {
        /// The shard.
        shard: ShardId,
        /// The last sequence the sink applied.
        position: Sequence,
        /// The hub's answer.
        reason: String,
    },
    /// A failure that may pass (a database or an endpoint that is down):
    /// the runtime retries the same batch after a backoff.
    #[error("{0}")]
    Transient(String),
    /// A failure that will not pass by retrying (a refused request, a bad
    /// configuration, a snapshot the sink cannot apply). Stops the runtime.
    #[error("{0}")]
    Fatal(String),
    /// A setting is invalid; `field` names it.
    #[error("{field}: {reason}")]
    Config {
        /// The setting.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl SinkError {
    /// The error's kind, the `kind` label of the error metric.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Gap { .. } => "gap",
            SinkError::Corrupt { .. } => "corrupt",
            SinkError::AheadOfHub { .. } => "ahead_of_hub",
            SinkError::Transient(_) => "transient",
            SinkError::Fatal(_) => "fatal",
            SinkError::Config { .. } => "config",
        }
    }
}

/// Result of sink operations.
pub type Result<T, E = SinkError> = std::result::Result<T, E>;

/// A consumer of shard logs, driven by a [`Subscriber`].
/// See the [module docs](self) for the delivery modes.
///
/// Implementations must:
/// - apply a batch's events in order, and for [`Delivery::ExactlyOnce`]
///   store the batch's last event as their checkpoint in the same
///   transaction, skipping any event at or below the checkpoint they find
///   there (a batch whose outcome was unknown is handed over again);
/// - return [`SinkError::Transient`] only for failures a retry of the same
///   batch may cure.
pub trait ReplicationSink: Send + Sync + 'static {
    /// How this sink keeps its position.
    fn delivery(&self) -> Delivery;

    /// The sink's own stored positions ([`Delivery::ExactlyOnce`]): what its
    /// committed transactions hold, read at start and before each hub
    /// checkpoint commit. An at-least-once sink returns none and the hub's
    /// checkpoints are used.
    fn checkpoints(&mut self) -> impl Future<Output = Result<Vec<SinkCheckpoint>>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Applies a batch of consecutive events of one shard.
    fn deliver(&mut self, batch: &SinkBatch) -> impl Future<Output = Result<()>> + Send;

    /// Makes every delivered effect durable. Called before each hub
    /// checkpoint commit of an at-least-once sink, and before the runtime
    /// stops or reconnects. An exactly-once sink's `deliver` may return
    /// before its transaction is committed (a bounded number of batches:
    /// the PostgreSQL projection keeps
    /// [`defaults::PROJECTION_BATCHES_IN_FLIGHT`]), since its positions are
    /// read back from [`checkpoints`](Self::checkpoints); `flush` then waits
    /// for them.
    fn flush(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Replaces what the sink holds for the snapshot's shard with the
    /// snapshot's state: the events up to its sequence were trimmed. The
    /// default refuses, which stops the runtime.
    fn apply_snapshot(&mut self, snapshot: &SinkSnapshot) -> impl Future<Output = Result<()>> + Send {
        let message = format!(
            "shard {}: the events up to {} were trimmed and this sink cannot start from a snapshot",
            snapshot.shard, snapshot.sequence
        );
        async move { Err(SinkError::Fatal(message)) }
    }
}
