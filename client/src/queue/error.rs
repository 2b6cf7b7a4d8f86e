//! The queue's error boundary: one variant per case a caller handles
//! differently, each mapped to one [`ErrorCode`].

use crate::backpressure::BackpressureSignal;
use crate::clock::Timestamp;
use crate::error::ErrorCode;
use crate::ids::{FencingToken, ItemId, PeerId, ShardId};
use crate::replication::ReplicationError;

/// Results of queue operations.
pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// Why a queue operation was refused. A refused operation changed nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueueError {
    /// The request is malformed; `field` names the offending field the way the
    /// wire contract spells it (`payload.resource_id`, `handle.fencing_token`).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No such item (or dead letter) in this queue.
    #[error("{what} {item_id} not found")]
    NotFound {
        /// "item" or "dead letter".
        what: &'static str,
        /// The id asked for.
        item_id: ItemId,
    },
    /// The handle's fencing token is not the item's current lease: a newer
    /// lease exists, or this one already ended.
    #[error("stale fencing token {presented} for item {item_id}: {reason}")]
    StaleToken {
        /// The item.
        item_id: ItemId,
        /// The token presented.
        presented: FencingToken,
        /// Why it is stale.
        reason: &'static str,
    },
    /// The lease lapsed (its item is, or is about to be, requeued).
    #[error("lease of item {item_id} expired at {expired_at}")]
    LeaseExpired {
        /// The item.
        item_id: ItemId,
        /// When the lease lapsed.
        expired_at: Timestamp,
    },
    /// The caller is not the lease's owner.
    #[error("peer {presented} does not own the lease of item {item_id}")]
    NotOwner {
        /// The item.
        item_id: ItemId,
        /// The owner named in the request.
        presented: PeerId,
    },
    /// The queue is draining and grants no leases until it is resumed.
    #[error("queue {shard} is draining")]
    Draining {
        /// The queue.
        shard: ShardId,
    },
    /// The queue holds as many items as its capacity allows.
    #[error("queue {} is at capacity ({capacity} items)", signal.shard)]
    AtCapacity {
        /// The configured capacity.
        capacity: u64,
        /// The backpressure state at the time, for the error details.
        signal: BackpressureSignal,
    },
    /// The queue sheds enqueues until pending falls to the low watermark.
    #[error("queue {} is under backpressure ({} pending, high watermark {})", signal.shard, signal.pending, signal.high)]
    Backpressure {
        /// The backpressure state, for the error details.
        signal: BackpressureSignal,
    },
    /// A `purge_drained` on a queue that is not draining.
    #[error("queue {shard} is not draining; only a drained queue's handed-over items can be purged")]
    NotDraining {
        /// The queue.
        shard: ShardId,
    },
    /// The replication backlog is full (the log is slow or unreachable):
    /// new work is refused until it drains.
    #[error("queue {} is refusing new work: {unacknowledged} events are not yet durable", signal.shard)]
    ReplicationBacklog {
        /// Events decided but not yet acknowledged by the log.
        unacknowledged: u64,
        /// The backpressure state at the time, for the error details.
        signal: BackpressureSignal,
    },
    /// The shard is fenced (see [`Fence`](super::Fence)): it serves nothing
    /// until it is rebuilt from its log. A call that got this may or may not
    /// have taken effect (its batch may have reached the log); retry it
    /// (enqueues with the same `request_id` are written once).
    #[error("shard {shard} is not serving ({}): {detail}", reason.as_str())]
    Fenced {
        /// The shard.
        shard: ShardId,
        /// Why.
        reason: super::FenceReason,
        /// What happened.
        detail: String,
    },
    /// A request to the log (a rebuild, a snapshot) failed.
    #[error("replication log: {0}")]
    Replication(#[source] ReplicationError),
}

impl QueueError {
    /// An invalid-argument error for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        QueueError::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    /// The transport-independent code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            QueueError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            QueueError::NotFound { .. } => ErrorCode::NotFound,
            QueueError::StaleToken { .. } => ErrorCode::Aborted,
            QueueError::LeaseExpired { .. } => ErrorCode::FailedPrecondition,
            QueueError::NotOwner { .. } => ErrorCode::PermissionDenied,
            QueueError::Draining { .. } => ErrorCode::FailedPrecondition,
            QueueError::NotDraining { .. } => ErrorCode::FailedPrecondition,
            QueueError::AtCapacity { .. } | QueueError::Backpressure { .. } | QueueError::ReplicationBacklog { .. } => {
                ErrorCode::ResourceExhausted
            }
            QueueError::Fenced { .. } | QueueError::Replication(_) => ErrorCode::Unavailable,
        }
    }

    /// The backpressure signal to put in the error details, for
    /// RESOURCE_EXHAUSTED errors.
    pub fn backpressure(&self) -> Option<&BackpressureSignal> {
        match self {
            QueueError::AtCapacity { signal, .. }
            | QueueError::Backpressure { signal }
            | QueueError::ReplicationBacklog { signal, .. } => Some(signal),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal() -> BackpressureSignal {
        BackpressureSignal {
            active: true,
            pending: 9,
            high: 8,
            low: 4,
            observed_at: Timestamp::EPOCH,
            shard: ShardId::from("resourcelease"),
        }
    }

    #[test]
    fn each_case_has_its_code() {
        let item_id = ItemId::from_u128(1);
        let cases = [
            (QueueError::invalid("payload.resource_id", "is blank"), ErrorCode::InvalidArgument),
            (QueueError::NotFound { what: "item", item_id }, ErrorCode::NotFound),
            (
                QueueError::StaleToken { item_id, presented: FencingToken::new(3), reason: "a newer lease exists" },
                ErrorCode::Aborted,
            ),
            (QueueError::LeaseExpired { item_id, expired_at: Timestamp::EPOCH }, ErrorCode::FailedPrecondition),
            (QueueError::NotOwner { item_id, presented: PeerId::from("b") }, ErrorCode::PermissionDenied),
            (QueueError::Draining { shard: ShardId::from("q") }, ErrorCode::FailedPrecondition),
            (QueueError::AtCapacity { capacity: 9, signal: signal() }, ErrorCode::ResourceExhausted),
            (QueueError::Backpressure { signal: signal() }, ErrorCode::ResourceExhausted),
            (QueueError::Replication(ReplicationError::Unavailable("down".into())), ErrorCode::Unavailable),
            (QueueError::NotDraining { shard: ShardId::from("q") }, ErrorCode::FailedPrecondition),
            (QueueError::ReplicationBacklog { unacknowledged: 9, signal: signal() }, ErrorCode::ResourceExhausted),
            (
                QueueError::Fenced {
                    shard: ShardId::from("q"),
                    reason: crate::queue::FenceReason::StaleEpoch,
                    detail: "taken over".into(),
                },
                ErrorCode::Unavailable,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
            assert_eq!(error.backpressure().is_some(), code == ErrorCode::ResourceExhausted, "{error}");
        }
    }

    #[test]
    fn invalid_arguments_name_the_field() {
        let error = QueueError::invalid("payload.resource_type", "must not be blank");
        assert_eq!(error.to_string(), "invalid payload.resource_type: must not be blank");
    }
}
