//! Log output for the binary, and OTLP span export when configured.

use omnirelay_client::middleware::{OtlpConfig, OtlpGuard, otlp_layer};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::node::config::LogFormat;

/// Environment variable with the log filter (`info`, `omnirelay_client=debug`).
pub const LOG_FILTER_ENV: &str = "OMNIRELAY_LOG";

/// Installs the global subscriber: `format` lines on stderr filtered by
/// `OMNIRELAY_LOG` (default `info`), plus OTLP export of spans when an
/// endpoint is given. Must run inside the tokio runtime (the exporter's
/// channel lives on it). The guard flushes spans when shut down.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Option<OtlpGuard>> {
    let filter = EnvFilter::try_from_env(LOG_FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let (otlp, guard) = match otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let config = OtlpConfig { endpoint: endpoint.to_string(), service_name: "omnirelay-node".into() };
            let (layer, guard) = otlp_layer(&config)?;
            (Some(layer), Some(guard))
        }
    };
    let registry = tracing_subscriber::registry().with(filter).with(otlp);
    // Colours only for a person at a terminal, never into files or shippers.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).try_init()?
        }
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_ansi(ansi))
            .try_init()?,
    }
    Ok(guard)
}
