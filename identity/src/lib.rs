//! OmniRelay's identity layer: who is calling and what they may do, one
//! implementation shared by the mesh node (`omnirelay-client`) and the hub
//! (`omnirelay-hub`).
//!
//! Overview:
//!
//! - [`PrincipalConfig::authenticate`] binds a request to a [`Caller`] from
//!   its headers and its [`ConnectionInfo`]: the single SAN URI of a verified
//!   client certificate ([`mtls`]), a JWT with a pinned algorithm and
//!   required issuer, audience and expiry ([`JwtVerifier`]), or identity
//!   headers from [`TrustedProxies`] only. Failures are [`CredentialError`]s
//!   (UNAUTHENTICATED).
//! - [`grants::Table`] is the default-deny authorization table: rules of
//!   [`grants::Subjects`] (principal patterns, roles) times a service's own
//!   permissions times [`grants::NamePattern`]s over shards.
//!
//! Both need the default feature `binding`. Without it the crate is the
//! [`Principal`] type (and the error and limit types) on serde alone: what
//! the lean lease queue of `omnirelay-client` records in its events, without
//! JWT, X.509 or a transport (see `docs/DECISIONS.md`, decision 114).
//!
//! The crate knows nothing of queues, logs or transports beyond `http` and
//! the connect-info types of tonic and axum, so the hub depends on it without
//! pulling in the lease queue (see `docs/DECISIONS.md`).
//!
//! ```
//! use omnirelay_identity::{ConnectionInfo, PrincipalConfig, TrustedProxies};
//!
//! let config = PrincipalConfig::new().trusted_proxies(TrustedProxies::parse(&["10.0.0.0/8"]).expect("valid"));
//! let mut headers = http::HeaderMap::new();
//! headers.insert("x-client-principal", "spiffe://example/worker".parse().expect("ascii"));
//! let from_proxy = ConnectionInfo { remote_addr: Some("10.1.2.3:4000".parse().expect("addr")), client_certs: None };
//! assert_eq!(config.authenticate(&headers, &from_proxy).expect("trusted").principal.as_str(), "spiffe://example/worker");
//! let from_elsewhere = ConnectionInfo { remote_addr: Some("192.0.2.1:4000".parse().expect("addr")), client_certs: None };
//! assert!(config.authenticate(&headers, &from_elsewhere).is_err());
//! ```

#[cfg(feature = "binding")]
pub mod binding;
#[cfg(feature = "binding")]
pub mod connection;
pub mod defaults;
pub mod error;
#[cfg(feature = "binding")]
pub mod grants;
#[cfg(feature = "binding")]
pub mod jwt;
#[cfg(feature = "binding")]
pub mod mtls;
mod principal;
#[cfg(feature = "binding")]
pub mod proxy;

#[cfg(feature = "binding")]
pub use binding::{Caller, ClientCertPolicy, CredentialSource, PrincipalConfig};
#[cfg(feature = "binding")]
pub use connection::{ClientCertChain, ConnectionInfo, RemoteAddr};
pub use error::{ConfigError, CredentialError};
#[cfg(feature = "binding")]
pub use jwt::{DEFAULT_ROLES_CLAIM, JwtVerifier};
pub use principal::Principal;
#[cfg(feature = "binding")]
pub use proxy::{CLIENT_PRINCIPAL_HEADER, CLIENT_ROLES_HEADER, MTLS_THUMBPRINT_HEADER, TrustedProxies};
