//! The hub's validated configuration, [`Config`], and the value types it
//! is made of; [`flags`] is the command line (flags and `OMNIRELAY_HUB_*`
//! environment variables, one vocabulary) that validates into it.
//!
//! Every flag has exactly one environment variable, declared next to it, named
//! `OMNIRELAY_HUB_` plus the flag in upper snake case (`--database-url` is
//! `OMNIRELAY_HUB_DATABASE_URL`). A flag given on the command line wins over
//! its variable. Parsing ([`flags::Cli`], clap) checks each value on its own;
//! [`flags::ServeArgs::validate`] checks how values combine and returns a
//! [`ConfigError`] that names the flags involved.
//!
//! Secrets never reach logs: [`DatabaseUrl`] prints with its password
//! replaced by `***`, and clap is told not to show the variable's value in
//! `--help`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::ValueEnum;

use crate::defaults;
use crate::security::access::Access;
pub use crate::security::tls::TlsFiles;
pub use crate::store::postgres::DatabaseTls;
use crate::store::postgres::PgStoreConfig;

pub mod flags;

/// Errors in a combination of settings; each names the flags involved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--tls-cert` was given without `--tls-key`, or the reverse.
    #[error("{given} needs {missing} as well (the server certificate and its private key go together)")]
    TlsHalfConfigured {
        /// The flag that was given.
        given: &'static str,
        /// The flag that is missing.
        missing: &'static str,
    },
    /// `--tls-client-ca` without server TLS.
    #[error("--tls-client-ca requires --tls-cert and --tls-key: mutual TLS needs server TLS")]
    ClientCaWithoutTls,
    /// The database URL does not parse. The reason never contains the URL.
    #[error("--database-url is not a valid PostgreSQL connection string: {reason}")]
    DatabaseUrl {
        /// Why it does not parse.
        reason: String,
    },
    /// The URL carries `sslmode`, which `--database-tls` owns.
    #[error("--database-url must not set sslmode; use --database-tls (disable, prefer, require, verify-full)")]
    SslModeInUrl,
    /// `verify-full` without a CA to verify against.
    #[error("--database-tls verify-full needs --database-ca-file (the CA that signed the server certificate)")]
    DatabaseCaRequired,
    /// The pool cannot hold the committers and still serve reads.
    #[error(
        "--database-pool-size {pool_size} leaves no connection beside the {committers} committers \
         (--committers); give the pool more connections than committers"
    )]
    PoolTooSmall {
        /// The pool size given.
        pool_size: usize,
        /// The committers given.
        committers: usize,
    },
    /// A PostgreSQL-only command without a database.
    #[error(
        "{command} needs --database-url (or OMNIRELAY_HUB_DATABASE_URL); the embedded SQLite store migrates itself at start"
    )]
    DatabaseRequired {
        /// The subcommand.
        command: &'static str,
    },
    /// The access file (`--access`) is unreadable or invalid; the error
    /// names the field.
    #[error("--access: {0}")]
    Access(omnirelay_identity::ConfigError),
    /// A per-principal limit flag (`--append-rate`, `--append-burst`) is out
    /// of range; the error names the flag.
    #[error("{0}")]
    Limit(omnirelay_identity::ConfigError),
    /// A CA file with a mode that does not verify certificates.
    #[error("--database-ca-file is only used with --database-tls verify-full (got {mode})")]
    DatabaseCaUnused {
        /// The mode that was given.
        mode: DatabaseTlsMode,
    },
}

/// Result type of configuration handling.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// TLS to PostgreSQL, named like libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatabaseTlsMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, else plain; the certificate is not
    /// verified (libpq's default).
    Prefer,
    /// TLS or fail; the certificate is not verified (protects against
    /// passive eavesdropping only).
    Require,
    /// TLS or fail; the certificate must chain to the configured CA and name
    /// the host connected to.
    VerifyFull,
}

impl fmt::Display for DatabaseTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatabaseTlsMode::Disable => "disable",
            DatabaseTlsMode::Prefer => "prefer",
            DatabaseTlsMode::Require => "require",
            DatabaseTlsMode::VerifyFull => "verify-full",
        })
    }
}

