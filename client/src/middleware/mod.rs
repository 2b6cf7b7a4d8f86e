//! The middleware every ResourceLease call passes, the same for gRPC (tonic)
//! and HTTP/JSON (axum): tower layers over `http::Request`, assembled by
//! [`mesh_stack`] (or [`MeshLayer`]) outermost first.
//!
//! | layer | refuses with | adds |
//! |---|---|---|
//! | [`RpcTrace`] | | the `rpc` span |
//! | [`ErrorResponse`] | | renders every refusal for the caller's transport |
//! | [`Route`] | NOT_FOUND, INVALID_ARGUMENT (`rpc-shard-key`) | [`RpcRoute`], [`ShardKey`](crate::shard::ShardKey) |
//! | [`DeadlinePropagation`] | INVALID_ARGUMENT, DEADLINE_EXCEEDED | [`CallDeadline`] |
//! | [`PrincipalBinding`] | UNAUTHENTICATED | [`Caller`] |
//! | [`RequestBodyLimit`] | INVALID_ARGUMENT (`request body`) | [`BufferedBody`] |
//! | [`Namespace`] | INVALID_ARGUMENT (`namespace`, `rpc-shard-key`) | the namespace in [`RpcRoute`] |
//! | [`Authorize`] | PERMISSION_DENIED | |
//! | concurrency limiter slot | RESOURCE_EXHAUSTED | |
//!
//! Every refusal happens before the inner service runs, so a refused call
//! changes nothing. Errors are [`MiddlewareError`]s mapped once through
//! [`ErrorCode`](crate::ErrorCode).
//!
//! ```
//! use omnirelay_client::middleware::{AuthorizationTable, MeshLayer, MiddlewareConfig, PrincipalConfig, TrustedProxies};
//!
//! let table = AuthorizationTable::from_json(
//!     r#"{"rules": [{"roles": ["worker"], "procedures": ["lease", "heartbeat", "complete", "fail"], "shards": ["*"]}]}"#,
//! )
//! .expect("valid table");
//! let config = MiddlewareConfig {
//!     principal: PrincipalConfig::new().trusted_proxies(TrustedProxies::parse(&["10.0.0.0/8"]).expect("valid")),
//!     authorization: table,
//!     ..MiddlewareConfig::default()
//! };
//! // tonic: Server::builder().layer(layer).add_service(...); axum: Router::new()...layer(layer).
//! let layer = MeshLayer::new(config);
//! # let _ = layer;
//! ```

mod authz;
mod body;
/// The connection a request came on (the identity layer's, shared with the hub).
pub use omnirelay_identity::connection;
mod deadline;
pub mod defaults;
mod error;
pub mod principal;
mod procedure;
mod rejection;
mod route;
#[cfg(test)]
pub(crate) mod test_pki;
mod trace;

use tower::layer::util::Identity;
use tower::{Layer, ServiceBuilder};

pub use authz::{AuthorizationConfig, AuthorizationTable, Authorize, AuthorizeLayer, RuleConfig};
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
pub use rejection::{ErrorResponse, ErrorResponseFuture, ErrorResponseLayer, error_response, http_error_response};
pub use route::{Route, RouteLayer};
pub use trace::{OtlpConfig, OtlpGuard, RpcTrace, RpcTraceFuture, RpcTraceLayer, TelemetryError, otlp_layer};

/// The error type of the layers: a boxed [`MiddlewareError`] for refusals,
/// or whatever the inner service failed with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything the stack needs to know.
#[derive(Debug, Clone, Default)]
pub struct MiddlewareConfig {
    /// How callers are identified. The default identifies nobody, so every
    /// call is UNAUTHENTICATED until a source is configured.
    pub principal: PrincipalConfig,
    /// Who may call what. The default denies everything.
    pub authorization: AuthorizationTable,
    /// Default and maximum deadlines.
    pub deadlines: DeadlineConfig,
    /// Request size limits.
    pub limits: RequestLimits,
}

/// The service [`mesh_stack`] builds around `S` (the inner service, after
/// the concurrency limiter in the slot).
pub type MeshService<S> =
    RpcTrace<ErrorResponse<Route<DeadlinePropagation<PrincipalBinding<RequestBodyLimit<Namespace<Authorize<S>>>>>>>>;

