//! Why a caller was not identified, and why an identity configuration was
//! refused.

/// Why a credential did not identify the caller. Each is answered with
/// UNAUTHENTICATED; the variants let tests and logs tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// No client certificate, bearer token or trusted proxy header.
    #[error("no credentials: present a client certificate or a bearer token")]
    Missing,
    /// The node requires a client certificate and the call had none.
    #[error("a client certificate is required")]
    ClientCertificateRequired,
    /// The client certificate could not be parsed.
    #[error("the client certificate is not valid DER X.509")]
    ClientCertificateUnparsable,
    /// The client certificate names no SAN URI (the CN is never used).
    #[error("the client certificate has no URI subject alternative name")]
    NoSanUri,
    /// The client certificate names several SAN URIs, so the identity is
    /// ambiguous.
    #[error("the client certificate has more than one URI subject alternative name")]
    SeveralSanUris,
    /// The SAN URI is outside the configured trust domain.
    #[error("the client certificate's URI {uri:?} is outside the trust domain {trust_domain:?}")]
    OutsideTrustDomain {
        /// The SAN URI found.
        uri: String,
        /// The required prefix.
        trust_domain: String,
    },
    /// The `authorization` header is not `Bearer <token>`.
    #[error("authorization: expected \"Bearer <token>\"")]
    MalformedAuthorization,
    /// A bearer token was presented but this node verifies none.
    #[error("bearer tokens are not accepted by this node")]
    BearerNotAccepted,
    /// The token's `exp` is past (beyond the leeway).
    #[error("bearer token expired")]
    TokenExpired,
    /// The token's `nbf` is in the future (beyond the leeway).
    #[error("bearer token not yet valid")]
    TokenNotYetValid,
    /// The token's `aud` does not name this node's audience.
    #[error("bearer token has the wrong audience")]
    TokenWrongAudience,
    /// The token's `iss` is not the configured issuer.
    #[error("bearer token has the wrong issuer")]
    TokenWrongIssuer,
    /// The token is signed with another algorithm than the pinned one.
    #[error("bearer token uses an algorithm this node does not accept")]
    TokenWrongAlgorithm,
    /// The token's signature does not verify.
    #[error("bearer token signature is invalid")]
    TokenBadSignature,
    /// A required claim (`exp`, `iss`, `aud`, `sub`) is missing.
    #[error("bearer token lacks the required claim {0:?}")]
    TokenMissingClaim(String),
    /// The token is not a well-formed JWT.
    #[error("bearer token is malformed")]
    TokenMalformed,
    /// An identity header came from an address that is not a trusted proxy.
    #[error("{header} is accepted only from trusted proxies")]
    UntrustedProxyHeader {
        /// The header, e.g. `x-client-principal`.
        header: &'static str,
    },
    /// A trusted proxy sent an identity header that is malformed.
    #[error("{header}: {reason}")]
    InvalidProxyHeader {
        /// The header at fault.
        header: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The principal extracted is empty, too long or holds control
    /// characters.
    #[error("principal from {source_name}: {reason}")]
    InvalidPrincipal {
        /// Where it came from (`client certificate`, `bearer token`,
        /// `x-client-principal`).
        source_name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Why an identity or authorization configuration (a table, trusted
/// proxies, JWT settings) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The configuration field at fault, e.g. `rules[2].procedures[0]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// An error naming `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}
