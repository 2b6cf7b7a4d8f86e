//! `omnirelay demo`: the mesh working on a laptop, in one process.
//!
//! An embedded hub (SQLite, in a temporary directory), three nodes with
//! rendezvous assignment (each on its own runtime thread, so one can die
//! the way a killed process does: its tasks, connections and leases vanish
//! without a word), producers and workers calling through the routing
//! client. Midway the node that owns the most namespaces is killed. At the
//! end the workers drain every queue and the demo checks:
//!
//! 1. **no acknowledged enqueue lost**: every item a producer was told was
//!    enqueued was completed;
//! 2. **no item owned twice**: no item was completed by two different
//!    leases (a stale lease's completion is refused by its fencing token);
//! 3. **replay equals the survivors**: each namespace rebuilt from the hub's
//!    log has exactly the state its serving node holds.
//!
//! It exits non-zero when any check fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use omnirelay_client::mesh::{MeshClientConfig, ResourceLeaseClient};
use omnirelay_client::middleware::{AuthorizationTable, MiddlewareConfig, PrincipalConfig, TrustedProxies};
use omnirelay_client::node::{Assignment, Node, NodeConfig};
use omnirelay_client::queue::recover;
use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig};
use omnirelay_client::{QueueConfig, ShardId};
use omnirelay_proto::resourcelease::v1 as pb;

/// Settings of `omnirelay demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long producers enqueue, in seconds; the busiest node is killed
    /// halfway.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Namespaces spread over the three nodes.
    #[arg(long, default_value_t = 6)]
    pub namespaces: usize,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Shard lease TTL of the nodes in milliseconds: how long a dead node's
    /// namespaces wait before they move (short, so the demo is quick).
    #[arg(long, default_value_t = 3_000)]
    pub lease_ttl_ms: u64,
}

/// Times a worker asks to complete an item whose completion failed
/// (each attempt already retries within the client's deadline).
const COMPLETE_ATTEMPTS: usize = 5;

/// Bound on starting the mesh and on draining it at the end (a hang guard).
const GUARD: Duration = Duration::from_secs(60);

