//! The `rpc-shard-key` header.

use http::{HeaderMap, HeaderValue};

use super::{ShardError, parse_namespace};
use crate::ShardId;

/// Header naming the shard (namespace) a call addresses, e.g.
/// `rpc-shard-key: resourcelease.hash.03`. Gateways route on it without
/// decoding the body; the server records it as `rpc.shard_key` and rejects a
/// call whose header disagrees with the namespace in its body.
pub const SHARD_KEY_HEADER: &str = "rpc-shard-key";

/// The validated value of the `rpc-shard-key` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShardKey(ShardId);

impl ShardKey {
    /// Wraps a shard id that is already a valid namespace.
    pub fn new(shard: ShardId) -> Self {
        Self(shard)
    }

    /// Reads the header: `Ok(None)` when absent, an error naming
    /// `rpc-shard-key` when present but not a single valid namespace.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ShardError> {
        let mut values = headers.get_all(SHARD_KEY_HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        let invalid = |reason| ShardError::InvalidNamespace {
            field: SHARD_KEY_HEADER.to_string(),
            value: String::from_utf8_lossy(value.as_bytes()).chars().take(super::defaults::MAX_NAMESPACE_LEN).collect(),
            reason,
        };
        if values.next().is_some() {
            return Err(invalid("the header is repeated"));
        }
        let text = value.to_str().map_err(|_| invalid("not visible ASCII"))?;
        if text.is_empty() {
            return Err(invalid("empty"));
        }
        parse_namespace(SHARD_KEY_HEADER, text).map(|shard| Some(Self(shard)))
    }

    /// Sets the header on an outgoing request, replacing any previous value.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        let value = HeaderValue::from_str(self.0.as_str())
            .expect("a validated namespace is lowercase ASCII and should be a valid header value");
        headers.insert(SHARD_KEY_HEADER, value);
    }

    /// The shard (namespace) the key names.
    pub fn shard(&self) -> &ShardId {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_header_is_none_and_round_trip_works() {
        let mut headers = HeaderMap::new();
        assert_eq!(ShardKey::from_headers(&headers).expect("absent is fine"), None);
        let key = ShardKey::new(ShardId::new("resourcelease.hash.03"));
        key.insert_into(&mut headers);
        assert_eq!(ShardKey::from_headers(&headers).expect("valid"), Some(key));
    }

    #[test]
    fn bad_header_values_are_rejected_naming_the_header() {
        for value in ["", "hash-03", "resourcelease.Hash"] {
            let mut headers = HeaderMap::new();
            headers.insert(SHARD_KEY_HEADER, HeaderValue::from_str(value).expect("ascii"));
            let err = ShardKey::from_headers(&headers).expect_err(value);
            assert!(err.to_string().starts_with("rpc-shard-key: "), "{err}");
            assert_eq!(err.code(), crate::ErrorCode::InvalidArgument);
        }
        let mut headers = HeaderMap::new();
        headers.append(SHARD_KEY_HEADER, HeaderValue::from_static("resourcelease.a"));
        headers.append(SHARD_KEY_HEADER, HeaderValue::from_static("resourcelease.b"));
        assert!(ShardKey::from_headers(&headers).expect_err("repeated").to_string().contains("repeated"));
    }
}
