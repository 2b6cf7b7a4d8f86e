//! Identity from a JWT bearer token.

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use jsonwebtoken::Algorithm;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;

use crate::defaults::{JWT_LEEWAY, MAX_BEARER_TOKEN_LEN, MAX_JWT_KEYS};
use crate::error::{ConfigError, CredentialError};

/// Claim holding the caller's roles unless configured otherwise.
pub const DEFAULT_ROLES_CLAIM: &str = "roles";

/// Verifies bearer tokens: one pinned algorithm, one or more keys of that
/// algorithm (several during a key rotation: a token signed by any of them
/// verifies), a required issuer and audience, `exp` required, `nbf` honoured,
/// and [`JWT_LEEWAY`] of clock skew. The principal is the `sub` claim; roles
/// come from a string-array claim (`roles` by default) or a space-separated
/// string (`scope` style).
#[derive(Clone)]
pub struct JwtVerifier {
    /// Never empty, at most [`MAX_JWT_KEYS`].
    keys: Vec<DecodingKey>,
    validation: Validation,
    roles_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .field("keys", &self.keys.len())
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
        Ok(Self { keys: vec![key], validation, roles_claim: DEFAULT_ROLES_CLAIM.to_string() })
    }

    /// Also accepts tokens signed by `key`, for a key rotation: the issuer's
    /// old and new keys both verify until the old one is removed. The key
    /// must be of the pinned algorithm's type, and a verifier holds at most
    /// [`MAX_JWT_KEYS`].
    pub fn with_key(mut self, key: DecodingKey) -> Result<Self, ConfigError> {
        let algorithm = self.validation.algorithms[0];
        if key.family() != algorithm.family() {
            return Err(ConfigError::new("jwt.algorithm", format!("{algorithm:?} does not match the key type")));
        }
        if self.keys.len() >= MAX_JWT_KEYS {
            return Err(ConfigError::new(
                "jwt.public_key",
                format!("at most {MAX_JWT_KEYS} keys are accepted at once (the old and new key of a rotation)"),
            ));
        }
        self.keys.push(key);
        Ok(self)
    }

    /// A verifier for several PEM public keys of one algorithm (see
    /// [`from_public_key_pem`](Self::from_public_key_pem)): a token signed by
    /// any of them verifies. Errors name the key by its position
    /// (`jwt.public_key[1]`).
    pub fn from_public_key_pems(
        algorithm: Algorithm,
        pems: &[Vec<u8>],
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        let at = |i: usize, err: ConfigError| {
            if err.field == "jwt.public_key" {
                ConfigError::new(format!("jwt.public_key[{i}]"), err.reason)
            } else {
                err
            }
        };
        let (first, rest) =
            pems.split_first().ok_or_else(|| ConfigError::new("jwt.public_key", "at least one key is required"))?;
        if pems.len() > MAX_JWT_KEYS {
            return Err(ConfigError::new(
                "jwt.public_key",
                format!("at most {MAX_JWT_KEYS} keys are accepted at once (the old and new key of a rotation)"),
            ));
        }
        let mut verifier = Self::from_public_key_pem(algorithm, first, issuer, audience).map_err(|e| at(0, e))?;
        for (i, pem) in rest.iter().enumerate() {
            let key = pem_key(algorithm, pem).map_err(|e| at(i + 1, e))?;
            verifier = verifier.with_key(key).map_err(|e| at(i + 1, e))?;
        }
        Ok(verifier)
    }

    /// How many keys verify tokens.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// A verifier for a PEM public key (`ES256`/`ES384` EC keys, `RS*`/`PS*`
    /// RSA keys, `EdDSA` Ed25519 keys).
    pub fn from_public_key_pem(
        algorithm: Algorithm,
        pem: &[u8],
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        Self::new(algorithm, pem_key(algorithm, pem)?, issuer, audience)
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
        // Keys are tried in order; only a bad signature moves on to the next
        // key, every other failure is the token's and the same for all keys.
        let mut decoded = Err(jsonwebtoken::errors::Error::from(ErrorKind::InvalidSignature));
        for key in &self.keys {
            decoded = jsonwebtoken::decode::<Claims>(token, key, &self.validation);
            match &decoded {
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                _ => break,
            }
        }
        let data = decoded.map_err(|e| match e.kind() {
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

/// One path or a list of them, as a configuration file writes the JWT
/// public keys: `"old.pem"` or `["old.pem", "new.pem"]` (a rotation).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum KeyFiles {
    /// A single key file.
    One(PathBuf),
    /// Several key files, each verifying tokens.
    Many(Vec<PathBuf>),
}

impl KeyFiles {
    /// The paths, in order.
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            Self::One(path) => std::slice::from_ref(path),
            Self::Many(paths) => paths,
        }
    }
}

/// Reads the PEM files of `paths`; an error names `field[i]` and the path.
pub fn read_key_files(field: &str, paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, ConfigError> {
    if paths.is_empty() {
        return Err(ConfigError::new(field, "at least one key file is required"));
    }
    paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            std::fs::read(path).map_err(|err| {
                ConfigError::new(format!("{field}[{i}]"), format!("cannot read {}: {err}", path.display()))
            })
        })
        .collect()
}

/// Reads a PEM public key of `algorithm`'s type.
fn pem_key(algorithm: Algorithm, pem: &[u8]) -> Result<DecodingKey, ConfigError> {
    use jsonwebtoken::AlgorithmFamily;
    match algorithm.family() {
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
        AlgorithmFamily::Hmac => {
            return Err(ConfigError::new("jwt.algorithm", "HMAC algorithms take a shared secret, not a PEM key"));
        }
    }
    .map_err(|e| ConfigError::new("jwt.public_key", format!("not a usable PEM key: {e}")))
}

/// The `alg` named by a token's header, if the header decodes at all.
fn header_algorithm(token: &str) -> Option<String> {
    use base64::Engine as _;
    let (header, _) = token.split_once('.')?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&json).ok()?;
    header.get("alg")?.as_str().map(str::to_string)
}
