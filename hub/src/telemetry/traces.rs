//! Traces: the span every gRPC call of the replica runs in, and the
//! tracing subscriber the binary installs (`--log`, `--log-format`), with
//! span export over OTLP/gRPC when `--otlp-endpoint` is set.

use crate::config::flags::{LogArgs, LogFormat};

/// Reads W3C trace context (`traceparent`, `tracestate`) from request headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

/// The span every gRPC call of the replica runs in, the Hub's and the
/// standard health service's alike: named `{service}/{method}` with the
/// OpenTelemetry RPC attributes (`rpc.system`, `rpc.service`, `rpc.method`)
/// and the caller's `rpc.principal` under mutual TLS, continuing the
/// caller's trace when it sent `traceparent`.
pub fn request_span<B>(request: &http::Request<B>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let path = request.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.principal = crate::security::transport::http_principal(request).map(tracing::field::display),
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    if opentelemetry::trace::TraceContextExt::span(&parent).span_context().is_valid() {
        // Without an OpenTelemetry layer there is nothing to attach to; the
        // span then simply has no remote parent.
        let _ = span.set_parent(parent);
    }
    span
}

/// Keeps span export alive; [`OtlpGuard::shutdown`] flushes the spans still
/// buffered and stops export.
#[derive(Debug)]
pub struct OtlpGuard {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl OtlpGuard {
    /// Exports every finished span now. Blocks: call from a blocking thread.
    pub fn force_flush(&self) -> anyhow::Result<()> {
        self.provider.force_flush().map_err(|err| anyhow::anyhow!("flush spans: {err}"))
    }

    /// Flushes and stops export. Blocks: call from a blocking thread.
    pub fn shutdown(&self) -> anyhow::Result<()> {
        self.provider.shutdown().map_err(|err| anyhow::anyhow!("stop span export: {err}"))
    }
}

/// A `tracing` layer exporting spans over OTLP/gRPC to `endpoint` in batches
/// (service name `omnirelay-hub`), and the W3C trace-context propagator so
/// request spans continue their callers' traces. Call inside a tokio
/// runtime: the exporter's channel lives on it.
pub fn otlp_layer<S>(
    endpoint: &str,
) -> anyhow::Result<(tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>, OtlpGuard)>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    let endpoint = endpoint.trim();
    let valid = endpoint
        .parse::<http::Uri>()
        .ok()
        .is_some_and(|uri| matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some());
    if !valid {
        anyhow::bail!("--otlp-endpoint {endpoint:?} is not an http(s) URL");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|err| anyhow::anyhow!("build the OTLP exporter: {err}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("omnirelay-hub").build())
        .build();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let tracer = provider.tracer("omnirelay-hub");
    Ok((tracing_opentelemetry::layer().with_tracer(tracer), OtlpGuard { provider }))
}

/// Installs the tracing subscriber for the binary: `--log` filter,
/// `--log-format` text or JSON, to standard error, plus span export when
/// `--otlp-endpoint` is set (the guard then flushes it at exit). Call inside
/// the tokio runtime.
pub fn init_tracing(args: &LogArgs) -> anyhow::Result<Option<OtlpGuard>> {
    use anyhow::Context as _;
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log {:?} is not a valid filter", args.log))?;
    let (otlp, guard) = match &args.otlp_endpoint {
        Some(endpoint) => {
            let (layer, guard) = otlp_layer(endpoint)?;
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    // Colours only for a person at a terminal, never into files or shippers.
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter).with(otlp);
    let installed = match args.log_format {
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).try_init()
        }
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_ansi(ansi))
            .try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("install the tracing subscriber: {err}"))?;
    Ok(guard)
}
