//! Point-in-time recovery of the hub's PostgreSQL database, as the operator
//! guide (`docs/hub-operations.md`, "Point-in-time recovery") describes it:
//! a base backup and a WAL archive taken while a real `omnirelay-hub`
//! appends, a restore point, more appends, then a new cluster restored to
//! the point and a hub on it. The restored log must verify, end exactly at
//! what was acknowledged before the point, and a subscriber whose sink had
//! gone past it must stop and say so rather than skip the new events.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use omnirelay_client::queue::{Caller, EnqueueRequest, Payload};
use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig};
use omnirelay_client::sink::projection::ProjectionSink;
use omnirelay_client::sink::{Selection, SinkError, Subscriber, SubscriberConfig, SubscriberProgress};
use omnirelay_client::{Queue, QueueConfig, Replicator, ShardId};
use omnirelay_proto::hub::v1 as pb;
use omnirelay_proto::replication::v1::replication_event::Event;
use omnirelay_tests::{PgCluster, PgOptions, RecoveryTarget, TestDb, WorkspaceBinaries, eventually, free_port};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::durable::{HANG_GUARD, Hub};

const SHARD: &str = "resourcelease.pitr";

/// The restore point's name.
const RESTORE_POINT: &str = "omnirelay-drill";

/// The subscriber the drill follows the shard with.
const SUBSCRIBER: &str = "pitr-projection";

/// Enqueues before the base backup starts, and after the restore point.
const BATCH: usize = 20;

fn producer() -> Caller {
    Caller::new("spiffe://test/producer", "node-a")
}

async fn enqueue(queue: &Queue, n: usize) -> String {
    let id = format!("req-{n}");
    let payload = Payload::new("user", n.to_string(), format!("body {n}")).with_request_id(id.clone());
    queue.enqueue(&producer(), EnqueueRequest::new(payload)).await.expect("the hub is up: the enqueue is acknowledged");
    id
}

/// A connection to `url`, its driver on the current runtime.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// The sink suite's fast pacing.
fn subscriber_config(endpoint: &HubEndpoint) -> SubscriberConfig {
    crate::sinks::config(SUBSCRIBER, vec![endpoint.clone()], Selection::Shards(vec![ShardId::from(SHARD)]))
}

type Run = tokio::task::JoinHandle<Result<ProjectionSink, SinkError>>;

async fn subscribe(
    endpoint: &HubEndpoint,
    sink: ProjectionSink,
) -> (watch::Receiver<SubscriberProgress>, CancellationToken, Run) {
    let subscriber = Subscriber::new(subscriber_config(endpoint), sink).expect("valid subscriber config");
    let progress = subscriber.progress();
    let stop = CancellationToken::new();
    (progress, stop.clone(), tokio::spawn(subscriber.run(stop)))
}

