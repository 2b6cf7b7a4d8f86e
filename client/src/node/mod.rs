//! The mesh node: every namespace's lease queue, served over gRPC and
//! HTTP/JSON behind one middleware stack, with peer health, backpressure
//! and diagnostics.
//!
//! A [`Node`] hosts one [`Queue`] per configured namespace and shares one
//! [`PeerLeaseHealthTracker`] between them (each queue reports lease grants,
//! heartbeats and endings to it through its [`LeaseObserver`] seam). Per
//! namespace it also runs a [`Sweeper`] (owned by the node and stopped with
//! it), a [`BackpressureDiagnostics`] listener and a
//! [`BackpressureAwareConcurrencyLimiter`], which sits in the middleware's
//! concurrency-limiter slot ([`NamespaceConcurrencyLimitLayer`]).
//!
//! - [`Node::rpc_router`]: the ResourceLease surface behind
//!   [`MeshLayer`] (the mesh stack): gRPC at
//!   `/omnirelay.resourcelease.v1.ResourceLease/{Method}` and HTTP/JSON at
//!   `POST /resourcelease/v1/{namespace}/{procedure}` (bodies in the
//!   [`json`] form), answering identically.
//! - [`Node::control_router`]: diagnostics outside the RPC stack:
//!   `/omnirelay/control/lease-health`, `/omnirelay/control/backpressure`
//!   (and `/stream`, server-sent events), `/omnirelay/control/replication`,
//!   `/omnirelay/control/queue` (one queue's items, [`queue_view`]),
//!   `/healthz`, `/readyz`, `/metrics`.
//! - [`Node::router`]: both on one router; [`Node::serve`] runs it on a
//!   listener (plain or TLS, see [`serve`]) until a shutdown future resolves,
//!   then [`Node::shutdown`] stops the sweepers.
//!
//! `docs/mesh-node.md` is the operator's guide (embedding, the sidecar's
//! configuration, the path scheme and JSON form, the error table, the
//! diagnostics endpoints).
//!
//! ```
//! use std::sync::Arc;
//! use omnirelay_client::middleware::{AuthorizationTable, MiddlewareConfig, PrincipalConfig, TrustedProxies};
//! use omnirelay_client::node::{Node, NodeConfig};
//! use omnirelay_client::{InMemoryReplicator, QueueConfig};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let mut config = NodeConfig::new("node-a");
//! config.queues.push(QueueConfig::new("resourcelease", "node-a"));
//! config.queues.push(QueueConfig::new("resourcelease.users", "node-a"));
//! config.middleware = MiddlewareConfig {
//!     principal: PrincipalConfig::new().trusted_proxies(TrustedProxies::parse(&["127.0.0.1"])?),
//!     authorization: AuthorizationTable::from_json(r#"{"rules": [{"principals": ["*"], "procedures": ["*"], "shards": ["*"]}]}"#)?,
//!     ..MiddlewareConfig::default()
//! };
//! let node = Node::builder(config).replicator(Arc::new(InMemoryReplicator::new()), "in-memory").build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let serving = tokio::spawn(node.serve(listener, async { let _ = stopped.await; }));
//! // ... gRPC and HTTP/JSON clients call the listener's address ...
//! let _ = stop.send(());
//! serving.await??;
//! node.shutdown().await;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod control;
pub mod defaults;
mod error;
pub mod follower;
pub mod forward;
pub mod json;
mod limiter;
pub mod membership;
pub mod ownership;
mod procedures;
pub mod serve;
mod state;
pub mod tls;
mod transport;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use omnirelay_proto::resourcelease::v1 as pb;
use tokio_util::sync::CancellationToken;

pub use control::{
    BACKPRESSURE_PATH, BACKPRESSURE_STREAM_PATH, LEASE_HEALTH_PATH, MAX_QUEUE_VIEW_ITEMS, QUEUE_PATH, REPLICATION_PATH,
    queue_view,
};
pub use error::{NodeError, OWNER_ADDRESS_HEADER, OWNER_HEADER, Result};
pub use forward::{FORWARDED_BY_HEADER, ForwardingConfig};
pub use limiter::{NamespaceConcurrencyLimit, NamespaceConcurrencyLimitLayer};
pub use ownership::Assignment;
pub use ownership::OwnershipConfig;
pub use serve::ServeError;
pub use tls::{TlsAcceptorConfig, TlsConfigError};
pub use transport::{LeaseService, SessionStream};

