//! The node's error boundary: what a ResourceLease call can fail with once
//! the middleware let it through, rendered the same for gRPC and HTTP/JSON.

use bytes::Bytes;
use http::Response;
use http_body_util::Full;

use crate::ErrorCode;
use crate::ids::{PeerId, Principal, ShardId};
use crate::queue::QueueError;
use crate::wire::{self, WireError};

/// Results of node calls.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// Why the node refused a call. A refused call changed nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeError {
    /// The namespace is valid but this node hosts no queue for it.
    #[error("namespace {0} is not hosted by this node")]
    UnknownNamespace(ShardId),
    /// The call reached the service without a caller: the service runs
    /// outside the mesh middleware, which binds one to every call.
    #[error("no caller was bound to the call (the node must run behind its middleware)")]
    NoCaller,
    /// A lease handle names an owner that does not belong to the caller: a
    /// lease taken by one principal can be renewed, completed or failed
    /// only by that principal.
    #[error("lease owner {owner} does not belong to the caller {principal}")]
    OwnerNotBound {
        /// The owner named in the handle.
        owner: PeerId,
        /// The authenticated caller.
        principal: Principal,
    },
    /// A JSON call named the session, which is a gRPC stream, not a call.
    #[error("{} is not a call: HTTP/JSON has no session", .0.as_str())]
    NotACall(crate::middleware::Procedure),
    /// The queue refused the call (including malformed input, which carries
    /// the field).
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl From<WireError> for NodeError {
    fn from(error: WireError) -> Self {
        NodeError::Queue(error.into())
    }
}

impl NodeError {
    /// An INVALID_ARGUMENT naming `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        NodeError::Queue(QueueError::invalid(field, reason))
    }

    /// The transport-independent code.
    pub fn code(&self) -> ErrorCode {
        match self {
            NodeError::UnknownNamespace(_) => ErrorCode::NotFound,
            NodeError::NoCaller => ErrorCode::Unauthenticated,
            NodeError::NotACall(_) => ErrorCode::NotFound,
            NodeError::OwnerNotBound { .. } => ErrorCode::PermissionDenied,
            NodeError::Queue(error) => error.code(),
        }
    }

    /// The gRPC status: the code, the message and, for RESOURCE_EXHAUSTED,
    /// the encoded `BackpressureSignal` in the details ([`wire::status`]).
    pub fn status(&self) -> tonic::Status {
        match self {
            NodeError::Queue(error) => wire::status(error),
            other => tonic::Status::new(other.code().grpc(), other.to_string()),
        }
    }

    /// The HTTP/JSON response: the same code and message, and the signal of
    /// RESOURCE_EXHAUSTED as `details.backpressure` in its JSON form.
    pub fn http_response(&self) -> Response<Full<Bytes>> {
        let details = match self {
            NodeError::Queue(error) => error
                .backpressure()
                .map(|signal| serde_json::json!({ "backpressure": super::json::signal(&wire::signal(signal)) })),
            _ => None,
        };
        crate::middleware::http_error_response(self.code(), &self.to_string(), details)
    }
}
