//! Operator commands against a running node over plain HTTP: its
//! diagnostics endpoints, and drain / resume / restore through the
//! HTTP/JSON surface (which needs credentials the node accepts: a bearer
//! token, or a trusted proxy's `x-client-principal`).

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long a command waits for a node's answer (watching a stream has no
/// limit).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the node is and who we are.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The node's HTTP address, e.g. http://127.0.0.1:7420.
    #[arg(long, env = "OMNIRELAY_NODE_URL", default_value = "http://127.0.0.1:7420")]
    pub node: String,
    /// Bearer token for the ResourceLease procedures (drain, resume, restore).
    #[arg(long, env = "OMNIRELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Target {
    fn authority(&self) -> anyhow::Result<String> {
        let uri: Uri = self.node.parse().with_context(|| format!("--node {}: not a URL", self.node))?;
        if uri.scheme_str() != Some("http") {
            bail!("--node {}: only http:// nodes are supported by the CLI", self.node);
        }
        let authority = uri.authority().with_context(|| format!("--node {}: no host", self.node))?;
        Ok(authority.to_string())
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let authority = self.authority()?;
        let stream =
            tokio::net::TcpStream::connect(&authority).await.with_context(|| format!("connect to {authority}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("HTTP handshake")?;
        tokio::spawn(connection);
        sender.send_request(request).await.context("send the request")
    }

    fn request(&self, method: http::Method, path: &str, body: Vec<u8>) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.authority()?)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        Ok(builder.body(Full::new(Bytes::from(body)))?)
    }

    /// GETs a diagnostics endpoint's JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let request = self.request(http::Method::GET, path, Vec::new())?;
        let response =
            tokio::time::timeout(REQUEST_TIMEOUT, self.send(request)).await.context("the node did not answer")??;
        read_json(response).await
    }

    /// Calls a ResourceLease procedure over HTTP/JSON.
    pub async fn call(&self, namespace: &str, procedure: &str, body: &Value) -> anyhow::Result<Value> {
        let path = format!("/resourcelease/v1/{namespace}/{procedure}");
        let request = self.request(http::Method::POST, &path, serde_json::to_vec(body)?)?;
        let response =
            tokio::time::timeout(REQUEST_TIMEOUT, self.send(request)).await.context("the node did not answer")??;
        read_json(response).await
    }

    /// Follows the backpressure stream, calling `each` with every event's
    /// name and data, until the node ends the stream.
    pub async fn watch(&self, namespace: Option<&str>, mut each: impl FnMut(&str, Value)) -> anyhow::Result<()> {
        let path = match namespace {
            Some(namespace) => format!("/omnirelay/control/backpressure/stream?namespace={namespace}"),
            None => "/omnirelay/control/backpressure/stream".to_string(),
        };
        let response = self.send(self.request(http::Method::GET, &path, Vec::new())?).await?;
        if !response.status().is_success() {
            return read_json(response).await.map(|_| ());
        }
        let mut body = response.into_body();
        let mut buffer = String::new();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.context("read the event stream")?.data_ref() {
                buffer.push_str(&String::from_utf8_lossy(data));
            }
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let mut event = "message";
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event = name;
                    } else if let Some(text) = line.strip_prefix("data: ") {
                        data.push_str(text);
                    }
                }
                if !data.is_empty() {
                    each(event, serde_json::from_str(&data).unwrap_or(Value::String(data)));
                }
            }
        }
        Ok(())
    }
}

async fn read_json(response: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Value> {
    let status = response.status();
    let body = response.into_body().collect().await.context("read the answer")?.to_bytes();
    let value: Value = serde_json::from_slice(&body)
        .with_context(|| format!("the node answered {status} with a body that is not JSON"))?;
    if !status.is_success() {
        let code = value["error"]["code"].as_str().unwrap_or("unknown");
        let message = value["error"]["message"].as_str().unwrap_or("");
        bail!("the node refused: {code}: {message}");
    }
    Ok(value)
}

/// Renders the lease-health snapshot as a ranked table: unhealthy peers
/// first, then by pending leases.
pub fn render_health(snapshot: &Value) -> String {
    let summary = &snapshot["summary"];
    let mut out = format!(
        "peers {}  eligible {}  unhealthy {}  pending reassignments {}\n",
        summary["peers"], summary["eligible"], summary["unhealthy"], summary["pending_reassignments"]
    );
    let mut peers: Vec<&Value> = snapshot["peers"].as_array().map(|p| p.iter().collect()).unwrap_or_default();
    peers.sort_by_key(|p| (p["is_healthy"].as_bool().unwrap_or(false), std::cmp::Reverse(p["active_leases"].as_u64())));
    out.push_str(&format!("{:<40} {:<10} {:>6} {:>8} {:>10}\n", "PEER", "STATE", "WEIGHT", "LEASES", "SILENT_MS"));
    for peer in peers {
        out.push_str(&format!(
            "{:<40} {:<10} {:>6.2} {:>8} {:>10}\n",
            peer["peer_id"].as_str().unwrap_or(""),
            peer["state"].as_str().unwrap_or(""),
            peer["weight"].as_f64().unwrap_or(0.0),
            peer["active_leases"].as_u64().unwrap_or(0),
            peer["last_heartbeat_age_ms"].as_u64().unwrap_or(0),
        ));
    }
    out
}

/// Renders the per-namespace backpressure as lines.
pub fn render_backpressure(value: &Value) -> String {
    let mut out = String::new();
    if let Some(namespaces) = value["namespaces"].as_object() {
        for (namespace, state) in namespaces {
            let current = &state["current"];
            out.push_str(&format!(
                "{namespace}: {} (pending {}, high {}, low {})\n",
                if current["active"] == true { "BACKPRESSURE" } else { "ok" },
                current["pending"],
                current["high"],
                current["low"]
            ));
        }
    }
    out
}
