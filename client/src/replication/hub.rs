//! The hub replicator: a shard's log on the replication hub, over gRPC.
//!
//! Batches go out on one long-lived `Append` stream per replicator (all
//! shards share it; the hub keeps a stream's batches in order), each sent the
//! moment it is published, so a queue's window of batches is pipelined. The
//! stream's task keeps every batch until the hub answered it:
//!
//! - an acknowledgement resolves the batch (a retry the hub recognised is an
//!   acknowledgement too: same producer sequence, original sequences);
//! - a refusal for good (stale epoch, no lease, invalid, a head or producer
//!   sequence that does not follow) resolves it with the refusal, and the
//!   queue fences its shard;
//! - a transient answer (the hub's store unavailable), a stream that breaks
//!   or ends, or a batch not answered within [`ACK_TIMEOUT`] restarts the
//!   stream after a backoff, on the next endpoint, and every unanswered
//!   batch is sent again in its original order with its original producer
//!   sequence, so a batch that was written despite the failure is written
//!   once. Refusals that only follow from an earlier batch's transient
//!   failure in the same stream (an out-of-order producer sequence, a head
//!   mismatch) are retried the same way;
//! - a batch still unanswered [`RETRY_WINDOW`] after it was first sent is
//!   given up as UNAVAILABLE (it may or may not be in the log), and the
//!   queue fences its shard and rebuilds it from the log once the hub is
//!   back.
//!
//! Connections use HTTP/2 keepalive (a dead hub or a silent partition is
//! noticed within [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`]), TLS or
//! mutual TLS when configured, and every unary call (leases, reads,
//! snapshots) has a deadline ([`REQUEST_TIMEOUT`]). Memory is bounded by the
//! queues' windows: each shard has at most its window of batches here.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use omnirelay_proto::hub::v1 as pb;
use omnirelay_proto::limits::MAX_MESSAGE_BYTES;
use omnirelay_proto::raw::RawEvent;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{
    Appended, Batch, ChainLink, HeldLease, LogPage, LoggedEvent, MAX_HELD_LEASES, PublishFuture, ReplicationError,
    Replicator, ReplicatorFuture, ShardGrant, StoredSnapshot,
};
use crate::ids::{Epoch, Sequence, ShardId};
use crate::metrics;
use crate::wire;

/// Longest wait for a TCP (and TLS) connection to a hub endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Deadline of every unary call to the hub: far above a healthy round trip
/// (a lease or a page read takes milliseconds), and short enough that the
/// shard owner's renewals notice a hub that stopped answering well within a
/// lease term.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A batch not answered this long after it was sent means the stream (or the
/// hub replica behind it) stalled: it is restarted and the batch sent again.
/// The hub answers a healthy batch in milliseconds and refuses with
/// UNAVAILABLE within about two seconds when its database stalls.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a batch is retried before it is given up as UNAVAILABLE (the
/// queue then fences its shard and rebuilds it from the log when the hub is
/// back). Long enough to ride out a hub replica restart or a database
/// failover; short enough that callers waiting on the batch hear about it
/// within a typical call deadline.
pub const RETRY_WINDOW: Duration = Duration::from_secs(20);

/// First pause before reopening a broken stream; doubles up to
/// [`RECONNECT_BACKOFF_MAX`].
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// Longest pause between attempts to reopen the stream.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// HTTP/2 keepalive ping interval: a hub that vanished without closing the
/// connection (a killed pod, a partition) is noticed within this plus the
/// timeout, even while no batch is in flight.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a keepalive ping may go unanswered.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests buffered towards the stream before the task stops reading new
/// batches: HTTP/2 flow control holds the rest, and the queues' windows
/// bound how many there are.
const STREAM_BUFFER: usize = 256;

/// One hub replica (or a load balancer in front of several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEndpoint {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
}

impl HubEndpoint {
    /// An endpoint at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into() }
    }
}

