//! Limits and timeouts of the middleware stack, each with the reason for its
//! value.

use std::time::Duration;

/// Largest request body for every procedure but `Restore`. An item body may be
/// 1 MiB; base64 in JSON adds a third, and attributes and the envelope need
/// some room, so 2 MiB fits the largest valid enqueue on both transports.
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// Largest `Restore` request: the contracts' limit
/// ([`omnirelay_proto::limits::MAX_RESTORE_REQUEST_BYTES`], 16 MiB), which
/// keeps a restore's events inside one batch the hub accepts. A drain
/// snapshot larger than this is restored in several calls (`omnirelay
/// restore` splits it; items already present are skipped).
pub const MAX_RESTORE_REQUEST_BYTES: usize = omnirelay_proto::limits::MAX_RESTORE_REQUEST_BYTES;

/// Deadline applied when a call names none. Long enough for a lease long-poll
/// of the usual 20 s plus replication, short enough that a forgotten call does
/// not hold a connection slot for long.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// Longest deadline a caller may ask for; longer requests are clamped. Five
/// minutes covers a drain that waits for in-flight leases, and bounds how long
/// any one call can pin resources.
pub const MAX_DEADLINE: Duration = Duration::from_secs(300);

/// The credential limits live with the identity layer, shared with the hub.
pub use omnirelay_identity::defaults::{JWT_LEEWAY, MAX_BEARER_TOKEN_LEN, MAX_PRINCIPAL_LEN};
