//! Sinks end to end: in-process hub replicas on the harness's PostgreSQL, a
//! lease queue writing through the hub replicator, and the subscriber
//! runtime feeding the NDJSON and PostgreSQL projection sinks. Each test
//! checks what the sink holds against the log or the queue, event by event.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use omnirelay_client::queue::{Caller, EnqueueRequest, FailAction, FailRequest, LeaseRequest, Payload};
use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig};
use omnirelay_client::sink::projection::ProjectionSink;
use omnirelay_client::sink::{
    FsyncPolicy, NdjsonConfig, NdjsonSink, ReplicationSink, Selection, SinkBatch, SinkError, SinkEvent, Subscriber,
    SubscriberConfig, SubscriberProgress,
};
use omnirelay_client::{Queue, QueueConfig, Replicator, Sequence, ShardId};
use omnirelay_proto::Message as _;
use omnirelay_proto::hub::v1 as pb;
use omnirelay_proto::replication::v1 as rpb;
use omnirelay_tests::{TestDb, eventually};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Bound on waiting for deliveries (a hang guard, not a performance claim).
const HANG_GUARD: Duration = Duration::from_secs(60);

/// A fresh database with the hub schema.
async fn migrated_db() -> TestDb {
    let key = format!("hub_{}", omnirelay_hub::schema::fingerprint());
    TestDb::from_template(&key, |url| async move {
        omnirelay_hub::store::postgres::migrate(&url).await?;
        Ok(())
    })
    .await
}

/// An in-process hub replica on 127.0.0.1:0.
struct TestHub {
    address: SocketAddr,
    store: Arc<dyn omnirelay_hub::store::LogStore>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestHub {
    async fn start(url: &str) -> TestHub {
        let config = omnirelay_hub::Config {
            retention_interval: None,
            ..omnirelay_hub::Config::for_postgres(url).expect("harness URLs are valid")
        };
        let hub = omnirelay_hub::Hub::open(config).await.expect("the hub should open");
        let store = hub.store();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let address = listener.local_addr().expect("bound address");
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(hub.serve(listener, async move {
            let _ = stopped.await;
        }));
        TestHub { address, store, stop: Some(stop), served: Some(served) }
    }

    fn endpoint(&self) -> HubEndpoint {
        HubEndpoint::new(format!("http://{}", self.address))
    }

    async fn client(&self) -> pb::hub_client::HubClient<tonic::transport::Channel> {
        pb::hub_client::HubClient::connect(format!("http://{}", self.address)).await.expect("connect to the hub")
    }

    /// Shuts the replica down (its subscriptions end with UNAVAILABLE).
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            let _ = tokio::time::timeout(HANG_GUARD, served).await.expect("the hub should stop");
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(served) = self.served.take() {
            served.abort();
        }
    }
}

/// A queue owning `shard` through the hub at `hub`.
async fn queue(hub: &TestHub, shard: &str) -> (Queue, Arc<HubReplicator>) {
    let replicator =
        Arc::new(HubReplicator::new(HubReplicatorConfig::new([hub.endpoint()])).expect("valid replicator config"));
    let shard = ShardId::from(shard);
    let grant = replicator.acquire_shard(&shard, "node-a", Duration::from_secs(60)).await.expect("acquire the shard");
    assert!(grant.granted);
    let queue = Queue::builder(QueueConfig::new(shard, "node-a"), replicator.clone())
        .epoch(grant.epoch)
        .build()
        .expect("valid queue config");
    (queue, replicator)
}

fn producer() -> Caller {
    Caller::new("spiffe://test/producer", "node-a")
}

async fn enqueue(queue: &Queue, from: usize, count: usize) {
    for n in from..from + count {
        let payload = Payload::new("user", n.to_string(), format!("body {n}")).with_request_id(format!("req-{n}"));
        queue.enqueue(&producer(), EnqueueRequest::new(payload)).await.expect("enqueue");
    }
}

/// Fast pacing for tests: small checkpoint batches, quick progress frames
/// and retries.
pub(crate) fn config(id: &str, endpoints: Vec<HubEndpoint>, selection: Selection) -> SubscriberConfig {
    let mut config = SubscriberConfig::new(id, endpoints, selection);
    config.checkpoint_events = 10;
    config.checkpoint_interval = Duration::from_millis(100);
    config.progress_interval = Duration::from_millis(200);
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config
}

/// A running subscriber.
struct Running<S> {
    progress: watch::Receiver<SubscriberProgress>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<S, SinkError>>,
}

fn spawn<S: ReplicationSink>(config: SubscriberConfig, sink: S) -> Running<S> {
    let subscriber = Subscriber::new(config, sink).expect("valid subscriber config");
    let progress = subscriber.progress();
    let stop = CancellationToken::new();
    let task = tokio::spawn(subscriber.run(stop.clone()));
    Running { progress, stop, task }
}

impl<S> Running<S> {
    /// Waits until the sink applied `shard` up to `sequence`.
    async fn reaches(&self, shard: &str, sequence: u64) {
        let progress = self.progress.clone();
        eventually(&format!("the sink applies {shard} up to {sequence}"), HANG_GUARD, || {
            let position = progress.borrow().shards.get(shard).map_or(0, |s| s.position);
            async move { if position >= sequence { Ok(()) } else { Err(format!("at {position}")) } }
        })
        .await;
    }

    /// Stops the subscriber and returns what its run returned.
    async fn stop(self) -> Result<S, SinkError> {
        self.stop.cancel();
        tokio::time::timeout(HANG_GUARD, self.task).await.expect("the subscriber should stop").expect("no panic")
    }
}

