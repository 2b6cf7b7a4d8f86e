//! The queue's nouns: what a producer hands in ([`Payload`]), what the queue
//! holds ([`WorkItem`]), what a worker holds ([`LeaseHandle`]) and what is left
//! when work fails for good ([`DeadLetter`]).
//!
//! Events and replicators name them as well as the queue, so they live apart
//! from it; the public path is [`crate::queue`], which re-exports them.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::clock::Timestamp;
use crate::ids::{FencingToken, ItemId, LeaseId, PeerId, Sequence, ShardId};

/// What a producer enqueues: the resource the work is about, and a body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    /// Kind of resource ("table", "workflow"). Required, non-blank.
    pub resource_type: String,
    /// Identity within the kind. Required, non-blank. Two items with the same
    /// `(resource_type, resource_id)` are never leased at the same time.
    pub resource_id: String,
    /// Optional routing hint for shard routers.
    pub partition_key: String,
    /// Free-form labels.
    pub attributes: BTreeMap<String, String>,
    /// Opaque work description.
    pub body: Bytes,
    /// Idempotency key; empty means none.
    pub request_id: String,
}

impl Payload {
    /// A payload for one resource with a body and nothing else.
    pub fn new(resource_type: impl Into<String>, resource_id: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            resource_type: resource_type.into(),
            resource_id: resource_id.into(),
            body: body.into(),
            ..Self::default()
        }
    }

    /// Sets the idempotency key.
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = request_id.into();
        self
    }
}

/// How one attempt at an item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    /// The owner completed the item.
    Completed,
    /// The owner reported a failure.
    Failed,
    /// The lease lapsed without a heartbeat.
    Expired,
    /// A drain handed the lease back.
    HandedBack,
}

/// One finished attempt in an item's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// Attempt number, starting at 1.
    pub attempt: u32,
    /// Peer that held the lease.
    pub owner: PeerId,
    /// Fencing token of the lease.
    pub fencing_token: FencingToken,
    /// Grant id.
    pub lease_id: LeaseId,
    /// When the lease was granted.
    pub leased_at: Timestamp,
    /// When the attempt ended.
    pub ended_at: Timestamp,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The owner's error, or why the queue ended the attempt.
    pub error: String,
}

/// The lease an item is under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Grant id.
    pub lease_id: LeaseId,
    /// The `Leased` event's sequence.
    pub fencing_token: FencingToken,
    /// Peer that holds it.
    pub owner: PeerId,
    /// When it was granted.
    pub leased_at: Timestamp,
    /// When it lapses unless heartbeated.
    pub expires_at: Timestamp,
}

/// An item as the queue holds it.
#[derive(Debug, PartialEq, Eq)]
pub struct WorkItem {
    /// Queue-assigned id, stable across drain, restore and redrive.
    pub id: ItemId,
    /// What the producer enqueued. Shared, never copied, between the queue,
    /// its events and its readers.
    pub payload: Arc<Payload>,
    /// Higher leases first.
    pub priority: i32,
    /// When the item entered its first queue.
    pub enqueued_at: Timestamp,
    /// Not leased before this time.
    pub not_before: Timestamp,
    /// Leases granted so far; the current lease, if any, is this attempt.
    pub attempt: u32,
    /// Error of the most recent failed or expired attempt.
    pub last_error: String,
    /// Token of the most recent lease ([`FencingToken::NONE`] if never
    /// leased).
    pub last_fencing_token: FencingToken,
    /// Finished attempts, oldest first.
    pub history: Vec<AttemptRecord>,
    /// The current lease.
    pub lease: Option<Lease>,
}

impl Clone for WorkItem {
    /// Every granted lease hands out a copy; an item's error and history are
    /// usually empty, and an empty `String` or `Vec` needs no clone call.
    #[inline]
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            payload: Arc::clone(&self.payload),
            priority: self.priority,
            enqueued_at: self.enqueued_at,
            not_before: self.not_before,
            attempt: self.attempt,
            last_error: if self.last_error.is_empty() { String::new() } else { self.last_error.clone() },
            last_fencing_token: self.last_fencing_token,
            history: if self.history.is_empty() { Vec::new() } else { self.history.clone() },
            lease: self.lease.clone(),
        }
    }
}

impl WorkItem {
    /// The ownership handle of the current lease, if the item is leased.
    #[inline]
    pub fn handle(&self) -> Option<LeaseHandle> {
        self.lease.as_ref().map(|lease| LeaseHandle {
            item_id: self.id,
            attempt: self.attempt,
            lease_id: lease.lease_id,
            fencing_token: lease.fencing_token,
            owner: lease.owner.clone(),
            expires_at: lease.expires_at,
        })
    }
}

/// Proof of ownership of one lease; heartbeat, complete and fail take it back
/// verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHandle {
    /// Leased item.
    pub item_id: ItemId,
    /// Attempt number of this lease.
    pub attempt: u32,
    /// Grant id.
    pub lease_id: LeaseId,
    /// Strictly increasing per shard.
    pub fencing_token: FencingToken,
    /// Peer that holds the lease.
    pub owner: PeerId,
    /// When the lease lapses unless heartbeated.
    pub expires_at: Timestamp,
}

/// Why an item was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// It failed or expired on its last allowed attempt.
    MaxAttempts,
    /// Its owner asked for it in `fail`.
    Requested,
}

impl DeadLetterReason {
    /// The stable name used on the wire ("max_attempts", "requested").
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MaxAttempts => "max_attempts",
            DeadLetterReason::Requested => "requested",
        }
    }
}

/// An item that will not be retried until an operator redrives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The item with its whole attempt history.
    pub item: WorkItem,
    /// When it was dead-lettered.
    pub dead_lettered_at: Timestamp,
    /// Why.
    pub reason: DeadLetterReason,
}

/// What a drain does with leases in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DrainMode {
    /// Wait (bounded) for in-flight leases to finish.
    #[default]
    Wait,
    /// Hand in-flight leases back at once; they become pending.
    HandBack,
}

/// The pending items of a drained queue, ready to be restored elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainSnapshot {
    /// Queue the items come from.
    pub shard: ShardId,
    /// Sequence of the `Drained` event.
    pub sequence: Sequence,
    /// When the drain finished.
    pub taken_at: Timestamp,
    /// Pending items in lease order, with ids, attempts, errors and tokens.
    pub items: Vec<WorkItem>,
    /// Items still leased when a waiting drain timed out (not in `items`).
    pub in_flight: Vec<WorkItem>,
}