/// A duration written with a unit: `250ms`, `20s`, `5m`, `1h`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("expected a number with a unit (ms, s, m, h, d), e.g. 20s; got {s:?}"))?;
        let duration = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            "d" => Duration::from_secs(number.saturating_mul(86_400)),
            _ => return Err(format!("unknown unit {unit:?} in {s:?}; use ms, s, m, h or d")),
        };
        if duration.is_zero() {
            return Err("must be greater than zero".into());
        }
        Ok(HumanDuration(duration))
    }
}

impl fmt::Display for HumanDuration {
    /// Writes the largest unit that divides the duration exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
            if millis >= size && millis.is_multiple_of(size) {
                return write!(f, "{}{unit}", millis / size);
            }
        }
        write!(f, "{millis}ms")
    }
}

/// A size in bytes written with a unit: `512KiB`, `256MiB`, `1GiB` (or a
/// plain number of bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number: usize = number
            .parse()
            .map_err(|_| format!("expected a number with a unit (KiB, MiB, GiB), e.g. 256MiB; got {s:?}"))?;
        let scale: usize = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            other => return Err(format!("unknown unit {other:?} in {s:?}; use KiB, MiB or GiB")),
        };
        number.checked_mul(scale).map(ByteSize).ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    /// Writes the largest unit that divides the size exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// `off`, or a [`HumanDuration`]: for periodic work that can be disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Option<Duration>);

impl FromStr for Interval {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("off") {
            Ok(Interval(None))
        } else {
            s.parse::<HumanDuration>().map(|d| Interval(Some(d.0))).map_err(|err| format!("{err}, or off"))
        }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(duration) => HumanDuration(duration).fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// A PostgreSQL connection string whose `Display` and `Debug` hide the
/// password, so it can be logged; [`DatabaseUrl::expose`] gives the real one.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Parses and checks a connection string (URL or key=value form).
    pub fn parse(raw: &str) -> Result<Self> {
        // tokio-postgres' parse errors describe the problem, never echo the
        // input, so they are safe to show.
        tokio_postgres::Config::from_str(raw).map_err(|err| ConfigError::DatabaseUrl { reason: err.to_string() })?;
        if has_sslmode(raw) {
            return Err(ConfigError::SslModeInUrl);
        }
        Ok(Self(raw.to_string()))
    }

    /// The connection string with the password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The parsed tokio-postgres configuration.
    pub fn to_pg_config(&self) -> tokio_postgres::Config {
        tokio_postgres::Config::from_str(&self.0).expect("the URL was checked when the DatabaseUrl was built")
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_connection_string(&self.0))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

const REDACTED: &str = "***";

/// Replaces the password of a PostgreSQL connection string (URL userinfo,
/// `password=` query parameter, or `password=` key) with `***`.
pub fn redact_connection_string(raw: &str) -> String {
    if let Some(scheme_end) = raw.find("://") {
        let (scheme, rest) = raw.split_at(scheme_end + 3);
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let masked = if userinfo.contains(':') { format!("{user}:{REDACTED}") } else { user.to_string() };
                format!("{masked}{}", &authority[at..])
            }
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}={REDACTED}"),
                        _ => pair.to_string(),
                    })
                    .collect();
                format!("{path}?{}", query.join("&"))
            }
            None => tail.to_string(),
        };
        format!("{scheme}{authority}{tail}")
    } else {
        redact_key_value(raw)
    }
}

/// Key=value form: values may be single-quoted with backslash escapes.
fn redact_key_value(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while !rest.is_empty() {
        let trimmed = rest.trim_start();
        out.push_str(&rest[..rest.len() - trimmed.len()]);
        rest = trimmed;
        let Some(eq) = rest.find('=') else {
            out.push_str(rest);
            break;
        };
        let key = rest[..eq].trim();
        out.push_str(&rest[..=eq]);
        rest = rest[eq + 1..].trim_start();
        let value_len = key_value_len(rest);
        if key.eq_ignore_ascii_case("password") {
            out.push_str(REDACTED);
        } else {
            out.push_str(&rest[..value_len]);
        }
        rest = &rest[value_len..];
    }
    out
}

