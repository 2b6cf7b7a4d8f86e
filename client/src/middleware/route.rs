//! Which procedure a call addresses, and the `rpc-shard-key` header.

use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::{self, Either};
use http::Request;
use tower::{Layer, Service};

use super::{BoxError, MiddlewareError, RESOURCE_LEASE_SERVICE, RpcRoute, Transport};
use crate::shard::ShardKey;

/// Layer of [`Route`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteLayer;

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Route { inner }
    }
}

/// Classifies each call: inserts its [`RpcRoute`] (procedure, and the
/// namespace of an HTTP/JSON path) and, when present, its validated
/// [`ShardKey`] into the extensions, and records `rpc.service`,
/// `rpc.procedure`, `resourcelease.operation` and `rpc.shard_key` on the
/// current span. A path outside the ResourceLease surface is NOT_FOUND and a
/// malformed `rpc-shard-key` INVALID_ARGUMENT, before the inner service runs.
///
/// `poll_ready` is the inner service's readiness.
#[derive(Debug, Clone)]
pub struct Route<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Route<S>
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
        let span = tracing::Span::current();
        let transport = Transport::of(request.headers());
        let classified = RpcRoute::from_path(transport, request.uri().path()).and_then(|route| {
            let key = ShardKey::from_headers(request.headers()).map_err(MiddlewareError::from)?;
            Ok((route, key))
        });
        match classified {
            Ok((route, key)) => {
                span.record("rpc.service", RESOURCE_LEASE_SERVICE);
                span.record("rpc.procedure", route.procedure.grpc_method());
                span.record("resourcelease.operation", route.procedure.as_str());
                if let Some(key) = &key {
                    span.record("rpc.shard_key", key.shard().as_str());
                }
                request.extensions_mut().insert(route);
                if let Some(key) = key {
                    request.extensions_mut().insert(key);
                }
                Either::Left(self.inner.call(request).err_into())
            }
            Err(err) => Either::Right(future::ready(Err(Box::new(err) as BoxError))),
        }
    }
}
