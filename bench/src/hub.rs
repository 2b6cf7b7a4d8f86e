//! The hub against raw PostgreSQL, on one durable database in one run.
//!
//! Baselines: one-row INSERT per transaction on one connection, and COPY of
//! 1,000-row batches from two connections, into a table shaped like the
//! hub's `events`. Then the hub (in process, over gRPC on loopback): append
//! throughput and batch latency with 1, 8 and 64 producers, and fan-out to
//! 1, 8 and 64 subscribers on a second replica with the PostgreSQL reads
//! each delivered event cost.

// The report on standard output is what a benchmark produces.
#![allow(clippy::print_stdout)]

use omnirelay_proto::raw::RawEvent;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::proto::hub::v1::hub_client::HubClient;
use omnirelay_hub::proto::replication::v1 as rpb;
use omnirelay_hub::telemetry::HubCounters;
use omnirelay_hub::{Config, Hub};
use omnirelay_tests::{PgCluster, PgOptions};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tonic::transport::Channel;

/// One line for the usage text.
pub(crate) const SUMMARY: &str =
    "hub vs raw PostgreSQL: append throughput/latency (1, 8, 64 producers) and fan-out reads (1, 8, 64 subscribers)";

/// How long each measured step runs.
const STEP: Duration = Duration::from_secs(5);
/// Warm-up before each measured step (connections, prepared statements, caches).
const WARM_UP: Duration = Duration::from_secs(1);
/// Rows per COPY batch in the COPY baseline (as the issue specifies).
const COPY_ROWS: usize = 1_000;
/// Concurrent COPY connections (two: more did not help on this machine).
const COPY_CONNECTIONS: usize = 2;

/// Options: `--step-secs N` shortens or lengthens each step;
/// `--sequential N` runs only the one-producer, one-batch-in-flight
/// comparison, as N rounds that interleave its three steps.
struct Options {
    step: Duration,
    sequential_rounds: usize,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut options = Options { step: STEP, sequential_rounds: 0 };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--step-secs" => {
                let value = args.next().context("--step-secs needs a value")?;
                options.step = Duration::from_secs(value.parse().context("--step-secs takes whole seconds")?);
            }
            "--sequential" => {
                let value = args.next().context("--sequential needs a number of rounds")?;
                options.sequential_rounds = value.parse().context("--sequential takes a whole number of rounds")?;
            }
            other => bail!("unknown option {other}"),
        }
    }
    Ok(options)
}

/// A representative event body (a Completed event with a principal, a peer
/// and metadata): about 150 bytes, like a queue mutation.
fn sample_event(i: u64) -> rpb::ReplicationEvent {
    rpb::ReplicationEvent {
        principal: "spiffe://omnirelay/ns/prod/sa/worker".into(),
        peer_id: "node-7f3a".into(),
        recorded_at: Some(omnirelay_hub::wire::to_timestamp(SystemTime::now())),
        metadata: [("shard.id".to_string(), "users".to_string())].into(),
        event: Some(rpb::replication_event::Event::Completed(rpb::Completed {
            item_id: format!("item-{i:012}"),
            fencing_token: i,
        })),
        ..Default::default()
    }
}

/// Latency samples of one step.
#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn percentile(&mut self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let index = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[index]
    }
}

/// What a step's workers share: they stop at `stop` and, while
/// `measuring`, add what they did to `count` and keep its latencies.
#[derive(Clone, Default)]
struct Window {
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
}

impl Window {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Counts `n` done (with its latency) if the window is measuring.
    fn record(&self, latencies: &mut Latencies, n: u64, latency: Duration) {
        if self.measuring.load(Ordering::Relaxed) {
            self.count.fetch_add(n, Ordering::Relaxed);
            latencies.0.push(latency);
        }
    }

