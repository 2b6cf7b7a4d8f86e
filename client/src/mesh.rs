//! [`ResourceLeaseClient`]: calls a mesh of nodes for Rust producers and
//! workers, wherever each namespace is served.
//!
//! - **Owners cached.** The client remembers which node served each
//!   namespace and calls it directly next time.
//! - **Redirects followed.** A node that does not own a namespace answers
//!   UNAVAILABLE naming the owner ([`OWNER_HEADER`],
//!   [`OWNER_ADDRESS_HEADER`]); the client calls that address at once, at
//!   most [`MAX_REDIRECTS`] times in a row.
//! - **Retries within the deadline.** UNAVAILABLE without an owner (a shard
//!   being handed over or rebuilt, a node that died, a connection that
//!   failed), and a call cut off by its connection failing mid-flight
//!   (UNKNOWN or CANCELLED raised by the transport, not by a node), are
//!   retried with exponential backoff and jitter from
//!   [`RETRY_MIN`] to [`RETRY_MAX`], on the next node when the connection
//!   itself failed, until the call's deadline ([`CALL_DEADLINE`] by
//!   default) passes. Every other code is the answer.
//! - **Stable request ids.** An enqueue without a `request_id` gets a random
//!   one before the first attempt, and every retry carries the same one, so
//!   the queue writes an enqueue whose answer was lost once (the
//!   request-id guarantee in `docs/lease-queue.md`). Heartbeat, complete
//!   and fail name the lease's fencing token, so a retry is recognised.
//!   A lease whose answer was lost is the one call a retry cannot
//!   recognise: the item it leased stays leased until its TTL lapses, then
//!   is leased again (at-least-once, as every lease queue).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use omnirelay_proto::resourcelease::v1 as pb;
use tokio::time::Instant;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::node::{OWNER_ADDRESS_HEADER, OWNER_HEADER};

/// How long a call may take, retries and redirects included, when the
/// caller names no deadline: above a failover (the 10 s lease TTL plus a
/// membership poll and a rebuild), so a call started as a node dies is
/// answered by its successor.
pub const CALL_DEADLINE: Duration = Duration::from_secs(15);

/// Redirects followed in a row before the call fails: two nodes whose views
/// of the membership disagree for a poll interval may send a caller back
/// and forth; more than a few hops means something is wrong.
pub const MAX_REDIRECTS: usize = 4;

/// First pause before retrying an UNAVAILABLE call.
pub const RETRY_MIN: Duration = Duration::from_millis(50);

/// Longest pause between retries: a handover or rebuild takes about a
/// second, and a caller should notice its end quickly.
pub const RETRY_MAX: Duration = Duration::from_secs(1);

/// Connecting to a node that does not answer fails after this long (and
/// the next node is tried).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Most node addresses the client keeps connections to (the seeds plus
/// owners learned from redirects); a bound on its memory when redirects
/// name many addresses.
pub const MAX_CHANNELS: usize = 256;

/// How to reach the mesh.
#[derive(Clone, Default)]
pub struct MeshClientConfig {
    /// Node URLs to start from (`http://host:port` or `https://`); owners
    /// learned from redirects are added as they are met.
    pub nodes: Vec<String>,
    /// TLS to the nodes (a CA, and an identity for mutual TLS); plain
    /// HTTP/2 when `None`.
    pub tls: Option<ClientTlsConfig>,
    /// Metadata sent with every call, e.g. `authorization: Bearer <jwt>`.
    pub metadata: Vec<(String, String)>,
    /// Default deadline of a call; [`CALL_DEADLINE`] when `None`.
    pub deadline: Option<Duration>,
}

impl std::fmt::Debug for MeshClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClientConfig")
            .field("nodes", &self.nodes)
            .field("tls", &self.tls.is_some())
            .field("metadata", &self.metadata.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// Why the client could not be built; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct MeshClientConfigError {
    /// The setting at fault.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A ResourceLease client for a mesh of nodes. See the [module docs](self).
/// Cheap to share (`Arc` it); must be used inside a tokio runtime.
pub struct ResourceLeaseClient {
    seeds: Vec<String>,
    tls: Option<ClientTlsConfig>,
    metadata: Vec<(MetadataKey<tonic::metadata::Ascii>, MetadataValue<tonic::metadata::Ascii>)>,
    deadline: Duration,
    /// The seed to start from when no owner is known; moves on when one
    /// fails to connect.
    next_seed: AtomicUsize,
    channels: Mutex<HashMap<String, Channel>>,
    /// Namespace -> the address that served it last.
    owners: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for ResourceLeaseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceLeaseClient").field("seeds", &self.seeds).finish_non_exhaustive()
    }
}