/// TLS to the hub: the CA that signed its certificate, and this node's own
/// certificate and key for mutual TLS.
#[derive(Clone)]
pub struct HubTls {
    /// PEM of the CA to trust for the hub's certificate.
    pub ca_pem: Vec<u8>,
    /// PEM of this node's certificate chain and private key (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the hub's certificate against, when it differs
    /// from the endpoints' host names.
    pub domain: Option<String>,
}

impl std::fmt::Debug for HubTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubTls")
            .field("mutual", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// How to reach the hub.
#[derive(Debug, Clone)]
pub struct HubReplicatorConfig {
    /// The hub's endpoints, tried in order; a failing one hands over to the
    /// next.
    pub endpoints: Vec<HubEndpoint>,
    /// TLS; plain HTTP/2 when `None` (the endpoints must then be `http://`).
    pub tls: Option<HubTls>,
    /// See [`RETRY_WINDOW`].
    pub retry_window: Duration,
    /// See [`ACK_TIMEOUT`].
    pub ack_timeout: Duration,
}

impl HubReplicatorConfig {
    /// Plain connections to `endpoints` with the default timeouts.
    pub fn new(endpoints: impl IntoIterator<Item = HubEndpoint>) -> Self {
        Self {
            endpoints: endpoints.into_iter().collect(),
            tls: None,
            retry_window: RETRY_WINDOW,
            ack_timeout: ACK_TIMEOUT,
        }
    }
}

/// Why a hub replicator could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct HubConfigError {
    /// The setting at fault.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A [`Replicator`] on the replication hub. See the [module docs](self).
/// Cheap to clone; clones share the stream. Must be created inside a tokio
/// runtime; its task ends when the last clone is dropped.
#[derive(Clone)]
pub struct HubReplicator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HubReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubReplicator").field("endpoints", &self.inner.urls).finish_non_exhaustive()
    }
}

struct Inner {
    urls: Vec<String>,
    channels: Vec<Channel>,
    /// The endpoint in use; moves on when one fails.
    current: AtomicUsize,
    batches: mpsc::UnboundedSender<Outgoing>,
    cancel: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A batch on its way to the hub.
struct Outgoing {
    request: pb::AppendRequest,
    count: u64,
    reply: oneshot::Sender<Result<Appended, ReplicationError>>,
}

impl HubReplicator {
    /// Connects (lazily) to the hub's endpoints and starts the stream task.
    pub fn new(config: HubReplicatorConfig) -> Result<Self, HubConfigError> {
        if config.endpoints.is_empty() {
            return Err(HubConfigError { field: "endpoints".into(), reason: "name at least one hub endpoint".into() });
        }
        let mut channels = Vec::with_capacity(config.endpoints.len());
        for (index, endpoint) in config.endpoints.iter().enumerate() {
            let field = format!("endpoints[{index}]");
            let invalid = |reason: String| HubConfigError { field: field.clone(), reason };
            let secure = endpoint.url.starts_with("https://");
            if !secure && !endpoint.url.starts_with("http://") {
                return Err(invalid(format!("{:?} must start with http:// or https://", endpoint.url)));
            }
            if secure != config.tls.is_some() {
                return Err(invalid(if secure {
                    "an https:// endpoint needs the hub's CA (tls)".to_string()
                } else {
                    "an http:// endpoint cannot be used with tls; use https://".to_string()
                }));
            }
            let mut built = Endpoint::from_shared(endpoint.url.clone())
                .map_err(|error| invalid(format!("{:?} is not a valid URL: {error}", endpoint.url)))?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true);
            if let Some(tls) = &config.tls {
                let mut client =
                    ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
                if let Some((cert, key)) = &tls.identity {
                    client = client.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                if let Some(domain) = &tls.domain {
                    client = client.domain_name(domain.clone());
                }
                built = built.tls_config(client).map_err(|error| HubConfigError {
                    field: "tls".into(),
                    reason: format!("the CA, certificate or key was refused: {error}"),
                })?;
            }
            channels.push(built.connect_lazy());
        }
        let (batches, outgoing) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let inner = Arc::new(Inner {
            urls: config.endpoints.iter().map(|e| e.url.clone()).collect(),
            channels,
            current: AtomicUsize::new(0),
            batches,
            cancel: cancel.clone(),
        });
        let task = StreamTask {
            inner: Arc::downgrade(&inner),
            config: config.clone(),
            pending: BTreeMap::new(),
            next_batch_id: 1,
        };
        tokio::spawn(task.run(outgoing, cancel));
        Ok(Self { inner })
    }

