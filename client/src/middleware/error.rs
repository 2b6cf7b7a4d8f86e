//! The errors the middleware answers with, before the inner service runs.

use std::time::Duration;

pub use omnirelay_identity::{ConfigError, CredentialError};

use crate::ErrorCode;

/// A call the middleware refused. Every variant maps to one [`ErrorCode`];
/// [`ErrorResponseLayer`](super::ErrorResponseLayer) renders it for the caller's
/// transport, so gRPC and HTTP/JSON callers see the same outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MiddlewareError {
    /// The caller could not be identified.
    #[error("unauthenticated: {0}")]
    Unauthenticated(#[from] CredentialError),
    /// The caller is identified but the authorization table does not allow
    /// this procedure on this namespace.
    #[error("permission denied: {principal} may not call {procedure} on {namespace}")]
    PermissionDenied {
        /// The caller.
        principal: String,
        /// The procedure, as in the table (`enqueue`).
        procedure: &'static str,
        /// The namespace addressed.
        namespace: String,
    },
    /// Part of the request is malformed; `field` names it.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The header, path segment or body field at fault.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The path names no ResourceLease procedure.
    #[error("no such procedure: {path}")]
    UnknownProcedure {
        /// The request path.
        path: String,
    },
    /// The call's deadline passed before it finished.
    #[error("deadline of {budget_ms} ms exceeded")]
    DeadlineExceeded {
        /// The deadline the call had, in milliseconds.
        budget_ms: u64,
    },
    /// A refusal with an explicit code, for layers that plug into the stack
    /// (the backpressure-aware concurrency limiter answers RESOURCE_EXHAUSTED with
    /// it).
    #[error("{message}")]
    Rejected {
        /// The code to answer with.
        code: ErrorCode,
        /// The message for the caller.
        message: String,
    },
}

impl MiddlewareError {
    /// The transport-independent code.
    pub fn code(&self) -> ErrorCode {
        match self {
            MiddlewareError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            MiddlewareError::PermissionDenied { .. } => ErrorCode::PermissionDenied,
            MiddlewareError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            MiddlewareError::UnknownProcedure { .. } => ErrorCode::NotFound,
            MiddlewareError::DeadlineExceeded { .. } => ErrorCode::DeadlineExceeded,
            MiddlewareError::Rejected { code, .. } => *code,
        }
    }

    /// An INVALID_ARGUMENT naming `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        MiddlewareError::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    /// A refusal with an explicit code.
    pub fn rejected(code: ErrorCode, message: impl Into<String>) -> Self {
        MiddlewareError::Rejected { code, message: message.into() }
    }

    pub(crate) fn deadline(budget: Duration) -> Self {
        MiddlewareError::DeadlineExceeded { budget_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX) }
    }

    /// The gRPC status of this refusal, as [`ErrorResponse`](super::ErrorResponse)
    /// renders it for a call: for a session's messages, which are answered
    /// inside the stream.
    pub fn status(&self) -> tonic::Status {
        tonic::Status::new(self.code().grpc(), self.to_string())
    }
}

impl From<crate::shard::ShardError> for MiddlewareError {
    fn from(err: crate::shard::ShardError) -> Self {
        let text = err.to_string();
        match err {
            crate::shard::ShardError::InvalidNamespace { field, .. } => {
                let reason = text.strip_prefix(&format!("{field}: ")).unwrap_or(&text).to_string();
                MiddlewareError::InvalidArgument { field, reason }
            }
            crate::shard::ShardError::InvalidRule { field, reason } => {
                MiddlewareError::InvalidArgument { field, reason }
            }
        }
    }
}
