//! Principal binding: certificates, tokens and proxy headers, good and bad.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tower::ServiceExt;

use super::*;
use crate::middleware::connection::ClientCertChain;
use crate::middleware::test_pki::{San, TestCa};
use crate::{ErrorCode, Principal};
use http::HeaderMap;
use omnirelay_identity::CredentialError;
use omnirelay_identity::binding::normalize;

const ISSUER: &str = "https://sts.omnirelay.example";
const AUDIENCE: &str = "omnirelay-mesh";

struct Keys {
    signing: EncodingKey,
    other_signing: EncodingKey,
    verifier: JwtVerifier,
}

fn keys() -> Keys {
    let key = rcgen::KeyPair::generate().expect("ec key");
    let other = rcgen::KeyPair::generate().expect("ec key");
    Keys {
        signing: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("encoding key"),
        other_signing: EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).expect("encoding key"),
        verifier: JwtVerifier::from_public_key_pem(Algorithm::ES256, key.public_key_pem().as_bytes(), ISSUER, AUDIENCE)
            .expect("verifier"),
    }
}

fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).expect("timestamp fits")
}

fn claims() -> serde_json::Value {
    json!({ "sub": "worker-7", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "roles": ["worker", "reader"] })
}

fn token(key: &EncodingKey, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, key).expect("sign")
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii"));
    headers
}

fn with_cert(chain: Vec<rustls::pki_types::CertificateDer<'static>>) -> ConnectionInfo {
    ConnectionInfo { remote_addr: None, client_certs: Some(ClientCertChain::new(Arc::new(chain))) }
}

fn from_addr(addr: &str) -> ConnectionInfo {
    ConnectionInfo { remote_addr: Some(addr.parse::<SocketAddr>().expect("addr")), client_certs: None }
}

