//! Binding a caller to a principal: the credential sources, tried in one
//! order, normalized into one [`Caller`].
//!
//! Three sources:
//!
//! 1. `x-client-principal` (and optionally `x-mtls-thumbprint` and
//!    `x-client-roles`) from a configured trusted proxy that terminated TLS,
//!    or from a mesh node that forwarded the call and authenticated itself
//!    (certificate or token) as a configured trusted forwarder. The same
//!    headers from anyone else are refused.
//! 2. The client certificate of a mutual-TLS connection: its single SAN URI.
//! 3. A JWT in `authorization: Bearer`, verified by [`JwtVerifier`].
//!
//! Any credential that is present must be valid, even when a higher-ranked one
//! already identified the caller: a bad token next to a good certificate is a
//! client bug or an attack, and is refused.

use std::sync::Arc;

use http::HeaderMap;

use crate::Principal;
use crate::connection::ConnectionInfo;
use crate::defaults::{MAX_FORWARDED_ROLES, MAX_PRINCIPAL_LEN, MAX_ROLE_LEN};
use crate::error::CredentialError;
use crate::jwt::JwtVerifier;
use crate::mtls;
use crate::proxy::{self, CLIENT_PRINCIPAL_HEADER, CLIENT_ROLES_HEADER, MTLS_THUMBPRINT_HEADER, TrustedProxies};

/// Where a caller's identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// The SAN URI of the client certificate on this connection.
    ClientCertificate,
    /// The `sub` of a verified JWT.
    BearerToken,
    /// `x-client-principal` from a trusted proxy.
    TrustedProxy,
    /// `x-client-principal` (and `x-client-roles`) from a mesh node that
    /// forwarded the call to this one, the shard's owner, and authenticated
    /// itself as one of the configured trusted forwarders.
    ForwardingPeer,
    /// A loopback connection to a hub in protected mode (no identity
    /// configured): the caller is the local principal.
    LocalConnection,
}

/// The authenticated caller of one request, in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The normalized identity (`rpc.principal`), recorded in every
    /// replication event the call causes.
    pub principal: Principal,
    /// Roles from the bearer token (empty for other sources).
    pub roles: Vec<String>,
    /// Where the identity came from.
    pub source: CredentialSource,
    /// SHA-256 thumbprint of the client certificate (own TLS or the proxy's),
    /// lowercase hex.
    pub thumbprint: Option<String>,
}

/// Whether a client certificate is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientCertPolicy {
    /// Certificates are not looked at (TLS may still verify them).
    Disabled,
    /// A certificate identifies the caller when present; otherwise a token
    /// must.
    #[default]
    Optional,
    /// Every call needs a certificate: on its own connection, or vouched for
    /// by a trusted proxy with `x-mtls-thumbprint`.
    Required,
}

/// How callers are identified (on a node or a hub).
#[derive(Debug, Clone, Default)]
pub struct PrincipalConfig {
    client_certs: ClientCertPolicy,
    trust_domain: Option<String>,
    jwt: Option<Arc<JwtVerifier>>,
    trusted_proxies: TrustedProxies,
    trusted_forwarders: Vec<Principal>,
}

impl PrincipalConfig {
    /// No way to authenticate yet: every call is refused until a source is
    /// configured. Client certificates are optional by default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the client certificate policy.
    pub fn client_certs(mut self, policy: ClientCertPolicy) -> Self {
        self.client_certs = policy;
        self
    }

    /// Requires SAN URIs to start with this prefix (a SPIFFE trust domain,
    /// e.g. `spiffe://omnirelay.example/`).
    pub fn trust_domain(mut self, prefix: impl Into<String>) -> Self {
        self.trust_domain = Some(prefix.into());
        self
    }

    /// Accepts bearer tokens verified by `verifier`.
    pub fn jwt(mut self, verifier: JwtVerifier) -> Self {
        self.jwt = Some(Arc::new(verifier));
        self
    }

    /// Accepts identity headers from these proxies.
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    /// Accepts identity headers from mesh nodes that authenticate (by client
    /// certificate or bearer token) as one of these principals: the nodes
    /// that forward calls for shards this node owns. The forwarding node
    /// vouches for the caller it authenticated; this node then authorizes
    /// that caller as if it had called directly.
    pub fn trusted_forwarders(mut self, forwarders: Vec<Principal>) -> Self {
        self.trusted_forwarders = forwarders;
        self
    }