/// Every line of the NDJSON files in `dir`, files in name order.
fn lines(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir).expect("list").map(|e| e.expect("entry").path()).collect();
    files.sort();
    files
        .iter()
        .flat_map(|file| {
            std::fs::read_to_string(file)
                .expect("read")
                .lines()
                .map(|line| serde_json::from_str::<Value>(line).expect("each line is JSON"))
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn hub_checkpoint(hub: &TestHub, subscriber: &str, shard: &str) -> Option<pb::Checkpoint> {
    let response = hub
        .client()
        .await
        .get_checkpoints(pb::GetCheckpointsRequest {
            subscriber_id: subscriber.into(),
            shard_ids: vec![shard.into()],
            ..Default::default()
        })
        .await
        .expect("read checkpoints")
        .into_inner();
    response.checkpoints.into_iter().next()
}

#[tokio::test]
async fn ndjson_sink_gets_every_event_once_in_order_across_a_hub_failover() {
    let db = migrated_db().await;
    let (hub_a, hub_b) = (TestHub::start(db.url()).await, TestHub::start(db.url()).await);
    let shard = "resourcelease.sink-failover";
    let (queue, _replicator) = queue(&hub_b, shard).await;
    enqueue(&queue, 0, 40).await;

    let dir = tempfile::tempdir().expect("temporary directory");
    let mut files = NdjsonConfig::new(dir.path());
    files.rotate_bytes = 8 * 1024; // several files
    files.fsync = FsyncPolicy::EveryBatch;
    let sink = NdjsonSink::open(files).await.expect("open the files");
    let running =
        spawn(config("audit", vec![hub_a.endpoint(), hub_b.endpoint()], Selection::Shards(vec![shard.into()])), sink);
    running.reaches(shard, 40).await;

    // The replica serving the stream goes away; the runtime moves to the
    // other one and resumes where the sink is.
    hub_a.stop().await;
    enqueue(&queue, 40, 40).await;
    running.reaches(shard, 80).await;
    assert!(running.progress.borrow().reconnects >= 1, "the stream was reopened");
    running.stop().await.expect("a clean stop");

    let lines = lines(dir.path());
    let sequences: Vec<u64> = lines.iter().map(|l| l["sequence"].as_u64().expect("sequence")).collect();
    assert_eq!(sequences, (1..=80).collect::<Vec<_>>(), "each event once, in order");
    assert_eq!(lines[0]["key"], format!("{shard}/1"));
    assert_eq!(lines[0]["type"], "enqueued");
    assert!(std::fs::read_dir(dir.path()).expect("list").count() > 1, "the files were rotated");

    // The stop committed the last position, with the hash of its event.
    let checkpoint = hub_checkpoint(&hub_b, "audit", shard).await.expect("a checkpoint");
    assert_eq!(checkpoint.sequence, 80);
    assert_eq!(omnirelay_client::sink::json::hex(&checkpoint.hash), lines[79]["hash"].as_str().expect("hash"));
}

#[tokio::test]
async fn a_restarted_ndjson_sink_resumes_after_its_checkpoint() {
    let db = migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.sink-resume";
    let (queue, _replicator) = queue(&hub, shard).await;
    enqueue(&queue, 0, 15).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let selection = Selection::Shards(vec![shard.into()]);

    let running = spawn(
        config("resume", vec![hub.endpoint()], selection.clone()),
        NdjsonSink::open(NdjsonConfig::new(dir.path())).await.expect("open"),
    );
    running.reaches(shard, 15).await;
    running.stop().await.expect("a clean stop");

    enqueue(&queue, 15, 5).await;
    let running = spawn(
        config("resume", vec![hub.endpoint()], selection),
        NdjsonSink::open(NdjsonConfig::new(dir.path())).await.expect("reopen"),
    );
    running.reaches(shard, 20).await;
    running.stop().await.expect("a clean stop");
    let sequences: Vec<u64> = lines(dir.path()).iter().map(|l| l["sequence"].as_u64().expect("sequence")).collect();
    assert_eq!(sequences, (1..=20).collect::<Vec<_>>(), "the second run appended only what followed");
}

#[tokio::test]
async fn a_corrupted_event_stops_the_sink_after_the_events_before_it() {
    let db = migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.sink-corrupt";
    let (queue, _replicator) = queue(&hub, shard).await;
    enqueue(&queue, 0, 10).await;
    // Someone edits event 6 in the database.
    let client = db.client().await;
    let edited = client
        .execute(
            "UPDATE events SET body = body || '\\x00'::bytea \
             WHERE sequence = 6 AND shard_no = (SELECT shard_no FROM shards WHERE shard_id = $1)",
            &[&shard],
        )
        .await
        .expect("edit the event");
    assert_eq!(edited, 1);

    let dir = tempfile::tempdir().expect("temporary directory");
    let sink = NdjsonSink::open(NdjsonConfig::new(dir.path())).await.expect("open");
    let subscriber =
        Subscriber::new(config("corrupt", vec![hub.endpoint()], Selection::Shards(vec![shard.into()])), sink)
            .expect("valid config");
    let ended = tokio::time::timeout(HANG_GUARD, subscriber.run(CancellationToken::new()))
        .await
        .expect("the runtime stops by itself");
    let err = ended.expect_err("corruption stops the sink");
    assert!(matches!(err, SinkError::Corrupt { .. }), "{err}");
    let sequences: Vec<u64> = lines(dir.path()).iter().map(|l| l["sequence"].as_u64().expect("sequence")).collect();
    assert_eq!(sequences, [1, 2, 3, 4, 5], "the valid events before it, nothing after");
    let checkpoint = hub_checkpoint(&hub, "corrupt", shard).await.expect("a checkpoint");
    assert_eq!(checkpoint.sequence, 5, "checkpointed up to the last valid event");
}

/// The projection's rows, by item id: (state, attempt).
async fn projection_rows(db: &TestDb, projection: &str, shard: &str) -> BTreeMap<String, (String, i32)> {
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT item_id, state, attempt FROM omnirelay_projection_items WHERE projection = $1 AND shard = $2",
            &[&projection, &shard],
        )
        .await
        .expect("read the projection");
    rows.into_iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect()
}

/// The queue's items as the projection should show them.
async fn queue_rows(queue: &Queue) -> BTreeMap<String, (String, i32)> {
    let state = omnirelay_proto::replication::v1::QueueState::decode(queue.encode_state().await.as_slice())
        .expect("the queue state decodes");
    let mut rows = BTreeMap::new();
    for item in state.items.iter().filter_map(|q| q.item.as_ref()) {
        let status = if item.lease.is_some() { "leased" } else { "pending" };
        rows.insert(item.item_id.clone(), (status.to_string(), item.attempt as i32));
    }
    for item in state.dead_letters.iter().filter_map(|d| d.dead_letter.as_ref()?.item.as_ref()) {
        rows.insert(item.item_id.clone(), ("dead_lettered".to_string(), item.attempt as i32));
    }
    rows
}

/// Enqueues, leases, completes and fails: every kind of row change.
async fn busy_queue(queue: &Queue, from: usize) {
    enqueue(queue, from, 12).await;
    let worker = Caller::new("spiffe://test/worker", "worker-1");
    for n in 0..6 {
        let leased = queue.lease(&worker, LeaseRequest::new("worker-1")).await.expect("lease").expect("an item");
        match n % 3 {
            0 => {
                queue.complete(&worker, &leased.handle).await.expect("complete");
            }
            1 => {
                let dead = FailRequest { error: "broken".into(), action: FailAction::DeadLetter, ..Default::default() };
                queue.fail(&worker, &leased.handle, dead).await.expect("fail");
            }
            _ => {} // stays leased
        }
    }
}

#[tokio::test]
async fn the_projection_matches_the_queue_exactly_once_across_restarts_and_rebuilds() {
    let db = migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.sink-projection";
    let (queue, _replicator) = queue(&hub, shard).await;
    busy_queue(&queue, 0).await;
    let selection = Selection::Shards(vec![shard.into()]);
    let pool = ProjectionSink::pool(db.url(), 4, Duration::from_secs(5)).expect("pool");

    let sink = ProjectionSink::open(pool.clone(), "current").await.expect("open the projection");
    let running = spawn(config("projection", vec![hub.endpoint()], selection.clone()), sink);
    let head = queue.replication().durable.get();
    running.reaches(shard, head).await;
    running.stop().await.expect("a clean stop");
    assert_eq!(projection_rows(&db, "current", shard).await, queue_rows(&queue).await);

    // A second subscriber id has no hub checkpoint: the hub sends the log
    // from the start, and the projection applies none of it twice.
    busy_queue(&queue, 100).await;
    let sink = ProjectionSink::open(pool.clone(), "current").await.expect("open the projection");
    let running = spawn(config("projection-2", vec![hub.endpoint()], selection.clone()), sink);
    let head = queue.replication().durable.get();
    running.reaches(shard, head).await;
    running.stop().await.expect("a clean stop");
    assert_eq!(projection_rows(&db, "current", shard).await, queue_rows(&queue).await);

    // The projection's tables are lost while the hub checkpoint stays: the
    // runtime sees the sink behind the hub and replays the whole log.
    db.client()
        .await
        .batch_execute("TRUNCATE omnirelay_projection_items, omnirelay_projection_checkpoints")
        .await
        .expect("truncate");
    let sink = ProjectionSink::open(pool.clone(), "current").await.expect("open the projection");
    let running = spawn(config("projection", vec![hub.endpoint()], selection), sink);
    running.reaches(shard, head).await;
    running.stop().await.expect("a clean stop");
    assert_eq!(projection_rows(&db, "current", shard).await, queue_rows(&queue).await);
}

/// An event of `shard` as a sink receives it (the hash stands in: sinks
/// called directly do not check the chain).
fn sink_event(shard: &ShardId, sequence: u64, kind: rpb::replication_event::Event) -> SinkEvent {
    SinkEvent {
        shard: shard.clone(),
        sequence: Sequence::new(sequence),
        hash: Bytes::from(vec![sequence as u8; 32]),
        raw: Bytes::new(),
        event: rpb::ReplicationEvent { shard_id: shard.to_string(), sequence, event: Some(kind), ..Default::default() },
    }
}

/// An item `id` of resource user/`id` at `attempt`.
fn work_item(id: &str, attempt: u32) -> omnirelay_proto::resourcelease::v1::WorkItem {
    omnirelay_proto::resourcelease::v1::WorkItem {
        item_id: id.into(),
        attempt,
        payload: Some(omnirelay_proto::resourcelease::v1::ItemPayload {
            resource_type: "user".into(),
            resource_id: id.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_projection_applies_a_batch_handed_over_twice_once() {
    let db = migrated_db().await;
    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let mut sink = ProjectionSink::open(pool, "twice").await.expect("open");
    let shard = ShardId::from("resourcelease.twice");
    let event = |sequence, kind| sink_event(&shard, sequence, kind);
    let item = |id: &str| work_item(id, 0);
    use rpb::replication_event::Event as Kind;
    let first = SinkBatch {
        shard: shard.clone(),
        events: vec![
            event(1, Kind::Enqueued(rpb::Enqueued { item: Some(item("a")) })),
            event(2, Kind::Enqueued(rpb::Enqueued { item: Some(item("b")) })),
        ]
        .into(),
    };
    let second = SinkBatch {
        shard: shard.clone(),
        events: vec![
            event(2, Kind::Enqueued(rpb::Enqueued { item: Some(item("b")) })),
            event(3, Kind::Completed(rpb::Completed { item_id: "a".into(), fencing_token: 1 })),
            event(4, Kind::Enqueued(rpb::Enqueued { item: Some(item("a")) })),
        ]
        .into(),
    };
    sink.deliver(&first).await.expect("first");
    sink.deliver(&second).await.expect("second");
    // Both again, as after a commit whose outcome was unknown: the item
    // completed at 3 and enqueued again at 4 must not be completed again.
    sink.deliver(&first).await.expect("first again");
    sink.deliver(&second).await.expect("second again");
    sink.flush().await.expect("flush");
    let rows = db
        .client()
        .await
        .query("SELECT item_id, updated_sequence FROM omnirelay_projection_items ORDER BY item_id", &[])
        .await
        .expect("rows");
    let rows: Vec<(String, i64)> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, [("a".to_string(), 4), ("b".to_string(), 2)]);
    let checkpoints = sink.checkpoints().await.expect("checkpoints");
    assert_eq!(checkpoints.len(), 1);
    assert_eq!((checkpoints[0].sequence, checkpoints[0].hash.as_deref()), (Sequence::new(4), Some(&[4u8; 32][..])));
}

#[tokio::test]
async fn a_projection_whose_position_was_trimmed_starts_from_the_snapshot() {
    let db = migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.sink-snapshot";
    let (queue, replicator) = queue(&hub, shard).await;
    busy_queue(&queue, 0).await;
    queue.settled().await.expect("settled");
    let at = queue.replication().durable;
    let epoch = queue.replication().epoch;
    replicator
        .put_snapshot(&ShardId::from(shard), at, epoch, Bytes::from(queue.encode_state().await))
        .await
        .expect("store a snapshot");
    let outcome = hub
        .store
        .apply_retention(
            omnirelay_hub::ids::ShardId::parse(shard).expect("valid"),
            omnirelay_hub::store::RetentionPolicy { checkpoint_max_age: Duration::ZERO },
        )
        .await
        .expect("retention");
    assert!(outcome.low.0 > 1, "events were trimmed");
    busy_queue(&queue, 100).await;

    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let sink = ProjectionSink::open(pool, "from-snapshot").await.expect("open");
    let running = spawn(
        config("from-snapshot", vec![hub.endpoint()], Selection::Pattern("resourcelease.sink-snap*".into())),
        sink,
    );
    let head = queue.replication().durable.get();
    running.reaches(shard, head).await;
    running.stop().await.expect("a clean stop");
    assert_eq!(projection_rows(&db, "from-snapshot", shard).await, queue_rows(&queue).await);
}

/// A receiver of webhooks on loopback: answers the n-th request (from 1)
/// with `status(n)` and keeps every request's body with its answer.
async fn webhook_receiver(
    status: impl Fn(usize) -> u16 + Send + Sync + 'static,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<(u16, Value)>>>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let status = Arc::new(status);
    let log = received.clone();
    tokio::spawn(async move {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        while let Ok((stream, _)) = listener.accept().await {
            let (log, status, count) = (log.clone(), status.clone(), count.clone());
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().expect("a length");
                        }
                    }
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.expect("the body");
                    let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let code = status(n);
                    log.lock().expect("log").push((code, serde_json::from_slice(&body).expect("a JSON body")));
                    let answer = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
                    if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (address, received)
}

#[tokio::test]
async fn the_webhook_retries_dead_letters_refusals_and_loses_nothing() {
    use omnirelay_client::sink::webhook::{WebhookConfig, WebhookSink};
    let db = migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.sink-webhook";
    let (queue, _replicator) = queue(&hub, shard).await;
    // The first POST fails (retried), the second is refused (dead-lettered).
    let (address, received) = webhook_receiver(|n| match n {
        1 => 503,
        2 => 422,
        _ => 200,
    })
    .await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut webhook = WebhookConfig::new(format!("http://{address}/events"), dir.path().join("dead.ndjson"));
    webhook.backoff_min = Duration::from_millis(10);
    let sink = WebhookSink::new(webhook).expect("valid webhook config");
    let running = spawn(config("webhook", vec![hub.endpoint()], Selection::Shards(vec![shard.into()])), sink);
    for n in 0..10 {
        enqueue(&queue, n, 1).await;
    }
    running.reaches(shard, 10).await;
    running.stop().await.expect("a clean stop");

    let received = received.lock().expect("log").clone();
    assert_eq!(received[0].0, 503);
    assert_eq!(received[0].1, received[1].1, "the failed POST was sent again");
    let sequences = |events: &Value| -> Vec<u64> {
        events.as_array().expect("events").iter().map(|e| e["sequence"].as_u64().expect("sequence")).collect()
    };
    let dead: Vec<Value> = std::fs::read_to_string(dir.path().join("dead.ndjson"))
        .expect("a dead-letter file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["status"], 422);
    let mut all = sequences(&dead[0]["events"]);
    for (code, body) in &received {
        if *code == 200 {
            all.extend(sequences(&body["events"]));
        }
    }
    assert_eq!(all, (1..=10).collect::<Vec<_>>(), "every event delivered or dead-lettered, once, in order");
}

#[tokio::test]
async fn omnirelay_tail_and_sink_run_as_processes() {
    use tokio::io::AsyncBufReadExt as _;
    let binaries = tokio::task::spawn_blocking(omnirelay_tests::WorkspaceBinaries::build)
        .await
        .expect("no panic")
        .expect("build the binaries");
    let db = migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.sink-cli";
    let (queue, _replicator) = queue(&hub, shard).await;
    enqueue(&queue, 0, 10).await;
    let url = hub.endpoint().url;
    let command = |args: &[&str]| {
        let mut command = tokio::process::Command::new(&binaries.omnirelay);
        command.args(args).kill_on_drop(true).stdout(std::process::Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("OMNIRELAY_") {
                command.env_remove(name);
            }
        }
        command
    };

    // `tail` from the start prints each event as one JSON line.
    let mut tail =
        command(&["tail", shard, "--hub", &url, "--after", "0", "--output", "json"]).spawn().expect("start tail");
    let mut out = tokio::io::BufReader::new(tail.stdout.take().expect("stdout")).lines();
    let mut sequences = Vec::new();
    while sequences.len() < 10 {
        let line = tokio::time::timeout(HANG_GUARD, out.next_line()).await.expect("a line in time").expect("read");
        let line: Value = serde_json::from_str(&line.expect("tail keeps running")).expect("a JSON line");
        assert_eq!(line["shard"], shard);
        sequences.push(line["sequence"].as_u64().expect("sequence"));
    }
    assert_eq!(sequences, (1..=10).collect::<Vec<_>>());
    tail.kill().await.expect("stop tail");

    // `sink ndjson` writes the files, and commits its checkpoint on SIGTERM.
    let dir = tempfile::tempdir().expect("temporary directory");
    let dir_arg = dir.path().to_str().expect("UTF-8 path").to_string();
    let mut sink = command(&[
        "sink",
        "ndjson",
        "--hub",
        &url,
        "--subscriber",
        "cli-sink",
        "--shard",
        shard,
        "--dir",
        &dir_arg,
        "--checkpoint-ms",
        "100",
    ])
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("start the sink");
    let mut errors = tokio::io::BufReader::new(sink.stderr.take().expect("stderr")).lines();
    let log = tokio::spawn(async move {
        let mut log = String::new();
        while let Ok(Some(line)) = errors.next_line().await {
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let path = dir.path().to_path_buf();
    eventually("the sink writes ten lines", HANG_GUARD, || {
        let count = if path.exists() { lines(&path).len() } else { 0 };
        async move { if count == 10 { Ok(()) } else { Err(format!("{count} lines")) } }
    })
    .await;
    let pid = sink.id().expect("a running sink").to_string();
    let killed = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(HANG_GUARD, sink.wait()).await.expect("the sink stops").expect("wait");
    let log = log.await.expect("the log task");
    assert!(status.success(), "a clean stop: {status}\n{log}");
    assert!(log.contains("delivered 10"), "progress is shown:\n{log}");
    let checkpoint = hub_checkpoint(&hub, "cli-sink", shard).await.expect("a checkpoint");
    assert_eq!(checkpoint.sequence, 10);
}

#[tokio::test]
async fn the_lineage_records_who_did_what_to_each_resource_once() {
    use omnirelay_client::sink::projection::lineage::LineageSink;
    let db = migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.sink-lineage";
    let (queue, _replicator) = queue(&hub, shard).await;
    busy_queue(&queue, 0).await;
    let head = queue.replication().durable.get();
    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let selection = Selection::Shards(vec![shard.into()]);
    for subscriber in ["lineage", "lineage-again"] {
        // The second subscriber id has no hub checkpoint: the whole log is
        // sent again, and the lineage adds nothing twice.
        let sink = LineageSink::open(pool.clone(), "audit").await.expect("open the lineage");
        let running = spawn(config(subscriber, vec![hub.endpoint()], selection.clone()), sink);
        running.reaches(shard, head).await;
        running.stop().await.expect("a clean stop");
    }
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT kind, principal, owner FROM omnirelay_lineage \
             WHERE lineage = 'audit' AND resource_type = 'user' AND resource_id = '0' ORDER BY sequence, ordinal",
            &[],
        )
        .await
        .expect("query the lineage");
    let rows: Vec<(String, String, Option<String>)> =
        rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        rows,
        [
            ("enqueued".to_string(), "spiffe://test/producer".to_string(), None),
            ("leased".to_string(), "spiffe://test/worker".to_string(), Some("worker-1".to_string())),
            ("completed".to_string(), "spiffe://test/worker".to_string(), None),
        ]
    );
    let total: i64 = client
        .query_one("SELECT count(DISTINCT sequence) FROM omnirelay_lineage WHERE lineage = 'audit'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(total as u64, head, "one event, one set of rows");
}

/// A throwaway CA and a server certificate for 127.0.0.1 and localhost:
/// (CA PEM, server certificate PEM, server key PEM).
fn server_pki(name: &str) -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, name);
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("CA key")).expect("CA");
    let mut server = rcgen::CertificateParams::default();
    server.subject_alt_names = vec![
        rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
        rcgen::SanType::DnsName("localhost".try_into().expect("DNS name")),
    ];
    let key = rcgen::KeyPair::generate().expect("server key");
    let cert = server.signed_by(&key, &ca).expect("signing");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn the_postgres_sink_connects_over_tls_verifying_the_server() {
    let binaries = tokio::task::spawn_blocking(omnirelay_tests::WorkspaceBinaries::build)
        .await
        .expect("no panic")
        .expect("build the binaries");
    let (ca_pem, cert_pem, key_pem) = server_pki("projection db ca");
    let tls = omnirelay_tests::PgServerTls { cert_pem, key_pem };
    let projection_db = tokio::task::spawn_blocking(move || {
        omnirelay_tests::PgCluster::start_with_tls(omnirelay_tests::PgOptions::default(), &tls)
    })
    .await
    .expect("no panic")
    .expect("PostgreSQL with TLS");
    let dir = tempfile::tempdir().expect("temporary directory");
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write a PEM file");
        path.to_str().expect("UTF-8 path").to_string()
    };
    let ca_file = write("ca.pem", &ca_pem);
    let other_ca_file = write("other-ca.pem", &server_pki("another ca").0);

    let db = migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.sink-tls";
    let (queue, _replicator) = queue(&hub, shard).await;
    enqueue(&queue, 0, 10).await;
    let hub_url = hub.endpoint().url;
    let database_url = projection_db.url("postgres");
    let sink = |tls: &[&str]| {
        let mut command = tokio::process::Command::new(&binaries.omnirelay);
        command
            .args(["sink", "postgres", "--hub", &hub_url, "--subscriber", "tls-sink", "--shard", shard])
            .args(["--database-url", &database_url, "--checkpoint-ms", "100"])
            .args(tls)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("OMNIRELAY_") {
                command.env_remove(name);
            }
        }
        command
    };
    let plain = {
        let (client, connection) =
            tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await.expect("connect without TLS");
        tokio::spawn(connection);
        client
    };
    let projection_exists = || async {
        plain
            .query_one("SELECT to_regclass('omnirelay_projection_items') IS NOT NULL", &[])
            .await
            .expect("look up the table")
            .get::<_, bool>(0)
    };

    // A CA file with another mode, and verify-full without one, are refused
    // before anything is touched, naming the flag.
    for (flags, named) in [
        (vec!["--database-tls", "require", "--database-ca-file", ca_file.as_str()], "--database-ca-file"),
        (vec!["--database-tls", "verify-full"], "--database-ca-file"),
    ] {
        let out = tokio::time::timeout(HANG_GUARD, sink(&flags).output()).await.expect("exits").expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(named), "{flags:?}: {}\n{stderr}", out.status);
    }
    // A server whose certificate another CA signed is refused.
    let out = tokio::time::timeout(
        HANG_GUARD,
        sink(&["--database-tls", "verify-full", "--database-ca-file", &other_ca_file]).output(),
    )
    .await
    .expect("exits")
    .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("open the projection"), "{}\n{stderr}", out.status);
    assert!(!projection_exists().await, "a refused server was not written to");

    // verify-full with the right CA: the projection fills, over TLS only.
    let mut running =
        sink(&["--database-tls", "verify-full", "--database-ca-file", &ca_file]).spawn().expect("start the sink");
    eventually("the projection holds the ten items", HANG_GUARD, || async {
        if !projection_exists().await {
            return Err("no table yet".to_string());
        }
        let count: i64 = plain
            .query_one("SELECT count(*) FROM omnirelay_projection_items WHERE shard = $1", &[&shard])
            .await
            .map_err(|err| err.to_string())?
            .get(0);
        if count == 10 { Ok(()) } else { Err(format!("{count} rows")) }
    })
    .await;
    let sessions: Vec<bool> = plain
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'omnirelay-sink'",
            &[],
        )
        .await
        .expect("read the sessions")
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!sessions.is_empty() && sessions.iter().all(|ssl| *ssl), "the sink's sessions: {sessions:?}");
    let pid = running.id().expect("a running sink").to_string();
    let killed = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(HANG_GUARD, running.wait()).await.expect("the sink stops").expect("wait");
    assert!(status.success(), "a clean stop: {status}");
    let checkpoint = hub_checkpoint(&hub, "tls-sink", shard).await.expect("a checkpoint");
    assert_eq!(checkpoint.sequence, 10);
}

