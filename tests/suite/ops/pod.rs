//! Runs a container the chart rendered as a local process, the way a
//! container runtime would: the image's binary with the rendered command,
//! arguments and environment, Secret values and volumes supplied by the test,
//! each declared container port mapped to a free loopback port, the mount
//! paths mapped to folders of a temporary directory. Then its probes are run
//! against it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use omnirelay_tests::sidecar::{Process, without_omnirelay_env};
use serde_json::Value;
use tokio::process::Command;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{HANG_GUARD, http_get};

/// What the test supplies in place of the cluster: Secret values by
/// `(secret, key)`, the files of Secrets mounted as volumes, the ConfigMaps
/// (the chart's own, as rendered) and the pod's name.
#[derive(Debug, Default)]
pub(super) struct Cluster {
    pub(super) secret_values: BTreeMap<(String, String), String>,
    pub(super) secret_files: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pub(super) config_maps: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

/// The pod name the downward API gives the container (`metadata.name`).
pub(super) const POD_NAME: &str = "omnirelay-test-pod-0";

/// A container ready to start.
pub(super) struct Prepared {
    pub(super) args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    /// Container port name (or number) to the loopback address it is mapped to.
    pub(super) ports: BTreeMap<String, SocketAddr>,
    container: Value,
}

impl Prepared {
    /// Maps the container's ports, mounts and environment onto this machine.
    /// Panics (failing the test) on anything the chart renders that a real
    /// cluster could not satisfy either: a Secret the test did not supply,
    /// an environment source it does not know, a declared port nothing
    /// listens on.
    pub(super) fn new(container: &Value, cluster: &Cluster, root: &Path) -> Prepared {
        let mut ports = BTreeMap::new();
        let mut replacements: Vec<(String, String, String)> = Vec::new();
        for port in container["ports"].as_array().into_iter().flatten() {
            let number = port["containerPort"].as_u64().expect("a containerPort");
            let address = SocketAddr::from(([127, 0, 0, 1], omnirelay_tests::free_port()));
            let name = port["name"].as_str().map_or_else(|| number.to_string(), str::to_string);
            ports.insert(name.clone(), address);
            ports.insert(number.to_string(), address);
            replacements.push((format!("0.0.0.0:{number}"), address.to_string(), name));
        }
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for mount in container["mounts"].as_array().into_iter().flatten() {
            let mount_path = mount["mount_path"].as_str().expect("a mountPath");
            let target = root.join(mount_path.trim_start_matches('/'));
            let volume = &mount["volume"];
            let files = if let Some(secret) = volume["secret"]["secretName"].as_str() {
                Some(
                    cluster
                        .secret_files
                        .get(secret)
                        .unwrap_or_else(|| panic!("the chart mounts Secret {secret}, which the test did not supply")),
                )
            } else if let Some(map) = volume["configMap"]["name"].as_str() {
                Some(
                    cluster
                        .config_maps
                        .get(map)
                        .unwrap_or_else(|| panic!("the chart mounts ConfigMap {map}, which it does not render")),
                )
            } else if volume.get("emptyDir").is_some() || volume.get("persistentVolumeClaim").is_some() {
                None
            } else {
                panic!("unsupported volume source for {mount_path}: {volume}")
            };
            match (mount["sub_path"].as_str(), files) {
                // One key of the volume, mounted as a file.
                (Some(key), Some(files)) => {
                    let contents =
                        files.get(key).unwrap_or_else(|| panic!("{mount_path}: the volume has no key {key}"));
                    std::fs::create_dir_all(target.parent().expect("a parent")).expect("create the mount's folder");
                    std::fs::write(&target, contents).expect("write the mounted file");
                }
                (Some(_), None) => panic!("{mount_path}: subPath of an empty volume"),
                (None, files) => {
                    std::fs::create_dir_all(&target).expect("create the mount's folder");
                    for (key, contents) in files.into_iter().flatten() {
                        std::fs::write(target.join(key), contents).expect("write a volume's file");
                    }
                }
            }
            mounts.push((mount_path.to_string(), target));
        }
        let mut used = std::collections::BTreeSet::new();
        let mut map = |value: &str| -> String {
            let mut value = value.to_string();
            for (from, to, name) in &replacements {
                if value.contains(from.as_str()) {
                    used.insert(name.clone());
                    value = value.replace(from.as_str(), to);
                }
            }
            for (mount_path, dir) in &mounts {
                if let Some(rest) = value.strip_prefix(mount_path.as_str()) {
                    value = format!("{}{rest}", dir.display());
                }
            }
            value
        };
        let mut env: Vec<(String, String)> = Vec::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("an env name").to_string();
            let value = if let Some(value) = var["value"].as_str() {
                // Kubernetes expands `$(NAME)` with variables defined
                // earlier in the list.
                let mut value = map(value);
                for (earlier, earlier_value) in &env {
                    value = value.replace(&format!("$({earlier})"), earlier_value.as_str());
                }
                value
            } else if let Some(reference) = var["valueFrom"]["secretKeyRef"].as_object() {
                let key = (
                    reference["name"].as_str().expect("a Secret name").to_string(),
                    reference["key"].as_str().expect("a Secret key").to_string(),
                );
                cluster
                    .secret_values
                    .get(&key)
                    .unwrap_or_else(|| panic!("{name} reads Secret {key:?}, which the test did not supply"))
                    .clone()
            } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "metadata.name" => POD_NAME.to_string(),
                    // The pod runs on loopback here.
                    "status.podIP" => "127.0.0.1".to_string(),
                    other => panic!("{name} reads the pod's {other}, which the test does not supply"),
                }
            } else {
                panic!("unsupported environment source for {name}: {var}");
            };
            env.push((name, value));
        }
        let args: Vec<String> =
            container["args"].as_array().into_iter().flatten().map(|a| map(a.as_str().expect("string args"))).collect();
        for (_, _, name) in &replacements {
            assert!(
                used.contains(name),
                "container port {name} is declared but no argument or variable makes the binary listen on it"
            );
        }
        Prepared { args, env, ports, container: container.clone() }
    }

    /// Starts `binary` with the container's arguments and environment (and
    /// no other `OMNIRELAY_*` variable), in `cwd`.
    pub(super) fn spawn(&self, binary: &Path, cwd: &Path) -> Process {
        let mut command = Command::new(binary);
        without_omnirelay_env(command.current_dir(cwd).args(&self.args));
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        Process::spawn(command)
    }

    /// Runs the container to completion; returns its exit code and log.
    pub(super) async fn run_to_end(&self, binary: &Path, cwd: &Path) -> (Option<i32>, String) {
        let mut process = self.spawn(binary, cwd);
        let status = tokio::time::timeout(HANG_GUARD, process.wait())
            .await
            .expect("the container should finish within the guard")
            .expect("wait for the container");
        (status.code(), process.log().await)
    }

    /// Runs each probe the container declares (startup, liveness,
    /// readiness) until it succeeds, within its own budget (failure
    /// threshold times period) capped by the hang guard. Returns what was
    /// probed, for the test's assertions.
    pub(super) async fn pass_probes(&self) -> Vec<String> {
        let mut probed = Vec::new();
        for kind in ["startup_probe", "liveness_probe", "readiness_probe"] {
            let probe = &self.container[kind];
            if probe.is_null() {
                continue;
            }
            let period = probe["periodSeconds"].as_u64().unwrap_or(10);
            let threshold = probe["failureThreshold"].as_u64().unwrap_or(3);
            let budget = Duration::from_secs(period * threshold).min(HANG_GUARD).max(Duration::from_secs(10));
            let deadline = tokio::time::Instant::now() + budget;
            let (what, mut last) = (self.describe(probe), String::new());
            loop {
                match self.probe_once(probe).await {
                    Ok(()) => break,
                    Err(err) if tokio::time::Instant::now() >= deadline => {
                        panic!("{kind} ({what}) kept failing for {budget:?}: {err}")
                    }
                    Err(err) => last = err,
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = last;
            probed.push(format!("{kind}: {what}"));
        }
        probed
    }

    fn port(&self, port: &Value) -> SocketAddr {
        let key = port.as_str().map_or_else(|| port.to_string(), str::to_string);
        *self
            .ports
            .get(&key)
            .unwrap_or_else(|| panic!("a probe names port {key}, which the container does not declare"))
    }

    fn describe(&self, probe: &Value) -> String {
        if let Some(http) = probe.get("httpGet") {
            format!("GET {} on port {}", http["path"].as_str().unwrap_or("/"), http["port"])
        } else if let Some(grpc) = probe.get("grpc") {
            format!("gRPC health {:?} on port {}", grpc["service"].as_str().unwrap_or(""), grpc["port"])
        } else {
            format!("unsupported probe {probe}")
        }
    }

    async fn probe_once(&self, probe: &Value) -> Result<(), String> {
        if let Some(http) = probe.get("httpGet") {
            let address = self.port(&http["port"]);
            let path = http["path"].as_str().unwrap_or("/");
            // Kubernetes counts 200 to 399 as success.
            match http_get(address, path).await? {
                (status, _) if (200..400).contains(&status) => Ok(()),
                (status, body) => Err(format!("{status} {body}")),
            }
        } else if let Some(grpc) = probe.get("grpc") {
            let address = self.port(&grpc["port"]);
            let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
                .map_err(|err| err.to_string())?
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await
                .map_err(|err| format!("connect: {err}"))?;
            let service = grpc["service"].as_str().unwrap_or("").to_string();
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest { service })
                .await
                .map_err(|status| format!("check: {status}"))?
                .into_inner()
                .status;
            if status == 1 { Ok(()) } else { Err(format!("status {status}, not SERVING")) }
        } else {
            panic!("unsupported probe {probe}")
        }
    }
}
