//! The operator commands against a running hub and node: a hub on its
//! embedded SQLite log and a node replicating to it, both served in this
//! process, driven over gRPC as a producer and worker would, and inspected
//! with the real `omnirelay` binary (`dead-letters`, `queue show`,
//! `inspect --at`, `verify`, `snapshot show`, `subscribers lag`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use omnirelay_client::middleware::{AuthorizationTable, MiddlewareConfig, PrincipalConfig, TrustedProxies};
use omnirelay_client::node::{Node, NodeConfig};
use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig};
use omnirelay_client::{QueueConfig, ShardId};
use omnirelay_proto::hub::v1 as hub_pb;
use omnirelay_proto::resourcelease::v1 as pb;
use serde_json::Value;
use tonic::transport::Channel;

const BINARY: &str = env!("CARGO_BIN_EXE_omnirelay");

/// Bound on waiting for a node to serve or a command to end (a hang guard,
/// not a performance claim: debug builds on a loaded machine).
const HANG_GUARD: Duration = Duration::from_secs(60);

/// How often the retention test's hub trims its log (the default is a
/// minute; the test waits for the trim, it does not time it).
const RETENTION_EVERY: Duration = Duration::from_millis(100);

/// A hub and a node, served in this process until the test ends.
struct Mesh {
    _dir: tempfile::TempDir,
    hub_db: std::path::PathBuf,
    hub: SocketAddr,
    hub_stop: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>)>,
    node_addr: SocketAddr,
    node: Arc<Node>,
    client: pb::resource_lease_client::ResourceLeaseClient<Channel>,
}

const NODE_PRINCIPAL: &str = "spiffe://ops.test/node";
const OPERATOR_PRINCIPAL: &str = "spiffe://ops.test/operator";

/// A throwaway CA and certificates for the hub (127.0.0.1), the node and
/// an operator, as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "omnirelay ops test ca");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("key")).expect("CA");
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write a PEM file");
        write("ca.pem", &ca.pem());
        let leaf = |name: &str, sans: Vec<rcgen::SanType>| {
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans;
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &ca).expect("signing");
            write(&format!("{name}.pem"), &cert.pem());
            write(&format!("{name}.key"), &key.serialize_pem());
        };
        leaf("hub", vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())]);
        leaf("node", vec![rcgen::SanType::URI(NODE_PRINCIPAL.try_into().expect("URI"))]);
        leaf("operator", vec![rcgen::SanType::URI(OPERATOR_PRINCIPAL.try_into().expect("URI"))]);
        leaf("stranger", vec![rcgen::SanType::URI("spiffe://ops.test/stranger".try_into().expect("URI"))]);
        Pki { dir }
    }

    fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn path(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.file(name)).expect("read a PEM file")
    }
}

/// Serves a hub on its SQLite log `db` until the sender fires.
async fn start_hub(
    db: &std::path::Path,
    pki: Option<&Pki>,
    retention: Option<Duration>,
) -> (SocketAddr, (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>)) {
    let mut config = omnirelay_hub::Config {
        retention_interval: retention,
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..omnirelay_hub::Config::for_sqlite(db)
    };
    if let Some(pki) = pki {
        config.tls = Some(omnirelay_hub::config::TlsFiles {
            cert: pki.file("hub.pem"),
            key: pki.file("hub.key"),
            client_ca: Some(pki.file("ca.pem")),
        });
        config.access = omnirelay_hub::access::Access::from_json(&format!(
            r#"{{"grants": [
                {{"principals": ["{NODE_PRINCIPAL}"], "hub_roles": ["producer"], "shards": ["*"]}},
                {{"principals": ["{OPERATOR_PRINCIPAL}"], "hub_roles": ["operator"], "shards": ["*"]}}
            ]}}"#
        ))
        .expect("the access table");
    }
    let hub = omnirelay_hub::Hub::open(config).await.expect("open the hub");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(hub.serve(listener, async {
        let _ = stopped.await;
    }));
    (address, (stop, serving))
}

