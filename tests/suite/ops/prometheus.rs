//! One alert end to end: a real Prometheus server (Debian's package) scrapes
//! a hub and a node started by the test, with the alert catalog loaded; the
//! test stops the hub and OmniRelayHubDown fires, read from Prometheus' API.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use omnirelay_tests::sidecar::{Process, Sidecar, without_omnirelay_env};
use omnirelay_tests::{PrometheusTools, WorkspaceBinaries, free_port, workspace_root};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

use omnirelay_proto::hub::v1 as hub_pb;

use super::{HANG_GUARD, http_get, wait_for_ok};

/// `omnirelay-hub` on free loopback ports, on its embedded store or on
/// PostgreSQL (migrated first).
pub(super) struct Hub {
    pub(super) grpc: SocketAddr,
    pub(super) admin: SocketAddr,
    process: Process,
}

impl Hub {
    pub(super) fn start(binary: &Path, dir: &Path) -> Hub {
        Hub::spawn(binary, dir, &["--sqlite-path", &dir.join("hub.db").display().to_string()])
    }

    pub(super) async fn start_on_postgres(binary: &Path, dir: &Path, url: &str) -> Hub {
        let migrated = Command::new(binary)
            .args(["migrate", "--database-url", url, "--database-tls", "disable"])
            .output()
            .await
            .expect("run omnirelay-hub migrate");
        assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
        Hub::spawn(binary, dir, &["--database-url", url, "--database-tls", "disable"])
    }

    fn spawn(binary: &Path, dir: &Path, store: &[&str]) -> Hub {
        let (grpc, admin) = (free_port(), free_port());
        let mut command = Command::new(binary);
        command
            .current_dir(dir)
            .args(["--listen", &format!("127.0.0.1:{grpc}"), "--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(store)
            .args(["--log-format", "json"]);
        without_omnirelay_env(&mut command);
        Hub {
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            process: Process::spawn(command),
        }
    }

    /// Owns a shard, appends one event and subscribes to it, so the
    /// per-subscriber and live-tail series exist. The returned stream keeps
    /// the subscription open.
    pub(super) async fn exercise(&self) -> tonic::Streaming<hub_pb::SubscribeResponse> {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.grpc))
            .expect("valid URI")
            .connect()
            .await
            .expect("connect to the hub");
        let mut client = hub_pb::hub_client::HubClient::new(channel);
        // Not a namespace a node of these tests hosts: a node owns its shards.
        let shard = "resourcelease.ops-exercise".to_string();
        let lease = client
            .acquire_shard(hub_pb::AcquireShardRequest { shard_id: shard.clone(), owner: "ops-test".into(), ttl: None })
            .await
            .expect("acquire the shard")
            .into_inner();
        assert!(lease.granted, "{lease:?}");
        let epoch = lease.lease.expect("the lease").epoch;
        let event = omnirelay_proto::replication::v1::ReplicationEvent {
            principal: "ops".into(),
            peer_id: "ops-test".into(),
            recorded_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            event: Some(omnirelay_proto::replication::v1::replication_event::Event::Completed(
                omnirelay_proto::replication::v1::Completed { item_id: "item-1".into(), fencing_token: 1 },
            )),
            ..Default::default()
        };
        let batch = hub_pb::AppendRequest {
            batch_id: 1,
            shard_id: shard.clone(),
            producer_id: "ops-test".into(),
            producer_seq: 1,
            epoch,
            events: vec![omnirelay_proto::raw::RawEvent::encode(&event)],
            expected_first_sequence: 0,
        };
        let mut answers =
            client.append(tokio_stream::iter(vec![batch])).await.expect("open the append stream").into_inner();
        let answer = answers.message().await.expect("an append answer").expect("one answer");
        assert!(matches!(answer.result, Some(hub_pb::append_response::Result::Ack(_))), "{answer:?}");
        let mut events = client
            .subscribe(hub_pb::SubscribeRequest {
                subscriber_id: "ops-audit".into(),
                shard_ids: vec![shard],
                start: Some(hub_pb::StartPosition {
                    position: Some(hub_pb::start_position::Position::AfterSequence(0)),
                }),
                ..Default::default()
            })
            .await
            .expect("subscribe")
            .into_inner();
        let first = tokio::time::timeout(HANG_GUARD, events.message()).await.expect("an event within the guard");
        assert!(first.expect("the stream delivers").is_some(), "the subscription delivered nothing");
        events
    }

