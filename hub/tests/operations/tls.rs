//! TLS and mutual TLS on the gRPC port: who gets in, and which principal the
//! service sees.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omnirelay_hub::config::TlsFiles;
use omnirelay_hub::principal::Principal;
use omnirelay_hub::tls::{ServerTls, TlsError};
use omnirelay_hub::transport::{self, ConnectionInfo};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::pki::{Issued, Pki, dns, uri};

/// Bound of every client call here: the server is local, so anything slower
/// is a hang, not load.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A gRPC server with the health service, recording the connection info
/// tonic hands to each request. Aborted on drop.
struct TestServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Option<ConnectionInfo>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(tls: Option<ServerTls>) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let capture = tower::ServiceBuilder::new().map_request(move |request: http::Request<tonic::body::Body>| {
        record.lock().expect("not poisoned").push(request.extensions().get::<ConnectionInfo>().cloned());
        request
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = transport::incoming(listener, tls.map(Arc::new), tokio_util::sync::CancellationToken::new());
    let task = tokio::spawn(async move {
        let served =
            tonic::transport::Server::builder().layer(capture).add_service(health).serve_with_incoming(incoming).await;
        if let Err(err) = served {
            panic!("test server failed: {err}");
        }
    });
    TestServer { addr, seen, task }
}

async fn server_tls(pki: &Pki, client_ca: Option<&str>) -> ServerTls {
    let server = pki.server();
    let files = TlsFiles {
        cert: pki.write("server.pem", &server.cert_pem),
        key: pki.write("server.key", &server.key_pem),
        client_ca: client_ca.map(|pem| pki.write("client-ca.pem", pem)),
    };
    ServerTls::load(&files).await.expect("server TLS should load")
}

/// Calls Health/Check over TLS trusting `ca_pem`, presenting `identity`.
async fn health_check(addr: SocketAddr, ca_pem: &str, identity: Option<&Issued>) -> Result<i32, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .expect("valid URI")
        .tls_config(tls)
        .map_err(|err| format!("tls config: {err}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|err| format!("connect: {err:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map(|response| response.into_inner().status)
        .map_err(|status| format!("call: {status:?}"))
}

fn principals(server: &TestServer) -> Vec<Option<Principal>> {
    server
        .seen
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|info| info.as_ref().and_then(|i| i.principal.clone()))
        .collect()
}

#[tokio::test]
async fn mutual_tls_accepts_a_client_of_the_client_ca_and_binds_its_uri_principal() {
    let pki = Pki::new("hub test ca");
    let server = serve(Some(server_tls(&pki, Some(&pki.ca_pem())).await)).await;
    let client = pki.issue("not-the-principal", vec![dns("dispatcher.test"), uri("spiffe://test/sa/dispatcher")]);

    let status = health_check(server.addr, &pki.ca_pem(), Some(&client)).await.expect("the client should get in");
    assert_eq!(status, 1, "SERVING");
    assert_eq!(principals(&server), vec![Some(Principal::new("spiffe://test/sa/dispatcher"))]);
    let seen = server.seen.lock().expect("not poisoned");
    let info = seen[0].as_ref().expect("connection info should reach the service");
    assert_eq!(info.remote_addr.ip(), std::net::Ipv4Addr::LOCALHOST);
}

/// The identity layer's rule, the node's too: exactly one URI SAN. A DNS
/// name identifies a host, not a workload, and two URIs are ambiguous.
#[tokio::test]
async fn mutual_tls_refuses_a_certificate_without_exactly_one_uri_san() {
    let pki = Pki::new("hub test ca");
    let server = serve(Some(server_tls(&pki, Some(&pki.ca_pem())).await)).await;
    let dns_only = pki.issue("cn-is-ignored", vec![dns("worker-7.queues.test")]);
    let err = health_check(server.addr, &pki.ca_pem(), Some(&dns_only)).await.expect_err("no URI SAN, no entry");
    assert!(principals(&server).is_empty(), "no request should reach the service: {err}");
    let two = pki.issue("two", vec![uri("spiffe://test/sa/a"), uri("spiffe://test/sa/b")]);
    let err = health_check(server.addr, &pki.ca_pem(), Some(&two)).await.expect_err("two URI SANs, no entry");
    assert!(principals(&server).is_empty(), "no request should reach the service: {err}");
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let pki = Pki::new("hub test ca");
    let server = serve(Some(server_tls(&pki, Some(&pki.ca_pem())).await)).await;
    let err = health_check(server.addr, &pki.ca_pem(), None).await.expect_err("no certificate, no entry");
    assert!(principals(&server).is_empty(), "no request should reach the service: {err}");
}

#[tokio::test]
async fn mutual_tls_refuses_a_certificate_from_another_ca() {
    let pki = Pki::new("hub test ca");
    let intruder_ca = Pki::new("another ca");
    let server = serve(Some(server_tls(&pki, Some(&pki.ca_pem())).await)).await;
    let intruder = intruder_ca.issue("intruder", vec![uri("spiffe://test/sa/dispatcher")]);
    let err = health_check(server.addr, &pki.ca_pem(), Some(&intruder)).await.expect_err("wrong CA, no entry");
    assert!(principals(&server).is_empty(), "no request should reach the service: {err}");
}

#[tokio::test]
async fn mutual_tls_refuses_an_expired_certificate() {
    let pki = Pki::new("hub test ca");
    let server = serve(Some(server_tls(&pki, Some(&pki.ca_pem())).await)).await;
    let expired = pki.issue_expired(vec![uri("spiffe://test/sa/dispatcher")]);
    let err = health_check(server.addr, &pki.ca_pem(), Some(&expired)).await.expect_err("expired, no entry");
    assert!(principals(&server).is_empty(), "no request should reach the service: {err}");
}

#[tokio::test]
async fn mutual_tls_refuses_a_certificate_with_only_a_common_name() {
    let pki = Pki::new("hub test ca");
    let server = serve(Some(server_tls(&pki, Some(&pki.ca_pem())).await)).await;
    let nameless = pki.issue("spiffe://test/sa/dispatcher", vec![]);
    let err = health_check(server.addr, &pki.ca_pem(), Some(&nameless)).await.expect_err("no SAN, no principal");
    assert!(principals(&server).is_empty(), "no request should reach the service: {err}");
}

#[tokio::test]
async fn server_tls_without_a_client_ca_serves_anonymous_callers() {
    let pki = Pki::new("hub test ca");
    let server = serve(Some(server_tls(&pki, None).await)).await;
    health_check(server.addr, &pki.ca_pem(), None).await.expect("TLS without client auth");
    assert_eq!(principals(&server), vec![None]);
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_server_cannot_connect() {
    let pki = Pki::new("hub test ca");
    let server = serve(Some(server_tls(&pki, None).await)).await;
    let other = Pki::new("another ca");
    health_check(server.addr, &other.ca_pem(), None).await.expect_err("the client should refuse the server");
    // The server keeps serving others after a failed handshake.
    health_check(server.addr, &pki.ca_pem(), None).await.expect("a trusting client still gets in");
}

#[tokio::test]
async fn plaintext_connections_have_no_principal() {
    let server = serve(None).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .expect("valid URI")
        .connect()
        .await
        .expect("plaintext connect");
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.expect("plaintext call");
    assert_eq!(principals(&server), vec![None]);
}

#[tokio::test]
async fn tls_file_errors_name_the_flag_and_the_file() {
    let pki = Pki::new("hub test ca");
    let server = pki.server();
    let other = pki.server();
    let cert = pki.write("server.pem", &server.cert_pem);
    let key = pki.write("server.key", &server.key_pem);
    let missing = pki.write("placeholder", "").with_file_name("missing.pem");

    let err = ServerTls::load(&TlsFiles { cert: missing.clone(), key: key.clone(), client_ca: None })
        .await
        .expect_err("a missing certificate file should fail");
    assert!(matches!(err, TlsError::Read { flag: "--tls-cert", .. }), "{err:?}");
    assert!(err.to_string().contains("missing.pem"), "{err}");

    let err = ServerTls::load(&TlsFiles { cert: key.clone(), key: key.clone(), client_ca: None })
        .await
        .expect_err("a key is not a certificate");
    assert_eq!(err.to_string(), format!("--tls-cert {}: no PEM certificate found", key.display()));

    let err = ServerTls::load(&TlsFiles { cert: cert.clone(), key: cert.clone(), client_ca: None })
        .await
        .expect_err("a certificate is not a key");
    assert!(err.to_string().starts_with("--tls-key") && err.to_string().contains("no private key"), "{err}");

    let other_key = pki.write("other.key", &other.key_pem);
    let err = ServerTls::load(&TlsFiles { cert: cert.clone(), key: other_key, client_ca: None })
        .await
        .expect_err("a key that does not match the certificate should fail");
    assert!(matches!(err, TlsError::Identity(_)), "{err:?}");

    let err = ServerTls::load(&TlsFiles { cert, key, client_ca: Some(pki.write("empty-ca.pem", "")) })
        .await
        .expect_err("an empty client CA should fail");
    assert!(err.to_string().starts_with("--tls-client-ca"), "{err}");
}

/// The hub's whole path, not only the handshake: with `trust_domain` in
/// the access file, a client certificate from the right CA whose URI SAN
/// lies outside the domain is UNAUTHENTICATED, even when a grant names it,
/// and the refused call writes nothing; the same grant inside the domain
/// is served.
#[tokio::test]
async fn a_certificate_outside_the_trust_domain_is_refused_and_changes_nothing() {
    use omnirelay_hub::Config;
    use omnirelay_hub::access::Access;
    use omnirelay_hub::proto::hub::v1 as pb;

    let db = crate::support::migrated_db().await;
    let pki = Pki::new("hub test ca");
    let server = pki.server();
    let files = TlsFiles {
        cert: pki.write("server.pem", &server.cert_pem),
        key: pki.write("server.key", &server.key_pem),
        client_ca: Some(pki.write("client-ca.pem", &pki.ca_pem())),
    };
    let access = serde_json::json!({
        "trust_domain": "spiffe://good.test/",
        "grants": [{
            "name": "nodes",
            "principals": ["spiffe://good.test/node", "spiffe://evil.test/node"],
            "hub_roles": ["producer"],
            "shards": ["resourcelease.*"]
        }]
    });
    let access = Access::from_json(&access.to_string()).expect("a valid access file");
    let config =
        Config { retention_interval: None, tls: Some(files), access, ..Config::for_postgres(db.url()).expect("a URL") };
    let hub = crate::support::TestHub::start_with(config).await;

    let acquire = |identity: Issued, shard: &'static str| {
        let ca = pki.ca_pem();
        let port = hub.address.port();
        async move {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost")
                .identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
            let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
                .expect("valid URI")
                .tls_config(tls)
                .expect("client TLS")
                .timeout(CALL_TIMEOUT)
                .connect()
                .await
                .expect("the handshake succeeds: the CA is right");
            let request = pb::AcquireShardRequest {
                shard_id: shard.into(),
                owner: "node-a".into(),
                ttl: Some(Duration::from_secs(30).try_into().expect("a small duration")),
            };
            pb::hub_client::HubClient::new(channel).acquire_shard(request).await
        }
    };
    let outside = pki.issue("evil", vec![uri("spiffe://evil.test/node")]);
    let refused = acquire(outside, "resourcelease.outside").await.expect_err("outside the trust domain");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let client = db.client().await;
    let shards: i64 = client.query_one("SELECT count(*) FROM shards", &[]).await.expect("count").get(0);
    assert_eq!(shards, 0, "a refused call wrote nothing");

    let inside = pki.issue("good", vec![uri("spiffe://good.test/node")]);
    let granted = acquire(inside, "resourcelease.inside").await.expect("inside the trust domain").into_inner();
    assert!(granted.granted, "{granted:?}");
    let shards: i64 = client.query_one("SELECT count(*) FROM shards", &[]).await.expect("count").get(0);
    assert_eq!(shards, 1);
}
