//! `omnirelay node` sidecars for the integration suites: one builder for
//! every way a suite starts a node, and the process handle the suites kill,
//! stop or pause.
//!
//! ```no_run
//! # async fn demo(binary: &std::path::Path, dir: &std::path::Path) {
//! use omnirelay_tests::sidecar::Sidecar;
//!
//! let node = Sidecar::builder(binary, dir)
//!     .node_id("node-a")
//!     .namespaces(&["resourcelease.users"])
//!     .hub("http://127.0.0.1:7400")
//!     .shard_lease_ttl_ms(3_000)
//!     .start()
//!     .await;
//! let mut client = node.client().await;
//! # let _ = &mut client;
//! let log = node.kill().await; // SIGKILL
//! # let _ = log;
//! # }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omnirelay_proto::resourcelease::v1::resource_lease_client::ResourceLeaseClient;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::http::http_get;
use crate::{eventually, free_port};

/// Bound on waiting for a process or a probe (a hang guard, not a
/// performance claim): debug builds on a loaded two-core machine take a few
/// seconds to start, more to recover a shard.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// The authorization table every sidecar gets: any principal may call any
/// procedure on any shard. Callers name themselves with
/// `x-client-principal`, which the node trusts from loopback only.
const ALLOW_ALL: &str = r#"{"rules": [{"principals": ["*"], "procedures": ["*"], "shards": ["*"]}]}"#;

/// A started process whose standard output is discarded and whose standard
/// error is collected (for failure messages); killed when dropped.
pub struct Process {
    child: Child,
    /// The standard error read so far (shared with the task reading it).
    log: Arc<Mutex<String>>,
    /// The reading task: done when the process closes its standard error.
    reader: tokio::task::JoinHandle<()>,
}

