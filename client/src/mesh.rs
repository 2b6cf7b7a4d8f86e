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
//! - **Failing seeds skipped.** The seeds are peers of a
//!   [`PeerLeaseHealthTracker`] (answers count as completed calls, calls
//!   the transport failed as failed ones) and the seed to start from is
//!   picked by a [`RoundRobinChooser`] over it: a seed that failed
//!   [`HealthConfig::consecutive_failures_to_eject`] calls in a row is
//!   ejected and not tried again until its ejection ends (then on
//!   probation), unless every seed is ejected.
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

use crate::chooser::{PeerChooser, RoundRobinChooser};
use crate::ids::PeerId;
use crate::node::{OWNER_ADDRESS_HEADER, OWNER_HEADER};
use crate::peer_health::{HealthConfig, PeerLeaseHealthTracker, PeerMetadata, PeerState};

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
    /// Thresholds of the tracker over the seeds (when a failing seed is
    /// ejected, for how long).
    pub health: HealthConfig,
}

impl std::fmt::Debug for MeshClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClientConfig")
            .field("nodes", &self.nodes)
            .field("tls", &self.tls.is_some())
            .field("metadata", &self.metadata.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .field("deadline", &self.deadline)
            .field("health", &self.health)
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
    /// The seed to start from when every seed is ejected; moves on when
    /// one fails to connect.
    next_seed: AtomicUsize,
    /// The seeds' health, fed by the answers (or their absence).
    tracker: PeerLeaseHealthTracker,
    chooser: RoundRobinChooser,
    seed_peers: Vec<PeerId>,
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
        let tracker = PeerLeaseHealthTracker::without_gauges(config.health)
            .map_err(|err| invalid("health".into(), err.to_string()))?;
        let seed_peers: Vec<PeerId> = config.nodes.iter().map(|url| PeerId::from(url.as_str())).collect();
        for peer in &seed_peers {
            tracker.register(peer, PeerMetadata::default());
        }
        let chooser = RoundRobinChooser::new(tracker.clone());
        Ok(Self {
            seeds: config.nodes,
            tls: config.tls,
            metadata,
            deadline: config.deadline.unwrap_or(CALL_DEADLINE),
            next_seed: AtomicUsize::new(0),
            tracker,
            chooser,
            seed_peers,
            channels: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
        })
    }

    /// How the seed `url` stands (`None` for an address that is no seed).
    pub fn seed_state(&self, url: &str) -> Option<PeerState> {
        self.tracker.state(&PeerId::from(url))
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
            let started = Instant::now();
            let answer = tokio::time::timeout(remaining, call(client, outgoing)).await;
            let status = match answer {
                Ok(Ok(response)) => {
                    self.answered(&address, started);
                    lock(&self.owners).insert(namespace.to_string(), address);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => {
                    if is_transport_failure(&status) {
                        self.failed(&address);
                    } else {
                        self.answered(&address, started);
                    }
                    status
                }
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

    /// Records an answer from `address` (a seed's health only).
    fn answered(&self, address: &str, started: Instant) {
        let peer = PeerId::from(address);
        if self.tracker.state(&peer).is_some() {
            self.tracker.record_lease_granted(&peer);
            self.tracker.record_lease_completed(&peer, started.elapsed());
        }
    }

    /// Records a call to `address` the transport failed.
    fn failed(&self, address: &str) {
        let peer = PeerId::from(address);
        if self.tracker.state(&peer).is_some() {
            self.tracker.record_lease_granted(&peer);
            self.tracker.record_lease_failed(&peer);
        }
    }

    /// The seed to start from: an eligible one by round robin; when none
    /// is (all ejected, or silent past the grace period), the next one in
    /// rotation that is not ejected, or simply the next one.
    fn seed(&self) -> String {
        if let Ok(peer) = self.chooser.choose_from(&self.seed_peers) {
            return peer.to_string();
        }
        self.not_ejected_from(self.next_seed.load(Ordering::Relaxed))
    }

    /// The seed to try after `failed` failed to connect: another eligible
    /// seed if there is one, else the next in rotation that is not ejected
    /// (`failed` itself last), else simply the next.
    fn seed_after(&self, failed: &str) -> String {
        let others: Vec<PeerId> = self.seed_peers.iter().filter(|peer| peer.as_str() != failed).cloned().collect();
        if let Ok(peer) = self.chooser.choose_from(&others) {
            return peer.to_string();
        }
        let next = match self.seeds.iter().position(|seed| seed == failed) {
            Some(index) => index + 1,
            None => self.next_seed.load(Ordering::Relaxed),
        };
        self.next_seed.store(next % self.seeds.len(), Ordering::Relaxed);
        self.not_ejected_from(next)
    }

    /// The first seed from index `start` on (in rotation) that is not
    /// ejected; the one at `start` when all are.
    fn not_ejected_from(&self, start: usize) -> String {
        let count = self.seeds.len();
        (0..count)
            .map(|offset| &self.seeds[(start + offset) % count])
            .find(|seed| self.tracker.state(&PeerId::from(seed.as_str())) != Some(PeerState::Ejected))
            .unwrap_or(&self.seeds[start % count])
            .clone()
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

    /// A listener that accepts connections and closes them at once,
    /// counting them: every call to it fails in the transport.
    async fn refusing_node() -> (String, std::sync::Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        (url, accepted)
    }

    #[tokio::test]
    async fn a_seed_that_keeps_failing_is_ejected_and_skipped() {
        let (a, a_calls) = refusing_node().await;
        let (b, b_calls) = refusing_node().await;
        let client = ResourceLeaseClient::new(MeshClientConfig {
            nodes: vec![a.clone(), b.clone()],
            deadline: Some(Duration::from_millis(400)),
            health: HealthConfig { consecutive_failures_to_eject: 2, ..HealthConfig::default() },
            ..Default::default()
        })
        .expect("valid");
        let stats = || client.stats(pb::StatsRequest { namespace: "resourcelease.a".into() });
        // Two seeds: at most one is ejected at once (the tracker's
        // max_ejection_percent), and calls keep failing until one is.
        let mut ejected = None;
        for _ in 0..20 {
            stats().await.expect_err("nobody answers");
            ejected = [&a, &b].into_iter().find(|seed| client.seed_state(seed) == Some(PeerState::Ejected));
            if ejected.is_some() {
                break;
            }
        }
        let ejected = ejected.expect("a failing seed is ejected").clone();
        let (skipped, used) = if ejected == a { (&a_calls, &b_calls) } else { (&b_calls, &a_calls) };
        let (skipped_before, used_before) = (skipped.load(Ordering::SeqCst), used.load(Ordering::SeqCst));
        stats().await.expect_err("nobody answers");
        assert_eq!(skipped.load(Ordering::SeqCst), skipped_before, "the ejected seed {ejected} is not called");
        assert!(used.load(Ordering::SeqCst) > used_before, "the other seed is");
    }
}
