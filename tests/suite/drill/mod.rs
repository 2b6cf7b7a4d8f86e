//! The failure drill: real processes (a private PostgreSQL cluster, two hub
//! replicas, three `omnirelay node` sidecars reaching the hubs through a
//! [`FaultProxy`] each), producers and workers recording every call, and
//! faults injected one after the other under load:
//!
//! 1. SIGKILL of the busiest shard owner (then it comes back);
//! 2. SIGKILL of the hub replica every node uses first (then it comes back
//!    on its port);
//! 3. a PostgreSQL restart;
//! 4. SIGSTOP of the busiest owner for longer than the lease TTL, until the
//!    others took its namespaces over, then SIGCONT;
//! 5. a partition of the busiest owner from both hubs (its proxies stall)
//!    for longer than the TTL while its workers still reach it; it must
//!    stop serving before the others take over, then heals.
//!
//! The nodes forward calls for namespaces they do not own (`--forward`), so
//! a worker bound to one node is served by every owner through it.
//!
//! The [checker] then reads the recorded history and the hub's log. The
//! same drill with fencing switched off (the hidden, test-only
//! `--unsafe-disable-fencing`) must make the checker fail: that proves it
//! can see what it claims to check.

mod checker;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use checker::{Answer, Call, Logged, Outcome, Record, Report, ShardLog};
use omnirelay_client::Sequence;
use omnirelay_client::ShardId;
use omnirelay_client::mesh::{MeshClientConfig, ResourceLeaseClient};
use omnirelay_client::queue::EventKind;
use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig, Replicator};
use omnirelay_proto::resourcelease::v1 as pb;
use omnirelay_tests::sidecar::Sidecar;
use omnirelay_tests::{Fault, FaultProxy, PgCluster, PgOptions, WorkspaceBinaries, free_port};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::durable::{HANG_GUARD, Hub};
use crate::http::http_get;
use crate::mesh::{TTL_MS, converged_on, mesh_node, statuses};

const NAMESPACES: [&str; 6] = [
    "resourcelease.drill.a",
    "resourcelease.drill.b",
    "resourcelease.drill.c",
    "resourcelease.drill.d",
    "resourcelease.drill.e",
    "resourcelease.drill.f",
];

const NODE_IDS: [&str; 3] = ["node-1", "node-2", "node-3"];

/// Deadline of a worker's direct call to its node: above a healthy debug
/// build's answer, short enough that a stopped node is given up on soon.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Deadline of a routed call (redirects and retries included): above a
/// failover with the drill's short TTL.
const ROUTED_DEADLINE: Duration = Duration::from_secs(6);

/// How long a worker's lease lasts: a few calls' worth, so leases held by a
/// node that dies are still valid when its successor serves them.
const LEASE_DURATION: Duration = Duration::from_secs(3);

/// Pause between a caller's calls: keeps five callers from saturating a
/// two-core machine running debug builds, so faults, not load, drive the
/// drill.
const PACE: Duration = Duration::from_millis(15);

/// How long load runs between faults.
const BETWEEN_FAULTS: Duration = Duration::from_secs(3);

/// A node of the drill with its proxies, one per hub replica.
struct DrillNode {
    node: Sidecar,
    proxies: Vec<FaultProxy>,
}

impl DrillNode {
    async fn spawn(
        binary: &Path,
        dir: &Path,
        id: &str,
        hubs: &[std::net::SocketAddr],
        ports: (u16, u16),
        extra: &[&str],
    ) -> DrillNode {
        let mut proxies = Vec::new();
        for hub in hubs {
            proxies.push(FaultProxy::start(*hub).await.expect("start a fault proxy"));
        }
        let urls: Vec<String> = proxies.iter().map(|proxy| format!("http://{}", proxy.addr())).collect();
        let node = mesh_node(binary, dir, id, &urls.join(","), &NAMESPACES).ports(ports.0, ports.1).args(extra).spawn();
        DrillNode { node, proxies }
    }

    fn partition(&self, fault: Fault) {
        for proxy in &self.proxies {
            proxy.set(fault);
        }
    }
}

/// Everything the callers were told.
type History = Arc<Mutex<Vec<Record>>>;

fn push(history: &History, record: Record) {
    history.lock().expect("history lock").push(record);
}

