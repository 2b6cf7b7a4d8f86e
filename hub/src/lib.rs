//! The OmniRelay replication hub: a stateless gRPC service that owns every
//! shard's ordered, fenced, hash-chained event log.

pub use omnirelay_proto as proto;

pub mod config;
pub mod defaults;
