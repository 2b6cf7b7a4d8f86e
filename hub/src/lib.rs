//! The OmniRelay replication hub: a stateless gRPC service that owns every
//! shard's ordered, fenced, hash-chained event log.

pub use omnirelay_proto as proto;

pub mod admin;
pub mod config;
pub mod database;
pub mod defaults;
pub mod health;
pub mod principal;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod transport;
