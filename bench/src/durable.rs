//! `node-durable`: the enqueue -> lease -> complete cycle through one mesh
//! node whose queue replicates to a hub on a durable PostgreSQL cluster,
//! against a PostgreSQL SKIP LOCKED work queue doing the same three steps on
//! the same cluster in the same run; then the recovery time of a queue whose
//! log holds a million events.
//!
//! The node, the hub and the clients run in this process, each on a runtime
//! of its own with named threads, so their CPU is read apart from
//! `/proc/self/task/*`; PostgreSQL's is read from its processes.

// A benchmark prints its figures.
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use omnirelay_client::middleware::{AuthorizationTable, MiddlewareConfig, PrincipalConfig, TrustedProxies};
use omnirelay_client::node::{Node, NodeConfig};
use omnirelay_client::queue::{Caller, EnqueueRequest, LeaseRequest, Payload, QueueConfig};
use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig};
use omnirelay_client::{PeerId, ShardId};
use omnirelay_hub::{Config, Hub};
use omnirelay_proto::resourcelease::v1 as pb;
use omnirelay_proto::resourcelease::v1::resource_lease_client::ResourceLeaseClient;
use omnirelay_tests::{PgCluster, PgOptions};
use tonic::transport::Channel;

use crate::BODY_BYTES;

const NAMESPACE: &str = "resourcelease.durable";

/// Events the recovery measurement writes before it restarts a queue.
const RECOVERY_EVENTS: u64 = 1_000_000;

/// CPU of the threads whose name starts with a prefix, and of PostgreSQL.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cpu {
    pub(crate) node: Duration,
    pub(crate) hub: Duration,
    pub(crate) clients: Duration,
    pub(crate) postgres: Duration,
    /// Per PostgreSQL process: backends come and go between readings.
    postgres_pids: HashMap<u32, Duration>,
}

impl Cpu {
    /// What was spent from `before` to `self`; a PostgreSQL process that
    /// started in between counts from zero, one that ended is not seen.
    pub(crate) fn since(&self, before: &Cpu) -> Cpu {
        let postgres = self
            .postgres_pids
            .iter()
            .map(|(pid, spent)| spent.saturating_sub(before.postgres_pids.get(pid).copied().unwrap_or_default()))
            .sum();
        Cpu {
            node: self.node.saturating_sub(before.node),
            hub: self.hub.saturating_sub(before.hub),
            clients: self.clients.saturating_sub(before.clients),
            postgres,
            postgres_pids: HashMap::new(),
        }
    }
}

fn ticks(stat: &str) -> Option<Duration> {
    // `pid (comm) state ...`: utime and stime are fields 14 and 15, counted
    // after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

pub(crate) fn read_cpu(cluster: &PgCluster) -> Cpu {
    let mut cpu = Cpu::default();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let spent = std::fs::read_to_string(task.path().join("stat")).ok().and_then(|s| ticks(&s));
            let Some(spent) = spent else { continue };
            match comm.trim() {
                name if name.starts_with("node") => cpu.node += spent,
                name if name.starts_with("hub") => cpu.hub += spent,
                name if name.starts_with("client") => cpu.clients += spent,
                _ => {}
            }
        }
    }
    for pid in cluster.server_pids().unwrap_or_default() {
        if let Some(spent) = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| ticks(&s)) {
            cpu.postgres += spent;
            cpu.postgres_pids.insert(pid, spent);
        }
    }
    cpu
}

pub(crate) fn runtime(name: &'static str, threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("a runtime should build")
}

struct Measured {
    cycles: u64,
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu: Cpu,
    transactions: u64,
}

pub(crate) fn per(spent: Duration, cycles: u64) -> f64 {
    spent.as_secs_f64() * 1e6 / cycles.max(1) as f64
}

fn print(name: &str, workers: usize, measured: &Measured, baseline: Option<f64>) {
    let ratio = baseline.map_or("".to_string(), |b| format!("{:.2}x", measured.rate / b));
    println!(
        "| {name} | {workers} | {:.0} | {ratio} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
        measured.rate,
        measured.p50.as_secs_f64() * 1e3,
        measured.p99.as_secs_f64() * 1e3,
        measured.cycles as f64 / measured.transactions.max(1) as f64,
        per(measured.cpu.node, measured.cycles),
        per(measured.cpu.hub, measured.cycles),
        per(measured.cpu.postgres, measured.cycles),
        per(measured.cpu.clients, measured.cycles),
    );
}

async fn transactions(client: &tokio_postgres::Client) -> u64 {
    client
        .query_one("SELECT xact_commit::bigint FROM pg_stat_database WHERE datname = current_database()", &[])
        .await
        .map(|row| row.get::<_, i64>(0) as u64)
        .unwrap_or(0)
}

