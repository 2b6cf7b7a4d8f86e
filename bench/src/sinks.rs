//! `sinks [events] [rounds]`: delivery throughput of one subscriber runtime
//! into the PostgreSQL projection sink (exactly once) against a plain
//! `COPY` of the same rows into a table of the same shape, twice (from a
//! server-side file, PostgreSQL's ceiling, and sent by this client as
//! `COPY FROM STDIN`), round after round with the median ratio (each round
//! also runs the projection on as many events spread over four shards and
//! read through one pattern subscription, against the one-shard run); then
//! the ceiling on this machine (the same `COPY FROM STDIN` while a sink
//! that keeps nothing catches up); and the NDJSON sink against `cat` of the
//! same bytes to a file (then `sync`), all in one run on a durable PostgreSQL
//! cluster (fsync on) with an in-process hub.
//!
//! The log is written first (`events` Enqueued events of 200-byte bodies on
//! one shard), so each sink measures catch-up: subscribe from nothing to
//! the head. A sink that keeps nothing runs too, so the runtime's and the
//! hub's share of each sink's time shows. The hub and the sinks run on
//! runtimes of their own (threads `hub-*`, `client-*`), so each row also
//! gives CPU per event of the sink's side, the hub and PostgreSQL. Before
//! each measurement both databases are vacuumed and checkpointed. Prints
//! one Markdown table row per measurement; stderr gets the hub's frame
//! size and PostgreSQL's CPU by process.

// The figures are the program's output.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use omnirelay_client::queue::{Caller, EnqueueRequest, Payload};
use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig};
use omnirelay_client::sink::projection::ProjectionSink;
use omnirelay_client::sink::{
    Delivery, NdjsonConfig, NdjsonSink, ReplicationSink, Selection, SinkBatch, SinkError, Subscriber, SubscriberConfig,
};
use omnirelay_client::{Queue, QueueConfig, Replicator, ShardId};
use omnirelay_hub::{Config, Hub};
use omnirelay_tests::{PgCluster, PgOptions};

use crate::durable::{Cpu, per, read_cpu, runtime};

const SHARD: &str = "resourcelease.bench-sinks";

/// The second log: the same number of events spread over
/// [`SPREAD_SHARDS`] shards, read by one subscription to this pattern, so
/// the hub interleaves the shards' frames (one follower per shard).
const SPREAD_PATTERN: &str = "resourcelease.bench-spread-*";

/// Shards of the second log: enough that consecutive frames are mostly of
/// different shards.
const SPREAD_SHARDS: u64 = 4;

/// A log a sink catches up on: its subscription and each shard's head.
struct Log {
    selection: Selection,
    heads: Vec<(String, u64)>,
}

impl Log {
    fn one_shard(events: u64) -> Self {
        Self { selection: Selection::Shards(vec![SHARD.into()]), heads: vec![(SHARD.to_string(), events)] }
    }

    /// [`SPREAD_SHARDS`] shards of `events / SPREAD_SHARDS` events each.
    fn spread(events: u64) -> Self {
        let heads =
            (0..SPREAD_SHARDS).map(|n| (SPREAD_PATTERN.replace('*', &n.to_string()), events / SPREAD_SHARDS)).collect();
        Self { selection: Selection::Pattern(SPREAD_PATTERN.into()), heads }
    }

    fn events(&self) -> u64 {
        self.heads.iter().map(|(_, head)| head).sum()
    }
}

/// Where PostgreSQL exports the projected rows (binary COPY format) for the
/// two COPY baselines; the server and this process share the machine.
const ROWS_FILE: &str = "/tmp/omnirelay-bench-rows.copy";

/// The client-side COPY's message size: `psql`'s `\copy` sends 64 KiB or
/// less at a time too.
const COPY_CHUNK_BYTES: usize = 64 * 1024;

pub(crate) fn run(events: u64, rounds: usize) {
    if let Err(error) = scenario(events, rounds.max(1)) {
        eprintln!("benchmark failed: {error:#}");
        std::process::exit(1);
    }
}