impl Mesh {
    /// Stops the hub (releasing its database), lets `change` alter the
    /// database, and serves it again on a new port.
    async fn restart_hub(&mut self, change: impl FnOnce(&std::path::Path)) {
        let (stop, serving) = self.hub_stop.take().expect("the hub runs");
        let _ = stop.send(());
        serving.await.expect("the hub task").expect("the hub stopped cleanly");
        change(&self.hub_db);
        let (address, stop) = start_hub(&self.hub_db, None, None).await;
        self.hub = address;
        self.hub_stop = Some(stop);
    }

    async fn start(namespace: &str) -> Mesh {
        Self::start_with(namespace, None, None).await
    }

    /// A hub and a node; with `pki`, the hub serves mutual TLS and the node
    /// presents its certificate.
    async fn start_with(namespace: &str, pki: Option<&Pki>, retention: Option<Duration>) -> Mesh {
        let dir = tempfile::tempdir().expect("temp dir");
        let hub_db = dir.path().join("hub.db");
        let (hub_addr, hub_stop) = start_hub(&hub_db, pki, retention).await;

        let mut config = NodeConfig::new("node-ops");
        config.queues = vec![QueueConfig::new(namespace, "node-ops")];
        config.middleware = MiddlewareConfig {
            principal: PrincipalConfig::new()
                .trusted_proxies(TrustedProxies::parse(&["127.0.0.1"]).expect("trusted proxies")),
            authorization: AuthorizationTable::from_json(
                r#"{"rules": [{"principals": ["ops"], "procedures": ["*"], "shards": ["*"]}]}"#,
            )
            .expect("authorization table"),
            ..MiddlewareConfig::default()
        };
        let scheme = if pki.is_some() { "https" } else { "http" };
        let mut hub_config = HubReplicatorConfig::new([HubEndpoint::new(format!("{scheme}://{hub_addr}"))]);
        hub_config.tls = pki.map(|pki| omnirelay_client::replication::HubTls {
            ca_pem: pki.read("ca.pem"),
            identity: Some((pki.read("node.pem"), pki.read("node.key"))),
            domain: None,
        });
        let replicator = HubReplicator::new(hub_config).expect("hub replicator");
        let node = Arc::new(Node::builder(config).replicator(Arc::new(replicator), "hub").build().expect("node"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node_addr = listener.local_addr().expect("addr");
        tokio::spawn(Arc::clone(&node).serve(listener, std::future::pending::<()>()));
        let channel =
            Channel::from_shared(format!("http://{node_addr}")).expect("URI").connect().await.expect("connect");
        let mut client = pb::resource_lease_client::ResourceLeaseClient::new(channel);
        // Serving once the shard is rebuilt from the hub and Stats answers.
        omnirelay_tests::eventually("the node serves its queue", HANG_GUARD, || {
            let mut client = client.clone();
            let namespace = namespace.to_string();
            async move { client.stats(call(pb::StatsRequest { namespace })).await.map_err(|status| status.to_string()) }
        })
        .await;
        client = client.clone();
        Mesh { _dir: dir, hub_db, hub: hub_addr, hub_stop: Some(hub_stop), node_addr, node, client }
    }

    fn hub_url(&self) -> String {
        format!("http://{}", self.hub)
    }

    fn node_url(&self) -> String {
        format!("http://{}", self.node_addr)
    }

    async fn last_sequence(&mut self, namespace: &str) -> u64 {
        self.client
            .stats(call(pb::StatsRequest { namespace: namespace.into() }))
            .await
            .expect("stats")
            .into_inner()
            .last_sequence
    }

    async fn enqueue(&mut self, namespace: &str, id: &str) -> String {
        let payload = pb::ItemPayload {
            resource_type: "invoice".into(),
            resource_id: id.into(),
            request_id: id.into(),
            body: format!("body of {id}").into_bytes().into(),
            ..Default::default()
        };
        let request = pb::EnqueueRequest { namespace: namespace.into(), payload: Some(payload), ..Default::default() };
        self.client.enqueue(call(request)).await.expect("enqueue").into_inner().item_id
    }

    async fn lease(&mut self, namespace: &str, owner: &str) -> pb::OwnershipHandle {
        let request = pb::LeaseRequest { namespace: namespace.into(), owner: owner.into(), ..Default::default() };
        let item = self.client.lease(call(request)).await.expect("lease").into_inner().item.expect("an item");
        item.lease.expect("a lease handle")
    }

    async fn dead_letter(&mut self, namespace: &str, handle: pb::OwnershipHandle, error: &str) {
        let request = pb::FailRequest {
            namespace: namespace.into(),
            handle: Some(handle),
            error: error.into(),
            action: pb::FailAction::DeadLetter as i32,
            ..Default::default()
        };
        let outcome = self.client.fail(call(request)).await.expect("fail").into_inner().outcome;
        assert_eq!(outcome, pb::FailOutcome::DeadLettered as i32);
    }

    async fn complete(&mut self, namespace: &str, handle: pb::OwnershipHandle) {
        let request = pb::CompleteRequest { namespace: namespace.into(), handle: Some(handle) };
        self.client.complete(call(request)).await.expect("complete");
    }

    async fn stats(&mut self, namespace: &str) -> pb::StatsResponse {
        self.client.stats(call(pb::StatsRequest { namespace: namespace.into() })).await.expect("stats").into_inner()
    }
}

/// A request as the loopback principal `ops`, with a deadline.
fn call<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-client-principal", "ops".parse().expect("ASCII"));
    request.set_timeout(Duration::from_secs(10));
    request
}

/// Runs `omnirelay args...`: exit status, stdout, stderr.
async fn omnirelay(args: &[&str]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(BINARY);
    command.args(args).kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if name.starts_with("OMNIRELAY_") {
            command.env_remove(name);
        }
    }
    let output = tokio::time::timeout(HANG_GUARD, command.output())
        .await
        .unwrap_or_else(|_| panic!("omnirelay {args:?} did not end"))
        .expect("run omnirelay");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a command with `--output json` that must succeed; its document.
async fn omnirelay_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let (code, out, err) = omnirelay(&all).await;
    assert_eq!(code, 0, "omnirelay {args:?}: {err}{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("omnirelay {args:?} printed no JSON ({e}): {out}"))
}

fn ids(items: &Value, nested: bool) -> BTreeSet<String> {
    items
        .as_array()
        .expect("a list of items")
        .iter()
        .map(|item| if nested { &item["item"] } else { item })
        .map(|item| item["item_id"].as_str().expect("an item id").to_string())
        .collect()
}

/// What the queue holds: pending, leased and dead-lettered item ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Held {
    pending: BTreeSet<String>,
    leased: BTreeSet<String>,
    dead: BTreeSet<String>,
}