/// Runs `workers` loops of `cycle` for `duration` on the client runtime.
async fn measure<F, Fut>(
    cluster: &PgCluster,
    stats: &tokio_postgres::Client,
    clients: &tokio::runtime::Handle,
    workers: usize,
    duration: Duration,
    cycle: F,
) -> Measured
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut:
        std::future::Future<Output = Box<dyn FnMut(u64) -> futures_util::future::BoxFuture<'static, ()> + Send>> + Send,
{
    let cycle = Arc::new(cycle);
    let warmup = Duration::from_millis(500);
    let start = Instant::now() + warmup;
    let end = start + duration;
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let cycle = Arc::clone(&cycle);
        tasks.push(clients.spawn(async move {
            let mut run = cycle(worker).await;
            let mut latencies = Vec::new();
            let mut n = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                run(n).await;
                n += 1;
                if began >= start {
                    latencies.push(began.elapsed());
                }
            }
            latencies
        }));
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(start)).await;
    let (cpu_before, xact_before) = (read_cpu(cluster), transactions(stats).await);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("a worker should finish"));
    }
    let (cpu_after, xact_after) = (read_cpu(cluster), transactions(stats).await);
    all.sort_unstable();
    let at = |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied();
    Measured {
        cycles: all.len() as u64,
        rate: all.len() as f64 / duration.as_secs_f64(),
        p50: at(0.5).unwrap_or_default(),
        p99: at(0.99).unwrap_or_default(),
        cpu: cpu_after.since(&cpu_before),
        transactions: xact_after.saturating_sub(xact_before),
    }
}

fn node_config(hub: std::net::SocketAddr) -> (NodeConfig, HubReplicator) {
    let mut queue = QueueConfig::new(NAMESPACE, "bench-node");
    queue.capacity = 1_000_000;
    queue.high_watermark = 900_000;
    queue.low_watermark = 800_000;
    let mut config = NodeConfig::new("bench-node");
    config.queues.push(queue);
    config.middleware = MiddlewareConfig {
        principal: PrincipalConfig::new()
            .trusted_proxies(TrustedProxies::parse(&["127.0.0.1"]).expect("a valid address")),
        authorization: AuthorizationTable::from_json(
            r#"{"rules": [{"principals": ["bench"], "procedures": ["*"], "shards": ["*"]}]}"#,
        )
        .expect("a valid table"),
        ..MiddlewareConfig::default()
    };
    let replicator = HubReplicator::new(HubReplicatorConfig::new([HubEndpoint::new(format!("http://{hub}"))]))
        .expect("a valid hub endpoint");
    (config, replicator)
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-client-principal", tonic::metadata::MetadataValue::from_static("bench"));
    request
}

/// One worker's cycle through the node, as unary gRPC calls.
async fn node_worker(
    address: std::net::SocketAddr,
    worker: usize,
) -> Box<dyn FnMut(u64) -> futures_util::future::BoxFuture<'static, ()> + Send> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("URI")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("the node accepts connections");
    let client = ResourceLeaseClient::new(channel);
    let body = Bytes::from(vec![7u8; BODY_BYTES]);
    let owner = format!("w{worker}");
    Box::new(move |n| {
        let mut client = client.clone();
        let body = body.clone();
        let owner = owner.clone();
        Box::pin(async move {
            let payload = pb::ItemPayload {
                resource_type: "bench".into(),
                resource_id: format!("{owner}/{n}"),
                body,
                ..Default::default()
            };
            let enqueue =
                pb::EnqueueRequest { namespace: NAMESPACE.into(), payload: Some(payload), ..Default::default() };
            client.enqueue(request(enqueue)).await.expect("enqueue should succeed");
            let handle = loop {
                let lease =
                    pb::LeaseRequest { namespace: NAMESPACE.into(), owner: owner.clone(), ..Default::default() };
                let answer = client.lease(request(lease)).await.expect("lease should succeed").into_inner();
                if let Some(handle) = answer.item.and_then(|item| item.lease) {
                    break handle;
                }
                tokio::task::yield_now().await;
            };
            let complete = pb::CompleteRequest { namespace: NAMESPACE.into(), handle: Some(handle) };
            client.complete(request(complete)).await.expect("complete should succeed");
        })
    })
}

