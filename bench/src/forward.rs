//! The `forward` scenario: the enqueue -> lease -> complete cycle as three
//! unary gRPC calls, sent to the namespace's owner directly and sent to
//! another node of the mesh that forwards them to the owner (`--forward`),
//! measured in the same run at 1, 8 and 64 workers, with the CPU each node's
//! thread spends per cycle. Two nodes share one in-memory replicator (the
//! membership and shard leases live on it, as on a hub), each on its own
//! current-thread runtime. See `bench/README.md`.

use std::sync::Arc;
use std::time::Duration;

use omnirelay_client::middleware::{AuthorizationTable, MiddlewareConfig, PrincipalConfig, TrustedProxies};
use omnirelay_client::node::membership::rendezvous_owner;
use omnirelay_client::node::{Assignment, ForwardingConfig, Node, NodeConfig};
use omnirelay_client::proto::resourcelease::v1 as pb;
use omnirelay_client::{InMemoryReplicator, QueueConfig};
use tonic::transport::Channel;

use crate::node::{CpuClock, GrpcWorker, Measured, NAMESPACE, clients, current_thread, measure, thread_id};

/// Worker counts of the scenario.
const WORKERS: [usize; 3] = [1, 8, 64];

/// Events the shared in-memory replicator keeps per shard.
const RETAINED_EVENTS: usize = 4096;

/// How long the mesh may take to assign the namespace before the scenario
/// gives up: a few membership polls.
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);

/// The owner's id: the first of a few names that rendezvous hashing gives
/// [`NAMESPACE`] over the front node.
fn owner_id() -> String {
    (0..)
        .map(|n| format!("owner-{n}"))
        .find(|owner| rendezvous_owner(NAMESPACE, [owner.as_str(), "front"]) == Some(owner.as_str()))
        .expect("some name wins the namespace")
}

fn node(id: &str, advertise: &str, replicator: Arc<InMemoryReplicator>, forward: bool) -> Node {
    let mut queue = QueueConfig::new(NAMESPACE, id);
    // The benchmark measures the cycle, not backpressure.
    queue.capacity = 1_000_000;
    queue.high_watermark = 900_000;
    queue.low_watermark = 800_000;
    let mut config = NodeConfig::new(id);
    config.queues.push(queue);
    config.ownership.assignment = Assignment::Rendezvous;
    config.advertise = Some(advertise.to_string());
    // Callers (and the forwarding node, on loopback) are identified by the
    // trusted-proxy header, as in the `node` scenario.
    config.middleware = MiddlewareConfig {
        principal: PrincipalConfig::new()
            .trusted_proxies(TrustedProxies::parse(&["127.0.0.1"]).expect("a valid address")),
        authorization: AuthorizationTable::from_json(
            r#"{"rules": [{"principals": ["bench"], "procedures": ["enqueue", "lease", "complete", "stats"], "shards": ["resourcelease.bench"]}]}"#,
        )
        .expect("a valid table"),
        ..MiddlewareConfig::default()
    };
    if forward {
        config.forwarding = Some(ForwardingConfig::default());
    }
    Node::builder(config).replicator(replicator, "in-memory").build().expect("a valid node")
}

/// Starts a node on its own thread; its address and thread id, and what
/// stops it.
fn start(
    id: String,
    replicator: Arc<InMemoryReplicator>,
    forward: bool,
) -> (std::net::SocketAddr, Option<String>, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(id.clone())
        .spawn(move || {
            current_thread().block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
                let addr = listener.local_addr().expect("an address");
                let node = node(&id, &format!("http://{addr}"), replicator, forward);
                addr_tx.send((addr, thread_id())).expect("the bench waits for the address");
                let served = node.serve(listener, async {
                    let _ = stopped.await;
                });
                if let Err(err) = served.await {
                    eprintln!("{id} failed: {err}");
                }
                node.shutdown().await;
            });
        })
        .expect("the node thread starts");
    let (addr, tid) = addr_rx.recv().expect("the node starts");
    (addr, tid, stop, thread)
}

/// Waits until a stats call through `front` is answered (forwarded to the
/// owner, which serves).
async fn converged(front: std::net::SocketAddr) {
    let channel = Channel::from_shared(format!("http://{front}")).expect("a valid URI").connect_lazy();
    let mut client = pb::resource_lease_client::ResourceLeaseClient::new(channel);
    let until = tokio::time::Instant::now() + CONVERGE_WITHIN;
    loop {
        let mut request = tonic::Request::new(pb::StatsRequest { namespace: NAMESPACE.into() });
        request.metadata_mut().insert("x-client-principal", tonic::metadata::MetadataValue::from_static("bench"));
        match client.stats(request).await {
            Ok(_) => return,
            Err(status) if tokio::time::Instant::now() >= until => {
                panic!("the mesh did not serve {NAMESPACE} through the front node within {CONVERGE_WITHIN:?}: {status}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub(crate) fn run(seconds: u64) {
    let duration = Duration::from_secs(seconds);
    let replicator = Arc::new(InMemoryReplicator::with_retention(RETAINED_EVENTS));
    let (owner, owner_tid, stop_owner, owner_thread) = start(owner_id(), Arc::clone(&replicator), false);
    let (front, front_tid, stop_front, front_thread) = start("front".into(), replicator, true);
    clients().block_on(async {
        converged(front).await;
        // `node` is the owner's thread, `canned` the front node's.
        let cpu = CpuClock { node_tid: owner_tid, canned_tid: front_tid, redis_pid: None };
        eprintln!("enqueue -> lease -> complete as unary gRPC, {} s per row", seconds);
        eprintln!(
            "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10}",
            "route", "workers", "cycles/s", "p50", "p99", "vs direct", "owner CPU", "front CPU", "client CPU"
        );
        for workers in WORKERS {
            let row = |name: &str, m: &Measured, direct: f64| {
                let us = |d: Duration| format!("{:.1}us", d.as_secs_f64() * 1e6);
                let (owner_cpu, front_cpu, client_cpu) = m.cpu.map_or(("?".into(), "?".into(), "?".into()), |cpu| {
                    (us(cpu.node), us(cpu.canned), us(cpu.clients))
                });
                eprintln!(
                    "{name:<28} {workers:>7} {:>9.0} {:>7.0}us {:>7.0}us {:>8.2}x {owner_cpu:>10} {front_cpu:>10} {client_cpu:>10}",
                    m.rate,
                    m.p50.as_secs_f64() * 1e6,
                    m.p99.as_secs_f64() * 1e6,
                    m.rate / direct,
                );
            };
            let direct = measure(workers, duration, &cpu, |n| GrpcWorker::connect(owner, n)).await;
            row("direct to the owner", &direct, direct.rate);
            let forwarded = measure(workers, duration, &cpu, |n| GrpcWorker::connect(front, n)).await;
            row("through a forwarding node", &forwarded, direct.rate);
        }
    });
    let _ = stop_front.send(());
    front_thread.join().expect("the front node's thread ends");
    let _ = stop_owner.send(());
    owner_thread.join().expect("the owner's thread ends");
}