    /// Warms up, measures for `step`, stops the workers and gathers their
    /// latencies: the count per second and every latency.
    async fn run(
        &self,
        step: Duration,
        workers: Vec<tokio::task::JoinHandle<anyhow::Result<Latencies>>>,
    ) -> anyhow::Result<(f64, Latencies)> {
        tokio::time::sleep(WARM_UP).await;
        self.measuring.store(true, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(step).await;
        self.measuring.store(false, Ordering::Relaxed);
        let elapsed = started.elapsed();
        let measured = self.count.load(Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        let mut latencies = Latencies::default();
        for worker in workers {
            latencies.0.extend(worker.await??.0);
        }
        Ok((measured as f64 / elapsed.as_secs_f64(), latencies))
    }
}

/// One measured line of the report.
struct Line {
    name: String,
    events_per_sec: f64,
    p50: Duration,
    p99: Duration,
    note: String,
}

fn print_line(line: &Line) {
    println!(
        "| {} | {:.0} | {:.2} | {:.2} | {} |",
        line.name,
        line.events_per_sec,
        line.p50.as_secs_f64() * 1e3,
        line.p99.as_secs_f64() * 1e3,
        line.note
    );
}

pub(crate) async fn run(args: &[String]) -> anyhow::Result<()> {
    let options = options(args)?;
    eprintln!("starting a durable PostgreSQL cluster (fsync on)");
    let cluster =
        tokio::task::spawn_blocking(|| PgCluster::start(PgOptions { durable: true, max_connections: 300 })).await??;
    let url = cluster.url("postgres");
    omnirelay_hub::store::postgres::migrate(&url).await.context("migrate")?;
    let admin = connect(&url).await?;
    admin
        .batch_execute(
            "CREATE TABLE bench_events (shard_no integer NOT NULL, sequence bigint NOT NULL, epoch bigint NOT NULL, \
             recorded_at timestamptz NOT NULL, body bytea NOT NULL, hash bytea NOT NULL, PRIMARY KEY (shard_no, sequence))",
        )
        .await
        .context("create the baseline table")?;

    if options.sequential_rounds > 0 {
        let outcome = sequential(&url, &admin, options.sequential_rounds, options.step).await;
        drop(cluster);
        return outcome;
    }
    println!("| scenario | events/s (delivered for fan-out) | p50 ms | p99 ms | notes |");
    println!("|---|---:|---:|---:|---|");
    // A checkpoint before each step, so no step pays for the WAL an
    // earlier one wrote.
    let checkpoint = || async { admin.batch_execute("CHECKPOINT").await.context("checkpoint") };
    checkpoint().await?;
    let insert = insert_baseline(&url, options.step, 1).await?;
    print_line(&insert);
    checkpoint().await?;
    let copy = copy_baseline(&url, options.step).await?;
    print_line(&copy);
    checkpoint().await?;
    let store_line = store_appends(&url, options.step, "bench.store").await?;
    print_line(&store_line);

    let writer = TestHub::start(&url).await?;
    let reader = TestHub::start(&url).await?;
    let mut shard_counter = 0u32;
    let mut results = Vec::new();
    for (producers, batch, in_flight) in
        [(1usize, 1usize, 1usize), (1, 1, 32), (8, 1, 8), (8, 100, 4), (64, 1, 4), (64, 100, 4)]
    {
        shard_counter += 1;
        checkpoint().await?;
        let line = hub_appends(&writer, shard_counter, producers, batch, in_flight, options.step).await?;
        print_line(&line);
        results.push((producers, batch, in_flight, line.events_per_sec));
    }
    for subscribers in [1usize, 8, 64] {
        shard_counter += 1;
        checkpoint().await?;
        let line = fan_out(&writer, &reader, shard_counter, subscribers, options.step).await?;
        print_line(&line);
    }
    println!();
    let best_64 = results.iter().filter(|r| r.0 == 64).map(|r| r.3).fold(0.0, f64::max);
    let single = results.iter().find(|r| r.0 == 1 && r.2 == 1).map_or(0.0, |r| r.3);
    let single_pipelined = results.iter().find(|r| r.0 == 1 && r.2 > 1).map_or(0.0, |r| r.3);
    println!("hub with 64 producers / raw COPY (2 connections): {:.2} (target >= 0.70)", best_64 / copy.events_per_sec);
    println!(
        "hub with 1 producer, 1-event batches / single-row INSERT: {:.2} sequential, {:.2} pipelined (target >= 1.0)",
        single / insert.events_per_sec,
        single_pipelined / insert.events_per_sec
    );
    writer.stop().await;
    reader.stop().await;
    drop(cluster);
    Ok(())
}

/// The one-producer, one-batch-in-flight comparison alone: `rounds` rounds
/// of single-row INSERT, store append and hub append, interleaved so that
/// the machine's load swings hit all three alike; the ratio of each round
/// and their median.
async fn sequential(url: &str, admin: &tokio_postgres::Client, rounds: usize, step: Duration) -> anyhow::Result<()> {
    let _ = omnirelay_hub::telemetry::prometheus();
    let writer = TestHub::start(url).await?;
    println!("| round | INSERT/s | store append/s | hub append/s | store/INSERT | hub/INSERT |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut store_ratios = Vec::new();
    let mut hub_ratios = Vec::new();
    for round in 1..=rounds {
        admin.batch_execute("CHECKPOINT").await.context("checkpoint")?;
        let insert = insert_baseline(url, step, 100 + round as i32).await?;
        admin.batch_execute("CHECKPOINT").await.context("checkpoint")?;
        let store = store_appends(url, step, &format!("bench.store{round}")).await?;
        admin.batch_execute("CHECKPOINT").await.context("checkpoint")?;
        let hub = hub_appends(&writer, 100 + round as u32, 1, 1, 1, step).await?;
        let (store_ratio, hub_ratio) =
            (store.events_per_sec / insert.events_per_sec, hub.events_per_sec / insert.events_per_sec);
        println!(
            "| {round} | {:.0} | {:.0} | {:.0} | {store_ratio:.2} | {hub_ratio:.2} |",
            insert.events_per_sec, store.events_per_sec, hub.events_per_sec
        );
        store_ratios.push(store_ratio);
        hub_ratios.push(hub_ratio);
    }
    println!();
    println!("predicted append groups: {} hit, {} refused", predictions("hit"), predictions("refused"));
    println!(
        "median over {rounds} rounds: store/INSERT {:.2}, hub/INSERT {:.2} (target >= 1.0)",
        median(&mut store_ratios),
        median(&mut hub_ratios)
    );
    writer.stop().await;
    Ok(())
}

/// The hub's count of predicted append groups with `outcome` (the hub's
/// metrics recorder is this process's).
fn predictions(outcome: &str) -> u64 {
    let series = format!("{}{{outcome=\"{outcome}\"}} ", omnirelay_hub::telemetry::APPEND_PREDICTIONS);
    omnirelay_hub::telemetry::prometheus()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&series).and_then(|value| value.trim().parse().ok()))
        .unwrap_or(0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.context("connect")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Baseline (a): one INSERT per transaction, one connection.
async fn insert_baseline(url: &str, step: Duration, shard_no: i32) -> anyhow::Result<Line> {
    let client = connect(url).await?;
    let statement = client
        .prepare("INSERT INTO bench_events (shard_no, sequence, epoch, recorded_at, body, hash) VALUES ($1, $2, $3, $4, $5, $6)")
        .await?;
    let body = sample_event(0).encode_to_vec();
    let hash = [7u8; 32];
    let mut sequence = 0i64;
    let mut latencies = Latencies::default();
    let warm_until = Instant::now() + WARM_UP;
    let mut started = Instant::now();
    let mut measured = 0u64;
    let mut warm = true;
    loop {
        let now = Instant::now();
        if warm && now >= warm_until {
            warm = false;
            started = now;
        }
        if !warm && now - started >= step {
            break;
        }
        sequence += 1;
        let at = SystemTime::now();
        let params: [&(dyn ToSql + Sync); 6] = [&shard_no, &sequence, &1i64, &at, &body, &hash.as_slice()];
        client.execute(&statement, &params).await?;
        if !warm {
            latencies.0.push(now.elapsed());
            measured += 1;
        }
    }
    let rate = measured as f64 / started.elapsed().as_secs_f64();
    Ok(Line {
        name: "raw INSERT, 1 row per transaction, 1 connection".into(),
        events_per_sec: rate,
        p50: latencies.percentile(0.5),
        p99: latencies.percentile(0.99),
        note: "baseline (a); latency per transaction".into(),
    })
}

/// Baseline (b): COPY of 1,000-row batches from two connections.
async fn copy_baseline(url: &str, step: Duration) -> anyhow::Result<Line> {
    let body = sample_event(0).encode_to_vec();
    let window = Window::default();
    let mut workers = Vec::new();
    for connection in 0..COPY_CONNECTIONS {
        let client = connect(url).await?;
        let (window, body) = (window.clone(), body.clone());
        workers.push(tokio::spawn(async move {
            let shard_no = 1000 + connection as i32;
            let mut sequence = 0i64;
            let mut latencies = Latencies::default();
            let types = [Type::INT4, Type::INT8, Type::INT8, Type::TIMESTAMPTZ, Type::BYTEA, Type::BYTEA];
            let hash = [7u8; 32];
            while !window.stopped() {
                let started = Instant::now();
                let sink = client
                    .copy_in("COPY bench_events (shard_no, sequence, epoch, recorded_at, body, hash) FROM STDIN BINARY")
                    .await?;
                let writer = BinaryCopyInWriter::new(sink, &types);
                futures_util::pin_mut!(writer);
                let at = SystemTime::now();
                for _ in 0..COPY_ROWS {
                    sequence += 1;
                    writer.as_mut().write(&[&shard_no, &sequence, &1i64, &at, &body, &hash.as_slice()]).await?;
                }
                writer.finish().await?;
                window.record(&mut latencies, COPY_ROWS as u64, started.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let (events_per_sec, mut latencies) = window.run(step, workers).await?;
    Ok(Line {
        name: format!("raw COPY, {COPY_ROWS}-row batches, {COPY_CONNECTIONS} connections"),
        events_per_sec,
        p50: latencies.percentile(0.5),
        p99: latencies.percentile(0.99),
        note: "baseline (b); latency per 1,000-row COPY".into(),
    })
}

/// The store alone (no gRPC): one producer, 1-event batches, sequential;
/// separates the transaction's cost from the network's.
async fn store_appends(url: &str, step: Duration, shard: &str) -> anyhow::Result<Line> {
    use omnirelay_hub::event::NewEvent;
    use omnirelay_hub::ids::{Epoch, OwnerId, ProducerId, ProducerSeq, ShardId};
    use omnirelay_hub::store::postgres::{PgStore, PgStoreConfig};
    use omnirelay_hub::store::{AppendBatch, LogStore};
    let store = PgStore::open(PgStoreConfig::new(url)).await?;
    let shard = ShardId::parse(shard)?;
    let grant = store.acquire_shard(shard.clone(), OwnerId::parse("bench")?, Duration::from_secs(600)).await?;
    let body: bytes::Bytes = sample_event(0).encode_to_vec().into();
    let mut latencies = Latencies::default();
    let mut seq = 0u64;
    let warm_until = Instant::now() + WARM_UP;
    while Instant::now() < warm_until + step {
        seq += 1;
        let started = Instant::now();
        store
            .append(AppendBatch {
                expected_first: None,
                shard: shard.clone(),
                producer: ProducerId::parse("bench")?,
                producer_seq: ProducerSeq(seq),
                epoch: Epoch(grant.lease.epoch.0),
                events: vec![NewEvent { recorded_at: SystemTime::now(), body: body.clone() }],
            })
            .await?;
        if started >= warm_until {
            latencies.0.push(started.elapsed());
        }
    }
    store.close().await?;
    let measured = latencies.0.len();
    Ok(Line {
        name: "store append (no gRPC), 1 producer, 1-event batches, sequential".into(),
        events_per_sec: measured as f64 / step.as_secs_f64(),
        p50: latencies.percentile(0.5),
        p99: latencies.percentile(0.99),
        note: "the append transaction alone".into(),
    })
}

/// An in-process hub replica.
struct TestHub {
    address: std::net::SocketAddr,
    counters: Arc<HubCounters>,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestHub {
    async fn start(url: &str) -> anyhow::Result<TestHub> {
        let hub = Hub::open(Config { retention_interval: None, ..Config::for_postgres(url)? }).await?;
        let counters = hub.counters();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(hub.serve(listener, async move {
            let _ = stopped.await;
        }));
        Ok(TestHub { address, counters, stop, served })
    }

    async fn client(&self) -> anyhow::Result<HubClient<Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(HubClient::new(channel))
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.served.await;
    }
}

async fn acquire(client: &mut HubClient<Channel>, shard: &str) -> anyhow::Result<u64> {
    let grant = client
        .acquire_shard(pb::AcquireShardRequest {
            shard_id: shard.into(),
            owner: "bench".into(),
            ttl: Some(prost_types_duration(600)),
        })
        .await?
        .into_inner();
    if !grant.granted {
        bail!("shard {shard} was not granted");
    }
    Ok(grant.lease.context("a lease")?.epoch)
}

fn prost_types_duration(seconds: i64) -> omnirelay_hub::proto::Duration {
    omnirelay_hub::proto::Duration { seconds, nanos: 0 }
}

/// Hub appends: `producers` streams, one shard each, `batch` events per
/// batch, up to `in_flight` batches awaiting their ack per stream.
async fn hub_appends(
    hub: &TestHub,
    round: u32,
    producers: usize,
    batch: usize,
    in_flight: usize,
    step: Duration,
) -> anyhow::Result<Line> {
    let window = Window::default();
    // One HTTP/2 connection per eight producers, as separate services would.
    let mut channels = Vec::new();
    for _ in 0..producers.div_ceil(8) {
        channels.push(hub.client().await?);
    }
    let mut workers = Vec::new();
    for producer in 0..producers {
        let mut client = channels[producer / 8].clone();
        let shard = format!("bench.r{round}.p{producer}");
        let epoch = acquire(&mut client, &shard).await?;
        let window = window.clone();
        let template: Vec<RawEvent> = (0..batch as u64).map(|n| RawEvent::encode(&sample_event(n))).collect();
        workers.push(tokio::spawn(async move {
            let (requests, outbound) = mpsc::channel(in_flight);
            let mut responses =
                client.append(tokio_stream::wrappers::ReceiverStream::new(outbound)).await?.into_inner();
            let mut sent_at = std::collections::VecDeque::new();
            let mut latencies = Latencies::default();
            let mut producer_seq = 0u64;
            let mut outstanding = 0usize;
            loop {
                while outstanding < in_flight && !window.stopped() {
                    producer_seq += 1;
                    let request = pb::AppendRequest {
                        expected_first_sequence: 0,
                        batch_id: producer_seq,
                        shard_id: shard.clone(),
                        producer_id: "bench".into(),
                        producer_seq,
                        epoch,
                        events: template.clone(),
                    };
                    requests.send(request).await.context("send a batch")?;
                    sent_at.push_back(Instant::now());
                    outstanding += 1;
                }
                if outstanding == 0 {
                    break;
                }
                let response = responses.message().await?.context("the append stream ended")?;
                outstanding -= 1;
                let sent = sent_at.pop_front().context("an answer without a request")?;
                match response.result {
                    Some(pb::append_response::Result::Ack(_)) => {
                        window.record(&mut latencies, batch as u64, sent.elapsed());
                    }
                    other => bail!("append failed: {other:?}"),
                }
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let (events_per_sec, mut latencies) = window.run(step, workers).await?;
    Ok(Line {
        name: format!("hub append, {producers} producer(s), {batch}-event batches, {in_flight} in flight each"),
        events_per_sec,
        p50: latencies.percentile(0.5),
        p99: latencies.percentile(0.99),
        note: "latency per batch, send to durable ack".into(),
    })
}

/// Fan-out: `subscribers` on the reader replica follow one shard while 8
/// producers append through the writer replica (which announces commits by
/// NOTIFY); reports PostgreSQL event reads per delivered event.
async fn fan_out(
    writer: &TestHub,
    reader: &TestHub,
    round: u32,
    subscribers: usize,
    step: Duration,
) -> anyhow::Result<Line> {
    let shard = format!("bench.fanout.r{round}");
    let mut client = writer.client().await?;
    let epoch = acquire(&mut client, &shard).await?;
    let at_start = reader.counters.snapshot();
    let mut streams = Vec::new();
    for i in 0..subscribers {
        let mut client = reader.client().await?;
        let mut frames = client
            .subscribe(pb::SubscribeRequest {
                subscriber_id: format!("bench-{round}-{i}"),
                shard_ids: vec![shard.clone()],
                start: Some(pb::StartPosition { position: Some(pb::start_position::Position::Latest(true)) }),
                ..Default::default()
            })
            .await?
            .into_inner();
        // Each subscriber checks it sees every event once, in order.
        streams.push(tokio::spawn(async move {
            let mut last = 0u64;
            while let Some(frame) = frames.next().await {
                if let Some(pb::subscribe_response::Frame::Events(batch)) = frame?.frame {
                    for event in batch.events {
                        let event = event.decode()?;
                        if event.sequence != last + 1 {
                            bail!("subscriber saw {} after {last}", event.sequence);
                        }
                        last = event.sequence;
                    }
                }
            }
            Ok::<_, anyhow::Error>(last)
        }));
    }
    // Every subscriber makes one (empty) catch-up read before it follows the
    // live tail; measure from when they all have.
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.counters.snapshot().catch_up_reads - at_start.catch_up_reads < subscribers as u64 {
        if Instant::now() > deadline {
            bail!("subscribers did not start within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = reader.counters.snapshot();
    // The shard's owner appends 10-event batches with 8 in flight.
    let (requests, outbound) = mpsc::channel(64);
    let mut responses = client.append(tokio_stream::wrappers::ReceiverStream::new(outbound)).await?.into_inner();
    let template: Vec<RawEvent> = (0..10).map(|n| RawEvent::encode(&sample_event(n))).collect();
    let started = Instant::now();
    let mut producer_seq = 0u64;
    let mut outstanding = 0;
    let mut appended = 0u64;
    while started.elapsed() < step || outstanding > 0 {
        while outstanding < 8 && started.elapsed() < step {
            producer_seq += 1;
            requests
                .send(pb::AppendRequest {
                    expected_first_sequence: 0,
                    batch_id: producer_seq,
                    shard_id: shard.clone(),
                    producer_id: "bench".into(),
                    producer_seq,
                    epoch,
                    events: template.clone(),
                })
                .await?;
            outstanding += 1;
        }
        let response = responses.message().await?.context("the append stream ended")?;
        outstanding -= 1;
        match response.result {
            Some(pb::append_response::Result::Ack(ack)) => appended = ack.last_sequence,
            other => bail!("append failed: {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    // Wait until every subscriber received everything.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let after = reader.counters.snapshot();
        if after.events_delivered - before.events_delivered >= appended * subscribers as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("subscribers did not receive every event within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = reader.counters.snapshot();
    for stream in streams {
        if stream.is_finished() {
            stream.await??;
            bail!("a subscription ended early");
        }
        stream.abort();
    }
    let tail_reads = after.tail_reads - before.tail_reads;
    let catch_up_reads = after.catch_up_reads - before.catch_up_reads;
    let reads = tail_reads + catch_up_reads;
    let delivered = after.events_delivered - before.events_delivered;
    Ok(Line {
        name: format!("fan-out to {subscribers} subscriber(s) on another replica"),
        events_per_sec: delivered as f64 / elapsed.as_secs_f64(),
        p50: Duration::ZERO,
        p99: Duration::ZERO,
        note: format!(
            "{appended} events appended, {delivered} delivered; PostgreSQL event reads: {tail_reads} by the shared tail + \
             {catch_up_reads} by lagging subscribers = {:.4} per appended event, {:.5} per delivered event",
            reads as f64 / appended.max(1) as f64,
            reads as f64 / delivered.max(1) as f64,
        ),
    })
}
