//! Request size limits, the buffered request body, and the namespace a call
//! addresses.

use std::borrow::Cow;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::TryFutureExt;
use futures_util::future::{self, BoxFuture, Either, FutureExt};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
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
///
/// A session's body is a stream of messages that never ends while the
/// session lives: it is passed through unread ([`BufferedBody::streaming`]),
/// and the node bounds each message as it decodes it.
#[derive(Debug, Default)]
pub struct BufferedBody {
    kind: Kind,
}

#[derive(Default)]
enum Kind {
    Buffered {
        data: Bytes,
        sent: bool,
    },
    Streaming(UnsyncBoxBody<Bytes, BoxError>),
    #[default]
    Empty,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Buffered { data, sent } => {
                f.debug_struct("Buffered").field("len", &data.len()).field("sent", sent).finish()
            }
            Kind::Streaming(_) => f.write_str("Streaming"),
            Kind::Empty => f.write_str("Empty"),
        }
    }
}

impl BufferedBody {
    /// Wraps bytes already read.
    pub fn new(data: Bytes) -> Self {
        Self { kind: Kind::Buffered { data, sent: false } }
    }

    /// Passes a stream's body through unread.
    pub fn streaming<B>(body: B) -> Self
    where
        B: Body + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let body = body.map_frame(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())));
        Self { kind: Kind::Streaming(body.map_err(Into::into).boxed_unsync()) }
    }

    /// The whole body, when it was read into memory (empty for an empty
    /// body, `None` for a stream passed through).
    pub fn bytes(&self) -> Option<&Bytes> {
        static EMPTY: Bytes = Bytes::new();
        match &self.kind {
            Kind::Buffered { data, .. } => Some(data),
            Kind::Empty => Some(&EMPTY),
            Kind::Streaming(_) => None,
        }
    }
}

impl Body for BufferedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Buffered { data, sent } => {
                if *sent || data.is_empty() {
                    return Poll::Ready(None);
                }
                *sent = true;
                Poll::Ready(Some(Ok(Frame::data(data.clone()))))
            }
            Kind::Streaming(body) => Pin::new(body).poll_frame(cx),
            Kind::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data, sent } => *sent || data.is_empty(),
            Kind::Streaming(body) => body.is_end_stream(),
            Kind::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Buffered { data, .. } => {
                let remaining = if self.is_end_stream() { 0 } else { data.len() };
                SizeHint::with_exact(u64::try_from(remaining).unwrap_or(u64::MAX))
            }
            Kind::Streaming(body) => body.size_hint(),
            Kind::Empty => SizeHint::with_exact(0),
        }
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
/// ResourceLease call is unary, so buffering costs nothing the handler
/// would not spend anyway, and lets the namespace be read from gRPC bodies.
/// A session's stream is passed through unread
/// ([`BufferedBody::streaming`]): the node bounds each of its messages to
/// the same limit as it decodes them.
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
        let route = request.extensions().get::<RpcRoute>();
        if route.is_some_and(|route| route.procedure.is_session()) {
            let (parts, body) = request.into_parts();
            let request = Request::from_parts(parts, BufferedBody::streaming(body));
            return self.inner.call(request).map_err(Into::into).boxed();
        }
        let limit = route.map_or(self.limits.default_bytes, |route| self.limits.limit_for(route.procedure));
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
/// path, or from field 1 of a gRPC body. A session passes untouched: each
/// of its messages names a namespace of its own. A malformed namespace or body is
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
                let body =
                    request.body().bytes().ok_or_else(|| MiddlewareError::invalid(BODY_FIELD, "was not read"))?;
                grpc_namespace(request.headers(), body, self.limits.limit_for(route.procedure))?
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
        if request.extensions().get::<RpcRoute>().is_some_and(|route| route.procedure.is_session()) {
            // Each message of a session names its namespace; the node checks
            // each against `rpc-shard-key` as this layer does for a call.
            return Either::Left(self.inner.call(request).err_into());
        }
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
