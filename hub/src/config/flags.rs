//! The command line: every flag with its `OMNIRELAY_HUB_*` variable (clap),
//! and the checks of how they combine that build the validated
//! [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::{
    ByteSize, Config, ConfigError, DatabaseTls, DatabaseTlsMode, DatabaseUrl, HumanDuration, Interval, PostgresConfig,
    Result, StoreConfig, TlsFiles,
};
use crate::defaults;
use crate::security::access::Access;

/// The `omnirelay-hub` command line.
///
/// Without a subcommand the hub serves, so `omnirelay-hub --listen ...` and
/// `omnirelay-hub serve --listen ...` are the same.
#[derive(Debug, Parser)]
#[command(name = "omnirelay-hub", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; serving when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serving flags when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Logging flags, accepted by every subcommand.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Subcommands of `omnirelay-hub`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serves the hub (the default).
    Serve(ServeArgs),
    /// Validates the configuration and prints it with secrets redacted,
    /// without serving.
    Config(ServeArgs),
    /// Applies the PostgreSQL schema migrations (under an advisory lock, so
    /// concurrent runs are safe) and exits.
    Migrate(StoreArgs),
    /// Walks shards' hash chains and reports the first corrupt sequence of
    /// each; exits with status 1 when one is found.
    Verify(VerifyArgs),
}

/// Flags of `verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The store to verify.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Verify only this shard.
    #[arg(long, value_name = "SHARD_ID", conflicts_with = "prefix")]
    pub shard: Option<String>,
    /// Verify every shard whose id starts with this (all when empty).
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub prefix: String,
    /// A hash the log must still hold, saved from an earlier run: the
    /// shard, a sequence and that event's hash as `verify` prints it
    /// (`head=` and `head_hash=`), e.g.
    /// `resourcelease.users@1200=9f86d0...`. Repeatable. A log rewritten
    /// with every hash recomputed still chains; it no longer matches this.
    #[arg(long = "anchor", value_name = "SHARD@SEQUENCE=HASH")]
    pub anchors: Vec<crate::log::verify::Anchor>,
}

impl Cli {
    /// The serving flags, from the subcommand or the top level (for `migrate`
    /// and `verify`, the top-level ones, which they do not use).
    pub fn serve_args(&self) -> &ServeArgs {
        match &self.command {
            Some(Command::Serve(args) | Command::Config(args)) => args,
            _ => &self.serve,
        }
    }
}

/// Flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC service listens on.
    #[arg(long, env = "OMNIRELAY_HUB_LISTEN", value_name = "ADDR", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,

    /// Address of the HTTP admin server: /healthz, /readyz and /metrics.
    #[arg(long, env = "OMNIRELAY_HUB_ADMIN_LISTEN", value_name = "ADDR", default_value = defaults::ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,

    /// Where the log is stored.
    #[command(flatten)]
    pub store: StoreArgs,

    /// TLS for the gRPC service.
    #[command(flatten)]
    pub tls: TlsArgs,

    /// Access file (JSON): bearer tokens, trusted proxies and the grants of
    /// hub roles (see docs/security.md). Without it and without
    /// --tls-client-ca the hub runs in protected mode: local callers only.
    #[arg(long, env = "OMNIRELAY_HUB_ACCESS", value_name = "PATH")]
    pub access: Option<PathBuf>,

    /// How often this replica trims events below the retention floor (the
    /// older of a shard's newest snapshot and its oldest live checkpoint);
    /// `off` leaves retention to other replicas.
    #[arg(
        long,
        env = "OMNIRELAY_HUB_RETENTION_INTERVAL",
        value_name = "DURATION|off",
        default_value_t = Interval(Some(defaults::RETENTION_INTERVAL))
    )]
    pub retention_interval: Interval,

    /// Age after which a subscriber's checkpoint stops holding events back
    /// from retention (the subscriber is presumed gone; when it returns it
    /// gets the snapshot and then the tail).
    #[arg(
        long,
        env = "OMNIRELAY_HUB_CHECKPOINT_MAX_AGE",
        value_name = "DURATION",
        default_value_t = HumanDuration(defaults::CHECKPOINT_MAX_AGE)
    )]
    pub checkpoint_max_age: HumanDuration,

    /// How often the store is probed to keep the gRPC health status current.
    #[arg(
        long,
        env = "OMNIRELAY_HUB_HEALTH_INTERVAL",
        value_name = "DURATION",
        default_value_t = HumanDuration(defaults::HEALTH_INTERVAL)
    )]
    pub health_interval: HumanDuration,

    /// How long shutdown waits for open calls and streams to finish.
    #[arg(
        long,
        env = "OMNIRELAY_HUB_SHUTDOWN_GRACE",
        value_name = "DURATION",
        default_value_t = HumanDuration(defaults::SHUTDOWN_GRACE)
    )]
    pub shutdown_grace: HumanDuration,

    /// Memory this replica may hold for all its subscriptions together
    /// (queued frames, their streams' buffers, catch-up reads, the live
    /// tails' recent events), e.g. `256MiB`. Past it, the subscription
    /// furthest behind is ended (it resumes from its checkpoint) and new
    /// ones are refused.
    #[arg(
        long,
        env = "OMNIRELAY_HUB_SUBSCRIPTION_MEMORY",
        value_name = "BYTES",
        default_value_t = ByteSize(defaults::SUBSCRIPTION_MEMORY),
        value_parser = parse_subscription_memory
    )]
    pub subscription_memory: ByteSize,

    /// Events per second one principal may append through this replica (a
    /// token bucket; fractional rates allowed). A batch over it ends the
    /// append stream with RESOURCE_EXHAUSTED and is not written. Wins over
    /// `limits.append_rate` in the access file [default: 100000].
    #[arg(long, env = "OMNIRELAY_HUB_APPEND_RATE", value_name = "EVENTS_PER_SEC")]
    pub append_rate: Option<f64>,

    /// Events one principal may append at once above its rate (the bucket's
    /// size). Wins over `limits.append_burst` in the access file
    /// [default: 200000].
    #[arg(long, env = "OMNIRELAY_HUB_APPEND_BURST", value_name = "EVENTS")]
    pub append_burst: Option<u64>,
}

/// Flags choosing and reaching the store.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// PostgreSQL connection string (URL or key=value form). Without it the
    /// hub keeps its log in an embedded SQLite file (one replica only).
    #[arg(long, env = "OMNIRELAY_HUB_DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// TLS to PostgreSQL: disable, prefer (TLS when the server offers it,
    /// unverified), require (TLS, unverified), verify-full (TLS, certificate
    /// and host name verified against --database-ca-file).
    #[arg(long, env = "OMNIRELAY_HUB_DATABASE_TLS", value_enum, default_value_t = DatabaseTlsMode::Prefer)]
    pub database_tls: DatabaseTlsMode,

    /// PEM file of the CA that signed PostgreSQL's certificate (verify-full).
    #[arg(long, env = "OMNIRELAY_HUB_DATABASE_CA_FILE", value_name = "PATH")]
    pub database_ca_file: Option<PathBuf>,

    /// Connections in the PostgreSQL pool.
    #[arg(
        long,
        env = "OMNIRELAY_HUB_DATABASE_POOL_SIZE",
        value_name = "N",
        default_value_t = defaults::POOL_SIZE,
        value_parser = parse_pool_size
    )]
    pub database_pool_size: usize,

    /// Group committers (each with its own pooled connection) writing
    /// appends to PostgreSQL; must be fewer than the pool's connections.
    #[arg(
        long,
        env = "OMNIRELAY_HUB_COMMITTERS",
        value_name = "N",
        default_value_t = defaults::COMMITTERS,
        value_parser = parse_committers
    )]
    pub committers: usize,

    /// Deadline of every PostgreSQL statement and append transaction once it
    /// holds a connection: past it the caller is answered UNAVAILABLE (an
    /// append whose commit may still land is recognised when retried).
    #[arg(
        long,
        env = "OMNIRELAY_HUB_DATABASE_TIMEOUT",
        value_name = "DURATION",
        default_value_t = HumanDuration(defaults::DATABASE_TIMEOUT)
    )]
    pub database_timeout: HumanDuration,

    /// File of the embedded SQLite store, used when no database URL is given
    /// [default: omnirelay-hub.db in the working directory].
    // Not a clap default: an explicit path must conflict with --database-url,
    // and a default would be present (and conflict) always.
    #[arg(long, env = "OMNIRELAY_HUB_SQLITE_PATH", value_name = "PATH", conflicts_with = "database_url")]
    pub sqlite_path: Option<PathBuf>,
}