    /// Identifies the caller of a request from its headers and connection.
    pub fn authenticate(&self, headers: &HeaderMap, connection: &ConnectionInfo) -> Result<Caller, CredentialError> {
        let bearer = bearer_token(headers)?;
        let certificate = match (&connection.client_certs, self.client_certs) {
            (Some(chain), ClientCertPolicy::Optional | ClientCertPolicy::Required) => {
                let uri = mtls::san_uri(chain)?;
                if let Some(domain) = &self.trust_domain
                    && !uri.starts_with(domain.as_str())
                {
                    return Err(CredentialError::OutsideTrustDomain { uri, trust_domain: domain.clone() });
                }
                Some(Caller {
                    principal: normalize("client certificate", &uri)?,
                    roles: Vec::new(),
                    source: CredentialSource::ClientCertificate,
                    thumbprint: mtls::thumbprint(chain),
                })
            }
            _ => None,
        };
        let token = match bearer {
            None => None,
            Some(token) => {
                let verifier = self.jwt.as_ref().ok_or(CredentialError::BearerNotAccepted)?;
                let (subject, roles) = verifier.verify(token)?;
                Some(Caller {
                    principal: normalize("bearer token", &subject)?,
                    roles,
                    source: CredentialSource::BearerToken,
                    thumbprint: None,
                })
            }
        };
        // The sender's own credential (certificate first) decides whether a
        // forwarding node may vouch for another caller.
        let sender = certificate.as_ref().or(token.as_ref()).map(|caller| &caller.principal);
        if let Some(caller) = self.proxied_caller(headers, connection, sender)? {
            if self.client_certs == ClientCertPolicy::Required && caller.thumbprint.is_none() {
                return Err(CredentialError::ClientCertificateRequired);
            }
            return Ok(caller);
        }
        if let Some(caller) = certificate {
            return Ok(caller);
        }
        if self.client_certs == ClientCertPolicy::Required {
            return Err(CredentialError::ClientCertificateRequired);
        }
        token.ok_or(CredentialError::Missing)
    }

    fn proxied_caller(
        &self,
        headers: &HeaderMap,
        connection: &ConnectionInfo,
        sender: Option<&Principal>,
    ) -> Result<Option<Caller>, CredentialError> {
        let principal = headers.get(CLIENT_PRINCIPAL_HEADER);
        let thumbprint = headers.get(MTLS_THUMBPRINT_HEADER);
        let roles = headers.get(CLIENT_ROLES_HEADER);
        let Some(present) = principal
            .map(|_| CLIENT_PRINCIPAL_HEADER)
            .or(thumbprint.map(|_| MTLS_THUMBPRINT_HEADER))
            .or(roles.map(|_| CLIENT_ROLES_HEADER))
        else {
            return Ok(None);
        };
        let source = if connection.remote_addr.is_some_and(|addr| self.trusted_proxies.contains(addr.ip())) {
            CredentialSource::TrustedProxy
        } else if sender.is_some_and(|sender| self.trusted_forwarders.contains(sender)) {
            CredentialSource::ForwardingPeer
        } else {
            return Err(CredentialError::UntrustedProxyHeader { header: present });
        };
        for header in [CLIENT_PRINCIPAL_HEADER, MTLS_THUMBPRINT_HEADER, CLIENT_ROLES_HEADER] {
            if headers.get_all(header).iter().count() > 1 {
                return Err(CredentialError::InvalidProxyHeader { header, reason: "the header is repeated" });
            }
        }
        let principal = principal
            .ok_or(CredentialError::InvalidProxyHeader {
                header: CLIENT_PRINCIPAL_HEADER,
                reason: "required alongside x-mtls-thumbprint",
            })?
            .to_str()
            .map_err(|_| CredentialError::InvalidProxyHeader {
                header: CLIENT_PRINCIPAL_HEADER,
                reason: "not visible ASCII",
            })?;
        let thumbprint = match thumbprint {
            None => None,
            Some(value) => Some(value.to_str().ok().and_then(proxy::normalize_thumbprint).ok_or(
                CredentialError::InvalidProxyHeader {
                    header: MTLS_THUMBPRINT_HEADER,
                    reason: "expected a SHA-256 thumbprint as 64 hex digits",
                },
            )?),
        };
        let roles = match roles {
            None => Vec::new(),
            Some(value) => forwarded_roles(value)?,
        };
        Ok(Some(Caller { principal: normalize(CLIENT_PRINCIPAL_HEADER, principal)?, roles, source, thumbprint }))
    }
}

