//! Request size limits, the buffered request body, and the namespace a call
//! addresses.

use std::borrow::Cow;
use std::convert::Infallible;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::TryFutureExt;
use futures_util::future::{self, BoxFuture, Either, FutureExt};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::{Layer, Service};

use super::defaults::{MAX_REQUEST_BYTES, MAX_RESTORE_REQUEST_BYTES};
use super::{BoxError, MiddlewareError, Procedure, RpcRoute, Transport};
use crate::ShardId;
use crate::shard::{SHARD_KEY_HEADER, ShardKey, parse_namespace};

/// The field name errors about the body use.
const BODY_FIELD: &str = "request body";

/// Largest request body per procedure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Every procedure but `Restore`.
    pub default_bytes: usize,
    /// `Restore`, which carries a whole drain snapshot.
    pub restore_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { default_bytes: MAX_REQUEST_BYTES, restore_bytes: MAX_RESTORE_REQUEST_BYTES }
    }
}

impl RequestLimits {
    /// The limit for one procedure.
    pub fn limit_for(&self, procedure: Procedure) -> usize {
        match procedure {
            Procedure::Restore => self.restore_bytes,
            _ => self.default_bytes,
        }
    }
}

/// A request body read into memory by [`RequestBodyLimit`]. The inner
/// service reads it like any body; middleware can look at the bytes.
#[derive(Debug, Clone, Default)]
pub struct BufferedBody {
    data: Bytes,
    sent: bool,
}

impl BufferedBody {
    /// Wraps bytes already read.
    pub fn new(data: Bytes) -> Self {
        Self { data, sent: false }
    }

    /// The whole body.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }
}

impl Body for BufferedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent || self.data.is_empty() {
            return Poll::Ready(None);
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(self.data.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent || self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let remaining = if self.is_end_stream() { 0 } else { self.data.len() };
        SizeHint::with_exact(u64::try_from(remaining).unwrap_or(u64::MAX))
    }
}

/// Layer of [`RequestBodyLimit`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestBodyLimitLayer {
    limits: RequestLimits,
}

impl RequestBodyLimitLayer {
    /// Applies `limits`.
    pub fn new(limits: RequestLimits) -> Self {
        Self { limits }
    }
}

impl<S> Layer<S> for RequestBodyLimitLayer {
    type Service = RequestBodyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestBodyLimit { inner, limits: self.limits }
    }
}

/// Reads the request body, up to the procedure's limit, into a
/// [`BufferedBody`] before calling the inner service. A larger body (by its
/// `content-length`, or once reading passes the limit) is INVALID_ARGUMENT
/// naming `request body`, and the inner service never runs. Every
/// ResourceLease procedure is unary, so buffering costs nothing the handler
/// would not spend anyway, and lets the namespace be read from gRPC bodies.
///
/// `poll_ready` is the inner service's readiness; the readiness travels with
/// the call into the future while the body is read.
#[derive(Debug, Clone)]
pub struct RequestBodyLimit<S> {
    inner: S,
    limits: RequestLimits,
}

impl<S, B> Service<Request<B>> for RequestBodyLimit<S>
where
    S: Service<Request<BufferedBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = request
            .extensions()
            .get::<RpcRoute>()
            .map_or(self.limits.default_bytes, |route| self.limits.limit_for(route.procedure));
        let too_large = move || MiddlewareError::invalid(BODY_FIELD, format!("larger than the limit of {limit} bytes"));
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > u64::try_from(limit).unwrap_or(u64::MAX)) {
            return future::ready(Err(Box::new(too_large()) as BoxError)).boxed();
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = request.into_parts();
        async move {
            let bytes = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(err) if err.is::<LengthLimitError>() => return Err(Box::new(too_large()) as BoxError),
                Err(err) => {
                    return Err(
                        Box::new(MiddlewareError::invalid(BODY_FIELD, format!("could not be read: {err}"))) as BoxError
                    );
                }
            };
            inner.call(Request::from_parts(parts, BufferedBody::new(bytes))).await.map_err(Into::into)
        }
        .boxed()
    }
}

/// Reads only the `namespace` field (number 1 in every ResourceLease request,
/// which a test checks against the descriptors); protobuf decoding skips the
/// other fields.
#[derive(Clone, PartialEq, prost::Message)]
struct NamespaceProbe {
    #[prost(string, tag = "1")]
    namespace: String,
}