impl Held {
    fn of(view: &Value) -> Held {
        Held {
            pending: ids(&view["pending_items"], false),
            leased: ids(&view["leased_items"], false),
            dead: ids(&view["dead_letter_items"], true),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_at_a_point_of_the_log_shows_what_the_queue_held_then() {
    const NS: &str = "resourcelease.timetravel";
    let mut mesh = Mesh::start(NS).await;
    let hub = mesh.hub_url();
    let mut history: Vec<(u64, Held)> = Vec::new();
    let mut held = Held::default();

    for name in ["a", "b", "c"] {
        let id = mesh.enqueue(NS, name).await;
        held.pending.insert(id);
        history.push((mesh.last_sequence(NS).await, held.clone()));
    }
    let first = mesh.lease(NS, "worker-1").await;
    held.pending.remove(&first.item_id);
    held.leased.insert(first.item_id.clone());
    history.push((mesh.last_sequence(NS).await, held.clone()));

    // A snapshot in the middle: later points replay from it.
    let queue = mesh.node.queue(&ShardId::new(NS)).expect("hosted");
    let snapshot = queue.write_snapshot().await.expect("snapshot").expect("a snapshot was written").get();

    mesh.dead_letter(NS, first.clone(), "the invoice does not parse").await;
    held.leased.remove(&first.item_id);
    held.dead.insert(first.item_id.clone());
    history.push((mesh.last_sequence(NS).await, held.clone()));
    let second = mesh.lease(NS, "worker-2").await;
    held.pending.remove(&second.item_id);
    held.leased.insert(second.item_id.clone());
    history.push((mesh.last_sequence(NS).await, held.clone()));
    mesh.complete(NS, second.clone()).await;
    held.leased.remove(&second.item_id);
    history.push((mesh.last_sequence(NS).await, held.clone()));

    // A time between two events: what was held then excludes the later one.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = SystemTime::now();
    let held_between = held.clone();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let late = mesh.enqueue(NS, "d").await;
    held.pending.insert(late);
    let head = mesh.last_sequence(NS).await;
    history.push((head, held.clone()));

    for (sequence, expected) in &history {
        let at = sequence.to_string();
        let report = omnirelay_json(&["inspect", NS, "--hub", &hub, "--at", &at]).await;
        assert_eq!(report["sequence"], *sequence, "{report}");
        assert_eq!(Held::of(&report["state"]), *expected, "at {sequence}: {report}");
        let from_snapshot = (*sequence >= snapshot).then_some(snapshot);
        assert_eq!(report["snapshot"].as_u64(), from_snapshot, "at {sequence}: {report}");
    }
    // The leased item carries its lease: owner and fencing token.
    let at_lease = omnirelay_json(&["inspect", NS, "--hub", &hub, "--at", &history[3].0.to_string()]).await;
    let lease = &at_lease["state"]["leased_items"][0]["lease"];
    assert_eq!(lease["owner"], first.owner, "{at_lease}");
    assert_eq!(lease["fencing_token"], first.fencing_token, "{at_lease}");

    let time =
        time::OffsetDateTime::from(between).format(&time::format_description::well_known::Rfc3339).expect("time");
    let report = omnirelay_json(&["inspect", NS, "--hub", &hub, "--at", &time]).await;
    assert_eq!(Held::of(&report["state"]), held_between, "at {time}: {report}");
    assert_eq!(report["sequence"], head - 1, "{report}");
    let now = omnirelay_json(&["inspect", NS, "--hub", &hub]).await;
    assert_eq!(Held::of(&now["state"]), held, "{now}");
    let (code, text, err) = omnirelay(&["inspect", NS, "--hub", &hub, "--at", &snapshot.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(text.contains(&format!("snapshot at {snapshot}")) && text.contains(&first.item_id), "{text}");
    let (code, out, _) = omnirelay(&["inspect", "resourcelease.missing", "--hub", &hub]).await;
    assert_eq!(code, 3, "no such shard: {out}");
    let (code, _, err) = omnirelay(&["inspect", NS, "--hub", &hub, "--at", "yesterday"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--at"), "{err}");

    // The snapshot on the hub.
    let out = mesh._dir.path().join("snapshot.bin");
    let shown =
        omnirelay_json(&["snapshot", "show", NS, "--hub", &hub, "--out", out.to_str().expect("UTF-8 path")]).await;
    assert!(shown["sequence"].as_u64().is_some_and(|s| s >= snapshot), "{shown}");
    let bytes = std::fs::read(&out).expect("the snapshot was written");
    assert_eq!(shown["bytes"], bytes.len(), "{shown}");
    let older = omnirelay_json(&["snapshot", "show", NS, "--hub", &hub, "--at-or-below", &snapshot.to_string()]).await;
    assert_eq!(older["sequence"], snapshot, "{older}");
    assert_eq!(older["queue"]["active"], 1, "{older}");
    assert_eq!(older["queue"]["pending"], 2, "{older}");
    let (code, _, _) = omnirelay(&["snapshot", "show", "resourcelease.nothing", "--hub", &hub]).await;
    assert_eq!(code, 3, "no snapshot of a shard that has none");

    // Subscriber lag: a checkpoint two events in.
    let channel = Channel::from_shared(hub.clone()).expect("URI").connect().await.expect("connect");
    let mut hub_client = hub_pb::hub_client::HubClient::new(channel);
    hub_client
        .commit_checkpoint(hub_pb::CommitCheckpointRequest {
            subscriber_id: "audit".into(),
            shard_id: NS.into(),
            sequence: 2,
            hash: Default::default(),
        })
        .await
        .expect("commit a checkpoint");
    hub_client
        .commit_checkpoint(hub_pb::CommitCheckpointRequest {
            subscriber_id: "current".into(),
            shard_id: NS.into(),
            sequence: head,
            hash: Default::default(),
        })
        .await
        .expect("commit a checkpoint at the head");
    let lag = omnirelay_json(&["subscribers", "lag", "--hub", &hub, "--shard", NS]).await;
    let caught_up = &lag["checkpoints"][1];
    assert_eq!(caught_up["subscriber"], "current", "{lag}");
    assert_eq!((caught_up["head"].as_u64(), caught_up["lag_events"].as_u64()), (Some(head), Some(0)), "{lag}");
    assert_eq!(caught_up["lag_seconds"].as_f64(), Some(0.0), "{lag}");
    let row = &lag["checkpoints"][0];
    assert_eq!(row["subscriber"], "audit", "{lag}");
    assert_eq!(row["head"], head, "{lag}");
    assert_eq!(row["lag_events"], head - 2, "{lag}");
    assert!(row["lag_seconds"].as_f64().is_some_and(|s| s > 0.0), "{lag}");
    let (code, text, err) = omnirelay(&["subscribers", "lag", "--hub", &hub]).await;
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("audit") && !text.contains('{'), "{text}");

    // verify: intact, no such shard, then corrupt.
    let verified = omnirelay_json(&["verify", NS, "--hub", &hub]).await;
    assert_eq!(verified["result"], "intact", "{verified}");
    assert_eq!(verified["events"], head, "{verified}");
    let (code, out, _) = omnirelay(&["verify", "resourcelease.missing", "--hub", &hub]).await;
    assert_eq!(code, 3, "{out}");
    mesh.restart_hub(|db| {
        let db = rusqlite::Connection::open(db).expect("open the hub's database");
        let changed = db
            .execute("UPDATE events SET hash = zeroblob(32) WHERE sequence = 2", [])
            .expect("tamper with an event's hash");
        assert_eq!(changed, 1);
    })
    .await;
    let hub = mesh.hub_url();
    let (code, out, err) = omnirelay(&["verify", NS, "--hub", &hub]).await;
    assert_eq!(code, 1, "a tampered log is corrupt: {out}{err}");
    assert!(out.contains("CORRUPT"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_queue_items_are_shown_redriven_and_purged() {
    const NS: &str = "resourcelease.deadletters";
    let mut mesh = Mesh::start(NS).await;
    let node = mesh.node_url();
    let target = ["--node", node.as_str(), "--principal", "ops", "--namespace", NS];
    let mut dead = Vec::new();
    for n in 0..4 {
        mesh.enqueue(NS, &format!("item-{n}")).await;
    }
    for n in 0..3 {
        let handle = mesh.lease(NS, "worker-1").await;
        mesh.dead_letter(NS, handle.clone(), &format!("failure {n}")).await;
        dead.push(handle.item_id);
    }
    let held = mesh.lease(NS, "worker-2").await;
    mesh.enqueue(NS, "item-4").await;

    let view = omnirelay_json(&["queue", "show", NS, "--node", &node]).await;
    assert_eq!(
        (view["pending"].as_u64(), view["active"].as_u64(), view["dead_letters"].as_u64()),
        (Some(1), Some(1), Some(3))
    );
    let lease = &view["leased_items"][0]["lease"];
    assert_eq!(lease["owner"], held.owner, "{view}");
    assert_eq!(lease["fencing_token"], held.fencing_token, "{view}");
    assert!(lease["expires_at"].is_string(), "{view}");
    assert_eq!(ids(&view["dead_letter_items"], true), dead.iter().cloned().collect(), "{view}");
    assert!(view["pending_items"][0]["payload"]["body"].as_str().unwrap_or("").is_empty(), "no bodies: {view}");
    let (code, text, err) = omnirelay(&["queue", "show", NS, "--node", &node]).await;
    assert_eq!(code, 0, "{err}");
    assert!(text.contains(&held.owner) && !text.contains('{'), "{text}");
    let (code, _, err) = omnirelay(&["queue", "show", "resourcelease.absent", "--node", &node]).await;
    assert_ne!(code, 0);
    assert!(err.contains("not hosted"), "{err}");

    let mut args = vec!["dead-letters", "list"];
    args.extend(target);
    let listed = omnirelay_json(&args).await;
    let listed_ids: Vec<String> = listed["dead_letters"]
        .as_array()
        .expect("list")
        .iter()
        .map(|l| l["item"]["item_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(listed_ids, dead, "oldest first: {listed}");
    assert_eq!(listed["more"], false);
    args.extend(["--limit", "2"]);
    let first_two = omnirelay_json(&args).await;
    assert_eq!(first_two["dead_letters"].as_array().map(Vec::len), Some(2));
    assert_eq!(first_two["more"], true);

    let mut args = vec!["dead-letters", "show"];
    args.extend(target);
    args.push(&dead[1]);
    let shown = omnirelay_json(&args).await;
    let history = shown["item"]["history"].as_array().expect("history");
    assert_eq!(history.len(), 1, "{shown}");
    assert!(history[0]["owner"].as_str().is_some_and(|owner| owner.ends_with("worker-1")), "{shown}");
    assert_eq!(history[0]["outcome"], "ATTEMPT_OUTCOME_FAILED");
    assert_eq!(history[0]["error"], "failure 1");
    let (code, text, err) = omnirelay(&args).await;
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("failure 1") && text.contains("worker-1"), "{text}");

    let mut args = vec!["dead-letters", "redrive"];
    args.extend(target);
    args.push(&dead[0]);
    let redriven = omnirelay_json(&args).await;
    assert_eq!(redriven["redriven"], serde_json::json!([dead[0]]));
    let stats = mesh.stats(NS).await;
    assert_eq!((stats.pending, stats.dead_letters), (2, 2));

    let mut args = vec!["dead-letters", "purge"];
    args.extend(target);
    args.push(&dead[1]);
    let purged = omnirelay_json(&args).await;
    assert_eq!(purged["purged"], 1);
    assert_eq!(mesh.stats(NS).await.dead_letters, 1);

    let mut args = vec!["dead-letters", "redrive", "--all"];
    args.extend(target);
    let all = omnirelay_json(&args).await;
    assert_eq!(all["redriven"], serde_json::json!([dead[2]]));
    let stats = mesh.stats(NS).await;
    assert_eq!((stats.pending, stats.dead_letters), (3, 0));

    for n in 0..2 {
        let handle = mesh.lease(NS, "worker-1").await;
        mesh.dead_letter(NS, handle, &format!("again {n}")).await;
    }
    let mut args = vec!["dead-letters", "purge", "--all"];
    args.extend(target);
    let purged = omnirelay_json(&args).await;
    assert_eq!(purged["purged"], 2);
    assert_eq!(mesh.stats(NS).await.dead_letters, 0);

    // Neither ids nor --all: refused before anything is sent.
    let mut args = vec!["dead-letters", "purge"];
    args.extend(target);
    let (code, _, err) = omnirelay(&args).await;
    assert_eq!(code, 2, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_commands_reach_a_mutual_tls_hub_with_an_operator_certificate() {
    const NS: &str = "resourcelease.tls";
    let pki = Pki::new();
    let mut mesh = Mesh::start_with(NS, Some(&pki), None).await;
    let first = mesh.enqueue(NS, "a").await;
    let second = mesh.enqueue(NS, "b").await;
    let head = mesh.last_sequence(NS).await;
    let hub = format!("https://{}", mesh.hub);
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("operator.pem"), pki.path("operator.key"));
    let tls = ["--hub", hub.as_str(), "--hub-ca", ca.as_str(), "--hub-cert", cert.as_str(), "--hub-key", key.as_str()];

    let mut args = vec!["verify", NS];
    args.extend(tls);
    let verified = omnirelay_json(&args).await;
    assert_eq!((verified["result"].as_str(), verified["events"].as_u64()), (Some("intact"), Some(head)), "{verified}");
    let mut args = vec!["inspect", NS];
    args.extend(tls);
    let now = omnirelay_json(&args).await;
    assert_eq!(ids(&now["state"]["pending_items"], false), [first, second].into_iter().collect(), "{now}");

    // A certificate the access table grants nothing: refused, so not
    // verified (neither intact nor corrupt).
    let (other_cert, other_key) = (pki.path("stranger.pem"), pki.path("stranger.key"));
    let stranger = ["verify", NS, "--hub", &hub, "--hub-ca", &ca, "--hub-cert", &other_cert, "--hub-key", &other_key];
    let (code, out, err) = omnirelay(&stranger).await;
    assert_eq!(code, 4, "{out}{err}");
    assert!(out.contains("PermissionDenied"), "{out}");
    // Without a client certificate the hub does not even take the call.
    let (code, out, err) = omnirelay(&["verify", NS, "--hub", &hub, "--hub-ca", &ca]).await;
    assert_eq!(code, 4, "{out}{err}");
    assert!(out.contains("UNVERIFIED"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_inspect_start_from_the_snapshot_once_retention_trimmed_the_log() {
    const NS: &str = "resourcelease.trimmed";
    let mut mesh = Mesh::start_with(NS, None, Some(RETENTION_EVERY)).await;
    let hub = mesh.hub_url();
    let mut pending = BTreeSet::new();
    for name in ["a", "b", "c"] {
        pending.insert(mesh.enqueue(NS, name).await);
    }
    let leased = mesh.lease(NS, "worker-1").await;
    pending.remove(&leased.item_id);
    let queue = mesh.node.queue(&ShardId::new(NS)).expect("hosted");
    let snapshot = queue.write_snapshot().await.expect("snapshot").expect("a snapshot was written").get();
    let at_snapshot = Held { pending: pending.clone(), leased: [leased.item_id.clone()].into(), dead: BTreeSet::new() };
    pending.insert(mesh.enqueue(NS, "d").await);
    let head = mesh.last_sequence(NS).await;

    let channel = Channel::from_shared(hub.clone()).expect("URI").connect().await.expect("connect");
    let hub_client = hub_pb::hub_client::HubClient::new(channel);
    omnirelay_tests::eventually("retention trims the events before the snapshot", HANG_GUARD, || {
        let mut client = hub_client.clone();
        async move {
            let request = hub_pb::ReadRangeRequest { shard_id: NS.into(), from_sequence: 1, to_sequence: 0, limit: 1 };
            match client.read_range(request).await {
                Err(status) if status.code() == tonic::Code::FailedPrecondition => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    let verified = omnirelay_json(&["verify", NS, "--hub", &hub]).await;
    assert_eq!(verified["result"], "intact", "{verified}");
    assert_eq!(
        (verified["from_snapshot"].as_bool(), verified["head"].as_u64()),
        (Some(true), Some(head)),
        "{verified}"
    );
    let report = omnirelay_json(&["inspect", NS, "--hub", &hub, "--at", &snapshot.to_string()]).await;
    assert_eq!(Held::of(&report["state"]), at_snapshot, "{report}");
    let report = omnirelay_json(&["inspect", NS, "--hub", &hub]).await;
    assert_eq!(report["snapshot"], snapshot, "{report}");
    assert_eq!((report["sequence"].as_u64(), report["head"].as_u64()), (Some(head), Some(head)), "{report}");
    assert_eq!(Held::of(&report["state"]).pending, pending, "{report}");
    let (code, _, err) = omnirelay(&["inspect", NS, "--hub", &hub, "--at", "1"]).await;
    assert_ne!(code, 0, "a point before the snapshot cannot be rebuilt once trimmed");
    assert!(err.contains("trimmed"), "{err}");
}

#[test]
fn the_readme_lists_every_command() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("read README.md");
    let table = readme
        .split("## Operate it")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the README's command table");
    let help = std::process::Command::new(BINARY).arg("--help").output().expect("run omnirelay --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .expect("a command list")
        .lines()
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    assert!(commands.len() > 10, "{help}");
    for command in commands {
        assert!(table.contains(&format!("`{command}")), "the README's table has no `{command}`");
    }
}