/// Flags of the gRPC service's TLS.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM file with the server certificate chain; enables TLS.
    #[arg(long, env = "OMNIRELAY_HUB_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file with the server certificate's private key.
    #[arg(long, env = "OMNIRELAY_HUB_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// PEM file with the CA(s) client certificates must chain to; enables
    /// mutual TLS, and every client must then present a certificate.
    #[arg(long, env = "OMNIRELAY_HUB_TLS_CLIENT_CA", value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,
}

/// Logging flags.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or
    /// `info,omnirelay_hub=debug`.
    #[arg(long, env = "OMNIRELAY_HUB_LOG", value_name = "FILTER", default_value = defaults::LOG_FILTER, global = true)]
    pub log: String,

    /// Log line format.
    #[arg(long, env = "OMNIRELAY_HUB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// OTLP/gRPC collector to export request spans to, e.g.
    /// `http://otel-collector:4317`; no export when absent.
    #[arg(long, env = "OMNIRELAY_HUB_OTLP_ENDPOINT", value_name = "URL", global = true)]
    pub otlp_endpoint: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

fn parse_subscription_memory(s: &str) -> std::result::Result<ByteSize, String> {
    let size: ByteSize = s.parse()?;
    if size.0 < defaults::MIN_SUBSCRIPTION_MEMORY {
        return Err(format!("must be at least {}", ByteSize(defaults::MIN_SUBSCRIPTION_MEMORY)));
    }
    Ok(size)
}

fn parse_committers(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("expected a whole number, got {s:?}"))?;
    if (1..=defaults::COMMITTERS_MAX).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be between 1 and {}", defaults::COMMITTERS_MAX))
    }
}

fn parse_pool_size(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("expected a whole number, got {s:?}"))?;
    if (1..=defaults::POOL_SIZE_MAX).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be between 1 and {}", defaults::POOL_SIZE_MAX))
    }
}

impl ServeArgs {
    /// Checks how the flags combine and builds the [`Config`].
    pub fn validate(&self) -> Result<Config> {
        Ok(Config {
            listen: self.listen,
            admin_listen: self.admin_listen,
            store: self.store.validate()?,
            tls: self.tls.validate()?,
            access: match &self.access {
                Some(path) => Access::from_file(path).map_err(ConfigError::Access)?,
                None => Access::none(),
            }
            .with_append_rate(self.append_rate, self.append_burst)
            .map_err(ConfigError::Limit)?,
            retention_interval: self.retention_interval.0,
            checkpoint_max_age: self.checkpoint_max_age.0,
            health_interval: self.health_interval.0,
            shutdown_grace: self.shutdown_grace.0,
            subscription_memory: self.subscription_memory.0,
        })
    }
}

