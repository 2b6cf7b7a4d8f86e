//! Mutual TLS through a real tonic server on 127.0.0.1 with rustls: the
//! handshake checks the CA, the middleware binds the SAN URI, and refused
//! calls never reach the service.

use std::net::SocketAddr;

use omnirelay_client::middleware::{
    AuthorizationTable, ClientCertPolicy, CredentialSource, MeshLayer, MiddlewareConfig, PrincipalConfig,
};
use omnirelay_client::proto::resourcelease::v1 as pb;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};

use crate::CountingLease;
use crate::test_pki::{San, TestCa, TestCert};

const TRUST_DOMAIN: &str = "spiffe://omnirelay.test/";

/// A node serving ResourceLease over mutual TLS behind the mesh stack.
struct Node {
    addr: SocketAddr,
    ca: TestCa,
    service: CountingLease,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Node {
    async fn start(policy: ClientCertPolicy) -> Self {
        let ca = TestCa::new("omnirelay test mesh ca");
        let server_cert = ca.server("localhost");
        let table = AuthorizationTable::from_json(
            r#"{"rules": [{"principals": ["spiffe://omnirelay.test/worker/*"], "procedures": ["stats", "lease"], "shards": ["*"]}]}"#,
        )
        .expect("valid table");
        let config = MiddlewareConfig {
            principal: PrincipalConfig::new().client_certs(policy).trust_domain(TRUST_DOMAIN),
            authorization: table,
            ..MiddlewareConfig::default()
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&server_cert.cert_pem, &server_cert.key_pem))
            .client_ca_root(Certificate::from_pem(&ca.cert_pem))
            // Optional at the TLS level, so token callers can connect; the
            // middleware enforces the policy and answers UNAUTHENTICATED.
            .client_auth_optional(true);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let service = CountingLease::default();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let router = Server::builder()
            .tls_config(tls)
            .expect("valid TLS config")
            .layer(MeshLayer::new(config))
            .add_service(pb::resource_lease_server::ResourceLeaseServer::new(service.clone()));
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("server runs until shutdown");
        });
        Self { addr, ca, service, shutdown: Some(shutdown), task }
    }

    async fn client(
        &self,
        identity: Option<&TestCert>,
        trust: &TestCa,
    ) -> Result<pb::resource_lease_client::ResourceLeaseClient<Channel>, tonic::transport::Error> {
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&trust.cert_pem)).domain_name("localhost");
        if let Some(cert) = identity {
            tls = tls.identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
        }
        let channel =
            Channel::from_shared(format!("https://{}", self.addr)).expect("uri").tls_config(tls)?.connect().await?;
        Ok(pb::resource_lease_client::ResourceLeaseClient::new(channel))
    }

    /// Calls Stats with `identity` and returns the status code.
    async fn stats(&self, identity: Option<&TestCert>) -> tonic::Code {
        let mut client = match self.client(identity, &self.ca).await {
            Ok(client) => client,
            // The handshake refused us before any call was made.
            Err(_) => return tonic::Code::Unavailable,
        };
        match client.stats(pb::StatsRequest { namespace: "resourcelease.users".into() }).await {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    }

    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.task.await.expect("server task joins");
    }
}

#[tokio::test]
async fn the_san_uri_of_a_client_certificate_is_the_principal() {
    let node = Node::start(ClientCertPolicy::Required).await;
    let worker = node.ca.client(&[San::Dns("worker-1.internal"), San::Uri("spiffe://omnirelay.test/worker/1")]);
    assert_eq!(node.stats(Some(&worker)).await, tonic::Code::Ok);
    assert_eq!(node.service.calls(), 1);
    let caller = node.service.last_caller.lock().expect("test mutex").clone().expect("the handler saw a caller");
    assert_eq!(caller.principal.as_str(), "spiffe://omnirelay.test/worker/1", "SAN URI, not the CN or DNS name");
    assert_eq!(caller.source, CredentialSource::ClientCertificate);
    assert!(caller.thumbprint.is_some());
    node.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let node = Node::start(ClientCertPolicy::Optional).await;
    let rogue_ca = TestCa::new("rogue ca");
    let rogue = rogue_ca.client(&[San::Uri("spiffe://omnirelay.test/worker/1")]);
    let code = node.stats(Some(&rogue)).await;
    assert_ne!(code, tonic::Code::Ok, "a certificate the mesh CA did not sign must not get in");
    assert_eq!(node.service.calls(), 0, "the service never ran");
    node.stop().await;
}

#[tokio::test]
async fn no_certificate_is_unauthenticated_when_one_is_required() {
    let node = Node::start(ClientCertPolicy::Required).await;
    assert_eq!(node.stats(None).await, tonic::Code::Unauthenticated);
    assert_eq!(node.service.calls(), 0);
    node.stop().await;
}

#[tokio::test]
async fn certificates_without_a_usable_san_uri_are_unauthenticated() {
    let node = Node::start(ClientCertPolicy::Required).await;
    let dns_only = node.ca.client(&[San::Dns("worker-1.internal")]);
    assert_eq!(node.stats(Some(&dns_only)).await, tonic::Code::Unauthenticated);
    let foreign_domain = node.ca.client(&[San::Uri("spiffe://elsewhere.test/worker/1")]);
    assert_eq!(node.stats(Some(&foreign_domain)).await, tonic::Code::Unauthenticated);
    assert_eq!(node.service.calls(), 0);
    node.stop().await;
}

#[tokio::test]
async fn an_authenticated_but_unlisted_principal_is_permission_denied() {
    let node = Node::start(ClientCertPolicy::Required).await;
    let intruder = node.ca.client(&[San::Uri("spiffe://omnirelay.test/intruder")]);
    assert_eq!(node.stats(Some(&intruder)).await, tonic::Code::PermissionDenied);
    assert_eq!(node.service.calls(), 0);
    node.stop().await;
}
