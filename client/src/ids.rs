//! Identities shared by the queue, the middleware and peer health.

use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string. Validation, where a boundary needs it, happens
            /// at that boundary.
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The string form.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_string())
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self(value)
            }
        }
    };
}

string_id!(
    /// A shard: one lease queue and its log, named like its namespace
    /// (`resourcelease`, `resourcelease.users`).
    ShardId
);

string_id!(
    /// A mesh peer (a node hosting queues, or a worker holding leases).
    PeerId
);

string_id!(
    /// A normalized caller identity (`rpc.principal`), e.g. a SPIFFE URI from
    /// a client certificate or a JWT subject.
    Principal
);
