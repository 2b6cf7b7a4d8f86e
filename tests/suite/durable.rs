//! The durable mesh, end to end with real processes: a hub on the harness's
//! PostgreSQL and `omnirelay node --hub` sidecars, killed with SIGKILL and
//! started again. What a caller was told is done must still be done after
//! any of them dies; what it was not told may or may not have happened, but
//! is never duplicated.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use omnirelay_proto::hub::v1 as hub_pb;
use omnirelay_proto::resourcelease::v1 as pb;
use omnirelay_tests::sidecar::{Sidecar, SidecarBuilder, without_omnirelay_env};
use omnirelay_tests::{WorkspaceBinaries, eventually, free_port};
use tokio::process::Command;
use tonic::transport::Channel;

use crate::http::http_get;

pub(crate) use omnirelay_tests::sidecar::{HANG_GUARD, Process, wait_for_ok};

pub(crate) const SHARD: &str = "resourcelease.durable";

/// `omnirelay-hub` on PostgreSQL, on a given gRPC port (so nodes find it
/// again after a restart).
pub(crate) struct Hub {
    pub(crate) grpc: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) process: Process,
}

impl Hub {
    pub(crate) async fn start(binary: &Path, url: &str, grpc: u16) -> Hub {
        Self::start_with(binary, url, grpc, &[]).await
    }

    pub(crate) async fn start_with(binary: &Path, url: &str, grpc: u16, extra: &[&str]) -> Hub {
        let migrated = Command::new(binary)
            .args(["migrate", "--database-url", url, "--database-tls", "disable"])
            .output()
            .await
            .expect("run omnirelay-hub migrate");
        assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
        let admin = free_port();
        let mut command = Command::new(binary);
        command
            .args(["--listen", &format!("127.0.0.1:{grpc}"), "--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--database-url", url, "--database-tls", "disable"])
            .args(extra);
        without_omnirelay_env(&mut command);
        let hub = Hub {
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            process: Process::spawn(command),
        };
        wait_for_ok(hub.admin, "/readyz").await;
        hub
    }

    pub(crate) async fn client(&self) -> hub_pb::hub_client::HubClient<Channel> {
        let channel =
            Channel::from_shared(format!("http://{}", self.grpc)).expect("URI").connect().await.expect("connect");
        hub_pb::hub_client::HubClient::new(channel)
    }
}

/// `omnirelay node` as this suite runs it: `node-a`, hosting [`SHARD`], not
/// yet told where it replicates.
fn sidecar(binary: &Path, dir: &Path) -> SidecarBuilder {
    Sidecar::builder(binary, dir)
        .node_id("node-a")
        .namespaces(&[SHARD])
        // A short shard lease: a restarted node waits for the dead one's
        // lease to lapse (it holds the same id, so it may take it over at
        // once; the short TTL bounds the other cases).
        .shard_lease_ttl_ms(3000)
}

/// A [`sidecar`] on the hub at `hub`, ready.
pub(crate) async fn start_node(binary: &Path, dir: &Path, hub: SocketAddr) -> Sidecar {
    sidecar(binary, dir).hub(&format!("http://{hub}")).start().await
}

/// A [`sidecar`] on its own SQLite log `dir/log.sqlite`, ready.
async fn start_node_on_sqlite(binary: &Path, dir: &Path) -> Sidecar {
    sidecar(binary, dir).sqlite(&dir.join("log.sqlite")).start().await
}

/// The namespace's replication state (`/omnirelay/control/replication`).
async fn replication_state(node: &Sidecar) -> serde_json::Value {
    let (_, body) = http_get(node.control, "/omnirelay/control/replication").await.expect("diagnostics");
    let all: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    all["namespaces"][SHARD].clone()
}

/// A request as the loopback principal `ops`, with a deadline.
pub(crate) fn call<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-client-principal", "ops".parse().expect("ASCII"));
    request.set_timeout(Duration::from_secs(5));
    request
}

pub(crate) fn payload(request_id: &str) -> pb::ItemPayload {
    pb::ItemPayload {
        resource_type: "invoice".into(),
        resource_id: request_id.into(),
        request_id: request_id.into(),
        body: format!("body of {request_id}").into_bytes().into(),
        ..Default::default()
    }
}

async fn enqueue(
    client: &mut pb::resource_lease_client::ResourceLeaseClient<Channel>,
    id: &str,
) -> Result<pb::EnqueueResponse, tonic::Status> {
    client
        .enqueue(call(pb::EnqueueRequest { namespace: SHARD.into(), payload: Some(payload(id)), ..Default::default() }))
        .await
        .map(tonic::Response::into_inner)
}

