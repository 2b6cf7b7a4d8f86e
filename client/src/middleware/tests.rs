//! The assembled stack: the same refusals on gRPC and HTTP/JSON, all before
//! the handler runs, and an axum router behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message;
use serde_json::json;
use tower::{Service, ServiceExt};

use super::*;
use crate::proto::resourcelease::v1 as pb;
use crate::{ErrorCode, ShardId};

const ISSUER: &str = "https://sts.omnirelay.example";
const AUDIENCE: &str = "omnirelay-mesh";

struct Fixture {
    signing: EncodingKey,
    layer: MeshLayer,
}

fn fixture() -> Fixture {
    let key = rcgen::KeyPair::generate().expect("ec key");
    let verifier =
        JwtVerifier::from_public_key_pem(Algorithm::ES256, key.public_key_pem().as_bytes(), ISSUER, AUDIENCE)
            .expect("verifier");
    let table = AuthorizationTable::from_json(
        r#"{"rules": [
            {"name": "workers", "roles": ["worker"], "procedures": ["lease", "heartbeat", "complete", "fail", "stats"], "shards": ["resourcelease.users"]}
        ]}"#,
    )
    .expect("valid table");
    let config = MiddlewareConfig {
        principal: PrincipalConfig::new().jwt(verifier),
        authorization: table,
        limits: RequestLimits { default_bytes: 1024, restore_bytes: 4096 },
        ..MiddlewareConfig::default()
    };
    Fixture {
        signing: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("key"),
        layer: MeshLayer::new(config),
    }
}

fn token(fixture: &Fixture, roles: &[&str], audience: &str) -> String {
    let now = i64::try_from(jsonwebtoken::get_current_timestamp()).expect("fits");
    let claims = json!({ "sub": "worker-1", "iss": ISSUER, "aud": audience, "exp": now + 600, "roles": roles });
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &fixture.signing).expect("sign")
}

/// What the handler saw of a call that reached it.
#[derive(Debug, Clone)]
struct Seen {
    caller: Caller,
    route: RpcRoute,
    deadline: CallDeadline,
}

/// The handler stand-in: counts calls and keeps what the middleware added.
#[derive(Clone, Default)]
struct Handler {
    calls: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
}

impl Service<Request<BufferedBody>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<BufferedBody>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let extensions = request.extensions();
        if let (Some(caller), Some(route), Some(deadline)) =
            (extensions.get::<Caller>(), extensions.get::<RpcRoute>(), extensions.get::<CallDeadline>())
        {
            self.seen.lock().expect("test mutex").push(Seen {
                caller: caller.clone(),
                route: route.clone(),
                deadline: *deadline,
            });
        }
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"handled")))))
    }
}

