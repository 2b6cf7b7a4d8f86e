//! Diagnostics over HTTP, outside the RPC middleware: peer health,
//! backpressure (latest and as a stream), replication, probes and metrics.
//! Every body is JSON with snake_case fields, as the CLI reads it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use super::NodeInner;
use super::defaults::SSE_KEEP_ALIVE;
use super::json;
use crate::backpressure::BackpressureSignal;
use crate::ids::ShardId;
use crate::wire;

/// Path of the peer health snapshot.
pub const LEASE_HEALTH_PATH: &str = "/omnirelay/control/lease-health";
/// Path of the latest backpressure signal per namespace.
pub const BACKPRESSURE_PATH: &str = "/omnirelay/control/backpressure";
/// Path of the backpressure transition stream (server-sent events).
pub const BACKPRESSURE_STREAM_PATH: &str = "/omnirelay/control/backpressure/stream";
/// Path of the replication status per namespace.
pub const REPLICATION_PATH: &str = "/omnirelay/control/replication";

pub(crate) fn router(node: Arc<NodeInner>) -> Router {
    Router::new()
        .route(LEASE_HEALTH_PATH, get(lease_health))
        .route(BACKPRESSURE_PATH, get(backpressure))
        .route(BACKPRESSURE_STREAM_PATH, get(backpressure_stream))
        .route(REPLICATION_PATH, get(replication))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(node)
}

/// `/omnirelay/control/lease-health`: the tracker's snapshot (summary with
/// eligible, unhealthy and pending reassignments, then every peer).
async fn lease_health(State(node): State<Arc<NodeInner>>) -> Response {
    let mut body = serde_json::to_value(node.tracker.snapshot()).unwrap_or_default();
    body["node_id"] = serde_json::Value::String(node.node_id.to_string());
    Json(body).into_response()
}

fn signal_json(signal: &BackpressureSignal) -> serde_json::Value {
    json::signal(&wire::signal(signal))
}

/// One namespace's backpressure: the live state and the last transition.
#[derive(Debug, Serialize)]
struct NamespaceBackpressure {
    /// The queue's signal now (depth, watermarks, whether active).
    current: serde_json::Value,
    /// The most recent transition, if backpressure ever flipped.
    latest_transition: Option<serde_json::Value>,
}

/// `/omnirelay/control/backpressure`: per namespace, the current signal and
/// the latest transition.
async fn backpressure(State(node): State<Arc<NodeInner>>) -> Response {
    let mut namespaces = BTreeMap::new();
    for (shard, hosted) in &node.queues {
        let stats = hosted.queue.stats_now();
        namespaces.insert(
            shard.to_string(),
            NamespaceBackpressure {
                current: signal_json(&stats.backpressure),
                latest_transition: hosted.diagnostics.latest().as_ref().map(signal_json),
            },
        );
    }
    Json(serde_json::json!({ "node_id": node.node_id.to_string(), "namespaces": namespaces })).into_response()
}

/// Query of the stream: `?namespace=resourcelease.users` follows one
/// namespace only.
#[derive(Debug, Deserialize)]
struct StreamQuery {
    namespace: Option<String>,
}

/// `/omnirelay/control/backpressure/stream`: a `backpressure` event (the
/// signal's JSON) per transition of any (or the chosen) namespace, a
/// `lagged` event (`{"namespace", "missed"}`) when a slow reader lost
/// transitions, keep-alive comments in between; the stream ends when the
/// node stops.
async fn backpressure_stream(State(node): State<Arc<NodeInner>>, Query(query): Query<StreamQuery>) -> Response {
    let mut selected = Vec::new();
    for (shard, hosted) in &node.queues {
        if query.namespace.as_deref().is_none_or(|wanted| wanted == shard.as_str()) {
            selected.push((shard.clone(), hosted.diagnostics.subscribe()));
        }
    }
    if selected.is_empty() {
        let namespace = query.namespace.unwrap_or_default();
        let message = format!("namespace {namespace} is not hosted by this node");
        return crate::middleware::http_error_response(crate::ErrorCode::NotFound, &message, None).into_response();
    }
    Sse::new(transitions(selected, node.stopping.clone()))
        .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
        .into_response()
}

fn transitions(
    subscriptions: Vec<(ShardId, crate::backpressure::BackpressureTransitions)>,
    stopping: tokio_util::sync::CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Event>(crate::defaults::BACKPRESSURE_TRANSITIONS_KEPT);
    // One forwarding task per namespace, owned by the stream: they end when
    // the client goes away (the receiver is dropped, sends fail), when the
    // node stops, or when the queue is gone.
    for (shard, mut subscription) in subscriptions {
        let sender = sender.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = stopping.cancelled() => break,
                    () = sender.closed() => break,
                    next = subscription.next() => next,
                };
                let event = match next {
                    None => break,
                    Some(Ok(signal)) => Event::default().event("backpressure").data(signal_json(&signal).to_string()),
                    Some(Err(lagged)) => Event::default()
                        .event("lagged")
                        .data(serde_json::json!({ "namespace": shard.as_str(), "missed": lagged.0 }).to_string()),
                };
                if sender.send(event).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(sender);
    futures_util::stream::unfold((receiver, stopping), |(mut receiver, stopping)| async move {
        let event = tokio::select! {
            () = stopping.cancelled() => None,
            event = receiver.recv() => event,
        }?;
        Some((Ok(event), (receiver, stopping)))
    })
}

