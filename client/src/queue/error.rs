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
    /// The replicator did not accept the events; nothing was applied.
    #[error("replication unavailable")]
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
            QueueError::AtCapacity { .. } | QueueError::Backpressure { .. } => ErrorCode::ResourceExhausted,
            QueueError::Replication(_) => ErrorCode::Unavailable,
        }
    }

    /// The backpressure signal to put in the error details, for
    /// RESOURCE_EXHAUSTED errors.
    pub fn backpressure(&self) -> Option<&BackpressureSignal> {
        match self {
            QueueError::AtCapacity { signal, .. } | QueueError::Backpressure { signal } => Some(signal),
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