impl StoreArgs {
    /// Checks the store flags.
    pub fn validate(&self) -> Result<StoreConfig> {
        let Some(raw) = &self.database_url else {
            let path = self.sqlite_path.clone().unwrap_or_else(|| PathBuf::from(defaults::SQLITE_PATH));
            return Ok(StoreConfig::Sqlite { path });
        };
        let url = DatabaseUrl::parse(raw)?;
        let tls = DatabaseTls::from_flags(self.database_tls, self.database_ca_file.as_deref())?;
        // Committers hold a connection each while committing; the rest of
        // the pool serves reads, leases and checkpoints.
        if self.database_pool_size <= self.committers {
            return Err(ConfigError::PoolTooSmall { pool_size: self.database_pool_size, committers: self.committers });
        }
        Ok(StoreConfig::Postgres(PostgresConfig {
            url,
            tls,
            pool_size: self.database_pool_size,
            committers: self.committers,
            timeout: self.database_timeout.0,
        }))
    }
}

impl StoreArgs {
    /// Checks the store flags of a command that needs PostgreSQL.
    pub fn validate_postgres(&self, command: &'static str) -> Result<PostgresConfig> {
        match self.validate()? {
            StoreConfig::Postgres(config) => Ok(config),
            StoreConfig::Sqlite { .. } => Err(ConfigError::DatabaseRequired { command }),
        }
    }
}

impl TlsArgs {
    /// Checks the TLS flags.
    pub fn validate(&self) -> Result<Option<TlsFiles>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Ok(Some(TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: self.tls_client_ca.clone() }))
            }
            (Some(_), None) => Err(ConfigError::TlsHalfConfigured { given: "--tls-cert", missing: "--tls-key" }),
            (None, Some(_)) => Err(ConfigError::TlsHalfConfigured { given: "--tls-key", missing: "--tls-cert" }),
            (None, None) if self.tls_client_ca.is_some() => Err(ConfigError::ClientCaWithoutTls),
            (None, None) => Ok(None),
        }
    }
}

