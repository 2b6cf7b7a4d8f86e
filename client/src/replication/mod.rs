//! Replicators: the shard logs a queue's events go to before they count.
//!
//! A [`Replicator`] is a shard's durable log as a queue sees it:
//!
//! - [`publish`](Replicator::publish) appends a [`Batch`] of events and
//!   answers with the sequences it assigned ([`Appended`]). Every batch
//!   carries `(producer, producer_seq)`: a replicator that already accepted
//!   that batch returns the original sequences instead of writing it again,
//!   so retrying an ambiguous failure is safe. Every batch also carries the
//!   shard epoch its producer holds; a log that was granted to someone else
//!   since refuses it ([`ReplicationError::StaleEpoch`]).
//! - [`acquire_shard`](Replicator::acquire_shard),
//!   [`renew_shard`](Replicator::renew_shard) and
//!   [`release_shard`](Replicator::release_shard) manage the shard's
//!   ownership lease, whose epoch fences writers.
//! - [`read_log`](Replicator::read_log),
//!   [`latest_snapshot`](Replicator::latest_snapshot) and
//!   [`put_snapshot`](Replicator::put_snapshot) let a node rebuild a queue
//!   by replay ([`recover`](crate::queue::recover)) and bound how much it
//!   replays.
//!
//! The trait is object safe: queues hold an `Arc<dyn Replicator>`.
//! [`InMemoryReplicator`] keeps logs in memory for tests, development and
//! benchmarks (and can inject failures); [`HubReplicator`] (feature `hub`, on by
//! default) streams batches to the replication hub over gRPC, the
//! production path; `SqliteReplicator`
//! (feature `sqlite`, on by default) keeps a durable log in a local file for
//! a single node without a hub; [`CompositeReplicator`] mirrors an
//! authoritative log to others; [`ShardedReplicator`] gives each shard its
//! own log; `ObjectStoreReplicator` (feature `object-store`) keeps logs as
//! segment objects in a directory or S3. Every one of them passes the [contract suite](contract).

pub mod composite;
pub mod contract;
#[cfg(feature = "hub")]
pub mod hub;
mod memory;
#[cfg(feature = "object-store")]
pub mod objectstore;
#[cfg(test)]
pub(crate) mod scripted;
pub mod sharded;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[doc(hidden)]
pub mod unfenced;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

pub use composite::{CompositeReplicator, MirrorMode};
#[cfg(feature = "hub")]
pub use hub::{HubConfigError, HubEndpoint, HubReplicator, HubReplicatorConfig, HubTls};
pub use memory::{InMemoryReplicator, PublishFault};
#[cfg(feature = "object-store")]
pub use objectstore::ObjectStoreReplicator;
pub use sharded::ShardedReplicator;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteOpenError, SqliteReplicator, SqliteReplicatorConfig};

use crate::event::{Event, SequencedEvent};
use crate::ids::{Epoch, ProducerId, Sequence, ShardId};

/// The future returned by [`Replicator::publish`]: either an answer that is
/// already known (synchronous replicators such as the in-memory one, with no
/// allocation) or a boxed future (network and disk replicators).
///
/// It borrows nothing: the replicator copied or encoded what it needs from
/// the batch before `publish` returned, and the batch was handed to the log
/// then. Dropping the future does not withdraw the batch; it only stops
/// waiting for the answer.
#[must_use = "a publish is only known to be durable once its answer arrived"]
pub struct PublishFuture(PublishState);

enum PublishState {
    Ready(Option<Result<Appended, ReplicationError>>),
    Pending(Pin<Box<dyn Future<Output = Result<Appended, ReplicationError>> + Send>>),
}

impl PublishFuture {
    /// A publish whose answer is already known.
    pub fn ready(result: Result<Appended, ReplicationError>) -> Self {
        Self(PublishState::Ready(Some(result)))
    }

    /// A publish that completes when `future` does.
    pub fn new(future: impl Future<Output = Result<Appended, ReplicationError>> + Send + 'static) -> Self {
        Self(PublishState::Pending(Box::pin(future)))
    }

    /// Takes the answer if it is already known. Lets the queue settle a
    /// synchronous replicator's answer without an `.await`.
    #[inline]
    pub(crate) fn take_ready(&mut self) -> Option<Result<Appended, ReplicationError>> {
        match &mut self.0 {
            PublishState::Ready(result) => result.take(),
            PublishState::Pending(_) => None,
        }
    }
}