#[tokio::test]
async fn the_projection_writes_an_item_twice_in_one_frame_in_order() {
    let db = migrated_db().await;
    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let mut sink = ProjectionSink::open(pool, "twice-in-a-frame").await.expect("open");
    let shard = ShardId::from("resourcelease.twice-in-a-frame");
    let event = |sequence, kind| sink_event(&shard, sequence, kind);
    let item = work_item;
    use rpb::replication_event::Event as Kind;
    // Whole-item writes only, so one run, with "a" twice: the later write
    // must win, and the statement must not write one row twice.
    let frame = SinkBatch {
        shard: shard.clone(),
        events: vec![
            event(1, Kind::Enqueued(rpb::Enqueued { item: Some(item("a", 0)) })),
            event(2, Kind::Enqueued(rpb::Enqueued { item: Some(item("b", 0)) })),
            event(3, Kind::Restored(rpb::Restored { items: vec![item("a", 3), item("c", 1)], ..Default::default() })),
        ]
        .into(),
    };
    sink.deliver(&frame).await.expect("a frame writing one item twice");
    sink.flush().await.expect("flush");
    let rows = db
        .client()
        .await
        .query("SELECT item_id, attempt, updated_sequence FROM omnirelay_projection_items ORDER BY item_id", &[])
        .await
        .expect("rows");
    let rows: Vec<(String, i32, i64)> = rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(rows, [("a".to_string(), 3, 3), ("b".to_string(), 0, 2), ("c".to_string(), 1, 3)]);
}