/// One worker's cycle on the SKIP LOCKED queue: three transactions.
async fn skip_locked_worker(
    url: String,
    worker: usize,
) -> Box<dyn FnMut(u64) -> futures_util::future::BoxFuture<'static, ()> + Send> {
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let client = Arc::new(client);
    let insert = client.prepare("INSERT INTO bench_jobs (payload) VALUES ($1)").await.expect("prepare");
    let claim = client
        .prepare(
            "UPDATE bench_jobs SET leased_by = $1, leased_until = now() + interval '30 seconds' \
             WHERE id = (SELECT id FROM bench_jobs WHERE leased_by IS NULL ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) \
             RETURNING id",
        )
        .await
        .expect("prepare");
    let delete = client.prepare("DELETE FROM bench_jobs WHERE id = $1").await.expect("prepare");
    let body = vec![7u8; BODY_BYTES];
    let owner = format!("w{worker}");
    Box::new(move |_| {
        let (client, insert, claim, delete, body, owner) =
            (Arc::clone(&client), insert.clone(), claim.clone(), delete.clone(), body.clone(), owner.clone());
        Box::pin(async move {
            client.execute(&insert, &[&body]).await.expect("insert");
            let id: i64 = loop {
                if let Some(row) = client.query_opt(&claim, &[&owner]).await.expect("claim") {
                    break row.get(0);
                }
                tokio::task::yield_now().await;
            };
            client.execute(&delete, &[&id]).await.expect("delete");
        })
    })
}