#[test]
fn the_san_uri_is_the_principal_never_the_cn() {
    let ca = TestCa::new("mesh ca");
    let cert = ca.client(&[San::Dns("worker.internal"), San::Uri("spiffe://omnirelay.example/worker/7")]);
    let config = PrincipalConfig::new();
    let caller = config.authenticate(&HeaderMap::new(), &with_cert(vec![cert.cert_der.clone()])).expect("valid cert");
    assert_eq!(caller.principal.as_str(), "spiffe://omnirelay.example/worker/7");
    assert_eq!(caller.source, CredentialSource::ClientCertificate);
    let thumbprint = caller.thumbprint.expect("thumbprint");
    assert_eq!(thumbprint.len(), 64);
    assert!(thumbprint.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
}

#[test]
fn certificates_without_exactly_one_san_uri_are_refused() {
    let ca = TestCa::new("mesh ca");
    let config = PrincipalConfig::new();
    let dns_only = ca.client(&[San::Dns("worker.internal")]);
    assert_eq!(
        config.authenticate(&HeaderMap::new(), &with_cert(vec![dns_only.cert_der])),
        Err(CredentialError::NoSanUri),
        "a CN or DNS name is never promoted to a principal"
    );
    let two = ca.client(&[San::Uri("spiffe://a.example/x"), San::Uri("spiffe://a.example/y")]);
    assert_eq!(
        config.authenticate(&HeaderMap::new(), &with_cert(vec![two.cert_der])),
        Err(CredentialError::SeveralSanUris)
    );
    let garbage = rustls::pki_types::CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
    assert_eq!(
        config.authenticate(&HeaderMap::new(), &with_cert(vec![garbage])),
        Err(CredentialError::ClientCertificateUnparsable)
    );
}

#[test]
fn san_uris_outside_the_trust_domain_are_refused() {
    let ca = TestCa::new("mesh ca");
    let config = PrincipalConfig::new().trust_domain("spiffe://omnirelay.example/");
    let inside = ca.client(&[San::Uri("spiffe://omnirelay.example/worker/1")]);
    assert!(config.authenticate(&HeaderMap::new(), &with_cert(vec![inside.cert_der])).is_ok());
    let outside = ca.client(&[San::Uri("spiffe://evil.example/worker/1")]);
    assert!(matches!(
        config.authenticate(&HeaderMap::new(), &with_cert(vec![outside.cert_der])),
        Err(CredentialError::OutsideTrustDomain { .. })
    ));
}

#[test]
fn required_certificates_are_not_replaced_by_tokens() {
    let keys = keys();
    let config = PrincipalConfig::new().client_certs(ClientCertPolicy::Required).jwt(keys.verifier);
    let headers = bearer(&token(&keys.signing, &claims()));
    assert_eq!(
        config.authenticate(&headers, &ConnectionInfo::default()),
        Err(CredentialError::ClientCertificateRequired)
    );
}

#[test]
fn a_valid_token_identifies_the_caller_with_its_roles() {
    let keys = keys();
    let config = PrincipalConfig::new().jwt(keys.verifier);
    let caller =
        config.authenticate(&bearer(&token(&keys.signing, &claims())), &ConnectionInfo::default()).expect("valid");
    assert_eq!(caller.principal.as_str(), "worker-7");
    assert_eq!(caller.roles, vec!["worker", "reader"]);
    assert_eq!(caller.source, CredentialSource::BearerToken);
}

#[test]
fn roles_can_come_from_a_space_separated_scope_claim() {
    let keys = keys();
    let config = PrincipalConfig::new().jwt(keys.verifier.with_roles_claim("scope"));
    let mut claims = claims();
    claims["scope"] = json!("operator reader");
    let caller =
        config.authenticate(&bearer(&token(&keys.signing, &claims)), &ConnectionInfo::default()).expect("valid");
    assert_eq!(caller.roles, vec!["operator", "reader"]);
}

#[test]
fn bad_tokens_are_refused_for_the_right_reason() {
    let keys = keys();
    let config = PrincipalConfig::new().jwt(keys.verifier);
    let check = |token: String, expected: CredentialError| {
        assert_eq!(config.authenticate(&bearer(&token), &ConnectionInfo::default()), Err(expected));
    };
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    check(token(&keys.signing, &expired), CredentialError::TokenExpired);

    let mut audience = claims();
    audience["aud"] = json!("someone-else");
    check(token(&keys.signing, &audience), CredentialError::TokenWrongAudience);

    let mut issuer = claims();
    issuer["iss"] = json!("https://evil.example");
    check(token(&keys.signing, &issuer), CredentialError::TokenWrongIssuer);

    let hs256 =
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(), &EncodingKey::from_secret(b"guessable"))
            .expect("sign");
    check(hs256, CredentialError::TokenWrongAlgorithm);

    check(token(&keys.other_signing, &claims()), CredentialError::TokenBadSignature);

    let mut no_exp = claims();
    no_exp.as_object_mut().expect("object").remove("exp");
    check(token(&keys.signing, &no_exp), CredentialError::TokenMissingClaim("exp".into()));

    let mut no_aud = claims();
    no_aud.as_object_mut().expect("object").remove("aud");
    check(token(&keys.signing, &no_aud), CredentialError::TokenMissingClaim("aud".into()));

    let mut future = claims();
    future["nbf"] = json!(now() + 3600);
    check(token(&keys.signing, &future), CredentialError::TokenNotYetValid);

    // An unsigned token: refused for its algorithm, whatever else it says.
    let unsigned = {
        use base64::Engine as _;
        let part = |json: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string());
        format!("{}.{}.", part(&json!({"alg": "none", "typ": "JWT"})), part(&claims()))
    };
    check(unsigned, CredentialError::TokenWrongAlgorithm);

    let mut no_sub = claims();
    no_sub.as_object_mut().expect("object").remove("sub");
    check(token(&keys.signing, &no_sub), CredentialError::TokenMissingClaim("sub".into()));

    check("not.a.jwt".into(), CredentialError::TokenMalformed);
    check("x".repeat(crate::middleware::defaults::MAX_BEARER_TOKEN_LEN + 1), CredentialError::TokenMalformed);
}

#[test]
fn small_clock_skew_is_tolerated() {
    let keys = keys();
    let config = PrincipalConfig::new().jwt(keys.verifier);
    let mut just_expired = claims();
    just_expired["exp"] = json!(now() - 5);
    assert!(config.authenticate(&bearer(&token(&keys.signing, &just_expired)), &ConnectionInfo::default()).is_ok());
}

#[test]
fn verifier_configuration_is_checked() {
    let key = rcgen::KeyPair::generate().expect("ec key");
    let pem = key.public_key_pem();
    let err = JwtVerifier::from_public_key_pem(Algorithm::HS256, pem.as_bytes(), ISSUER, AUDIENCE).expect_err("hmac");
    assert_eq!(err.field, "jwt.algorithm");
    let err = JwtVerifier::from_public_key_pem(Algorithm::RS256, pem.as_bytes(), ISSUER, AUDIENCE).expect_err("rsa");
    assert_eq!(err.field, "jwt.public_key");
    let err = JwtVerifier::from_public_key_pem(Algorithm::ES256, pem.as_bytes(), "", AUDIENCE).expect_err("issuer");
    assert_eq!(err.field, "jwt.issuer");
    let err = JwtVerifier::new(Algorithm::ES256, jsonwebtoken::DecodingKey::from_secret(b"s"), ISSUER, AUDIENCE)
        .expect_err("family mismatch");
    assert_eq!(err.field, "jwt.algorithm");
}

