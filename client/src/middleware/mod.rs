//! The middleware every ResourceLease call passes, the same for gRPC (tonic)
//! and HTTP/JSON (axum): tower layers over `http::Request`.
//!
//! WIP: assembled in `mesh_stack` once all layers exist.

mod body;
pub mod connection;
mod deadline;
pub mod defaults;
mod error;
pub mod principal;
mod procedure;
mod rejection;
mod route;
#[cfg(test)]
pub(crate) mod test_pki;

pub use body::{BufferedBody, Namespace, NamespaceLayer, RequestBodyLimit, RequestBodyLimitLayer, RequestLimits};
pub use connection::{ClientCertChain, ConnectionInfo, RemoteAddr};
pub use deadline::{
    CallDeadline, DeadlineConfig, DeadlineFuture, DeadlinePropagation, DeadlinePropagationLayer, GRPC_TIMEOUT_HEADER,
    TIMEOUT_MS_HEADER, parse_grpc_timeout, requested_timeout,
};
pub use error::{ConfigError, CredentialError, MiddlewareError};
pub use principal::{
    Caller, ClientCertPolicy, CredentialSource, JwtVerifier, PrincipalBinding, PrincipalBindingLayer, PrincipalConfig,
    TrustedProxies,
};
pub use procedure::{HTTP_PATH_PREFIX, Procedure, RESOURCE_LEASE_SERVICE, RpcRoute, Transport};
pub use rejection::{ErrorResponse, ErrorResponseFuture, ErrorResponseLayer, error_response};
pub use route::{Route, RouteLayer};

/// The error type of the layers: a boxed [`MiddlewareError`] for refusals,
/// or whatever the inner service failed with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