    /// A client on the endpoint in use, with the hub's message limits.
    fn client(&self) -> (usize, pb::hub_client::HubClient<Channel>) {
        let index = self.inner.current.load(Ordering::Relaxed) % self.inner.channels.len();
        let client = pb::hub_client::HubClient::new(self.inner.channels[index].clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        (index, client)
    }

    /// Runs a unary call with [`REQUEST_TIMEOUT`]; a transport failure moves
    /// later calls to the next endpoint.
    async fn call<T, F, Fut>(&self, what: &'static str, call: F) -> Result<T, ReplicationError>
    where
        F: FnOnce(pb::hub_client::HubClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (index, client) = self.client();
        match tokio::time::timeout(REQUEST_TIMEOUT, call(client)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => {
                if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                    self.inner.rotate_from(index);
                }
                Err(unary_error(what, &status))
            }
            Err(_) => {
                self.inner.rotate_from(index);
                Err(ReplicationError::Unavailable(format!("{what}: no answer within {REQUEST_TIMEOUT:?}")))
            }
        }
    }
}

impl Inner {
    /// Moves to the endpoint after `failed`, unless someone already did.
    fn rotate_from(&self, failed: usize) {
        let next = (failed + 1) % self.channels.len();
        let _ = self.current.compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

fn unary_error(what: &'static str, status: &tonic::Status) -> ReplicationError {
    let message = format!("{what}: {} ({:?})", status.message(), status.code());
    match status.code() {
        tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded
        | tonic::Code::ResourceExhausted
        | tonic::Code::Unknown
        | tonic::Code::Cancelled => ReplicationError::Unavailable(message),
        tonic::Code::Internal | tonic::Code::DataLoss => ReplicationError::Corrupt(message),
        _ => ReplicationError::Rejected(message),
    }
}

impl Replicator for HubReplicator {
    fn publish(&self, batch: &Batch) -> PublishFuture {
        // Encoded canonically with the shard named and the log's fields
        // unset: the hub stores these bytes as they are.
        let events = batch
            .events
            .iter()
            .map(|event| {
                let mut encoded = wire::event(Sequence::ZERO, event);
                encoded.sequence = 0;
                RawEvent::encode(&encoded)
            })
            .collect();
        let request = pb::AppendRequest {
            batch_id: 0,
            shard_id: batch.shard.to_string(),
            producer_id: batch.producer.to_string(),
            producer_seq: batch.producer_seq,
            epoch: batch.epoch.get(),
            events,
            expected_first_sequence: batch.first.get(),
        };
        let (reply, answer) = oneshot::channel();
        let outgoing = Outgoing { request, count: batch.events.len() as u64, reply };
        if self.inner.batches.send(outgoing).is_err() {
            return PublishFuture::ready(Err(ReplicationError::Unavailable("the hub replicator stopped".into())));
        }
        PublishFuture::new(async move {
            answer.await.unwrap_or_else(|_| Err(ReplicationError::Unavailable("the hub replicator stopped".into())))
        })
    }

    fn acquire_shard(&self, shard: &ShardId, owner: &str, ttl: Duration) -> ReplicatorFuture<'_, ShardGrant> {
        let request = pb::AcquireShardRequest {
            shard_id: shard.to_string(),
            owner: owner.to_string(),
            ttl: Some(wire::duration(ttl)),
        };
        Box::pin(async move {
            let response =
                self.call("acquire the shard", |mut client| async move { client.acquire_shard(request).await }).await?;
            let lease = response.lease.unwrap_or_default();
            Ok(grant(response.granted, &lease, ttl))
        })
    }

    fn held_leases(&self, prefix: &str) -> ReplicatorFuture<'_, Vec<HeldLease>> {
        let prefix = prefix.to_string();
        Box::pin(async move {
            let mut held = Vec::new();
            let mut after = String::new();
            loop {
                let request = pb::ListShardLeasesRequest { prefix: prefix.clone(), after, limit: 0 };
                let page = self
                    .call("list shard leases", |mut client| async move { client.list_shard_leases(request).await })
                    .await?;
                for lease in page.leases {
                    held.push(HeldLease {
                        shard: ShardId::new(lease.shard_id),
                        owner: lease.owner,
                        epoch: Epoch::new(lease.epoch),
                    });
                }
                if page.next_after.is_empty() || held.len() >= MAX_HELD_LEASES {
                    held.truncate(MAX_HELD_LEASES);
                    return Ok(held);
                }
                after = page.next_after;
            }
        })
    }

