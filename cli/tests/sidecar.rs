//! The sidecar as operators run it: configuration precedence through the
//! real binary, a node served in-process and driven with the operator
//! commands, and a graceful stop on SIGTERM.

use std::process::Command;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use omnirelay_cli::control::Target;
use omnirelay_cli::node::{self, FileConfig, NodeArgs, SidecarConfig};
use omnirelay_tests::eventually;
use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_omnirelay");

fn print_config(dir: &std::path::Path, env: &[(&str, &str)], flags: &[&str]) -> Value {
    let output = Command::new(BINARY)
        .args(["node", "--print-config", "--config"])
        .arg(dir.join("node.toml"))
        .args(flags)
        .envs(env.iter().copied())
        .env_remove("HOSTNAME")
        .output()
        .expect("run omnirelay node --print-config");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("the effective configuration is JSON")
}

#[test]
fn flags_override_the_environment_which_overrides_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("node.toml"),
        r#"
        node_id = "from-file"
        listen = "127.0.0.1:7001"
        namespaces = ["resourcelease", "resourcelease.users"]
        trusted_proxies = ["10.0.0.0/8"]
        [queue]
        capacity = 1000
        high_watermark = 800
        low_watermark = 600
        "#,
    )
    .expect("write config");
    let file_only = print_config(dir.path(), &[], &[]);
    assert_eq!(file_only["node_id"], "from-file");
    assert_eq!(file_only["listen"], "127.0.0.1:7001");
    assert_eq!(file_only["queues"][1]["namespace"], "resourcelease.users");
    assert_eq!(file_only["queues"][1]["capacity"], 1000);

    let env = [
        ("OMNIRELAY_NODE_ID", "from-env"),
        ("OMNIRELAY_NODE_CAPACITY", "2000"),
        ("OMNIRELAY_NODE_NAMESPACES", "resourcelease.billing,resourcelease.users"),
        ("OMNIRELAY_NODE_TRUSTED_PROXIES", "127.0.0.1,::1"),
    ];
    let with_env = print_config(dir.path(), &env, &[]);
    assert_eq!(with_env["node_id"], "from-env");
    assert_eq!(with_env["queues"][0]["namespace"], "resourcelease.billing");
    assert_eq!(with_env["queues"][0]["capacity"], 2000);
    assert_eq!(with_env["queues"][0]["high_watermark"], 800, "what the environment leaves alone comes from the file");
    assert_eq!(with_env["trusted_proxies"], json!(["127.0.0.1", "::1"]));
    assert_eq!(with_env["listen"], "127.0.0.1:7001");

    let with_flags =
        print_config(dir.path(), &env, &["--node-id", "from-flag", "--capacity", "3000", "--listen", "127.0.0.1:7002"]);
    assert_eq!(with_flags["node_id"], "from-flag");
    assert_eq!(with_flags["queues"][0]["capacity"], 3000);
    assert_eq!(with_flags["listen"], "127.0.0.1:7002");

    // A bad value fails naming the key, before anything listens.
    let output = Command::new(BINARY).args(["node", "--print-config", "--namespace", "users"]).output().expect("run");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("queues[0].shard"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn operator_commands_drive_a_sidecar_served_in_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = rcgen::KeyPair::generate().expect("key");
    let public_key = dir.path().join("issuer.pem");
    std::fs::write(&public_key, key.public_key_pem()).expect("write key");
    let file: FileConfig = toml::from_str(&format!(
        r#"
        node_id = "sidecar-1"
        namespaces = ["resourcelease", "resourcelease.users"]
        [jwt]
        algorithm = "ES256"
        public_key = "{}"
        issuer = "https://sts.test"
        audience = "omnirelay"
        [[authorization.rules]]
        roles = ["operator"]
        procedures = ["*"]
        shards = ["*"]
        "#,
        public_key.display()
    ))
    .expect("valid TOML");
    let config = SidecarConfig::merge(&NodeArgs::default(), file).expect("merges");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (rpc_addr, control_addr) = (listener.local_addr().expect("addr"), control.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(node::run(config, listener, Some(control), async {
        let _ = stopped.await;
    }));

    let now = i64::try_from(jsonwebtoken::get_current_timestamp()).expect("fits");
    let claims =
        json!({"sub": "ops", "iss": "https://sts.test", "aud": "omnirelay", "exp": now + 600, "roles": ["operator"]});
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("signing key"),
    )
    .expect("sign");
    let rpc = Target { node: format!("http://{rpc_addr}"), token: Some(token) };
    let diagnostics = Target { node: format!("http://{control_addr}"), token: None };

    eventually("the sidecar answers", Duration::from_secs(10), || async {
        diagnostics.get("/omnirelay/control/replication").await.map_err(|err| format!("{err:#}"))
    })
    .await;
    for id in ["1", "2"] {
        rpc.call("resourcelease.users", "enqueue", &json!({"payload": {"resource_type": "t", "resource_id": id}}))
            .await
            .expect("enqueue");
    }
    let leased = rpc.call("resourcelease.users", "lease", &json!({"owner": "w"})).await.expect("lease");
    assert_eq!(leased["item"]["lease"]["owner"], "ops#w");

    let health = diagnostics.get(omnirelay_client::node::LEASE_HEALTH_PATH).await.expect("lease health");
    assert_eq!(health["node_id"], "sidecar-1");
    assert!(omnirelay_cli::control::render_health(&health).contains("ops#w"));
    let replication = diagnostics.get(omnirelay_client::node::REPLICATION_PATH).await.expect("replication");
    assert_eq!(replication["namespaces"]["resourcelease.users"]["last_sequence"], 3);
    // Diagnostics live on their own listener only.
    assert!(rpc.get(omnirelay_client::node::REPLICATION_PATH).await.is_err());

    // Drain one namespace and restore its snapshot into the other.
    let drained =
        rpc.call("resourcelease.users", "drain", &json!({"mode": "DRAIN_MODE_HAND_BACK"})).await.expect("drain");
    assert_eq!(drained["snapshot"]["items"].as_array().map(Vec::len), Some(2));
    let restored =
        rpc.call("resourcelease", "restore", &json!({"snapshot": drained["snapshot"]})).await.expect("restore");
    assert_eq!(restored["restored"], 2);
    let refused = rpc.call("resourcelease.users", "lease", &json!({"owner": "w"})).await.expect_err("draining");
    assert!(format!("{refused:#}").contains("failed_precondition"), "{refused:#}");

    let _ = stop.send(());
    serving.await.expect("joins").expect("the sidecar stops cleanly");
}

#[test]
fn the_binary_stops_gracefully_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut child = Command::new(BINARY)
        .args(["node", "--listen", &format!("127.0.0.1:{port}"), "--namespace", "resourcelease"])
        .env("OMNIRELAY_LOG", "warn")
        .spawn()
        .expect("start omnirelay node");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let target = Target { node: format!("http://127.0.0.1:{port}"), token: None };
    runtime.block_on(eventually("the node is listening", Duration::from_secs(20), || async {
        target.get("/omnirelay/control/lease-health").await.map_err(|err| format!("{err:#}"))
    }));
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("the node exits");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn print_config_into_a_closed_pipe_exits_quietly() {
    // `omnirelay node --print-config | head`: the reader is gone before the
    // node writes (its end of the pipe is closed before the start).
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let output = Command::new(BINARY)
        .args(["node", "--print-config", "--namespace", "resourcelease"])
        .stdout(writer)
        .output()
        .expect("run omnirelay node --print-config");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
}