use crate::backpressure::{BackpressureAwareConcurrencyLimiter, BackpressureDiagnostics};
use crate::clock::Clock;
use crate::ids::{PeerId, ShardId};
use crate::middleware::{MeshLayer, MiddlewareConfig, defaults::MAX_RESTORE_REQUEST_BYTES};
use crate::peer_health::{HealthConfig, PeerLeaseHealthTracker};
use crate::queue::{LeaseObserver, Queue, QueueConfig, ShardStatus, Sweeper};
use crate::replication::Replicator;
use crate::shard::parse_namespace;
use state::{Hosted, NodeInner};

/// Concurrency budgets of each namespace's concurrency limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyLimits {
    /// Concurrent calls per namespace normally.
    pub normal: usize,
    /// Concurrent calls per namespace while its queue is under backpressure.
    pub backpressure: usize,
}

impl Default for ConcurrencyLimits {
    fn default() -> Self {
        Self { normal: defaults::CONCURRENCY_LIMIT_NORMAL, backpressure: defaults::CONCURRENCY_LIMIT_BACKPRESSURE }
    }
}

/// What a node hosts and how it treats callers.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's peer id: recorded as the peer of every event its queues
    /// write, and used as each queue's `node`.
    pub node_id: PeerId,
    /// One queue per namespace (`QueueConfig::shard` is the namespace).
    pub queues: Vec<QueueConfig>,
    /// Peer health thresholds.
    pub health: HealthConfig,
    /// Principal binding, authorization, deadlines and size limits.
    pub middleware: MiddlewareConfig,
    /// The per-namespace concurrency budgets.
    pub concurrency_limits: ConcurrencyLimits,
    /// How often each queue's sweeper expires lapsed leases.
    pub sweep_interval: Duration,
    /// Shard leases and snapshots (see [`ownership`]).
    pub ownership: OwnershipConfig,
    /// The URL callers reach this node's RPC listener at (e.g.
    /// `http://10.0.0.7:7000`), published with its member lease so other
    /// nodes can redirect calls for its namespaces here (see
    /// [`membership`]).
    pub advertise: Option<String>,
    /// Forward calls for namespaces another member owns to that owner
    /// instead of redirecting the caller (see [`forward`]); `None`
    /// redirects.
    pub forwarding: Option<ForwardingConfig>,
}

impl NodeConfig {
    /// A node named `node_id` hosting no queue yet, with default health
    /// thresholds and a middleware that authenticates nobody.
    pub fn new(node_id: impl Into<PeerId>) -> Self {
        Self {
            node_id: node_id.into(),
            queues: Vec::new(),
            health: HealthConfig::default(),
            middleware: MiddlewareConfig::default(),
            concurrency_limits: ConcurrencyLimits::default(),
            sweep_interval: crate::defaults::SWEEP_INTERVAL,
            ownership: OwnershipConfig::default(),
            advertise: None,
            forwarding: None,
        }
    }

    /// Checks the configuration; errors name the field
    /// (`queues[1].shard`).
    pub fn validate(&self) -> std::result::Result<(), NodeConfigError> {
        if self.node_id.as_str().trim().is_empty() {
            return Err(NodeConfigError::new("node_id", "must not be blank"));
        }
        if self.ownership.assignment == Assignment::Rendezvous {
            membership::check_member_id(self.node_id.as_str())
                .map_err(|reason| NodeConfigError::new("node_id", reason))?;
        }
        if let Some(address) = &self.advertise {
            membership::check_advertise(address).map_err(|reason| NodeConfigError::new("advertise", reason))?;
        }
        if self.queues.is_empty() {
            return Err(NodeConfigError::new("queues", "a node hosts at least one namespace"));
        }
        let mut seen = std::collections::HashSet::new();
        for (index, queue) in self.queues.iter().enumerate() {
            let field = format!("queues[{index}].shard");
            let namespace = parse_namespace(&field, queue.shard.as_str()).map_err(|err| {
                NodeConfigError::new(&field, err.to_string().trim_start_matches(&format!("{field}: ")))
            })?;
            if namespace.as_str() != queue.shard.as_str() {
                return Err(NodeConfigError::new(field, "must name the namespace explicitly"));
            }
            if !seen.insert(namespace.clone()) {
                return Err(NodeConfigError::new(field, format!("{namespace} is configured twice")));
            }
            queue.validate().map_err(|err| NodeConfigError::new(format!("queues[{index}]"), err.to_string()))?;
        }
        self.health.validate().map_err(|err| NodeConfigError::new("health", err.to_string()))?;
        if self.concurrency_limits.normal == 0 || self.concurrency_limits.backpressure == 0 {
            return Err(NodeConfigError::new("concurrency_limits", "budgets must be at least 1"));
        }
        if self.sweep_interval.is_zero() {
            return Err(NodeConfigError::new("sweep_interval", "must be positive"));
        }
        self.ownership
            .validate()
            .map_err(|(field, reason)| NodeConfigError::new(format!("ownership.{field}"), reason))?;
        Ok(())
    }
}

