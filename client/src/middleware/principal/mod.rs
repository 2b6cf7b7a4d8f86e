//! Principal binding: who is calling, normalized into one [`Caller`]. The
//! binding itself is the identity layer's ([`PrincipalConfig::authenticate`],
//! shared with the hub); this module is its tower layer.
//!
//! Three sources, tried in this order (see `docs/mesh-security.md`):
//!
//! 1. `x-client-principal` (and optionally `x-mtls-thumbprint` and
//!    `x-client-roles`) from a configured trusted proxy that terminated TLS,
//!    or from a node forwarding the call that authenticated as a trusted
//!    forwarder (see `docs/mesh-node.md`, "Forwarding"). The same headers
//!    from anyone else are refused.
//! 2. The client certificate of a mutual-TLS connection: its single SAN URI.
//! 3. A JWT in `authorization: Bearer`, verified by [`JwtVerifier`].
//!
//! Any credential that is present must be valid, even when a higher-ranked one
//! already identified the caller: a bad token next to a good certificate is a
//! client bug or an attack, and is refused. The caller lands in the request
//! extensions and in the `rpc.principal` span field.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::{self, Either};
use http::Request;
use tower::{Layer, Service};

pub use omnirelay_identity::{
    CLIENT_PRINCIPAL_HEADER, CLIENT_ROLES_HEADER, Caller, ClientCertPolicy, CredentialSource, DEFAULT_ROLES_CLAIM,
    JwtVerifier, MTLS_THUMBPRINT_HEADER, PrincipalConfig, TrustedProxies,
};

use super::BoxError;
use super::connection::ConnectionInfo;
use super::error::MiddlewareError;

/// Layer of [`PrincipalBinding`].
#[derive(Debug, Clone)]
pub struct PrincipalBindingLayer {
    config: Arc<PrincipalConfig>,
}

impl PrincipalBindingLayer {
    /// Binds callers as `config` says.
    pub fn new(config: PrincipalConfig) -> Self {
        Self { config: Arc::new(config) }
    }
}

impl<S> Layer<S> for PrincipalBindingLayer {
    type Service = PrincipalBinding<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PrincipalBinding { inner, config: self.config.clone() }
    }
}

/// Identifies the caller of every request and inserts a [`Caller`] into its
/// extensions; a request that cannot be identified fails with
/// UNAUTHENTICATED and never reaches the inner service.
///
/// `poll_ready` is the inner service's readiness: this layer has no capacity
/// of its own. A refused request leaves the readiness it was granted unused
/// (the next call uses it), so refusals cost the inner service nothing.
#[derive(Debug, Clone)]
pub struct PrincipalBinding<S> {
    inner: S,
    config: Arc<PrincipalConfig>,
}

impl<S, B> Service<Request<B>> for PrincipalBinding<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Either<future::ErrInto<S::Future, BoxError>, future::Ready<Result<S::Response, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let connection = ConnectionInfo::from_extensions(request.extensions());
        match self.config.authenticate(request.headers(), &connection) {
            Ok(caller) => {
                tracing::Span::current().record("rpc.principal", caller.principal.as_str());
                request.extensions_mut().insert(caller);
                Either::Left(self.inner.call(request).err_into())
            }
            Err(err) => {
                tracing::debug!(error = %err, peer = ?connection.remote_addr, "refusing unauthenticated call");
                Either::Right(future::ready(Err(Box::new(MiddlewareError::from(err)) as BoxError)))
            }
        }
    }
}

#[cfg(test)]
mod tests;