#[tokio::test]
async fn large_runs_are_copied_and_an_item_already_there_falls_back_to_the_upsert() {
    let db = migrated_db().await;
    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let mut sink = ProjectionSink::open(pool, "copied").await.expect("open");
    let shard = ShardId::from("resourcelease.copied");
    let event = |sequence, kind| sink_event(&shard, sequence, kind);
    use rpb::replication_event::Event as Kind;
    let run = omnirelay_client::sink::defaults::PROJECTION_COPY_MIN_ROWS as u64 + 10;
    let with_payload = |id: String, attempt: u32| {
        let mut item = work_item(&id, attempt);
        let payload = item.payload.as_mut().expect("a payload");
        payload.attributes = [("k".to_string(), format!("v-{id}"))].into();
        payload.body = Bytes::from(format!("body of {id}"));
        item
    };
    // "i-5" is in the table before the run that writes it again.
    let first = SinkBatch {
        shard: shard.clone(),
        events: vec![event(1, Kind::Enqueued(rpb::Enqueued { item: Some(with_payload("i-5".into(), 7)) }))].into(),
    };
    sink.deliver(&first).await.expect("first");
    // A run (copied, then upserted: "i-5" is there), a statement on an item
    // of it, a second run (copied) and a statement on an item of that.
    let mut events = Vec::new();
    let mut sequence = 1;
    let mut next = || {
        sequence += 1;
        sequence
    };
    for n in 0..run {
        events.push(event(next(), Kind::Enqueued(rpb::Enqueued { item: Some(with_payload(format!("i-{n}"), 0)) })));
    }
    events.push(event(
        next(),
        Kind::Leased(rpb::Leased { item_id: "i-1".into(), attempt: 1, owner: "w".into(), ..Default::default() }),
    ));
    for n in 0..run {
        events.push(event(next(), Kind::Enqueued(rpb::Enqueued { item: Some(with_payload(format!("j-{n}"), 0)) })));
    }
    let last = next();
    events.push(event(last, Kind::Completed(rpb::Completed { item_id: "j-0".into(), fencing_token: 1 })));
    let second = SinkBatch { shard: shard.clone(), events: events.into() };
    sink.deliver(&second).await.expect("second");
    // Handed over again: applied once.
    sink.deliver(&second).await.expect("second again");
    sink.flush().await.expect("flush");

    let rows = projection_rows(&db, "copied", "resourcelease.copied").await;
    assert_eq!(rows.len() as u64, 2 * run - 1, "every item of both runs but the completed j-0");
    assert_eq!(rows["i-5"], ("pending".to_string(), 0), "the run's write of i-5 replaced the older one");
    assert_eq!(rows["i-1"], ("leased".to_string(), 1), "the statement after the copy saw its rows");
    assert!(!rows.contains_key("j-0"));
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT attributes->>'k', body, updated_sequence FROM omnirelay_projection_items \
             WHERE projection = 'copied' AND item_id = 'j-7'",
            &[],
        )
        .await
        .expect("a copied row");
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("v-j-7"));
    assert_eq!(row.get::<_, Vec<u8>>(1), b"body of j-7");
    assert_eq!(row.get::<_, i64>(2), (run + 3 + 7) as i64, "j-7 was enqueued at sequence run + 10");
    let checkpoints = sink.checkpoints().await.expect("checkpoints");
    assert_eq!(checkpoints[0].sequence, Sequence::new(last));
}

