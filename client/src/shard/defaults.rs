//! Limits of namespaces and routing rules, each with the reason for its value.

/// Longest accepted namespace, in bytes. Namespaces appear in every event,
/// metric label and trace; 128 bytes fits `resourcelease.` plus a few
/// descriptive segments while keeping labels readable.
pub const MAX_NAMESPACE_LEN: usize = 128;

/// Longest accepted segment between dots. Matches a DNS label, so a namespace
/// segment can be reused as a host or Kubernetes name without rewriting.
pub const MAX_SEGMENT_LEN: usize = 63;

/// Most hash buckets a router may spread items over. Each bucket is a queue
/// with its own log, shard lease and metrics; past about a thousand the
/// per-shard overhead outweighs the spreading.
pub const MAX_HASH_BUCKETS: u16 = 1024;