/// Length of the value at the start of `s` (quoted or up to whitespace).
fn key_value_len(s: &str) -> usize {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, '\'')) => {
            let mut escaped = false;
            for (i, c) in chars {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '\'' => return i + 1,
                    _ => {}
                }
            }
            s.len()
        }
        _ => s.find(char::is_whitespace).unwrap_or(s.len()),
    }
}

fn has_sslmode(raw: &str) -> bool {
    raw.to_ascii_lowercase().contains("sslmode")
}

/// The validated configuration of a serving hub.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the gRPC service listens on (the binary binds it; `run` takes
    /// the bound listener).
    pub listen: SocketAddr,
    /// Address of the HTTP admin server.
    pub admin_listen: SocketAddr,
    /// The store and how to reach it.
    pub store: StoreConfig,
    /// TLS of the gRPC service; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    /// How callers are identified and what they may do; with no identity
    /// source and no mutual TLS the hub is in protected mode.
    pub access: Access,
    /// How often retention runs on this replica; `None` disables it here.
    pub retention_interval: Option<Duration>,
    /// Age after which a checkpoint stops holding back retention.
    pub checkpoint_max_age: Duration,
    /// How often the store is probed for the gRPC health status.
    pub health_interval: Duration,
    /// How long shutdown waits for open calls and streams.
    pub shutdown_grace: Duration,
    /// Bytes the replica may hold for its subscriptions.
    pub subscription_memory: usize,
}

/// Which store keeps the log.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// PostgreSQL, shared by any number of replicas.
    Postgres(PostgresConfig),
    /// An embedded SQLite file, one replica only.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The connection string (password redacted when printed).
    pub url: DatabaseUrl,
    /// TLS to the server.
    pub tls: DatabaseTls,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Group committers (each holds a pooled connection while committing).
    pub committers: usize,
    /// Deadline of a statement or an append transaction.
    pub timeout: Duration,
}

impl PostgresConfig {
    /// The PostgreSQL store's own configuration for these validated settings.
    pub fn store_config(&self) -> PgStoreConfig {
        PgStoreConfig {
            url: self.url.expose().to_string(),
            tls: self.tls.clone(),
            pool_size: self.pool_size,
            committers: self.committers,
            timeout: self.timeout,
        }
    }

    /// A configuration for `url` with the defaults: no TLS settings beyond
    /// `prefer`, the default pool size. For tests and tools.
    pub fn new(url: &str) -> Result<Self> {
        Ok(Self {
            url: DatabaseUrl::parse(url)?,
            tls: DatabaseTls::Prefer,
            pool_size: defaults::POOL_SIZE,
            committers: defaults::COMMITTERS,
            timeout: defaults::DATABASE_TIMEOUT,
        })
    }
}

impl From<&DatabaseTls> for DatabaseTlsMode {
    /// The mode's name as the flag spells it.
    fn from(tls: &DatabaseTls) -> Self {
        match tls {
            DatabaseTls::Disable => DatabaseTlsMode::Disable,
            DatabaseTls::Prefer => DatabaseTlsMode::Prefer,
            DatabaseTls::Require => DatabaseTlsMode::Require,
            DatabaseTls::VerifyFull { .. } => DatabaseTlsMode::VerifyFull,
        }
    }
}