    fn renew_shard(
        &self,
        shard: &ShardId,
        owner: &str,
        epoch: Epoch,
        ttl: Duration,
    ) -> ReplicatorFuture<'_, ShardGrant> {
        let request = pb::RenewShardRequest {
            shard_id: shard.to_string(),
            owner: owner.to_string(),
            epoch: epoch.get(),
            ttl: Some(wire::duration(ttl)),
        };
        let shard = shard.clone();
        Box::pin(async move {
            let (index, mut client) = self.client();
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, client.renew_shard(request)).await;
            match answer {
                Ok(Ok(response)) => Ok(grant(true, &response.into_inner().lease.unwrap_or_default(), ttl)),
                // ABORTED: the epoch moved on (or the lease was lost).
                Ok(Err(status)) if status.code() == tonic::Code::Aborted => {
                    Err(ReplicationError::StaleEpoch { shard, given: epoch, current: Epoch::ZERO })
                }
                Ok(Err(status)) => {
                    if status.code() == tonic::Code::Unavailable {
                        self.inner.rotate_from(index);
                    }
                    Err(unary_error("renew the shard", &status))
                }
                Err(_) => {
                    self.inner.rotate_from(index);
                    Err(ReplicationError::Unavailable(format!("renew the shard: no answer within {REQUEST_TIMEOUT:?}")))
                }
            }
        })
    }

    fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool> {
        let request =
            pb::ReleaseShardRequest { shard_id: shard.to_string(), owner: owner.to_string(), epoch: epoch.get() };
        Box::pin(async move {
            let response =
                self.call("release the shard", |mut client| async move { client.release_shard(request).await }).await?;
            Ok(response.released)
        })
    }

    fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage> {
        let request = pb::ReadRangeRequest {
            shard_id: shard.to_string(),
            from_sequence: after.get() + 1,
            to_sequence: 0,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        };
        let shard = shard.clone();
        Box::pin(async move {
            let response =
                match self.call("read the log", |mut client| async move { client.read_range(request).await }).await {
                    // An unknown shard has an empty log.
                    Err(ReplicationError::Rejected(message)) if message.contains("NotFound") => {
                        return Ok(LogPage::default());
                    }
                    other => other?,
                };
            if response.low_sequence > after.get() + 1 && after.get() < response.head_sequence {
                return Err(ReplicationError::Trimmed { shard, low: Sequence::new(response.low_sequence) });
            }
            let mut events = Vec::with_capacity(response.events.len());
            for event in response.events {
                let event = event.decode().map_err(|error| {
                    ReplicationError::Corrupt(format!("shard {shard}: an event of the log does not decode: {error}"))
                })?;
                let link = ChainLink { prev_hash: event.prev_hash.clone(), hash: event.hash.clone() };
                let event = wire::event_from_pb(event).map_err(|error| {
                    ReplicationError::Corrupt(format!("shard {shard}: an event of the log does not decode: {error}"))
                })?;
                events.push(LoggedEvent { event, link: Some(link) });
            }
            Ok(LogPage {
                events,
                head: Sequence::new(response.head_sequence),
                low: Sequence::new(response.low_sequence),
            })
        })
    }

    fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>> {
        let request = pb::GetSnapshotRequest { shard_id: shard.to_string(), at_or_below: 0 };
        Box::pin(async move {
            let response = match self
                .call("read the snapshot", |mut client| async move { client.get_snapshot(request).await })
                .await
            {
                Err(ReplicationError::Rejected(message)) if message.contains("NotFound") => return Ok(None),
                other => other?,
            };
            Ok(response.snapshot.map(|snapshot| StoredSnapshot {
                sequence: Sequence::new(snapshot.sequence),
                data: snapshot.data,
                hash: (!snapshot.hash.is_empty()).then_some(snapshot.hash),
            }))
        })
    }

    fn put_snapshot(&self, shard: &ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> ReplicatorFuture<'_, ()> {
        let request =
            pb::PutSnapshotRequest { shard_id: shard.to_string(), sequence: sequence.get(), data, epoch: epoch.get() };
        let shard = shard.clone();
        Box::pin(async move {
            let (index, mut client) = self.client();
            match tokio::time::timeout(REQUEST_TIMEOUT, client.put_snapshot(request)).await {
                Ok(Ok(_)) => Ok(()),
                // ABORTED: the epoch moved on, as for renewals and appends.
                Ok(Err(status)) if status.code() == tonic::Code::Aborted => {
                    Err(ReplicationError::StaleEpoch { shard, given: epoch, current: Epoch::ZERO })
                }
                Ok(Err(status)) => {
                    if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                        self.inner.rotate_from(index);
                    }
                    Err(unary_error("store the snapshot", &status))
                }
                Err(_) => {
                    self.inner.rotate_from(index);
                    Err(ReplicationError::Unavailable(format!(
                        "store the snapshot: no answer within {REQUEST_TIMEOUT:?}"
                    )))
                }
            }
        })
    }
}

fn grant(granted: bool, lease: &pb::ShardLease, requested: Duration) -> ShardGrant {
    let remaining = lease.expires_at.as_ref().and_then(|at| {
        let at = SystemTime::UNIX_EPOCH + Duration::new(u64::try_from(at.seconds).ok()?, u32::try_from(at.nanos).ok()?);
        Some(at.duration_since(SystemTime::now()).unwrap_or_default())
    });
    ShardGrant {
        granted,
        owner: lease.owner.clone(),
        epoch: Epoch::new(lease.epoch),
        head: Sequence::new(lease.head_sequence),
        ttl: if granted { Some(requested) } else { remaining },
    }
}

/// A batch the stream task keeps until the hub answered it.
struct Pending {
    request: pb::AppendRequest,
    count: u64,
    reply: oneshot::Sender<Result<Appended, ReplicationError>>,
    first_sent: tokio::time::Instant,
    last_sent: tokio::time::Instant,
    sends: u32,
}

/// The task that owns the `Append` stream.
struct StreamTask {
    inner: std::sync::Weak<Inner>,
    config: HubReplicatorConfig,
    /// Unanswered batches by batch id, which is their send order.
    pending: BTreeMap<u64, Pending>,
    next_batch_id: u64,
}

/// Why a stream session ended.
enum Ended {
    /// Reopen after a backoff.
    Broken(String),
    /// The replicator is gone.
    Stopped,
}

impl StreamTask {
    async fn run(mut self, mut outgoing: mpsc::UnboundedReceiver<Outgoing>, cancel: CancellationToken) {
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            let opened = tokio::time::Instant::now();
            match self.session(&mut outgoing, &cancel).await {
                Ended::Stopped => break,
                Ended::Broken(reason) => {
                    if let Some(inner) = self.inner.upgrade() {
                        let index = inner.current.load(Ordering::Relaxed) % inner.channels.len();
                        tracing::warn!(
                            endpoint = %inner.urls[index],
                            reason = %reason,
                            unanswered = self.pending.len(),
                            "hub append stream ended; reopening"
                        );
                        inner.rotate_from(index);
                    }
                }
            }
            // A stream that lived a while was healthy: start over from the
            // shortest pause.
            if opened.elapsed() > RECONNECT_BACKOFF_MAX * 4 {
                backoff = RECONNECT_BACKOFF_MIN;
            }
            // Give up batches past their retry window while waiting.
            let until = tokio::time::Instant::now() + backoff;
            loop {
                self.expire();
                tokio::select! {
                    () = cancel.cancelled() => {
                        self.fail_all("the hub replicator stopped");
                        return;
                    }
                    () = tokio::time::sleep_until(until) => break,
                    next = outgoing.recv() => match next {
                        Some(batch) => self.admit(batch),
                        None => {
                            self.fail_all("the hub replicator stopped");
                            return;
                        }
                    },
                }
            }
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
        self.fail_all("the hub replicator stopped");
    }

