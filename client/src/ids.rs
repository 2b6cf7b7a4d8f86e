//! Identities shared by the queue, the middleware and peer health.

use std::fmt;
use std::sync::Arc;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Backed by an `Arc<str>`: ids are copied into every event, lease
        /// and handle, and a clone is a reference count, not an allocation.
        #[derive(Debug, Clone, Eq, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl std::hash::Hash for $name {
            /// Hashes the text, as the equality compares it.
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.0.hash(state);
            }
        }

        impl PartialEq for $name {
            /// Equal text; copies of one id (the common case: ids are
            /// cloned, not re-parsed) compare by pointer without reading it.
            #[inline]
            fn eq(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0, &other.0) || *self.0 == *other.0
            }
        }

        impl $name {
            /// Wraps a string. Validation, where a boundary needs it, happens
            /// at that boundary.
            pub fn new(value: impl Into<String>) -> Self {
                Self(Arc::from(value.into()))
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
                Self(Arc::from(value))
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self(Arc::from(value))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer).map(Self::from)
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

/// A normalized caller identity (`rpc.principal`): the identity layer's,
/// shared with the hub.
pub use omnirelay_identity::Principal;

/// Position of an event in a shard's log: gapless, starting at 1, assigned by
/// the replicator. `Sequence::ZERO` means "before the first event".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Sequence(u64);

impl Sequence {
    /// The position before the first event of a log.
    pub const ZERO: Sequence = Sequence(0);

    /// Wraps a raw sequence number.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The raw sequence number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The sequence `n` positions after this one.
    pub const fn after(self, n: u64) -> Self {
        Self(self.0 + n)
    }
}

impl fmt::Display for Sequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Proof that a lease is the newest on its shard: the log sequence of the
/// `Leased` event that granted it, so tokens strictly increase per shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct FencingToken(u64);

impl FencingToken {
    /// No lease yet (an item that was never leased).
    pub const NONE: FencingToken = FencingToken(0);

    /// Wraps a raw token.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The raw token.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<Sequence> for FencingToken {
    fn from(sequence: Sequence) -> Self {
        Self(sequence.0)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A shard-ownership epoch: bumped by the log on every grant of the shard's
/// lease. Batches carry the epoch their producer holds, and the log refuses
/// any other, so an owner that lost the shard can never append to it again.
/// `Epoch::ZERO` is "no lease taken" (accepted only by logs that were never
/// fenced, such as an in-memory replicator in a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Epoch(u64);

impl Epoch {
    /// No lease taken.
    pub const ZERO: Epoch = Epoch(0);

    /// Wraps a raw epoch.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The raw epoch.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The error of parsing a 128-bit id from its 32-digit hexadecimal form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected 32 hexadecimal digits")]
pub struct ParseIdError;

macro_rules! wide_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Written as 32 lowercase hexadecimal digits. The id is a plain
        /// 128-bit value so indexes hash and copy it without allocating.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u128);

        impl $name {
            /// Wraps a raw 128-bit value.
            pub const fn from_u128(value: u128) -> Self {
                Self(value)
            }

            /// The raw 128-bit value.
            pub const fn as_u128(self) -> u128 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:032x}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:032x})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ParseIdError);
                }
                u128::from_str_radix(s, 16).map(Self).map_err(|_| ParseIdError)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

wide_id!(
    /// A queue item, assigned at enqueue and kept across drain, restore and
    /// redrive.
    ItemId
);

wide_id!(
    /// One lease grant (unique even when the same item is leased again).
    LeaseId
);

string_id!(
    /// One producer incarnation writing to a shard's log. Replicators use
    /// `(producer, producer_seq)` to recognise a retried batch.
    ProducerId
);

#[cfg(test)]
mod wide_id_tests {
    use super::*;

    #[test]
    fn wide_ids_round_trip_through_text() {
        let id = ItemId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(id.to_string(), "0123456789abcdef0011223344556677");
        assert_eq!(id.to_string().parse::<ItemId>(), Ok(id));
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in ["", "xyz", "0123456789abcdef001122334455667", "+123456789abcdef0011223344556677"] {
            assert_eq!(bad.parse::<ItemId>(), Err(ParseIdError), "{bad:?}");
        }
    }
}
