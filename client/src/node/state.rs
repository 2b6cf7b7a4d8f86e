//! What every handler of the node shares: the hosted namespaces and the
//! middleware's tables, behind one `Arc` that the transports, the
//! procedures and the diagnostics read. The node builds it; nothing here
//! reaches back to the node's builder or routers.

use std::collections::HashMap;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use super::limiter::NamespaceConcurrencyLimitLayer;
use super::membership;
use crate::backpressure::BackpressureDiagnostics;
use crate::ids::{PeerId, ShardId};
use crate::middleware::{AuthorizationTable, DeadlineConfig, RequestLimits};
use crate::peer_health::PeerLeaseHealthTracker;
use crate::queue::Queue;

/// One namespace as the node hosts it.
pub(crate) struct Hosted {
    pub(crate) queue: Queue,
    pub(crate) diagnostics: Arc<BackpressureDiagnostics>,
}

/// What every handler of the node shares.
pub(crate) struct NodeInner {
    pub(crate) node_id: PeerId,
    /// Namespaces in a map keyed by shard: looked up on every call.
    pub(crate) queues: HashMap<ShardId, Hosted>,
    /// The namespaces this node is assigned (see [`membership`]); `None`
    /// until the first assignment.
    pub(crate) assigned: membership::Assigned,
    pub(crate) tracker: PeerLeaseHealthTracker,
    pub(crate) replicator_kind: String,
    pub(crate) prometheus: Option<PrometheusHandle>,
    /// Cancelled when the node stops: `/readyz` turns 503 and event streams
    /// end, so a graceful shutdown is not held up by them.
    pub(crate) stopping: CancellationToken,
    /// The middleware's table (the same `Arc`): sessions authorize each
    /// message against it.
    pub(crate) authorization: Arc<AuthorizationTable>,
    /// The middleware's concurrency limiters: a session's messages take their
    /// namespace's permits.
    pub(crate) limiters: NamespaceConcurrencyLimitLayer,
    /// The middleware's deadlines: a session message without a `timeout`
    /// gets the default, and none gets more than the maximum.
    pub(crate) deadlines: DeadlineConfig,
    /// The middleware's size limits: each session message is bounded by the
    /// limit of the calls it carries.
    pub(crate) limits: RequestLimits,
    /// Calls for namespaces owned elsewhere go there when set (see
    /// [`forward`](super::forward)); otherwise the caller is redirected.
    pub(crate) forwarder: Option<Arc<super::forward::Forwarder>>,
}
