//! Forwarding with real processes: three `omnirelay node --forward`
//! sidecars on one hub, callers authenticated by bearer tokens (no trusted
//! proxy), each node authenticating to the others with its own token and
//! listed by them with `--trusted-forwarder`. A call made to any node is
//! answered by the namespace's owner as the *caller* (its principal binds
//! the lease owner, its roles pass the owner's authorization); HTTP/JSON
//! calls are forwarded too; a node that is not trusted as a forwarder is
//! refused; and when the owner dies, its former peers stop calling it
//! (redirects, never a hang) until the namespace has a new owner.

use std::net::SocketAddr;
use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use omnirelay_proto::resourcelease::v1 as pb;
use omnirelay_tests::sidecar::Sidecar;
use omnirelay_tests::{WorkspaceBinaries, eventually, free_port};
use tonic::transport::Channel;

use crate::durable::{HANG_GUARD, Hub, payload};
use crate::mesh::{converged_on, mesh_node, rendezvous_owner};

/// Three namespaces, one owned by each of [`NODES`] (rendezvous hashing is
/// deterministic, so the names are picked for it): index `i` is owned by
/// `NODES[i]`.
fn namespaces() -> Vec<String> {
    NODES
        .iter()
        .map(|node| {
            (0..)
                .map(|n| format!("resourcelease.fwd.n{n}"))
                .find(|ns| rendezvous_owner(ns, NODES) == Some(*node))
                .expect("some name hashes to every node")
        })
        .collect()
}

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const ISSUER: &str = "https://sts.forward.test";
const AUDIENCE: &str = "omnirelay-mesh";

/// The token issuer of the test: signs callers' and nodes' tokens; the
/// nodes verify with its public key.
struct Issuer {
    signing: EncodingKey,
    public_pem: std::path::PathBuf,
}

impl Issuer {
    fn new(dir: &Path) -> Self {
        let key = rcgen::KeyPair::generate().expect("an EC key");
        let public_pem = dir.join("issuer.pem");
        std::fs::write(&public_pem, key.public_key_pem()).expect("write the public key");
        Self { signing: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("encoding key"), public_pem }
    }

    fn token(&self, subject: &str, roles: &[&str]) -> String {
        let exp = jsonwebtoken::get_current_timestamp() + 3600;
        let claims = serde_json::json!({ "sub": subject, "iss": ISSUER, "aud": AUDIENCE, "exp": exp, "roles": roles });
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.signing).expect("sign")
    }
}

