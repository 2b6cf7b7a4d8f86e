//! The `omnirelay-hub` binary as an operator runs it: configuration from
//! flags and environment, the embedded store by default, one process per
//! SQLite file, SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use omnirelay_tests::http::http_get;

/// Bound on waiting for the process (a hang guard, not a performance claim):
/// a debug build starting on a loaded machine takes a second or two.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The binary, with no `OMNIRELAY_HUB_*` variable inherited from the test
/// runner's environment.
fn hub_command(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_omnirelay-hub"));
    command.current_dir(cwd).kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if name.starts_with("OMNIRELAY_HUB_") {
            command.env_remove(name);
        }
    }
    command
}

/// A running `omnirelay-hub serve` and the addresses it reported.
struct HubProcess {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    log: tokio::task::JoinHandle<String>,
}

impl HubProcess {
    /// Starts the binary on ephemeral ports with JSON logs and waits for its
    /// "hub serving" line.
    async fn start(cwd: &Path, extra: &[&str]) -> HubProcess {
        let mut child = hub_command(cwd)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary should start");
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let mut seen = String::new();
        let serving = tokio::time::timeout(HANG_GUARD, async {
            while let Some(line) = lines.next_line().await.expect("read the hub's log") {
                seen.push_str(&line);
                seen.push('\n');
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if entry["fields"]["message"] == "hub serving" {
                    let address = |key: &str| {
                        entry["fields"][key].as_str().and_then(|a| a.parse().ok()).expect("a logged address")
                    };
                    return Some((address("grpc"), address("admin")));
                }
            }
            None
        })
        .await
        .expect("the hub should report serving within the guard");
        let Some((grpc, admin)) = serving else { panic!("the hub exited before serving; its log:\n{seen}") };
        // Keep draining the log so the hub never blocks on a full pipe.
        let log = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push_str(&line);
                seen.push('\n');
            }
            seen
        });
        HubProcess { child, grpc, admin, log }
    }

    /// Sends SIGTERM and returns the exit code and the whole log.
    async fn terminate(mut self) -> (Option<i32>, String) {
        let pid = self.child.id().expect("still running").to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().await.expect("run kill");
        assert!(killed.success(), "kill -TERM {pid}");
        let status =
            tokio::time::timeout(HANG_GUARD, self.child.wait()).await.expect("exit after SIGTERM").expect("wait");
        let log = tokio::time::timeout(HANG_GUARD, self.log).await.expect("log drained").expect("log task");
        (status.code(), log)
    }
}

#[tokio::test]
async fn the_binary_serves_the_embedded_store_by_default_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let hub = HubProcess::start(dir.path(), &[]).await;
    assert_eq!(http_get(hub.admin, "/readyz").await, Ok((200, "ready\n".into())));
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", hub.grpc))
        .expect("valid URI")
        .connect()
        .await
        .expect("connect");
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest { service: "omnirelay.hub.v1.Hub".into() })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(status, 1, "SERVING");
    assert!(
        dir.path().join(omnirelay_hub::defaults::SQLITE_PATH).exists(),
        "the default file in the working directory"
    );

    let (code, log) = hub.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("\"signal\":\"SIGTERM\"") && log.contains("hub stopped"), "{log}");
    assert!(log.contains("\"store\":\"sqlite omnirelay-hub.db\""), "the effective configuration is logged: {log}");
}

#[tokio::test]
async fn a_second_hub_process_on_the_same_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("shared.db");
    let file = file.to_str().expect("UTF-8 path");
    let first = HubProcess::start(dir.path(), &["--sqlite-path", file]).await;

    let second = tokio::time::timeout(
        HANG_GUARD,
        hub_command(dir.path())
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--sqlite-path", file])
            .output(),
    )
    .await
    .expect("the second hub should give up at once")
    .expect("run the second hub");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use by another omnirelay-hub") && stderr.contains("one replica"), "{stderr}");

    // The first one was not disturbed.
    assert_eq!(http_get(first.admin, "/readyz").await, Ok((200, "ready\n".into())));
    let (code, log) = first.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn configuration_comes_from_the_environment_with_flags_winning_and_secrets_redacted() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let output = hub_command(dir.path())
        .args(["config", "--admin-listen", "127.0.0.1:9101"])
        .env("OMNIRELAY_HUB_DATABASE_URL", "postgres://hub:hunter2@db.internal:5432/omnirelay")
        .env("OMNIRELAY_HUB_LISTEN", "0.0.0.0:9100")
        .env("OMNIRELAY_HUB_ADMIN_LISTEN", "0.0.0.0:9999")
        .env("OMNIRELAY_HUB_DATABASE_TLS", "require")
        .env("OMNIRELAY_HUB_SHUTDOWN_GRACE", "25s")
        .output()
        .await
        .expect("run omnirelay-hub config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    for line in [
        "listen = 0.0.0.0:9100",
        "admin-listen = 127.0.0.1:9101",
        "database-url = postgres://hub:***@db.internal:5432/omnirelay",
        "database-tls = require",
        "shutdown-grace = 25s",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("hunter2"), "{stdout}");
}

