//! RPC spans, and their export over OTLP when configured.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Request, Response};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};

use super::connection::ConnectionInfo;
use super::{RESOURCE_LEASE_SERVICE, RpcRoute, Transport};
use crate::ErrorCode;

/// Reads W3C trace context (`traceparent`, `tracestate`) from request headers.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Layer of [`RpcTrace`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcTraceLayer;

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

/// Opens an `rpc` span per call, as the parent of everything the call does,
/// continuing the caller's trace when it sent `traceparent`. The span carries
/// `rpc.system`, `rpc.peer` and `otel.kind` from the start; the layers inside
/// fill in `rpc.service`, `rpc.procedure`, `resourcelease.operation`,
/// `rpc.shard_key`, `rpc.principal` and, on failure, `error.code`; the
/// response status is recorded when the call ends, and a unary call's
/// duration goes to [`crate::metrics::RPC_DURATION`]. With an OTLP layer
/// installed (see [`otlp_layer`]) the span is exported with these attributes.
///
/// `poll_ready` is the inner service's readiness.
#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
}

impl<S, B, ResB> Service<Request<B>> for RpcTrace<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RpcTraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let transport = Transport::of(request.headers());
        let peer = ConnectionInfo::from_extensions(request.extensions()).remote_addr;
        let span = tracing::info_span!(
            "rpc",
            otel.name = Empty,
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = transport.as_str(),
            rpc.service = Empty,
            rpc.procedure = Empty,
            rpc.peer = Empty,
            rpc.shard_key = Empty,
            rpc.principal = Empty,
            resourcelease.operation = Empty,
            http.response.status_code = Empty,
            rpc.grpc.status_code = Empty,
            error.code = Empty,
        );
        if let Some(peer) = peer {
            span.record("rpc.peer", tracing::field::display(peer));
        }
        // The OpenTelemetry span takes its name when first entered, so the
        // name is settled here from the path rather than by the route layer.
        if let Ok(route) = RpcRoute::from_path(transport, request.uri().path()) {
            span.record("otel.name", format!("{RESOURCE_LEASE_SERVICE}/{}", route.procedure.grpc_method()));
        }
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
        if parent.span().span_context().is_valid() {
            // Without an OpenTelemetry layer there is nothing to attach to;
            // the span then simply has no remote parent.
            let _ = span.set_parent(parent);
        }
        // Unary calls are timed; a session's time is the stream's life, not a call's.
        let procedure = RpcRoute::from_path(transport, request.uri().path())
            .ok()
            .filter(|route| !route.procedure.is_session())
            .map(|route| route.procedure.as_str());
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        RpcTraceFuture { inner, span, timing: procedure.map(|procedure| (procedure, std::time::Instant::now())) }
    }
}

pin_project! {
    /// Future of [`RpcTrace`]: polls the call inside its span and records the
    /// outcome.
    pub struct RpcTraceFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        // The procedure's name and when the call started, for the duration
        // histogram.
        timing: Option<(&'static str, std::time::Instant)>,
    }
}

impl<F, ResB, E> Future for RpcTraceFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let result = ready!(this.inner.poll(cx));
        if let Some((procedure, started)) = this.timing.take() {
            let failed = match &result {
                Ok(response) => {
                    response.status().as_u16() >= 400
                        || response.headers().get("grpc-status").is_some_and(|code| code.as_bytes() != b"0")
                }
                Err(_) => true,
            };
            metrics::histogram!(
                crate::metrics::RPC_DURATION,
                "procedure" => procedure,
                "outcome" => if failed { "error" } else { "ok" }
            )
            .record(started.elapsed().as_secs_f64());
        }
        match &result {
            Ok(response) => {
                this.span.record("http.response.status_code", response.status().as_u16());
                // A gRPC error is a trailers-only response: its status is in
                // the headers. Successful gRPC calls carry it in trailers.
                if let Some(code) = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()) {
                    if let Ok(code) = code.parse::<i32>() {
                        this.span.record("rpc.grpc.status_code", code);
                        if code != 0 {
                            this.span.record("otel.status_code", "ERROR");
                        }
                    }
                } else if response.status().is_server_error() {
                    this.span.record("otel.status_code", "ERROR");
                }
            }
            Err(_) => {
                this.span.record("otel.status_code", "ERROR");
            }
        }
        Poll::Ready(result)
    }
}