/// A forwarding node: callers need the `worker` role for every procedure;
/// `trusted` are the node principals whose forwarded calls it accepts.
fn spawn(binary: &Path, dir: &Path, id: &str, hub: SocketAddr, issuer: &Issuer, namespaces: &[String]) -> Sidecar {
    let token_file = dir.join(format!("{id}.token"));
    std::fs::write(&token_file, issuer.token(id, &[])).expect("write the node's token");
    let names: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    let public_pem = issuer.public_pem.to_str().expect("a UTF-8 path");
    mesh_node(binary, dir, id, &format!("http://{hub}"), &names)
        .no_trusted_proxy()
        .authorization(r#"{"rules": [{"roles": ["worker"], "procedures": ["*"], "shards": ["*"]}]}"#)
        .args(&["--jwt-algorithm", "ES256", "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE])
        .args(&["--jwt-public-key", public_pem])
        // node-3 is not trusted as a forwarder by anyone.
        .args(&["--forward", "--trusted-forwarder", "node-1,node-2"])
        .args(&["--forward-token-file", token_file.to_str().expect("a UTF-8 path")])
        .spawn()
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ASCII"));
    request.set_timeout(std::time::Duration::from_secs(5));
    request
}

async fn client(node: &Sidecar) -> pb::resource_lease_client::ResourceLeaseClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", node.rpc)).expect("URI").connect().await.expect("connect");
    pb::resource_lease_client::ResourceLeaseClient::new(channel)
}

/// POSTs a JSON call with a bearer token; the status and the body.
async fn http_post(addr: SocketAddr, path: &str, token: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8_lossy(&response).to_string();
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_owner_forwards_as_the_caller_and_skips_a_dead_owner() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let db = omnirelay_tests::TestDb::new().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let issuer = Issuer::new(dir.path());
    let hub = Hub::start(&binaries.hub, db.url(), free_port()).await;
    let namespaces = namespaces();
    let names: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    let mut nodes: Vec<Sidecar> =
        NODES.iter().map(|id| spawn(&binaries.omnirelay, dir.path(), id, hub.grpc, &issuer, &namespaces)).collect();
    let owners = converged_on(&nodes.iter().collect::<Vec<_>>(), &names).await;
    let worker = issuer.token("spiffe://forward.test/worker-7", &["worker"]);

    // node-1's namespace, called through node-2 (trusted): the owner
    // answers, as the caller.
    let (ns, owner) = (namespaces[0].clone(), "node-1".to_string());
    assert_eq!(owners[&ns], owner);
    let forwarder_id = "node-2";
    let forwarder = nodes.iter().find(|node| node.id() == forwarder_id).expect("the forwarder");
    let owner_node = nodes.iter().find(|node| node.id() == owner).expect("the owner");
    let mut via = client(forwarder).await;
    let enqueued = via
        .enqueue(with_token(
            pb::EnqueueRequest { namespace: ns.clone(), payload: Some(payload("forwarded-1")), ..Default::default() },
            &worker,
        ))
        .await
        .unwrap_or_else(|status| {
            panic!(
                "the owner answers a forwarded enqueue: {status:?}\n{}\n{}",
                forwarder.describe(),
                owner_node.describe()
            )
        })
        .into_inner();
    assert!(!enqueued.item_id.is_empty());
    let stats = client(owner_node)
        .await
        .stats(with_token(pb::StatsRequest { namespace: ns.clone() }, &worker))
        .await
        .expect("stats at the owner")
        .into_inner();
    assert_eq!(stats.pending, 1, "the item is on the owner");
    let leased = via
        .lease(with_token(
            pb::LeaseRequest { namespace: ns.clone(), owner: "w1".into(), ..Default::default() },
            &worker,
        ))
        .await
        .expect("a forwarded lease")
        .into_inner()
        .item
        .expect("the item");
    let handle = leased.lease.expect("a lease handle");
    assert_eq!(
        handle.owner, "spiffe://forward.test/worker-7#w1",
        "the lease is bound to the caller, not the forwarder"
    );

    // HTTP/JSON is forwarded too (over gRPC to the owner).
    let (status, body) = http_post(
        forwarder.rpc,
        &format!("/resourcelease/v1/{ns}/enqueue"),
        &worker,
        r#"{"payload": {"resource_type": "t", "resource_id": "http-1", "request_id": "http-1"}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // So are a session's messages (each as a unary call to the owner).
    let message = pb::SessionRequest {
        id: 1,
        timeout: None,
        call: Some(pb::session_request::Call::Enqueue(pb::EnqueueRequest {
            namespace: ns.clone(),
            payload: Some(payload("session-1")),
            ..Default::default()
        })),
    };
    let mut opened = tonic::Request::new(tokio_stream::iter(vec![message]));
    opened.metadata_mut().insert("authorization", format!("Bearer {worker}").parse().expect("ASCII"));
    let mut answers = via.session(opened).await.expect("a session").into_inner();
    let answer = answers.message().await.expect("an answer").expect("one answer");
    assert!(matches!(answer.result, Some(pb::session_response::Result::Enqueue(_))), "{answer:?}");
    let stats = client(owner_node)
        .await
        .stats(with_token(pb::StatsRequest { namespace: ns.clone() }, &worker))
        .await
        .expect("stats at the owner")
        .into_inner();
    assert_eq!((stats.pending, stats.active), (2, 1), "the HTTP and session items are on the owner");

    // The owner refuses what node-3 vouches for: it is no trusted forwarder.
    let untrusted = nodes.iter().find(|node| node.id() == "node-3").expect("node-3");
    let refused = client(untrusted)
        .await
        .enqueue(with_token(
            pb::EnqueueRequest { namespace: ns.clone(), payload: Some(payload("via-node-3")), ..Default::default() },
            &worker,
        ))
        .await
        .expect_err("node-3's forwarded calls are refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // The lease completes through the forwarder.
    via.complete(with_token(pb::CompleteRequest { namespace: ns.clone(), handle: Some(handle) }, &worker))
        .await
        .expect("a forwarded complete");

    // The owner dies: the forwarder answers with the redirect to it (no
    // hang) until the namespace has a new owner, then forwards again.
    let position = nodes.iter().position(|node| node.id() == owner).expect("the owner");
    let killed = nodes.remove(position);
    let log = killed.kill().await;
    let forwarder = nodes.iter().find(|node| node.id() == forwarder_id).expect("the forwarder");
    let via = client(forwarder).await;
    let mut n = 0;
    eventually("the forwarder reaches the new owner", HANG_GUARD, || {
        n += 1;
        let request = pb::EnqueueRequest {
            namespace: ns.clone(),
            payload: Some(payload(&format!("after-kill-{n}"))),
            ..Default::default()
        };
        let mut via = via.clone();
        let request = with_token(request, &worker);
        async move {
            match via.enqueue(request).await {
                Ok(_) => Ok(()),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Unavailable, "while the owner is gone: {status:?}");
                    Err(format!("{status:?}"))
                }
            }
        }
    })
    .await;
    let survivors: Vec<&Sidecar> = nodes.iter().collect();
    let after = converged_on(&survivors, &names).await;
    assert_ne!(after[&ns], owner, "{ns} moved; the dead owner's log:\n{log}");
}