fn principal<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-client-principal", "ops".parse().expect("ASCII"));
    request.set_timeout(timeout);
    request
}

/// What a caller may conclude from a refusal: a redirect or a refusal
/// before any work is certainly not done; a lost answer may be.
fn outcome_of(status: &tonic::Status) -> Outcome {
    use tonic::Code;
    let owner_named = status.metadata().get("omnirelay-owner").is_some();
    match status.code() {
        Code::Unavailable if owner_named => Outcome::Fail(format!("redirect: {}", status.message())),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Internal => {
            Outcome::Unknown(format!("{:?}: {}", status.code(), status.message()))
        }
        code => Outcome::Fail(format!("{code:?}: {}", status.message())),
    }
}

fn system_time(timestamp: Option<&prost_types::Timestamp>) -> SystemTime {
    let timestamp = timestamp.expect("a lease names its expiry");
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(timestamp.seconds).expect("after 1970"))
        + Duration::from_nanos(u64::try_from(timestamp.nanos).expect("non-negative"))
}

fn leased(response: pb::LeaseResponse) -> (Answer, Option<pb::OwnershipHandle>) {
    match response.item.and_then(|item| item.lease) {
        None => (Answer::Empty, None),
        Some(handle) => (
            Answer::Leased {
                item: handle.item_id.clone(),
                token: handle.fencing_token,
                expires_at: system_time(handle.expires_at.as_ref()),
            },
            Some(handle),
        ),
    }
}

/// How a worker reaches the mesh.
enum Route {
    /// Always the same node, which forwards to the owner; a redirect (an
    /// owner being replaced) is recorded and the next namespace is tried.
    Bound(pb::resource_lease_client::ResourceLeaseClient<Channel>),
    /// The routing client, which follows redirects.
    Routed(Arc<ResourceLeaseClient>),
}

impl Route {
    async fn lease(&mut self, request: pb::LeaseRequest) -> Result<pb::LeaseResponse, tonic::Status> {
        match self {
            Route::Bound(client) => {
                client.lease(principal(request, CALL_TIMEOUT)).await.map(tonic::Response::into_inner)
            }
            Route::Routed(mesh) => mesh.lease(request).await,
        }
    }

    async fn complete(&mut self, request: pb::CompleteRequest) -> Result<pb::CompleteResponse, tonic::Status> {
        match self {
            Route::Bound(client) => {
                client.complete(principal(request, CALL_TIMEOUT)).await.map(tonic::Response::into_inner)
            }
            Route::Routed(mesh) => mesh.complete(request).await,
        }
    }
}

/// A worker: leases round the namespaces, works a moment, completes, and
/// records every call as `via`.
async fn worker(via: String, mut route: Route, worker: String, history: History, stop: CancellationToken) {
    while !stop.is_cancelled() {
        for namespace in NAMESPACES {
            let invoked = SystemTime::now();
            let request = pb::LeaseRequest {
                namespace: namespace.into(),
                owner: worker.clone(),
                lease_duration: Some(LEASE_DURATION.try_into().expect("a small duration")),
                ..Default::default()
            };
            let (outcome, handle) = match route.lease(request).await {
                Ok(response) => {
                    let (answer, handle) = leased(response);
                    (Outcome::Ok(answer), handle)
                }
                Err(status) => (outcome_of(&status), None),
            };
            let call = Call::Lease { worker: worker.clone() };
            let answered = SystemTime::now();
            push(&history, Record { via: via.clone(), namespace: namespace.into(), call, outcome, invoked, answered });
            if let Some(handle) = handle {
                tokio::time::sleep(PACE).await;
                let call = Call::Complete { item: handle.item_id.clone(), token: handle.fencing_token };
                let invoked = SystemTime::now();
                let request = pb::CompleteRequest { namespace: namespace.into(), handle: Some(handle) };
                let outcome = match route.complete(request).await {
                    Ok(_) => Outcome::Ok(Answer::Completed),
                    Err(status) => outcome_of(&status),
                };
                let answered = SystemTime::now();
                push(
                    &history,
                    Record { via: via.clone(), namespace: namespace.into(), call, outcome, invoked, answered },
                );
            }
            tokio::time::sleep(PACE).await;
            if stop.is_cancelled() {
                return;
            }
        }
    }
}

