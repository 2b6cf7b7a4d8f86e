//! JWT and header parsing in the identity layer: a bearer token, an
//! `authorization` header and the trusted-proxy headers, from a trusted and
//! an untrusted address; proxy lists. Nothing may panic; nothing from an
//! untrusted address is believed; a token not signed by the key never
//! verifies.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use omnirelay_identity::{ConnectionInfo, CredentialError, JwtVerifier, PrincipalConfig, TrustedProxies};

/// An ES256 public key (any valid one: the fuzzer cannot sign with it).
const PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE+0oGlhr8zHv+wFWH0Z2VZGvBscA3
3ofwR1+kGY10lPcRMm8gqy8FPtC/rRtqQHz8ssqg35051LtyHqV3tFcBHQ==
-----END PUBLIC KEY-----";

fn config() -> &'static PrincipalConfig {
    static CONFIG: OnceLock<PrincipalConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let verifier = JwtVerifier::from_public_key_pem(
            jsonwebtoken::Algorithm::ES256,
            PUBLIC_KEY.as_bytes(),
            "https://sts.fuzz",
            "omnirelay",
        )
        .expect("a valid key");
        PrincipalConfig::new().jwt(verifier).trusted_proxies(TrustedProxies::parse(&["10.0.0.0/8"]).expect("valid"))
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let config = config();
    // The input as a token: never verifies (nobody here holds the key).
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_str(&format!("Bearer {text}")) {
        headers.insert(http::header::AUTHORIZATION, value);
        assert!(config.authenticate(&headers, &ConnectionInfo::default()).is_err(), "a forged token verified");
    }
    // The input as a raw authorization header.
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        headers.insert(http::header::AUTHORIZATION, value);
        assert!(config.authenticate(&headers, &ConnectionInfo::default()).is_err());
    }
    // The input as proxy headers: believed from the proxy only.
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        headers.insert(omnirelay_identity::CLIENT_PRINCIPAL_HEADER, value.clone());
        headers.insert(omnirelay_identity::MTLS_THUMBPRINT_HEADER, value);
        let untrusted = ConnectionInfo { remote_addr: Some("192.0.2.1:1".parse().expect("addr")), client_certs: None };
        assert!(matches!(
            config.authenticate(&headers, &untrusted),
            Err(CredentialError::UntrustedProxyHeader { .. })
        ));
        let trusted = ConnectionInfo { remote_addr: Some("10.1.2.3:1".parse().expect("addr")), client_certs: None };
        if let Ok(caller) = config.authenticate(&headers, &trusted) {
            assert!(!caller.principal.as_str().is_empty());
        }
    }
    // The input as a proxy list.
    let entries: Vec<&str> = text.split(',').collect();
    let _ = TrustedProxies::parse(&entries);
});
