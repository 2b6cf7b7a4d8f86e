//! Spans reach an OTLP collector with the RPC attributes, continuing the
//! caller's trace.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use omnirelay_client::ShardId;
use omnirelay_client::middleware::{
    AuthorizationTable, BufferedBody, MeshLayer, MiddlewareConfig, OtlpConfig, PrincipalConfig, Procedure, RemoteAddr,
    TrustedProxies, otlp_layer,
};
use omnirelay_client::shard::SHARD_KEY_HEADER;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tower::{Layer, ServiceExt};
use tracing_subscriber::layer::SubscriberExt;

/// Keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("test mutex");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_spans_are_exported_over_otlp_with_their_attributes() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let (otlp, guard) = otlp_layer(&OtlpConfig { endpoint, service_name: "omnirelay-test".into() }).expect("exporter");
    let subscriber = tracing_subscriber::registry().with(otlp);
    let _default = tracing::subscriber::set_default(subscriber);

    let config = MiddlewareConfig {
        principal: PrincipalConfig::new().trusted_proxies(TrustedProxies::parse(&["127.0.0.1"]).expect("valid")),
        authorization: AuthorizationTable::from_json(
            r#"{"rules": [{"principals": ["*"], "procedures": ["stats"], "shards": ["*"]}]}"#,
        )
        .expect("valid table"),
        ..MiddlewareConfig::default()
    };
    let handler = tower::service_fn(|_request: Request<BufferedBody>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
    });
    let service = MeshLayer::new(config).layer(handler);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut request = Request::post(Procedure::Stats.http_path(&ShardId::new("resourcelease.users")))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("traceparent", format!("00-{trace_id}-{parent_id}-01"))
        .header("x-client-principal", "spiffe://omnirelay.test/gateway-user")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    request.headers_mut().insert(SHARD_KEY_HEADER, HeaderValue::from_static("resourcelease.users"));
    request.extensions_mut().insert(RemoteAddr("127.0.0.1:41000".parse().expect("addr")));
    let response = service.oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), http::StatusCode::OK);

    let flush = guard.clone();
    tokio::task::spawn_blocking(move || flush.force_flush()).await.expect("flush joins").expect("flush succeeds");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let span = loop {
        let found = collector
            .spans
            .lock()
            .expect("test mutex")
            .iter()
            .find(|s| s.name.ends_with("ResourceLease/Stats"))
            .cloned();
        if let Some(span) = found {
            break span;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the collector received no rpc span: {:?}",
            collector.spans.lock().expect("test mutex").iter().map(|s| s.name.clone()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(span.name, "omnirelay.resourcelease.v1.ResourceLease/Stats");
    assert_eq!(attribute(&span, "rpc.service").as_deref(), Some("omnirelay.resourcelease.v1.ResourceLease"));
    assert_eq!(attribute(&span, "rpc.procedure").as_deref(), Some("Stats"));
    assert_eq!(attribute(&span, "resourcelease.operation").as_deref(), Some("stats"));
    assert_eq!(attribute(&span, "rpc.shard_key").as_deref(), Some("resourcelease.users"));
    assert_eq!(attribute(&span, "rpc.principal").as_deref(), Some("spiffe://omnirelay.test/gateway-user"));
    assert_eq!(attribute(&span, "rpc.peer").as_deref(), Some("127.0.0.1:41000"));
    assert_eq!(attribute(&span, "rpc.system").as_deref(), Some("http"));
    assert_eq!(attribute(&span, "http.response.status_code").as_deref(), Some("200"));
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(&span.trace_id), trace_id, "the span continues the caller's trace");
    assert_eq!(hex(&span.parent_span_id), parent_id);

    drop(_default);
    tokio::task::spawn_blocking(move || guard.shutdown()).await.expect("shutdown joins").expect("shutdown succeeds");
    server.abort();
}