/// Enqueued events `from..=to` of items `i-{sequence}` on `shard`.
fn enqueues(shard: &ShardId, from: u64, to: u64) -> SinkBatch {
    use rpb::replication_event::Event as Kind;
    let events: Vec<SinkEvent> = (from..=to)
        .map(|n| sink_event(shard, n, Kind::Enqueued(rpb::Enqueued { item: Some(work_item(&format!("i-{n}"), 0)) })))
        .collect();
    SinkBatch { shard: shard.clone(), events: events.into() }
}

/// Makes the commit of any transaction that stores checkpoint `sequence`
/// fail, `times` times (the count survives the rollbacks: a sequence).
async fn fail_commits_storing(db: &TestDb, sequence: i64, times: i64) {
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE SEQUENCE commit_fuse; \
             CREATE FUNCTION fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF NEW.sequence = {sequence} THEN \
                 IF nextval('commit_fuse') <= {times} THEN \
                   RAISE EXCEPTION 'this commit fails (a test''s deferred trigger)'; \
                 END IF; \
               END IF; \
               RETURN NULL; \
             END $$; \
             CREATE CONSTRAINT TRIGGER fail_commit AFTER UPDATE ON omnirelay_projection_checkpoints \
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_commit();"
        ))
        .await
        .expect("install the failing trigger");
}