async fn lease(client: &mut pb::resource_lease_client::ResourceLeaseClient<Channel>, owner: &str) -> pb::WorkItem {
    client
        .lease(call(pb::LeaseRequest { namespace: SHARD.into(), owner: owner.into(), ..Default::default() }))
        .await
        .expect("lease")
        .into_inner()
        .item
        .expect("an item is pending")
}

async fn stats(client: &mut pb::resource_lease_client::ResourceLeaseClient<Channel>) -> pb::StatsResponse {
    client.stats(call(pb::StatsRequest { namespace: SHARD.into() })).await.expect("stats").into_inner()
}

/// Every event of `shard`'s log, in order, read from the hub.
pub(crate) async fn read_log(hub: &Hub, shard: &str) -> Vec<omnirelay_proto::replication::v1::ReplicationEvent> {
    let mut client = hub.client().await;
    let mut events = Vec::new();
    loop {
        let from =
            events.last().map_or(1, |event: &omnirelay_proto::replication::v1::ReplicationEvent| event.sequence + 1);
        let page = client
            .read_range(hub_pb::ReadRangeRequest {
                shard_id: shard.into(),
                from_sequence: from,
                to_sequence: 0,
                limit: 0,
            })
            .await
            .expect("read the log")
            .into_inner();
        if page.events.is_empty() {
            return events;
        }
        events.extend(page.events.iter().map(|event| event.decode().expect("a logged event decodes")));
    }
}

