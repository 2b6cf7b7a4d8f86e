//! Operator commands against a running node over HTTP or HTTPS (with a
//! client certificate for mutual TLS): its diagnostics endpoints, and drain
//! / resume / restore through the HTTP/JSON surface, which needs credentials
//! the node accepts: a client certificate, a bearer token, or, from an
//! address the node trusts as a proxy (such as loopback on a development
//! node), a principal named in `x-client-principal`.

use std::path::PathBuf;
use std::sync::Arc;
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

/// The header a trusted proxy names the caller in (the node's
/// `trusted_proxies` decide whom it believes).
pub const PRINCIPAL_HEADER: &str = "x-client-principal";

/// Where the node is and who we are.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The node's address, http://host:port or https://host:port.
    #[arg(long, env = "OMNIRELAY_NODE_URL", default_value = "http://127.0.0.1:7420")]
    pub node: String,
    /// Bearer token for the ResourceLease procedures (drain, resume, restore).
    #[arg(long, env = "OMNIRELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Principal to name in x-client-principal, for a node that trusts this
    /// machine's address as a proxy (e.g. a development node trusting
    /// 127.0.0.1).
    #[arg(long, env = "OMNIRELAY_PRINCIPAL")]
    pub principal: Option<String>,
    /// PEM bundle of the CA(s) an https node's certificate must chain to
    /// (the system's roots when absent).
    #[arg(long, env = "OMNIRELAY_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (with --client-key).
    #[arg(long, env = "OMNIRELAY_CLIENT_CERT", value_name = "PATH", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, env = "OMNIRELAY_CLIENT_KEY", value_name = "PATH", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// A connection to the node, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

impl Target {
    /// A target at `node` with no credentials and no TLS settings.
    pub fn new(node: impl Into<String>) -> Self {
        Self { node: node.into(), token: None, principal: None, ca_file: None, client_cert: None, client_key: None }
    }

    /// The node's URL: scheme, host and port.
    fn uri(&self) -> anyhow::Result<(bool, String, String)> {
        let uri: Uri = self.node.parse().with_context(|| format!("--node {}: not a URL", self.node))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("--node {}: use http:// or https://", self.node),
        };
        let host = uri.host().with_context(|| format!("--node {}: no host", self.node))?;
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Ok((tls, host, format!("{}:{port}", uri.host().unwrap_or_default())))
    }

    fn authority(&self) -> anyhow::Result<String> {
        Ok(self.uri()?.2)
    }

    /// The TLS client configuration: the CA file's roots (else the system's),
    /// the client certificate when given, ALPN http/1.1.
    fn tls_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| format!("read --ca-file {}", path.display()))?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    roots.add(cert.with_context(|| format!("--ca-file {}: not PEM", path.display()))?)?;
                }
                if roots.is_empty() {
                    bail!("--ca-file {}: no certificate in it", path.display());
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let pem = std::fs::read(cert).with_context(|| format!("read --client-cert {}", cert.display()))?;
                let chain = rustls_pemfile::certs(&mut pem.as_slice())
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("--client-cert {}: not PEM", cert.display()))?;
                let pem = std::fs::read(key).with_context(|| format!("read --client-key {}", key.display()))?;
                let key = rustls_pemfile::private_key(&mut pem.as_slice())
                    .ok()
                    .flatten()
                    .with_context(|| format!("--client-key {}: no private key in it", key.display()))?;
                builder.with_client_auth_cert(chain, key).context("use the client certificate")?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Stream>> {
        let (tls, host, authority) = self.uri()?;
        let tcp =
            tokio::net::TcpStream::connect(&authority).await.with_context(|| format!("connect to {authority}"))?;
        if !tls {
            return Ok(Box::new(tcp));
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::new(self.tls_config()?));
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .with_context(|| format!("--node {}: {host} is not a valid server name", self.node))?;
        let stream = connector.connect(name, tcp).await.with_context(|| format!("TLS handshake with {authority}"))?;
        Ok(Box::new(stream))
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let stream = self.connect().await?;
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
        if let Some(principal) = &self.principal {
            builder = builder.header(PRINCIPAL_HEADER, principal);
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
        if code == "unauthenticated" {
            bail!(
                "the node refused: {code}: {message} (identify yourself with --token, a client certificate \
                 (--client-cert, --client-key), or --principal to a node that trusts this address as a proxy)"
            );
        }
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

/// Renders the replication state per namespace as a table.
pub fn render_replication(value: &Value) -> String {
    let mut out = format!("node {}\n", value["node_id"].as_str().unwrap_or(""));
    out.push_str(&format!(
        "{:<32} {:<10} {:<20} {:>6} {:>10} {:>10} {:>8} {:>9} {:>8} {:>12} {:>9}\n",
        "NAMESPACE",
        "REPLICATOR",
        "STATUS",
        "EPOCH",
        "LAST_SEQ",
        "DURABLE",
        "LAG",
        "PENDING",
        "ACTIVE",
        "DEAD_LETTERS",
        "DRAINING"
    ));
    for (namespace, state) in value["namespaces"].as_object().into_iter().flatten() {
        let number = |key: &str| state[key].as_u64().map_or_else(|| state[key].to_string(), |n| n.to_string());
        let status = match state["fence"]["reason"].as_str() {
            Some(reason) => format!("fenced:{reason}"),
            None => state["status"].as_str().unwrap_or("").to_string(),
        };
        out.push_str(&format!(
            "{:<32} {:<10} {:<20} {:>6} {:>10} {:>10} {:>8} {:>9} {:>8} {:>12} {:>9}\n",
            namespace,
            state["replicator"].as_str().unwrap_or(""),
            status,
            number("epoch"),
            number("last_sequence"),
            number("durable_sequence"),
            number("lag_events"),
            number("pending"),
            number("active"),
            number("dead_letters"),
            if state["draining"] == true { "yes" } else { "no" },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_renders_as_a_table_not_json() {
        let value = serde_json::json!({
            "node_id": "n1",
            "namespaces": {"resourcelease.users": {
                "replicator": "hub", "status": "fenced", "fence": {"reason": "stale_epoch", "detail": "x"},
                "epoch": 3, "last_sequence": 7, "durable_sequence": 6, "lag_events": 1,
                "pending": 2, "active": 1, "dead_letters": 0, "draining": false
            }}
        });
        let text = render_replication(&value);
        assert!(!text.contains('{'), "{text}");
        let row = text.lines().nth(2).expect("a row per namespace");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            ["resourcelease.users", "hub", "fenced:stale_epoch", "3", "7", "6", "1", "2", "1", "0", "no"]
        );
    }

    #[test]
    fn targets_take_http_and_https_only() {
        assert!(Target::new("http://127.0.0.1:7420").uri().is_ok_and(|(tls, ..)| !tls));
        assert!(
            Target::new("https://node.internal")
                .uri()
                .is_ok_and(|(tls, host, authority)| tls && host == "node.internal" && authority == "node.internal:443")
        );
        let err = Target::new("ftp://node").uri().expect_err("refused");
        assert!(err.to_string().contains("http:// or https://"), "{err}");
    }
}
