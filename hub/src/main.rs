//! `omnirelay-hub`: the replication hub binary. Parses flags and
//! `OMNIRELAY_HUB_*` variables into a validated [`omnirelay_hub::Config`] and
//! calls the library; nothing else happens here.
//!
//! Subcommands: `serve` (the default), `config` (print the effective
//! configuration, secrets redacted), `migrate` (apply the PostgreSQL schema
//! under an advisory lock), `verify` (walk shards' hash chains and report the
//! first corrupt sequence; exit status 1 when one is found, 3 when the shard
//! named by `--shard` does not exist).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use omnirelay_hub::config::flags::{Cli, Command, ServeArgs, VerifyArgs};
use omnirelay_hub::config::{ConfigError, StoreConfig};
use omnirelay_hub::store::LogStore;
use omnirelay_hub::store::postgres::{self, PgStore};
use omnirelay_hub::store::sqlite::SqliteStore;
use omnirelay_hub::{shutdown, telemetry, verify};

/// The process allocator (see the workspace `Cargo.toml` for why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status of a configuration error, like clap's for a bad flag.
const EXIT_CONFIG: u8 = 2;

/// Exit status of `verify --shard` for a shard the store does not have
/// (distinct from 1, a corrupt chain).
const EXIT_NO_SUCH_SHARD: u8 = 3;

fn main() -> ExitCode {
    // One TLS backend for the whole process, installed before anything
    // builds a TLS configuration (if another provider were compiled in,
    // rustls would otherwise refuse to pick one).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    #[allow(clippy::print_stderr)] // No logger yet: this is how the error gets out.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // The span exporter's channel lives on the runtime.
    let otlp = match runtime.block_on(async { telemetry::traces::init_tracing(&cli.log) }) {
        Ok(otlp) => otlp,
        Err(err) => {
            #[allow(clippy::print_stderr)] // No logger yet: this is how the error gets out.
            {
                eprintln!("error: {err:#}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let code = match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(err) if err.downcast_ref::<ConfigError>().is_some() => {
            tracing::error!("invalid configuration: {err:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(err) => {
            tracing::error!("failed to {err:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(otlp) = otlp {
        // Spans still buffered go out before the process ends.
        match runtime.block_on(async { tokio::task::spawn_blocking(move || otlp.shutdown()).await }) {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!("failed to {err:#}"),
            Err(err) => tracing::warn!(error = %err, "failed to flush spans"),
        }
    }
    code
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        None => serve(&cli.serve).await,
        Some(Command::Serve(args)) => serve(&args).await,
        Some(Command::Config(args)) => {
            let config = args.validate()?;
            print_stdout(&config.to_string());
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Migrate(args)) => {
            let config = args.validate_postgres("migrate")?.store_config();
            let report = postgres::migrate_with(&config).await.context("migrate the database")?;
            tracing::info!(version = report.version, applied = ?report.applied, "schema is up to date");
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Verify(args)) => verify(&args).await,
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.validate()?;
    config.log_effective();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {} (--listen)", config.listen))?;
    omnirelay_hub::run(config, listener, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let store: Box<dyn LogStore> = match args.store.validate()? {
        StoreConfig::Postgres(config) => {
            Box::new(PgStore::open(config.store_config()).await.context("open the PostgreSQL log store")?)
        }
        StoreConfig::Sqlite { path } => {
            // Never create a store to verify it: a typo must fail, not pass.
            Box::new(SqliteStore::open_existing(path).await.context("open the embedded SQLite log store")?)
        }
    };
    let pins = |shard: &omnirelay_hub::ids::ShardId| -> Vec<verify::Pin> {
        args.anchors.iter().filter(|anchor| &anchor.shard == shard).map(|anchor| anchor.pin.clone()).collect()
    };
    let shards = match &args.shard {
        Some(shard) => vec![omnirelay_hub::ids::ShardId::parse(shard.clone()).context("read --shard")?],
        None => store
            .list_shards(args.prefix.clone())
            .await
            .context("list shards")?
            .into_iter()
            .map(|state| state.lease.shard)
            .collect(),
    };
    let mut reports = Vec::new();
    for shard in &shards {
        match verify::verify_shard_pinned(store.as_ref(), shard.clone(), pins(shard)).await {
            Ok(report) => reports.push(report),
            Err(omnirelay_hub::store::StoreError::UnknownShard { .. }) if args.shard.is_some() => {
                tracing::error!(%shard, "no such shard in this store; nothing to verify");
                store.close().await.context("close the log store")?;
                return Ok(ExitCode::from(EXIT_NO_SUCH_SHARD));
            }
            Err(err) => return Err(err).with_context(|| format!("verify shard {shard}")),
        }
    }
    // An anchor for a shard that is not there: the log lost a whole shard.
    let missing: Vec<String> = args
        .anchors
        .iter()
        .filter(|anchor| !shards.contains(&anchor.shard) && anchor.shard.as_str().starts_with(&args.prefix))
        .filter(|_| args.shard.is_none())
        .map(|anchor| {
            format!("CORRUPT  {} is missing, but an --anchor pins its sequence {}\n", anchor.shard, anchor.pin.sequence)
        })
        .collect();
    print_stdout(&missing.concat());
    let corrupt = print_reports(&reports) || !missing.is_empty();
    store.close().await.context("close the log store")?;
    Ok(if corrupt { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Prints one line per shard; returns whether any shard is corrupt.
fn print_reports(reports: &[verify::ShardReport]) -> bool {
    let mut corrupt = false;
    let mut out = String::new();
    for report in reports {
        match &report.corrupt {
            None => out.push_str(&format!(
                "ok       {} events={} low={} head={} head_hash={} pinned={}{}\n",
                report.shard,
                report.checked,
                report.low,
                report.head,
                report.head_hash.to_hex(),
                report.pinned,
                if report.unverifiable > 0 { format!(" unverifiable={}", report.unverifiable) } else { String::new() },
            )),
            Some(bad) => {
                corrupt = true;
                out.push_str(&format!(
                    "CORRUPT  {} first corrupt sequence {}: {}\n",
                    report.shard, bad.sequence, bad.reason
                ));
            }
        }
    }
    if reports.is_empty() {
        out.push_str("no shards to verify\n");
    }
    print_stdout(&out);
    corrupt
}

/// The command's output (reports, the printed configuration), as opposed to
/// logs, which go to standard error.
#[allow(clippy::print_stdout)]
fn print_stdout(text: &str) {
    print!("{text}");
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    match shutdown::signal().await {
        Ok(signal) => tracing::info!(signal, "shutdown requested"),
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM or SIGINT; stop the hub with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