    fn admit(&mut self, batch: Outgoing) {
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        let mut request = batch.request;
        request.batch_id = batch_id;
        let now = tokio::time::Instant::now();
        self.pending.insert(
            batch_id,
            Pending { request, count: batch.count, reply: batch.reply, first_sent: now, last_sent: now, sends: 0 },
        );
    }

    /// One stream: open it, send every unanswered batch in order, then send
    /// new batches and settle answers until it breaks.
    async fn session(&mut self, outgoing: &mut mpsc::UnboundedReceiver<Outgoing>, cancel: &CancellationToken) -> Ended {
        let Some(inner) = self.inner.upgrade() else { return Ended::Stopped };
        let index = inner.current.load(Ordering::Relaxed) % inner.channels.len();
        let mut client = pb::hub_client::HubClient::new(inner.channels[index].clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        drop(inner);
        let (requests, stream) = mpsc::channel::<pb::AppendRequest>(STREAM_BUFFER);
        // Batches already waiting go first, in their order.
        let mut resend: Vec<u64> = self.pending.keys().copied().collect();
        let opening = client.append(tokio_stream::wrappers::ReceiverStream::new(stream));
        // The request stream must be fed while the call opens (the hub reads
        // it only once it answered the call's headers), so the first batches
        // go into the buffer now.
        resend.reverse();
        while let Some(batch_id) = resend.last().copied() {
            match self.send(&requests, batch_id) {
                Ok(true) => {
                    resend.pop();
                }
                Ok(false) => break, // buffer full: the rest after the open
                Err(()) => return Ended::Broken("the request stream closed".into()),
            }
        }
        let mut inbound = match tokio::time::timeout(CONNECT_TIMEOUT + REQUEST_TIMEOUT, opening).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return Ended::Broken(format!("opening the stream: {status}")),
            Err(_) => return Ended::Broken("opening the stream timed out".into()),
        };
        // Refusals that only follow from an earlier batch's transient failure
        // on this stream: those batches are sent again on the next one.
        let mut tainted: HashSet<(String, String)> = HashSet::new();
        let mut broken: Option<String> = None;
        let mut ticks = tokio::time::interval(Duration::from_millis(250));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while let Some(batch_id) = resend.last().copied() {
                match self.send(&requests, batch_id) {
                    Ok(true) => {
                        resend.pop();
                    }
                    Ok(false) => break,
                    Err(()) => return Ended::Broken("the request stream closed".into()),
                }
            }
            if let Some(reason) = &broken
                && !self.pending.values().any(|p| p.sends > 0 && p.last_sent.elapsed() < self.config.ack_timeout)
            {
                return Ended::Broken(reason.clone());
            }
            tokio::select! {
                () = cancel.cancelled() => return Ended::Stopped,
                next = outgoing.recv(), if broken.is_none() && resend.is_empty() => match next {
                    Some(batch) => {
                        let batch_id = self.next_batch_id;
                        self.admit(batch);
                        resend.push(batch_id);
                    }
                    None => return Ended::Stopped,
                },
                message = inbound.message() => match message {
                    Ok(Some(response)) => {
                        if let Some(reason) = self.answer(response, &mut tainted) {
                            broken.get_or_insert(reason);
                        }
                    }
                    Ok(None) => return Ended::Broken("the hub ended the stream".into()),
                    Err(status) => return Ended::Broken(format!("{status}")),
                },
                _ = ticks.tick() => {
                    self.expire();
                    let stalled = self
                        .pending
                        .values()
                        .any(|p| p.sends > 0 && p.last_sent.elapsed() >= self.config.ack_timeout);
                    if stalled {
                        return Ended::Broken(format!("a batch was not answered within {:?}", self.config.ack_timeout));
                    }
                }
            }
        }
    }

    /// Puts one batch on the stream: `Ok(false)` when the buffer is full
    /// (HTTP/2 flow control is holding the stream back), `Err` when the
    /// stream is gone.
    fn send(&mut self, requests: &mpsc::Sender<pb::AppendRequest>, batch_id: u64) -> Result<bool, ()> {
        let Some(pending) = self.pending.get_mut(&batch_id) else { return Ok(true) };
        match requests.try_send(pending.request.clone()) {
            Ok(()) => {
                if pending.sends > 0 {
                    ::metrics::counter!(metrics::REPLICATION_RETRIES, metrics::SHARD_LABEL => pending.request.shard_id.clone())
                        .increment(1);
                }
                pending.sends += 1;
                pending.last_sent = tokio::time::Instant::now();
                Ok(true)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        }
    }

    /// Settles one answer. Returns why the stream should be reopened, for a
    /// transient failure.
    fn answer(&mut self, response: pb::AppendResponse, tainted: &mut HashSet<(String, String)>) -> Option<String> {
        use pb::append_response::Result as Answer;
        let pending = self.pending.get(&response.batch_id)?;
        let key = (pending.request.shard_id.clone(), pending.request.producer_id.clone());
        let result = match response.result {
            Some(Answer::Ack(ack)) => {
                let appended = Appended {
                    first: Sequence::new(ack.first_sequence),
                    count: ack.last_sequence.saturating_sub(ack.first_sequence) + 1,
                    deduplicated: ack.duplicate,
                };
                if appended.count != pending.count {
                    Err(ReplicationError::Rejected(format!(
                        "the hub acknowledged {} events of a batch of {}",
                        appended.count, pending.count
                    )))
                } else {
                    Ok(appended)
                }
            }
            Some(Answer::Error(error)) => {
                use pb::AppendErrorCode as Code;
                let code = Code::try_from(error.code).unwrap_or(Code::Internal);
                match code {
                    Code::Unavailable | Code::Internal | Code::Unspecified => {
                        tainted.insert(key);
                        return Some(format!("batch {}: {}", response.batch_id, error.message));
                    }
                    Code::OutOfOrder | Code::HeadMismatch if tainted.contains(&key) => {
                        // Follows from an earlier batch of this producer that
                        // will be sent again first.
                        return Some(format!("batch {}: {}", response.batch_id, error.message));
                    }
                    Code::StaleEpoch => Err(ReplicationError::StaleEpoch {
                        shard: ShardId::from(pending.request.shard_id.as_str()),
                        given: Epoch::new(pending.request.epoch),
                        current: Epoch::new(error.current_epoch),
                    }),
                    Code::NoLease | Code::Invalid | Code::OutOfOrder | Code::HeadMismatch => {
                        Err(ReplicationError::Rejected(error.message))
                    }
                }
            }
            None => Err(ReplicationError::Rejected("the hub answered a batch with nothing".into())),
        };
        if let Some(pending) = self.pending.remove(&response.batch_id) {
            let _ = pending.reply.send(result);
        }
        None
    }

    /// Gives up batches first sent more than the retry window ago.
    fn expire(&mut self) {
        let window = self.config.retry_window;
        let expired: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.first_sent.elapsed() >= window).map(|(id, _)| *id).collect();
        for batch_id in expired {
            if let Some(pending) = self.pending.remove(&batch_id) {
                let _ = pending.reply.send(Err(ReplicationError::Unavailable(format!(
                    "the hub did not acknowledge the batch within {window:?} ({} sends)",
                    pending.sends
                ))));
            }
        }
    }

    fn fail_all(&mut self, reason: &str) {
        for (_, pending) in std::mem::take(&mut self.pending) {
            let _ = pending.reply.send(Err(ReplicationError::Unavailable(reason.to_string())));
        }
    }
}