// The flag vocabulary converting into the store's type, here at the edge
// (the store does not know the flags).
impl DatabaseTls {
    /// The TLS setting that `--database-tls` and `--database-ca-file` name:
    /// `verify-full` needs the CA file, and the CA file is refused with any
    /// other mode (it would be silently ignored). The sinks of the CLI
    /// take the same flags.
    pub fn from_flags(mode: DatabaseTlsMode, ca_file: Option<&std::path::Path>) -> Result<Self> {
        Ok(match (mode, ca_file) {
            (DatabaseTlsMode::VerifyFull, Some(ca_file)) => DatabaseTls::VerifyFull { ca_file: ca_file.to_path_buf() },
            (DatabaseTlsMode::VerifyFull, None) => return Err(ConfigError::DatabaseCaRequired),
            (mode, Some(_)) => return Err(ConfigError::DatabaseCaUnused { mode }),
            (DatabaseTlsMode::Disable, None) => DatabaseTls::Disable,
            (DatabaseTlsMode::Prefer, None) => DatabaseTls::Prefer,
            (DatabaseTlsMode::Require, None) => DatabaseTls::Require,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::redact_connection_string;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("omnirelay-hub").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Result<Config> {
        parse(args).expect("arguments should parse").serve_args().validate()
    }

    #[test]
    fn defaults_select_sqlite_on_loopback() {
        let config = config(&[]).expect("defaults should be valid");
        assert_eq!(config.listen.to_string(), defaults::LISTEN);
        assert_eq!(config.admin_listen.to_string(), defaults::ADMIN_LISTEN);
        assert!(
            matches!(config.store, StoreConfig::Sqlite { ref path } if path == &PathBuf::from(defaults::SQLITE_PATH))
        );
        assert_eq!(config.tls, None);
        assert_eq!(config.shutdown_grace, defaults::SHUTDOWN_GRACE);
    }

    #[test]
    fn serve_subcommand_takes_the_same_flags() {
        let cli = parse(&["serve", "--listen", "0.0.0.0:9000"]).expect("should parse");
        assert!(matches!(cli.command, Some(Command::Serve(_))));
        assert_eq!(cli.serve_args().listen.to_string(), "0.0.0.0:9000");
    }

    #[test]
    fn database_url_selects_postgres_with_prefer() {
        let config = config(&["--database-url", "postgres://hub:secret@db:5432/hub"]).expect("valid");
        let StoreConfig::Postgres(pg) = config.store else { panic!("expected PostgreSQL") };
        assert_eq!(pg.tls, DatabaseTls::Prefer);
        assert_eq!(pg.pool_size, defaults::POOL_SIZE);
        assert_eq!(pg.url.expose(), "postgres://hub:secret@db:5432/hub");
    }

    #[test]
    fn sqlite_path_conflicts_with_database_url() {
        let err = parse(&["--database-url", "postgres://db/hub", "--sqlite-path", "x.db"])
            .expect_err("both stores at once should be refused");
        let message = err.to_string();
        assert!(message.contains("--sqlite-path") && message.contains("--database-url"), "{message}");
    }

    #[test]
    fn bad_listen_address_names_the_flag() {
        let message = parse(&["--listen", "not-an-address"]).expect_err("should fail").to_string();
        assert!(message.contains("--listen"), "{message}");
    }

    #[test]
    fn pool_size_out_of_range_names_the_flag() {
        for bad in ["0", "100000", "many"] {
            let message = parse(&["--database-pool-size", bad]).expect_err("should fail").to_string();
            assert!(message.contains("--database-pool-size"), "{bad}: {message}");
        }
    }

    #[test]
    fn durations_need_a_unit_and_name_the_flag() {
        let message = parse(&["--shutdown-grace", "30"]).expect_err("should fail").to_string();
        assert!(message.contains("--shutdown-grace") && message.contains("unit"), "{message}");
        let message = parse(&["--health-interval", "0s"]).expect_err("should fail").to_string();
        assert!(message.contains("--health-interval") && message.contains("greater than zero"), "{message}");
        let config = config(&["--shutdown-grace", "1500ms", "--health-interval", "2m"]).expect("valid");
        assert_eq!(config.shutdown_grace, Duration::from_millis(1500));
        assert_eq!(config.health_interval, Duration::from_secs(120));
    }

    #[test]
    fn human_durations_round_trip() {
        for text in ["250ms", "20s", "1500ms", "5m", "7d", "90s"] {
            let parsed: HumanDuration = text.parse().expect("should parse");
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!("5m".parse::<HumanDuration>().map(|d| d.0), Ok(Duration::from_secs(300)));
        assert_eq!("1h".parse::<HumanDuration>().map(|d| d.0), Ok(Duration::from_secs(3600)));
        assert!("5 minutes".parse::<HumanDuration>().is_err());
        assert_eq!(HumanDuration(Duration::from_secs(3600)).to_string(), "1h");
    }

    #[test]
    fn retention_can_be_turned_off_here() {
        assert_eq!(config(&[]).expect("valid").retention_interval, Some(defaults::RETENTION_INTERVAL));
        assert_eq!(config(&["--retention-interval", "off"]).expect("valid").retention_interval, None);
        assert_eq!(
            config(&["--retention-interval", "30s"]).expect("valid").retention_interval,
            Some(Duration::from_secs(30))
        );
        let message = parse(&["--retention-interval", "sometimes"]).expect_err("should fail").to_string();
        assert!(message.contains("--retention-interval") && message.contains("or off"), "{message}");
        assert_eq!(
            config(&["--checkpoint-max-age", "2d"]).expect("valid").checkpoint_max_age,
            Duration::from_secs(172_800)
        );
    }

    #[test]
    fn the_pool_must_hold_more_than_the_committers() {
        let err = config(&["--database-url", "postgres://db/hub", "--database-pool-size", "2", "--committers", "2"])
            .expect_err("no connection left for reads");
        assert_eq!(err, ConfigError::PoolTooSmall { pool_size: 2, committers: 2 });
        let message = err.to_string();
        assert!(message.contains("--database-pool-size") && message.contains("--committers"), "{message}");
        let message = parse(&["--committers", "0"]).expect_err("at least one").to_string();
        assert!(message.contains("--committers"), "{message}");
    }

    #[test]
    fn tls_cert_without_key_names_both_flags() {
        let err = config(&["--tls-cert", "c.pem"]).expect_err("half TLS should fail");
        assert_eq!(err, ConfigError::TlsHalfConfigured { given: "--tls-cert", missing: "--tls-key" });
        assert!(err.to_string().contains("--tls-key"));
        let err = config(&["--tls-key", "k.pem"]).expect_err("half TLS should fail");
        assert!(err.to_string().starts_with("--tls-key needs --tls-cert"), "{err}");
    }

    #[test]
    fn client_ca_needs_server_tls() {
        assert_eq!(config(&["--tls-client-ca", "ca.pem"]).expect_err("should fail"), ConfigError::ClientCaWithoutTls);
        let config =
            config(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"]).expect("valid mTLS");
        assert_eq!(config.tls.and_then(|t| t.client_ca), Some(PathBuf::from("ca.pem")));
    }

    #[test]
    fn verify_full_requires_a_ca_file() {
        let err = config(&["--database-url", "postgres://db/hub", "--database-tls", "verify-full"])
            .expect_err("verify-full without CA should fail");
        assert_eq!(err, ConfigError::DatabaseCaRequired);
        assert!(err.to_string().contains("--database-ca-file"));
        let config = config(&[
            "--database-url",
            "postgres://db/hub",
            "--database-tls",
            "verify-full",
            "--database-ca-file",
            "/etc/pg/ca.pem",
        ])
        .expect("valid");
        let StoreConfig::Postgres(pg) = config.store else { panic!("expected PostgreSQL") };
        assert_eq!(pg.tls, DatabaseTls::VerifyFull { ca_file: "/etc/pg/ca.pem".into() });
    }

    #[test]
    fn ca_file_without_verify_full_is_refused() {
        let err = config(&["--database-url", "postgres://db/hub", "--database-ca-file", "ca.pem"])
            .expect_err("an unused CA should be refused");
        assert_eq!(err, ConfigError::DatabaseCaUnused { mode: DatabaseTlsMode::Prefer });
        assert!(err.to_string().contains("got prefer"), "{err}");
    }

    #[test]
    fn sslmode_in_url_points_to_the_flag() {
        let err = config(&["--database-url", "postgres://db/hub?sslmode=require"]).expect_err("should fail");
        assert_eq!(err, ConfigError::SslModeInUrl);
        assert!(err.to_string().contains("--database-tls"));
    }

    #[test]
    fn unparsable_database_url_does_not_echo_the_password() {
        let err = config(&["--database-url", "postgres://hub:hunter2@db:notaport/hub"]).expect_err("should fail");
        let message = err.to_string();
        assert!(message.starts_with("--database-url"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn url_passwords_are_redacted() {
        let cases = [
            ("postgres://hub:hunter2@db:5432/hub", "postgres://hub:***@db:5432/hub"),
            ("postgresql://hub@db/hub", "postgresql://hub@db/hub"),
            ("postgres://hub:p%40ss@h1,h2/hub?application_name=x", "postgres://hub:***@h1,h2/hub?application_name=x"),
            ("postgres://db/hub?user=hub&password=hunter2", "postgres://db/hub?user=hub&password=***"),
            ("postgres://db", "postgres://db"),
        ];
        for (raw, redacted) in cases {
            assert_eq!(redact_connection_string(raw), redacted, "{raw}");
        }
    }

    #[test]
    fn key_value_passwords_are_redacted() {
        let cases = [
            ("host=db user=hub password=hunter2 dbname=hub", "host=db user=hub password=*** dbname=hub"),
            ("host=db password='two words\\' quoted' dbname=hub", "host=db password=*** dbname=hub"),
            ("host=db password = spaced dbname=hub", "host=db password =*** dbname=hub"),
        ];
        for (raw, redacted) in cases {
            assert_eq!(redact_connection_string(raw), redacted, "{raw}");
        }
    }

    #[test]
    fn printed_config_hides_the_password() {
        let config = config(&["--database-url", "postgres://hub:hunter2@db/hub"]).expect("valid");
        let printed = config.to_string();
        let debugged = format!("{config:?}");
        assert!(printed.contains("database-url = postgres://hub:***@db/hub"), "{printed}");
        assert!(!printed.contains("hunter2") && !debugged.contains("hunter2"), "{printed}\n{debugged}");
    }

    #[test]
    fn migrate_needs_a_database_and_takes_its_tls_flags() {
        let cli =
            parse(&["migrate", "--database-url", "postgres://db/hub", "--database-tls", "require"]).expect("parse");
        let Some(Command::Migrate(store)) = cli.command else { panic!("expected migrate") };
        assert_eq!(store.validate_postgres("migrate").expect("valid").tls, DatabaseTls::Require);
        let Some(Command::Migrate(store)) = parse(&["migrate"]).expect("parse").command else { panic!("migrate") };
        let err = store.validate_postgres("migrate").expect_err("no database");
        assert_eq!(err, ConfigError::DatabaseRequired { command: "migrate" });
        assert!(err.to_string().starts_with("migrate needs --database-url"), "{err}");
    }

    #[test]
    fn verify_selects_a_shard_or_a_prefix_of_either_store() {
        let cli = parse(&["verify", "--shard", "resourcelease.users"]).expect("parse");
        let Some(Command::Verify(args)) = cli.command else { panic!("expected verify") };
        assert_eq!(args.shard.as_deref(), Some("resourcelease.users"));
        assert!(matches!(args.store.validate(), Ok(StoreConfig::Sqlite { .. })));
        let message = parse(&["verify", "--shard", "a", "--prefix", "b"]).expect_err("one or the other").to_string();
        assert!(message.contains("--shard") && message.contains("--prefix"), "{message}");
    }

    #[test]
    fn log_flags_are_accepted_by_every_subcommand() {
        let cli = parse(&["config", "--log-format", "json", "--log", "debug"]).expect("should parse");
        assert_eq!(cli.log.log_format, LogFormat::Json);
        assert_eq!(cli.log.log, "debug");
    }

    #[test]
    fn subscription_memory_takes_a_size_with_a_unit_and_a_floor() {
        assert_eq!(config(&["--subscription-memory", "64MiB"]).expect("valid").subscription_memory, 64 << 20);
        assert_eq!(config(&[]).expect("valid").subscription_memory, defaults::SUBSCRIPTION_MEMORY);
        let err = parse(&["--subscription-memory", "1MiB"]).expect_err("below the floor");
        assert!(err.to_string().contains("--subscription-memory"), "{err}");
        assert!(parse(&["--subscription-memory", "64MB"]).is_err(), "binary units only");
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
    }

    #[test]
    fn every_setting_has_its_environment_variable() {
        use clap::CommandFactory;
        let command = Cli::command();
        let arguments =
            command.get_arguments().chain(command.get_subcommands().flat_map(|subcommand| subcommand.get_arguments()));
        for arg in arguments {
            // --shard, --prefix and --anchor pick what one `verify` run
            // looks at; they are not settings of the hub.
            if ["help", "version", "shard", "prefix", "anchors"].contains(&arg.get_id().as_str()) {
                continue;
            }
            let long = arg.get_long().expect("every flag should have a long name");
            let expected = format!("OMNIRELAY_HUB_{}", long.to_uppercase().replace('-', "_"));
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            assert_eq!(env, expected, "--{long}");
        }
    }
}