/// A producer through the routing client: enqueues with fresh request ids
/// round the namespaces.
async fn producer(name: String, mesh: Arc<ResourceLeaseClient>, history: History, stop: CancellationToken) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let namespace = NAMESPACES[(n % NAMESPACES.len() as u64) as usize];
        let request_id = format!("{name}-{n}");
        n += 1;
        let invoked = SystemTime::now();
        let request = pb::EnqueueRequest {
            namespace: namespace.into(),
            payload: Some(crate::durable::payload(&request_id)),
            ..Default::default()
        };
        let outcome = match mesh.enqueue(request).await {
            Ok(response) => Outcome::Ok(Answer::Enqueued { item: response.item_id }),
            Err(status) => outcome_of(&status),
        };
        let answered = SystemTime::now();
        let call = Call::Enqueue { request_id };
        push(&history, Record { via: "mesh".into(), namespace: namespace.into(), call, outcome, invoked, answered });
        tokio::time::sleep(PACE).await;
    }
}

/// Sum of a metric's samples whose labels contain every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Stale writes refused, as the processes count them: the hubs' stale-epoch
/// refusals and the nodes' fences for a lost lease or a stale epoch.
async fn stale_refusals(hubs: &[&Hub], nodes: &[&DrillNode]) -> u64 {
    let mut total = 0.0;
    for hub in hubs {
        if let Ok((200, text)) = http_get(hub.admin, "/metrics").await {
            total += metric_sum(&text, "omnirelay_hub_append_batches_total", &["outcome=\"stale_epoch\""]);
        }
    }
    for node in nodes {
        if let Ok((200, text)) = http_get(node.node.control, "/metrics").await {
            for reason in ["reason=\"stale_epoch\"", "reason=\"lease_lost\""] {
                total += metric_sum(&text, "omnirelay_resourcelease_replication_fenced_total", &[reason]);
            }
        }
    }
    total as u64
}

/// Every namespace's log from `hub`, chain links checked by the reader.
async fn read_logs(hub: &Hub) -> BTreeMap<String, ShardLog> {
    let config = HubReplicatorConfig::new([HubEndpoint::new(format!("http://{}", hub.grpc))]);
    let log = HubReplicator::new(config).expect("a hub reader");
    let mut logs = BTreeMap::new();
    for namespace in NAMESPACES {
        let shard = ShardId::new(namespace);
        let mut read = ShardLog::default();
        let mut after = Sequence::ZERO;
        loop {
            let page = match tokio::time::timeout(HANG_GUARD, log.read_log(&shard, after, 1_000)).await {
                Ok(Ok(page)) => page,
                Ok(Err(error)) => {
                    read.error = Some(error.to_string());
                    break;
                }
                Err(_) => panic!("reading {namespace}'s log took over {HANG_GUARD:?}"),
            };
            (read.low, read.head) = (page.low.get().max(1), page.head.get());
            let Some(last) = page.events.last().map(|event| event.event.sequence) else { break };
            for logged in page.events {
                let sequence = logged.event.sequence.get();
                let event = match logged.event.event.kind {
                    EventKind::Enqueued(item) => {
                        Logged::Enqueued { item: item.id.to_string(), request_id: item.payload.request_id.clone() }
                    }
                    EventKind::Leased { item_id, .. } => Logged::Leased { item: item_id.to_string() },
                    EventKind::Completed { item_id, fencing_token } => {
                        Logged::Completed { item: item_id.to_string(), token: fencing_token.get() }
                    }
                    _ => Logged::Other,
                };
                read.events.push((sequence, event));
            }
            if last.get() >= page.head.get() {
                break;
            }
            after = last;
        }
        logs.insert(namespace.to_string(), read);
    }
    logs
}

/// The node owning the most namespaces in `owners`.
fn busiest(owners: &BTreeMap<String, String>) -> String {
    NODE_IDS
        .into_iter()
        .max_by_key(|id| owners.values().filter(|owner| owner.as_str() == *id).count())
        .expect("three nodes")
        .to_string()
}

fn position(nodes: &[DrillNode], id: &str) -> usize {
    nodes.iter().position(|node| node.node.id() == id).expect("a drill node")
}

