//! The OmniRelay replication hub: a stateless gRPC service that owns every
//! shard's ordered, fenced, hash-chained event log.
//!
//! Overview, by folder (an append goes [`api`] -> [`store`] -> `fanout`; a
//! shard lease [`api`] -> [`store`]):
//!
//! - [`run`] serves one replica until a shutdown signal; [`Hub`] does the
//!   same in steps (open, mount the [`api::service`] on your own router,
//!   serve, close). [`Config`] (built from the flags in [`config::flags`])
//!   says which store, which ports, which TLS.
//! - [`log`] is the domain: shard, producer, subscriber and owner ids,
//!   sequences and epochs ([`log::ids`]), events and their chain hash
//!   ([`log::event`]), and the walk of shards' hash chains ([`log::verify`]).
//! - [`store::LogStore`] is the storage boundary; `store::decision` is the
//!   append decision both stores call; [`store::postgres::PgStore`]
//!   implements it on PostgreSQL (group commit, the epoch fence judged by
//!   PostgreSQL, dedupe by producer sequence, the hash chain, LISTEN/NOTIFY;
//!   its own configuration and pool in [`store::postgres::pool`], the
//!   migrations of `migrations/` in [`store::postgres::schema`]);
//!   [`store::sqlite::SqliteStore`] is the embedded default store (one
//!   replica, one file), held to the same contract. `store::contract`
//!   (feature `contract-tests`) is the suite every store passes.
//! - [`api`] is the gRPC surface: [`api::wire`] converts the domain to and
//!   from the protobuf contracts, [`api::error`] maps failures to gRPC
//!   statuses, [`api::decoding`] answers undecodable requests
//!   INVALID_ARGUMENT. `fanout` carries committed events to subscribers (the
//!   live tail, subscriptions, their memory budget).
//! - [`security`]: [`security::tls`] and [`security::transport`] accept TLS
//!   and mutual-TLS connections and attach the caller's
//!   [`security::principal`]; [`security::access`] binds every call to a
//!   principal (mutual TLS, bearer tokens, trusted proxies; the identity
//!   layer shared with the node, `omnirelay-identity`) and checks it against
//!   the hub roles, or serves local callers only in protected mode;
//!   [`security::quota`] bounds the streams each principal holds open.
//! - [`replica`]: [`replica::health`] and [`replica::admin`] report readiness
//!   (gRPC health, `/healthz`, `/readyz`) and `/metrics`;
//!   [`replica::shutdown`] owns the graceful stop. [`telemetry`] holds the
//!   metric catalog and its label vocabularies, below the store;
//!   [`telemetry::traces`] the request span and OTLP export.
//! - The modules other crates name keep their paths at the root
//!   ([`ids`], [`event`], [`wire`], [`telemetry`], [`schema`], ...).
//!
//! Running a replica on the embedded store until Ctrl-C:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let config = omnirelay_hub::Config::for_sqlite("omnirelay-hub.db");
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
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

pub mod api;
pub mod config;
pub mod defaults;
mod fanout;
pub mod log;
pub mod replica;
pub mod security;
pub mod store;
pub mod telemetry;

// The public paths other crates name (`omnirelay_hub::ids::ShardId`, ...).
pub use api::{decoding, error, service, wire};
pub use config::Config;
pub use log::{event, ids, verify};
pub use omnirelay_proto as proto;
pub use replica::server::{Hub, SubscriptionMemory, run};
pub use replica::{admin, health, shutdown};
pub use security::{access, principal, quota, tls, transport};
pub use store::postgres::schema;
