//! `failover [rounds]`: how long a mesh takes to serve a dead node's
//! namespaces again, and a leaving node's.
//!
//! An in-process hub on the harness's durable PostgreSQL and two nodes with
//! rendezvous assignment, each on its own tokio runtime. A round fills the
//! victim's namespaces (about 3,000 events each past their last snapshot, so
//! the new owner replays a tail), then crashes it by shutting its runtime
//! down without a word to the hub (its tasks, streams and leases vanish as
//! with SIGKILL; nothing is released), and the survivor is watched every
//! millisecond:
//!
//! - **detection**: the survivor's assignment includes the victim's
//!   namespaces (the victim's member lease lapsed and a poll saw it);
//! - **acquisition**: the survivor holds every such shard's lease (the
//!   hub's `ListShardLeases`);
//! - **replay**: every such namespace serves (rebuilt from the log);
//! - **first answer**: a lease call on each returns an item.
//!
//! Each is measured from the crash. Then a graceful handover: a new victim
//! joins, takes its share, and shuts down (leaves the membership, settles,
//! snapshots, releases); measured from the call to the first answers at the
//! survivor.

// The table is the benchmark's output.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use omnirelay_client::ShardId;
use omnirelay_client::node::membership::rendezvous_owner;
use omnirelay_client::node::{Assignment, Node, NodeConfig};
use omnirelay_client::queue::{Caller, EnqueueRequest, LeaseRequest, Payload, QueueConfig};
use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig, Replicator};
use omnirelay_hub::{Config, Hub};
use omnirelay_tests::{PgCluster, PgOptions};

/// Items enqueued per namespace before a crash: three events each (the
/// enqueue; the lease and completion of a third of them), about 3,000
/// events of tail to replay.
const FILL: usize = 1_000;

/// Longest a round may take before the benchmark gives up (a hang guard).
const ROUND_GUARD: Duration = Duration::from_secs(120);

/// Namespaces each node should own.
const PER_NODE: usize = 2;

const SURVIVOR: &str = "survivor";
const VICTIM: &str = "victim";

fn runtime(name: &'static str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("a runtime should build")
}

/// Namespaces such that rendezvous gives each node `PER_NODE` of them.
fn namespaces() -> Vec<String> {
    let (mut survivor, mut victim) = (Vec::new(), Vec::new());
    for n in 0.. {
        let ns = format!("resourcelease.failover.n{n}");
        match rendezvous_owner(&ns, [SURVIVOR, VICTIM]) {
            Some(SURVIVOR) if survivor.len() < PER_NODE => survivor.push(ns),
            Some(VICTIM) if victim.len() < PER_NODE => victim.push(ns),
            _ => {}
        }
        if survivor.len() == PER_NODE && victim.len() == PER_NODE {
            break;
        }
    }
    survivor.into_iter().chain(victim).collect()
}

fn node(id: &str, hub: std::net::SocketAddr, ttl: Duration, namespaces: &[String]) -> anyhow::Result<Node> {
    let mut config = NodeConfig::new(id);
    config.queues = namespaces.iter().map(|ns| QueueConfig::new(ns.as_str(), id)).collect();
    config.ownership.assignment = Assignment::Rendezvous;
    config.ownership.lease_ttl = ttl;
    config.ownership.renew_every = ttl / 3;
    let replicator = HubReplicator::new(HubReplicatorConfig::new([HubEndpoint::new(format!("http://{hub}"))]))?;
    Ok(Node::builder(config).replicator(Arc::new(replicator), "hub").build()?)
}

struct Split {
    detection: Duration,
    acquisition: Duration,
    replay: Duration,
    first_answer: Duration,
}

