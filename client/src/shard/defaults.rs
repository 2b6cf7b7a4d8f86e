//! Limits of namespaces and routing rules, each with the reason for its value.

/// Longest accepted namespace, in bytes: the shard-name grammar's limit,
/// shared with the hub (see [`omnirelay_proto::names::MAX_SHARD_NAME_BYTES`]).
pub const MAX_NAMESPACE_LEN: usize = omnirelay_proto::names::MAX_SHARD_NAME_BYTES;

/// Longest accepted segment between dots: the shard-name grammar's limit
/// (see [`omnirelay_proto::names::MAX_SHARD_SEGMENT_BYTES`]).
pub const MAX_SEGMENT_LEN: usize = omnirelay_proto::names::MAX_SHARD_SEGMENT_BYTES;

/// Most hash buckets a router may spread items over. Each bucket is a queue
/// with its own log, shard lease and metrics; past about a thousand the
/// per-shard overhead outweighs the spreading.
pub const MAX_HASH_BUCKETS: u16 = 1024;
