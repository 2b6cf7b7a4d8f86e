//! Size limits, buffering and the namespace of gRPC and HTTP/JSON calls.

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;
use http_body_util::{Full, StreamBody};
use prost::Message;
use tower::ServiceExt;

use super::*;
use crate::proto::resourcelease::v1 as pb;

/// The inner service: counts calls and echoes the body and route it saw.
#[derive(Clone, Default)]
struct Echo(Arc<AtomicUsize>);

impl Service<Request<BufferedBody>> for Echo {
    type Response = (Bytes, Option<RpcRoute>);
    type Error = BoxError;
    type Future = future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<BufferedBody>) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        let route = request.extensions().get::<RpcRoute>().cloned();
        future::ready(Ok((request.body().bytes().cloned().unwrap_or_else(|| Bytes::from_static(b"<stream>")), route)))
    }
}

fn grpc_frame(message: &impl Message) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(encoded.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&encoded);
    Bytes::from(frame)
}

fn gzip_frame(message: &impl Message) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&message.encode_to_vec()).expect("compress");
    let compressed = encoder.finish().expect("compress");
    let mut frame = vec![1u8];
    frame.extend_from_slice(&u32::try_from(compressed.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&compressed);
    Bytes::from(frame)
}

fn grpc_request(procedure: Procedure, body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .uri(procedure.grpc_path())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Full::new(body))
        .expect("request");
    let route = RpcRoute::from_path(Transport::Grpc, request.uri().path()).expect("route");
    request.extensions_mut().insert(route);
    request
}

fn stack(
    limits: RequestLimits,
    inner: Echo,
) -> impl Service<Request<Full<Bytes>>, Response = (Bytes, Option<RpcRoute>), Error = BoxError> {
    tower::ServiceBuilder::new()
        .layer(RequestBodyLimitLayer::new(limits))
        .layer(NamespaceLayer::new(limits))
        .service(inner)
}

