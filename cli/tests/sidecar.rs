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
    let rpc = Target { token: Some(token), ..Target::new(format!("http://{rpc_addr}")) };
    let diagnostics = Target::new(format!("http://{control_addr}"));

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
    let target = Target::new(format!("http://127.0.0.1:{port}"));
    runtime.block_on(eventually("the node is listening", Duration::from_secs(20), || async {
        target.get("/omnirelay/control/lease-health").await.map_err(|err| format!("{err:#}"))
    }));
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("the node exits");
    assert!(status.success(), "exit status {status}");
}

/// Serves a node in-process from `toml` on a loopback port until `stop`.
async fn serve(
    toml: &str,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let file: FileConfig = toml::from_str(toml).expect("valid TOML");
    let config = SidecarConfig::merge(&NodeArgs::default(), file).expect("merges");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(node::run(config, listener, None, async {
        let _ = stopped.await;
    }));
    (address, stop, serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_names_its_principal_to_a_node_that_trusts_loopback() {
    // The README's development node: callers on loopback name themselves.
    let (address, stop, serving) = serve(
        r#"
        namespaces = ["resourcelease"]
        trusted_proxies = ["127.0.0.1"]
        [[authorization.rules]]
        principals = ["*"]
        procedures = ["*"]
        shards = ["*"]
        "#,
    )
    .await;
    let url = format!("http://{address}");
    let probe = Target::new(url.clone());
    eventually("the node answers", Duration::from_secs(10), || async {
        probe.get(omnirelay_client::node::REPLICATION_PATH).await.map_err(|err| format!("{err:#}"))
    })
    .await;
    let cli = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(BINARY).args(&args).env_remove("OMNIRELAY_PRINCIPAL").output().expect("run omnirelay")
        })
    };
    let without = cli(vec!["drain".into(), "--node".into(), url.clone(), "--hand-back".into()]).await.expect("joins");
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(!without.status.success() && stderr.contains("--principal"), "the refusal says what to do: {stderr}");

    let drained = cli(vec![
        "drain".into(),
        "--node".into(),
        url.clone(),
        "--hand-back".into(),
        "--principal".into(),
        "ops".into(),
    ])
    .await
    .expect("joins");
    assert!(drained.status.success(), "{}", String::from_utf8_lossy(&drained.stderr));
    let resumed = cli(vec![
        "--output".into(),
        "json".into(),
        "resume".into(),
        "--node".into(),
        url,
        "--principal".into(),
        "ops".into(),
    ])
    .await
    .expect("joins");
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let answer: Value = serde_json::from_slice(&resumed.stdout).expect("--output json prints JSON");
    assert_eq!(answer["resumed"], true, "{answer}");

    let _ = stop.send(());
    serving.await.expect("joins").expect("the node stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_an_https_node_with_a_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "mesh ca");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
    let issue = |name: &str, sans: Vec<SanType>| {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca).expect("sign");
        let (cert_path, key_path) = (dir.path().join(format!("{name}.crt")), dir.path().join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).expect("write");
        std::fs::write(&key_path, key.serialize_pem()).expect("write");
        (cert_path, key_path)
    };
    let (server_cert, server_key) = issue(
        "node",
        vec![SanType::DnsName("localhost".try_into().expect("dns")), SanType::IpAddress([127, 0, 0, 1].into())],
    );
    let (client_cert, client_key) =
        issue("ops", vec![SanType::URI("spiffe://omnirelay.test/ops".try_into().expect("uri"))]);
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).expect("write");

    let (address, stop, serving) = serve(&format!(
        r#"
        namespaces = ["resourcelease"]
        client_certs = "required"
        [tls]
        cert = "{}"
        key = "{}"
        client_ca = "{}"
        [[authorization.rules]]
        principals = ["spiffe://omnirelay.test/ops"]
        procedures = ["*"]
        shards = ["*"]
        "#,
        server_cert.display(),
        server_key.display(),
        ca_file.display()
    ))
    .await;
    let target = Target {
        ca_file: Some(ca_file.clone()),
        client_cert: Some(client_cert),
        client_key: Some(client_key),
        ..Target::new(format!("https://localhost:{}", address.port()))
    };
    let health = eventually("the node answers over TLS", Duration::from_secs(10), || async {
        target.get(omnirelay_client::node::LEASE_HEALTH_PATH).await.map_err(|err| format!("{err:#}"))
    })
    .await;
    assert!(health["summary"].is_object(), "{health}");
    let enqueued = target
        .call("resourcelease", "enqueue", &json!({"payload": {"resource_type": "t", "resource_id": "1"}}))
        .await
        .expect("the certificate's principal is allowed");
    assert_eq!(enqueued["deduplicated"], false, "{enqueued}");

    // Without a client certificate the node refuses the handshake.
    let anonymous = Target { ca_file: Some(ca_file), ..Target::new(format!("https://localhost:{}", address.port())) };
    assert!(anonymous.call("resourcelease", "stats", &json!({})).await.is_err());
    // And the CLI refuses a node whose certificate it cannot verify.
    let unverified = Target::new(format!("https://localhost:{}", address.port()));
    let err = unverified.get(omnirelay_client::node::LEASE_HEALTH_PATH).await.expect_err("unknown CA");
    assert!(format!("{err:#}").contains("TLS handshake"), "{err:#}");

    let _ = stop.send(());
    serving.await.expect("joins").expect("the node stops cleanly");
}