#[test]
fn missing_or_unusable_credentials_are_refused() {
    let keys = keys();
    assert_eq!(
        PrincipalConfig::new().authenticate(&HeaderMap::new(), &ConnectionInfo::default()),
        Err(CredentialError::Missing)
    );
    let token = token(&keys.signing, &claims());
    assert_eq!(
        PrincipalConfig::new().authenticate(&bearer(&token), &ConnectionInfo::default()),
        Err(CredentialError::BearerNotAccepted)
    );
    let config = PrincipalConfig::new().jwt(keys.verifier);
    for value in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "token"] {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, HeaderValue::from_static(value));
        assert_eq!(
            config.authenticate(&headers, &ConnectionInfo::default()),
            Err(CredentialError::MalformedAuthorization),
            "{value}"
        );
    }
}

#[test]
fn a_bad_token_next_to_a_good_certificate_is_refused() {
    let keys = keys();
    let ca = TestCa::new("mesh ca");
    let cert = ca.client(&[San::Uri("spiffe://omnirelay.example/worker/7")]);
    let config = PrincipalConfig::new().jwt(keys.verifier);
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    let headers = bearer(&token(&keys.signing, &expired));
    assert_eq!(
        config.authenticate(&headers, &with_cert(vec![cert.cert_der.clone()])),
        Err(CredentialError::TokenExpired)
    );
    // With a valid token too, the certificate wins.
    let caller = config
        .authenticate(&bearer(&token(&keys.signing, &claims())), &with_cert(vec![cert.cert_der]))
        .expect("both valid");
    assert_eq!(caller.source, CredentialSource::ClientCertificate);
}

fn proxy_headers(principal: Option<&str>, thumbprint: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(p) = principal {
        headers.insert(CLIENT_PRINCIPAL_HEADER, HeaderValue::from_str(p).expect("ascii"));
    }
    if let Some(t) = thumbprint {
        headers.insert(MTLS_THUMBPRINT_HEADER, HeaderValue::from_str(t).expect("ascii"));
    }
    headers
}

#[test]
fn proxy_headers_are_accepted_only_from_trusted_proxies() {
    let config = PrincipalConfig::new().trusted_proxies(TrustedProxies::parse(&["10.0.0.0/8"]).expect("valid"));
    let headers = proxy_headers(Some("spiffe://omnirelay.example/gateway-user"), None);
    assert_eq!(
        config.authenticate(&headers, &from_addr("192.168.0.9:4000")),
        Err(CredentialError::UntrustedProxyHeader { header: CLIENT_PRINCIPAL_HEADER })
    );
    assert_eq!(
        config.authenticate(&headers, &ConnectionInfo::default()),
        Err(CredentialError::UntrustedProxyHeader { header: CLIENT_PRINCIPAL_HEADER }),
        "an unknown remote address is not trusted"
    );
    let thumb_only = proxy_headers(None, Some(&"ab".repeat(32)));
    assert_eq!(
        config.authenticate(&thumb_only, &from_addr("192.168.0.9:4000")),
        Err(CredentialError::UntrustedProxyHeader { header: MTLS_THUMBPRINT_HEADER })
    );
    let caller = config.authenticate(&headers, &from_addr("10.2.3.4:4000")).expect("trusted proxy");
    assert_eq!(caller.principal.as_str(), "spiffe://omnirelay.example/gateway-user");
    assert_eq!(caller.source, CredentialSource::TrustedProxy);
}

#[test]
fn trusted_proxy_headers_must_be_well_formed() {
    let config = PrincipalConfig::new().trusted_proxies(TrustedProxies::parse(&["127.0.0.1"]).expect("valid"));
    let local = from_addr("127.0.0.1:5000");
    assert!(matches!(
        config.authenticate(&proxy_headers(None, Some(&"ab".repeat(32))), &local),
        Err(CredentialError::InvalidProxyHeader { header: CLIENT_PRINCIPAL_HEADER, .. })
    ));
    assert!(matches!(
        config.authenticate(&proxy_headers(Some("p"), Some("abc")), &local),
        Err(CredentialError::InvalidProxyHeader { header: MTLS_THUMBPRINT_HEADER, .. })
    ));
    let caller = config.authenticate(&proxy_headers(Some("p"), Some(&"AB".repeat(32))), &local).expect("valid");
    assert_eq!(caller.thumbprint, Some("ab".repeat(32)));
    let required = config.clone().client_certs(ClientCertPolicy::Required);
    assert_eq!(
        required.authenticate(&proxy_headers(Some("p"), None), &local),
        Err(CredentialError::ClientCertificateRequired),
        "a required certificate must be vouched for with a thumbprint"
    );
    assert!(required.authenticate(&proxy_headers(Some("p"), Some(&"ab".repeat(32))), &local).is_ok());
}

