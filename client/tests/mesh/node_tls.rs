//! Mutual TLS and bearer tokens through a real node on both transports: the
//! accept loop hands the verified client certificate to the middleware for
//! gRPC and HTTP/JSON alike, and every refused call changes nothing.

use omnirelay_client::ErrorCode;
use omnirelay_client::middleware::{ClientCertPolicy, Procedure};
use omnirelay_client::node::TlsAcceptorConfig;
use serde_json::json;

use crate::node_support::{Auth, Client, ClientTls, Options, Outcome, Req, TestNode, Wire};
use crate::test_pki::{San, TestCa, TestCert};

const N: &str = "resourcelease";
const TRUST_DOMAIN: &str = "spiffe://omnirelay.test/";

struct TlsNode {
    node: TestNode,
    ca: TestCa,
}

async fn start(policy: ClientCertPolicy) -> TlsNode {
    let ca = TestCa::new("omnirelay node test ca");
    let server = ca.server("localhost");
    let tls = TlsAcceptorConfig::from_pem(
        server.cert_pem.as_bytes(),
        server.key_pem.as_bytes(),
        Some(ca.cert_pem.as_bytes()),
    )
    .expect("valid TLS configuration");
    assert!(tls.is_mutual());
    let options =
        Options { tls: Some(tls), client_certs: policy, trust_domain: Some(TRUST_DOMAIN.into()), ..Options::default() };
    TlsNode { node: TestNode::start(options).await, ca }
}

impl TlsNode {
    fn client(&self, identity: Option<&TestCert>, trust: &TestCa) -> Client {
        Client::with_tls(
            self.node.addr,
            ClientTls {
                ca_pem: trust.cert_pem.clone(),
                identity: identity.map(|cert| (cert.cert_pem.clone(), cert.key_pem.clone())),
            },
        )
    }

    /// Enqueues over `wire` with a certificate and credentials; returns the
    /// outcome.
    async fn enqueue(&self, wire: Wire, identity: Option<&TestCert>, auth: &Auth) -> Outcome {
        let request = Req::from_json(
            Procedure::Enqueue,
            &json!({"namespace": N, "payload": {"resource_type": "t", "resource_id": "1"}}),
        );
        self.client(identity, &self.ca).call(wire, &request, auth).await
    }
}

#[tokio::test]
async fn client_certificates_and_tokens_are_checked_on_both_transports() {
    let tls = start(ClientCertPolicy::Optional).await;
    let ca = &tls.ca;
    let worker = ca.client(&[San::Dns("worker-1.internal"), San::Uri("spiffe://omnirelay.test/worker/1")]);
    let intruder = ca.client(&[San::Uri("spiffe://omnirelay.test/intruder")]);
    let dns_only = ca.client(&[San::Dns("worker-1.internal")]);
    let foreign = ca.client(&[San::Uri("spiffe://elsewhere.test/worker/1")]);
    let rogue_ca = TestCa::new("rogue ca");
    let rogue = rogue_ca.client(&[San::Uri("spiffe://omnirelay.test/worker/1")]);
    let node = &tls.node;
    let operator = Auth::bearer(node.token("operator", &["operator"]));
    let expired = Auth::bearer(node.token_with("operator", &["operator"], crate::node_support::AUDIENCE, -300));
    let wrong_audience = Auth::bearer(node.token_with("operator", &["operator"], "elsewhere", 600));

    for wire in [Wire::Grpc, Wire::Http] {
        let before = node.stats(N).await;
        let refused = [
            ("no certificate and no token", None, Auth::none(), ErrorCode::Unauthenticated),
            ("a certificate without a SAN URI", Some(&dns_only), Auth::none(), ErrorCode::Unauthenticated),
            ("a SAN URI outside the trust domain", Some(&foreign), Auth::none(), ErrorCode::Unauthenticated),
            ("a good certificate next to an expired token", Some(&worker), expired.clone(), ErrorCode::Unauthenticated),
            ("a token for another audience", None, wrong_audience.clone(), ErrorCode::Unauthenticated),
            ("an authenticated but unlisted principal", Some(&intruder), Auth::none(), ErrorCode::PermissionDenied),
        ];
        for (name, identity, auth, code) in refused {
            let outcome = tls.enqueue(wire, identity, &auth).await;
            assert_eq!(outcome.code(), Some(code), "{wire:?}, {name}: {outcome:?}");
        }
        // A certificate from another CA never gets a connection.
        let outcome = tls
            .client(Some(&rogue), ca)
            .call(wire, &Req::from_json(Procedure::Stats, &json!({"namespace": N})), &Auth::none())
            .await;
        // Under TLS 1.3 the client learns of the refusal on its first read,
        // so it sees either a failed connection or a transport error.
        assert!(
            matches!(outcome.code(), Some(ErrorCode::Unavailable | ErrorCode::Internal)),
            "{wire:?}, rogue CA: {outcome:?}"
        );
        assert_eq!(node.stats(N).await, before, "{wire:?}: refused calls changed the queue");

        // The SAN URI is the principal, recorded in the event.
        let outcome = tls.enqueue(wire, Some(&worker), &Auth::none()).await;
        assert!(matches!(outcome, Outcome::Ok(_)), "{wire:?}: {outcome:?}");
        let events = node.replicator.events(&omnirelay_client::ShardId::from(N));
        let last = events.last().expect("an event");
        assert_eq!(last.event.origin.principal.as_str(), "spiffe://omnirelay.test/worker/1", "{wire:?}");
        // A token alone works too while certificates are optional.
        let outcome = tls.enqueue(wire, None, &operator).await;
        assert!(matches!(outcome, Outcome::Ok(_)), "{wire:?}: {outcome:?}");
    }
    assert_eq!(node.stats(N).await.pending, 4);
    tls.node.stop().await;
}

#[tokio::test]
async fn a_required_certificate_is_not_replaced_by_a_token() {
    let tls = start(ClientCertPolicy::Required).await;
    let operator = Auth::bearer(tls.node.token("operator", &["operator"]));
    let worker = tls.ca.client(&[San::Uri("spiffe://omnirelay.test/worker/2")]);
    for wire in [Wire::Grpc, Wire::Http] {
        let outcome = tls.enqueue(wire, None, &operator).await;
        assert_eq!(outcome.code(), Some(ErrorCode::Unauthenticated), "{wire:?}: {outcome:?}");
        let Outcome::Err { message, .. } = outcome else { unreachable!() };
        assert!(message.contains("client certificate is required"), "{message}");
        assert!(matches!(tls.enqueue(wire, Some(&worker), &Auth::none()).await, Outcome::Ok(_)), "{wire:?}");
    }
    assert_eq!(tls.node.stats(N).await.pending, 2);
    tls.node.stop().await;
}
