//! The namespace grammar.

use super::ShardError;
use super::defaults::MAX_NAMESPACE_LEN;
use crate::ShardId;

/// The namespace of the default queue, used when a request leaves its
/// namespace empty.
pub const DEFAULT_NAMESPACE: &str = "resourcelease";

/// Validates a namespace and returns it as a [`ShardId`]; an empty string means
/// [`DEFAULT_NAMESPACE`].
///
/// A namespace is a shard name ([`omnirelay_proto::names`], the grammar the
/// hub shares: dot-separated segments of 1 to 63 characters of `a-z`, `0-9`,
/// `-` and `_`, at most 128 bytes) whose first segment is `resourcelease`,
/// the node's own policy on top. `field` names where the value came from,
/// so the error can say it.
pub fn parse_namespace(field: &str, value: &str) -> Result<ShardId, ShardError> {
    use omnirelay_proto::names::{ShardNameError, check_shard_name};
    if value.is_empty() {
        return Ok(ShardId::new(DEFAULT_NAMESPACE));
    }
    let fail = |reason: &'static str| ShardError::InvalidNamespace {
        field: field.to_string(),
        value: value.chars().take(MAX_NAMESPACE_LEN).collect(),
        reason,
    };
    check_shard_name(value).map_err(|err| {
        fail(match err {
            ShardNameError::Empty | ShardNameError::EmptySegment => "empty segment between dots",
            ShardNameError::TooLong(_) => "longer than 128 bytes",
            ShardNameError::SegmentTooLong => "a segment is longer than 63 characters",
            ShardNameError::BadCharacter(_) => "segments may hold only a-z, 0-9, '-' and '_'",
        })
    })?;
    if value.split('.').next() != Some(DEFAULT_NAMESPACE) {
        return Err(fail("must start with \"resourcelease\""));
    }
    Ok(ShardId::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_namespace_means_the_default_queue() {
        assert_eq!(parse_namespace("namespace", "").expect("valid").as_str(), DEFAULT_NAMESPACE);
    }

    #[test]
    fn well_formed_namespaces_are_accepted() {
        for ok in ["resourcelease", "resourcelease.users", "resourcelease.hash.03", "resourcelease.ml-jobs.eu_west"] {
            assert_eq!(parse_namespace("namespace", ok).expect(ok).as_str(), ok);
        }
    }

    #[test]
    fn malformed_namespaces_name_the_field_and_the_reason() {
        let cases = [
            ("users", "must start"),
            ("resourcelease.", "empty segment"),
            ("resourcelease..users", "empty segment"),
            ("resourcelease.Users", "only a-z"),
            ("resourcelease.us ers", "only a-z"),
            ("resourceleasex", "must start"),
        ];
        for (value, reason) in cases {
            let err = parse_namespace("rpc-shard-key", value).expect_err(value);
            let text = err.to_string();
            assert!(text.starts_with("rpc-shard-key: "), "{text}");
            assert!(text.contains(reason), "{value}: {text}");
        }
        let long = format!("resourcelease.{}", "a".repeat(MAX_NAMESPACE_LEN));
        assert!(parse_namespace("namespace", &long).expect_err("too long").to_string().contains("128"));
        let long_segment = format!("resourcelease.{}", "a".repeat(64));
        assert!(parse_namespace("namespace", &long_segment).is_err());
    }
}