/// Why a node could not be built from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct NodeConfigError {
    /// The configuration field at fault.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl NodeConfigError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    /// The transport-independent code: configuration is input.
    pub fn code(&self) -> crate::ErrorCode {
        crate::ErrorCode::InvalidArgument
    }
}

/// Builds a [`Node`].
pub struct NodeBuilder {
    config: NodeConfig,
    replicator: Option<(Arc<dyn Replicator>, String)>,
    clock: Option<Arc<dyn Clock>>,
    prometheus: Option<PrometheusHandle>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder").field("config", &self.config).finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// Publishes every queue's events to `replicator`; `kind` names it in
    /// `/omnirelay/control/replication` (`in-memory`, `hub`, ...).
    pub fn replicator(mut self, replicator: Arc<dyn Replicator>, kind: impl Into<String>) -> Self {
        self.replicator = Some((replicator, kind.into()));
        self
    }

    /// Reads time from `clock` in every queue instead of tokio's clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Renders `/metrics` from `handle` (see [`prometheus`] for the
    /// process-wide default). Without one, `/metrics` answers 404.
    pub fn prometheus(mut self, handle: PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    /// Builds the queues and starts their sweepers and shard owners (each
    /// namespace answers UNAVAILABLE until its owner took the shard's lease
    /// and rebuilt it from the log; see [`Node::serving`]); must run inside
    /// a tokio runtime.
    pub fn build(self) -> std::result::Result<Node, NodeConfigError> {
        let mut config = self.config;
        config.validate()?;
        let (replicator, replicator_kind) =
            self.replicator.ok_or_else(|| NodeConfigError::new("replicator", "is required"))?;
        let tracker = PeerLeaseHealthTracker::new(config.health.clone())
            .map_err(|err| NodeConfigError::new("health", err.to_string()))?;
        let forwarder = match config.forwarding.take() {
            Some(forwarding) => Some(Arc::new(
                forward::Forwarder::new(config.node_id.clone(), forwarding)
                    .map_err(|(field, reason)| NodeConfigError::new(field, reason))?,
            )),
            None => None,
        };
        let mut queues = HashMap::with_capacity(config.queues.len());
        let mut limiters = HashMap::with_capacity(config.queues.len());
        let mut sweepers = Vec::with_capacity(config.queues.len());
        let mut owned = Vec::with_capacity(config.queues.len());
        for (index, mut queue_config) in config.queues.drain(..).enumerate() {
            queue_config.node = config.node_id.clone();
            let shard = queue_config.shard.clone();
            let diagnostics = Arc::new(BackpressureDiagnostics::new());
            let limiter = BackpressureAwareConcurrencyLimiter::new(
                config.concurrency_limits.normal,
                config.concurrency_limits.backpressure,
            );
            let mut builder = Queue::builder(queue_config, Arc::clone(&replicator))
                .recovering()
                .listener(diagnostics.clone())
                .listener(limiter.clone())
                .observer(Arc::new(tracker.clone()) as Arc<dyn LeaseObserver>);
            if let Some(clock) = &self.clock {
                builder = builder.clock(Arc::clone(clock));
            }
            let queue =
                builder.build().map_err(|err| NodeConfigError::new(format!("queues[{index}]"), err.to_string()))?;
            sweepers.push(Sweeper::spawn(queue.clone(), config.sweep_interval));
            owned.push(queue.clone());
            limiters.insert(shard.clone(), limiter);
            queues.insert(shard, Hosted { queue, diagnostics });
        }
        let (assigner, assigned) = membership::Assigner::spawn(
            owned,
            Arc::clone(&replicator),
            config.node_id.clone(),
            config.advertise.clone(),
            config.ownership,
        );
        let deadlines = config.middleware.deadlines;
        let limits = config.middleware.limits;
        let limiters = NamespaceConcurrencyLimitLayer::new(limiters);
        let layer = MeshLayer::new(config.middleware).with_concurrency_limiter(limiters.clone());
        let inner = Arc::new(NodeInner {
            node_id: config.node_id,
            queues,
            assigned,
            tracker,
            replicator_kind,
            prometheus: self.prometheus,
            stopping: CancellationToken::new(),
            authorization: Arc::clone(layer.authorization()),
            limiters,
            deadlines,
            limits,
            forwarder,
        });
        if let Some(forwarder) = &inner.forwarder {
            forwarder.watch_members(inner.assigned.clone(), inner.stopping.clone());
        }
        tracing::info!(node = %inner.node_id, namespaces = inner.queues.len(), "mesh node built");
        Ok(Node { inner, layer, sweepers: Mutex::new(sweepers), assigner: Mutex::new(Some(assigner)) })
    }
}

/// A mesh node: the queues of its namespaces, their sweepers, peer health,
/// and the routers that serve them. See the [module docs](self).
pub struct Node {
    inner: Arc<NodeInner>,
    layer: MeshLayer<NamespaceConcurrencyLimitLayer>,
    sweepers: Mutex<Vec<Sweeper>>,
    assigner: Mutex<Option<membership::Assigner>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("node_id", &self.inner.node_id).finish_non_exhaustive()
    }
}

