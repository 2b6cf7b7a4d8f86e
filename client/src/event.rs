//! Replication events: every queue mutation, carrying every value the queue
//! derived when it accepted the command (ids, times, attempts), so applying
//! them never consults a clock or a random source.
//!
//! The queue writes them and the replicators carry them, so they live apart
//! from both (neither imports the other for them); the public path is
//! [`crate::queue`], which re-exports them.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backpressure::BackpressureSignal;
use crate::clock::Timestamp;
use crate::ids::{FencingToken, ItemId, LeaseId, PeerId, Principal, Sequence, ShardId};
use crate::item::{DeadLetterReason, DrainMode, Payload, WorkItem};

/// Who caused an event, on which shard.
///
/// Shared by every event of a command (and, while the caller does not change,
/// by the events of many commands), so stamping an event costs a reference
/// count, not three string copies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Queue (shard) the event belongs to.
    pub shard: ShardId,
    /// Normalized identity of the caller (`rpc.principal`).
    pub principal: Principal,
    /// Mesh peer the command came from (the local node for the sweeper).
    pub peer: PeerId,
}

/// One queue mutation as it goes to the replicator.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    /// Shard, principal and peer.
    pub origin: Arc<Origin>,
    /// Time recorded by the producing queue; replay uses it, never a clock.
    pub recorded_at: Timestamp,
    /// What happened.
    pub kind: EventKind,
}

impl Clone for Event {
    fn clone(&self) -> Self {
        Self { origin: Arc::clone(&self.origin), recorded_at: self.recorded_at, kind: self.kind.clone() }
    }

    /// Overwrites in place (logs that recycle their slots use it); the
    /// origin, usually shared by consecutive events, is kept when it is the
    /// same.
    fn clone_from(&mut self, source: &Self) {
        if !Arc::ptr_eq(&self.origin, &source.origin) {
            self.origin = Arc::clone(&source.origin);
        }
        self.recorded_at = source.recorded_at;
        self.kind = source.kind.clone();
    }
}

impl Event {
    /// About how many bytes the event takes on the wire: its bodies and
    /// strings plus a fixed envelope. Bounds what a queue collects while its
    /// replicator is behind; exact sizes are the log's business.
    pub(crate) fn approx_bytes(&self) -> usize {
        const ENVELOPE: usize = 160;
        let payload = |p: &Payload| {
            p.body.len()
                + p.resource_type.len()
                + p.resource_id.len()
                + p.partition_key.len()
                + p.request_id.len()
                + p.attributes.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>()
        };
        ENVELOPE
            + self.origin.principal.as_str().len()
            + match &self.kind {
                EventKind::Enqueued(new) => payload(&new.payload),
                EventKind::Heartbeat { progress, .. } => progress.iter().map(|(k, v)| k.len() + v.len() + 4).sum(),
                EventKind::Failed { error, .. } => error.len(),
                EventKind::Restored { items, .. } => items
                    .iter()
                    .map(|item| {
                        ENVELOPE
                            + payload(&item.payload)
                            + item.last_error.len()
                            + item.history.iter().map(|r| ENVELOPE + r.error.len()).sum::<usize>()
                    })
                    .sum(),
                EventKind::DeadLettersPurged { item_ids } | EventKind::DrainedPurged { item_ids } => {
                    item_ids.len() * 34
                }
                _ => 0,
            }
    }
}

/// An event with the log position the replicator assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequencedEvent {
    /// Position in the shard's log.
    pub sequence: Sequence,
    /// The event.
    pub event: Event,
}

/// Why an item went back to pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequeueReason {
    /// Its owner reported a failure (a `Failed` event precedes it).
    Failed,
    /// Its lease lapsed (an `Expired` event precedes it).
    Expired,
    /// A drain handed its lease back; this event ends the lease.
    HandedBack,
}

impl RequeueReason {
    /// The stable name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RequeueReason::Failed => "failed",
            RequeueReason::Expired => "expired",
            RequeueReason::HandedBack => "handed_back",
        }
    }
}

/// A new item as the `Enqueued` event records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    /// Assigned id.
    pub id: ItemId,
    /// The producer's payload.
    pub payload: Arc<Payload>,
    /// Lease priority.
    pub priority: i32,
    /// When it was accepted.
    pub enqueued_at: Timestamp,
    /// Not leased before this time.
    pub not_before: Timestamp,
}