/// How often the failing trigger fired.
async fn fuse_burnt(db: &TestDb) -> i64 {
    let row = db.client().await.query_one("SELECT last_value, is_called FROM commit_fuse", &[]).await.expect("fuse");
    if row.get::<_, bool>(1) { row.get(0) } else { 0 }
}

#[tokio::test]
async fn a_batch_whose_background_commit_fails_is_applied_again_before_the_next() {
    let db = migrated_db().await;
    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let mut sink = ProjectionSink::open(pool, "refused").await.expect("open");
    fail_commits_storing(&db, 300, 1).await;
    let shard = ShardId::from("resourcelease.refused");
    // Runs long enough to be copied, so the second batch's rows are
    // copied while the first batch's commit (which fails) runs.
    sink.deliver(&enqueues(&shard, 1, 300)).await.expect("the first batch (its commit fails later)");
    sink.deliver(&enqueues(&shard, 301, 600)).await.expect("the second batch, after the first is applied again");
    sink.flush().await.expect("flush");
    assert_eq!(fuse_burnt(&db).await, 2, "the first commit failed and the second attempt committed");
    let rows = projection_rows(&db, "refused", "resourcelease.refused").await;
    assert_eq!(rows.len(), 600, "every item of both batches, once");
    let checkpoints = sink.checkpoints().await.expect("checkpoints");
    assert_eq!(checkpoints.iter().map(|c| c.sequence.get()).collect::<Vec<_>>(), [600]);
}