/// A sink's run (or a baseline's): its time and the CPU spent meanwhile.
struct Measured {
    took: Duration,
    cpu: Cpu,
}

fn scenario(events: u64, rounds: usize) -> anyhow::Result<()> {
    eprintln!("starting a durable PostgreSQL cluster (fsync on)");
    let cluster = PgCluster::start(PgOptions { durable: true, max_connections: 100 })?;
    let url = cluster.url("postgres");
    // The hub and the sinks each on a runtime of their own, so their CPU
    // is read apart (see `durable::read_cpu`); the writer on a third.
    let hubs = runtime("hub", 2);
    let clients = runtime("client", 2);
    let main = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    let endpoint = hubs.block_on(async {
        omnirelay_hub::store::postgres::migrate(&url).await.context("migrate")?;
        let hub = Hub::open(Config { retention_interval: None, ..Config::for_postgres(&url)? }).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = HubEndpoint::new(format!("http://{}", listener.local_addr()?));
        tokio::spawn(hub.serve(listener, std::future::pending::<()>()));
        anyhow::Ok(endpoint)
    })?;
    let (one, spread) = (Log::one_shard(events), Log::spread(events));
    main.block_on(async {
        let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        admin.batch_execute("CREATE DATABASE projection").await?;
        for (shard, head) in one.heads.iter().chain(&spread.heads) {
            write(&endpoint, shard, *head).await?;
        }
        anyhow::Ok(())
    })?;

    println!(
        "| sink | events | seconds | events/s | baseline | baseline seconds | ratio | sink µs CPU/event | hub µs | PostgreSQL µs | baseline PostgreSQL µs |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|");

    // The projection, exactly once, against both COPYs of its rows, round
    // after round (the figures of one round on this shared machine vary
    // by a third; the median of the rounds' ratios is the result).
    let pool = ProjectionSink::pool(&cluster.url("projection"), 4, Duration::from_secs(10))?;
    let mut ratios = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        if round > 0 {
            clients.block_on(async {
                let client = pool.get().await?;
                client
                    .batch_execute(
                        "TRUNCATE omnirelay_projection_items, omnirelay_projection_checkpoints, copy_items, stdin_items",
                    )
                    .await?;
                anyhow::Ok(())
            })?;
        }
        let sink = clients.block_on(ProjectionSink::open(pool.clone(), "bench"))?;
        let projected = deliver(&cluster, &clients, &endpoint, &format!("bench-projection-{round}"), sink, &one)?;
        if round == 0 {
            clients.block_on(async {
                let client = pool.get().await?;
                client
                    .batch_execute(&format!(
                        "CREATE TABLE copy_items (LIKE omnirelay_projection_items INCLUDING ALL); \
                         CREATE TABLE stdin_items (LIKE omnirelay_projection_items INCLUDING ALL); \
                         CREATE TEMP TABLE rows AS SELECT * FROM omnirelay_projection_items; \
                         COPY rows TO '{ROWS_FILE}' WITH (FORMAT binary)",
                    ))
                    .await
                    .context("export the projected rows (COPY needs the server to write /tmp)")?;
                anyhow::Ok(())
            })?;
        }
        let (copied, streamed) = clients.block_on(copies(&cluster, &pool))?;
        row(
            "postgres projection (exactly once)",
            events,
            &projected,
            "COPY of the same rows from a server file",
            Some(&copied),
        );
        row(
            "postgres projection (exactly once)",
            events,
            &projected,
            "COPY FROM STDIN of the same rows",
            Some(&streamed),
        );
        ratios.0.push(copied.took.as_secs_f64() / projected.took.as_secs_f64());
        ratios.1.push(streamed.took.as_secs_f64() / projected.took.as_secs_f64());

        // The same number of events over several shards, interleaved by
        // the hub: against the one-shard projection of this round.
        let sink = clients.block_on(ProjectionSink::open(pool.clone(), "bench-spread"))?;
        let spread_run = deliver(&cluster, &clients, &endpoint, &format!("bench-spread-{round}"), sink, &spread)?;
        row(
            &format!("postgres projection, {SPREAD_SHARDS} shards interleaved"),
            spread.events(),
            &spread_run,
            "the projection of one shard (above)",
            Some(&projected),
        );
        ratios.2.push(projected.took.as_secs_f64() / spread_run.took.as_secs_f64());
    }
    println!(
        "| postgres projection, median of {rounds} rounds | | | | COPY from a server file / COPY FROM STDIN | | {:.2} / {:.2} | | | | |",
        median(&mut ratios.0),
        median(&mut ratios.1)
    );
    println!(
        "| postgres projection, {SPREAD_SHARDS} shards interleaved, median of {rounds} rounds | | | | the projection of one shard | | {:.2} | | | | |",
        median(&mut ratios.2)
    );

    // The ceiling on this machine: the same COPY FROM STDIN while a sink
    // that keeps nothing catches up on the log, so the hub, the runtime and
    // the hub's database take the share of the cores they take under the
    // projection. A sink whose own writes cost at least a COPY's cannot be
    // faster than this COPY.
    let solo = clients.block_on(async {
        let client = pool.get().await?;
        client.batch_execute("TRUNCATE stdin_items").await?;
        settle(&cluster).await?;
        stdin_copy(&cluster, &client).await
    })?;
    let first_batch = Arc::new(tokio::sync::Notify::new());
    let loaded = std::thread::scope(|scope| {
        let copy = scope.spawn(|| {
            main.block_on(async {
                let client = pool.get().await?;
                client.batch_execute("TRUNCATE stdin_items").await?;
                first_batch.notified().await;
                stdin_copy(&cluster, &client).await
            })
        });
        let ran = deliver(&cluster, &clients, &endpoint, "bench-ceiling", Signal(first_batch.clone()), &one);
        let copied = copy.join().map_err(|_| anyhow::anyhow!("the copy thread panicked"))?;
        ran.and(copied)
    })?;
    let _ = std::fs::remove_file(ROWS_FILE);
    row("COPY FROM STDIN while the runtime catches up (no sink)", events, &loaded, "the same COPY alone", Some(&solo));

    // The runtime alone (hub catch-up read, gRPC, chain checks) into a
    // sink that keeps nothing: what every sink pays before its own work.
    let batches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let discarded = deliver(&cluster, &clients, &endpoint, "bench-discard", Discard(batches.clone()), &one)?;
    let batches = batches.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("the hub served {events} events in {batches} frames ({} events a frame)", events / batches.max(1));
    row("discard (the runtime alone)", events, &discarded, "-", None);

    // NDJSON, at least once, synced before each checkpoint.
    let dir = tempfile_dir()?;
    let sink = clients.block_on(NdjsonSink::open(NdjsonConfig::new(dir.join("sink"))))?;
    let written = deliver(&cluster, &clients, &endpoint, "bench-ndjson", sink, &one)?;
    let catted = {
        let started = Instant::now();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cat {0}/sink/*.ndjson > {0}/cat.ndjson && sync {0}/cat.ndjson", dir.display()))
            .status()?;
        anyhow::ensure!(status.success(), "cat failed");
        // `cat` is not this process nor PostgreSQL: its CPU is not read.
        Measured { took: started.elapsed(), cpu: Cpu::default() }
    };
    row("ndjson (fsync on checkpoint)", events, &written, "cat of the same bytes, then sync", Some(&catted));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The same rows (exported by the first round) into empty tables of the
/// projection's shape: by `COPY` from the server-side file (the server's
/// ceiling: no protocol, no client), then the same bytes sent by this
/// client as `COPY FROM STDIN` (what an application writing these rows with
/// COPY pays).
async fn copies(cluster: &PgCluster, pool: &deadpool_postgres::Pool) -> anyhow::Result<(Measured, Measured)> {
    let client = pool.get().await?;
    settle(cluster).await?;
    let before = read_cpu(cluster);
    let started = Instant::now();
    client.batch_execute(&format!("COPY copy_items FROM '{ROWS_FILE}' WITH (FORMAT binary)")).await?;
    let copied = Measured { took: started.elapsed(), cpu: read_cpu(cluster).since(&before) };

    settle(cluster).await?;
    let streamed = stdin_copy(cluster, &client).await?;
    Ok((copied, streamed))
}

/// The exported rows sent by this client as `COPY FROM STDIN` into
/// `stdin_items`, in 64 KiB messages.
async fn stdin_copy(cluster: &PgCluster, client: &tokio_postgres::Client) -> anyhow::Result<Measured> {
    let rows = bytes::Bytes::from(std::fs::read(ROWS_FILE).context("read the exported rows")?);
    let before = read_cpu(cluster);
    let started = Instant::now();
    let sink = client.copy_in("COPY stdin_items FROM STDIN WITH (FORMAT binary)").await?;
    let mut sink = std::pin::pin!(sink);
    let mut offset = 0;
    while offset < rows.len() {
        let end = (offset + COPY_CHUNK_BYTES).min(rows.len());
        futures_util::SinkExt::send(&mut sink, rows.slice(offset..end)).await?;
        offset = end;
    }
    sink.as_mut().finish().await?;
    Ok(Measured { took: started.elapsed(), cpu: read_cpu(cluster).since(&before) })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Writes `events` Enqueued events to `shard` through a queue.
async fn write(endpoint: &HubEndpoint, shard: &str, events: u64) -> anyhow::Result<()> {
    eprintln!("writing {events} events to {shard}");
    let replicator = Arc::new(HubReplicator::new(HubReplicatorConfig::new([endpoint.clone()]))?);
    let grant = replicator.acquire_shard(&ShardId::from(shard), "bench", Duration::from_secs(600)).await?;
    let queue = Arc::new(Queue::builder(queue_config(shard, events), replicator.clone()).epoch(grant.epoch).build()?);
    let body = "x".repeat(crate::BODY_BYTES);
    futures_util::stream::iter(0..events)
        .map(|n| {
            let queue = queue.clone();
            let body = body.clone();
            async move {
                let caller = Caller::new("spiffe://bench/producer", "bench");
                queue.enqueue(&caller, EnqueueRequest::new(Payload::new("user", n.to_string(), body))).await
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok(())
}

/// The queue that writes the log: every event it writes stays pending
/// (nothing is leased), so its capacity and watermarks are raised above
/// `events`; with the defaults, backpressure would stop the writing at
/// 80,000 pending.
fn queue_config(shard: &str, events: u64) -> QueueConfig {
    let mut config = QueueConfig::new(shard, "bench");
    let room = (events + 1).max(config.capacity);
    config.capacity = room;
    config.high_watermark = room;
    config.low_watermark = room - 1;
    config
}

/// A sink that keeps nothing: measures the subscriber runtime and the hub.
/// Counts the batches (hub frames) it is handed.
struct Discard(Arc<std::sync::atomic::AtomicU64>);

impl ReplicationSink for Discard {
    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn deliver(&mut self, _batch: &SinkBatch) -> Result<(), SinkError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// A sink that keeps nothing and signals each batch (the first wakes the
/// ceiling's COPY).
struct Signal(Arc<tokio::sync::Notify>);

impl ReplicationSink for Signal {
    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn deliver(&mut self, _batch: &SinkBatch) -> Result<(), SinkError> {
        self.0.notify_one();
        Ok(())
    }
}

/// Runs `sink` from nothing to the head of `log` on the `clients` runtime
/// and returns how long it took and the CPU spent meanwhile.
fn deliver<S: ReplicationSink>(
    cluster: &PgCluster,
    clients: &tokio::runtime::Runtime,
    endpoint: &HubEndpoint,
    id: &str,
    sink: S,
    log: &Log,
) -> anyhow::Result<Measured> {
    clients.block_on(async {
        let config = SubscriberConfig::new(id, [endpoint.clone()], log.selection.clone());
        let subscriber = Subscriber::new(config, sink)?;
        let mut progress = subscriber.progress();
        let stop = tokio_util::sync::CancellationToken::new();
        settle(cluster).await?;
        let before_kinds = postgres_by_kind(cluster);
        let before = read_cpu(cluster);
        let started = Instant::now();
        let run = tokio::spawn(subscriber.run(stop.clone()));
        loop {
            let reached = {
                let now = progress.borrow();
                log.heads.iter().all(|(shard, head)| now.shards.get(shard).is_some_and(|s| s.position >= *head))
            };
            if reached {
                break;
            }
            tokio::time::timeout(Duration::from_secs(600), progress.changed())
                .await
                .context("the sink stalled")?
                .context("the subscriber stopped")?;
        }
        let took = started.elapsed();
        let cpu = read_cpu(cluster).since(&before);
        let after_kinds = postgres_by_kind(cluster);
        for (kind, spent) in &after_kinds {
            let spent = spent.saturating_sub(before_kinds.get(kind).copied().unwrap_or_default());
            if spent >= Duration::from_millis(20) {
                eprintln!("{id}: PostgreSQL {kind}: {} ms CPU", spent.as_millis());
            }
        }
        stop.cancel();
        run.await?.map_err(|err| anyhow::anyhow!("{err}"))?;
        Ok(Measured { took, cpu })
    })
}

/// Writes every dirty page out before a measurement (`CHECKPOINT`), so no
/// measurement pays for the writes of the one before it (the log's, first
/// of all) in PostgreSQL's CPU and disk time.
/// Vacuums and analyzes both databases first, so autovacuum (woken by the
/// log's or the last sink's rows) does not run during the measurement.
async fn settle(cluster: &PgCluster) -> anyhow::Result<()> {
    for database in ["postgres", "projection"] {
        let (admin, connection) = tokio_postgres::connect(&cluster.url(database), tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        admin.batch_execute("VACUUM ANALYZE").await.context("vacuum before a measurement")?;
        admin.batch_execute("CHECKPOINT").await.context("checkpoint before a measurement")?;
        drop(admin);
        let _ = connection.await;
    }
    Ok(())
}

/// PostgreSQL's CPU by process kind (`autovacuum worker`, a backend's
/// database, `checkpointer`, ...), for a diagnosis on stderr.
fn postgres_by_kind(cluster: &PgCluster) -> std::collections::BTreeMap<String, Duration> {
    let mut by_kind = std::collections::BTreeMap::new();
    for pid in cluster.server_pids().unwrap_or_default() {
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ");
        let kind = cmdline
            .strip_prefix("postgres: ")
            .unwrap_or("postmaster")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        let spent = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
            let rest = stat.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
            Some(Duration::from_millis(ticks * 10))
        });
        *by_kind.entry(format!("{kind} [{pid}]")).or_default() += spent.unwrap_or_default();
    }
    by_kind
}

fn row(sink: &str, events: u64, measured: &Measured, baseline: &str, against: Option<&Measured>) {
    let seconds = measured.took.as_secs_f64();
    let rate = events as f64 / seconds;
    let cpu = format!(
        "{:.1} | {:.1} | {:.1}",
        per(measured.cpu.clients, events),
        per(measured.cpu.hub, events),
        per(measured.cpu.postgres, events)
    );
    match against {
        None => println!("| {sink} | {events} | {seconds:.2} | {rate:.0} | {baseline} | - | - | {cpu} | - |"),
        Some(base) => {
            let base_seconds = base.took.as_secs_f64();
            let base_cpu = if base.cpu.postgres.is_zero() {
                "-".to_string()
            } else {
                format!("{:.1}", per(base.cpu.postgres, events))
            };
            println!(
                "| {sink} | {events} | {seconds:.2} | {rate:.0} | {baseline} | {base_seconds:.2} | {:.2} | {cpu} | {base_cpu} |",
                base_seconds / seconds
            );
        }
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("omnirelay-bench-sinks-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