    pub(super) async fn stop(self) -> String {
        let (code, log) = self.process.terminate(HANG_GUARD).await;
        assert_eq!(code, Some(0), "{log}");
        log
    }
}

/// `omnirelay node` trusting callers on loopback to name themselves (as the
/// README's node does), with its diagnostics on their own port.
pub(super) struct Node {
    pub(super) rpc: SocketAddr,
    pub(super) control: SocketAddr,
    _node: Sidecar,
}

impl Node {
    pub(super) fn start(binary: &Path, dir: &Path) -> Node {
        Self::start_with(binary, dir, &[])
    }

    /// A node whose queues replicate to the hub at `grpc`.
    pub(super) fn start_on_hub(binary: &Path, dir: &Path, grpc: SocketAddr) -> Node {
        Self::start_with(binary, dir, &["--hub", &format!("http://{grpc}")])
    }

    fn start_with(binary: &Path, dir: &Path, extra: &[&str]) -> Node {
        let node = Sidecar::builder(binary, dir)
            .namespaces(&["resourcelease.users"])
            // Short leases, so the test can let a few expire and see the
            // worker ejected.
            .args(&["--lease-duration-ms", "200", "--max-attempts", "20"])
            .args(extra)
            .spawn();
        Node { rpc: node.rpc, control: node.control, _node: node }
    }