#[tokio::test]
async fn interleaved_shards_lose_nothing_when_a_commit_of_one_fails() {
    let db = migrated_db().await;
    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let mut sink = ProjectionSink::open(pool, "interleaved").await.expect("open");
    // Only shard a's first batch stores position 300.
    fail_commits_storing(&db, 300, 1).await;
    let (a, b) = (ShardId::from("resourcelease.inter.a"), ShardId::from("resourcelease.inter.b"));
    // As a pattern subscription hands them over: the shards alternate.
    sink.deliver(&enqueues(&a, 1, 300)).await.expect("a 1..300 (its commit fails later)");
    sink.deliver(&enqueues(&b, 1, 100)).await.expect("b 1..100, beside it");
    sink.deliver(&enqueues(&a, 301, 600)).await.expect("a 301..600");
    sink.deliver(&enqueues(&b, 101, 250)).await.expect("b 101..250");
    sink.deliver(&enqueues(&a, 601, 700)).await.expect("a 601..700");
    sink.flush().await.expect("flush");
    assert_eq!(fuse_burnt(&db).await, 2, "a's first commit failed and its second attempt committed");
    assert_eq!(projection_rows(&db, "interleaved", a.as_str()).await.len(), 700, "every item of a, once");
    assert_eq!(projection_rows(&db, "interleaved", b.as_str()).await.len(), 250, "every item of b, once");
    let checkpoints: BTreeMap<String, u64> = sink
        .checkpoints()
        .await
        .expect("checkpoints")
        .into_iter()
        .map(|c| (c.shard.to_string(), c.sequence.get()))
        .collect();
    assert_eq!(checkpoints, BTreeMap::from([(a.to_string(), 700), (b.to_string(), 250)]));
}