/// One call, described once and sent over either transport.
struct Call {
    procedure: Procedure,
    namespace: &'static str,
    bearer: Option<String>,
    headers: Vec<(&'static str, String)>,
    padding: usize,
}

impl Call {
    fn new(procedure: Procedure, namespace: &'static str, bearer: Option<String>) -> Self {
        Self { procedure, namespace, bearer, headers: Vec::new(), padding: 0 }
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    fn padded(mut self, bytes: usize) -> Self {
        self.padding = bytes;
        self
    }

    fn request(&self, transport: Transport) -> Request<Full<Bytes>> {
        let (uri, content_type, body) = match transport {
            Transport::Grpc => {
                // Every request message has the namespace as field 1; a
                // purge request lets the test pad the body with item ids.
                let message = pb::PurgeDeadLettersRequest {
                    namespace: self.namespace.to_string(),
                    item_ids: vec!["x".repeat(self.padding)],
                    all: false,
                };
                let encoded = message.encode_to_vec();
                let mut frame = vec![0u8];
                frame.extend_from_slice(&u32::try_from(encoded.len()).expect("small").to_be_bytes());
                frame.extend_from_slice(&encoded);
                (self.procedure.grpc_path(), "application/grpc", Bytes::from(frame))
            }
            Transport::Http => {
                let body = json!({ "padding": "x".repeat(self.padding) }).to_string();
                let namespace = ShardId::new(self.namespace);
                (self.procedure.http_path(&namespace), "application/json", Bytes::from(body))
            }
        };
        let mut request =
            Request::post(uri).header(http::header::CONTENT_TYPE, content_type).body(Full::new(body)).expect("request");
        if let Some(token) = &self.bearer {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii"));
        }
        for (name, value) in &self.headers {
            request.headers_mut().insert(*name, HeaderValue::from_str(value).expect("ascii"));
        }
        request
    }
}

/// The code a response carries, whichever transport it is.
fn outcome<B>(transport: Transport, response: &Response<B>) -> Option<ErrorCode> {
    match transport {
        Transport::Grpc => tonic::Status::from_header_map(response.headers()).map(|s| ErrorCode::from_grpc(s.code())),
        Transport::Http => (!response.status().is_success())
            .then(|| *ErrorCode::ALL.iter().find(|c| c.http_status() == response.status()).expect("a mapped status")),
    }
}

#[tokio::test]
async fn refusals_are_identical_on_both_transports_and_never_reach_the_handler() {
    let fixture = fixture();
    let worker = Some(token(&fixture, &["worker"], AUDIENCE));
    let cases = vec![
        ("no credentials", Call::new(Procedure::Lease, "resourcelease.users", None), ErrorCode::Unauthenticated),
        (
            "wrongly addressed token",
            Call::new(Procedure::Lease, "resourcelease.users", Some(token(&fixture, &["worker"], "other-audience"))),
            ErrorCode::Unauthenticated,
        ),
        (
            "untrusted proxy header",
            Call::new(Procedure::Lease, "resourcelease.users", None).header("x-client-principal", "admin"),
            ErrorCode::Unauthenticated,
        ),
        (
            "procedure not granted",
            Call::new(Procedure::Enqueue, "resourcelease.users", worker.clone()),
            ErrorCode::PermissionDenied,
        ),
        (
            "shard not granted",
            Call::new(Procedure::Lease, "resourcelease.billing", worker.clone()),
            ErrorCode::PermissionDenied,
        ),
        (
            "no role",
            Call::new(Procedure::Lease, "resourcelease.users", Some(token(&fixture, &[], AUDIENCE))),
            ErrorCode::PermissionDenied,
        ),
        (
            "oversized",
            Call::new(Procedure::Lease, "resourcelease.users", worker.clone()).padded(2000),
            ErrorCode::InvalidArgument,
        ),
        (
            "malformed deadline",
            Call::new(Procedure::Lease, "resourcelease.users", worker.clone()).header("grpc-timeout", "soon"),
            ErrorCode::InvalidArgument,
        ),
        (
            "lying shard key",
            Call::new(Procedure::Lease, "resourcelease.users", worker.clone())
                .header("rpc-shard-key", "resourcelease.billing"),
            ErrorCode::InvalidArgument,
        ),
        (
            "spent deadline",
            Call::new(Procedure::Lease, "resourcelease.users", worker.clone()).header("x-omnirelay-timeout-ms", "0"),
            ErrorCode::DeadlineExceeded,
        ),
    ];
    for (name, call, expected) in cases {
        let mut outcomes = Vec::new();
        for transport in [Transport::Grpc, Transport::Http] {
            let handler = Handler::default();
            let service = fixture.layer.layer(handler.clone());
            let response = service.oneshot(call.request(transport)).await.expect("infallible");
            outcomes.push(outcome(transport, &response));
            assert_eq!(handler.calls.load(Ordering::SeqCst), 0, "{name} over {transport:?} reached the handler");
        }
        assert_eq!(outcomes, vec![Some(expected), Some(expected)], "{name}");
    }
}

#[tokio::test]
async fn unknown_procedures_are_not_found_on_both_transports() {
    let fixture = fixture();
    let grpc = Request::post("/omnirelay.resourcelease.v1.ResourceLease/Explode")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = fixture.layer.layer(Handler::default()).oneshot(grpc).await.expect("infallible");
    assert_eq!(outcome(Transport::Grpc, &response), Some(ErrorCode::NotFound));
    let http = Request::post("/resourcelease/v1/resourcelease/explode").body(Full::new(Bytes::new())).expect("request");
    let response = fixture.layer.layer(Handler::default()).oneshot(http).await.expect("infallible");
    assert_eq!(outcome(Transport::Http, &response), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn allowed_calls_reach_the_handler_with_caller_route_and_deadline() {
    let fixture = fixture();
    let worker = Some(token(&fixture, &["worker"], AUDIENCE));
    for transport in [Transport::Grpc, Transport::Http] {
        let handler = Handler::default();
        let call = Call::new(Procedure::Heartbeat, "resourcelease.users", worker.clone()).header("grpc-timeout", "5S");
        let response = fixture.layer.layer(handler.clone()).oneshot(call.request(transport)).await.expect("infallible");
        assert_eq!(outcome(transport, &response), None, "{transport:?}");
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, Bytes::from_static(b"handled"));
        let seen = handler.seen.lock().expect("test mutex").pop().expect("the handler saw the call");
        assert_eq!(seen.caller.principal.as_str(), "worker-1");
        assert_eq!(seen.route.procedure, Procedure::Heartbeat);
        assert_eq!(seen.route.namespace, Some(ShardId::new("resourcelease.users")));
        assert_eq!(seen.deadline.budget(), std::time::Duration::from_secs(5));
    }
}

#[tokio::test]
async fn the_concurrency_limiter_slot_sees_only_authorized_calls_and_its_refusals_render() {
    let fixture = fixture();
    let limited = Arc::new(AtomicUsize::new(0));
    let counter = limited.clone();
    // A stand-in for BackpressureAwareConcurrencyLimiter: refuses every call it sees.
    let shed = tower::layer::layer_fn(move |_inner: Handler| {
        let counter = counter.clone();
        tower::service_fn(move |_request: Request<BufferedBody>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let refusal = MiddlewareError::rejected(
                ErrorCode::ResourceExhausted,
                "backpressure: resourcelease.users is above its high watermark",
            );
            std::future::ready(Err::<Response<Full<Bytes>>, BoxError>(Box::new(refusal)))
        })
    });
    let layer = fixture.layer.clone().with_concurrency_limiter(shed);
    let worker = Some(token(&fixture, &["worker"], AUDIENCE));
    for transport in [Transport::Grpc, Transport::Http] {
        let anonymous = Call::new(Procedure::Lease, "resourcelease.users", None);
        let response = layer.layer(Handler::default()).oneshot(anonymous.request(transport)).await.expect("infallible");
        assert_eq!(outcome(transport, &response), Some(ErrorCode::Unauthenticated));
        let call = Call::new(Procedure::Lease, "resourcelease.users", worker.clone());
        let response = layer.layer(Handler::default()).oneshot(call.request(transport)).await.expect("infallible");
        assert_eq!(outcome(transport, &response), Some(ErrorCode::ResourceExhausted));
    }
    assert_eq!(limited.load(Ordering::SeqCst), 2, "only the two authorized calls took the limiter's attention");
}

#[tokio::test]
async fn the_stack_serves_an_axum_router() {
    let fixture = fixture();
    async fn stats(
        axum::extract::Path((namespace, procedure)): axum::extract::Path<(String, String)>,
        axum::Extension(caller): axum::Extension<Caller>,
    ) -> String {
        format!("{} called {procedure} on {namespace}", caller.principal)
    }
    let router = axum::Router::new()
        .route("/resourcelease/v1/{namespace}/{procedure}", axum::routing::post(stats))
        .layer(fixture.layer.clone());
    let call = Call::new(Procedure::Stats, "resourcelease.users", Some(token(&fixture, &["worker"], AUDIENCE)));
    let request = call.request(Transport::Http).map(axum::body::Body::new);
    let response = router.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = response.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, Bytes::from_static(b"worker-1 called stats on resourcelease.users"));

    let anonymous =
        Call::new(Procedure::Stats, "resourcelease.users", None).request(Transport::Http).map(axum::body::Body::new);
    let response = router.oneshot(anonymous).await.expect("infallible");
    assert_eq!(response.status(), http::StatusCode::UNAUTHORIZED);
    let json: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.expect("body").to_bytes()).expect("json");
    assert_eq!(json["error"]["code"], "unauthenticated");
}
