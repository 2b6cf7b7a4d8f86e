//! The OmniRelay replication hub: a stateless gRPC service that owns every
//! shard's ordered, fenced, hash-chained event log.
//!
//! Overview:
//!
//! - [`run`] serves one replica until a shutdown signal; [`Hub`] does the
//!   same in steps (open, mount the [`service`] on your own router, serve,
//!   close). [`Config`] is what a replica needs.
//! - [`store::LogStore`] is the storage boundary; [`store::postgres::PgStore`]
//!   implements it on PostgreSQL (group commit, the epoch fence judged by
//!   PostgreSQL, dedupe by producer sequence, the hash chain, LISTEN/NOTIFY).
//!   `store::contract` (feature `contract-tests`) is the suite every store
//!   passes.
//! - [`ids`] and [`event`] are the domain: shard, producer, subscriber and
//!   owner ids, sequences and epochs, events and their chain hash;
//!   [`wire`] converts them to and from the protobuf contracts, and
//!   [`error`] maps failures to gRPC statuses.
//! - [`schema`] applies the migrations in `migrations/` and checks a
//!   database's schema at start-up; [`verify`] walks shards' hash chains.
//!
//! Serving a replica (the database must have been migrated with
//! `omnirelay-hub migrate`):
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let config = omnirelay_hub::Config::new("postgres://hub@localhost:5432/omnirelay");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! omnirelay_hub::run(config, listener, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! The hash chain every reader checks:
//!
//! ```
//! use omnirelay_hub::event::{ChainHash, NewEvent, chain, verify};
//! use omnirelay_hub::ids::{Epoch, Sequence, ShardId};
//!
//! let shard = ShardId::parse("resourcelease.users").expect("a valid shard id");
//! let new = vec![NewEvent { recorded_at: std::time::SystemTime::UNIX_EPOCH, body: "enqueued".into() }];
//! let events = chain(ChainHash::ZERO, Sequence(1), Epoch(1), &new);
//! assert!(verify(&shard, Sequence(1), &ChainHash::ZERO, &events).is_ok());
//! ```

pub mod config;
pub mod defaults;
pub mod error;
pub mod event;
pub mod ids;
pub mod schema;
mod server;
pub mod service;
pub mod store;
mod subscribe;
mod tail;
pub mod telemetry;
pub mod verify;
pub mod wire;

pub use config::Config;
pub use omnirelay_proto as proto;
pub use server::{Hub, run};