fn invalid_field(err: BoxError) -> String {
    match *err.downcast::<MiddlewareError>().expect("middleware error") {
        MiddlewareError::InvalidArgument { field, .. } => field,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[tokio::test]
async fn grpc_namespace_is_read_from_the_body_which_reaches_the_handler_intact() {
    let request = pb::EnqueueRequest {
        namespace: "resourcelease.users".into(),
        payload: Some(pb::ItemPayload { resource_type: "user".into(), resource_id: "42".into(), ..Default::default() }),
        priority: 3,
        ..Default::default()
    };
    let frame = grpc_frame(&request);
    let (body, route) = stack(RequestLimits::default(), Echo::default())
        .oneshot(grpc_request(Procedure::Enqueue, frame.clone()))
        .await
        .expect("valid call");
    assert_eq!(body, frame, "the handler reads the same bytes");
    assert_eq!(route.expect("route").namespace, Some(ShardId::new("resourcelease.users")));

    let mut compressed = grpc_request(Procedure::Enqueue, gzip_frame(&request));
    compressed.headers_mut().insert("grpc-encoding", HeaderValue::from_static("gzip"));
    let (_, route) = stack(RequestLimits::default(), Echo::default()).oneshot(compressed).await.expect("gzip is fine");
    assert_eq!(route.expect("route").namespace, Some(ShardId::new("resourcelease.users")));

    let empty = grpc_frame(&pb::StatsRequest { namespace: String::new() });
    let (_, route) = stack(RequestLimits::default(), Echo::default())
        .oneshot(grpc_request(Procedure::Stats, empty))
        .await
        .expect("empty namespace is the default queue");
    assert_eq!(route.expect("route").namespace, Some(ShardId::new("resourcelease")));
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_the_handler_runs() {
    let echo = Echo::default();
    let calls = echo.0.clone();
    let limits = RequestLimits { default_bytes: 64, restore_bytes: 4096 };
    let big = pb::EnqueueRequest {
        namespace: "resourcelease".into(),
        payload: Some(pb::ItemPayload { body: Bytes::from(vec![7u8; 200]), ..Default::default() }),
        ..Default::default()
    };
    // Declared by content-length.
    let mut request = grpc_request(Procedure::Enqueue, grpc_frame(&big));
    request.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(205));
    let err = stack(limits, echo.clone()).oneshot(request).await.expect_err("too large");
    assert_eq!(invalid_field(err), "request body");

    // Streamed without a length: noticed while reading.
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> =
        (0..3).map(|_| Ok(Frame::data(Bytes::from(vec![0u8; 50])))).collect();
    let mut streamed = Request::builder()
        .uri(Procedure::Enqueue.grpc_path())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .expect("request");
    streamed
        .extensions_mut()
        .insert(RpcRoute::from_path(Transport::Grpc, &Procedure::Enqueue.grpc_path()).expect("route"));
    let service = tower::ServiceBuilder::new().layer(RequestBodyLimitLayer::new(limits)).service(echo.clone());
    let err = service.oneshot(streamed).await.expect_err("too large");
    assert_eq!(invalid_field(err), "request body");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");

    // Restore has its own, larger limit.
    let restore = pb::RestoreRequest {
        namespace: "resourcelease".into(),
        snapshot: Some(pb::DrainSnapshot { namespace: "resourcelease".into(), ..Default::default() }),
    };
    let mut padded = restore.clone();
    padded.snapshot.as_mut().expect("snapshot").items =
        vec![pb::WorkItem { item_id: "x".repeat(100), ..Default::default() }];
    stack(limits, echo.clone())
        .oneshot(grpc_request(Procedure::Restore, grpc_frame(&padded)))
        .await
        .expect("under the restore limit");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn malformed_grpc_bodies_are_invalid_arguments() {
    let cases: Vec<(Bytes, Option<&str>, &str)> = vec![
        (Bytes::from_static(b"\0\0"), None, "request body"),
        (Bytes::from_static(b"\0\0\0\0\x09abc"), None, "request body"),
        (Bytes::from_static(b"\x07\0\0\0\0"), None, "request body"),
        (Bytes::from_static(b"\0\0\0\0\x02\x0a\x05"), None, "request body"),
        (gzip_frame(&pb::StatsRequest { namespace: "resourcelease".into() }), Some("snappy"), "grpc-encoding"),
        (grpc_frame(&pb::StatsRequest { namespace: "Resourcelease".into() }), None, "namespace"),
    ];
    let echo = Echo::default();
    let calls = echo.0.clone();
    for (body, encoding, field) in cases {
        let mut request = grpc_request(Procedure::Stats, body);
        if let Some(encoding) = encoding {
            request.headers_mut().insert("grpc-encoding", HeaderValue::from_static(encoding));
        }
        let err = stack(RequestLimits::default(), echo.clone()).oneshot(request).await.expect_err(field);
        assert_eq!(invalid_field(err), field);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_shard_key_header_must_match_the_namespace() {
    let frame = grpc_frame(&pb::StatsRequest { namespace: "resourcelease.users".into() });
    let mut request = grpc_request(Procedure::Stats, frame.clone());
    request.extensions_mut().insert(ShardKey::new(ShardId::new("resourcelease.billing")));
    let err = stack(RequestLimits::default(), Echo::default()).oneshot(request).await.expect_err("mismatch");
    assert_eq!(invalid_field(err), "rpc-shard-key");

    let mut request = grpc_request(Procedure::Stats, frame);
    request.extensions_mut().insert(ShardKey::new(ShardId::new("resourcelease.users")));
    stack(RequestLimits::default(), Echo::default()).oneshot(request).await.expect("matching key");
}

#[tokio::test]
async fn http_calls_take_the_namespace_from_the_path() {
    let path = Procedure::Lease.http_path(&ShardId::new("resourcelease.hash.03"));
    let mut request = Request::builder()
        .uri(&path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(b"{\"owner\":\"w1\"}")))
        .expect("request");
    request.extensions_mut().insert(RpcRoute::from_path(Transport::Http, &path).expect("route"));
    let (body, route) = stack(RequestLimits::default(), Echo::default()).oneshot(request).await.expect("valid");
    assert_eq!(body, Bytes::from_static(b"{\"owner\":\"w1\"}"));
    assert_eq!(route.expect("route").namespace, Some(ShardId::new("resourcelease.hash.03")));
}

#[tokio::test]
async fn buffered_bodies_are_exact_sized_and_yield_their_bytes_once() {
    let body = BufferedBody::new(Bytes::from_static(b"abc"));
    assert_eq!(body.size_hint().exact(), Some(3));
    assert!(!body.is_end_stream());
    let collected = body.collect().await.expect("never fails").to_bytes();
    assert_eq!(collected, Bytes::from_static(b"abc"));
    assert!(BufferedBody::default().is_end_stream());
}

/// A session's body never ends while the session lives: the layers pass it
/// through unread (no buffering, no namespace), or the session would hang.
#[tokio::test]
async fn session_streams_pass_through_unread() {
    let echo = Echo::default();
    let forever = StreamBody::new(futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>());
    let mut request = Request::builder()
        .uri(Procedure::Session.grpc_path())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(forever)
        .expect("request");
    let route = RpcRoute::from_path(Transport::Grpc, request.uri().path()).expect("route");
    request.extensions_mut().insert(route);
    let limits = RequestLimits { default_bytes: 1, restore_bytes: 1 };
    let service = tower::ServiceBuilder::new()
        .layer(RequestBodyLimitLayer::new(limits))
        .layer(NamespaceLayer::new(limits))
        .service(echo.clone());
    let (body, route) = tokio::time::timeout(std::time::Duration::from_secs(5), service.oneshot(request))
        .await
        .expect("not buffered")
        .expect("passed through");
    assert_eq!(body, Bytes::from_static(b"<stream>"));
    assert_eq!(route.expect("route").namespace, None, "a session has no namespace of its own");
    assert_eq!(echo.0.load(Ordering::SeqCst), 1);
}
