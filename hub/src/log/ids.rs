//! Identifiers and counters of the log, as newtypes so a shard id is never
//! passed where a producer id belongs, nor a sequence where an epoch does.
//!
//! Validation happens once, at the boundary that receives the value
//! ([`ShardId::parse`] and friends, called by the wire conversions); inside
//! the hub a value of these types is known to be well formed.

use std::fmt;

use crate::defaults;

/// A value received from outside failed validation. Names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidInput {
    /// The offending field, as the caller named it (e.g. `shard_id`).
    pub field: &'static str,
    /// What is wrong with it, including the value when that helps.
    pub reason: String,
}

impl InvalidInput {
    /// Builds an error for `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}

/// Checks a name-like identifier: non-blank, bounded, printable ASCII without
/// spaces, so it is safe in logs, metric labels and notification payloads.
fn check_name(field: &'static str, value: &str, max_len: usize) -> Result<(), InvalidInput> {
    if value.is_empty() {
        return Err(InvalidInput::new(field, "must not be empty"));
    }
    if value.len() > max_len {
        return Err(InvalidInput::new(field, format!("is {} bytes long; the limit is {max_len}", value.len())));
    }
    if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic() || matches!(c, '*' | ',' | ';')) {
        return Err(InvalidInput::new(
            field,
            format!("{value:?} contains {bad:?}; use printable ASCII without spaces, '*', ',' or ';'"),
        ));
    }
    Ok(())
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as received in the field of the same name.
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidInput> {
                let value = value.into();
                check_name($field, &value, defaults::MAX_NAME_BYTES)?;
                Ok(Self(value))
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
    };
}

name_id!(
    /// A shard: one lease queue and its log, named like its namespace
    /// (`resourcelease.users`).
    ShardId,
    "shard_id"
);

impl ShardId {
    /// Checks the id against the shard-name grammar new shards must follow
    /// ([`omnirelay_proto::names`], shared with the nodes). [`ShardId::parse`]
    /// takes the older, wider grammar (printable ASCII up to
    /// [`defaults::MAX_NAME_BYTES`]) so shards created under it stay served.
    pub fn check_new(&self) -> Result<(), InvalidInput> {
        omnirelay_proto::names::check_shard_name(&self.0)
            .map_err(|err| InvalidInput::new("shard_id", format!("{:?} {err}; a new shard needs a shard name", self.0)))
    }
}

name_id!(
    /// A producer of appends (one per shard-owner incarnation or process);
    /// retries are recognised by `(producer, producer_seq)`.
    ProducerId,
    "producer_id"
);

name_id!(
    /// A subscriber; checkpoints are stored under it.
    SubscriberId,
    "subscriber_id"
);

name_id!(
    /// The holder of a shard lease (a mesh node's identity).
    OwnerId,
    "owner"
);

/// Which shards a subscription follows: `resourcelease.*` matches every shard
/// whose id starts with `resourcelease.`; without a trailing `*` the pattern
/// matches one shard exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShardPattern {
    prefix: String,
    wildcard: bool,
}

impl ShardPattern {
    /// Validates a pattern as received in `shard_pattern`.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let (prefix, wildcard) = match value.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (value, false),
        };
        if wildcard && prefix.is_empty() {
            return Ok(Self { prefix: String::new(), wildcard });
        }
        check_name("shard_pattern", prefix, defaults::MAX_NAME_BYTES)?;
        Ok(Self { prefix: prefix.to_string(), wildcard })
    }

    /// The literal part before the `*` (the whole id without one).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Reports whether `shard` is selected.
    pub fn matches(&self, shard: &ShardId) -> bool {
        if self.wildcard { shard.as_str().starts_with(&self.prefix) } else { shard.as_str() == self.prefix }
    }
}

impl fmt::Display for ShardPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.prefix, if self.wildcard { "*" } else { "" })
    }
}

macro_rules! counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The number.
            pub fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

counter!(
    /// A position in a shard's log: gapless, the first event is 1; 0 means
    /// "before the first event" (an empty log's head, a fresh checkpoint).
    Sequence
);

impl Sequence {
    /// The position before the first event.
    pub const ZERO: Sequence = Sequence(0);

    /// The next position.
    pub fn next(self) -> Sequence {
        Sequence(self.0 + 1)
    }

    /// The previous position (saturating at 0).
    pub fn prev(self) -> Sequence {
        Sequence(self.0.saturating_sub(1))
    }
}

counter!(
    /// A shard-lease generation: every grant bumps it, and an append must
    /// carry the current one. 0 means the shard was never granted.
    Epoch
);

counter!(
    /// A producer's batch counter on one shard: consecutive, so the hub can
    /// tell a retry (at or below the last) from a batch that skipped one.
    ProducerSeq
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_with_the_field_named() {
        assert!(ShardId::parse("resourcelease.users").is_ok());
        let err = ShardId::parse("").expect_err("empty id should be rejected");
        assert_eq!(err.field, "shard_id");
        let err = ProducerId::parse("a b").expect_err("a space should be rejected");
        assert_eq!(err.field, "producer_id");
        assert!(err.reason.contains("' '"), "{err}");
        let long = "x".repeat(defaults::MAX_NAME_BYTES + 1);
        assert!(SubscriberId::parse(long).expect_err("too long").reason.contains("limit"));
        assert!(ShardId::parse("a*").is_err(), "a wildcard is not a shard id");
    }

    #[test]
    fn patterns_match_prefixes_or_exact_ids() {
        let users = ShardId::parse("resourcelease.users").expect("valid");
        let root = ShardId::parse("resourcelease").expect("valid");
        let wild = ShardPattern::parse("resourcelease.*").expect("valid");
        assert!(wild.matches(&users));
        assert!(!wild.matches(&root));
        let exact = ShardPattern::parse("resourcelease").expect("valid");
        assert!(exact.matches(&root) && !exact.matches(&users));
        assert!(ShardPattern::parse("*").expect("valid").matches(&users));
        assert_eq!(ShardPattern::parse("bad pattern*").expect_err("space").field, "shard_pattern");
    }
}
