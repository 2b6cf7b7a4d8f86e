//! The hub's service-boundary error, and the one place that maps errors to
//! `tonic::Status` and to per-batch append errors.

use crate::log::event::CorruptEvent;
use crate::log::ids::InvalidInput;
use crate::proto::hub::v1 as pb;
use crate::store::StoreError;
pub use crate::store::causes;
use crate::telemetry::AppendOutcome;

/// Failures of a hub request.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The request is malformed; nothing changed.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The store refused or failed the operation.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The hub is shutting down.
    #[error("the hub is shutting down")]
    ShuttingDown,
    /// A subscription would follow more shards than one stream may.
    #[error(
        "the subscription would follow {wanted} shards, more than the {limit} one stream may follow; \
         narrow the pattern or split it over several subscriptions"
    )]
    TooManyShards {
        /// Shards the subscription matched so far.
        wanted: usize,
        /// [`crate::defaults::MAX_FOLLOWED_SHARDS`].
        limit: usize,
    },
    /// The replica's subscription memory is held by open subscriptions.
    #[error(
        "this replica's subscription memory ({limit} bytes, --subscription-memory) is held by open \
         subscriptions and cannot spare {wanted} more; retry later or on another replica"
    )]
    SubscriptionMemory {
        /// Bytes the subscription (or a shard it follows) needs.
        wanted: usize,
        /// The budget.
        limit: usize,
    },
}

/// Result type of hub requests.
pub type Result<T, E = HubError> = std::result::Result<T, E>;

/// What a client is told of an outage: what failed and the kind of fault,
/// in fixed words.
fn unavailable_message(what: &str, err: &StoreError) -> String {
    let fault = err.fault().unwrap_or(crate::store::Fault::Other);
    crate::telemetry::store_unavailable(fault);
    format!("the log store is unavailable ({what}: {}); retry", fault.describe())
}

impl From<CorruptEvent> for HubError {
    fn from(err: CorruptEvent) -> Self {
        HubError::Store(StoreError::Corrupt(err))
    }
}

impl From<HubError> for tonic::Status {
    fn from(err: HubError) -> Self {
        use tonic::Status;
        match err {
            HubError::Invalid(input) => Status::invalid_argument(input.to_string()),
            HubError::ShuttingDown => Status::unavailable(err.to_string()),
            HubError::TooManyShards { .. } | HubError::SubscriptionMemory { .. } => {
                Status::resource_exhausted(err.to_string())
            }
            HubError::Store(store) => match store {
                StoreError::Invalid(input) => Status::invalid_argument(input.to_string()),
                // The proto promises ABORTED for a lease the caller lost.
                StoreError::StaleEpoch { .. } | StoreError::NotHolder { .. } => Status::aborted(store.to_string()),
                StoreError::PastHead { .. } => Status::out_of_range(store.to_string()),
                StoreError::UnknownShard { .. } => Status::not_found(store.to_string()),
                StoreError::NoLease { .. }
                | StoreError::OutOfOrder { .. }
                | StoreError::HeadMismatch { .. }
                | StoreError::Trimmed { .. } => Status::failed_precondition(store.to_string()),
                StoreError::Overloaded { .. } => Status::resource_exhausted(store.to_string()),
                // The text names what failed and the kind of fault, never
                // the driver's message.
                StoreError::Unavailable { what, .. } => Status::unavailable(unavailable_message(what, &store)),
                StoreError::Closed => Status::unavailable(store.to_string()),
                StoreError::Corrupt(corrupt) => {
                    tracing::error!(shard = %corrupt.shard, sequence = %corrupt.sequence, reason = %corrupt.reason, "refusing to serve a corrupt event");
                    Status::internal(format!("{corrupt}; run `omnirelay-hub verify`"))
                }
                StoreError::Schema(_) | StoreError::Internal { .. } => {
                    tracing::error!(error = %format_args!("{:#}", anyhow::Error::new(store)), "request failed");
                    Status::internal("internal hub error; see the hub's log")
                }
            },
        }
    }
}

/// The per-batch error answered on an append stream (the stream stays open).
pub fn append_error(err: &StoreError) -> pb::AppendError {
    // The one classification the metric label uses too; `of_error` never
    // returns a success, whose code is `None`.
    let code = AppendOutcome::of_error(err).code().unwrap_or(pb::AppendErrorCode::Internal);
    let current_epoch = match err {
        StoreError::StaleEpoch { current, .. } => current.0,
        _ => 0,
    };
    let expected_producer_seq = match err {
        StoreError::OutOfOrder { expected, .. } => expected.0,
        _ => 0,
    };
    let head_sequence = match err {
        StoreError::HeadMismatch { head, .. } => head.0,
        _ => 0,
    };
    let message = match err {
        StoreError::Unavailable { what, .. } => unavailable_message(what, err),
        StoreError::Internal { .. } | StoreError::Schema(_) => {
            tracing::error!(error = %err, "append failed");
            "internal hub error; see the hub's log".to_string()
        }
        other => other.to_string(),
    };
    pb::AppendError { code: code as i32, message, current_epoch, expected_producer_seq, head_sequence }
}