impl Future for PublishFuture {
    type Output = Result<Appended, ReplicationError>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match &mut self.get_mut().0 {
            PublishState::Ready(result) => {
                std::task::Poll::Ready(result.take().expect("a publish future should not be polled after it completed"))
            }
            PublishState::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

impl std::fmt::Debug for PublishFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishFuture").finish_non_exhaustive()
    }
}

/// The future of a replicator's other operations.
pub type ReplicatorFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ReplicationError>> + Send + 'a>>;

/// One atomic append: events of one shard, all accepted or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Shard whose log the events go to.
    pub shard: ShardId,
    /// The producer incarnation (one per queue incarnation: a queue that is
    /// rebuilt from its log starts a new one).
    pub producer: ProducerId,
    /// Producer's batch counter, starting at 1. A retry of a batch keeps its
    /// number; a new batch takes the next.
    pub producer_seq: u64,
    /// The shard epoch the producer holds. The log refuses a batch whose
    /// epoch is not the shard's current one.
    pub epoch: Epoch,
    /// The sequence the producer expects the first event to get: the owner
    /// is the shard's only writer, so it knows. The log refuses the batch,
    /// writing nothing, unless it is the log's next sequence (zero: no
    /// expectation), so a batch can never land after a lost one.
    pub first: Sequence,
    /// The events, in order.
    pub events: Vec<Event>,
}

/// The sequences a replicator assigned to a batch: `first`, `first + 1`, ...,
/// one per event, gapless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Sequence of the batch's first event.
    pub first: Sequence,
    /// How many events were appended (the batch length).
    pub count: u64,
    /// True when the batch had been accepted before and this answer repeats
    /// the original sequences without writing anything.
    pub deduplicated: bool,
}

impl Appended {
    /// Sequence of the batch's last event.
    pub fn last(&self) -> Sequence {
        self.first.after(self.count.saturating_sub(1))
    }
}

/// The shard's lease after an acquire or a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardGrant {
    /// True when the caller holds the lease now.
    pub granted: bool,
    /// The lease's holder (the caller when granted; empty when free).
    pub owner: String,
    /// Epoch of the grant: batches must carry it.
    pub epoch: Epoch,
    /// The shard's last sequence when the lease was granted.
    pub head: Sequence,
    /// How long the lease lasts from when the log answered (judged by the
    /// log's clock); `None` when the log does not expire leases.
    pub ttl: Option<Duration>,
}

/// Most leases [`Replicator::held_leases`] returns: a mesh's member leases
/// and the shards they own, with room; a bound on one answer's memory.
pub const MAX_HELD_LEASES: usize = 10_000;

/// A shard lease held now, as [`Replicator::held_leases`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    /// The shard.
    pub shard: ShardId,
    /// Its holder.
    pub owner: String,
    /// The epoch of the holder's grant.
    pub epoch: Epoch,
}

/// The chain link of a logged event: its hash and its predecessor's. A
/// reader checks that each event's `prev_hash` is the hash of the event
/// before it (and the first one's is the hash a snapshot was taken at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// Hash of the previous event (32 zero bytes before sequence 1).
    pub prev_hash: Bytes,
    /// Hash of this event.
    pub hash: Bytes,
}

/// An event as read back from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    /// The event and its sequence.
    pub event: SequencedEvent,
    /// Its chain link, from logs that keep a hash chain (the hub); `None`
    /// from logs that do not (the in-memory replicator).
    pub link: Option<ChainLink>,
}

/// A page of a shard's log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogPage {
    /// Consecutive events, in sequence order.
    pub events: Vec<LoggedEvent>,
    /// The shard's last sequence when read.
    pub head: Sequence,
    /// The lowest sequence still stored (retention trimmed those below).
    pub low: Sequence,
}

/// A queue snapshot as a log stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The snapshot reflects every event up to this sequence.
    pub sequence: Sequence,
    /// The queue's canonical state encoding ([`QueueState::encode`](crate::QueueState::encode)).
    pub data: Bytes,
    /// Hash of the event at `sequence`, from logs that keep a chain.
    pub hash: Option<Bytes>,
}