#[tokio::test]
async fn a_bad_setting_stops_the_hub_with_the_flag_named() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let from_env =
        hub_command(dir.path()).env("OMNIRELAY_HUB_DATABASE_POOL_SIZE", "0").output().await.expect("run the hub");
    let stderr = String::from_utf8_lossy(&from_env.stderr);
    assert_eq!(from_env.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--database-pool-size"), "{stderr}");

    let combination = hub_command(dir.path()).args(["--tls-cert", "server.pem"]).output().await.expect("run the hub");
    let stderr = String::from_utf8_lossy(&combination.stderr);
    assert_eq!(combination.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--tls-cert needs --tls-key"), "{stderr}");
    assert!(!dir.path().join(omnirelay_hub::defaults::SQLITE_PATH).exists(), "nothing was created");
}

/// An OTLP collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let mut spans = self.spans.lock().expect("test mutex");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_are_exported_over_otlp_health_checks_included() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let dir = tempfile::tempdir().expect("temporary directory");
    let hub = HubProcess::start(dir.path(), &["--otlp-endpoint", &endpoint]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", hub.grpc))
        .expect("valid URI")
        .connect()
        .await
        .expect("connect");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{trace_id}-{parent_id}-01").parse().expect("a valid header value"));
    HealthClient::new(channel).check(request).await.expect("health check");

    // Spans still buffered are flushed when the hub exits.
    let (code, log) = hub.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let spans = collector.spans.lock().expect("test mutex").clone();
    let span = spans
        .iter()
        .find(|span| span.name == "grpc.health.v1.Health/Check")
        .unwrap_or_else(|| panic!("no health span among {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>()));
    assert_eq!(attribute(span, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attribute(span, "rpc.service").as_deref(), Some("grpc.health.v1.Health"));
    assert_eq!(attribute(span, "rpc.method").as_deref(), Some("Check"));
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(&span.trace_id), trace_id, "the span continues the caller's trace");
    assert_eq!(hex(&span.parent_span_id), parent_id);
    server.abort();
}

#[tokio::test]
async fn verifying_a_shard_that_does_not_exist_exits_3_not_the_corruption_status() {
    use omnirelay_hub::store::LogStore as _;
    let dir = tempfile::tempdir().expect("temporary directory");
    // An existing store (verify refuses to create one) without the shard.
    let store = omnirelay_hub::store::sqlite::SqliteStore::open(&dir.path().join("verify.db")).await.expect("open");
    store.close().await.expect("close");
    let output = hub_command(dir.path())
        .args(["verify", "--shard", "resourcelease.nobody", "--sqlite-path", "verify.db"])
        .output()
        .await
        .expect("run omnirelay-hub verify");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no such shard"), "{stderr}");
}

#[tokio::test]
async fn verify_refuses_a_sqlite_path_that_does_not_exist() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let typo = dir.path().join("omnirelay-hbu.db");
    let output = hub_command(dir.path())
        .args(["verify", "--sqlite-path", typo.to_str().expect("UTF-8 path")])
        .output()
        .await
        .expect("run omnirelay-hub verify");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "a missing store is a failure, never `ok`: {stdout}{stderr}");
    assert!(stderr.contains("omnirelay-hbu.db") && stderr.contains("does not exist"), "{stderr}");
    assert!(!stdout.contains("no shards to verify"), "{stdout}");
    assert!(!typo.exists(), "verify must not create the store it was asked to check");
}

/// Whether this process runs as root, which ignores file permissions.
async fn running_as_root() -> bool {
    let id = Command::new("id").arg("-u").output().await.expect("run id -u");
    String::from_utf8_lossy(&id.stdout).trim() == "0"
}

#[tokio::test]
async fn a_read_only_store_file_is_reported_as_read_only_at_start() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hub.db");
    let created = omnirelay_hub::store::sqlite::SqliteStore::open(&path).await.expect("create");
    omnirelay_hub::store::LogStore::close(&created).await.expect("close");
    let path = path.to_str().expect("UTF-8 path").to_string();
    let args = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--sqlite-path", &path];
    let output = if running_as_root().await {
        // Root may write any file: run the hub as an unprivileged user who
        // can read the file and its directory but write neither.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("let others into the directory");
        let mut runuser = Command::new("runuser");
        runuser.args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_omnirelay-hub")]).args(args).kill_on_drop(true);
        for (name, _) in std::env::vars() {
            if name.starts_with("OMNIRELAY_HUB_") {
                runuser.env_remove(name);
            }
        }
        tokio::time::timeout(HANG_GUARD, runuser.output()).await
    } else {
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o444))
            .expect("make the file read-only");
        tokio::time::timeout(HANG_GUARD, hub_command(dir.path()).args(args).output()).await
    }
    .expect("the hub should give up at once")
    .expect("run the hub");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is read-only for this process") && stderr.contains(&path), "{stderr}");
    assert!(!stderr.contains("Error code"), "no bare SQLite code: {stderr}");
}