/// One namespace's replication state.
#[derive(Debug, Serialize)]
struct NamespaceReplication {
    /// The replicator the queue publishes to.
    replicator: String,
    /// `serving`; `fenced` while a shard assigned here is not (yet) rebuilt
    /// from its log; `standby` while another node is assigned the shard
    /// (see the mesh membership in `docs/mesh-node.md`).
    status: &'static str,
    /// Why the shard is fenced (`recovering`, `stale_epoch`, `unavailable`,
    /// `rejected`, `diverged`, `lease_lost`, `released`), and what happened.
    fence: Option<serde_json::Value>,
    /// The shard epoch this node's batches carry.
    epoch: u64,
    /// Sequence of the last event decided and applied (answers wait until
    /// it is durable).
    last_sequence: u64,
    /// Sequence of the last event the log acknowledged as durable.
    durable_sequence: u64,
    /// Events decided but not yet durable.
    lag_events: u64,
    /// Sequence of the newest snapshot this node wrote to the log.
    snapshot_sequence: u64,
    /// SHA-256 (hex) of the queue's canonical state encoding, as decided:
    /// two nodes (or one before a crash and after its rebuild) whose queues
    /// hold the same state show the same digest.
    state_digest: String,
    /// Items waiting, leased and dead-lettered (what a replay rebuilds).
    pending: u64,
    /// Items leased.
    active: u64,
    /// Dead letters.
    dead_letters: u64,
    /// True while the queue is drained.
    draining: bool,
}

/// `/omnirelay/control/replication`: per namespace, the replicator, whether
/// the shard serves, its epoch, and how far the log has acknowledged it.
async fn replication(State(node): State<Arc<NodeInner>>) -> Response {
    let mut namespaces = BTreeMap::new();
    let (assigned, following) =
        node.assigned.borrow().as_ref().map(|view| (view.mine.clone(), view.following.clone())).unwrap_or_default();
    for (shard, hosted) in &node.queues {
        let stats = hosted.queue.stats_now();
        let replication = hosted.queue.replication();
        let status = match (&replication.fence, assigned.contains(shard)) {
            (None, _) => "serving",
            (Some(_), true) => "fenced",
            (Some(_), false) => "standby",
        };
        namespaces.insert(
            shard.to_string(),
            NamespaceReplication {
                replicator: node.replicator_kind.clone(),
                status,
                fence: replication
                    .fence
                    .as_ref()
                    .map(|fence| serde_json::json!({ "reason": fence.reason.as_str(), "detail": fence.detail })),
                epoch: replication.epoch.get(),
                last_sequence: replication.decided.get(),
                durable_sequence: replication.durable.get(),
                lag_events: replication.decided.get().saturating_sub(replication.durable.get()),
                snapshot_sequence: replication.snapshot.get(),
                state_digest: hosted.queue.inspect(state_digest).await,
                pending: stats.pending,
                active: stats.active,
                dead_letters: stats.dead_letters,
                draining: stats.draining,
            },
        );
    }
    Json(serde_json::json!({
        "node_id": node.node_id.to_string(),
        "assigned": assigned.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "following": following.iter().map(|(shard, sequence)| (shard.to_string(), *sequence)).collect::<BTreeMap<_, _>>(),
        "namespaces": namespaces,
    }))
    .into_response()
}

fn state_digest(state: &crate::queue::QueueState) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &state.encode());
    digest.as_ref().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `/healthz`: the process runs and answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// `/readyz`: 200 while every namespace assigned to this node serves (all
/// hosted ones unless the mesh spreads them); 503 before the node knows its
/// share, naming the assigned namespaces that do not serve (not yet rebuilt
/// from the log, or fenced), and once the node is stopping, so load
/// balancers stop sending calls before connections close.
async fn readyz(State(node): State<Arc<NodeInner>>) -> Response {
    if node.stopping.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response();
    }
    let Some(assigned) = node.assigned.borrow().as_ref().map(|view| view.mine.clone()) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "joining the mesh\n").into_response();
    };
    let mut fenced: Vec<String> = node
        .queues
        .iter()
        .filter(|(shard, _)| assigned.contains(*shard))
        .filter_map(|(shard, hosted)| {
            hosted.queue.replication().fence.map(|fence| format!("{shard} ({})", fence.reason.as_str()))
        })
        .collect();
    if fenced.is_empty() {
        return "ready\n".into_response();
    }
    fenced.sort();
    (StatusCode::SERVICE_UNAVAILABLE, format!("not serving: {}\n", fenced.join(", "))).into_response()
}

/// `/metrics`: the Prometheus text format. Peer states are evaluated lazily,
/// so the tracker is refreshed first and its gauges are current; each
/// queue's backpressure state and high watermark are sampled likewise.
async fn metrics(State(node): State<Arc<NodeInner>>) -> Response {
    let Some(prometheus) = &node.prometheus else {
        return (StatusCode::NOT_FOUND, "metrics are not configured on this node\n").into_response();
    };
    let _ = node.tracker.snapshot();
    for hosted in node.queues.values() {
        crate::metrics::record_backpressure(&hosted.queue.stats_now().backpressure);
    }
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus.render()).into_response()
}