#[tokio::test]
async fn a_shard_whose_transaction_waits_does_not_hold_back_another_shard() {
    let db = migrated_db().await;
    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let mut sink = ProjectionSink::open(pool, "beside").await.expect("open");
    let (a, b) = (ShardId::from("resourcelease.beside.a"), ShardId::from("resourcelease.beside.b"));
    // Another session holds shard a's position locked: a's transaction
    // waits for it.
    let mut holder = db.client().await;
    holder
        .execute(
            "INSERT INTO omnirelay_projection_checkpoints (projection, shard, sequence, hash) VALUES ('beside', $1, 0, '')",
            &[&a.as_str()],
        )
        .await
        .expect("a's position");
    let held = holder.transaction().await.expect("begin");
    held.execute(
        "SELECT 1 FROM omnirelay_projection_checkpoints WHERE projection = 'beside' AND shard = $1 FOR UPDATE",
        &[&a.as_str()],
    )
    .await
    .expect("lock a's position");
    sink.deliver(&enqueues(&a, 1, 10)).await.expect("a 1..10 (waits for the lock)");
    // b's batch is neither made to wait for a's nor kept behind it.
    tokio::time::timeout(Duration::from_secs(10), sink.deliver(&enqueues(&b, 1, 10)))
        .await
        .expect("b's delivery does not wait for a's transaction")
        .expect("b 1..10");
    eventually("b's batch commits while a's waits", HANG_GUARD, || async {
        let b_rows = projection_rows(&db, "beside", b.as_str()).await.len();
        if b_rows == 10 { Ok(()) } else { Err(format!("{b_rows} of b's rows")) }
    })
    .await;
    assert!(projection_rows(&db, "beside", a.as_str()).await.is_empty(), "a's transaction still waits");
    held.rollback().await.expect("release a's position");
    sink.flush().await.expect("flush");
    assert_eq!(projection_rows(&db, "beside", a.as_str()).await.len(), 10);
}

#[tokio::test]
async fn a_commit_that_keeps_failing_loses_nothing_and_flush_reports_it() {
    let db = migrated_db().await;
    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let mut sink = ProjectionSink::open(pool, "kept").await.expect("open");
    fail_commits_storing(&db, 2, 2).await;
    let shard = ShardId::from("resourcelease.kept");
    sink.deliver(&enqueues(&shard, 1, 2)).await.expect("delivered (its commit fails later)");
    // The commit fails, and so does applying the batch again: flush says
    // so, and nothing of the batch is in the table.
    let err = sink.flush().await.expect_err("the batch cannot be committed");
    assert!(matches!(&err, SinkError::Fatal(reason) if reason.contains("this commit fails")), "unexpected {err}");
    assert!(projection_rows(&db, "kept", "resourcelease.kept").await.is_empty());
    // The sink kept the batch: once the cause is gone, the next flush
    // commits it.
    sink.flush().await.expect("the third attempt commits");
    assert_eq!(fuse_burnt(&db).await, 3);
    assert_eq!(projection_rows(&db, "kept", "resourcelease.kept").await.len(), 2);
    assert_eq!(sink.checkpoints().await.expect("checkpoints")[0].sequence, Sequence::new(2));
}

#[tokio::test]
async fn a_batch_that_would_skip_events_past_the_stored_position_is_refused() {
    let db = migrated_db().await;
    let pool = ProjectionSink::pool(db.url(), 2, Duration::from_secs(5)).expect("pool");
    let mut sink = ProjectionSink::open(pool, "skipping").await.expect("open");
    let shard = ShardId::from("resourcelease.skipping");
    sink.deliver(&enqueues(&shard, 1, 2)).await.expect("from the start");
    // Refused by its transaction, which may run after `deliver` returned:
    // the refusal comes from `deliver` or from the `flush` after it.
    let err = match sink.deliver(&enqueues(&shard, 5, 6)).await {
        Err(err) => err,
        Ok(()) => sink.flush().await.expect_err("3 and 4 would be skipped"),
    };
    assert!(matches!(&err, SinkError::Fatal(reason) if reason.contains("skipped")), "unexpected {err}");
    assert_eq!(projection_rows(&db, "skipping", "resourcelease.skipping").await.len(), 2);
    assert_eq!(sink.checkpoints().await.expect("checkpoints")[0].sequence, Sequence::new(2));
}
