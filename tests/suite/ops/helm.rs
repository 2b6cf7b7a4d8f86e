//! The Helm charts under `helm/`, checked by Helm's own linter and renderer
//! (helm-python-sdk), Kubernetes' schemas (kubernetes-validate) and promtool
//! (`helm/tests/check_charts.py`), then the rendered containers started as
//! the real binaries and probed as the kubelet would.

use std::time::Duration;

use omnirelay_tests::{PgCluster, PgOptions, PgServerTls, PrometheusTools, PythonTools, WorkspaceBinaries};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use serde_json::Value;

use super::pod::{Cluster, Prepared};

/// The Kubernetes version the manifests are validated against (the chart's
/// `kubeVersion` floor).
const KUBERNETES_VERSION: &str = "1.30.0";

/// Runs the chart checks and returns the rendered workloads per chart and
/// values set. Fails (with the findings) when any check fails.
fn rendered() -> Value {
    let python = PythonTools::ensure().unwrap_or_else(|err| panic!("the chart tools are unavailable: {err}"));
    let promtool = PrometheusTools::find().unwrap_or_else(|err| panic!("{err}")).promtool;
    let root = omnirelay_tests::workspace_root();
    let promtool = promtool.to_str().expect("UTF-8 path").to_string();
    let helm = root.join("helm");
    let output = python
        .run_script(
            &helm.join("tests").join("check_charts.py"),
            &[helm.to_str().expect("UTF-8 path"), &promtool, KUBERNETES_VERSION],
        )
        .unwrap_or_else(|err| panic!("the charts failed their checks:\n{err}"));
    serde_json::from_str(&output).expect("the checks print JSON")
}

fn kinds(plan: &Value) -> Vec<&str> {
    plan["kinds"].as_array().expect("kinds").iter().filter_map(Value::as_str).collect()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"].as_array()?.iter().find(|var| var["name"] == name)
}

