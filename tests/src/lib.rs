//! Test harness for OmniRelay: throwaway PostgreSQL clusters and Redis servers
//! that tests own, plus the integration suites that use them.
//!
//! - [`PgCluster`] runs a private PostgreSQL cluster (initdb and `pg_ctl` on a
//!   free loopback port, in a temporary directory removed at the end) that a
//!   test can stop, crash, pause (SIGSTOP) and start again, optionally with TLS on
//!   ([`PgCluster::start_with_tls`]).
//! - [`TestDb`] gives each test a fresh database, on a shared per-process
//!   cluster, or on the server named by `OMNIRELAY_TEST_DATABASE_URL`.
//! - [`TestRedis`] runs a private `redis-server`, or namespaces keys on the
//!   server named by `OMNIRELAY_TEST_REDIS_URL`.
//! - [`TestS3`] runs a private S3-compatible server (`moto`, from PyPI).
//! - [`FaultProxy`] sits between a client and a server and stalls or
//!   resets their connections on demand (a network partition).
//! - [`eventually`] waits, with a bound, for a condition instead of sleeping.
//! - [`sidecar::Sidecar`] starts `omnirelay node` the one way every suite
//!   does ([`sidecar::SidecarBuilder`]: replicator, hub endpoints and TLS,
//!   lease TTL, ports, more flags), waits until it is ready, and kills,
//!   stops or pauses it; [`sidecar::Process`] is the handle of any binary a
//!   test starts, with its log. [`http`] speaks HTTP/1.1 over a raw socket
//!   for probes and scrapes.
//! - [`PythonTools`] (Helm's SDK and Kubernetes' schemas in a cached virtual
//!   environment), [`PrometheusTools`] (`prometheus`, `promtool`) and
//!   [`WorkspaceBinaries`] (the hub and the CLI, freshly built) are the
//!   real tools the deployment tests run.
//!
//! A missing server binary is an error whose message says how to fix it;
//! nothing skips silently, in CI or elsewhere.
//!
//! ```no_run
//! # async fn demo() {
//! let db = omnirelay_tests::TestDb::new().await;
//! let client = db.client().await;
//! let row = client.query_one("select 1::int4", &[]).await.expect("query should succeed");
//! assert_eq!(row.get::<_, i32>(0), 1);
//! # }
//! ```

mod binaries;
mod eventually;
pub mod http;
mod postgres;
mod proxy;
mod redis;
mod s3;
pub mod sidecar;
mod tools;

pub use binaries::{BinaryError, PG_BIN_DIR_ENV, PostgresBinaries, find_postgres_binaries, find_redis_server};
pub use eventually::{EVENTUALLY_POLL, EVENTUALLY_TIMEOUT, eventually, within};
pub use postgres::{BaseBackup, DATABASE_URL_ENV, PgCluster, PgOptions, PgServerTls, RecoveryTarget, TestDb};
pub use proxy::{Fault, FaultProxy, PROXY_BUFFER, PROXY_CONNECT_TIMEOUT};
pub use redis::{REDIS_URL_ENV, TestRedis};
pub use s3::TestS3;
pub use tools::{PrometheusTools, PythonTools, WorkspaceBinaries, free_port, target_dir, workspace_root, write_file};

/// Errors of the harness itself (not of the code under test).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A server binary is missing; the message says how to install it.
    #[error(transparent)]
    Binary(#[from] BinaryError),
    /// A server process could not be started or controlled.
    #[error("{what} failed: {detail}")]
    Process {
        /// What the harness tried to do.
        what: String,
        /// Output or log excerpt explaining why.
        detail: String,
    },
    /// File-system work (temporary directories, copies) failed.
    #[error("{what}")]
    Io {
        /// What the harness tried to do.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Reports whether the tests run in CI (`CI` set to anything but `false`/`0`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}