/// Every Enqueued event of the shard's log, by request id, read from the hub.
async fn logged_enqueues(hub: &Hub) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for event in read_log(hub, SHARD).await {
        if let Some(omnirelay_proto::replication::v1::replication_event::Event::Enqueued(enqueued)) = event.event {
            let id = enqueued.item.and_then(|item| item.payload).map(|p| p.request_id).unwrap_or_default();
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_comes_back_with_every_acknowledged_item_and_its_leases() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let db = omnirelay_tests::TestDb::new().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let hub = Hub::start(&binaries.hub, db.url(), free_port()).await;
    let node = start_node(&binaries.omnirelay, dir.path(), hub.grpc).await;
    let mut client = node.client().await;

    let mut acknowledged = BTreeMap::new();
    for n in 0..40 {
        let id = format!("req-{n}");
        let answer = enqueue(&mut client, &id).await.expect("the hub is up: every enqueue is acknowledged");
        acknowledged.insert(id, answer.item_id);
    }
    let held = lease(&mut client, "worker-1").await;
    let handle = held.lease.clone().expect("a lease handle");
    let done = lease(&mut client, "worker-1").await;
    client
        .complete(call(pb::CompleteRequest { namespace: SHARD.into(), handle: done.lease.clone() }))
        .await
        .expect("complete");
    let failed = lease(&mut client, "worker-1").await;
    client
        .fail(call(pb::FailRequest {
            namespace: SHARD.into(),
            handle: failed.lease.clone(),
            error: "flaky".into(),
            requeue_delay: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
            ..Default::default()
        }))
        .await
        .expect("fail");
    let before = stats(&mut client).await;
    let digest_before = replication_state(&node).await["state_digest"].clone();
    assert!(digest_before.is_string(), "{digest_before}");

    // More enqueues, then SIGKILL mid-stream: whichever were acknowledged
    // must survive; the others may or may not have.
    let mut racing = node.client().await;
    let burst = tokio::spawn(async move {
        let mut acked = Vec::new();
        for n in 40..400 {
            let id = format!("req-{n}");
            if let Ok(answer) = enqueue(&mut racing, &id).await {
                acked.push((id, answer.item_id));
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    node.kill().await;
    let raced = burst.await.expect("join");
    let raced_acks = raced.len();
    acknowledged.extend(raced);

    let node = start_node(&binaries.omnirelay, dir.path(), hub.grpc).await;
    let mut client = node.client().await;
    // Every acknowledged enqueue is there: enqueueing it again finds it.
    for (id, item_id) in &acknowledged {
        let again = enqueue(&mut client, id).await.expect("enqueue again");
        assert!(again.deduplicated, "{id} was acknowledged before the crash but is gone");
        assert_eq!(&again.item_id, item_id, "{id} came back as another item");
    }
    // Nothing was written twice.
    let logged = logged_enqueues(&hub).await;
    assert!(logged.values().all(|count| *count == 1), "an enqueue was logged twice: {logged:?}");
    for id in acknowledged.keys() {
        assert_eq!(logged.get(id), Some(&1), "{id} is not in the log");
    }
    // The lease granted before the crash keeps its fencing token.
    client
        .heartbeat(call(pb::HeartbeatRequest {
            namespace: SHARD.into(),
            handle: Some(handle.clone()),
            ..Default::default()
        }))
        .await
        .expect("the pre-crash token heartbeats");
    client
        .complete(call(pb::CompleteRequest { namespace: SHARD.into(), handle: Some(handle) }))
        .await
        .expect("the pre-crash token completes its item");
    let after = stats(&mut client).await;
    assert_eq!(after.active, before.active - 1, "one lease was completed since");
    assert_eq!(
        after.pending + after.active,
        before.pending + before.active - 1 + (logged.len() - 40) as u64,
        "every logged enqueue is pending or leased ({raced_acks} of the racing ones were acknowledged)"
    );
    let _ = node.kill().await;
    drop(hub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_on_a_sqlite_log_comes_back_with_every_acknowledged_item() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let dir = tempfile::tempdir().expect("temporary directory");
    let node = start_node_on_sqlite(&binaries.omnirelay, dir.path()).await;
    assert_eq!(replication_state(&node).await["replicator"], "sqlite", "the node names its replicator");
    let mut client = node.client().await;
    let mut acknowledged = BTreeMap::new();
    for n in 0..20 {
        let id = format!("req-{n}");
        let answer = enqueue(&mut client, &id).await.expect("the file is writable: every enqueue is acknowledged");
        acknowledged.insert(id, answer.item_id);
    }
    let held = lease(&mut client, "worker-1").await;
    let handle = held.lease.clone().expect("a lease handle");

    // A burst, then SIGKILL mid-stream: every acknowledged enqueue must
    // survive; the others may or may not have.
    let mut racing = node.client().await;
    let burst = tokio::spawn(async move {
        let mut acked = Vec::new();
        for n in 20..300 {
            let id = format!("req-{n}");
            if let Ok(answer) = enqueue(&mut racing, &id).await {
                acked.push((id, answer.item_id));
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    node.kill().await;
    acknowledged.extend(burst.await.expect("join"));

    // The same file, a new process: the lock the dead one held is gone.
    let node = start_node_on_sqlite(&binaries.omnirelay, dir.path()).await;
    let mut client = node.client().await;
    let before = stats(&mut client).await;
    for (id, item_id) in &acknowledged {
        let again = enqueue(&mut client, id).await.expect("enqueue again");
        assert!(again.deduplicated, "{id} was acknowledged before the crash but is gone");
        assert_eq!(&again.item_id, item_id, "{id} came back as another item");
    }
    assert!(
        before.pending + before.active >= acknowledged.len() as u64 && before.pending + before.active <= 300,
        "every acknowledged item is back, none twice: {before:?}, {} acknowledged",
        acknowledged.len()
    );
    // The lease granted before the crash keeps its fencing token.
    client
        .complete(call(pb::CompleteRequest { namespace: SHARD.into(), handle: Some(handle) }))
        .await
        .expect("the pre-crash token completes its item");
    let _ = node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rebuilds_the_state_it_had_byte_for_byte() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let db = omnirelay_tests::TestDb::new().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let hub = Hub::start(&binaries.hub, db.url(), free_port()).await;
    let node = start_node(&binaries.omnirelay, dir.path(), hub.grpc).await;
    let mut client = node.client().await;
    for n in 0..25 {
        enqueue(&mut client, &format!("req-{n}")).await.expect("enqueue");
    }
    for _ in 0..5 {
        lease(&mut client, "worker-1").await;
    }
    let before = replication_state(&node).await;
    let after_kill = {
        node.kill().await;
        let node = start_node(&binaries.omnirelay, dir.path(), hub.grpc).await;
        let replication = replication_state(&node).await;
        let _ = node.kill().await;
        replication
    };
    assert_eq!(after_kill["last_sequence"], before["last_sequence"]);
    assert_eq!(after_kill["state_digest"], before["state_digest"], "the rebuilt state is the state before the crash");
    assert!(after_kill["epoch"].as_u64() > before["epoch"].as_u64(), "the restarted node took a new epoch");
    drop(hub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hub_loses_nothing_the_node_acknowledged() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let db = omnirelay_tests::TestDb::new().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let grpc = free_port();
    let hub = Hub::start(&binaries.hub, db.url(), grpc).await;
    let node = start_node(&binaries.omnirelay, dir.path(), hub.grpc).await;
    let mut racing = node.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = std::sync::Arc::clone(&stop);
    // Enqueues without pause until told to stop: before, while and after the
    // hub is down.
    let burst = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut refused = 0;
        let mut longest = Duration::ZERO;
        let mut n = 0;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            let id = format!("req-{n}");
            n += 1;
            let started = tokio::time::Instant::now();
            let answer = enqueue(&mut racing, &id).await;
            longest = longest.max(started.elapsed());
            match answer {
                Ok(answer) => acked.push((id, answer.item_id)),
                Err(_) => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        (acked, refused, longest)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.process.kill().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let hub = Hub::start(&binaries.hub, db.url(), grpc).await;
    // The node noticed, waited and serves again.
    eventually("the node serves again", HANG_GUARD, || async {
        let replication = replication_state(&node).await;
        if replication["status"] == "serving" && replication["lag_events"] == 0 {
            Ok(())
        } else {
            Err(replication.to_string())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acknowledged, refused, longest) = burst.await.expect("join");
    // A call in flight when the hub died either waited for it (the node
    // retries with the same producer sequence) or ran out of its deadline.
    assert!(
        refused > 0 || longest >= Duration::from_secs(1),
        "no enqueue met the dead hub (longest {longest:?}, none refused)"
    );
    assert!(!acknowledged.is_empty(), "no enqueue was acknowledged");
    let mut client = node.client().await;
    for (id, item_id) in &acknowledged {
        let again = enqueue(&mut client, id).await.expect("enqueue again");
        assert!(again.deduplicated && &again.item_id == item_id, "{id} was acknowledged but is gone");
    }
    let logged = logged_enqueues(&hub).await;
    assert!(logged.values().all(|count| *count == 1), "an enqueue was logged twice: {logged:?}");
    let _ = node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_shard_was_taken_over_fences_itself_and_serves_again_once_it_is_back() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let db = omnirelay_tests::TestDb::new().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let hub = Hub::start(&binaries.hub, db.url(), free_port()).await;
    let node = start_node(&binaries.omnirelay, dir.path(), hub.grpc).await;
    let mut client = node.client().await;
    enqueue(&mut client, "req-0").await.expect("enqueue");

    // Another owner takes the shard: the node's lease is released under it
    // and granted to an intruder with a new epoch.
    let mut hub_client = hub.client().await;
    let epoch = replication_state(&node).await["epoch"].as_u64().expect("an epoch");
    let released = hub_client
        .release_shard(hub_pb::ReleaseShardRequest { shard_id: SHARD.into(), owner: "node-a".into(), epoch })
        .await
        .expect("release")
        .into_inner();
    assert!(released.released);
    let intruder = hub_client
        .acquire_shard(hub_pb::AcquireShardRequest {
            shard_id: SHARD.into(),
            owner: "intruder".into(),
            ttl: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
        })
        .await
        .expect("acquire")
        .into_inner();
    assert!(intruder.granted, "{intruder:?}");
    let head = intruder.lease.as_ref().expect("lease").head_sequence;

    // The node's next batch carries its old epoch: the hub refuses it, the
    // node fences the shard and answers UNAVAILABLE, and nothing is written.
    let refused = enqueue(&mut client, "req-1").await.expect_err("the epoch is stale");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let replication = replication_state(&node).await;
    assert_eq!(replication["status"], "fenced", "{replication}");
    let (status, ready) = http_get(node.control, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "{ready}");
    let lease = hub_client
        .acquire_shard(hub_pb::AcquireShardRequest { shard_id: SHARD.into(), owner: "probe".into(), ttl: None })
        .await
        .expect("read the lease")
        .into_inner();
    assert_eq!(lease.lease.expect("lease").head_sequence, head, "the refused batch wrote nothing");

    // The intruder leaves; the node takes the shard back and serves.
    hub_client
        .release_shard(hub_pb::ReleaseShardRequest {
            shard_id: SHARD.into(),
            owner: "intruder".into(),
            epoch: intruder.lease.expect("lease").epoch,
        })
        .await
        .expect("release");
    eventually("the node serves again", HANG_GUARD, || async {
        let replication = replication_state(&node).await;
        if replication["status"] == "serving" { Ok(()) } else { Err(replication.to_string()) }
    })
    .await;
    enqueue(&mut client, "req-1").await.expect("served again");
    let _ = node.kill().await;
}

/// A throwaway CA: (CA PEM, issuer).
fn ca() -> (String, rcgen::CertifiedIssuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "omnirelay durable test ca");
    let key = rcgen::KeyPair::generate().expect("CA key");
    let issuer = rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate");
    (issuer.pem(), issuer)
}

/// A leaf certificate with `sans`: (certificate, key) PEM.
fn leaf(ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, sans: Vec<rcgen::SanType>) -> (String, String) {
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, ca).expect("signing");
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_a_mutual_tls_hub_past_a_dead_endpoint() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let db = omnirelay_tests::TestDb::new().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let (ca_pem, ca) = ca();
    let (hub_cert, hub_key) = leaf(
        &ca,
        vec![
            rcgen::SanType::DnsName("localhost".try_into().expect("DNS name")),
            rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
        ],
    );
    let (node_cert, node_key) =
        leaf(&ca, vec![rcgen::SanType::URI("spiffe://durable.test/node-a".try_into().expect("URI"))]);
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write a PEM file");
        path.display().to_string()
    };
    let (ca_file, hub_cert_file, hub_key_file) =
        (file("ca.pem", &ca_pem), file("hub.pem", &hub_cert), file("hub.key", &hub_key));
    let (node_cert_file, node_key_file) = (file("node.pem", &node_cert), file("node.key", &node_key));
    // Mutual TLS identifies callers, so the hub enforces its grants: the
    // node's certificate may own and read back every shard.
    let access = file(
        "access.json",
        r#"{"grants": [{"principals": ["spiffe://durable.test/node-a"], "hub_roles": ["producer"], "shards": ["*"]}]}"#,
    );
    let hub = Hub::start_with(
        &binaries.hub,
        db.url(),
        free_port(),
        &["--tls-cert", &hub_cert_file, "--tls-key", &hub_key_file, "--tls-client-ca", &ca_file, "--access", &access],
    )
    .await;
    // The first endpoint has nothing listening: the node moves on to the
    // second, over mutual TLS.
    let hubs = format!("https://localhost:{},https://localhost:{}", free_port(), hub.grpc.port());
    let node = sidecar(&binaries.omnirelay, dir.path())
        .hub(&hubs)
        .hub_tls(&ca_file, Some((&node_cert_file, &node_key_file)))
        .start()
        .await;
    let mut client = node.client().await;
    enqueue(&mut client, "req-tls").await.expect("an enqueue through the mutual-TLS hub");
    assert_eq!(logged_enqueues_tls(&hub, &ca_pem, &node_cert, &node_key).await, 1);
    let _ = node.kill().await;

    // Without a client certificate the hub refuses the connection: the node
    // never serves, and says why.
    let dir2 = tempfile::tempdir().expect("temporary directory");
    let stranger = sidecar(&binaries.omnirelay, dir2.path()).hub(&hubs).hub_tls(&ca_file, None).spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = http_get(stranger.control, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "a node the hub does not trust must not serve: {body}");
    let log = stranger.kill().await;
    // Under rendezvous assignment it cannot even join the mesh (its member
    // lease is refused like any other call).
    assert!(log.contains("failed to join the mesh") || log.contains("failed to acquire the shard"), "{log}");
}

/// Enqueued events in the log, read over mutual TLS.
async fn logged_enqueues_tls(hub: &Hub, ca: &str, cert: &str, key: &str) -> usize {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", hub.grpc.port()))
        .expect("URI")
        .tls_config(tls)
        .expect("TLS")
        .connect()
        .await
        .expect("connect over mutual TLS");
    let mut client = hub_pb::hub_client::HubClient::new(channel);
    let page = client
        .read_range(hub_pb::ReadRangeRequest { shard_id: SHARD.into(), from_sequence: 1, to_sequence: 0, limit: 0 })
        .await
        .expect("read the log")
        .into_inner();
    page.events
        .iter()
        .filter(|event| {
            matches!(
                event.decode().expect("decodes").event,
                Some(omnirelay_proto::replication::v1::replication_event::Event::Enqueued(_))
            )
        })
        .count()
}

/// The hub replicator against the same contract suite as every other
/// replicator, on a real hub on the harness's PostgreSQL: the in-memory
/// log the queue's tests use is held to what the production log does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_replicator_keeps_the_replicator_contract() {
    use std::sync::Arc;

    use omnirelay_client::replication::contract::{self, Durability};
    use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig, Replicator};

    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let db = omnirelay_tests::TestDb::new().await;
    let hub = Hub::start(&binaries.hub, db.url(), free_port()).await;
    let endpoint = format!("http://{}", hub.grpc);
    contract::check(
        || {
            let endpoint = endpoint.clone();
            async move {
                let config = HubReplicatorConfig::new([HubEndpoint::new(endpoint)]);
                Arc::new(HubReplicator::new(config).expect("a hub replicator")) as Arc<dyn Replicator>
            }
        },
        Durability::Durable,
    )
    .await;
    drop(hub);
}