impl Node {
    /// Starts building a node from `config`.
    pub fn builder(config: NodeConfig) -> NodeBuilder {
        NodeBuilder { config, replicator: None, clock: None, prometheus: None }
    }

    /// This node's peer id.
    pub fn node_id(&self) -> &PeerId {
        &self.inner.node_id
    }

    /// The queue of a hosted namespace.
    pub fn queue(&self, namespace: &ShardId) -> Option<&Queue> {
        self.inner.queues.get(namespace).map(|hosted| &hosted.queue)
    }

    /// The namespaces this node is assigned now, in name order (empty until
    /// its first assignment). See [`membership`].
    pub fn assigned(&self) -> Vec<ShardId> {
        self.inner.assigned.borrow().iter().flat_map(|view| view.mine.iter()).cloned().collect()
    }

    /// The hosted namespaces, in name order.
    pub fn namespaces(&self) -> Vec<ShardId> {
        let mut namespaces: Vec<_> = self.inner.queues.keys().cloned().collect();
        namespaces.sort();
        namespaces
    }

    /// The peer health tracker every queue reports to; choosers built on a
    /// clone of it see the same peers.
    pub fn tracker(&self) -> &PeerLeaseHealthTracker {
        &self.inner.tracker
    }

    /// The backpressure diagnostics listener of a hosted namespace.
    pub fn backpressure(&self, namespace: &ShardId) -> Option<&Arc<BackpressureDiagnostics>> {
        self.inner.queues.get(namespace).map(|hosted| &hosted.diagnostics)
    }

    /// The ResourceLease service without middleware, for embedding in a
    /// custom stack (every call must carry a bound
    /// [`Caller`](crate::middleware::Caller), or it is UNAUTHENTICATED).
    pub fn service(&self) -> LeaseService {
        LeaseService { node: Arc::clone(&self.inner) }
    }