/// Why a replicator did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// The log could not be reached or did not answer in time; a batch may
    /// or may not have been written. The replicator already retried with
    /// the same producer sequence as long as it was configured to.
    #[error("replication log unavailable: {0}")]
    Unavailable(String),
    /// The shard's lease was granted again since this epoch: another owner
    /// (or a newer incarnation of this one) writes the shard now.
    #[error("shard {shard}: epoch {given} is stale; the current epoch is {current}")]
    StaleEpoch {
        /// Shard.
        shard: ShardId,
        /// Epoch the batch carried.
        given: Epoch,
        /// The shard's current epoch.
        current: Epoch,
    },
    /// The log refused the request for good (no lease held, a malformed
    /// batch, an out-of-order producer sequence); retrying will not help.
    #[error("replication log rejected the request: {0}")]
    Rejected(String),
    /// The requested events were trimmed by retention: start from a
    /// snapshot.
    #[error("shard {shard}: events below {low} were trimmed")]
    Trimmed {
        /// Shard.
        shard: ShardId,
        /// Lowest sequence still stored.
        low: Sequence,
    },
    /// What the log returned does not hold together (a broken chain link, an
    /// event that does not decode); it must not be served.
    #[error("replication log is corrupt: {0}")]
    Corrupt(String),
}

/// A shard's durable log, as a queue sees it. See the [module docs](self).
///
/// Implementations must:
/// - assign gapless, increasing sequences per shard, starting at 1, and
///   append a batch atomically (all events or none);
/// - answer a repeated `(producer, producer_seq)` with the original
///   sequences (`deduplicated: true`) and write nothing; refuse a batch
///   whose producer sequence skips ahead of the producer's last one plus
///   one (a producer's first batch may carry any number), without writing
///   it and without consuming the number;
/// - refuse a batch whose epoch is not the shard's current epoch once the
///   shard's lease was ever granted, and a new batch whose `first` is set
///   and is not the log's next sequence;
/// - return from `publish` only after copying what they need from the
///   batch, and resolve its future only once the events are as durable as
///   the implementation promises (in memory; committed to PostgreSQL by the
///   hub);
/// - bump the epoch on every grant of a shard's lease.
///
/// The [contract suite](contract) checks every implementation against these
/// rules.
pub trait Replicator: Send + Sync + 'static {
    /// Appends `batch` to its shard's log.
    fn publish(&self, batch: &Batch) -> PublishFuture;

    /// Takes the shard's lease for `owner` for `ttl` when it is free,
    /// expired or already `owner`'s; every grant bumps the epoch. A lease
    /// held by someone else answers `granted: false` with the holder.
    fn acquire_shard(&self, shard: &ShardId, owner: &str, ttl: Duration) -> ReplicatorFuture<'_, ShardGrant>;

    /// Extends `owner`'s lease at `epoch` to `ttl` from now.
    fn renew_shard(
        &self,
        shard: &ShardId,
        owner: &str,
        epoch: Epoch,
        ttl: Duration,
    ) -> ReplicatorFuture<'_, ShardGrant>;

    /// Gives the lease up so another owner can take it at once; false when
    /// `owner` did not hold it at `epoch`.
    fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool>;

    /// The leases held now (granted, not released, not expired) on shards
    /// whose id starts with `prefix`, in shard-id order: who owns what, and,
    /// through the nodes' member leases, which nodes are alive (see
    /// `node::membership`). At most [`MAX_HELD_LEASES`] are returned. Logs
    /// that no other node shares answer [`ReplicationError::Rejected`], the
    /// default.
    fn held_leases(&self, prefix: &str) -> ReplicatorFuture<'_, Vec<HeldLease>> {
        let _ = prefix;
        Box::pin(std::future::ready(Err(ReplicationError::Rejected(
            "this replicator keeps no leases shared with other nodes".into(),
        ))))
    }

    /// Up to `limit` events of the shard after `after`, in order. Fails with
    /// [`ReplicationError::Trimmed`] when events right after `after` were
    /// trimmed.
    fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage>;

    /// The newest snapshot of the shard, if any.
    fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>>;

    /// Stores a snapshot of the shard's queue at `sequence` (which must be
    /// in the log), written by the holder of `epoch`; lets retention trim
    /// the events below it.
    fn put_snapshot(&self, shard: &ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> ReplicatorFuture<'_, ()>;
}