/// Where and as whom spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// `service.name` of the exported spans, e.g. `omnirelay-node`.
    pub service_name: String,
}

/// Why OTLP export could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryError {
    /// The endpoint is not an `http` or `https` URL.
    #[error("otlp.endpoint: {0:?} is not an http(s) URL")]
    InvalidEndpoint(String),
    /// The exporter could not be built.
    #[error("failed to build the OTLP exporter: {0}")]
    Exporter(String),
}

impl TelemetryError {
    /// The transport-independent code.
    pub fn code(&self) -> ErrorCode {
        match self {
            TelemetryError::InvalidEndpoint(_) => ErrorCode::InvalidArgument,
            TelemetryError::Exporter(_) => ErrorCode::Unavailable,
        }
    }
}

/// Keeps the tracer provider alive; flushes or shuts export down on request.
/// Dropping the last guard ends export once buffered spans are sent.
#[derive(Debug, Clone)]
pub struct OtlpGuard {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl OtlpGuard {
    /// Exports every finished span now. Blocks: call from a blocking thread.
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        self.provider.force_flush().map_err(|e| TelemetryError::Exporter(e.to_string()))
    }

    /// Flushes and stops export. Blocks: call from a blocking thread.
    pub fn shutdown(&self) -> Result<(), TelemetryError> {
        self.provider.shutdown().map_err(|e| TelemetryError::Exporter(e.to_string()))
    }
}

/// Builds a `tracing` layer exporting spans over OTLP/gRPC (tonic) in
/// batches, and installs the W3C trace-context propagator so [`RpcTrace`]
/// continues callers' traces. Call inside a tokio runtime (the exporter's
/// channel lives on it); add the layer to the subscriber the binary installs.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use omnirelay_client::middleware::{OtlpConfig, otlp_layer};
/// use tracing_subscriber::layer::SubscriberExt;
///
/// let config = OtlpConfig { endpoint: "http://127.0.0.1:4317".into(), service_name: "omnirelay-node".into() };
/// let (otlp, guard) = otlp_layer(&config)?;
/// let subscriber = tracing_subscriber::registry().with(otlp);
/// tracing::subscriber::set_global_default(subscriber)?;
/// // ... serve; before exiting:
/// tokio::task::spawn_blocking(move || guard.shutdown()).await??;
/// # Ok(()) }
/// ```
pub fn otlp_layer<S>(
    config: &OtlpConfig,
) -> Result<(OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>, OtlpGuard), TelemetryError>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let endpoint = config.endpoint.trim();
    let valid = http::Uri::try_from(endpoint)
        .ok()
        .is_some_and(|uri| matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some());
    if !valid {
        return Err(TelemetryError::InvalidEndpoint(config.endpoint.clone()));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(config.service_name.clone()).build())
        .build();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let tracer = provider.tracer("omnirelay");
    Ok((tracing_opentelemetry::layer().with_tracer(tracer), OtlpGuard { provider }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_endpoints_are_refused_naming_the_field() {
        for endpoint in ["", "collector:4317", "ftp://collector:4317"] {
            let config = OtlpConfig { endpoint: endpoint.into(), service_name: "test".into() };
            let err = otlp_layer::<tracing_subscriber::Registry>(&config).map(|_| ()).expect_err(endpoint);
            assert!(err.to_string().starts_with("otlp.endpoint"), "{err}");
            assert_eq!(err.code(), ErrorCode::InvalidArgument);
        }
    }
}