    /// The ResourceLease surface (gRPC and HTTP/JSON) behind the mesh
    /// middleware.
    pub fn rpc_router(&self) -> Router {
        let grpc = pb::resource_lease_server::ResourceLeaseServer::new(self.service())
            // Restore carries a whole snapshot; the middleware already bounds
            // every body per procedure, so tonic's 4 MiB default would only
            // refuse what the middleware allowed.
            .max_decoding_message_size(MAX_RESTORE_REQUEST_BYTES)
            .max_encoding_message_size(usize::MAX)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip);
        // A session carries only calls bounded by the default request limit:
        // its decoder refuses anything larger, per message.
        let session = pb::resource_lease_server::ResourceLeaseServer::new(self.service())
            .max_decoding_message_size(self.inner.limits.limit_for(crate::middleware::Procedure::Enqueue))
            .max_encoding_message_size(usize::MAX)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip);
        Router::new()
            .route_service(&crate::middleware::Procedure::Session.grpc_path(), session)
            .route_service(&format!("/{}/{{method}}", crate::middleware::RESOURCE_LEASE_SERVICE), grpc)
            .route(
                &format!("{}{{namespace}}/{{procedure}}", crate::middleware::HTTP_PATH_PREFIX),
                axum::routing::post(transport::http::http_call),
            )
            .with_state(self.service())
            .layer(self.layer.clone())
    }

    /// The diagnostics endpoints, outside the RPC middleware (they carry no
    /// queue data and answer probes and scrapers).
    pub fn control_router(&self) -> Router {
        control::router(Arc::clone(&self.inner))
    }

    /// The RPC surface and the diagnostics on one router.
    ///
    /// Keep the `Node` alive while its routers serve: dropping it stops the
    /// sweepers and marks the node as stopping.
    pub fn router(&self) -> Router {
        self.rpc_router().merge(self.control_router())
    }

    /// Serves [`router`](Self::router) on `listener` over plain TCP until
    /// `shutdown` resolves, then lets calls in flight finish (up to
    /// [`SHUTDOWN_GRACE`](defaults::SHUTDOWN_GRACE)). Call
    /// [`shutdown`](Self::shutdown) afterwards to stop the sweepers.
    pub fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> impl std::future::Future<Output = std::result::Result<(), ServeError>> + Send + 'static {
        let stopping = self.inner.stopping.clone();
        serve::serve(self.router(), listener, None, async move {
            shutdown.await;
            stopping.cancel();
        })
    }

    /// Like [`serve`](Self::serve), over TLS (mutual TLS when the acceptor
    /// has a client CA).
    pub fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        tls: TlsAcceptorConfig,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> impl std::future::Future<Output = std::result::Result<(), ServeError>> + Send + 'static {
        let stopping = self.inner.stopping.clone();
        serve::serve(self.router(), listener, Some(tls), async move {
            shutdown.await;
            stopping.cancel();
        })
    }

    /// Marks the node as stopping: `/readyz` answers 503 (load balancers
    /// stop sending calls) and event streams end. [`serve`](Self::serve)
    /// does this when its shutdown future resolves; call it yourself when
    /// serving the routers on listeners of your own. Idempotent.
    pub fn mark_stopping(&self) {
        self.inner.stopping.cancel();
    }

    /// Resolves once the node is marked as stopping.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.inner.stopping.clone().cancelled_owned()
    }

    /// Resolves once the node knows its share of the namespaces (all of
    /// them under [`Assignment::Every`]) and every namespace of that share
    /// serves (its owner holds the shard's lease and rebuilt it from the
    /// log).
    pub async fn serving(&self) {
        let mut assigned = self.inner.assigned.clone();
        let Ok(share) = assigned
            .wait_for(Option::is_some)
            .await
            .map(|view| view.as_ref().map(|view| view.mine.clone()).unwrap_or_default())
        else {
            return;
        };
        for shard in share {
            let Some(hosted) = self.inner.queues.get(&shard) else { continue };
            let mut status = hosted.queue.status();
            // Ends early only if the queue is gone, which it is not while
            // the node lives.
            let _ = status.wait_for(|status| matches!(status, ShardStatus::Serving { .. })).await;
        }
    }

    /// Marks the node as stopping, stops every sweeper, leaves the mesh
    /// (releases its member lease), then stops every shard owner (each lets
    /// its decided events become durable, writes a last snapshot, and
    /// releases the shard's lease), waiting for them.
    /// Idempotent.
    pub async fn shutdown(&self) {
        self.inner.stopping.cancel();
        let sweepers: Vec<Sweeper> = std::mem::take(&mut *self.sweepers.lock().unwrap_or_else(|e| e.into_inner()));
        for sweeper in sweepers {
            sweeper.shutdown().await;
        }
        let assigner = self.assigner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(assigner) = assigner {
            assigner.shutdown().await;
        }
        tracing::info!(node = %self.inner.node_id, "mesh node stopped");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Sweepers cancel themselves when dropped; this ends event streams.
        self.inner.stopping.cancel();
    }
}

/// The process-wide Prometheus handle: installs the global `metrics`
/// recorder on first use (the sidecar's; an embedding service that already
/// installed its own recorder passes its handle to
/// [`NodeBuilder::prometheus`] instead, or `/metrics` stays empty).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Buckets, not summaries, so latencies aggregate across nodes.
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    crate::metrics::LATENCY_BUCKETS,
                )
                .expect("the bucket list is constant and not empty")
                .build_recorder();
            let handle = recorder.handle();
            if let Err(err) = metrics::set_global_recorder(recorder) {
                tracing::warn!(error = %err, "a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}