/// The whole stack as one layer, for `tonic::transport::Server::layer` and
/// `axum::Router::layer`. `R` is the layer in the concurrency-limiter slot
/// ([`Identity`] until one is set with [`MeshLayer::with_concurrency_limiter`]).
#[derive(Debug, Clone)]
pub struct MeshLayer<R = Identity> {
    deadlines: DeadlinePropagationLayer,
    principal: PrincipalBindingLayer,
    limits: RequestLimits,
    authorize: AuthorizeLayer,
    concurrency_limiter: R,
}

impl MeshLayer {
    /// The stack for `config`, with an empty concurrency-limiter slot.
    pub fn new(config: MiddlewareConfig) -> Self {
        Self {
            deadlines: DeadlinePropagationLayer::new(config.deadlines),
            principal: PrincipalBindingLayer::new(config.principal),
            limits: config.limits,
            authorize: AuthorizeLayer::new(config.authorization),
            concurrency_limiter: Identity::new(),
        }
    }
}

impl<R> MeshLayer<R> {
    /// The authorization table the stack enforces (shared, not copied): the
    /// node checks each message of a session against it.
    pub fn authorization(&self) -> &std::sync::Arc<AuthorizationTable> {
        self.authorize.table()
    }

    /// Puts a layer in the concurrency-limiter slot: the queue's
    /// `BackpressureAwareConcurrencyLimiter` (from `crate::backpressure`), or any
    /// tower limiter. See [`mesh_stack`] for where it sits and why.
    pub fn with_concurrency_limiter<L>(self, concurrency_limiter: L) -> MeshLayer<L> {
        MeshLayer {
            deadlines: self.deadlines,
            principal: self.principal,
            limits: self.limits,
            authorize: self.authorize,
            concurrency_limiter,
        }
    }
}

impl<S, R: Layer<S>> Layer<S> for MeshLayer<R> {
    type Service = MeshService<R::Service>;

    fn layer(&self, inner: S) -> Self::Service {
        mesh_stack(inner, self)
    }
}

/// Builds the middleware stack around `inner` (tonic's `Routes` or an axum
/// `Router`), outermost first. The order is the design: each layer runs only
/// for calls every layer above it let through.
pub fn mesh_stack<S, R: Layer<S>>(inner: S, layers: &MeshLayer<R>) -> MeshService<R::Service> {
    ServiceBuilder::new()
        // 1. Tracing, outermost, so that every call gets a span, refused ones
        //    included, and the span times the whole call; the layers below
        //    record their findings into it.
        .layer(RpcTraceLayer)
        // 2. Error rendering: the single place a refusal becomes a gRPC
        //    status or an HTTP status with a JSON body, so both transports
        //    answer alike. Everything below may fail with a MiddlewareError.
        .layer(ErrorResponseLayer)
        // 3. Routing: which procedure (and, for HTTP/JSON, which namespace);
        //    cheap, and everything after needs it. Unknown paths stop here.
        .layer(RouteLayer)
        // 4. Deadline: as early as possible, so the caller's deadline bounds
        //    authentication, body reading, queueing in the limiter and the
        //    handler alike.
        .layer(layers.deadlines)
        // 5. Principal binding before the body is read: an unauthenticated
        //    caller cannot make the node buffer megabytes.
        .layer(layers.principal.clone())
        // 6. Size limit: reads the body into memory, bounded per procedure.
        .layer(RequestBodyLimitLayer::new(layers.limits))
        // 7. Namespace: from the path, or field 1 of the buffered gRPC body;
        //    authorization is per shard, so it must know the namespace.
        .layer(NamespaceLayer::new(layers.limits))
        // 8. Authorization: default deny, by principal or role, procedure and
        //    shard.
        .layer(layers.authorize.clone())
        // 9. Concurrency-limiter slot, innermost, for the queue's
        //    BackpressureAwareConcurrencyLimiter: it sees only authenticated,
        //    authorized, well-formed calls, so refused traffic never takes a
        //    permit, and it sheds load with RESOURCE_EXHAUSTED (as a
        //    MiddlewareError::Rejected or tower's Overloaded) that layer 2
        //    renders. Empty until set with MeshLayer::with_concurrency_limiter.
        .service(layers.concurrency_limiter.layer(inner))
}

#[cfg(test)]
mod tests;