/// Appends per second by `producers` producers on one shard, each with one
/// 1-event batch in flight, through [`HubReplicator`]s (the node's path to
/// the hub without the node).
async fn hub_ceiling(hub: std::net::SocketAddr, producers: usize, step: Duration) -> anyhow::Result<f64> {
    use omnirelay_client::replication::{Batch, Replicator};
    let shard = ShardId::from(format!("resourcelease.ceiling{producers}"));
    let replicator = Arc::new(
        HubReplicator::new(HubReplicatorConfig::new([HubEndpoint::new(format!("http://{hub}"))]))
            .map_err(|err| anyhow::anyhow!("{err}"))?,
    );
    let grant = replicator.acquire_shard(&shard, "ceiling", Duration::from_secs(600)).await?;
    // One producer, as a node is one producer per shard: the producers
    // share its sequence counter and take turns, keeping `producers`
    // batches in flight.
    let state = Arc::new(tokio::sync::Mutex::new((1u64, grant.head)));
    let end = Instant::now() + step;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let (replicator, shard, state) = (Arc::clone(&replicator), shard.clone(), Arc::clone(&state));
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let origin = Arc::new(omnirelay_client::queue::Origin {
                shard: shard.clone(),
                principal: "bench".into(),
                peer: "bench".into(),
            });
            while Instant::now() < end {
                let answer = {
                    let mut state = state.lock().await;
                    let batch = Batch {
                        shard: shard.clone(),
                        producer: omnirelay_client::ProducerId::from("ceiling"),
                        producer_seq: state.0,
                        epoch: grant.epoch,
                        first: state.1.after(1),
                        events: vec![omnirelay_client::queue::Event {
                            origin: Arc::clone(&origin),
                            recorded_at: omnirelay_client::clock::Timestamp::EPOCH,
                            kind: omnirelay_client::queue::EventKind::Resumed,
                        }],
                    };
                    state.0 += 1;
                    state.1 = state.1.after(1);
                    replicator.publish(&batch)
                };
                answer.await.expect("the hub accepts the ceiling's batches");
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

pub(crate) fn run(seconds: u64) {
    if let Err(error) = scenario(Duration::from_secs(seconds)) {
        eprintln!("benchmark failed: {error:#}");
        std::process::exit(1);
    }
}

fn scenario(step: Duration) -> anyhow::Result<()> {
    eprintln!("starting a durable PostgreSQL cluster (fsync on)");
    let cluster = PgCluster::start(PgOptions { durable: true, max_connections: 300 })?;
    let url = cluster.url("postgres");
    let hubs = runtime("hub", 2);
    let nodes = runtime("node", 2);
    let clients = runtime("client", 2);
    let main = tokio::runtime::Builder::new_current_thread().enable_all().build()?;

    let hub_address = hubs.block_on(async {
        omnirelay_hub::store::postgres::migrate(&url).await.context("migrate")?;
        let hub = Hub::open(Config { retention_interval: None, ..Config::for_postgres(&url)? }).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(hub.serve(listener, std::future::pending::<()>()));
        anyhow::Ok(address)
    })?;
    let (node, node_address) = nodes.block_on(async {
        let (config, replicator) = node_config(hub_address);
        let node = Arc::new(Node::builder(config).replicator(Arc::new(replicator), "hub").build()?);
        tokio::time::timeout(Duration::from_secs(30), node.serving()).await.context("the node serves its shard")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(node.serve(listener, std::future::pending::<()>()));
        anyhow::Ok((node, address))
    })?;
    let stats = main.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        main.spawn(connection);
        client
            .batch_execute(
                "CREATE TABLE bench_jobs (id bigserial PRIMARY KEY, payload bytea NOT NULL, \
                 leased_by text, leased_until timestamptz)",
            )
            .await?;
        anyhow::Ok(client)
    })?;

    println!(
        "| scenario | workers | cycles/s | vs SKIP LOCKED | p50 ms | p99 ms | cycles per PG transaction | node µs CPU/cycle | hub µs | PostgreSQL µs | clients µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut ratios = HashMap::new();
    let mut baselines = HashMap::new();
    for workers in [1usize, 8, 64] {
        main.block_on(stats.batch_execute("CHECKPOINT"))?;
        let baseline = main.block_on(measure(&cluster, &stats, clients.handle(), workers, step, {
            let url = url.clone();
            move |worker| skip_locked_worker(url.clone(), worker)
        }));
        print("PostgreSQL SKIP LOCKED", workers, &baseline, None);
        main.block_on(stats.batch_execute("CHECKPOINT"))?;
        let durable = main.block_on(measure(&cluster, &stats, clients.handle(), workers, step, move |worker| {
            node_worker(node_address, worker)
        }));
        print("node -> hub -> PostgreSQL", workers, &durable, Some(baseline.rate));
        ratios.insert(workers, durable.rate / baseline.rate);
        baselines.insert(workers, baseline.rate);
    }
    println!();
    println!(
        "node / SKIP LOCKED: {:.2} at 8 workers (target >= 3), {:.2} at 64 workers (target >= 5)",
        ratios[&8], ratios[&64]
    );
    // The ceiling of the layer below: the hub alone, each producer waiting
    // for its batch's acknowledgement before the next (as a worker waits
    // for each of its three calls). A cycle is three such appends.
    println!();
    println!(
        "| ceiling: hub appends, 1 event per batch, 1 in flight per producer | producers | appends/s | cycles/s at most (appends / 3) | vs SKIP LOCKED cycles |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (producers, baseline) in [(8usize, baselines[&8]), (64, baselines[&64])] {
        let appends = hubs.block_on(hub_ceiling(hub_address, producers, step))?;
        println!("| hub only | {producers} | {appends:.0} | {:.0} | {:.2}x |", appends / 3.0, appends / 3.0 / baseline);
    }
    drop(node);

    // Recovery: a log of a million events (with the node's default snapshot
    // interval), then a new node's time from start to serving.
    let (mut config, replicator) = nodes.block_on(async { node_config(hub_address) });
    config.queues[0].shard = ShardId::from("resourcelease.recovery");
    config.queues[0].node = PeerId::from("bench-node");
    let replicator = Arc::new(replicator);
    let written = nodes.block_on(async {
        let node = Node::builder(config.clone()).replicator(replicator.clone(), "hub").build()?;
        tokio::time::timeout(Duration::from_secs(30), node.serving()).await.context("serving")?;
        let queue = node.queue(&ShardId::from("resourcelease.recovery")).context("hosted")?.clone();
        let started = Instant::now();
        let mut tasks = Vec::new();
        // Each cycle writes three events; 64 tasks keep the pipeline full.
        let per_task = RECOVERY_EVENTS / 3 / 64 + 1;
        for task in 0..64u64 {
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                let caller = Caller::new("bench", format!("r{task}"));
                let body = Bytes::from(vec![7u8; BODY_BYTES]);
                for n in 0..per_task {
                    let payload = Payload::new("bench", format!("{task}/{n}"), body.clone());
                    queue.enqueue(&caller, EnqueueRequest::new(payload)).await.expect("enqueue");
                    let leased = loop {
                        if let Some(leased) =
                            queue.lease(&caller, LeaseRequest::new(format!("r{task}"))).await.expect("lease")
                        {
                            break leased;
                        }
                        tokio::task::yield_now().await;
                    };
                    queue.complete(&caller, &leased.handle).await.expect("complete");
                }
            }));
        }
        for task in tasks {
            task.await?;
        }
        let head = queue.replication().durable;
        eprintln!("wrote {head} events in {:.1} s", started.elapsed().as_secs_f64());
        // A graceful stop writes the last snapshot; a crash would not, so
        // the measurement below stops without it: the owner is dropped.
        let snapshot = queue.replication().snapshot;
        drop(node);
        anyhow::Ok((head, snapshot))
    })?;
    let (head, snapshot) = written;
    let started = Instant::now();
    let recovered = nodes.block_on(async {
        let node = Node::builder(config).replicator(replicator.clone(), "hub").build()?;
        tokio::time::timeout(Duration::from_secs(120), node.serving()).await.context("serving")?;
        let state = node.queue(&ShardId::from("resourcelease.recovery")).context("hosted")?.replication();
        anyhow::Ok(state)
    })?;
    let took = started.elapsed();
    println!(
        "recovery: log of {head} events (newest snapshot at {snapshot}), new node from start to serving in {:.3} s \
         (served at {}; target <= 2 s)",
        took.as_secs_f64(),
        recovered.durable
    );
    drop(clients);
    drop(nodes);
    drop(hubs);
    drop(cluster);
    Ok(())
}