/// A node on its own thread and runtime.
struct RunningNode {
    id: String,
    url: String,
    node: Arc<Node>,
    /// Dropping it ends the thread's runtime abruptly (the kill).
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningNode {
    fn start(id: &str, hub: std::net::SocketAddr, namespaces: &[String], ttl: Duration) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (kill, killed) = std::sync::mpsc::channel::<()>();
        let id_owned = id.to_string();
        let namespaces = namespaces.to_vec();
        let thread = std::thread::Builder::new().name(format!("demo-{id}")).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!(error)));
                    return;
                }
            };
            let started = runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let address = listener.local_addr()?;
                let mut config = NodeConfig::new(id_owned.as_str());
                config.queues = namespaces.iter().map(|ns| QueueConfig::new(ns.as_str(), id_owned.as_str())).collect();
                config.ownership.assignment = Assignment::Rendezvous;
                config.ownership.lease_ttl = ttl;
                config.ownership.renew_every = ttl / 3;
                config.advertise = Some(format!("http://{address}"));
                config.middleware = MiddlewareConfig {
                    principal: PrincipalConfig::new().trusted_proxies(TrustedProxies::parse(&["127.0.0.1"])?),
                    authorization: AuthorizationTable::from_json(
                        r#"{"rules": [{"principals": ["demo"], "procedures": ["*"], "shards": ["*"]}]}"#,
                    )?,
                    ..MiddlewareConfig::default()
                };
                let replicator =
                    HubReplicator::new(HubReplicatorConfig::new([HubEndpoint::new(format!("http://{hub}"))]))?;
                let node = Arc::new(Node::builder(config).replicator(Arc::new(replicator), "hub").build()?);
                tokio::spawn(node.serve(listener, std::future::pending::<()>()));
                anyhow::Ok((node, address))
            });
            let ok = started.is_ok();
            let _ = ready_tx.send(started);
            if ok {
                // Runs the node until told to die (or the sender is gone),
                // then drops the runtime: every task ends mid-flight.
                let _ = killed.recv();
            }
            runtime.shutdown_background();
        })?;
        let (node, address) = ready_rx.recv().context("the node thread ended")??;
        Ok(Self { id: id.to_string(), url: format!("http://{address}"), node, kill: Some(kill), thread: Some(thread) })
    }

    /// Ends the node's runtime without a graceful step (like SIGKILL).
    fn kill(&mut self) {
        self.kill.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What producers and workers saw, for the checks.
#[derive(Default)]
struct History {
    /// Item id -> namespace, of every acknowledged enqueue.
    acknowledged: Mutex<HashMap<String, String>>,
    /// Item id -> fencing tokens whose completion succeeded (not as a
    /// repeat).
    completed: Mutex<HashMap<String, Vec<u64>>>,
    leases: AtomicU64,
    refused_completions: AtomicU64,
    failed_calls: AtomicU64,
    /// gRPC code -> calls that failed with it after the client's retries.
    failures: Mutex<HashMap<String, u64>>,
}

impl History {
    fn failed(&self, status: &tonic::Status) {
        self.failed_calls.fetch_add(1, Ordering::Relaxed);
        *self.failures.lock().expect("history").entry(format!("{:?}", status.code())).or_default() += 1;
    }
}

fn client(nodes: &[String]) -> anyhow::Result<ResourceLeaseClient> {
    Ok(ResourceLeaseClient::new(MeshClientConfig {
        nodes: nodes.to_vec(),
        metadata: vec![("x-client-principal".into(), "demo".into())],
        ..Default::default()
    })?)
}

async fn produce(
    client: Arc<ResourceLeaseClient>,
    history: Arc<History>,
    namespaces: Vec<String>,
    id: usize,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let namespace = namespaces[(n as usize + id) % namespaces.len()].clone();
        let request = pb::EnqueueRequest {
            namespace: namespace.clone(),
            payload: Some(pb::ItemPayload {
                resource_type: "demo".into(),
                resource_id: format!("p{id}-{n}"),
                request_id: format!("p{id}-{n}"),
                body: bytes::Bytes::from_static(b"demo"),
                ..Default::default()
            }),
            ..Default::default()
        };
        match client.enqueue(request).await {
            Ok(answer) => {
                history.acknowledged.lock().expect("history").insert(answer.item_id, namespace);
            }
            Err(status) => history.failed(&status),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn work(
    client: Arc<ResourceLeaseClient>,
    history: Arc<History>,
    namespaces: Vec<String>,
    id: usize,
    stop: Arc<AtomicBool>,
) {
    let mut n = id;
    while !stop.load(Ordering::Relaxed) {
        let namespace = namespaces[n % namespaces.len()].clone();
        n += 1;
        let request = pb::LeaseRequest {
            namespace: namespace.clone(),
            owner: format!("worker-{id}"),
            wait: Some(prost_types_duration(Duration::from_millis(100))),
            // Short, so an item whose lease answer was lost (the call failed
            // after the node granted it) is leased again soon.
            lease_duration: Some(prost_types_duration(Duration::from_secs(5))),
        };
        let item = match client.lease(request).await {
            Ok(answer) => answer.item,
            Err(status) => {
                history.failed(&status);
                continue;
            }
        };
        let Some(item) = item else { continue };
        history.leases.fetch_add(1, Ordering::Relaxed);
        let handle = item.lease.clone();
        let token = handle.as_ref().map_or(0, |handle| handle.fencing_token);
        // A completion whose answer was lost is asked again: the queue
        // answers `already_completed` for the same token.
        for _ in 0..COMPLETE_ATTEMPTS {
            match client.complete(pb::CompleteRequest { namespace: namespace.clone(), handle: handle.clone() }).await {
                Ok(_) => {
                    let mut completed = history.completed.lock().expect("history");
                    let tokens = completed.entry(item.item_id.clone()).or_default();
                    if !tokens.contains(&token) {
                        tokens.push(token);
                    }
                    break;
                }
                Err(status)
                    if status.code() == tonic::Code::Aborted || status.code() == tonic::Code::FailedPrecondition =>
                {
                    history.refused_completions.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(status) => history.failed(&status),
            }
        }
    }
}

fn prost_types_duration(duration: Duration) -> omnirelay_proto::Duration {
    omnirelay_proto::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// Runs the demo; `Ok(false)` when a check failed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(args.namespaces >= 1, "--namespaces: at least 1");
    anyhow::ensure!(args.producers >= 1 && args.workers >= 1, "--producers and --workers: at least 1");
    let ttl = Duration::from_millis(args.lease_ttl_ms);
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let hub = omnirelay_hub::Hub::open(omnirelay_hub::Config {
        retention_interval: None,
        ..omnirelay_hub::Config::for_sqlite(dir.path().join("hub.db"))
    })
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hub_address = listener.local_addr()?;
    tokio::spawn(hub.serve(listener, std::future::pending::<()>()));
    eprintln!("hub on {hub_address} (SQLite in {})", dir.path().display());

    let namespaces: Vec<String> = (0..args.namespaces).map(|n| format!("resourcelease.demo.q{n}")).collect();
    let mut nodes = Vec::new();
    for id in ["node-1", "node-2", "node-3"] {
        let node = RunningNode::start(id, hub_address, &namespaces, ttl)?;
        eprintln!("{} on {}", node.id, node.url);
        nodes.push(node);
    }
    let started = Instant::now();
    while !all_served(&nodes, &namespaces) {
        anyhow::ensure!(started.elapsed() < GUARD, "the mesh did not start within {GUARD:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let urls: Vec<String> = nodes.iter().map(|node| node.url.clone()).collect();
    let client = Arc::new(client(&urls)?);
    let history = Arc::new(History::default());
    let stop_producers = Arc::new(AtomicBool::new(false));
    let stop_workers = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for id in 0..args.producers {
        tasks.push(tokio::spawn(produce(
            client.clone(),
            history.clone(),
            namespaces.clone(),
            id,
            stop_producers.clone(),
        )));
    }
    let mut workers = Vec::new();
    for id in 0..args.workers {
        workers.push(tokio::spawn(work(client.clone(), history.clone(), namespaces.clone(), id, stop_workers.clone())));
    }

    let bar = indicatif::ProgressBar::new(args.seconds * 10);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut killed: Option<(String, Vec<String>, Instant)> = None;
    let mut failover: Option<Duration> = None;
    for tick in 0..args.seconds * 10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        bar.set_position(tick + 1);
        if killed.is_none() && tick >= args.seconds * 5 {
            // Kill the node that owns the most namespaces.
            let victim = (0..nodes.len()).max_by_key(|&i| nodes[i].node.assigned().len()).unwrap_or(0);
            let owned: Vec<String> = nodes[victim].node.assigned().iter().map(ToString::to_string).collect();
            let mut node = nodes.remove(victim);
            node.kill();
            bar.println(format!("killed {} (it owned {})", node.id, owned.join(", ")));
            killed = Some((node.id, owned, Instant::now()));
        }
        if let Some((_, owned, at)) = &killed
            && failover.is_none()
            && all_served(&nodes, owned)
        {
            let took = at.elapsed();
            failover = Some(took);
            bar.println(format!("its namespaces serve again after {took:.2?}"));
        }
        bar.set_message(format!(
            "{} enqueued, {} completed, {} failed calls",
            history.acknowledged.lock().expect("history").len(),
            history.completed.lock().expect("history").len(),
            history.failed_calls.load(Ordering::Relaxed)
        ));
    }
    stop_producers.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    bar.println("producers stopped; draining every queue");
    let drained = Instant::now();
    loop {
        let left = remaining(&nodes, &namespaces).await;
        bar.set_message(format!("{left} items left"));
        if left == 0 && all_served(&nodes, &namespaces) {
            break;
        }
        if drained.elapsed() > GUARD {
            bar.println(format!("gave up draining with {left} items left"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_workers.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    bar.finish_and_clear();

    // The checks.
    let acknowledged = history.acknowledged.lock().expect("history").clone();
    let completed = history.completed.lock().expect("history").clone();
    let lost: Vec<&String> = acknowledged.keys().filter(|item| !completed.contains_key(*item)).collect();
    let twice: Vec<&String> = completed.iter().filter(|(_, tokens)| tokens.len() > 1).map(|(item, _)| item).collect();
    let observer = HubReplicator::new(HubReplicatorConfig::new([HubEndpoint::new(format!("http://{hub_address}"))]))?;
    let mut diverged = Vec::new();
    for ns in &namespaces {
        let shard = ShardId::new(ns.as_str());
        let Some(owner) = nodes.iter().find(|node| node.node.assigned().contains(&shard)) else {
            diverged.push(format!("{ns}: no owner"));
            continue;
        };
        let queue = owner.node.queue(&shard).context("hosted")?;
        let _ = tokio::time::timeout(GUARD, queue.settled()).await;
        let live = queue.inspect(omnirelay_client::QueueState::encode).await;
        let replayed = recover(&observer, &shard).await.map_err(|error| anyhow::anyhow!("replaying {ns}: {error}"))?;
        if replayed.state.encode() != live {
            diverged.push(format!("{ns} on {}", owner.id));
        }
    }

    use std::fmt::Write as _;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "OmniRelay demo: 3 nodes, {} namespaces, {} producers, {} workers, {} s",
        namespaces.len(),
        args.producers,
        args.workers,
        args.seconds
    );
    let _ = writeln!(report, "  enqueues acknowledged                  {}", acknowledged.len());
    let _ = writeln!(report, "  leases granted                         {}", history.leases.load(Ordering::Relaxed));
    let _ = writeln!(
        report,
        "  completions                            {}",
        completed.values().map(Vec::len).sum::<usize>()
    );
    let _ = writeln!(
        report,
        "  stale completions refused by fencing   {}",
        history.refused_completions.load(Ordering::Relaxed)
    );
    let _ =
        writeln!(report, "  calls that failed after their retries  {}", history.failed_calls.load(Ordering::Relaxed));
    let _ = match (&killed, failover) {
        (Some((id, owned, _)), Some(took)) => writeln!(
            report,
            "  failover: {id} killed; its {} namespaces served again after {took:.2?} (lease TTL {ttl:?})",
            owned.len()
        ),
        (Some((id, _, _)), None) => writeln!(report, "  failover: {id} killed; its namespaces were NOT served again"),
        _ => writeln!(report, "  failover: no node was killed (the run was too short)"),
    };
    let checks = [
        ("no acknowledged enqueue lost", lost.is_empty(), format!("{} lost", lost.len())),
        ("no item completed under two leases", twice.is_empty(), format!("{} items", twice.len())),
        ("replayed state equals the survivors'", diverged.is_empty(), diverged.join(", ")),
        ("the killed node's namespaces moved", failover.is_some(), String::new()),
    ];
    let mut ok = true;
    for (name, passed, detail) in &checks {
        ok &= passed;
        let _ = if *passed { writeln!(report, "  PASS  {name}") } else { writeln!(report, "  FAIL  {name}: {detail}") };
    }
    {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(report.as_bytes());
        let _ = stdout.flush();
    }
    for node in &mut nodes {
        node.node.shutdown().await;
        node.kill();
    }
    Ok(ok)
}

fn all_served(nodes: &[RunningNode], namespaces: &[String]) -> bool {
    namespaces.iter().all(|ns| {
        let shard = ShardId::new(ns.as_str());
        nodes.iter().any(|node| {
            node.node.assigned().contains(&shard)
                && node.node.queue(&shard).is_some_and(|queue| queue.replication().fence.is_none())
        })
    })
}

async fn remaining(nodes: &[RunningNode], namespaces: &[String]) -> u64 {
    let mut left = 0;
    for ns in namespaces {
        let shard = ShardId::new(ns.as_str());
        for node in nodes {
            if node.node.assigned().contains(&shard)
                && let Some(queue) = node.node.queue(&shard)
            {
                let stats = queue.stats_now();
                left += stats.pending + stats.active;
            }
        }
    }
    left
}