impl ResourceLeaseClient {
    /// A client starting from `config.nodes`; connects lazily.
    pub fn new(config: MeshClientConfig) -> Result<Self, MeshClientConfigError> {
        let invalid = |field: String, reason: String| MeshClientConfigError { field, reason };
        if config.nodes.is_empty() {
            return Err(invalid("nodes".into(), "name at least one node URL".into()));
        }
        for (index, url) in config.nodes.iter().enumerate() {
            check_url(url, config.tls.is_some()).map_err(|reason| invalid(format!("nodes[{index}]"), reason))?;
        }
        let mut metadata = Vec::with_capacity(config.metadata.len());
        for (index, (name, value)) in config.metadata.iter().enumerate() {
            let key = MetadataKey::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("metadata[{index}]"), format!("{name:?} is not a metadata name")))?;
            let value = value
                .parse()
                .map_err(|_| invalid(format!("metadata[{index}]"), "the value must be printable ASCII".into()))?;
            metadata.push((key, value));
        }
        Ok(Self {
            seeds: config.nodes,
            tls: config.tls,
            metadata,
            deadline: config.deadline.unwrap_or(CALL_DEADLINE),
            next_seed: AtomicUsize::new(0),
            channels: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
        })
    }

    /// The address that served `namespace` last, if any.
    pub fn cached_owner(&self, namespace: &str) -> Option<String> {
        lock(&self.owners).get(namespace).cloned()
    }

    /// Enqueues; an empty `payload.request_id` is replaced by a random one
    /// kept across retries (so a retried enqueue is written once).
    pub async fn enqueue(&self, mut request: pb::EnqueueRequest) -> Result<pb::EnqueueResponse, tonic::Status> {
        if let Some(payload) = request.payload.as_mut()
            && payload.request_id.is_empty()
        {
            payload.request_id = random_request_id();
        }
        let namespace = request.namespace.clone();
        self.call(&namespace, request, |mut client, request| async move { client.enqueue(request).await }).await
    }

    /// Leases an item.
    pub async fn lease(&self, request: pb::LeaseRequest) -> Result<pb::LeaseResponse, tonic::Status> {
        let namespace = request.namespace.clone();
        self.call(&namespace, request, |mut client, request| async move { client.lease(request).await }).await
    }

    /// Extends a lease.
    pub async fn heartbeat(&self, request: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse, tonic::Status> {
        let namespace = request.namespace.clone();
        self.call(&namespace, request, |mut client, request| async move { client.heartbeat(request).await }).await
    }

    /// Completes a leased item.
    pub async fn complete(&self, request: pb::CompleteRequest) -> Result<pb::CompleteResponse, tonic::Status> {
        let namespace = request.namespace.clone();
        self.call(&namespace, request, |mut client, request| async move { client.complete(request).await }).await
    }

    /// Fails a leased item.
    pub async fn fail(&self, request: pb::FailRequest) -> Result<pb::FailResponse, tonic::Status> {
        let namespace = request.namespace.clone();
        self.call(&namespace, request, |mut client, request| async move { client.fail(request).await }).await
    }

    /// A queue's statistics.
    pub async fn stats(&self, request: pb::StatsRequest) -> Result<pb::StatsResponse, tonic::Status> {
        let namespace = request.namespace.clone();
        self.call(&namespace, request, |mut client, request| async move { client.stats(request).await }).await
    }

    /// Calls `namespace`'s owner: follows redirects, retries UNAVAILABLE
    /// with backoff until the deadline. See the [module docs](self).
    pub async fn call<Req, Resp, F, Fut>(&self, namespace: &str, request: Req, call: F) -> Result<Resp, tonic::Status>
    where
        Req: Clone,
        F: Fn(pb::resource_lease_client::ResourceLeaseClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.deadline;
        let mut backoff = RETRY_MIN;
        let mut redirects = 0;
        let mut address = self.cached_owner(namespace).unwrap_or_else(|| self.seed());
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(tonic::Status::deadline_exceeded(format!(
                    "no node served {namespace} within {:?}",
                    self.deadline
                )));
            }
            let channel = self.channel(&address)?;
            let mut outgoing = tonic::Request::new(request.clone());
            outgoing.set_timeout(remaining);
            for (key, value) in &self.metadata {
                outgoing.metadata_mut().insert(key.clone(), value.clone());
            }
            let client = pb::resource_lease_client::ResourceLeaseClient::new(channel);
            let answer = tokio::time::timeout(remaining, call(client, outgoing)).await;
            let status = match answer {
                Ok(Ok(response)) => {
                    lock(&self.owners).insert(namespace.to_string(), address);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    tonic::Status::deadline_exceeded(format!("no answer for {namespace} within {:?}", self.deadline))
                }
            };
            let retryable = status.code() == tonic::Code::Unavailable
                || (matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
                    && is_transport_failure(&status));
            if !retryable {
                return Err(status);
            }
            if let Some(owner) = header(&status, OWNER_ADDRESS_HEADER)
                && redirects < MAX_REDIRECTS
                && owner != address
            {
                tracing::debug!(namespace, from = %address, to = %owner, owner_id = ?header(&status, OWNER_HEADER), "following a redirect");
                redirects += 1;
                lock(&self.owners).insert(namespace.to_string(), owner.clone());
                address = owner;
                continue;
            }
            redirects = 0;
            // A node that does not answer at all is forgotten as the owner;
            // one that answered (a shard being rebuilt) is asked again.
            if header(&status, OWNER_HEADER).is_none() && is_transport_failure(&status) {
                lock(&self.owners).remove(namespace);
                address = self.seed_after(&address);
            }
            let pause = jitter(backoff).min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    fn seed(&self) -> String {
        let index = self.next_seed.load(Ordering::Relaxed) % self.seeds.len();
        self.seeds[index].clone()
    }

    /// The seed after `failed` (the first one when `failed` is no seed).
    fn seed_after(&self, failed: &str) -> String {
        let next = match self.seeds.iter().position(|seed| seed == failed) {
            Some(index) => index + 1,
            None => self.next_seed.load(Ordering::Relaxed),
        };
        self.next_seed.store(next % self.seeds.len(), Ordering::Relaxed);
        self.seed()
    }

    fn channel(&self, address: &str) -> Result<Channel, tonic::Status> {
        let mut channels = lock(&self.channels);
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        check_url(address, self.tls.is_some())
            .map_err(|reason| tonic::Status::unavailable(format!("owner address {address:?}: {reason}")))?;
        let mut endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|error| tonic::Status::unavailable(format!("owner address {address:?}: {error}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|error| tonic::Status::unavailable(format!("TLS to {address:?}: {error}")))?;
        }
        if channels.len() >= MAX_CHANNELS {
            // Keep the seeds; drop a learned address (reconnected when met
            // again).
            let learned = channels.keys().find(|known| !self.seeds.contains(known)).cloned();
            if let Some(learned) = learned {
                channels.remove(&learned);
            }
        }
        let channel = endpoint.connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}

fn check_url(url: &str, tls: bool) -> Result<(), String> {
    let secure = url.starts_with("https://");
    if !secure && !url.starts_with("http://") {
        return Err(format!("{url:?} must start with http:// or https://"));
    }
    if secure != tls {
        return Err(if secure {
            "an https:// node needs tls".to_string()
        } else {
            "an http:// node cannot be used with tls; use https://".to_string()
        });
    }
    Ok(())
}

fn header(status: &tonic::Status, name: &str) -> Option<String> {
    status.metadata().get(name).and_then(|value| value.to_str().ok()).map(str::to_string)
}

/// UNAVAILABLE raised by the transport (no connection, a reset), as
/// opposed to a node that answered UNAVAILABLE itself: tonic's transport
/// errors carry no `content-type` from a server.
fn is_transport_failure(status: &tonic::Status) -> bool {
    status.metadata().get("content-type").is_none()
}

fn jitter(pause: Duration) -> Duration {
    // Between half and the whole pause, so callers retrying together spread.
    pause / 2 + pause.mul_f64(fastrand::f64() / 2.0)
}

/// 128 random bits in hex: unique per enqueue.
fn random_request_id() -> String {
    let mut bytes = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // The system's random source failed: fall back to the thread RNG.
        bytes = fastrand::u128(..).to_be_bytes();
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_names_the_field_at_fault() {
        let err = ResourceLeaseClient::new(MeshClientConfig::default()).expect_err("no nodes");
        assert_eq!(err.field, "nodes");
        let config = MeshClientConfig { nodes: vec!["http://a:1".into(), "tcp://b:2".into()], ..Default::default() };
        assert_eq!(ResourceLeaseClient::new(config).expect_err("a bad URL").field, "nodes[1]");
        let config = MeshClientConfig {
            nodes: vec!["http://a:1".into()],
            metadata: vec![("bad name".into(), "x".into())],
            ..Default::default()
        };
        assert_eq!(ResourceLeaseClient::new(config).expect_err("a bad metadata name").field, "metadata[0]");
    }

    #[test]
    fn request_ids_are_random_and_jitter_stays_in_range() {
        let (a, b) = (random_request_id(), random_request_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        for _ in 0..100 {
            let pause = jitter(Duration::from_millis(100));
            assert!(pause >= Duration::from_millis(50) && pause <= Duration::from_millis(100), "{pause:?}");
        }
    }
}