impl Process {
    /// Starts `command` as it is configured (environment included).
    pub fn spawn(mut command: Command) -> Process {
        command.kill_on_drop(true).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("the binary should start");
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let reader = tokio::spawn({
            let log = Arc::clone(&log);
            async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut log = log.lock().expect("the log lock");
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        Process { child, log, reader }
    }

    /// The standard error read so far, without waiting (for a failure
    /// message about a process that may still run).
    pub fn log_so_far(&self) -> String {
        self.log.lock().expect("the log lock").clone()
    }

    /// `None` while the process runs; once it has exited, how (`exit code
    /// N`, `killed by signal N`, or `gone` when it was reaped): read from
    /// `/proc` (a zombie's wait status is the last field of its `stat`),
    /// so it needs no `&mut`.
    pub fn exited(&self) -> Option<String> {
        let Some(pid) = self.child.id() else { return Some("gone".into()) };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Some("gone".into()) };
        // The state follows the command name, which is in parentheses.
        let rest = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        if !rest.starts_with('Z') {
            return None;
        }
        let status: Option<i32> = rest.split_whitespace().last().and_then(|last| last.parse().ok());
        Some(match status {
            Some(status) if status & 0x7f != 0 => format!("killed by signal {}", status & 0x7f),
            Some(status) => format!("exit code {}", (status >> 8) & 0xff),
            None => "exited".into(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("a running child has a pid")
    }

    /// Sends `signal` (as `kill` spells it: `-STOP`, `-CONT`, `-TERM`).
    pub fn signal(&self, signal: &str) {
        let pid = self.pid();
        let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGKILL, and the log so far.
    pub async fn kill(mut self) -> String {
        self.child.kill().await.expect("kill -9");
        self.log().await
    }

    /// Sends SIGTERM and waits for the exit, at most `grace`; returns the
    /// exit code and the log. Panics (with the log) when the process
    /// outlives the grace.
    pub async fn terminate(mut self, grace: Duration) -> (Option<i32>, String) {
        if self.child.id().is_some() {
            self.signal("-TERM");
        }
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                let _ = self.child.kill().await;
                panic!("the process did not stop within {grace:?} of SIGTERM; log:\n{}", self.log().await)
            }
        };
        (status.code(), self.log().await)
    }

    /// Waits for the process to exit on its own.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// The log, once the process has exited (or closed its stderr).
    pub async fn log(&mut self) -> String {
        let _ = (&mut self.reader).await;
        self.log_so_far()
    }
}

/// Removes every `OMNIRELAY_*` variable the test process inherited from
/// `command`'s environment, so a binary reads its flags only.
/// The one exception is [`CHILD_LOG_ENV`], handed on as `OMNIRELAY_LOG`.
pub fn without_omnirelay_env(command: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars() {
        if name.starts_with("OMNIRELAY_") {
            command.env_remove(name);
        }
    }
    if let Ok(filter) = std::env::var(CHILD_LOG_ENV) {
        command.env("OMNIRELAY_LOG", filter);
    }
    command
}

/// Set when running tests (e.g. `OMNIRELAY_TEST_CHILD_LOG=debug`), the log
/// filter of every binary the suites start, whose logs their failure
/// messages print; `info` otherwise.
pub const CHILD_LOG_ENV: &str = "OMNIRELAY_TEST_CHILD_LOG";

/// Waits until `GET path` answers 200, within the [`HANG_GUARD`].
pub async fn wait_for_ok(addr: SocketAddr, path: &str) {
    eventually(&format!("GET {path} answers 200"), HANG_GUARD, || async {
        match http_get(addr, path).await {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// How to start an `omnirelay node` sidecar: on loopback (free ports unless
/// [`ports`](Self::ports) fixes them), in its own directory, trusting
/// callers on loopback to name themselves and allowing every call, with no
/// `OMNIRELAY_*` variable of the test's environment.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until spawned or started"]
pub struct SidecarBuilder {
    binary: PathBuf,
    dir: PathBuf,
    node_id: Option<String>,
    namespaces: Vec<String>,
    ports: Option<(u16, u16)>,
    replicator: Vec<String>,
    shard_lease_ttl_ms: Option<u64>,
    args: Vec<String>,
    trusted_proxy: bool,
    authorization: String,
}

impl SidecarBuilder {
    /// Does not trust loopback as a proxy: callers must authenticate
    /// (client certificate or token, configured with [`args`](Self::args)).
    pub fn no_trusted_proxy(mut self) -> Self {
        self.trusted_proxy = false;
        self
    }

    /// The authorization table (JSON) instead of allowing every call.
    pub fn authorization(mut self, json: &str) -> Self {
        self.authorization = json.to_string();
        self
    }

    /// `--node-id`; without it the node picks its own (`HOSTNAME`, else a
    /// default).
    pub fn node_id(mut self, id: &str) -> Self {
        self.node_id = Some(id.to_string());
        self
    }

    /// The namespaces the node hosts (`--namespace`, comma-separated).
    pub fn namespaces(mut self, namespaces: &[&str]) -> Self {
        self.namespaces = namespaces.iter().map(|ns| ns.to_string()).collect();
        self
    }

    /// Listens on `rpc` (gRPC and HTTP/JSON) and `control` (diagnostics):
    /// a node restarted on the ports it had.
    pub fn ports(mut self, rpc: u16, control: u16) -> Self {
        self.ports = Some((rpc, control));
        self
    }

    /// Replicates to the hub endpoints `urls` (`--hub`, comma-separated).
    pub fn hub(mut self, urls: &str) -> Self {
        self.replicator = vec!["--hub".into(), urls.into()];
        self
    }

    /// Trusts the hub certificates signed by the CA in the PEM file `ca`
    /// and, with `client = Some((cert, key))`, presents that certificate
    /// (mutual TLS).
    pub fn hub_tls(mut self, ca: &str, client: Option<(&str, &str)>) -> Self {
        self.args.extend(["--hub-ca".into(), ca.into()]);
        if let Some((cert, key)) = client {
            self.args.extend(["--hub-cert".into(), cert.into(), "--hub-key".into(), key.into()]);
        }
        self
    }

    /// Replicates to its own SQLite log at `path` instead of a hub.
    pub fn sqlite(mut self, path: &Path) -> Self {
        let path = path.to_str().expect("a UTF-8 path");
        self.replicator = vec!["--replicator".into(), "sqlite".into(), "--replicator-path".into(), path.into()];
        self
    }

    /// The shard (and member) lease TTL: short, so a test waits little for
    /// a dead node's leases to lapse.
    pub fn shard_lease_ttl_ms(mut self, ttl: u64) -> Self {
        self.shard_lease_ttl_ms = Some(ttl);
        self
    }

    /// More flags, passed as they are.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|arg| arg.to_string()));
        self
    }

    /// Starts the node; does not wait for it (see [`Sidecar::ready`]).
    pub fn spawn(self) -> Sidecar {
        assert!(!self.namespaces.is_empty(), "a sidecar hosts at least one namespace");
        let (rpc, control) = self.ports.unwrap_or_else(|| (free_port(), free_port()));
        // A file of its own, written whole before the node starts: nodes
        // sharing a folder once shared one file, which the next spawn
        // truncated and rewrote while a node started before it read it
        // (the node then exited, refusing an empty authorization table).
        let authz = self.dir.join(format!("authz-{rpc}.json"));
        let partial = self.dir.join(format!("authz-{rpc}.json.partial"));
        std::fs::write(&partial, &self.authorization).expect("write the authorization table");
        std::fs::rename(&partial, &authz).expect("move the authorization table into place");
        let mut command = Command::new(&self.binary);
        command
            .current_dir(&self.dir)
            .args(["node", "--listen", &format!("127.0.0.1:{rpc}")])
            .args(["--control-listen", &format!("127.0.0.1:{control}")])
            .args(["--namespace", &self.namespaces.join(",")]);
        if self.trusted_proxy {
            command.args(["--trusted-proxy", "127.0.0.1"]);
        }
        if let Some(id) = &self.node_id {
            command.args(["--node-id", id]);
        }
        command.args(&self.replicator);
        if let Some(ttl) = self.shard_lease_ttl_ms {
            command.args(["--shard-lease-ttl-ms", &ttl.to_string()]);
        }
        command.args(&self.args).arg("--authorization-file").arg(&authz);
        without_omnirelay_env(&mut command);
        Sidecar {
            id: self.node_id,
            rpc: SocketAddr::from(([127, 0, 0, 1], rpc)),
            control: SocketAddr::from(([127, 0, 0, 1], control)),
            process: Process::spawn(command),
        }
    }

    /// Starts the node and waits until it is ready.
    pub async fn start(self) -> Sidecar {
        let node = self.spawn();
        node.ready().await;
        node
    }
}

/// A running `omnirelay node`.
pub struct Sidecar {
    id: Option<String>,
    /// Its gRPC and HTTP/JSON address.
    pub rpc: SocketAddr,
    /// Its diagnostics address (`/readyz`, `/metrics`, `/omnirelay/control/...`).
    pub control: SocketAddr,
    process: Process,
}

impl Sidecar {
    /// A builder for `binary` (the `omnirelay` CLI) running in `dir`, where
    /// it writes its authorization table.
    pub fn builder(binary: &Path, dir: &Path) -> SidecarBuilder {
        SidecarBuilder {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            node_id: None,
            namespaces: Vec::new(),
            ports: None,
            replicator: Vec::new(),
            shard_lease_ttl_ms: None,
            args: Vec::new(),
            trusted_proxy: true,
            authorization: ALLOW_ALL.to_string(),
        }
    }

    /// The `--node-id` it was started with.
    pub fn id(&self) -> &str {
        self.id.as_deref().expect("the sidecar was started with a node id")
    }

    /// Waits until `/readyz` answers 200, within the [`HANG_GUARD`].
    pub async fn ready(&self) {
        wait_for_ok(self.control, "/readyz").await;
    }

    /// A gRPC client of its queues.
    pub async fn client(&self) -> ResourceLeaseClient<Channel> {
        let channel =
            Channel::from_shared(format!("http://{}", self.rpc)).expect("URI").connect().await.expect("connect");
        ResourceLeaseClient::new(channel)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends `signal` (`-STOP` pauses it, `-CONT` resumes it).
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    /// SIGKILL, and the log so far.
    pub async fn kill(self) -> String {
        self.process.kill().await
    }

    /// Its standard error so far, and whether it has exited: for the
    /// failure message of a wait that involved it.
    pub fn describe(&self) -> String {
        let state = self.process.exited().map_or_else(|| "running".to_string(), |how| format!("EXITED: {how}"));
        let name = self.id.as_deref().unwrap_or("a node");
        format!("--- {name} ({state}, rpc {}, control {}) ---\n{}", self.rpc, self.control, self.process.log_so_far())
    }

    /// SIGTERM and the exit within `grace`: the exit code and the log.
    pub async fn stop(self, grace: Duration) -> (Option<i32>, String) {
        self.process.terminate(grace).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exited_process_is_described_with_its_status_and_its_log() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'Error: a line on stderr' >&2; exit 3"]);
        let process = Process::spawn(command);
        let how = eventually("the process exits", Duration::from_secs(10), || async {
            process.exited().ok_or_else(|| "still running".to_string())
        })
        .await;
        assert_eq!(how, "exit code 3");
        eventually("its log is read", Duration::from_secs(10), || async {
            let log = process.log_so_far();
            if log.contains("Error: a line on stderr") { Ok(()) } else { Err(format!("log so far: {log:?}")) }
        })
        .await;
    }
}
