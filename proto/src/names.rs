//! The shard-name grammar, defined once for the hub and the nodes.
//!
//! A shard name is one or more segments joined by `.`; a segment is 1 to
//! [`MAX_SHARD_SEGMENT_BYTES`] bytes of `a-z`, `0-9`, `-` and `_`; the whole
//! name is at most [`MAX_SHARD_NAME_BYTES`] bytes. So a name is safe in
//! logs, metric labels, notification payloads and URLs, a segment can be
//! reused as a DNS label, and `.` is free to separate the levels that
//! patterns such as `resourcelease.*` select.
//!
//! The hub creates shards only under this grammar; a node layers its own
//! policy on top (a queue's namespace starts with `resourcelease`).
//!
//! ```
//! use omnirelay_proto::names::{ShardNameError, check_shard_name};
//!
//! assert!(check_shard_name("resourcelease.users").is_ok());
//! assert_eq!(check_shard_name("resourcelease..users"), Err(ShardNameError::EmptySegment));
//! assert_eq!(check_shard_name("resourcelease.Users"), Err(ShardNameError::BadCharacter('U')));
//! ```

/// Longest shard name, in bytes. Names appear in every event, metric label
/// and trace; 128 bytes fits `resourcelease.` plus a few descriptive
/// segments while keeping labels readable and notification payloads small.
pub const MAX_SHARD_NAME_BYTES: usize = 128;

/// Longest segment between dots. Matches a DNS label, so a segment can be
/// reused as a host or Kubernetes name without rewriting.
pub const MAX_SHARD_SEGMENT_BYTES: usize = 63;

/// Why a name is not a shard name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShardNameError {
    /// The empty string.
    #[error("must not be empty")]
    Empty,
    /// Over [`MAX_SHARD_NAME_BYTES`].
    #[error("is {0} bytes long; the limit is {limit}", limit = MAX_SHARD_NAME_BYTES)]
    TooLong(usize),
    /// Two dots in a row, or a dot at either end.
    #[error("has an empty segment (dots must separate non-empty segments)")]
    EmptySegment,
    /// A segment over [`MAX_SHARD_SEGMENT_BYTES`].
    #[error("has a segment longer than {limit} bytes", limit = MAX_SHARD_SEGMENT_BYTES)]
    SegmentTooLong,
    /// A character outside `a-z`, `0-9`, `-`, `_` and the separating `.`.
    #[error("contains {0:?}; segments may hold only a-z, 0-9, '-' and '_'")]
    BadCharacter(char),
}

/// Checks `name` against the shard-name grammar.
pub fn check_shard_name(name: &str) -> Result<(), ShardNameError> {
    if name.is_empty() {
        return Err(ShardNameError::Empty);
    }
    if let Some(bad) =
        name.chars().find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(ShardNameError::BadCharacter(bad));
    }
    if name.len() > MAX_SHARD_NAME_BYTES {
        return Err(ShardNameError::TooLong(name.len()));
    }
    for segment in name.split('.') {
        if segment.is_empty() {
            return Err(ShardNameError::EmptySegment);
        }
        if segment.len() > MAX_SHARD_SEGMENT_BYTES {
            return Err(ShardNameError::SegmentTooLong);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_accepts_dotted_lowercase_segments_only() {
        for ok in ["resourcelease", "resourcelease.users", "omnirelay.members.node-1", "a.b_c.0-9"] {
            assert_eq!(check_shard_name(ok), Ok(()), "{ok}");
        }
        let long_segment = format!("a.{}", "b".repeat(MAX_SHARD_SEGMENT_BYTES + 1));
        let long_name = ["abcdefgh"; 15].join(".") + ".x";
        assert!(long_name.len() > MAX_SHARD_NAME_BYTES);
        let cases = [
            ("", ShardNameError::Empty),
            (".a", ShardNameError::EmptySegment),
            ("a.", ShardNameError::EmptySegment),
            ("a..b", ShardNameError::EmptySegment),
            ("a b", ShardNameError::BadCharacter(' ')),
            ("a.*", ShardNameError::BadCharacter('*')),
            ("Users", ShardNameError::BadCharacter('U')),
            ("caf\u{e9}", ShardNameError::BadCharacter('\u{e9}')),
            (long_segment.as_str(), ShardNameError::SegmentTooLong),
            (long_name.as_str(), ShardNameError::TooLong(long_name.len())),
        ];
        for (name, err) in cases {
            assert_eq!(check_shard_name(name), Err(err), "{name:?}");
        }
    }
}
