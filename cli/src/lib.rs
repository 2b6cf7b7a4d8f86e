//! The `omnirelay` command: operator tools and the sidecar mesh node.
//!
//! The binary (`src/main.rs`) only parses arguments and calls into this
//! library, so tests run the same code in-process:
//!
//! - [`node`]: `omnirelay node`, a standalone mesh node configured by a
//!   TOML file, `OMNIRELAY_NODE_*` variables and flags ([`node::run`]).
//! - [`control`]: operator commands against a node's diagnostics
//!   endpoints (`leases health`, `backpressure watch`, `replication`).
//! - [`ops`]: dead letters and queue items on a node; subscriber lag,
//!   chain verification, snapshots and time travel (`inspect --at`) on the
//!   hub.
//! - [`sink`]: `omnirelay sink <kind>` (a sink on a hub subscription, as a
//!   process) and `omnirelay tail <shard>`.
//! - [`telemetry`]: log output and optional OTLP span export.
//!
//! ```
//! use omnirelay_cli::node::{FileConfig, NodeArgs, SidecarConfig};
//!
//! let file: FileConfig = toml::from_str(r#"namespaces = ["resourcelease", "resourcelease.users"]"#)?;
//! let config = SidecarConfig::merge(&NodeArgs::default(), file)?;
//! assert_eq!(config.queues.len(), 2);
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod control;
pub mod demo;
pub mod node;
pub mod ops;
pub mod sink;
pub mod telemetry;