/// Watches `survivor` take `moved` over, from `since`.
async fn watch(
    survivor: &Node,
    hub: &HubReplicator,
    moved: &[String],
    since: Instant,
    detect: bool,
) -> anyhow::Result<Split> {
    let worker = Caller::new("bench", "bench-worker");
    let (mut detection, mut acquisition, mut replay) = (None, None, None);
    let deadline = since + ROUND_GUARD;
    loop {
        anyhow::ensure!(Instant::now() < deadline, "no takeover within {ROUND_GUARD:?}");
        let assigned = survivor.assigned();
        if detection.is_none() && (!detect || moved.iter().all(|ns| assigned.contains(&ShardId::new(ns.as_str())))) {
            detection = Some(since.elapsed());
        }
        if detection.is_some() && acquisition.is_none() {
            let held = hub.held_leases("resourcelease.failover.").await?;
            if moved.iter().all(|ns| held.iter().any(|lease| lease.shard.as_str() == ns && lease.owner == SURVIVOR)) {
                acquisition = Some(since.elapsed());
            }
        }
        if acquisition.is_some()
            && moved.iter().all(|ns| {
                survivor.queue(&ShardId::new(ns.as_str())).is_some_and(|queue| queue.replication().fence.is_none())
            })
        {
            replay = Some(since.elapsed());
        }
        if let (Some(detection), Some(acquisition), Some(replay)) = (detection, acquisition, replay) {
            for ns in moved {
                let queue = survivor.queue(&ShardId::new(ns.as_str())).context("hosted")?;
                queue.lease(&worker, LeaseRequest::new("bench-worker")).await?.context("an item to lease")?;
            }
            return Ok(Split { detection, acquisition, replay, first_answer: since.elapsed() });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn fill(node: &Node, namespaces: &[String]) -> anyhow::Result<()> {
    let producer = Caller::new("bench", "bench-producer");
    for ns in namespaces {
        let queue = node.queue(&ShardId::new(ns.as_str())).context("hosted")?;
        for n in 0..FILL {
            queue.enqueue(&producer, EnqueueRequest::new(Payload::new("job", format!("{n}"), "body"))).await?;
        }
        for _ in 0..FILL / 3 {
            let leased = queue.lease(&producer, LeaseRequest::new("bench-filler")).await?.context("an item")?;
            queue.complete(&producer, &leased.handle).await?;
        }
    }
    Ok(())
}

fn print(kind: &str, ttl: Duration, round: usize, split: &Split) {
    println!(
        "| {kind} | {} ms | {round} | {:.0} | {:.0} | {:.0} | {:.0} |",
        ttl.as_millis(),
        split.detection.as_secs_f64() * 1e3,
        split.acquisition.as_secs_f64() * 1e3,
        split.replay.as_secs_f64() * 1e3,
        split.first_answer.as_secs_f64() * 1e3,
    );
}

pub(crate) fn run(rounds: usize) {
    if let Err(error) = scenario(rounds) {
        eprintln!("benchmark failed: {error:#}");
        std::process::exit(1);
    }
}

fn scenario(rounds: usize) -> anyhow::Result<()> {
    eprintln!("starting a durable PostgreSQL cluster (fsync on)");
    let cluster = PgCluster::start(PgOptions { durable: true, max_connections: 100 })?;
    let url = cluster.url("postgres");
    let hubs = runtime("hub");
    let survivors = runtime("survivor");
    let hub_address = hubs.block_on(async {
        omnirelay_hub::store::postgres::migrate(&url).await.context("migrate")?;
        let hub = Hub::open(Config { retention_interval: None, ..Config::for_postgres(&url)? }).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(hub.serve(listener, std::future::pending::<()>()));
        anyhow::Ok(address)
    })?;
    let namespaces = namespaces();
    let moved: Vec<String> =
        namespaces.iter().filter(|ns| rendezvous_owner(ns, [SURVIVOR, VICTIM]) == Some(VICTIM)).cloned().collect();
    println!("| handover | lease TTL | round | detection ms | acquisition ms | replay ms | first answer ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for ttl in [omnirelay_client::defaults::SHARD_LEASE_TTL, Duration::from_secs(2)] {
        let (survivor, observer) = survivors.block_on(async {
            let survivor = node(SURVIVOR, hub_address, ttl, &namespaces)?;
            let observer =
                HubReplicator::new(HubReplicatorConfig::new([HubEndpoint::new(format!("http://{hub_address}"))]))?;
            anyhow::Ok((survivor, observer))
        })?;
        for round in 1..=rounds {
            // A victim joins, takes its share, is filled, and crashes.
            let victims = runtime("victim");
            let victim = victims.block_on(join_and_fill(&survivor, hub_address, ttl, &namespaces, &moved))?;
            let crashed = Instant::now();
            victims.shutdown_background();
            drop(victim);
            let split = survivors.block_on(watch(&survivor, &observer, &moved, crashed, true))?;
            print("SIGKILL-like crash", ttl, round, &split);

            // Graceful: a victim joins, takes its share, and leaves.
            let victims = runtime("victim");
            let leaving = victims.block_on(join_and_fill(&survivor, hub_address, ttl, &namespaces, &moved))?;
            let started = Instant::now();
            let leave = victims.spawn(async move { leaving.shutdown().await });
            let split = survivors.block_on(watch(&survivor, &observer, &moved, started, false))?;
            victims.block_on(leave)?;
            print("graceful shutdown", ttl, round, &split);
            victims.shutdown_background();
        }
        survivors.block_on(survivor.shutdown());
    }
    Ok(())
}

/// Starts the victim, waits until it took its share from the survivor and
/// serves it, and fills its namespaces.
async fn join_and_fill(
    survivor: &Node,
    hub: std::net::SocketAddr,
    ttl: Duration,
    namespaces: &[String],
    moved: &[String],
) -> anyhow::Result<Node> {
    let victim = node(VICTIM, hub, ttl, namespaces)?;
    let joined = Instant::now();
    while !(victim.assigned().len() == PER_NODE && survivor_serves_only_its_own(survivor, moved)) {
        anyhow::ensure!(joined.elapsed() < ROUND_GUARD, "the victim never took its share");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::timeout(ROUND_GUARD, victim.serving()).await.context("the victim serves")?;
    fill(&victim, moved).await?;
    Ok(victim)
}

/// True once the survivor no longer serves the namespaces it handed over.
fn survivor_serves_only_its_own(survivor: &Node, moved: &[String]) -> bool {
    moved
        .iter()
        .all(|ns| survivor.queue(&ShardId::new(ns.as_str())).is_some_and(|queue| queue.replication().fence.is_some()))
}
