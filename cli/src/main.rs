//! `omnirelay`: the operator CLI.
//!
//! Subcommands land with the capabilities they operate; `contracts` lists the
//! gRPC procedures every OmniRelay component speaks.

use clap::{Parser, Subcommand, ValueEnum};

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

#[derive(Debug, Clone, Copy, ValueEnum)]
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Contracts => {
            let procedures = omnirelay_proto::procedures();
            let rendered = match cli.output {
                Output::Json => serde_json::to_string_pretty(
                    &procedures
                        .iter()
                        .map(|(service, method)| serde_json::json!({ "service": service, "method": method }))
                        .collect::<Vec<_>>(),
                )?,
                Output::Text => procedures
                    .iter()
                    .map(|(service, method)| format!("{service}/{method}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            #[allow(clippy::print_stdout)] // the CLI's output is its purpose
            {
                println!("{rendered}");
            }
        }
    }
    Ok(())
}