#[test]
fn charts_pass_helm_lint_render_and_kubernetes_schemas() {
    let charts = rendered();
    let hub = &charts["omnirelay-hub"];

    let default = &hub["default"];
    for kind in ["Deployment", "Service", "ServiceAccount"] {
        assert!(kinds(default).contains(&kind), "default values render a {kind}: {:?}", kinds(default));
    }
    for kind in ["Job", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(!kinds(default).contains(&kind), "default values render no {kind}: {:?}", kinds(default));
    }

    let production = &hub["production"];
    for kind in ["Deployment", "Service", "Job", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "ConfigMap"]
    {
        assert!(kinds(production).contains(&kind), "production values render a {kind}: {:?}", kinds(production));
    }
    let deployment = &production["workloads"]["Deployment"];
    assert_eq!(deployment["replicas"], 3);
    let hub_container = &deployment["containers"][0];
    // Credentials only by reference: the URL comes from a Secret, never inline.
    let url = env(hub_container, "OMNIRELAY_HUB_DATABASE_URL").expect("the database URL is set");
    assert!(url.get("value").is_none() && url["valueFrom"]["secretKeyRef"].is_object(), "{url}");
    // Non-root, read-only root file system, nothing to escalate.
    assert_eq!(deployment["pod_security_context"]["runAsNonRoot"], true);
    assert_eq!(hub_container["security_context"]["readOnlyRootFilesystem"], true);
    assert_eq!(hub_container["security_context"]["allowPrivilegeEscalation"], false);

    let job = &production["workloads"]["Job"];
    let hooks = job["annotations"]["helm.sh/hook"].as_str().expect("the migration Job is a hook");
    assert!(hooks.contains("pre-install") && hooks.contains("pre-upgrade"), "{hooks}");
    assert_eq!(job["containers"][0]["args"], serde_json::json!(["migrate"]));

    let node = &charts["omnirelay-node"];
    for values in ["default", "production", "sqlite"] {
        for kind in ["ConfigMap", "Deployment", "Service"] {
            assert!(kinds(&node[values]).contains(&kind), "node chart, {values}: {:?}", kinds(&node[values]));
        }
    }
    // The SQLite replicator: a claim, mounted where the flags put the log,
    // and a pod replaced rather than rolled (one node holds the file).
    for values in ["default", "production"] {
        assert!(!kinds(&node[values]).contains(&"PersistentVolumeClaim"), "node chart, {values}: no claim");
    }
    let sqlite = &node["sqlite"];
    assert!(kinds(sqlite).contains(&"PersistentVolumeClaim"), "{:?}", kinds(sqlite));
    let deployment = &sqlite["workloads"]["Deployment"];
    assert_eq!(deployment["strategy"]["type"], "Recreate");
    let container = &deployment["containers"][0];
    assert_eq!(env(container, "OMNIRELAY_NODE_REPLICATOR").expect("the replicator is set")["value"], "sqlite");
    let path = env(container, "OMNIRELAY_NODE_REPLICATOR_PATH").expect("the log path is set")["value"]
        .as_str()
        .expect("a path")
        .to_string();
    let mount = container["mounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|mount| path.starts_with(&format!("{}/", mount["mount_path"].as_str().unwrap_or("-"))))
        .unwrap_or_else(|| panic!("no volume holds {path}: {container}"));
    let claim = mount["volume"]["persistentVolumeClaim"]["claimName"].as_str().expect("the log is on a claim");
    assert!(claim.ends_with("-log"), "{claim}");
    assert_eq!(deployment["pod_security_context"]["fsGroup"], 65532, "the node may write the claim");

    // The dashboards ConfigMap carries every dashboard file of the chart.
    let dashboards = production["config_maps"]
        .as_object()
        .and_then(|maps| maps.values().next())
        .and_then(Value::as_object)
        .expect("a dashboards ConfigMap");
    let files = std::fs::read_dir(omnirelay_tests::workspace_root().join("helm/omnirelay-hub/files/dashboards"))
        .expect("the dashboards folder")
        .count();
    assert_eq!(dashboards.len(), files, "{:?}", dashboards.keys().collect::<Vec<_>>());
    for (name, json) in dashboards {
        let dashboard: Value = serde_json::from_str(json.as_str().expect("text")).expect("dashboards are JSON");
        assert!(dashboard["title"].is_string() && dashboard["panels"].is_array(), "{name}");
    }
}

/// Every `OMNIRELAY_HUB_*` variable the container sets is one the binary
/// declares (clap ignores unknown variables, so a misspelt one would be
/// silently dropped).
async fn assert_variables_are_declared(hub: &std::path::Path, container: &Value) {
    let subcommand = container["args"][0].as_str().expect("a subcommand");
    let help = tokio::process::Command::new(hub).args([subcommand, "--help"]).output().await.expect("run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for var in container["env"].as_array().expect("env") {
        let name = var["name"].as_str().expect("name");
        if name.starts_with("OMNIRELAY_HUB_") {
            assert!(
                help.contains(&format!("[env: {name}")),
                "`omnirelay-hub {subcommand}` declares no {name}:\n{help}"
            );
        }
    }
}

fn termination_grace(workload: &Value) -> Duration {
    Duration::from_secs(workload["termination_grace_period_seconds"].as_u64().unwrap_or(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_serves_with_the_rendered_default_deployment() {
    let charts = rendered();
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build)
        .await
        .expect("build task")
        .unwrap_or_else(|err| panic!("{err}"));
    let deployment = &charts["omnirelay-hub"]["default"]["workloads"]["Deployment"];
    let container = &deployment["containers"][0];
    assert_variables_are_declared(&binaries.hub, container).await;

    let root = tempfile::tempdir().expect("temporary directory");
    let prepared = Prepared::new(container, &Cluster::default(), root.path());
    // The image's working directory is read-only: the store must go to the
    // mounted volume, not the working directory.
    let cwd = root.path().join("workdir");
    std::fs::create_dir_all(&cwd).expect("working directory");
    let process = prepared.spawn(&binaries.hub, &cwd);
    let probed = prepared.pass_probes().await;
    assert!(probed.iter().any(|p| p.starts_with("startup_probe: gRPC health")), "{probed:?}");
    assert_eq!(probed.len(), 3, "{probed:?}");
    assert!(
        root.path().join("var/lib/omnirelay/omnirelay-hub.db").exists(),
        "the embedded store lives on the mounted volume"
    );
    assert!(std::fs::read_dir(&cwd).expect("read the working directory").next().is_none(), "nothing written there");

    let (code, log) = process.terminate(termination_grace(deployment)).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("hub stopped"), "{log}");
}

/// A throwaway CA issuing the database's, the hub's and a client's
/// certificates.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "omnirelay chart test ca");
        let key = KeyPair::generate().expect("CA key");
        Self { ca: CertifiedIssuer::self_signed(params, key).expect("CA certificate") }
    }

    /// A certificate for `localhost` and 127.0.0.1: (certificate, key) PEM.
    fn localhost(&self, name: &str) -> (String, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().expect("valid DNS name")),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("signing");
        (cert.pem(), key.serialize_pem())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_migrates_and_serves_with_the_rendered_production_deployment() {
    let charts = rendered();
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build)
        .await
        .expect("build task")
        .unwrap_or_else(|err| panic!("{err}"));
    let production = &charts["omnirelay-hub"]["production"];
    let job = &production["workloads"]["Job"]["containers"][0];
    let deployment = &production["workloads"]["Deployment"];
    let container = &deployment["containers"][0];
    assert_variables_are_declared(&binaries.hub, job).await;
    assert_variables_are_declared(&binaries.hub, container).await;

    // What the cluster would hold: PostgreSQL with TLS (verify-full), and the
    // Secrets the production values name.
    let pki = Pki::new();
    let (db_cert, db_key) = pki.localhost("postgres");
    let tls = PgServerTls { cert_pem: db_cert, key_pem: db_key };
    let database = tokio::task::spawn_blocking(move || PgCluster::start_with_tls(PgOptions::default(), &tls))
        .await
        .expect("cluster task")
        .unwrap_or_else(|err| panic!("PostgreSQL with TLS unavailable: {err}"));
    let (hub_cert, hub_key) = pki.localhost("hub");
    let mut cluster = Cluster::default();
    cluster.secret_values.insert(("omnirelay-hub-database".into(), "url".into()), database.url("postgres"));
    let ca = pki.ca.pem().into_bytes();
    cluster.secret_files.insert("omnirelay-database-ca".into(), [("ca.crt".to_string(), ca.clone())].into());
    cluster.secret_files.insert("omnirelay-mesh-ca".into(), [("ca.crt".to_string(), ca)].into());
    cluster.secret_files.insert(
        "omnirelay-hub-tls".into(),
        [("tls.crt".to_string(), hub_cert.into_bytes()), ("tls.key".to_string(), hub_key.into_bytes())].into(),
    );

    let root = tempfile::tempdir().expect("temporary directory");
    // The pre-install hook first: the schema, over verify-full TLS.
    let migrate = Prepared::new(job, &cluster, &root.path().join("migrate"));
    let (code, log) = migrate.run_to_end(&binaries.hub, root.path()).await;
    assert_eq!(code, Some(0), "the migration Job failed:\n{log}");
    assert!(log.contains("schema is up to date"), "{log}");

    // Then a replica: ready means PostgreSQL answered over verify-full TLS
    // with the schema current; the gRPC port serves mutual TLS.
    let prepared = Prepared::new(container, &cluster, &root.path().join("hub"));
    let process = prepared.spawn(&binaries.hub, root.path());
    let probed = prepared.pass_probes().await;
    assert_eq!(probed.len(), 3, "{probed:?}");
    let (code, log) = process.terminate(termination_grace(deployment)).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains(r#""tls":"mutual""#), "the gRPC port serves mutual TLS: {log}");
    assert!(log.contains("hub stopped"), "{log}");
}

/// The chart's rendered ConfigMaps, as the cluster would hold them.
fn config_maps(plan: &Value) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<u8>>> {
    plan["config_maps"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, data)| {
            let files = data
                .as_object()
                .into_iter()
                .flatten()
                .map(|(key, text)| (key.clone(), text.as_str().unwrap_or_default().as_bytes().to_vec()))
                .collect();
            (name.clone(), files)
        })
        .collect()
}

