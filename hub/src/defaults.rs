//! Every default, limit and timeout of the hub's operations layer, each with
//! the reason for its value.
//!
//! Flags take their defaults from here, so `--help`, the operations guide and
//! the code cannot disagree.

use std::time::Duration;

/// Address the gRPC service listens on when `--listen` is not given.
/// Loopback, so a hub started on a laptop is not reachable from the network
/// by accident; deployments (the Helm chart) set `0.0.0.0:7400`.
pub const LISTEN: &str = "127.0.0.1:7400";

/// Address of the HTTP admin server (`/healthz`, `/readyz`, `/metrics`). The
/// port next to the gRPC one, on loopback for the same reason.
pub const ADMIN_LISTEN: &str = "127.0.0.1:7401";

/// File of the embedded SQLite store used when no database URL is given:
/// in the working directory, so `cargo run -p omnirelay-hub` works anywhere
/// and the file is easy to find (and to delete).
pub const SQLITE_PATH: &str = "omnirelay-hub.db";

/// Connections in the PostgreSQL pool. The append path group-commits, so a
/// few connections carry the writes; the rest serve catch-up reads,
/// checkpoints and leases. Sixteen replicas times sixteen stays well under
/// PostgreSQL's default `max_connections` of 100 only with a pooler, so
/// operators running many replicas should lower it.
pub const DATABASE_POOL_SIZE: usize = 16;

/// Upper bound accepted for `--database-pool-size`: more connections than
/// this per replica only adds lock contention in PostgreSQL.
pub const DATABASE_POOL_SIZE_MAX: usize = 512;

/// How long a request waits for a pooled connection before failing with
/// UNAVAILABLE: long enough to ride out a burst, short enough that callers
/// retry on another replica instead of piling up.
pub const DATABASE_POOL_WAIT: Duration = Duration::from_secs(5);

/// Timeout of one TCP + TLS + authentication handshake with PostgreSQL: a
/// reachable server answers in milliseconds; a black-holed one must not hang
/// the pool.
pub const DATABASE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the server waits for a client's TLS handshake to finish. Slow
/// or silent clients (or port scanners) must not hold an accept slot.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in flight at once; beyond this, new connections wait in
/// the kernel's accept queue. Bounds the memory a connection flood can take.
pub const TLS_HANDSHAKES_IN_FLIGHT: usize = 256;

/// Pause after a failed `accept` (for example EMFILE, too many open files)
/// before trying again, so the loop does not spin a core while the process
/// is out of descriptors.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// How often the health monitor probes the store to keep the gRPC health
/// status current. Kubernetes probes every 10 s by default; probing twice as
/// often flips NOT_SERVING before the next probe sees a stale answer.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// Bound of one readiness probe (a `SELECT` and the schema-version check): a
/// database that takes longer is not ready for appends either.
pub const READINESS_TIMEOUT: Duration = Duration::from_secs(3);

/// How long shutdown waits for in-flight calls and open streams after the
/// hub stopped accepting connections. Kubernetes' default
/// `terminationGracePeriodSeconds` is 30 s; 20 s leaves time to close the
/// pool and flush logs before SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Default tracing filter: lifecycle at INFO, nothing per request.
pub const LOG_FILTER: &str = "info";
