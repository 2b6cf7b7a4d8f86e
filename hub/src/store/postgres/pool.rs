//! Connecting to PostgreSQL: the connection pool and TLS to the server.
//!
//! [`connect_pool`] builds the deadpool pool every PostgreSQL code path of
//! the hub shares, with rustls (aws-lc-rs) for TLS in the modes of
//! `--database-tls`, named after libpq's `sslmode`:
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

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseTls, PostgresConfig};
use crate::defaults;
use crate::health::{NotReady, Probe, ProbeFuture};
use crate::schema::{self, SchemaError};
use crate::store::postgres::PgStore;
use crate::telemetry::{self, DbOperation};

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

/// Builds a pool for `config` (outside a store: tools and tests);
/// connections open on first use.
pub async fn connect_pool(config: &PostgresConfig) -> Result<Pool, DatabaseError> {
    let mut pg = config.url.to_pg_config();
    pg.connect_timeout(defaults::POOL_TIMEOUT);
    apply_tls_mode(&mut pg, &config.tls);
    if pg.get_application_name().is_none() {
        // Shows the hub's sessions in pg_stat_activity.
        pg.application_name("omnirelay-hub");
    }
    let tls = tls_connector(&config.tls).await?;
    // Fast recycling: a connection the server closed (restart, failover) is
    // detected by its closed socket; a verifying query on every checkout
    // would add a round trip to every append.
    let manager = Manager::from_config(pg, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(defaults::POOL_TIMEOUT),
            create: Some(defaults::POOL_TIMEOUT),
            recycle: Some(defaults::POOL_TIMEOUT),
        })
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

/// The PostgreSQL store is ready when a pooled connection answers and the
/// database carries the schema this build needs.
impl Probe for PgStore {
    fn check(&self) -> ProbeFuture<'_> {
        Box::pin(probe(self.pool()))
    }

    fn record_gauges(&self) {
        record_pool_gauges(self.pool());
    }
}

async fn probe(pool: &Pool) -> Result<(), NotReady> {
    let started = std::time::Instant::now();
    let result = async {
        // The whole chain: the pool's "error creating a new object: db
        // error" says nothing without PostgreSQL's own message after it.
        let client = pool.get().await.map_err(|err| NotReady::Unreachable(crate::error::causes(&err)))?;
        // A probe cut short by its timeout closes its connection rather
        // than pool it with a query in flight.
        let client = crate::store::postgres::Conn::lend(client);
        schema::check(&client).await.map_err(|err| match err {
            SchemaError::Database { source, .. } => NotReady::Unreachable(crate::error::causes(&source)),
            other => NotReady::Schema(other.to_string()),
        })?;
        client.release();
        Ok(())
    }
    .await;
    telemetry::record_db_operation(DbOperation::Probe, started.elapsed(), result.is_ok());
    result
}