/// Parses [`CLIENT_ROLES_HEADER`]: comma-separated role names, each
/// non-empty printable ASCII without spaces, bounded in count and length.
fn forwarded_roles(value: &http::HeaderValue) -> Result<Vec<String>, CredentialError> {
    let invalid = |reason| CredentialError::InvalidProxyHeader { header: CLIENT_ROLES_HEADER, reason };
    let text = value.to_str().map_err(|_| invalid("not visible ASCII"))?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let roles: Vec<String> = text.split(',').map(|role| role.trim().to_string()).collect();
    if roles.len() > MAX_FORWARDED_ROLES {
        return Err(invalid("more than 32 roles"));
    }
    for role in &roles {
        if role.is_empty() || role.len() > MAX_ROLE_LEN || role.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(invalid("each role must be 1 to 128 visible ASCII characters"));
        }
    }
    Ok(roles)
}

/// Reads `authorization: Bearer <token>`; `Ok(None)` when the header is absent.
fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, CredentialError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(CredentialError::MalformedAuthorization);
    }
    let text = value.to_str().map_err(|_| CredentialError::MalformedAuthorization)?;
    let (scheme, token) = text.split_once(' ').ok_or(CredentialError::MalformedAuthorization)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(CredentialError::MalformedAuthorization);
    }
    Ok(Some(token))
}

/// Normalizes a principal: trimmed, non-empty, bounded, no control
/// characters; for URIs the scheme and authority are lowercased (they are
/// case-insensitive), the path is kept as is.
pub fn normalize(source_name: &'static str, raw: &str) -> Result<Principal, CredentialError> {
    let fail = |reason| CredentialError::InvalidPrincipal { source_name, reason };
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(fail("empty"));
    }
    if trimmed.len() > MAX_PRINCIPAL_LEN {
        return Err(fail("longer than 512 bytes"));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(fail("contains control characters"));
    }
    let normalized = match trimmed.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
            format!("{}://{}{}", scheme.to_ascii_lowercase(), authority.to_ascii_lowercase(), path)
        }
        None => trimmed.to_string(),
    };
    Ok(Principal::new(normalized))
}

/// Arbitrary credentials: binding answers a caller or an error, and never
/// panics, whatever the headers and the token hold.
#[cfg(test)]
mod arbitrary_input {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn headers_and_tokens_never_panic(authorization in proptest::collection::vec(any::<u8>(), 0..300),
                                          proxied in proptest::collection::vec(any::<u8>(), 0..300),
                                          token in "[A-Za-z0-9_.=-]{0,300}") {
            let key = jsonwebtoken::DecodingKey::from_secret(b"k");
            let verifier = JwtVerifier::new(jsonwebtoken::Algorithm::HS256, key, "iss", "aud").expect("valid");
            let _ = verifier.verify(&token);
            let config = PrincipalConfig::new()
                .jwt(verifier)
                .trusted_proxies(TrustedProxies::parse(&["127.0.0.1"]).expect("valid"));
            let mut headers = HeaderMap::new();
            if let Ok(value) = http::HeaderValue::from_bytes(&authorization) {
                headers.insert(http::header::AUTHORIZATION, value);
            }
            if let Ok(value) = http::HeaderValue::from_bytes(&proxied) {
                headers.insert(CLIENT_PRINCIPAL_HEADER, value);
            }
            let connection = ConnectionInfo { remote_addr: Some(([127, 0, 0, 1], 4000).into()), client_certs: None };
            let _ = config.authenticate(&headers, &connection);
        }

        #[test]
        fn proxy_lists_never_panic(entry in ".{0,48}") {
            let _ = TrustedProxies::parse(&[entry]);
        }
    }
}
