//! The routing helper from an item's identity to its shard namespace.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::defaults::MAX_HASH_BUCKETS;
use super::{DEFAULT_NAMESPACE, ShardError, parse_namespace};
use crate::ShardId;
use crate::proto::resourcelease::v1 as pb;

/// What a router looks at: the identity of the resource an item is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingKey<'a> {
    /// The item's `resource_type`.
    pub resource_type: &'a str,
    /// The item's `resource_id`.
    pub resource_id: &'a str,
    /// The item's optional `partition_key`; when set, hash routing uses it
    /// instead of the resource identity.
    pub partition_key: &'a str,
}

impl<'a> RoutingKey<'a> {
    /// A key with no partition key.
    pub fn new(resource_type: &'a str, resource_id: &'a str) -> Self {
        Self { resource_type, resource_id, partition_key: "" }
    }

    /// Sets the partition key.
    pub fn with_partition_key(mut self, partition_key: &'a str) -> Self {
        self.partition_key = partition_key;
        self
    }
}

impl<'a> From<&'a pb::ItemPayload> for RoutingKey<'a> {
    fn from(payload: &'a pb::ItemPayload) -> Self {
        Self {
            resource_type: &payload.resource_type,
            resource_id: &payload.resource_id,
            partition_key: &payload.partition_key,
        }
    }
}

/// Hash-bucket routing: items spread over `buckets` namespaces named
/// `{base}.hash.{NN}` (zero-padded to at least two digits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashBuckets {
    /// Namespace the buckets hang under; `resourcelease` when omitted.
    #[serde(default = "default_namespace_string")]
    pub base: String,
    /// Number of buckets, 1 to [`MAX_HASH_BUCKETS`](super::defaults::MAX_HASH_BUCKETS). Changing it moves most
    /// items to another shard: drain and restore when resizing.
    pub buckets: u16,
}

/// A routing rule on the start of `resource_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixRule {
    /// Only items of this resource type match; any type when omitted.
    #[serde(default)]
    pub resource_type: Option<String>,
    /// The `resource_id` prefix to match (non-empty).
    pub prefix: String,
    /// Namespace the matching items go to.
    pub namespace: String,
}

/// Routing rules as they appear in a configuration file.
///
/// ```json
/// {
///   "id_prefixes": [{ "resource_type": "table", "prefix": "billing/", "namespace": "resourcelease.billing" }],
///   "resource_types": { "user": "resourcelease.users" },
///   "hash": { "buckets": 16 },
///   "default_namespace": "resourcelease"
/// }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Resource-id prefix rules; the longest matching prefix wins.
    #[serde(default)]
    pub id_prefixes: Vec<PrefixRule>,
    /// Resource type to namespace.
    #[serde(default)]
    pub resource_types: BTreeMap<String, String>,
    /// Hash buckets for items no other rule matched.
    #[serde(default)]
    pub hash: Option<HashBuckets>,
    /// Namespace for items nothing else matched; `resourcelease` when omitted.
    #[serde(default)]
    pub default_namespace: Option<String>,
}

fn default_namespace_string() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// Maps an item's identity to the namespace (shard) that should hold it.
///
/// Rules apply in this order, first match wins:
/// 1. resource-id prefix rules, longest prefix first (a rule restricted to a
///    resource type only matches that type);
/// 2. resource type rules;
/// 3. hash buckets, over the partition key when set, else over
///    `resource_type`, a NUL byte and `resource_id` (FNV-1a 64, see
///    [`fnv1a64`]), so every language can compute the same bucket;
/// 4. the default namespace.
///
/// Items of one resource land in one shard unless their partition keys
/// differ: per-resource lease exclusivity holds within a shard only.
#[derive(Debug, Clone)]
pub struct ShardRouter {
    prefixes: Vec<(Option<String>, String, ShardId)>,
    types: BTreeMap<String, ShardId>,
    hash: Option<(String, u16, usize)>,
    default: ShardId,
}

impl ShardRouter {
    /// Starts a router with no rules (everything goes to `resourcelease`).
    pub fn builder() -> ShardRouterBuilder {
        ShardRouterBuilder::default()
    }

