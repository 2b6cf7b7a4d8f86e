//! `sinks [events]`: delivery throughput of one subscriber runtime into the
//! PostgreSQL projection sink (exactly once) against a plain `COPY` of the
//! same rows into a table of the same shape, and into the NDJSON sink
//! against `cat` of the same bytes to a file (then `sync`), all in one run
//! on a durable PostgreSQL cluster (fsync on) with an in-process hub.
//!
//! The log is written first (`events` Enqueued events of 200-byte bodies on
//! one shard), so each sink measures catch-up: subscribe from nothing to
//! the head. A sink that keeps nothing runs too, so the runtime's and the
//! hub's share of each sink's time shows. Prints one Markdown table row per
//! measurement.

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

const SHARD: &str = "resourcelease.bench-sinks";

pub(crate) fn run(events: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    if let Err(error) = runtime.block_on(scenario(events)) {
        eprintln!("benchmark failed: {error:#}");
        std::process::exit(1);
    }
}

async fn scenario(events: u64) -> anyhow::Result<()> {
    eprintln!("starting a durable PostgreSQL cluster (fsync on)");
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::start(PgOptions { durable: true, max_connections: 100 })).await??;
    let url = cluster.url("postgres");
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    admin.batch_execute("CREATE DATABASE projection").await?;
    let projection_url = cluster.url("projection");

    omnirelay_hub::store::postgres::migrate(&url).await.context("migrate")?;
    let hub = Hub::open(Config { retention_interval: None, ..Config::for_postgres(&url)? }).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = HubEndpoint::new(format!("http://{}", listener.local_addr()?));
    tokio::spawn(hub.serve(listener, std::future::pending::<()>()));

    eprintln!("writing {events} events");
    let replicator = Arc::new(HubReplicator::new(HubReplicatorConfig::new([endpoint.clone()]))?);
    let grant = replicator.acquire_shard(&ShardId::from(SHARD), "bench", Duration::from_secs(600)).await?;
    let queue =
        Arc::new(Queue::builder(QueueConfig::new(SHARD, "bench"), replicator.clone()).epoch(grant.epoch).build()?);
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

    println!("| sink | events | seconds | events/s | baseline | baseline seconds | ratio |");
    println!("|---|---:|---:|---:|---|---:|---:|");

    // The projection, exactly once.
    let pool = ProjectionSink::pool(&projection_url, 4, Duration::from_secs(10))?;
    let sink = ProjectionSink::open(pool.clone(), "bench").await?;
    let projected = deliver(&endpoint, "bench-projection", sink, events).await?;
    // The same rows by COPY into a table of the same shape.
    let copied = {
        let client = pool.get().await?;
        client
            .batch_execute(
                "CREATE TABLE copy_items (LIKE omnirelay_projection_items INCLUDING ALL); \
                 CREATE TEMP TABLE rows AS SELECT * FROM omnirelay_projection_items; \
                 COPY rows TO '/tmp/omnirelay-bench-rows.copy' WITH (FORMAT binary)",
            )
            .await
            .context("export the projected rows (COPY needs the server to write /tmp)")?;
        let started = Instant::now();
        client.batch_execute("COPY copy_items FROM '/tmp/omnirelay-bench-rows.copy' WITH (FORMAT binary)").await?;
        started.elapsed()
    };
    let _ = std::fs::remove_file("/tmp/omnirelay-bench-rows.copy");
    row("postgres projection (exactly once)", events, projected, "COPY of the same rows", copied);

    // The runtime alone (hub catch-up read, gRPC, chain checks) into a
    // sink that keeps nothing: what every sink pays before its own work.
    let discarded = deliver(&endpoint, "bench-discard", Discard, events).await?;
    row("discard (the runtime alone)", events, discarded, "-", Duration::ZERO);

    // NDJSON, at least once, synced before each checkpoint.
    let dir = tempfile_dir()?;
    let sink = NdjsonSink::open(NdjsonConfig::new(dir.join("sink"))).await?;
    let written = deliver(&endpoint, "bench-ndjson", sink, events).await?;
    let catted = {
        let started = Instant::now();
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cat {0}/sink/*.ndjson > {0}/cat.ndjson && sync {0}/cat.ndjson", dir.display()))
            .status()
            .await?;
        anyhow::ensure!(status.success(), "cat failed");
        started.elapsed()
    };
    row("ndjson (fsync on checkpoint)", events, written, "cat of the same bytes, then sync", catted);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A sink that keeps nothing: measures the subscriber runtime and the hub.
struct Discard;

impl ReplicationSink for Discard {
    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn deliver(&mut self, _batch: &SinkBatch) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Runs `sink` from nothing to `events` and returns how long it took.
async fn deliver<S: ReplicationSink>(
    endpoint: &HubEndpoint,
    id: &str,
    sink: S,
    events: u64,
) -> anyhow::Result<Duration> {
    let config = SubscriberConfig::new(id, [endpoint.clone()], Selection::Shards(vec![SHARD.into()]));
    let subscriber = Subscriber::new(config, sink)?;
    let mut progress = subscriber.progress();
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(subscriber.run(stop.clone()));
    loop {
        if progress.borrow().shards.get(SHARD).is_some_and(|s| s.position >= events) {
            break;
        }
        tokio::time::timeout(Duration::from_secs(600), progress.changed())
            .await
            .context("the sink stalled")?
            .context("the subscriber stopped")?;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    run.await?.map_err(|err| anyhow::anyhow!("{err}"))?;
    Ok(elapsed)
}

fn row(sink: &str, events: u64, took: Duration, baseline: &str, baseline_took: Duration) {
    let rate = events as f64 / took.as_secs_f64();
    if baseline_took.is_zero() {
        println!("| {sink} | {events} | {:.2} | {rate:.0} | {baseline} | - | - |", took.as_secs_f64());
        return;
    }
    println!(
        "| {sink} | {events} | {:.2} | {rate:.0} | {baseline} | {:.2} | {:.2} |",
        took.as_secs_f64(),
        baseline_took.as_secs_f64(),
        baseline_took.as_secs_f64() / took.as_secs_f64()
    );
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("omnirelay-bench-sinks-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
