//! `omnirelay`: the operator CLI and the sidecar node. Parses arguments and
//! calls into the `omnirelay_cli` library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use omnirelay_cli::control::{self, Target};
use omnirelay_cli::node::{self, FileConfig, NodeArgs, SidecarConfig};
use serde_json::{Value, json};

/// The process allocator (see the workspace `Cargo.toml` for why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// OmniRelay operator CLI.
#[derive(Debug, Parser)]
#[command(name = "omnirelay", version, about)]
struct Cli {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text, env = "OMNIRELAY_OUTPUT", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable text.
    Text,
    /// One JSON document.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists every gRPC procedure of the OmniRelay contracts.
    Contracts,
    /// Runs a standalone mesh node (the sidecar).
    Node(Box<NodeArgs>),
    /// Runs a hub and three nodes in this process with producers and
    /// workers, kills the busiest node midway, and checks that nothing
    /// acknowledged was lost, no item was owned twice and the replayed
    /// state equals the survivors' (exit code 1 if not).
    Demo(omnirelay_cli::demo::DemoArgs),
    /// Peer health as a node sees it.
    Leases {
        #[command(subcommand)]
        command: LeasesCommand,
    },
    /// Backpressure of a node's queues.
    Backpressure {
        #[command(subcommand)]
        command: BackpressureCommand,
    },
    /// Replication state of a node's queues.
    Replication(Target),
    /// Drains a queue and writes its snapshot (JSON) to a file or stdout.
    Drain {
        #[command(flatten)]
        target: Target,
        /// Namespace to drain.
        #[arg(long, default_value = "resourcelease")]
        namespace: String,
        /// Hand leases in flight back at once instead of waiting for them.
        #[arg(long)]
        hand_back: bool,
        /// Longest wait for leases in flight, e.g. 30s.
        #[arg(long, default_value = "30s")]
        wait: String,
        /// Where to write the snapshot (stdout when absent).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Resumes a drained queue.
    Resume {
        #[command(flatten)]
        target: Target,
        /// Namespace to resume.
        #[arg(long, default_value = "resourcelease")]
        namespace: String,
    },
    /// Runs a sink on a hub subscription until interrupted (see `docs/sinks.md`).
    Sink {
        #[command(subcommand)]
        kind: omnirelay_cli::sink::SinkCommand,
    },
    /// Prints a shard's events as they are appended (`--output json`: one
    /// JSON object per line).
    Tail(omnirelay_cli::sink::TailArgs),
    /// Prints a shell completion script, e.g. `omnirelay completions bash >
    /// /etc/bash_completion.d/omnirelay`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Restores a snapshot written by `drain` into a queue.
    Restore {
        #[command(flatten)]
        target: Target,
        /// Namespace to restore into.
        #[arg(long, default_value = "resourcelease")]
        namespace: String,
        /// The snapshot file.
        #[arg(long)]
        snapshot: PathBuf,
    },
    /// Dead letters of a node's queue: list, show (with the attempt
    /// history), redrive, purge.
    DeadLetters {
        #[command(subcommand)]
        command: omnirelay_cli::ops::queue::DeadLettersCommand,
    },
    /// A node's queue: counts, pending, leased and dead-lettered items.
    Queue {
        #[command(subcommand)]
        command: omnirelay_cli::ops::queue::QueueCommand,
    },
    /// Subscribers' checkpoints on the hub and how far behind they are.
    Subscribers {
        #[command(subcommand)]
        command: omnirelay_cli::ops::log::SubscribersCommand,
    },
    /// Checks a shard's hash chain on the hub (exit status 0 intact, 1
    /// corrupt, 3 no such shard, 4 could not be verified).
    Verify(omnirelay_cli::ops::log::VerifyArgs),
    /// Snapshots of a shard on the hub.
    Snapshot {
        #[command(subcommand)]
        command: omnirelay_cli::ops::log::SnapshotCommand,
    },
    /// Time travel: a queue's state at a sequence or a time of its log,
    /// replayed from the hub (newest snapshot before it, then the events).
    Inspect(omnirelay_cli::ops::log::InspectArgs),
    /// Drops a drain snapshot's items from the drained source queue once
    /// they were restored elsewhere, so resuming it cannot serve them twice.
    PurgeDrained {
        #[command(flatten)]
        target: Target,
        /// The drained namespace (the source).
        #[arg(long, default_value = "resourcelease")]
        namespace: String,
        /// The snapshot file written by `drain`.
        #[arg(long)]
        snapshot: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum LeasesCommand {
    /// Ranks peers: unhealthy first, then by leases held.
    Health(Target),
}

#[derive(Debug, Subcommand)]
enum BackpressureCommand {
    /// The current signal of every namespace.
    Show(Target),
    /// Prints every transition as it happens, until interrupted.
    Watch {
        #[command(flatten)]
        target: Target,
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
    },
}

fn print(output: Output, value: &Value, text: impl FnOnce(&Value) -> String) {
    match output {
        Output::Json => write_stdout(&format!("{value}\n")),
        Output::Text => write_stdout(&text(value)),
    }
}

/// Writes the command's output. A reader that went away (`omnirelay ... |
/// head`) ends the command quietly with status 0, as it does any Unix
/// filter; `print!` would panic on the broken pipe instead.
fn write_stdout(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(err) => {
            eprintln!("error: write the output: {err}");
            std::process::exit(1);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Cheap insurance: one TLS provider for the whole process.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let output = cli.output;
    match cli.command {
        Command::Contracts => {
            let procedures = omnirelay_proto::procedures();
            let value: Value =
                procedures.iter().map(|(service, method)| json!({ "service": service, "method": method })).collect();
            print(output, &value, |_| {
                procedures.iter().map(|(service, method)| format!("{service}/{method}\n")).collect()
            });
        }
        Command::Node(args) => run_node(*args).await?,
        Command::DeadLetters { command } => finish(output, omnirelay_cli::ops::queue::dead_letters(command).await?),
        Command::Queue { command } => finish(output, omnirelay_cli::ops::queue::queue(command).await?),
        Command::Subscribers { command } => finish(output, omnirelay_cli::ops::log::subscribers(command).await?),
        Command::Verify(args) => finish(output, omnirelay_cli::ops::log::verify(args).await?),
        Command::Snapshot { command } => finish(output, omnirelay_cli::ops::log::snapshot(command).await?),
        Command::Inspect(args) => finish(output, omnirelay_cli::ops::log::inspect(args).await?),
        Command::Demo(args) => {
            if !omnirelay_cli::demo::run(args).await? {
                std::process::exit(1);
            }
        }
        Command::Sink { kind } => {
            omnirelay_cli::telemetry::init(omnirelay_cli::node::config::LogFormat::Text, None)?;
            omnirelay_cli::sink::run(kind, output == Output::Json, stop_signal()).await?;
        }
        Command::Tail(args) => omnirelay_cli::sink::tail(args, output == Output::Json, stop_signal()).await?,
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "omnirelay", &mut script);
            print(output, &json!({ "shell": shell.to_string(), "script": String::from_utf8_lossy(&script) }), |_| {
                String::from_utf8_lossy(&script).into_owned()
            });
        }
        Command::Leases { command: LeasesCommand::Health(target) } => {
            let snapshot = target.get(omnirelay_client::node::LEASE_HEALTH_PATH).await?;
            print(output, &snapshot, control::render_health);
        }
        Command::Backpressure { command: BackpressureCommand::Show(target) } => {
            let value = target.get(omnirelay_client::node::BACKPRESSURE_PATH).await?;
            print(output, &value, control::render_backpressure);
        }
        Command::Backpressure { command: BackpressureCommand::Watch { target, namespace } } => {
            target
                .watch(namespace.as_deref(), |event, data| {
                    print(output, &json!({ "event": event, "data": data }), |_| match event {
                        "backpressure" => format!(
                            "{} {}: {} (pending {})\n",
                            data["observed_at"].as_str().unwrap_or(""),
                            data["namespace"].as_str().unwrap_or(""),
                            if data["active"] == true { "BACKPRESSURE ON" } else { "backpressure off" },
                            data["pending"]
                        ),
                        other => format!("{other}: {data}\n"),
                    })
                })
                .await?;
        }
        Command::Replication(target) => {
            let value = target.get(omnirelay_client::node::REPLICATION_PATH).await?;
            print(output, &value, control::render_replication);
        }
        Command::Drain { target, namespace, hand_back, wait, out } => {
            let mode = if hand_back { "DRAIN_MODE_HAND_BACK" } else { "DRAIN_MODE_WAIT" };
            let response = target.call(&namespace, "drain", &json!({ "mode": mode, "wait_timeout": wait })).await?;
            let snapshot = &response["snapshot"];
            match out {
                Some(path) => {
                    std::fs::write(&path, serde_json::to_vec_pretty(snapshot)?)
                        .with_context(|| format!("write {}", path.display()))?;
                    let items = snapshot["items"].as_array().map_or(0, Vec::len);
                    let summary = json!({ "namespace": namespace, "items": items, "file": path });
                    print(output, &summary, |_| {
                        format!("drained {items} items of {namespace} to {}\n", path.display())
                    });
                }
                None => print(output, snapshot, |v| serde_json::to_string_pretty(v).unwrap_or_default() + "\n"),
            }
        }
        Command::Resume { target, namespace } => {
            let response = target.call(&namespace, "resume", &json!({})).await?;
            print(output, &response, |v| format!("resumed: {}\n", v["resumed"]));
        }
        Command::Restore { target, namespace, snapshot } => {
            let snapshot = read_snapshot(&snapshot)?;
            // One call must stay under the node's restore limit (16 MiB):
            // larger snapshots go in several calls, each atomic, and items a
            // call already restored are skipped by the next attempt.
            let chunks = restore_chunks(&snapshot);
            let (mut restored, mut skipped) = (0, 0);
            let total = chunks.iter().map(|chunk| chunk["items"].as_array().map_or(0, Vec::len) as u64).sum();
            let bar = omnirelay_cli::ops::progress_bar(total, "restore");
            for chunk in &chunks {
                let response = target.call(&namespace, "restore", &json!({ "snapshot": chunk })).await?;
                restored += response["restored"].as_u64().unwrap_or(0);
                skipped += response["skipped"].as_u64().unwrap_or(0);
                bar.inc(chunk["items"].as_array().map_or(0, Vec::len) as u64);
            }
            bar.finish_and_clear();
            let summary = json!({ "restored": restored, "skipped": skipped, "calls": chunks.len() });
            print(output, &summary, |v| format!("restored {} items, skipped {}\n", v["restored"], v["skipped"]));
        }
        Command::PurgeDrained { target, namespace, snapshot } => {
            let snapshot = read_snapshot(&snapshot)?;
            let ids: Vec<Value> = snapshot["items"]
                .as_array()
                .context("the snapshot has no items")?
                .iter()
                .map(|item| item["item_id"].clone())
                .collect();
            let (mut purged, mut skipped) = (0, 0);
            for chunk in ids.chunks(omnirelay_client::defaults::PURGE_DRAINED_MAX) {
                let response = target.call(&namespace, "purge_drained", &json!({ "item_ids": chunk })).await?;
                purged += response["purged"].as_u64().unwrap_or(0);
                skipped += response["skipped"].as_u64().unwrap_or(0);
            }
            let summary = json!({ "purged": purged, "skipped": skipped });
            print(output, &summary, |v| format!("purged {} items, skipped {}\n", v["purged"], v["skipped"]));
        }
    }
    Ok(())
}

/// Prints an operator command's outcome and ends the process with its
/// status when that is not 0.
fn finish(output: Output, outcome: omnirelay_cli::ops::Outcome) {
    let text = outcome.text;
    print(output, &outcome.json, |_| text);
    if outcome.code != 0 {
        std::process::exit(i32::from(outcome.code));
    }
}

fn read_snapshot(path: &std::path::Path) -> anyhow::Result<Value> {
    let text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&text).context("the snapshot file is not JSON")
}

/// Splits a drain snapshot into snapshots whose JSON stays under the
/// node's restore limit, keeping the items' order (an item larger than the
/// limit goes alone, and the node names it in its refusal).
fn restore_chunks(snapshot: &Value) -> Vec<Value> {
    // Room for the envelope and JSON's own overhead.
    let limit = omnirelay_client::middleware::defaults::MAX_RESTORE_REQUEST_BYTES - 64 * 1024;
    let items = snapshot["items"].as_array().cloned().unwrap_or_default();
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for item in items {
        let size = item.to_string().len() + 1;
        if !chunk.is_empty() && bytes + size > limit {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.push(item);
    }
    if !chunk.is_empty() || chunks.is_empty() {
        chunks.push(chunk);
    }
    chunks
        .into_iter()
        .map(|items| {
            let mut part = snapshot.clone();
            part["items"] = Value::Array(items);
            part
        })
        .collect()
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    match omnirelay_cli::node::signal().await {
        Ok(signal) => tracing::info!(signal, "received a stop signal"),
        Err(err) => tracing::error!(error = %err, "failed to listen for stop signals; stopping"),
    }
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    let config = SidecarConfig::merge(&args, file)?;
    if args.print_config {
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(&config)?));
        return config.node_config().map(|_| ());
    }
    let otlp = omnirelay_cli::telemetry::init(config.log_format, config.otlp_endpoint.as_deref())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen: bind {}", config.listen))?;
    let control = match config.control_listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("control_listen: bind {addr}"))?)
        }
        None => None,
    };
    let result = node::run(config, listener, control, async {
        match omnirelay_cli::node::signal().await {
            Ok(signal) => tracing::info!(signal, "received a stop signal"),
            Err(err) => tracing::error!(error = %err, "failed to listen for stop signals; stopping"),
        }
    })
    .await;
    if let Some(guard) = otlp {
        let _ = tokio::task::spawn_blocking(move || guard.shutdown()).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_snapshot_is_restored_in_calls_under_the_limit_keeping_its_order() {
        let body = "x".repeat(6 * 1024 * 1024);
        let items: Vec<Value> =
            (0..5).map(|n| json!({ "item_id": n.to_string(), "payload": { "body": body } })).collect();
        let snapshot = json!({ "namespace": "resourcelease", "sequence": 9, "items": items });
        let chunks = restore_chunks(&snapshot);
        assert!(chunks.len() >= 3, "{} calls", chunks.len());
        let limit = omnirelay_client::middleware::defaults::MAX_RESTORE_REQUEST_BYTES;
        let mut ids = Vec::new();
        for chunk in &chunks {
            assert!(chunk.to_string().len() < limit, "a call of {} bytes", chunk.to_string().len());
            assert_eq!(chunk["sequence"], 9, "each call carries the snapshot's envelope");
            ids.extend(chunk["items"].as_array().expect("items").iter().map(|i| i["item_id"].clone()));
        }
        assert_eq!(ids, (0..5).map(|n| json!(n.to_string())).collect::<Vec<_>>());
        assert_eq!(restore_chunks(&json!({ "items": [] })).len(), 1, "an empty snapshot is one call");
    }
}
