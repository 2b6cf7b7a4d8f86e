//! Shard namespaces, the payload-to-shard routing helper and the
//! `rpc-shard-key` header.
//!
//! Every lease queue lives in a namespace such as `resourcelease`,
//! `resourcelease.users` or `resourcelease.hash.03`; the namespace is the
//! [`ShardId`](crate::ShardId) of the queue and its log. Procedures are addressed as
//! `{namespace}::{procedure}` (`resourcelease.users::enqueue`).
//!
//! - [`parse_namespace`] validates a namespace (empty means
//!   [`DEFAULT_NAMESPACE`]).
//! - [`ShardRouter`] maps an item's identity to the namespace that should hold
//!   it: by resource-id prefix, by resource type, or by hash bucket.
//! - [`ShardKey`] reads and writes the `rpc-shard-key` header that gateways
//!   and traces use to know which shard a call addresses.
//!
//! ```
//! use omnirelay_client::shard::{RoutingKey, ShardRouter};
//!
//! let router = ShardRouter::builder()
//!     .resource_type("user", "resourcelease.users")
//!     .hash_buckets(16)
//!     .build()
//!     .expect("valid routing rules");
//! let users = router.route(&RoutingKey::new("user", "42"));
//! assert_eq!(users.as_str(), "resourcelease.users");
//! let other = router.route(&RoutingKey::new("table", "orders"));
//! assert!(other.as_str().starts_with("resourcelease.hash."));
//! ```

pub mod defaults;
mod key;
mod namespace;
mod router;

pub use key::{SHARD_KEY_HEADER, ShardKey};
pub use namespace::{DEFAULT_NAMESPACE, parse_namespace};
pub use router::{HashBuckets, PrefixRule, RouterConfig, RoutingKey, ShardRouter, ShardRouterBuilder, fnv1a64};

use crate::ErrorCode;

/// Why a namespace, a shard key or a routing rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// A namespace does not follow the grammar.
    #[error("{field}: {value:?} is not a valid namespace: {reason}")]
    InvalidNamespace {
        /// Where the namespace came from (`namespace`, `rpc-shard-key`,
        /// `rules[2].namespace`).
        field: String,
        /// The offending value (truncated when very long).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A routing rule is malformed.
    #[error("{field}: {reason}")]
    InvalidRule {
        /// The rule field at fault, e.g. `id_prefixes[1].prefix`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ShardError {
    /// The transport-independent code: bad namespaces and rules are the
    /// caller's input errors.
    pub fn code(&self) -> ErrorCode {
        match self {
            ShardError::InvalidNamespace { .. } | ShardError::InvalidRule { .. } => ErrorCode::InvalidArgument,
        }
    }
}
