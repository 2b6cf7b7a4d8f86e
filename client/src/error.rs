//! The closed set of error codes every OmniRelay boundary maps to.
//!
//! Domain errors (`QueueError`, the middleware's errors, ...) each say which
//! [`ErrorCode`] they are; this module is the one place that turns a code into
//! a gRPC status code or an HTTP status, so both transports answer alike.

use std::fmt;

/// What kind of failure a caller sees, independent of transport.
///
/// The set is closed on purpose: a caller can handle every case, and a new
/// domain error must pick one of these rather than invent a transport code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// The request is malformed; the message names the field. Nothing changed.
    InvalidArgument,
    /// The addressed item, dead letter or namespace does not exist.
    NotFound,
    /// The request is valid but the state forbids it (an expired lease, a
    /// draining queue).
    FailedPrecondition,
    /// A stale fencing token or epoch: someone newer owns the thing.
    Aborted,
    /// Capacity or backpressure; retry later (the details say when).
    ResourceExhausted,
    /// A dependency (replicator, hub, database) is unavailable; retry.
    Unavailable,
    /// The caller's deadline passed before the operation finished.
    DeadlineExceeded,
    /// The caller is known but not allowed to do this.
    PermissionDenied,
    /// The caller could not be identified.
    Unauthenticated,
    /// A bug or an unexpected failure; the message never carries SQL or
    /// internals.
    Internal,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and documentation tables.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::FailedPrecondition,
        ErrorCode::Aborted,
        ErrorCode::ResourceExhausted,
        ErrorCode::Unavailable,
        ErrorCode::DeadlineExceeded,
        ErrorCode::PermissionDenied,
        ErrorCode::Unauthenticated,
        ErrorCode::Internal,
    ];

    /// The gRPC status code for this error.
    pub fn grpc(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorCode::Aborted => tonic::Code::Aborted,
            ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status for this error (the mapping of `google.rpc.Code`).
    pub fn http_status(self) -> http::StatusCode {
        match self {
            ErrorCode::InvalidArgument => http::StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => http::StatusCode::NOT_FOUND,
            ErrorCode::FailedPrecondition => http::StatusCode::BAD_REQUEST,
            ErrorCode::Aborted => http::StatusCode::CONFLICT,
            ErrorCode::ResourceExhausted => http::StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::DeadlineExceeded => http::StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::PermissionDenied => http::StatusCode::FORBIDDEN,
            ErrorCode::Unauthenticated => http::StatusCode::UNAUTHORIZED,
            ErrorCode::Internal => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code for a gRPC status code; codes outside the closed set (for
    /// example `Unknown` from a foreign server) become [`ErrorCode::Internal`].
    pub fn from_grpc(code: tonic::Code) -> Self {
        Self::ALL.into_iter().find(|c| c.grpc() == code).unwrap_or(ErrorCode::Internal)
    }

    /// The stable snake-case name used in JSON error bodies and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::Aborted => "aborted",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_round_trip_and_are_distinct() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_grpc(code.grpc()), code);
        }
        assert_eq!(ErrorCode::from_grpc(tonic::Code::Unknown), ErrorCode::Internal);
    }

    #[test]
    fn stale_tokens_are_conflicts_and_backpressure_is_429() {
        assert_eq!(ErrorCode::Aborted.http_status(), http::StatusCode::CONFLICT);
        assert_eq!(ErrorCode::ResourceExhausted.http_status(), http::StatusCode::TOO_MANY_REQUESTS);
        let names: std::collections::BTreeSet<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