#[test]
fn principals_are_normalized() {
    assert_eq!(
        normalize("test", "  SPIFFE://OmniRelay.Example/Worker/7 ").expect("valid").as_str(),
        "spiffe://omnirelay.example/Worker/7"
    );
    assert_eq!(normalize("test", "Worker-7").expect("valid").as_str(), "Worker-7");
    assert!(normalize("test", "   ").is_err());
    assert!(normalize("test", "a\u{7}b").is_err());
    assert!(normalize("test", &"a".repeat(513)).is_err());
}

/// A service that counts how often it ran, standing in for the queue.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

impl Service<Request<()>> for Counting {
    type Response = Option<Caller>;
    type Error = BoxError;
    type Future = future::Ready<Result<Option<Caller>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        future::ready(Ok(request.extensions().get::<Caller>().cloned()))
    }
}

#[tokio::test]
async fn unauthenticated_calls_never_reach_the_inner_service() {
    let keys = keys();
    let inner = Counting::default();
    let calls = inner.0.clone();
    let service = PrincipalBindingLayer::new(PrincipalConfig::new().jwt(keys.verifier)).layer(inner);
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    for headers in [HeaderMap::new(), bearer(&token(&keys.signing, &expired)), proxy_headers(Some("p"), None)] {
        let mut request = Request::new(());
        *request.headers_mut() = headers;
        let err = service.clone().oneshot(request).await.expect_err("refused");
        let err = err.downcast::<MiddlewareError>().expect("a middleware error");
        assert_eq!(err.code(), ErrorCode::Unauthenticated);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the inner service never ran");

    let mut request = Request::new(());
    *request.headers_mut() = bearer(&token(&keys.signing, &claims()));
    let caller = service.oneshot(request).await.expect("authenticated").expect("caller extension");
    assert_eq!(caller.principal.as_str(), "worker-7");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn readiness_is_the_inner_services() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, ()>();
    let mut service = tower_test::mock::Spawn::new(PrincipalBindingLayer::new(PrincipalConfig::new()).layer(mock));
    handle.allow(0);
    assert!(service.poll_ready().is_pending(), "not ready while the inner service is not");
    handle.allow(1);
    assert!(service.poll_ready().is_ready());
    let response = service.call(Request::new(()));
    let err = response.await.expect_err("no credentials");
    assert!(err.downcast_ref::<MiddlewareError>().is_some());
    assert!(handle.poll_request().is_pending(), "the refused request never reached the inner service");
}

#[test]
fn during_a_key_rotation_tokens_signed_by_either_key_verify_and_no_others() {
    let old = rcgen::KeyPair::generate().expect("ec key");
    let new = rcgen::KeyPair::generate().expect("ec key");
    let stranger = rcgen::KeyPair::generate().expect("ec key");
    let signing =
        |key: &rcgen::KeyPair| EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("encoding key");
    let pems = vec![old.public_key_pem().into_bytes(), new.public_key_pem().into_bytes()];
    let verifier = JwtVerifier::from_public_key_pems(Algorithm::ES256, &pems, ISSUER, AUDIENCE).expect("two keys");
    assert_eq!(verifier.key_count(), 2);
    let config = PrincipalConfig::new().jwt(verifier);
    for key in [&old, &new] {
        let caller = config
            .authenticate(&bearer(&token(&signing(key), &claims())), &ConnectionInfo::default())
            .expect("signed by a configured key");
        assert_eq!(caller.principal.as_str(), "worker-7");
    }
    assert_eq!(
        config.authenticate(&bearer(&token(&signing(&stranger), &claims())), &ConnectionInfo::default()),
        Err(CredentialError::TokenBadSignature)
    );
    // A token the second key signs is judged on its claims, not called a bad
    // signature because the first key did not verify it.
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    assert_eq!(
        config.authenticate(&bearer(&token(&signing(&new), &expired)), &ConnectionInfo::default()),
        Err(CredentialError::TokenExpired)
    );
}

#[test]
fn rotation_key_lists_are_bounded_and_name_the_bad_key() {
    let good = rcgen::KeyPair::generate().expect("ec key").public_key_pem().into_bytes();
    let err = JwtVerifier::from_public_key_pems(Algorithm::ES256, &[], ISSUER, AUDIENCE).expect_err("no key");
    assert_eq!(err.field, "jwt.public_key");
    let err =
        JwtVerifier::from_public_key_pems(Algorithm::ES256, &[good.clone(), b"not a key".to_vec()], ISSUER, AUDIENCE)
            .expect_err("bad second key");
    assert_eq!(err.field, "jwt.public_key[1]");
    let too_many = vec![good.clone(); omnirelay_identity::defaults::MAX_JWT_KEYS + 1];
    let err = JwtVerifier::from_public_key_pems(Algorithm::ES256, &too_many, ISSUER, AUDIENCE).expect_err("too many");
    assert!(err.reason.contains("at most"), "{err}");
    let verifier = JwtVerifier::from_public_key_pem(Algorithm::ES256, &good, ISSUER, AUDIENCE).expect("one key");
    let err = verifier.with_key(jsonwebtoken::DecodingKey::from_secret(b"s")).expect_err("another key type");
    assert_eq!(err.field, "jwt.algorithm");
}

#[test]
fn a_trusted_forwarder_vouches_for_the_caller_and_its_roles() {
    let keys = keys();
    let config = PrincipalConfig::new()
        .jwt(keys.verifier)
        .trusted_forwarders(vec![Principal::from("node-b"), Principal::from("spiffe://omnirelay.example/node-c")]);
    let forwarder =
        token(&keys.signing, &json!({ "sub": "node-b", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600 }));
    let mut headers = bearer(&forwarder);
    headers.insert(CLIENT_PRINCIPAL_HEADER, HeaderValue::from_static("spiffe://omnirelay.example/worker-7"));
    headers.insert(CLIENT_ROLES_HEADER, HeaderValue::from_static("worker, reader"));
    let caller = config.authenticate(&headers, &from_addr("192.168.0.9:4000")).expect("a trusted forwarder");
    assert_eq!(caller.principal.as_str(), "spiffe://omnirelay.example/worker-7");
    assert_eq!(caller.roles, vec!["worker".to_string(), "reader".to_string()]);
    assert_eq!(caller.source, CredentialSource::ForwardingPeer);

    // The same headers from a caller that is not a trusted forwarder are
    // refused, whatever its own credential.
    let stranger = token(&keys.signing, &claims());
    let mut headers = bearer(&stranger);
    headers.insert(CLIENT_PRINCIPAL_HEADER, HeaderValue::from_static("spiffe://omnirelay.example/admin"));
    assert_eq!(
        config.authenticate(&headers, &from_addr("192.168.0.9:4000")),
        Err(CredentialError::UntrustedProxyHeader { header: CLIENT_PRINCIPAL_HEADER })
    );
    let mut roles_only = bearer(&stranger);
    roles_only.insert(CLIENT_ROLES_HEADER, HeaderValue::from_static("admin"));
    assert_eq!(
        config.authenticate(&roles_only, &from_addr("192.168.0.9:4000")),
        Err(CredentialError::UntrustedProxyHeader { header: CLIENT_ROLES_HEADER }),
        "roles cannot be claimed by a header"
    );
    // A forwarder's token must itself be valid.
    let mut forged = bearer(&token(
        &keys.other_signing,
        &json!({ "sub": "node-b", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600 }),
    ));
    forged.insert(CLIENT_PRINCIPAL_HEADER, HeaderValue::from_static("spiffe://omnirelay.example/worker-7"));
    assert!(config.authenticate(&forged, &from_addr("192.168.0.9:4000")).is_err());
}

#[test]
fn forwarded_roles_must_be_well_formed() {
    let config = PrincipalConfig::new().trusted_proxies(TrustedProxies::parse(&["127.0.0.1"]).expect("valid"));
    let local = from_addr("127.0.0.1:5000");
    let many = (0..33).map(|n| format!("r{n}")).collect::<Vec<_>>().join(",");
    for bad in ["a,,b", "a b", &"x".repeat(129), &many] {
        let mut headers = proxy_headers(Some("spiffe://omnirelay.example/user"), None);
        headers.insert(CLIENT_ROLES_HEADER, HeaderValue::from_str(bad).expect("ascii"));
        assert!(
            matches!(
                config.authenticate(&headers, &local),
                Err(CredentialError::InvalidProxyHeader { header: CLIENT_ROLES_HEADER, .. })
            ),
            "{bad:?}"
        );
    }
    let mut headers = proxy_headers(Some("spiffe://omnirelay.example/user"), None);
    headers.insert(CLIENT_ROLES_HEADER, HeaderValue::from_static("reader"));
    assert_eq!(config.authenticate(&headers, &local).expect("well formed").roles, vec!["reader".to_string()]);
}
