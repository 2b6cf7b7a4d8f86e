//! TLS for the node's listener, with rustls on aws-lc-rs.
//!
//! One listener serves gRPC (HTTP/2) and HTTP/JSON (HTTP/1.1 or HTTP/2), so
//! ALPN offers both `h2` and `http/1.1`. With a client CA the handshake asks
//! for a client certificate and verifies any presented chain against that CA
//! (a certificate from another CA never gets a connection), but lets clients
//! without one through: bearer-token callers need no certificate, and the
//! middleware's client-certificate policy (`required`) refuses them with a
//! reason (see decision 7 in `docs/DECISIONS.md`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Why a TLS configuration could not be built. Each error names the file (or
/// setting) at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A file could not be read.
    #[error("{what} {path}: cannot read the file")]
    Read {
        /// Which setting named the file (`tls.cert`, `tls.key`, `tls.client_ca`).
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The PEM holds nothing usable of the expected kind.
    #[error("{what}: {reason}")]
    Pem {
        /// Which setting.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificate, key or client CA.
    #[error("{what}: {source}")]
    Rustls {
        /// Which setting.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::Error,
    },
}

/// A TLS configuration for the node's accept loop.
#[derive(Debug, Clone)]
pub struct TlsAcceptorConfig {
    pub(crate) config: Arc<rustls::ServerConfig>,
    mutual: bool,
}

impl TlsAcceptorConfig {
    /// Builds the configuration from PEM: the server's certificate chain and
    /// private key, and optionally the CA bundle that signs client
    /// certificates (mutual TLS).
    pub fn from_pem(cert_chain: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<Self, TlsConfigError> {
        let chain = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| TlsConfigError::Pem { what: "tls.cert", reason: err.to_string() })?;
        if chain.is_empty() {
            return Err(TlsConfigError::Pem { what: "tls.cert", reason: "no PEM certificate found".into() });
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|err| TlsConfigError::Pem { what: "tls.key", reason: format!("no usable private key: {err}") })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsConfigError::Rustls { what: "tls", source })?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(bundle) => {
                let mut roots = rustls::RootCertStore::empty();
                let certificates = CertificateDer::pem_slice_iter(bundle)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| TlsConfigError::Pem { what: "tls.client_ca", reason: err.to_string() })?;
                if certificates.is_empty() {
                    return Err(TlsConfigError::Pem {
                        what: "tls.client_ca",
                        reason: "no PEM certificate found".into(),
                    });
                }
                for certificate in certificates {
                    roots
                        .add(certificate)
                        .map_err(|source| TlsConfigError::Rustls { what: "tls.client_ca", source })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|err| TlsConfigError::Pem { what: "tls.client_ca", reason: err.to_string() })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|source| TlsConfigError::Rustls { what: "tls.cert/tls.key", source })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { config: Arc::new(config), mutual: client_ca.is_some() })
    }

    /// Reads the PEM files and builds the configuration.
    pub async fn load(cert_chain: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsConfigError> {
        let read = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            async move {
                tokio::fs::read(&path).await.map_err(|source| TlsConfigError::Read {
                    what,
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let chain = read("tls.cert", cert_chain).await?;
        let key = read("tls.key", key).await?;
        let ca = match client_ca {
            Some(path) => Some(read("tls.client_ca", path).await?),
            None => None,
        };
        Self::from_pem(&chain, &key, ca.as_deref())
    }

    /// Wraps a rustls configuration built elsewhere (its ALPN should offer
    /// `h2`, and `http/1.1` for HTTP/JSON clients).
    pub fn from_config(config: Arc<rustls::ServerConfig>) -> Self {
        Self { config, mutual: false }
    }

    /// True when clients are asked for certificates (a client CA is set).
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }
}