/// A line of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`, ...).
fn proc_memory(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let line = status.lines().find(|line| line.starts_with(field)).expect("the field is reported");
    let kib: usize = line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("a size in kB");
    kib * 1024
}

// About fifteen seconds: 64 MiB of events go to two dozen subscribers that
// never read.
#[tokio::test]
async fn a_replica_with_stalled_subscribers_stays_within_its_memory_budget() {
    use crate::support::{self, Appender};
    use omnirelay_hub::proto::hub::v1 as pb;
    const BUDGET: usize = 32 * 1024 * 1024;
    /// What the process may grow by beyond the budget: the append path (one
    /// batch at a time here), the allocator's own slack, SQLite's page cache.
    const SLACK: usize = 48 * 1024 * 1024;
    let dir = tempfile::tempdir().expect("temporary directory");
    let hub = HubProcess::start(dir.path(), &["--subscription-memory", "32MiB"]).await;
    let pid = hub.child.id().expect("running");
    let shard = "resourcelease.rss";
    let mut producer = support::client(hub.grpc).await;
    let epoch = support::acquire(&mut producer, shard, "node", Duration::from_secs(600)).await;
    let mut appender = Appender::open(&mut producer).await;
    let padding = "x".repeat(32 * 1024);
    let mut append = async |seq: u64| {
        let items: Vec<String> = (0..8).map(|i| format!("item-{seq}-{i}")).collect();
        let items: Vec<&str> = items.iter().map(String::as_str).collect();
        let mut request = support::batch(shard, "p", seq, epoch, &items);
        for event in &mut request.events {
            support::reshape(event, |event| {
                event.metadata.insert("padding".into(), padding.clone());
            });
        }
        support::ack(appender.append(request).await);
    };
    append(1).await;
    let baseline = proc_memory(pid, "VmRSS");

    // Two dozen subscriptions, a dozen per connection, that never read.
    let mut stalled = Vec::new();
    for connection in 0..2 {
        let mut client = support::client(hub.grpc).await;
        for i in 0..12 {
            let request = pb::SubscribeRequest {
                subscriber_id: format!("stalled-{connection}-{i}"),
                shard_ids: vec![shard.into()],
                start: Some(pb::StartPosition { position: Some(pb::start_position::Position::AfterSequence(0)) }),
                ..Default::default()
            };
            stalled.push(client.subscribe(request).await.expect("subscribe").into_inner());
        }
    }
    for seq in 2..=256 {
        append(seq).await;
    }
    let grown = proc_memory(pid, "VmHWM").saturating_sub(baseline);
    assert!(
        grown <= BUDGET + SLACK,
        "the hub grew by {} MiB (peak resident) with 64 MiB appended; the budget is {} MiB",
        grown >> 20,
        BUDGET >> 20
    );
    drop(stalled);
    let (code, log) = hub.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}