    /// Enqueues, leases and completes one item over HTTP/JSON, so the call
    /// and lease-wait histograms have series.
    pub(super) async fn exercise(&self) {
        let call = |procedure: &'static str, body: String| {
            let rpc = self.rpc;
            async move {
                let (status, answer) =
                    http_post(rpc, &format!("/resourcelease/v1/resourcelease.users/{procedure}"), &body)
                        .await
                        .unwrap_or_else(|err| panic!("{procedure}: {err}"));
                assert_eq!(status, 200, "{procedure}: {answer}");
                serde_json::from_str::<Value>(&answer).expect("JSON answer")
            }
        };
        call("enqueue", r#"{"payload": {"resource_type": "invoice", "resource_id": "42"}}"#.into()).await;
        let leased = call("lease", r#"{"owner": "worker-1", "wait": "5s"}"#.into()).await;
        let handle = &leased["item"]["lease"];
        assert!(handle.is_object(), "{leased}");
        call("complete", serde_json::json!({ "handle": handle }).to_string()).await;
    }

    /// Lets leases of one worker expire until the node ejects it, so the
    /// ejection counter has a series.
    pub(super) async fn eject_a_worker(&self) {
        let rpc = self.rpc;
        let post = |procedure: &'static str, body: &'static str| async move {
            let path = format!("/resourcelease/v1/resourcelease.users/{procedure}");
            let (status, answer) = http_post(rpc, &path, body).await.unwrap_or_else(|err| panic!("{procedure}: {err}"));
            assert_eq!(status, 200, "{procedure}: {answer}");
        };
        post("enqueue", r#"{"payload": {"resource_type": "invoice", "resource_id": "lost"}}"#).await;
        let deadline = tokio::time::Instant::now() + HANG_GUARD;
        loop {
            // Leased and never completed: each lease expires after 200 ms.
            post("lease", r#"{"owner": "forgetful", "wait": "2s"}"#).await;
            let (_, metrics) = http_get(self.control, "/metrics").await.expect("scrape the node");
            if metrics.contains("omnirelay_peer_ejections_total{") {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the worker was never ejected:\n{metrics}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// POSTs a JSON body as the loopback principal `ops`.
async fn http_post(addr: SocketAddr, path: &str, body: &str) -> Result<(u16, String), String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|err| format!("connect: {err}"))?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nx-client-principal: ops\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.map_err(|err| format!("write: {err}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(|err| format!("read: {err}"))?;
    let response = String::from_utf8(response).map_err(|err| format!("not UTF-8: {err}"))?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no status")?;
    Ok((status, super::dechunk_if(head, body)))
}

/// The alert catalog with every `for:` shortened to two seconds, so the test
/// sees an alert fire in seconds rather than minutes; the expressions, labels
/// and annotations are the shipped ones.
fn rules_with_short_for() -> String {
    let rules = std::fs::read_to_string(workspace_root().join("helm/omnirelay-hub/files/alerts/omnirelay.rules.yaml"))
        .expect("read the rules");
    rules
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 2s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// GETs a Prometheus API path and returns its `data`.
async fn api(prometheus: SocketAddr, path: &str) -> Option<Value> {
    let (status, body) = http_get(prometheus, path).await.ok()?;
    if status != 200 {
        return None;
    }
    let value: Value = serde_json::from_str(&body).ok()?;
    (value["status"] == "success").then(|| value["data"].clone())
}

/// Waits, within the hang guard, for `check` to hold on `path`'s data.
async fn wait_for(prometheus: SocketAddr, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    let mut last = Value::Null;
    while tokio::time::Instant::now() < deadline {
        if let Some(data) = api(prometheus, path).await {
            if check(&data) {
                return data;
            }
            last = data;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{what} did not happen within {HANG_GUARD:?}; last answer of {path}: {last}");
}

fn firing<'a>(alerts: &'a Value, name: &str) -> Vec<&'a Value> {
    alerts["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|alert| alert["labels"]["alertname"] == name && alert["state"] == "firing")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_hub_fires_the_hub_down_alert_in_a_real_prometheus() {
    let tools = PrometheusTools::find().unwrap_or_else(|err| panic!("{err}"));
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build)
        .await
        .expect("build task")
        .unwrap_or_else(|err| panic!("{err}"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let hub = Hub::start(&binaries.hub, dir.path());
    let node = Node::start(&binaries.omnirelay, dir.path());
    wait_for_ok(hub.admin, "/readyz").await;
    wait_for_ok(node.control, "/readyz").await;

    std::fs::write(dir.path().join("omnirelay.rules.yaml"), rules_with_short_for()).expect("write the rules");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
         rule_files: [omnirelay.rules.yaml]\n\
         scrape_configs:\n\
         \x20 - job_name: omnirelay-hub\n    static_configs: [{{targets: ['{}']}}]\n\
         \x20 - job_name: omnirelay-node\n    static_configs: [{{targets: ['{}']}}]\n",
        hub.admin, node.control
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("write the Prometheus configuration");
    let prometheus = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut command = Command::new(&tools.prometheus);
    command
        .current_dir(dir.path())
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address={prometheus}"));
    let server = Process::spawn(command);

    // Both targets are scraped (Prometheus parses both expositions) and the
    // catalog is loaded, with nothing firing.
    wait_for(prometheus, "/api/v1/targets", "both targets up", |data| {
        let active = data["activeTargets"].as_array().cloned().unwrap_or_default();
        active.len() == 2 && active.iter().all(|target| target["health"] == "up")
    })
    .await;
    let groups = wait_for(prometheus, "/api/v1/rules", "the rules loaded", |data| {
        data["groups"].as_array().is_some_and(|groups| groups.len() == 4)
    })
    .await;
    let loaded: usize =
        groups["groups"].as_array().into_iter().flatten().map(|g| g["rules"].as_array().map_or(0, Vec::len)).sum();
    assert!(loaded >= 16, "{groups}");
    wait_for(prometheus, "/api/v1/query?query=omnirelay_hub_ready", "a ready hub scraped", |data| {
        data["result"][0]["value"][1] == "1"
    })
    .await;
    let before = api(prometheus, "/api/v1/alerts").await.expect("the alerts API answers");
    assert!(firing(&before, "OmniRelayHubDown").is_empty(), "{before}");

    let hub_admin = hub.admin;
    hub.stop().await;
    let alerts = wait_for(prometheus, "/api/v1/alerts", "OmniRelayHubDown firing", |data| {
        !firing(data, "OmniRelayHubDown").is_empty()
    })
    .await;
    let alert = firing(&alerts, "OmniRelayHubDown")[0];
    assert_eq!(alert["labels"]["instance"], hub_admin.to_string(), "{alert}");
    assert_eq!(alert["labels"]["severity"], "critical", "{alert}");
    assert!(alert["annotations"]["runbook_url"].as_str().is_some_and(|url| url.ends_with("#omnirelayhubdown")));
    // The node is still up: nothing fires about it.
    assert!(firing(&alerts, "OmniRelayPeersUnhealthy").is_empty(), "{alerts}");
    drop(server);
}
