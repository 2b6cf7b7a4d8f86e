//! The node's error boundary: what a ResourceLease call can fail with once
//! the middleware let it through, rendered the same for gRPC and HTTP/JSON.

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use omnirelay_proto::resourcelease::v1 as pb;

use crate::ErrorCode;
use crate::ids::{PeerId, Principal, ShardId};
use crate::queue::QueueError;
use crate::wire::{self, WireError};

/// Metadata (gRPC) and header (HTTP/JSON) naming the node id that owns a
/// namespace, on a call that reached another node.
pub const OWNER_HEADER: &str = "omnirelay-owner";

/// Metadata and header with the owner's advertised address (a URL).
pub const OWNER_ADDRESS_HEADER: &str = "omnirelay-owner-address";

/// Results of node calls.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// Why the node refused a call. A refused call changed nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeError {
    /// The namespace is valid but this node hosts no queue for it.
    #[error("namespace {0} is not hosted by this node")]
    UnknownNamespace(ShardId),
    /// Another node of the mesh is assigned the namespace. gRPC: UNAVAILABLE
    /// with the owner in the `omnirelay-owner` and
    /// `omnirelay-owner-address` metadata; HTTP/JSON: 421 Misdirected
    /// Request with the same headers.
    #[error("namespace {namespace} is served by node {owner}{}", address.as_deref().map(|a| format!(" at {a}")).unwrap_or_default())]
    NotOwner {
        /// The namespace.
        namespace: ShardId,
        /// The node id of its owner.
        owner: String,
        /// The address the owner advertised, if it did.
        address: Option<String>,
    },
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
    /// The owner this node forwarded the call to answered with an error
    /// (see [`super::forward`]): passed back as the owner gave it, code,
    /// message, details and metadata.
    #[error("{}", .0.0.message())]
    Forwarded(ForwardedStatus),
    /// The queue refused the call (including malformed input, which carries
    /// the field).
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// The owner's answer to a forwarded call, compared by code and message.
#[derive(Debug, Clone)]
pub struct ForwardedStatus(pub tonic::Status);

impl PartialEq for ForwardedStatus {
    fn eq(&self, other: &Self) -> bool {
        self.0.code() == other.0.code() && self.0.message() == other.0.message()
    }
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
            NodeError::NotOwner { .. } => ErrorCode::Unavailable,
            NodeError::NoCaller => ErrorCode::Unauthenticated,
            NodeError::NotACall(_) => ErrorCode::NotFound,
            NodeError::OwnerNotBound { .. } => ErrorCode::PermissionDenied,
            NodeError::Forwarded(status) => ErrorCode::from_grpc(status.0.code()),
            NodeError::Queue(error) => error.code(),
        }
    }

    /// The gRPC status: the code, the message and, for RESOURCE_EXHAUSTED,
    /// the encoded `BackpressureSignal` in the details ([`wire::status`]).
    pub fn status(&self) -> tonic::Status {
        match self {
            NodeError::Queue(error) => wire::status(error),
            NodeError::Forwarded(status) => status.0.clone(),
            NodeError::NotOwner { owner, address, .. } => {
                let mut status = tonic::Status::new(self.code().grpc(), self.to_string());
                // Ids and addresses are printable ASCII (checked when the
                // member lease is read), so both are valid metadata.
                if let Ok(value) = owner.parse() {
                    status.metadata_mut().insert(OWNER_HEADER, value);
                }
                if let Some(Ok(value)) = address.as_deref().map(str::parse) {
                    status.metadata_mut().insert(OWNER_ADDRESS_HEADER, value);
                }
                status
            }
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
            NodeError::Forwarded(status) if status.0.code() == tonic::Code::ResourceExhausted => {
                <pb::BackpressureSignal as prost::Message>::decode(status.0.details())
                    .ok()
                    .map(|signal| serde_json::json!({ "backpressure": super::json::signal(&signal) }))
            }
            _ => None,
        };
        let mut response = crate::middleware::http_error_response(self.code(), &self.to_string(), details);
        if let NodeError::Forwarded(status) = self
            && let Some(owner) = status.0.metadata().get(OWNER_HEADER).and_then(|value| value.to_str().ok())
        {
            // The node reached is not the owner either (the membership moved
            // while the call was forwarded): the caller gets its redirect.
            *response.status_mut() = http::StatusCode::MISDIRECTED_REQUEST;
            for (name, value) in
                [(OWNER_HEADER, Some(owner)), (OWNER_ADDRESS_HEADER, header(&status.0, OWNER_ADDRESS_HEADER))]
            {
                if let Some(Ok(value)) = value.map(http::HeaderValue::from_str) {
                    response.headers_mut().insert(name, value);
                }
            }
        }
        if let NodeError::NotOwner { owner, address, .. } = self {
            *response.status_mut() = http::StatusCode::MISDIRECTED_REQUEST;
            if let Ok(value) = http::HeaderValue::from_str(owner) {
                response.headers_mut().insert(OWNER_HEADER, value);
            }
            if let Some(Ok(value)) = address.as_deref().map(http::HeaderValue::from_str) {
                response.headers_mut().insert(OWNER_ADDRESS_HEADER, value);
            }
        }
        response
    }
}

fn header<'a>(status: &'a tonic::Status, name: &str) -> Option<&'a str> {
    status.metadata().get(name).and_then(|value| value.to_str().ok())
}