impl Config {
    /// A configuration for embedding the hub or testing it: `store`, both
    /// servers on ephemeral loopback ports (`127.0.0.1:0`), no TLS, and every
    /// other setting at its default.
    pub fn for_store(store: StoreConfig) -> Self {
        let ephemeral = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            listen: ephemeral,
            admin_listen: ephemeral,
            store,
            tls: None,
            access: Access::none(),
            retention_interval: Some(defaults::RETENTION_INTERVAL),
            checkpoint_max_age: defaults::CHECKPOINT_MAX_AGE,
            health_interval: defaults::HEALTH_INTERVAL,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            subscription_memory: defaults::SUBSCRIPTION_MEMORY,
        }
    }

    /// [`Config::for_store`] on PostgreSQL at `url` (TLS `prefer`, default
    /// pool).
    pub fn for_postgres(url: &str) -> Result<Self> {
        Ok(Self::for_store(StoreConfig::Postgres(PostgresConfig::new(url)?)))
    }

    /// [`Config::for_store`] on an embedded SQLite file.
    pub fn for_sqlite(path: impl Into<PathBuf>) -> Self {
        Self::for_store(StoreConfig::Sqlite { path: path.into() })
    }

    /// Logs the effective configuration at INFO, secrets redacted.
    pub fn log_effective(&self) {
        let not_used = || "n/a".to_string();
        let (store, database_tls, pool_size, committers, database_timeout) = match &self.store {
            StoreConfig::Postgres(pg) => (
                format!("postgres {}", pg.url),
                DatabaseTlsMode::from(&pg.tls).to_string(),
                pg.pool_size.to_string(),
                pg.committers.to_string(),
                HumanDuration(pg.timeout).to_string(),
            ),
            StoreConfig::Sqlite { path } => {
                (format!("sqlite {}", path.display()), not_used(), not_used(), not_used(), not_used())
            }
        };
        tracing::info!(
            listen = %self.listen,
            admin_listen = %self.admin_listen,
            store = %store,
            database_tls = %database_tls,
            database_pool_size = %pool_size,
            committers = %committers,
            database_timeout = %database_timeout,
            retention_interval = %Interval(self.retention_interval),
            checkpoint_max_age = %HumanDuration(self.checkpoint_max_age),
            tls = %self.tls_summary(),
            access = %self.access_summary(),
            health_interval = %HumanDuration(self.health_interval),
            shutdown_grace = %HumanDuration(self.shutdown_grace),
            subscription_memory = %ByteSize(self.subscription_memory),
            "effective configuration"
        );
    }

    fn access_summary(&self) -> String {
        let mutual = self.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some());
        if mutual || self.access.has_identity_source() {
            format!("{} grants", self.access.grants())
        } else {
            "protected mode (no identity configured: loopback callers only)".to_string()
        }
    }

    fn tls_summary(&self) -> String {
        match &self.tls {
            None => "off".into(),
            Some(TlsFiles { cert, key, client_ca: None }) => {
                format!("server cert {} key {}", cert.display(), key.display())
            }
            Some(TlsFiles { cert, key, client_ca: Some(ca) }) => {
                format!("mutual: server cert {} key {} client ca {}", cert.display(), key.display(), ca.display())
            }
        }
    }
}

impl fmt::Display for Config {
    /// One `name = value` line per setting, named like the flags, secrets
    /// redacted (what `omnirelay-hub config` prints).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "listen = {}", self.listen)?;
        writeln!(f, "admin-listen = {}", self.admin_listen)?;
        match &self.store {
            StoreConfig::Postgres(pg) => {
                writeln!(f, "database-url = {}", pg.url)?;
                writeln!(f, "database-tls = {}", DatabaseTlsMode::from(&pg.tls))?;
                if let DatabaseTls::VerifyFull { ca_file } = &pg.tls {
                    writeln!(f, "database-ca-file = {}", ca_file.display())?;
                }
                writeln!(f, "database-pool-size = {}", pg.pool_size)?;
                writeln!(f, "committers = {}", pg.committers)?;
                writeln!(f, "database-timeout = {}", HumanDuration(pg.timeout))?;
            }
            StoreConfig::Sqlite { path } => writeln!(f, "sqlite-path = {}", path.display())?,
        }
        writeln!(f, "tls = {}", self.tls_summary())?;
        writeln!(f, "access = {}", self.access_summary())?;
        writeln!(f, "retention-interval = {}", Interval(self.retention_interval))?;
        writeln!(f, "checkpoint-max-age = {}", HumanDuration(self.checkpoint_max_age))?;
        writeln!(f, "health-interval = {}", HumanDuration(self.health_interval))?;
        writeln!(f, "shutdown-grace = {}", HumanDuration(self.shutdown_grace))?;
        writeln!(f, "subscription-memory = {}", ByteSize(self.subscription_memory))
    }
}