/// The namespace of a unary gRPC request body: one length-prefixed message,
/// gzip-decompressed when flagged (bounded by `limit`).
fn grpc_namespace(headers: &HeaderMap, body: &[u8], limit: usize) -> Result<ShardId, MiddlewareError> {
    let frame_error = |reason: &str| MiddlewareError::invalid(BODY_FIELD, reason);
    if body.len() < 5 {
        return Err(frame_error("not a gRPC message frame"));
    }
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
    let message = &body[5..];
    if usize::try_from(length).ok() != Some(message.len()) {
        return Err(frame_error("expected exactly one gRPC message"));
    }
    let message: Cow<'_, [u8]> = match body[0] {
        0 => Cow::Borrowed(message),
        1 => {
            let encoding = headers.get("grpc-encoding").and_then(|v| v.to_str().ok()).unwrap_or("identity");
            if encoding != "gzip" {
                return Err(MiddlewareError::invalid(
                    "grpc-encoding",
                    format!("unsupported message encoding {encoding:?}"),
                ));
            }
            let mut decoded = Vec::new();
            let bound = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
            flate2::read::GzDecoder::new(message)
                .take(bound)
                .read_to_end(&mut decoded)
                .map_err(|_| frame_error("compressed message is not valid gzip"))?;
            if decoded.len() > limit {
                return Err(frame_error(&format!("decompressed message is larger than the limit of {limit} bytes")));
            }
            Cow::Owned(decoded)
        }
        _ => return Err(frame_error("unknown gRPC compression flag")),
    };
    let probe = <NamespaceProbe as prost::Message>::decode(message.as_ref())
        .map_err(|_| frame_error("not a valid protobuf message"))?;
    Ok(parse_namespace("namespace", &probe.namespace)?)
}

/// Layer of [`Namespace`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NamespaceLayer {
    limits: RequestLimits,
}

impl NamespaceLayer {
    /// Bounds gzip decompression by the same `limits` as the raw body.
    pub fn new(limits: RequestLimits) -> Self {
        Self { limits }
    }
}

impl<S> Layer<S> for NamespaceLayer {
    type Service = Namespace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Namespace { inner, limits: self.limits }
    }
}

/// Completes the call's [`RpcRoute`] with its namespace: from the HTTP/JSON
/// path, or from field 1 of a gRPC body. A malformed namespace or body is
/// INVALID_ARGUMENT, and so is an `rpc-shard-key` that names another
/// namespace than the request (gateways route on the header, so it must not
/// lie). Records `rpc.shard_key` when the header did not.
///
/// `poll_ready` is the inner service's readiness.
#[derive(Debug, Clone)]
pub struct Namespace<S> {
    inner: S,
    limits: RequestLimits,
}

impl<S> Namespace<S> {
    fn resolve(&self, request: &Request<BufferedBody>) -> Result<ShardId, MiddlewareError> {
        let route = request
            .extensions()
            .get::<RpcRoute>()
            .ok_or_else(|| MiddlewareError::UnknownProcedure { path: request.uri().path().to_string() })?;
        let namespace = match (&route.namespace, route.transport) {
            (Some(namespace), _) => namespace.clone(),
            (None, Transport::Grpc) => {
                grpc_namespace(request.headers(), request.body().bytes(), self.limits.limit_for(route.procedure))?
            }
            (None, Transport::Http) => parse_namespace("namespace", "")?,
        };
        if let Some(key) = request.extensions().get::<ShardKey>()
            && key.shard() != &namespace
        {
            return Err(MiddlewareError::invalid(
                SHARD_KEY_HEADER,
                format!("names {} but the request addresses {namespace}", key.shard()),
            ));
        }
        Ok(namespace)
    }
}

impl<S> Service<Request<BufferedBody>> for Namespace<S>
where
    S: Service<Request<BufferedBody>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Either<future::ErrInto<S::Future, BoxError>, future::Ready<Result<S::Response, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<BufferedBody>) -> Self::Future {
        match self.resolve(&request) {
            Ok(namespace) => {
                if request.extensions().get::<ShardKey>().is_none() {
                    tracing::Span::current().record("rpc.shard_key", namespace.as_str());
                }
                if let Some(route) = request.extensions_mut().get_mut::<RpcRoute>() {
                    route.namespace = Some(namespace);
                }
                Either::Left(self.inner.call(request).err_into())
            }
            Err(err) => Either::Right(future::ready(Err(Box::new(err) as BoxError))),
        }
    }
}

#[cfg(test)]
mod tests;
