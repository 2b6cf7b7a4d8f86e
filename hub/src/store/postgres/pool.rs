//! Connecting to PostgreSQL: the store's own configuration
//! ([`PgStoreConfig`], into which the hub's flags convert at the edge), the
//! connection pool and TLS to the server.
//!
//! [`build_pool`] builds the deadpool pool the store uses ([`connect_pool`]
//! builds the same for tools and tests), with rustls (aws-lc-rs) for TLS in
//! the modes of [`DatabaseTls`] (`--database-tls`), named after libpq's
//! `sslmode`:
//!
//! | mode | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | when the server offers it | no |
//! | `require` | always | no |
//! | `verify-full` | always | chain to `--database-ca-file`, and host name |
//!
//! `prefer` and `require` encrypt but cannot stop an active
//! man-in-the-middle, exactly like libpq; production deployments should use
//! `verify-full`. The pool is created lazily: building it does not connect,
//! so a hub starts (not ready) while the database is down and becomes ready
//! when it comes back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::defaults;
use crate::log::ids::InvalidInput;
use crate::telemetry;

/// TLS to PostgreSQL, validated: `VerifyFull` carries its CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTls {
    /// Plain TCP.
    Disable,
    /// TLS when offered, unverified.
    Prefer,
    /// TLS always, unverified.
    Require,
    /// TLS always, verified against the CA in this PEM file.
    VerifyFull {
        /// PEM file of the CA.
        ca_file: PathBuf,
    },
}

/// How to reach the database and how much of it to use.
#[derive(Debug, Clone)]
pub struct PgStoreConfig {
    /// Connection URL, e.g. `postgres://hub@db:5432/omnirelay`.
    pub url: String,
    /// TLS to the server (see the module documentation); every connection of the
    /// store, pooled or listening, uses it.
    pub tls: DatabaseTls,
    /// Pooled connections (see [`defaults::POOL_SIZE`]).
    pub pool_size: usize,
    /// Group committers (see [`defaults::COMMITTERS`]).
    pub committers: usize,
    /// Deadline of a statement or an append transaction (see
    /// [`defaults::DATABASE_TIMEOUT`]).
    pub timeout: Duration,
}

impl PgStoreConfig {
    /// A configuration with the default sizes and TLS when the server
    /// offers it (`prefer`, libpq's default).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: DatabaseTls::Prefer,
            pool_size: defaults::POOL_SIZE,
            committers: defaults::COMMITTERS,
            timeout: defaults::DATABASE_TIMEOUT,
        }
    }
}

/// Errors building the pool (not connecting: that happens on first use).
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The CA file cannot be read.
    #[error("--database-ca-file {}: cannot read the file", path.display())]
    ReadCa {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("--database-ca-file {}: {what}", path.display())]
    Ca {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the client configuration.
    #[error("cannot configure TLS to PostgreSQL")]
    Tls(#[source] rustls::Error),
    /// The connection URL does not parse.
    #[error(transparent)]
    Url(#[from] InvalidInput),
    /// deadpool refused the pool settings.
    #[error("cannot build the PostgreSQL pool")]
    Pool(#[source] deadpool_postgres::BuildError),
}

/// The TLS connector for `tls`, to pass to `tokio_postgres::Config::connect`
/// or a pool manager together with a config prepared by [`apply_tls_mode`].
pub async fn tls_connector(tls: &DatabaseTls) -> Result<MakeRustlsConnect, DatabaseError> {
    Ok(MakeRustlsConnect::new(client_config(tls).await?))
}

/// Sets the connection's `sslmode` for `tls` (`verify-full` needs TLS; the
/// connector does the verifying).
pub fn apply_tls_mode(config: &mut tokio_postgres::Config, tls: &DatabaseTls) {
    config.ssl_mode(match tls {
        DatabaseTls::Disable => SslMode::Disable,
        DatabaseTls::Prefer => SslMode::Prefer,
        DatabaseTls::Require | DatabaseTls::VerifyFull { .. } => SslMode::Require,
    });
}

/// Builds a pool for `config` (outside a store: tools and tests), exactly
/// as the store builds its own; connections open on first use.
pub async fn connect_pool(config: &PgStoreConfig) -> Result<Pool, DatabaseError> {
    let mut pg = connection_config(&config.url)?;
    apply_tls_mode(&mut pg, &config.tls);
    build_pool(pg, tls_connector(&config.tls).await?, config.pool_size)
}

/// The parsed connection settings shared by the pool and the listener.
pub fn connection_config(url: &str) -> Result<tokio_postgres::Config, InvalidInput> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|err| InvalidInput::new("database_url", format!("is not a valid PostgreSQL URL: {err}")))?;
    if config.get_application_name().is_none() {
        config.application_name("omnirelay-hub");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(defaults::POOL_TIMEOUT);
    }
    // Detects a silently dead server (a cut network) on idle pooled
    // connections and on the listener.
    config.keepalives(true).keepalives_idle(Duration::from_secs(30));
    Ok(config)
}

/// Builds a connection pool, with TLS as configured.
pub fn build_pool(config: tokio_postgres::Config, tls: MakeRustlsConnect, size: usize) -> Result<Pool, DatabaseError> {
    let manager = Manager::from_config(
        config,
        tls,
        // Fast: a broken connection is detected by the next statement, which
        // fails as unavailable; a per-checkout test query would cost a round
        // trip on every append group.
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(defaults::POOL_TIMEOUT))
        .create_timeout(Some(defaults::POOL_TIMEOUT))
        .recycle_timeout(Some(defaults::POOL_TIMEOUT))
        .build()
        .map_err(DatabaseError::Pool)
}

/// Records the pool's size, idle connections and waiters as gauges.
pub fn record_pool_gauges(pool: &Pool) {
    let status = pool.status();
    metrics::gauge!(telemetry::DB_POOL_CONNECTIONS).set(status.size as f64);
    metrics::gauge!(telemetry::DB_POOL_AVAILABLE).set(status.available as f64);
    metrics::gauge!(telemetry::DB_POOL_WAITING).set(status.waiting as f64);
    metrics::gauge!(telemetry::DB_POOL_MAX).set(status.max_size as f64);
}

async fn client_config(tls: &DatabaseTls) -> Result<rustls::ClientConfig, DatabaseError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(DatabaseError::Tls)?;
    let config = match tls {
        DatabaseTls::VerifyFull { ca_file } => {
            let pem = tokio::fs::read(ca_file)
                .await
                .map_err(|source| DatabaseError::ReadCa { path: ca_file.clone(), source })?;
            let ca_error = |what: String| DatabaseError::Ca { path: ca_file.clone(), what };
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_slice_iter(&pem) {
                let certificate = certificate.map_err(|err| ca_error(format!("malformed PEM: {err}")))?;
                roots.add(certificate).map_err(|err| ca_error(format!("not a usable CA certificate: {err}")))?;
            }
            if roots.is_empty() {
                return Err(ca_error("no PEM certificate found".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        // Disable never starts TLS; the connector is still needed by type.
        DatabaseTls::Disable | DatabaseTls::Prefer | DatabaseTls::Require => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(EncryptOnly(provider))).with_no_client_auth()
        }
    };
    Ok(config)
}

/// Accepts any server certificate but still checks that the server holds its
/// key (the handshake signatures), which is what libpq's `require` does: it
/// encrypts, and stops passive eavesdroppers only.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
