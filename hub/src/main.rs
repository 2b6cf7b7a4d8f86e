//! `omnirelay-hub`: the replication hub binary. Parses flags into a
//! validated [`omnirelay_hub::Config`] and calls the library.
//!
//! Subcommands: `serve` (the default), `migrate` (apply the schema
//! migrations under an advisory lock), `verify` (walk shards' hash chains
//! and report the first corrupt sequence; exit status 1 when one is found).

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use omnirelay_hub::store::postgres::{self, PgStore, PgStoreConfig};
use omnirelay_hub::{Config, verify};

/// The OmniRelay replication hub.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// PostgreSQL connection URL.
    #[arg(long, env = "OMNIRELAY_HUB_DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Address the gRPC service listens on (`serve`).
    #[arg(long, env = "OMNIRELAY_HUB_LISTEN", global = true, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Hub gRPC service (the default).
    Serve,
    /// Apply pending schema migrations, under an advisory lock.
    Migrate,
    /// Verify the hash chain of one shard, of shards with a prefix, or of all.
    Verify {
        /// Verify only this shard.
        #[arg(long, conflicts_with = "prefix")]
        shard: Option<String>,
        /// Verify every shard whose id starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "failed to start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("failed to {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let database_url = cli.database_url.context("start: --database-url (or OMNIRELAY_HUB_DATABASE_URL) is required")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let config = Config::new(database_url);
            let listener =
                tokio::net::TcpListener::bind(cli.listen).await.with_context(|| format!("listen on {}", cli.listen))?;
            omnirelay_hub::run(config, listener, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let report = postgres::migrate(&database_url).await.context("migrate the database")?;
            tracing::info!(version = report.version, applied = ?report.applied, "schema is up to date");
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { shard, prefix } => {
            let store = PgStore::open(PgStoreConfig::new(database_url)).await.context("open the log store")?;
            let reports = match shard {
                Some(shard) => {
                    let shard = omnirelay_hub::ids::ShardId::parse(shard).context("read --shard")?;
                    vec![verify::verify_shard(&store, shard).await.context("verify the shard")?]
                }
                None => verify::verify_all(&store, &prefix).await.context("verify shards")?,
            };
            let corrupt = print_reports(&reports);
            omnirelay_hub::store::LogStore::close(&store).await.context("close the log store")?;
            Ok(if corrupt { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
    }
}

/// Prints one line per shard; returns whether any shard is corrupt.
#[allow(clippy::print_stdout)] // The report is the command's output.
fn print_reports(reports: &[verify::ShardReport]) -> bool {
    let mut corrupt = false;
    for report in reports {
        match &report.corrupt {
            None => {
                println!("ok       {} events={} low={} head={}", report.shard, report.checked, report.low, report.head)
            }
            Some(bad) => {
                corrupt = true;
                println!("CORRUPT  {} first corrupt sequence {}: {}", report.shard, bad.sequence, bad.reason);
            }
        }
    }
    if reports.is_empty() {
        println!("no shards to verify");
    }
    corrupt
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the hub");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
