//! Replicators: where a queue's events go before they are applied.
//!
//! A [`Replicator`] accepts a [`Batch`] of events for one shard and answers
//! with the log sequences it assigned ([`Appended`]). The queue applies events
//! only after that answer, so a failed publish changes nothing. Every batch
//! carries `(producer, producer_seq)`: a replicator that already accepted that
//! batch returns the original sequences instead of writing it again, which
//! makes retrying an ambiguous failure safe.
//!
//! The trait is object safe: queues hold an `Arc<dyn Replicator>`, and
//! wrappers (composite, sharded) and durable implementations (hub, SQLite)
//! compose behind it. [`InMemoryReplicator`] keeps the log in memory for
//! tests, development and benchmarks, and can inject failures.

mod memory;

use std::future::Future;
use std::pin::Pin;

pub use memory::{InMemoryReplicator, PublishFault};

use crate::ids::{ProducerId, Sequence, ShardId};
use crate::queue::Event;

/// The future returned by [`Replicator::publish`]: either an answer that is
/// already known (synchronous replicators such as the in-memory one, with no
/// allocation) or a boxed future (network and disk replicators).
#[must_use = "a publish does nothing unless awaited"]
pub struct PublishFuture<'a>(PublishState<'a>);

enum PublishState<'a> {
    Ready(Option<Result<Appended, ReplicationError>>),
    Pending(Pin<Box<dyn Future<Output = Result<Appended, ReplicationError>> + Send + 'a>>),
}

impl<'a> PublishFuture<'a> {
    /// A publish whose answer is already known.
    pub fn ready(result: Result<Appended, ReplicationError>) -> Self {
        Self(PublishState::Ready(Some(result)))
    }

    /// A publish that completes when `future` does.
    pub fn new(future: impl Future<Output = Result<Appended, ReplicationError>> + Send + 'a) -> Self {
        Self(PublishState::Pending(Box::pin(future)))
    }

    /// Takes the answer if it is already known. Lets the queue apply a
    /// synchronous replicator's answer without an `.await`.
    #[inline]
    pub(crate) fn take_ready(&mut self) -> Option<Result<Appended, ReplicationError>> {
        match &mut self.0 {
            PublishState::Ready(result) => result.take(),
            PublishState::Pending(_) => None,
        }
    }
}

impl Future for PublishFuture<'_> {
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

impl std::fmt::Debug for PublishFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishFuture").finish_non_exhaustive()
    }
}

/// One atomic append: events of one shard, all accepted or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Shard whose log the events go to.
    pub shard: ShardId,
    /// The producer incarnation (one per queue instance).
    pub producer: ProducerId,
    /// Producer's batch counter, starting at 1. A retry of a batch keeps its
    /// number; a new batch takes the next.
    pub producer_seq: u64,
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

/// Why a replicator did not accept a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// The log could not be reached or did not answer; the batch may or may
    /// not have been written. Retry with the same producer sequence.
    #[error("replication log unavailable: {0}")]
    Unavailable(String),
    /// The log refused the batch for good (for example a stale shard epoch or
    /// an out-of-order producer sequence); retrying will not help.
    #[error("replication log rejected the batch: {0}")]
    Rejected(String),
}

/// Accepts batches of queue events into a shard's ordered log.
///
/// Implementations must:
/// - assign gapless, increasing sequences per shard, starting at 1;
/// - append a batch atomically (all events or none);
/// - answer a repeated `(producer, producer_seq)` with the original
///   sequences (`deduplicated: true`) and write nothing;
/// - return only once the events are as durable as the implementation
///   promises (in memory; committed to PostgreSQL; fsynced to SQLite).
pub trait Replicator: Send + Sync + 'static {
    /// Appends `batch` to its shard's log.
    fn publish<'a>(&'a self, batch: &'a Batch) -> PublishFuture<'a>;
}

impl<R: Replicator + ?Sized> Replicator for std::sync::Arc<R> {
    fn publish<'a>(&'a self, batch: &'a Batch) -> PublishFuture<'a> {
        (**self).publish(batch)
    }
}
