//! Limits of credential parsing, each with the reason for its value.

use std::time::Duration;

/// Leeway for JWT `exp` and `nbf`, absorbing clock skew between the issuer
/// and this process. 30 s is well above NTP-synchronized skew and far below
/// any sensible token lifetime.
pub const JWT_LEEWAY: Duration = Duration::from_secs(30);

/// Longest bearer token read from `authorization`. Real tokens are under
/// 2 KiB; the bound stops a caller from making us parse megabytes before the
/// signature check fails.
pub const MAX_BEARER_TOKEN_LEN: usize = 8 * 1024;

/// Longest principal accepted from any source (SAN URI, JWT `sub`, proxy
/// header). SPIFFE IDs are capped at 2048 bytes; 512 is plenty for ours and
/// keeps events and logs compact.
pub const MAX_PRINCIPAL_LEN: usize = 512;

/// Most JWT verification keys accepted at once. A rotation needs two (the old
/// and the new key); a few more cover an overlapping emergency rotation. Each
/// key is one more signature check for a token that verifies with none, so
/// the bound keeps a bad token's cost small.
pub const MAX_JWT_KEYS: usize = 4;

/// Most roles [`CLIENT_ROLES_HEADER`](crate::proxy::CLIENT_ROLES_HEADER) may
/// carry: a token's roles are a handful; more is a malformed or hostile
/// header, refused rather than stored per call.
pub const MAX_FORWARDED_ROLES: usize = 32;

/// Longest role name in [`CLIENT_ROLES_HEADER`](crate::proxy::CLIENT_ROLES_HEADER).
pub const MAX_ROLE_LEN: usize = 128;