async fn converged_all(nodes: &[DrillNode], except: Option<&str>) -> BTreeMap<String, String> {
    let listed: Vec<&Sidecar> =
        nodes.iter().filter(|node| Some(node.node.id()) != except).map(|node| &node.node).collect();
    converged_on(&listed, &NAMESPACES).await
}

/// Which faults a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drill {
    /// All five, with fencing on.
    Full,
    /// Only the paused owner, with fencing off.
    FencingOff,
}

/// Runs the drill; returns the checker's report.
async fn run(drill: Drill) -> Report {
    let started = Instant::now();
    let say = |what: &str| eprintln!("[{:>6.1} s] {what}", started.elapsed().as_secs_f64());
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| PgCluster::start(PgOptions { durable: true, ..Default::default() }))
            .await
            .expect("join")
            .expect("a private PostgreSQL cluster"),
    );
    let url = cluster.url("postgres");
    let dir = tempfile::tempdir().expect("temporary directory");
    // Retention off: the checker reads every event ever appended.
    let hub_flags = ["--retention-interval", "off"];
    let replicas = if drill == Drill::Full { 2 } else { 1 };
    let hub_ports: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
    let mut hubs = Vec::new();
    for port in &hub_ports {
        hubs.push(Some(Hub::start_with(&binaries.hub, &url, *port, &hub_flags).await));
    }
    let hub_addrs: Vec<_> = hubs.iter().flatten().map(|hub| hub.grpc).collect();
    // The nodes forward: a bound worker's call for a namespace its node does
    // not own is answered by the owner through its node (a partitioned
    // node forwards to whoever took its namespaces over).
    let extra: &[&str] =
        if drill == Drill::FencingOff { &["--forward", "--unsafe-disable-fencing"] } else { &["--forward"] };
    let mut nodes = Vec::new();
    for id in NODE_IDS {
        let ports = (free_port(), free_port());
        nodes.push(DrillNode::spawn(&binaries.omnirelay, dir.path(), id, &hub_addrs, ports, extra).await);
    }
    let mut owners = converged_all(&nodes, None).await;
    say(&format!("mesh up: {owners:?}"));

    // Load: two producers and a worker through the routing client, and a
    // worker bound to each node.
    let history: History = Arc::default();
    let stop = CancellationToken::new();
    let mesh = Arc::new(
        ResourceLeaseClient::new(MeshClientConfig {
            nodes: nodes.iter().map(|node| format!("http://{}", node.node.rpc)).collect(),
            metadata: vec![("x-client-principal".into(), "ops".into())],
            deadline: Some(ROUTED_DEADLINE),
            ..Default::default()
        })
        .expect("a routing client"),
    );
    let mut load = tokio::task::JoinSet::new();
    for name in ["producer-1", "producer-2"] {
        load.spawn(producer(name.into(), Arc::clone(&mesh), Arc::clone(&history), stop.clone()));
    }
    let routed = Route::Routed(Arc::clone(&mesh));
    load.spawn(worker("mesh".into(), routed, "worker-mesh".into(), Arc::clone(&history), stop.clone()));
    for node in &nodes {
        let name = format!("worker-{}", node.node.id());
        let channel = Channel::from_shared(format!("http://{}", node.node.rpc)).expect("URI").connect_lazy();
        let bound = Route::Bound(pb::resource_lease_client::ResourceLeaseClient::new(channel));
        load.spawn(worker(node.node.id().to_string(), bound, name, Arc::clone(&history), stop.clone()));
    }
    tokio::time::sleep(BETWEEN_FAULTS).await;
    let mut refused = 0;

    if drill == Drill::Full {
        // 1. SIGKILL of the busiest owner; it comes back on its ports.
        let victim = busiest(&owners);
        let index = position(&nodes, &victim);
        refused += stale_refusals(&[], &[&nodes[index]]).await;
        let killed = nodes.remove(index);
        let ports = (killed.node.rpc.port(), killed.node.control.port());
        killed.node.kill().await;
        say(&format!("1. killed {victim} (owner of {} namespaces)", owners.values().filter(|o| **o == victim).count()));
        converged_all(&nodes, None).await;
        say("   the survivors serve every namespace");
        nodes.insert(index, DrillNode::spawn(&binaries.omnirelay, dir.path(), &victim, &hub_addrs, ports, extra).await);
        owners = converged_all(&nodes, None).await;
        say(&format!("   {victim} is back: {owners:?}"));
        tokio::time::sleep(BETWEEN_FAULTS).await;

        // 2. SIGKILL of the first hub replica; it comes back on its port.
        let first = hubs[0].take().expect("running");
        refused += stale_refusals(&[&first], &[]).await;
        first.process.kill().await;
        say("2. killed hub replica 1");
        tokio::time::sleep(BETWEEN_FAULTS).await;
        hubs[0] = Some(Hub::start_with(&binaries.hub, &url, hub_ports[0], &hub_flags).await);
        converged_all(&nodes, None).await;
        say("   hub replica 1 is back");
        tokio::time::sleep(BETWEEN_FAULTS).await;

        // 3. PostgreSQL restarts.
        let restarting = Arc::clone(&cluster);
        tokio::task::spawn_blocking(move || {
            restarting.stop().expect("stop PostgreSQL");
            std::thread::sleep(Duration::from_secs(1));
            restarting.start_again().expect("start PostgreSQL again");
        })
        .await
        .expect("join");
        say("3. restarted PostgreSQL");
        owners = converged_all(&nodes, None).await;
        say("   the mesh serves again");
        tokio::time::sleep(BETWEEN_FAULTS).await;
    }

    // 4. SIGSTOP of the busiest owner past its TTL, then SIGCONT.
    let paused = busiest(&owners);
    let index = position(&nodes, &paused);
    nodes[index].node.signal("-STOP");
    say(&format!("4. paused {paused} (SIGSTOP)"));
    converged_all(&nodes, Some(&paused)).await;
    say("   the others took its namespaces over");
    tokio::time::sleep(Duration::from_millis(TTL_MS / 2)).await;
    nodes[index].node.signal("-CONT");
    say(&format!("   resumed {paused} (SIGCONT)"));
    if drill == Drill::FencingOff {
        // Without fencing the woken node goes on serving what it had; let
        // its workers call it for a while, then judge.
        tokio::time::sleep(BETWEEN_FAULTS * 2).await;
    } else {
        owners = converged_all(&nodes, None).await;
        say(&format!("   {paused} rejoined: {owners:?}"));
        tokio::time::sleep(BETWEEN_FAULTS).await;

        // 5. Partition of the busiest owner from both hubs.
        let cut = busiest(&owners);
        let index = position(&nodes, &cut);
        nodes[index].partition(Fault::Stall);
        say(&format!("5. partitioned {cut} from the hubs (its workers still reach it)"));
        converged_all(&nodes, Some(&cut)).await;
        let statuses = statuses(&nodes[index].node).await.expect("the partitioned node answers diagnostics");
        assert!(
            statuses.values().all(|status| status != "serving"),
            "{cut} still serves while cut off from the log: {statuses:?}"
        );
        say(&format!("   the others took over; {cut} serves nothing: {statuses:?}"));
        nodes[index].partition(Fault::None);
        owners = converged_all(&nodes, None).await;
        say(&format!("   healed: {owners:?}"));
        tokio::time::sleep(BETWEEN_FAULTS).await;
    }

    stop.cancel();
    while load.join_next().await.is_some() {}
    say("load stopped");
    let live: Vec<&Hub> = hubs.iter().flatten().collect();
    refused += stale_refusals(&live, &nodes.iter().collect::<Vec<_>>()).await;
    let logs = read_logs(live[0]).await;
    let history = history.lock().expect("history lock").clone();
    let report = checker::check(&history, &logs, refused);
    say(&format!("checked:\n{report}"));
    drop(nodes);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_loses_nothing_owns_nothing_twice_and_refuses_stale_owners() {
    let report = run(Drill::Full).await;
    assert!(report.passed(), "the failure drill failed:\n{report}");
    assert!(report.acknowledged > 100, "too little load to judge:\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fencing_off_the_checker_sees_the_damage() {
    let report = run(Drill::FencingOff).await;
    assert!(!report.passed(), "the checker passed a run without fencing:\n{report}");
    assert!(
        !report.stale_accepted.is_empty() || !report.lost.is_empty(),
        "a stale owner without fences did no visible harm:\n{report}"
    );
}