    /// Builds a router from configuration, validating every namespace and
    /// naming the field at fault.
    pub fn from_config(config: &RouterConfig) -> Result<Self, ShardError> {
        let mut prefixes = Vec::with_capacity(config.id_prefixes.len());
        for (i, rule) in config.id_prefixes.iter().enumerate() {
            if rule.prefix.is_empty() {
                return Err(ShardError::InvalidRule {
                    field: format!("id_prefixes[{i}].prefix"),
                    reason: "must not be empty".into(),
                });
            }
            if rule.resource_type.as_deref() == Some("") {
                return Err(ShardError::InvalidRule {
                    field: format!("id_prefixes[{i}].resource_type"),
                    reason: "must not be empty when present".into(),
                });
            }
            let namespace = parse_namespace(&format!("id_prefixes[{i}].namespace"), &rule.namespace)?;
            prefixes.push((rule.resource_type.clone(), rule.prefix.clone(), namespace));
        }
        // Longest prefix first; a type-restricted rule before an unrestricted
        // one of the same length, since it is more specific.
        prefixes.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(b.0.is_some().cmp(&a.0.is_some())));
        let mut types = BTreeMap::new();
        for (resource_type, namespace) in &config.resource_types {
            if resource_type.is_empty() {
                return Err(ShardError::InvalidRule {
                    field: "resource_types".into(),
                    reason: "a resource type key is empty".into(),
                });
            }
            types
                .insert(resource_type.clone(), parse_namespace(&format!("resource_types.{resource_type}"), namespace)?);
        }
        let hash = match &config.hash {
            None => None,
            Some(hash) => {
                if hash.buckets == 0 || hash.buckets > MAX_HASH_BUCKETS {
                    return Err(ShardError::InvalidRule {
                        field: "hash.buckets".into(),
                        reason: format!("must be between 1 and {MAX_HASH_BUCKETS}, got {}", hash.buckets),
                    });
                }
                let base = parse_namespace("hash.base", &hash.base)?;
                let width = (hash.buckets - 1).to_string().len().max(2);
                // The longest bucket name must itself be a valid namespace.
                parse_namespace("hash.base", &format!("{base}.hash.{:0width$}", hash.buckets - 1))?;
                Some((base.as_str().to_string(), hash.buckets, width))
            }
        };
        let default = parse_namespace("default_namespace", config.default_namespace.as_deref().unwrap_or(""))?;
        Ok(Self { prefixes, types, hash, default })
    }

    /// Returns the namespace an item with this identity belongs to.
    pub fn route(&self, key: &RoutingKey<'_>) -> ShardId {
        for (resource_type, prefix, namespace) in &self.prefixes {
            let type_matches = resource_type.as_deref().is_none_or(|t| t == key.resource_type);
            if type_matches && key.resource_id.starts_with(prefix.as_str()) {
                return namespace.clone();
            }
        }
        if let Some(namespace) = self.types.get(key.resource_type) {
            return namespace.clone();
        }
        if let Some((base, buckets, width)) = &self.hash {
            let bucket = Self::bucket_of(key, *buckets);
            return ShardId::new(format!("{base}.hash.{bucket:0width$}"));
        }
        self.default.clone()
    }

    /// The hash bucket (0-based) of an item among `buckets`.
    pub fn bucket_of(key: &RoutingKey<'_>, buckets: u16) -> u16 {
        let hash = if key.partition_key.is_empty() {
            let mut bytes = Vec::with_capacity(key.resource_type.len() + 1 + key.resource_id.len());
            bytes.extend_from_slice(key.resource_type.as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(key.resource_id.as_bytes());
            fnv1a64(&bytes)
        } else {
            fnv1a64(key.partition_key.as_bytes())
        };
        u16::try_from(hash % u64::from(buckets.max(1))).expect("a remainder of a u16 divisor should fit in u16")
    }
}

/// FNV-1a, 64-bit: the hash that picks an item's bucket. Chosen because it is
/// a dozen lines in any language, so producers outside Rust can route alike.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME))
}

/// Builds a [`ShardRouter`] in code; [`ShardRouterBuilder::build`] validates
/// like [`ShardRouter::from_config`].
#[derive(Debug, Clone, Default)]
pub struct ShardRouterBuilder {
    config: RouterConfig,
}

impl ShardRouterBuilder {
    /// Routes items whose `resource_id` starts with `prefix` (of any type).
    pub fn id_prefix(mut self, prefix: impl Into<String>, namespace: impl Into<String>) -> Self {
        self.config.id_prefixes.push(PrefixRule {
            resource_type: None,
            prefix: prefix.into(),
            namespace: namespace.into(),
        });
        self
    }

    /// Routes items of one resource type whose `resource_id` starts with
    /// `prefix`.
    pub fn typed_id_prefix(
        mut self,
        resource_type: impl Into<String>,
        prefix: impl Into<String>,
        namespace: impl Into<String>,
    ) -> Self {
        self.config.id_prefixes.push(PrefixRule {
            resource_type: Some(resource_type.into()),
            prefix: prefix.into(),
            namespace: namespace.into(),
        });
        self
    }

    /// Routes every item of a resource type.
    pub fn resource_type(mut self, resource_type: impl Into<String>, namespace: impl Into<String>) -> Self {
        self.config.resource_types.insert(resource_type.into(), namespace.into());
        self
    }

    /// Spreads unmatched items over `buckets` namespaces under `resourcelease`.
    pub fn hash_buckets(mut self, buckets: u16) -> Self {
        self.config.hash = Some(HashBuckets { base: DEFAULT_NAMESPACE.into(), buckets });
        self
    }