#[test]
fn the_node_writes_no_colour_codes_into_logs_that_are_not_a_terminal() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let child = Command::new(BINARY)
        .args(["node", "--listen", &format!("127.0.0.1:{port}"), "--namespace", "resourcelease"])
        .env("OMNIRELAY_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start omnirelay node");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let target = Target::new(format!("http://127.0.0.1:{port}"));
    runtime.block_on(eventually("the node is listening", Duration::from_secs(20), || async {
        target.get("/omnirelay/control/lease-health").await.map_err(|err| format!("{err:#}"))
    }));
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let output = child.wait_with_output().expect("the node exits");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!log.is_empty(), "the node logs at info");
    assert!(!log.contains('\u{1b}'), "escape sequences in a piped log:\n{log}");
}

#[test]
fn completions_are_printed_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let output = Command::new(BINARY).args(["completions", shell]).output().expect("run omnirelay completions");
        assert!(output.status.success(), "{shell}: {}", String::from_utf8_lossy(&output.stderr));
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(script.contains("omnirelay") && script.contains("backpressure"), "{shell}: {script}");
    }
}

/// Replaces every `"<name>"` in a request body by the JSON captured under
/// that name.
fn fill(body: &str, captured: &std::collections::BTreeMap<String, Value>) -> Value {
    let mut text = body.to_string();
    for (name, value) in captured {
        text = text.replace(&format!("\"<{name}>\""), &value.to_string());
    }
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("example body is not JSON after filling: {err}: {text}"))
}

/// Checks `actual` against the documented answer: every documented field
/// must be there with that value (arrays element by element); `"<name>"`
/// captures the actual value, or must equal what was captured before.
fn matches(
    expected: &Value,
    actual: &Value,
    captured: &mut std::collections::BTreeMap<String, Value>,
    path: &str,
) -> Result<(), String> {
    if let Some(name) = expected.as_str().and_then(|s| s.strip_prefix('<')).and_then(|s| s.strip_suffix('>')) {
        if actual.is_null() {
            return Err(format!("{path}: documented as <{name}> but absent"));
        }
        return match captured.get(name) {
            Some(before) if before != actual => Err(format!("{path}: <{name}> was {before}, now {actual}")),
            _ => {
                captured.insert(name.to_string(), actual.clone());
                Ok(())
            }
        };
    }
    match (expected, actual) {
        (Value::Object(fields), Value::Object(got)) => {
            for (key, value) in fields {
                matches(value, got.get(key).unwrap_or(&Value::Null), captured, &format!("{path}.{key}"))?;
            }
            Ok(())
        }
        (Value::Array(items), Value::Array(got)) if items.len() == got.len() => {
            for (index, (value, item)) in items.iter().zip(got).enumerate() {
                matches(value, item, captured, &format!("{path}[{index}]"))?;
            }
            Ok(())
        }
        _ if expected == actual => Ok(()),
        _ => Err(format!("{path}: documented {expected}, answered {actual}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_json_examples_of_the_mesh_node_guide_hold() {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/mesh-node.md"))
        .expect("read docs/mesh-node.md");
    let block = guide
        .split("<!-- examples: begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- examples: end -->").next())
        .expect("the guide's examples block");
    let block = block.trim().trim_start_matches("```text").trim_end_matches("```");
    let examples: Vec<Vec<&str>> =
        block.split("\n\n").map(|example| example.lines().filter(|l| !l.trim().is_empty()).collect()).collect();

    let (address, stop, serving) = serve(
        r#"
        namespaces = ["resourcelease", "resourcelease.users"]
        trusted_proxies = ["127.0.0.1"]
        [[authorization.rules]]
        principals = ["*"]
        procedures = ["*"]
        shards = ["*"]
        "#,
    )
    .await;
    let node = Target { principal: Some("billing".into()), ..Target::new(format!("http://{address}")) };
    eventually("the node answers", Duration::from_secs(10), || async {
        node.get(omnirelay_client::node::REPLICATION_PATH).await.map_err(|err| format!("{err:#}"))
    })
    .await;

    let mut procedures = std::collections::BTreeSet::new();
    let mut captured = std::collections::BTreeMap::new();
    for example in &examples {
        let [request, body, answer] = example[..] else { panic!("an example is three lines: {example:?}") };
        let path = request.strip_prefix("POST /resourcelease/v1/").expect("a POST to the JSON surface");
        let (namespace, procedure) = path.split_once('/').expect("namespace/procedure");
        let (status, expected) = answer.split_once(' ').expect("status and answer");
        assert_eq!(status, "200", "every example succeeds");
        let expected: Value = serde_json::from_str(expected).expect("the documented answer is JSON");
        let actual = node
            .call(namespace, procedure, &fill(body, &captured))
            .await
            .unwrap_or_else(|err| panic!("{request}: {err:#}"));
        matches(&expected, &actual, &mut captured, procedure)
            .unwrap_or_else(|err| panic!("{request}: {err}\n{actual}"));
        procedures.insert(procedure.to_string());
    }
    let every = [
        "enqueue",
        "lease",
        "heartbeat",
        "complete",
        "fail",
        "drain",
        "resume",
        "restore",
        "purge_drained",
        "list_dead_letters",
        "get_dead_letter",
        "redrive_dead_letter",
        "purge_dead_letters",
        "stats",
    ];
    for procedure in every {
        assert!(procedures.contains(procedure), "the guide has no example of {procedure}");
    }
    let _ = stop.send(());
    serving.await.expect("joins").expect("the node stops cleanly");
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