/// Waits until the hub holds `SUBSCRIBER`'s checkpoint at `sequence`.
async fn checkpointed(client: &mut pb::hub_client::HubClient<tonic::transport::Channel>, sequence: u64) {
    eventually(&format!("the hub checkpoint reaches {sequence}"), HANG_GUARD, || {
        let mut client = client.clone();
        async move {
            let checkpoints = client
                .get_checkpoints(pb::GetCheckpointsRequest {
                    subscriber_id: SUBSCRIBER.into(),
                    shard_ids: vec![SHARD.into()],
                    ..Default::default()
                })
                .await
                .map_err(|status| status.to_string())?
                .into_inner()
                .checkpoints;
            match checkpoints.first() {
                Some(checkpoint) if checkpoint.sequence == sequence => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
}

/// The shard's log read from the hub: (request ids of the Enqueued events,
/// their item ids, the head, the head's hash).
async fn read_log(hub: &Hub) -> (BTreeSet<String>, BTreeSet<String>, u64, Vec<u8>) {
    let events = crate::durable::read_log(hub, SHARD).await;
    let (head, hash) = events.last().map_or((0, Vec::new()), |last| (last.sequence, last.hash.to_vec()));
    let (mut requests, mut items) = (BTreeSet::new(), BTreeSet::new());
    for event in events {
        if let Some(Event::Enqueued(enqueued)) = event.event {
            let item = enqueued.item.expect("an enqueued item");
            items.insert(item.item_id.clone());
            requests.insert(item.payload.map(|p| p.request_id).unwrap_or_default());
        }
    }
    (requests, items, head, hash)
}

/// The projection's item ids for the shard.
async fn projected(db: &TestDb) -> BTreeSet<String> {
    let rows = db
        .client()
        .await
        .query("SELECT item_id FROM omnirelay_projection_items WHERE shard = $1", &[&SHARD])
        .await
        .expect("read the projection");
    rows.into_iter().map(|row| row.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_database_restored_to_a_point_in_time_serves_the_log_acknowledged_before_it() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let origin = tokio::task::spawn_blocking(|| PgCluster::start_archiving(PgOptions::default()))
        .await
        .expect("join")
        .expect("an archiving cluster");
    let origin = Arc::new(origin);
    connect(&origin.url("postgres")).await.batch_execute("CREATE DATABASE omnirelay").await.expect("create database");
    let url = origin.url("omnirelay");
    let grpc = free_port();
    let hub = Hub::start(&binaries.hub, &url, grpc).await;
    let endpoint = HubEndpoint::new(format!("http://{}", hub.grpc));

    // A producer owning the shard through the hub.
    let replicator =
        Arc::new(HubReplicator::new(HubReplicatorConfig::new([endpoint.clone()])).expect("valid replicator config"));
    let grant = replicator
        .acquire_shard(&ShardId::from(SHARD), "node-a", Duration::from_secs(60))
        .await
        .expect("acquire the shard");
    assert!(grant.granted);
    let queue = Queue::builder(QueueConfig::new(ShardId::from(SHARD), "node-a"), replicator.clone())
        .epoch(grant.epoch)
        .build()
        .expect("valid queue config");

    // Appends before, and while, the base backup is taken.
    let mut before = BTreeSet::new();
    for n in 0..BATCH {
        before.insert(enqueue(&queue, n).await);
    }
    let backing_up = tokio::task::spawn_blocking({
        let origin = Arc::clone(&origin);
        move || origin.base_backup()
    });
    let mut n = BATCH;
    while !backing_up.is_finished() {
        before.insert(enqueue(&queue, n).await);
        n += 1;
    }
    let backup = backing_up.await.expect("join").expect("pg_basebackup");
    before.insert(enqueue(&queue, n).await);
    n += 1;

    // A subscriber projecting the shard into its own database (not the
    // hub's: it is not restored with it) has everything so far, and its
    // checkpoint is in the hub's database.
    let sink_db = TestDb::new().await;
    let pool = ProjectionSink::pool(sink_db.url(), 2, Duration::from_secs(5)).expect("pool");
    let sink = ProjectionSink::open(pool.clone(), "pitr").await.expect("open the projection");
    let (progress, stop, run) = subscribe(&endpoint, sink).await;
    let point = queue.replication().durable.get();
    let mut hub_client = hub.client().await;
    checkpointed(&mut hub_client, point).await;

    // The restore point: every enqueue so far was acknowledged, none after.
    let origin_client = connect(&url).await;
    origin_client
        .query_one("SELECT pg_create_restore_point($1)", &[&RESTORE_POINT])
        .await
        .expect("create the restore point");
    let (_, _, logged_head, point_hash) = read_log(&hub).await;
    assert_eq!(logged_head, point, "the producer's durable head is the log's head");

    let mut after = BTreeSet::new();
    for _ in 0..BATCH {
        after.insert(enqueue(&queue, n).await);
        n += 1;
    }
    let end = queue.replication().durable.get();
    checkpointed(&mut hub_client, end).await;
    assert!(progress.borrow().shards[SHARD].position == end, "the sink applied the events after the point");

    // Close the WAL segment holding the point and wait for the archive.
    let segment: String =
        origin_client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await.expect("switch WAL").get(0);
    eventually("the last WAL segment is archived", HANG_GUARD, || {
        let client = &origin_client;
        let segment = segment.clone();
        async move {
            let archived: Option<String> = client
                .query_one("SELECT last_archived_wal FROM pg_stat_archiver", &[])
                .await
                .map_err(|err| err.to_string())?
                .get(0);
            if archived.as_deref() >= Some(segment.as_str()) { Ok(()) } else { Err(format!("{archived:?}")) }
        }
    })
    .await;

    // The database is lost: the hub dies with it.
    drop(origin_client);
    let _ = hub.process.kill().await;
    origin.crash().expect("stop the original cluster");

    // Restore a new cluster from the backup and the archive to the point,
    // and start a hub on it on the same address.
    let archive = origin.archive_dir().expect("the origin archives");
    let restored = tokio::task::spawn_blocking(move || {
        PgCluster::recover(&backup, &archive, &RecoveryTarget::Name(RESTORE_POINT.into()), PgOptions::default())
    })
    .await
    .expect("join")
    .expect("recover to the restore point");
    let restored_url = restored.url("omnirelay");
    let hub = Hub::start(&binaries.hub, &restored_url, grpc).await;

    // `verify` passes on every shard, pinned to the head hash read before.
    let anchor = format!("{SHARD}@{point}={}", point_hash.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let verified = tokio::process::Command::new(&binaries.hub)
        .args(["verify", "--database-url", &restored_url, "--database-tls", "disable", "--anchor", &anchor])
        .output()
        .await
        .expect("run omnirelay-hub verify");
    let report = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "verify failed: {report}{}", String::from_utf8_lossy(&verified.stderr));
    let lines: Vec<&str> = report.lines().collect();
    assert!(lines.iter().any(|line| line.starts_with(&format!("ok       {SHARD} "))), "{report}");
    assert!(lines.iter().all(|line| line.starts_with("ok ")), "{report}");

    // The log ends exactly at what was acknowledged before the point.
    let (requests, items, head, _) = read_log(&hub).await;
    assert_eq!(head, point, "the restored log ends at the restore point");
    assert_eq!(requests, before, "every enqueue acknowledged before the point, and none after");
    assert!(requests.is_disjoint(&after));

    // The running subscriber reconnects, finds the hub's checkpoint back at
    // the point, commits its own position again and is refused: it stops,
    // naming the cure, instead of dropping new events as repeats.
    let stopped = tokio::time::timeout(HANG_GUARD, run).await.expect("the subscriber stops").expect("no panic");
    let err = stopped.expect_err("a sink past the restored head must not carry on");
    assert!(matches!(&err, SinkError::AheadOfHub { position, .. } if position.get() == end), "unexpected {err}");
    stop.cancel();
    // Started again on the same sink it stops the same way.
    let sink = ProjectionSink::open(pool.clone(), "pitr").await.expect("open the projection");
    let (_, _, run) = subscribe(&endpoint, sink).await;
    let err = tokio::time::timeout(HANG_GUARD, run).await.expect("stops").expect("no panic").expect_err("still ahead");
    assert!(matches!(err, SinkError::AheadOfHub { .. }), "unexpected {err}");
    assert!(err.to_string().contains("rebuild the sink"), "{err}");

    // The cure: rebuild the projection. It replays the restored log and
    // holds exactly its items.
    sink_db
        .client()
        .await
        .batch_execute("TRUNCATE omnirelay_projection_items, omnirelay_projection_checkpoints")
        .await
        .expect("truncate the projection");
    let sink = ProjectionSink::open(pool, "pitr").await.expect("open the projection");
    let (progress, stop, run) = subscribe(&endpoint, sink).await;
    eventually("the rebuilt projection reaches the restored head", HANG_GUARD, || {
        let position = progress.borrow().shards.get(SHARD).map_or(0, |s| s.position);
        async move { if position >= point { Ok(()) } else { Err(format!("at {position}")) } }
    })
    .await;
    let mut hub_client = hub.client().await;
    checkpointed(&mut hub_client, point).await;
    stop.cancel();
    tokio::time::timeout(HANG_GUARD, run).await.expect("stops").expect("no panic").expect("a clean stop");
    assert_eq!(projected(&sink_db).await, items, "the rebuilt projection holds the restored log's items");
    let _ = hub.process.kill().await;
}