/// What happened, one variant per event type of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// An item entered the queue.
    Enqueued(NewItem),
    /// An item was leased; the fencing token is this event's sequence.
    Leased {
        /// Leased item.
        item_id: ItemId,
        /// Attempt number of this lease.
        attempt: u32,
        /// Grant id.
        lease_id: LeaseId,
        /// Peer that owns the lease.
        owner: PeerId,
        /// When it lapses unless heartbeated.
        expires_at: Timestamp,
    },
    /// A lease was extended.
    Heartbeat {
        /// Leased item.
        item_id: ItemId,
        /// Token of the heartbeating lease.
        fencing_token: FencingToken,
        /// New expiry.
        expires_at: Timestamp,
        /// Progress details reported by the owner.
        progress: BTreeMap<String, String>,
    },
    /// A leased item was completed and removed.
    Completed {
        /// Completed item.
        item_id: ItemId,
        /// Token of the completing lease.
        fencing_token: FencingToken,
    },
    /// The owner reported a failure; `Requeued` or `DeadLettered` follows.
    Failed {
        /// Failed item.
        item_id: ItemId,
        /// Token of the failing lease.
        fencing_token: FencingToken,
        /// The owner's error.
        error: String,
    },
    /// An item went back to pending.
    Requeued {
        /// Requeued item.
        item_id: ItemId,
        /// Earliest next lease.
        not_before: Timestamp,
        /// Why.
        reason: RequeueReason,
    },
    /// A lease lapsed; `Requeued` or `DeadLettered` follows.
    Expired {
        /// Item whose lease lapsed.
        item_id: ItemId,
        /// Token of the lapsed lease.
        fencing_token: FencingToken,
        /// Peer that held it.
        owner: PeerId,
    },
    /// An item whose lease just ended moved to the dead-letter list.
    DeadLettered {
        /// Dead-lettered item.
        item_id: ItemId,
        /// Why.
        reason: DeadLetterReason,
    },
    /// A dead letter was re-enqueued with its attempt count reset.
    Redriven {
        /// Redriven item.
        item_id: ItemId,
        /// Earliest next lease.
        not_before: Timestamp,
    },
    /// Dead letters were deleted.
    DeadLettersPurged {
        /// Deleted items (only ids that were dead letters).
        item_ids: Vec<ItemId>,
    },
    /// Pending items a drain handed over were dropped here after they were
    /// restored elsewhere.
    DrainedPurged {
        /// Dropped items (only ids that were pending).
        item_ids: Vec<ItemId>,
    },
    /// The queue stopped granting leases.
    DrainStarted {
        /// How in-flight leases are treated.
        mode: DrainMode,
    },
    /// A drain finished; the queue keeps its items.
    Drained {
        /// Pending items in the snapshot.
        pending: u32,
        /// Items still leased.
        in_flight: u32,
    },
    /// The queue grants leases again.
    Resumed,
    /// Items of a drain snapshot were loaded (already-present ones filtered
    /// out before the event was written).
    Restored {
        /// Restored items, leases cleared.
        items: Vec<WorkItem>,
        /// Snapshot items skipped as already present.
        skipped: u32,
    },
    /// The backpressure signal flipped.
    BackpressureChanged {
        /// The new signal.
        signal: BackpressureSignal,
    },
}

impl EventKind {
    /// The stable snake-case name of the event type (metrics, logs).
    #[inline]
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Enqueued(_) => "enqueued",
            EventKind::Leased { .. } => "leased",
            EventKind::Heartbeat { .. } => "heartbeat",
            EventKind::Completed { .. } => "completed",
            EventKind::Failed { .. } => "failed",
            EventKind::Requeued { .. } => "requeued",
            EventKind::Expired { .. } => "expired",
            EventKind::DeadLettered { .. } => "dead_lettered",
            EventKind::Redriven { .. } => "redriven",
            EventKind::DeadLettersPurged { .. } => "dead_letters_purged",
            EventKind::DrainedPurged { .. } => "drained_purged",
            EventKind::DrainStarted { .. } => "drain_started",
            EventKind::Drained { .. } => "drained",
            EventKind::Resumed => "resumed",
            EventKind::Restored { .. } => "restored",
            EventKind::BackpressureChanged { .. } => "backpressure_changed",
        }
    }
}
