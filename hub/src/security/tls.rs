//! TLS and mutual TLS for the gRPC service, with rustls on aws-lc-rs.
//!
//! [`ServerTls::load`] reads the server certificate chain and key (and, for
//! mutual TLS, the client CA bundle) from PEM files and builds the rustls
//! configuration: TLS 1.2 and 1.3 with rustls' safe defaults, ALPN `h2`, and,
//! when a client CA is configured, a client certificate that is required and
//! must chain to that CA. The accept loop that uses it lives in
//! [`crate::security::transport`]; the caller's identity taken from the verified
//! client certificate in [`crate::security::principal`].
//!
//! Every error names the flag and the file it came from, so an operator sees
//! `--tls-key /etc/hub/key.pem: no private key found` and not a bare parse
//! error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// PEM files of the gRPC service's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// The certificate's private key.
    pub key: PathBuf,
    /// CA(s) for client certificates; `Some` turns on mutual TLS.
    pub client_ca: Option<PathBuf>,
}

/// Errors building the gRPC service's TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{flag} {}: cannot read the file", path.display())]
    Read {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind expected, or a malformed one.
    #[error("{flag} {}: {what}", path.display())]
    Pem {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, e.g. "no PEM certificate found".
        what: String,
    },
    /// rustls refused the certificate and key (for example a key that does
    /// not match the certificate).
    #[error("--tls-cert/--tls-key: the certificate and key are not usable together")]
    Identity(#[source] rustls::Error),
    /// The client CA bundle cannot verify client certificates.
    #[error("--tls-client-ca {}: cannot verify client certificates with it", path.display())]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// The gRPC service's TLS configuration, ready to accept connections.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    mutual: bool,
}

impl ServerTls {
    /// Reads the PEM files and builds the configuration.
    pub async fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let chain = read_certificates("--tls-cert", &files.cert).await?;
        let key = read_key(&files.key).await?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Identity)?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for certificate in read_certificates("--tls-client-ca", path).await? {
                    roots.add(certificate).map_err(|err| TlsError::Pem {
                        flag: "--tls-client-ca",
                        path: path.clone(),
                        what: format!("not a usable CA certificate: {err}"),
                    })?;
                }
                // Without `allow_unauthenticated`, a client that presents no
                // certificate fails the handshake: mutual TLS means every
                // caller has an identity.
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|source| TlsError::ClientCa { path: path.clone(), source })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(TlsError::Identity)?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { config: Arc::new(config), mutual: files.client_ca.is_some() })
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// An acceptor for one or more connections.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

async fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path).await.map_err(|source| TlsError::Read { flag, path: path.to_path_buf(), source })
}

async fn read_certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(flag, path).await?;
    let pem_error = |what: String| TlsError::Pem { flag, path: path.to_path_buf(), what };
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(format!("malformed PEM: {err}")))?;
    if certificates.is_empty() {
        return Err(pem_error("no PEM certificate found".into()));
    }
    Ok(certificates)
}

async fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("--tls-key", path).await?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| TlsError::Pem {
        flag: "--tls-key",
        path: path.to_path_buf(),
        what: match err {
            rustls::pki_types::pem::Error::NoItemsFound => "no private key found".into(),
            other => format!("malformed PEM: {other}"),
        },
    })
}
