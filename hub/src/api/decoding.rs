//! Undecodable requests are the caller's fault: [`DecodeErrorsLayer`]
//! answers them INVALID_ARGUMENT, as the mesh node does.
//!
//! tonic's protobuf codec reports a request that does not decode as
//! INTERNAL, which the hub reserves for its own faults (a corrupt log above
//! all: the node treats INTERNAL from the hub as corruption). A unary call
//! whose request fails to decode is answered before the handler runs, with
//! the status in the response headers ("trailers only"); this layer rewrites
//! exactly that answer. Streams are handled where they are read (see the
//! append stream in [`crate::api::service`]).

use std::task::{Context, Poll};

use futures_util::TryFutureExt as _;
use futures_util::future::MapOk;
use tower::{Layer, Service};

/// The text tonic's codec starts a decode failure with (prost's
/// `DecodeError` display).
const DECODE_FAILURE: &str = "failed to decode Protobuf message";

/// Layer of [`DecodeErrors`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeErrorsLayer;

impl<S> Layer<S> for DecodeErrorsLayer {
    type Service = DecodeErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeErrors { inner }
    }
}

/// Rewrites an INTERNAL "failed to decode" answer into INVALID_ARGUMENT
/// naming the request; every other response passes unchanged.
///
/// `poll_ready` is the inner service's readiness.
#[derive(Debug, Clone)]
pub struct DecodeErrors<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for DecodeErrors<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = MapOk<S::Future, fn(http::Response<R>) -> http::Response<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.inner.call(request).map_ok(rewrite as fn(http::Response<R>) -> http::Response<R>)
    }
}

fn rewrite<R>(mut response: http::Response<R>) -> http::Response<R> {
    let Some(status) = tonic::Status::from_header_map(response.headers()) else { return response };
    if status.code() != tonic::Code::Internal || !status.message().starts_with(DECODE_FAILURE) {
        return response;
    }
    let refusal = tonic::Status::invalid_argument(format!("request: {}", status.message()));
    tracing::debug!(error = %refusal.message(), "refusing an undecodable request");
    if refusal.add_header(response.headers_mut()).is_err() {
        tracing::debug!("could not rewrite the status of an undecodable request");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_failures_become_invalid_argument_and_others_pass() {
        let answer = |status: tonic::Status| {
            let mut response = http::Response::new(());
            status.add_header(response.headers_mut()).expect("a valid status");
            tonic::Status::from_header_map(rewrite(response).headers()).expect("a status")
        };
        let decoded = answer(tonic::Status::internal("failed to decode Protobuf message: invalid wire type"));
        assert_eq!(decoded.code(), tonic::Code::InvalidArgument);
        assert!(decoded.message().starts_with("request: failed to decode"), "{}", decoded.message());
        let corrupt = answer(tonic::Status::internal("shard s: event 3 is corrupt"));
        assert_eq!(corrupt.code(), tonic::Code::Internal, "the hub's own INTERNAL stays");
        assert_eq!(answer(tonic::Status::not_found("x")).code(), tonic::Code::NotFound);
        let ok = rewrite(http::Response::new(()));
        assert!(tonic::Status::from_header_map(ok.headers()).is_none());
    }
}