/// Starts `omnirelay node` as the node chart renders it for `values`, passes
/// its probes, and returns its diagnostics' view of the queues it hosts.
async fn node_from_chart(values: &str, cluster: &mut Cluster) -> Value {
    node_from_chart_at(values, cluster, "/omnirelay/control/backpressure").await
}

/// As [`node_from_chart`], returning the diagnostics at `path`.
async fn node_from_chart_at(values: &str, cluster: &mut Cluster, path: &str) -> Value {
    let charts = rendered();
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build)
        .await
        .expect("build task")
        .unwrap_or_else(|err| panic!("{err}"));
    let plan = &charts["omnirelay-node"][values];
    let deployment = &plan["workloads"]["Deployment"];
    let container = &deployment["containers"][0];
    cluster.config_maps = config_maps(plan);

    let root = tempfile::tempdir().expect("temporary directory");
    let prepared = Prepared::new(container, cluster, root.path());
    let process = prepared.spawn(&binaries.omnirelay, root.path());
    let probed = prepared.pass_probes().await;
    assert_eq!(probed.len(), 2, "{probed:?}");
    let control = prepared.ports["control"];
    let body = super::wait_for_ok(control, path).await;
    let (code, log) = process.terminate(termination_grace(deployment)).await;
    assert_eq!(code, Some(0), "{log}");
    serde_json::from_str(&body).expect("JSON diagnostics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_with_the_rendered_default_deployment() {
    let diagnostics = node_from_chart("default", &mut Cluster::default()).await;
    assert_eq!(diagnostics["node_id"], super::pod::POD_NAME, "{diagnostics}");
    let namespaces: Vec<&String> = diagnostics["namespaces"].as_object().expect("namespaces").keys().collect();
    assert_eq!(namespaces, ["resourcelease"], "{diagnostics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_mutual_tls_with_the_rendered_production_deployment() {
    let pki = Pki::new();
    let (cert, key) = pki.localhost("node");
    let mut cluster = Cluster::default();
    cluster.secret_files.insert("omnirelay-mesh-ca".into(), [("ca.crt".to_string(), pki.ca.pem().into_bytes())].into());
    cluster.secret_files.insert(
        "omnirelay-node-tls".into(),
        [("tls.crt".to_string(), cert.into_bytes()), ("tls.key".to_string(), key.into_bytes())].into(),
    );
    let diagnostics = node_from_chart("production", &mut cluster).await;
    let high = &diagnostics["namespaces"]["resourcelease.billing"]["current"]["high"];
    assert_eq!(high, 40000, "the configuration file's queue settings apply: {diagnostics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_keeps_its_queues_in_sqlite_with_the_rendered_sqlite_deployment() {
    let replication = node_from_chart_at("sqlite", &mut Cluster::default(), "/omnirelay/control/replication").await;
    let namespaces = replication["namespaces"].as_object().expect("namespaces");
    assert!(!namespaces.is_empty(), "{replication}");
    for (namespace, state) in namespaces {
        assert_eq!(state["replicator"], "sqlite", "{namespace}: {replication}");
    }
}
