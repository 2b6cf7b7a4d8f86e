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

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Bound on waiting for a process or a probe (a hang guard, not a
/// performance claim): a debug build on a loaded two-core machine takes a
/// few seconds to start.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// GETs `path` over plain HTTP/1.1 and returns the status and body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|err| format!("connect: {err}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|err| format!("write: {err}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(|err| format!("read: {err}"))?;
    let response = String::from_utf8(response).map_err(|err| format!("not UTF-8: {err}"))?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, dechunk_if(head, body)))
}

/// The body, de-chunked when the head says it is chunked.
fn dechunk_if(head: &str, body: &str) -> String {
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

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
