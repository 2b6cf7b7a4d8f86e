//! Identity from a JWT bearer token.

use std::collections::BTreeMap;

pub use jsonwebtoken::Algorithm;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;

use crate::defaults::{JWT_LEEWAY, MAX_BEARER_TOKEN_LEN};
use crate::error::{ConfigError, CredentialError};

/// Claim holding the caller's roles unless configured otherwise.
pub const DEFAULT_ROLES_CLAIM: &str = "roles";

/// Verifies bearer tokens: one pinned algorithm and key, a required issuer and
/// audience, `exp` required, `nbf` honoured, and [`JWT_LEEWAY`] of clock skew.
/// The principal is the `sub` claim; roles come from a string-array claim
/// (`roles` by default) or a space-separated string (`scope` style).
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    roles_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .field("roles_claim", &self.roles_claim)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    // Defaulted so a token without `sub` reaches the required-claims check
    // and is refused as missing it, not as malformed.
    #[serde(default)]
    sub: String,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

impl JwtVerifier {
    /// A verifier for tokens signed with `algorithm` by `key`, issued by
    /// `issuer` for `audience`. The algorithm is pinned: a token whose header
    /// names another one is refused, which rules out `none` and the HS/RS
    /// confusion attack.
    pub fn new(
        algorithm: Algorithm,
        key: DecodingKey,
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        let issuer = issuer.into();
        let audience = audience.into();
        if issuer.trim().is_empty() {
            return Err(ConfigError::new("jwt.issuer", "must not be empty"));
        }
        if audience.trim().is_empty() {
            return Err(ConfigError::new("jwt.audience", "must not be empty"));
        }
        if key.family() != algorithm.family() {
            return Err(ConfigError::new("jwt.algorithm", format!("{algorithm:?} does not match the key type")));
        }
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = JWT_LEEWAY.as_secs();
        Ok(Self { key, validation, roles_claim: DEFAULT_ROLES_CLAIM.to_string() })
    }

    /// A verifier for a PEM public key (`ES256`/`ES384` EC keys, `RS*`/`PS*`
    /// RSA keys, `EdDSA` Ed25519 keys).
    pub fn from_public_key_pem(
        algorithm: Algorithm,
        pem: &[u8],
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        use jsonwebtoken::AlgorithmFamily;
        let key = match algorithm.family() {
            AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
            AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
            AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
            AlgorithmFamily::Hmac => {
                return Err(ConfigError::new("jwt.algorithm", "HMAC algorithms take a shared secret, not a PEM key"));
            }
        }
        .map_err(|e| ConfigError::new("jwt.public_key", format!("not a usable PEM key: {e}")))?;
        Self::new(algorithm, key, issuer, audience)
    }

    /// Reads roles from another claim (e.g. `groups` or `scope`).
    pub fn with_roles_claim(mut self, claim: impl Into<String>) -> Self {
        self.roles_claim = claim.into();
        self
    }

    /// Verifies a token and returns its subject and roles.
    pub fn verify(&self, token: &str) -> Result<(String, Vec<String>), CredentialError> {
        if token.len() > MAX_BEARER_TOKEN_LEN {
            return Err(CredentialError::TokenMalformed);
        }
        // The library cannot even parse a header naming an algorithm it
        // does not know (`none` above all) and would call the token
        // malformed; it is well formed, and refused for its algorithm.
        if let Some(alg) = header_algorithm(token)
            && !alg.parse::<Algorithm>().is_ok_and(|alg| self.validation.algorithms.contains(&alg))
        {
            return Err(CredentialError::TokenWrongAlgorithm);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => CredentialError::TokenExpired,
            ErrorKind::ImmatureSignature => CredentialError::TokenNotYetValid,
            ErrorKind::InvalidAudience => CredentialError::TokenWrongAudience,
            ErrorKind::InvalidIssuer => CredentialError::TokenWrongIssuer,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                CredentialError::TokenWrongAlgorithm
            }
            ErrorKind::InvalidSignature => CredentialError::TokenBadSignature,
            ErrorKind::MissingRequiredClaim(claim) => CredentialError::TokenMissingClaim(claim.clone()),
            _ => CredentialError::TokenMalformed,
        })?;
        let roles = match data.claims.other.get(&self.roles_claim) {
            Some(serde_json::Value::Array(items)) => {
                items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
            }
            Some(serde_json::Value::String(text)) => text.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        Ok((data.claims.sub, roles))
    }
}

/// The `alg` named by a token's header, if the header decodes at all.
fn header_algorithm(token: &str) -> Option<String> {
    use base64::Engine as _;
    let (header, _) = token.split_once('.')?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&json).ok()?;
    header.get("alg")?.as_str().map(str::to_string)
}
