//! The webhook sink: each batch as one HTTP POST of JSON, with retries,
//! backoff and a dead-letter file.
//!
//! The body is `{"events": [...]}`, each event in the JSON form of
//! [`super::json`] (its `key` is the idempotence key); the request carries
//! `Idempotency-Key: {shard}/{first}-{last}`. Delivery is at least once: a
//! receiver that may see a batch twice (a retry after a lost answer, a
//! restart after a crash) deduplicates on the keys.
//!
//! Outcomes of one POST:
//!
//! - 2xx: delivered;
//! - a connection failure, a timeout ([`WebhookConfig::request_timeout`]),
//!   408, 429 or 5xx: retried after a backoff, up to
//!   [`WebhookConfig::attempts`] times within the call; then the call fails
//!   as [`SinkError::Transient`] and the runtime retries the batch later,
//!   indefinitely: a receiver that is down holds the sink back, it does not
//!   make it drop events;
//! - any other status (the receiver refuses the content for good): the
//!   batch is appended to the dead-letter file (one JSON line with the
//!   status and the events, synced) and the sink moves on. A dead-letter
//!   file that cannot be written fails the call as transient.
//!
//! Plain HTTP/1.1 over TCP, or over TLS with the caller's rustls
//! configuration; a connection is kept and reused between batches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::{Delivery, ReplicationSink, SinkBatch, SinkError, json};

/// Default of [`WebhookConfig::request_timeout`]: a receiver answers a batch
/// in well under a second; four seconds times [`ATTEMPTS`] plus the backoff
/// stays inside the runtime's 30 s sink deadline.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);

/// Default of [`WebhookConfig::attempts`].
pub const ATTEMPTS: u32 = 5;

/// Default first backoff between attempts; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);

/// Default longest backoff between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Where and how the webhook sink posts.
#[derive(Clone)]
pub struct WebhookConfig {
    /// `http://host[:port]/path` or `https://...`.
    pub url: String,
    /// TLS for `https://` URLs (ALPN should offer `http/1.1`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Extra headers, e.g. `authorization`.
    pub headers: Vec<(String, String)>,
    /// Deadline of one POST, connection included.
    pub request_timeout: Duration,
    /// POSTs per batch within one call.
    pub attempts: u32,
    /// First backoff between attempts.
    pub backoff_min: Duration,
    /// Longest backoff between attempts.
    pub backoff_max: Duration,
    /// The dead-letter file (NDJSON, appended).
    pub dead_letter: PathBuf,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .field("headers", &self.headers.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .field("dead_letter", &self.dead_letter)
            .finish_non_exhaustive()
    }
}

impl WebhookConfig {
    /// Posts to `url`, dead letters to `dead_letter`, default pacing.
    pub fn new(url: impl Into<String>, dead_letter: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            tls: None,
            headers: Vec::new(),
            request_timeout: REQUEST_TIMEOUT,
            attempts: ATTEMPTS,
            backoff_min: BACKOFF_MIN,
            backoff_max: BACKOFF_MAX,
            dead_letter: dead_letter.into(),
        }
    }
}

/// Posts batches to an HTTP endpoint. See the [module docs](self).
#[derive(Debug)]
pub struct WebhookSink {
    config: WebhookConfig,
    uri: http::Uri,
    authority: String,
    host: String,
    secure: bool,
    connection: Option<SendRequest<Full<Bytes>>>,
}

/// One POST's outcome.
enum Posted {
    Delivered,
    Retry(String),
    Refused(u16, String),
}

