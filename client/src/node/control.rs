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

use super::defaults::SSE_KEEP_ALIVE;
use super::json;
use super::state::NodeInner;
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
/// Path of one queue's items: `?namespace=...&limit=...` (see
/// [`queue_view`]).
pub const QUEUE_PATH: &str = "/omnirelay/control/queue";

/// Most items of each kind (pending, leased, dead-lettered) one answer of
/// [`QUEUE_PATH`] lists: an operator's view, bounded so that a deep queue
/// costs the node one bounded response, not its whole state in JSON.
pub const MAX_QUEUE_VIEW_ITEMS: usize = 1_000;

pub(crate) fn router(node: Arc<NodeInner>) -> Router {
    Router::new()
        .route(LEASE_HEALTH_PATH, get(lease_health))
        .route(BACKPRESSURE_PATH, get(backpressure))
        .route(BACKPRESSURE_STREAM_PATH, get(backpressure_stream))
        .route(REPLICATION_PATH, get(replication))
        .route(QUEUE_PATH, get(queue))
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

/// Query of [`QUEUE_PATH`].
#[derive(Debug, Deserialize)]
struct QueueQuery {
    namespace: String,
    limit: Option<usize>,
}

/// `/omnirelay/control/queue?namespace=...`: the queue's counts and its
/// first items of each kind ([`queue_view`]), as this node holds them.
async fn queue(State(node): State<Arc<NodeInner>>, Query(query): Query<QueueQuery>) -> Response {
    let Some(hosted) = node.queues.get(&ShardId::new(query.namespace.as_str())) else {
        let message = format!("namespace {} is not hosted by this node", query.namespace);
        return crate::middleware::http_error_response(crate::ErrorCode::NotFound, &message, None).into_response();
    };
    let limit = query.limit.unwrap_or(MAX_QUEUE_VIEW_ITEMS).min(MAX_QUEUE_VIEW_ITEMS);
    let mut body = hosted.queue.inspect(|state| queue_view(state, limit)).await;
    body["node_id"] = serde_json::Value::String(node.node_id.to_string());
    body["status"] =
        serde_json::Value::from(if hosted.queue.replication().fence.is_none() { "serving" } else { "fenced" });
    Json(body).into_response()
}

/// A queue state as operators read it: the counts, then the first `limit`
/// pending items (queue order), leased items (with their lease: owner,
/// fencing token, expiry) and dead letters (oldest first, with their
/// attempt history), each in the HTTP/JSON form of `WorkItem` and
/// `DeadLetter` without the payload's body and attributes (the producer's
/// data stays out of diagnostics). The node's [`QUEUE_PATH`] and the
/// CLI's `inspect` (a state replayed from the log) print the same form.
pub fn queue_view(state: &crate::queue::QueueState, limit: usize) -> serde_json::Value {
    use omnirelay_proto::resourcelease::v1 as pb;
    let strip = |mut item: pb::WorkItem| {
        if let Some(payload) = item.payload.as_mut() {
            payload.body = Default::default();
            payload.attributes.clear();
        }
        item
    };
    let pending: Vec<pb::WorkItem> =
        state.pending_items().into_iter().take(limit).map(|item| strip(wire::work_item(item))).collect();
    let leased: Vec<pb::WorkItem> =
        state.leased_items().into_iter().take(limit).map(|item| strip(wire::work_item(item))).collect();
    let dead: Vec<pb::DeadLetter> = state
        .dead_letter_items(limit)
        .into_iter()
        .map(|letter| {
            let mut letter = wire::dead_letter(letter);
            letter.item = letter.item.map(strip);
            letter
        })
        .collect();
    let items = serde_json::from_slice::<serde_json::Value>(&json::encode(&pb::DrainResponse {
        snapshot: Some(pb::DrainSnapshot { items: pending, in_flight: leased, ..Default::default() }),
    }))
    .unwrap_or_default();
    let dead = serde_json::from_slice::<serde_json::Value>(&json::encode(&pb::ListDeadLettersResponse {
        dead_letters: dead,
        next_page_token: String::new(),
    }))
    .unwrap_or_default();
    serde_json::json!({
        "namespace": state.shard().as_str(),
        "last_sequence": state.last_sequence().get(),
        "pending": state.pending(),
        "active": state.active(),
        "dead_letters": state.dead_letters(),
        "draining": state.draining().is_some(),
        "limit": limit,
        "pending_items": items["snapshot"]["items"],
        "leased_items": items["snapshot"]["in_flight"],
        "dead_letter_items": dead["dead_letters"],
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
    // The node's view of the mesh: who it thinks owns each namespace it
    // hosts (itself for its own), from the members of its latest poll.
    let (assigned, following, members, owners) = node
        .assigned
        .borrow()
        .as_ref()
        .map(|view| {
            let owners: BTreeMap<String, String> = node
                .queues
                .keys()
                .filter_map(|shard| {
                    let owner = match view.elsewhere(shard) {
                        Some((owner, _)) => owner.to_string(),
                        None if view.mine.contains(shard) => node.node_id.to_string(),
                        None => return None,
                    };
                    Some((shard.to_string(), owner))
                })
                .collect();
            (view.mine.clone(), view.following.clone(), view.members.clone(), owners)
        })
        .unwrap_or_default();
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
        "members": members,
        "owners": owners,
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