/// The per-batch error for a request that failed validation.
pub fn invalid_batch(err: &InvalidInput) -> pb::AppendError {
    pb::AppendError {
        code: pb::AppendErrorCode::Invalid as i32,
        message: err.to_string(),
        current_epoch: 0,
        expected_producer_seq: 0,
        head_sequence: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::ids::{Epoch, ShardId};

    fn shard() -> ShardId {
        ShardId::parse("resourcelease.users").expect("valid")
    }

    #[test]
    fn stale_epochs_abort_and_name_the_current_epoch() {
        let err = StoreError::StaleEpoch { shard: shard(), given: Epoch(1), current: Epoch(3) };
        let answer = append_error(&err);
        assert_eq!((answer.code, answer.current_epoch), (pb::AppendErrorCode::StaleEpoch as i32, 3));
        let status = tonic::Status::from(HubError::Store(err));
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert!(status.message().contains("current epoch is 3"), "{}", status.message());
    }

    #[test]
    fn outages_are_unavailable_without_driver_text() {
        let err = StoreError::Unavailable { what: "read events", source: "password=secret SELECT ...".into() };
        let status = tonic::Status::from(HubError::Store(err));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(!status.message().contains("SELECT") && !status.message().contains("secret"));
    }

    #[test]
    fn append_errors_and_the_outcome_label_classify_alike() {
        use crate::log::ids::{ProducerId, ProducerSeq, Sequence};
        let producer = ProducerId::parse("node-a/1").expect("valid");
        let errors = [
            StoreError::StaleEpoch { shard: shard(), given: Epoch(1), current: Epoch(3) },
            StoreError::NoLease { shard: shard() },
            StoreError::NotHolder { shard: shard(), epoch: Epoch(2) },
            StoreError::UnknownShard { shard: shard() },
            StoreError::OutOfOrder { shard: shard(), producer, given: ProducerSeq(7), expected: ProducerSeq(5) },
            StoreError::HeadMismatch { shard: shard(), expected: Sequence(12), head: Sequence(10) },
            StoreError::Trimmed { shard: shard(), low: Sequence(10) },
            StoreError::PastHead { field: "from", shard: shard(), sequence: Sequence(11), head: Sequence(10) },
            StoreError::Invalid(InvalidInput::new("events", "must not be empty")),
            StoreError::Overloaded { pending: 10 },
            StoreError::Closed,
            StoreError::Unavailable { what: "append", source: "gone".into() },
            StoreError::Internal { what: "append", source: "a bug".into() },
        ];
        for err in errors {
            let outcome = AppendOutcome::of_error(&err);
            let code = pb::AppendErrorCode::try_from(append_error(&err).code).expect("a known code");
            assert_eq!(Some(code), outcome.code(), "{err}: the answer's code is the outcome's");
            let expected = match code {
                pb::AppendErrorCode::Internal => "failed",
                other => other.as_str_name().trim_start_matches("APPEND_ERROR_CODE_"),
            };
            assert_eq!(outcome.label(), expected.to_ascii_lowercase(), "{err}");
        }
    }

    /// Every outcome, its metric label and its wire code, in one table: the
    /// label is the code's name (`failed` for INTERNAL), and only the two
    /// successes have no code.
    #[test]
    fn every_append_outcome_has_a_label_that_names_its_code() {
        use pb::AppendErrorCode as Code;
        let table = [
            (AppendOutcome::Appended, "appended", None),
            (AppendOutcome::Duplicate, "duplicate", None),
            (AppendOutcome::StaleEpoch, "stale_epoch", Some(Code::StaleEpoch)),
            (AppendOutcome::NoLease, "no_lease", Some(Code::NoLease)),
            (AppendOutcome::OutOfOrder, "out_of_order", Some(Code::OutOfOrder)),
            (AppendOutcome::HeadMismatch, "head_mismatch", Some(Code::HeadMismatch)),
            (AppendOutcome::Invalid, "invalid", Some(Code::Invalid)),
            (AppendOutcome::Unavailable, "unavailable", Some(Code::Unavailable)),
            (AppendOutcome::Failed, "failed", Some(Code::Internal)),
        ];
        assert_eq!(table.map(|(outcome, ..)| outcome), AppendOutcome::ALL, "the table lists every outcome");
        for (outcome, label, code) in table {
            assert_eq!((outcome.label(), outcome.code()), (label, code), "{outcome:?}");
            if let Some(code) = code.filter(|code| *code != Code::Internal) {
                assert_eq!(code.as_str_name(), format!("APPEND_ERROR_CODE_{}", label.to_ascii_uppercase()));
            }
        }
    }

    #[test]
    fn outages_name_their_fault_in_fixed_words_and_keep_the_cause_for_the_log() {
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        );
        let err = StoreError::Unavailable { what: "commit an append group", source: Box::new(full) };
        assert_eq!(err.fault(), Some(crate::store::Fault::DiskFull));
        let copied = crate::store::copy_error(&err);
        assert_eq!(copied.fault(), Some(crate::store::Fault::DiskFull), "copies for a group keep the fault");
        let answer = append_error(&copied);
        assert_eq!(answer.code, pb::AppendErrorCode::Unavailable as i32);
        assert!(answer.message.contains("commit an append group: database or disk is full"), "{}", answer.message);
        assert!(causes(&copied).contains("database or disk is full"), "{}", causes(&copied));
    }

    #[test]
    fn invalid_input_names_the_field() {
        let status = tonic::Status::from(HubError::Invalid(InvalidInput::new("shard_id", "must not be empty")));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("shard_id:"));
    }
}