impl WebhookSink {
    /// Checks the configuration; connects on the first batch.
    pub fn new(config: WebhookConfig) -> Result<Self, SinkError> {
        let invalid = |reason: String| SinkError::Config { field: "url".into(), reason };
        let uri: http::Uri =
            config.url.parse().map_err(|err| invalid(format!("{:?} is not a URL: {err}", config.url)))?;
        let secure = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(invalid(format!("{:?} must start with http:// or https://", config.url))),
        };
        if secure && config.tls.is_none() {
            return Err(invalid("an https:// URL needs a TLS configuration".into()));
        }
        let host = uri.host().ok_or_else(|| invalid(format!("{:?} has no host", config.url)))?;
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let authority = format!("{host}:{port}");
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        if config.attempts == 0 {
            return Err(SinkError::Config { field: "attempts".into(), reason: "must be at least 1".into() });
        }
        Ok(Self { config, uri, authority, host, secure, connection: None })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|err| format!("connect to {}: {err}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        let sender = if self.secure {
            let tls = self.config.tls.clone().ok_or("an https:// URL needs a TLS configuration")?;
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|err| format!("{}: not a valid server name: {err}", self.host))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|err| format!("TLS handshake with {}: {err}", self.authority))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|err| format!("HTTP handshake: {err}"))?;
            tokio::spawn(connection);
            sender
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|err| format!("HTTP handshake: {err}"))?;
            tokio::spawn(connection);
            sender
        };
        Ok(sender)
    }

    async fn post(&mut self, body: Bytes, key: &str) -> Posted {
        let reused = match self.connection.take() {
            Some(mut sender) => sender.ready().await.is_ok().then_some(sender),
            None => None,
        };
        let mut sender = match reused {
            Some(sender) => sender,
            None => match self.connect().await {
                Ok(sender) => sender,
                Err(err) => return Posted::Retry(err),
            },
        };
        let mut request = http::Request::post(self.uri.clone())
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key);
        for (name, value) in &self.config.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = match request.body(Full::new(body)) {
            Ok(request) => request,
            Err(err) => return Posted::Refused(0, format!("the request cannot be built: {err}")),
        };
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(err) => return Posted::Retry(format!("POST {}: {err}", self.config.url)),
        };
        let status = response.status();
        // The answer is read whole so the connection can be reused.
        let text = match response.into_body().collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).chars().take(512).collect(),
            Err(err) => return Posted::Retry(format!("read the answer: {err}")),
        };
        self.connection = Some(sender);
        if status.is_success() {
            Posted::Delivered
        } else if status.is_server_error()
            || status == http::StatusCode::TOO_MANY_REQUESTS
            || status == http::StatusCode::REQUEST_TIMEOUT
        {
            Posted::Retry(format!("the receiver answered {status}: {text}"))
        } else {
            Posted::Refused(status.as_u16(), text)
        }
    }

    async fn dead_letter(&self, batch: &SinkBatch, status: u16, reason: String) -> Result<(), SinkError> {
        let events: Vec<_> = batch.events.iter().map(json::event).collect();
        let mut line = serde_json::to_vec(&json!({ "status": status, "reason": reason, "events": events }))
            .map_err(|err| SinkError::Fatal(format!("render a dead letter: {err}")))?;
        line.push(b'\n');
        let path = self.config.dead_letter.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            file.write_all(&line)?;
            file.sync_data()
        })
        .await
        .map_err(|err| SinkError::Fatal(format!("the dead-letter writer failed: {err}")))?
        .map_err(|err| {
            SinkError::Transient(format!("write the dead-letter file {}: {err}", self.config.dead_letter.display()))
        })?;
        tracing::warn!(
            url = %self.config.url,
            status,
            first = %batch.first(),
            last = %batch.last().sequence,
            "the webhook refused a batch; dead-lettered"
        );
        Ok(())
    }
}

impl ReplicationSink for WebhookSink {
    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn deliver(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
        let events: Vec<_> = batch.events.iter().map(json::event).collect();
        let body = serde_json::to_vec(&json!({ "events": events }))
            .map_err(|err| SinkError::Fatal(format!("render a batch: {err}")))?;
        let body = Bytes::from(body);
        let key = format!("{}/{}-{}", batch.shard, batch.first(), batch.last().sequence);
        let mut backoff = self.config.backoff_min;
        let mut last = String::new();
        for attempt in 1..=self.config.attempts {
            let posted = match tokio::time::timeout(self.config.request_timeout, self.post(body.clone(), &key)).await {
                Ok(posted) => posted,
                Err(_) => {
                    self.connection = None;
                    Posted::Retry(format!("no answer within {:?}", self.config.request_timeout))
                }
            };
            match posted {
                Posted::Delivered => return Ok(()),
                Posted::Refused(status, reason) => return self.dead_letter(batch, status, reason).await,
                Posted::Retry(reason) => {
                    tracing::debug!(url = %self.config.url, attempt, reason = %reason, "webhook attempt failed");
                    last = reason;
                }
            }
            if attempt < self.config.attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.config.backoff_max);
            }
        }
        Err(SinkError::Transient(format!("{} attempts failed; the last: {last}", self.config.attempts)))
    }
}
