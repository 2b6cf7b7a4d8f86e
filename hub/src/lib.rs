//! The OmniRelay replication hub: a stateless gRPC service that owns every
//! shard's ordered, fenced, hash-chained event log.
//!
//! Overview:
//!
//! - [`store::LogStore`] is the storage boundary; [`store::postgres::PgStore`]
//!   implements it on PostgreSQL (group commit, epoch fence in SQL, dedupe by
//!   producer sequence, hash chain, LISTEN/NOTIFY).
//! - [`ids`] and [`event`] are the domain: shard, producer, subscriber and
//!   owner ids, sequences and epochs, events and their chain hash.
//! - [`schema`] applies the migrations in `migrations/` and checks a
//!   database's schema version at start-up.
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