    /// Namespace for items no rule matched.
    pub fn default_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.default_namespace = Some(namespace.into());
        self
    }

    /// Validates the rules and builds the router.
    pub fn build(self) -> Result<ShardRouter, ShardError> {
        ShardRouter::from_config(&self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn longest_prefix_wins_then_type_then_hash() {
        let router = ShardRouter::builder()
            .id_prefix("billing/", "resourcelease.billing")
            .id_prefix("billing/eu/", "resourcelease.billing-eu")
            .typed_id_prefix("user", "billing/", "resourcelease.user-billing")
            .resource_type("user", "resourcelease.users")
            .hash_buckets(16)
            .build()
            .expect("valid rules");
        let route = |t, id| router.route(&RoutingKey::new(t, id)).as_str().to_string();
        assert_eq!(route("table", "billing/eu/1"), "resourcelease.billing-eu");
        assert_eq!(route("table", "billing/us/1"), "resourcelease.billing");
        assert_eq!(route("user", "billing/us/1"), "resourcelease.user-billing");
        assert_eq!(route("user", "42"), "resourcelease.users");
        let hashed = route("table", "orders");
        let bucket = ShardRouter::bucket_of(&RoutingKey::new("table", "orders"), 16);
        assert_eq!(hashed, format!("resourcelease.hash.{bucket:02}"));
    }

    #[test]
    fn hash_routing_is_stable_and_uses_the_partition_key_when_set() {
        let router = ShardRouter::builder().hash_buckets(8).build().expect("valid");
        let a = router.route(&RoutingKey::new("table", "orders"));
        assert_eq!(a, router.route(&RoutingKey::new("table", "orders")), "same item, same shard");
        // The bucket is a pure function of the documented hash input.
        let expected = fnv1a64(b"table\0orders") % 8;
        assert_eq!(a.as_str(), format!("resourcelease.hash.{expected:02}"));
        let partitioned = router.route(&RoutingKey::new("table", "orders").with_partition_key("tenant-7"));
        assert_eq!(partitioned.as_str(), format!("resourcelease.hash.{:02}", fnv1a64(b"tenant-7") % 8));
        // Items spread over more than one bucket.
        let shards: std::collections::BTreeSet<_> =
            (0..64).map(|i| router.route(&RoutingKey::new("table", &i.to_string()))).collect();
        assert!(shards.len() > 4, "64 ids should reach most of 8 buckets, got {shards:?}");
    }

    #[test]
    fn bucket_names_widen_past_two_digits() {
        let router = ShardRouter::builder().hash_buckets(1000).build().expect("valid");
        assert!(router.route(&RoutingKey::new("t", "x")).as_str().len() == "resourcelease.hash.000".len());
    }

    #[test]
    fn without_rules_everything_goes_to_the_default_namespace() {
        let router = ShardRouter::builder().build().expect("valid");
        assert_eq!(router.route(&RoutingKey::new("t", "x")).as_str(), DEFAULT_NAMESPACE);
        let custom = ShardRouter::builder().default_namespace("resourcelease.misc").build().expect("valid");
        assert_eq!(custom.route(&RoutingKey::new("t", "x")).as_str(), "resourcelease.misc");
    }

    #[test]
    fn invalid_rules_name_the_field() {
        let cases: Vec<(RouterConfig, &str)> = vec![
            (
                RouterConfig {
                    id_prefixes: vec![PrefixRule {
                        resource_type: None,
                        prefix: String::new(),
                        namespace: "resourcelease.a".into(),
                    }],
                    ..Default::default()
                },
                "id_prefixes[0].prefix",
            ),
            (
                RouterConfig {
                    id_prefixes: vec![PrefixRule {
                        resource_type: None,
                        prefix: "a".into(),
                        namespace: "billing".into(),
                    }],
                    ..Default::default()
                },
                "id_prefixes[0].namespace",
            ),
            (
                RouterConfig {
                    resource_types: [("user".to_string(), "resourcelease.Users".to_string())].into(),
                    ..Default::default()
                },
                "resource_types.user",
            ),
            (
                RouterConfig {
                    hash: Some(HashBuckets { base: "resourcelease".into(), buckets: 0 }),
                    ..Default::default()
                },
                "hash.buckets",
            ),
            (RouterConfig { default_namespace: Some("x".into()), ..Default::default() }, "default_namespace"),
        ];
        for (config, field) in cases {
            let err = ShardRouter::from_config(&config).expect_err(field);
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
    }

    #[test]
    fn config_parses_from_json_and_rejects_unknown_fields() {
        let json = r#"{
            "id_prefixes": [{ "resource_type": "table", "prefix": "billing/", "namespace": "resourcelease.billing" }],
            "resource_types": { "user": "resourcelease.users" },
            "hash": { "buckets": 4 }
        }"#;
        let config: RouterConfig = serde_json::from_str(json).expect("valid json");
        let router = ShardRouter::from_config(&config).expect("valid rules");
        assert_eq!(router.route(&RoutingKey::new("table", "billing/1")).as_str(), "resourcelease.billing");
        assert!(serde_json::from_str::<RouterConfig>(r#"{"hash_buckets": 4}"#).is_err());
    }

    #[test]
    fn routes_protobuf_payloads() {
        let router = ShardRouter::builder().resource_type("user", "resourcelease.users").build().expect("valid");
        let payload = pb::ItemPayload { resource_type: "user".into(), resource_id: "42".into(), ..Default::default() };
        assert_eq!(router.route(&RoutingKey::from(&payload)).as_str(), "resourcelease.users");
    }
}
