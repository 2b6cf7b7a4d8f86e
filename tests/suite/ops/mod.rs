//! Operations, checked with the real tools: the Helm charts (Helm's linter
//! and renderer, Kubernetes' schemas, the binaries started with what the
//! charts render), the alert rules and dashboards (promtool, the metric names
//! the binaries really export) and one alert end to end through a Prometheus
//! server.

mod alerts;
mod helm;
mod pod;
mod prometheus;

use std::net::SocketAddr;
use std::time::Duration;

use crate::http::{dechunk_if, http_get};

/// Bound on waiting for a process or a probe (a hang guard, not a
/// performance claim): a debug build on a loaded two-core machine takes a
/// few seconds to start.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Waits until `GET path` answers 200, within the hang guard.
async fn wait_for_ok(addr: SocketAddr, path: &str) -> String {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        match http_get(addr, path).await {
            Ok((200, body)) => return body,
            other if tokio::time::Instant::now() >= deadline => {
                panic!("GET http://{addr}{path} never answered 200; last: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Metric names in a Prometheus text exposition: every sample's name
/// (histograms contribute `_bucket`, `_sum` and `_count`).
fn exposed_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}
