//! One shard-name grammar: the hub creates exactly the shards whose names
//! the nodes accept (the nodes' own policy, a `resourcelease` first segment,
//! on top), both through `omnirelay_proto::names`.

use omnirelay_client::shard::parse_namespace;
use omnirelay_hub::ids::ShardId;
use omnirelay_proto::names::{MAX_SHARD_NAME_BYTES, check_shard_name};
use proptest::prelude::*;

/// Would the hub create a shard of this name (`AcquireShard` of a new one)?
fn hub_creates(name: &str) -> bool {
    ShardId::parse(name).is_ok_and(|id| id.check_new().is_ok())
}

/// Would a node serve a queue of this namespace?
fn node_accepts(name: &str) -> bool {
    parse_namespace("namespace", name).is_ok()
}

/// Names near the grammar's edges: mostly legal characters, some illegal
/// ones, dots in odd places, lengths around the limits.
fn names() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_.-]{1,140}",
        "[a-zA-Z0-9_. *;,-]{1,40}",
        "resourcelease(\\.[a-z0-9_-]{0,70}){0,3}",
        "resourcelease(\\.[a-zA-Z0-9_ ./*-]{1,20}){1,3}",
        "[\\PC]{1,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_048))]

    #[test]
    fn the_hub_and_the_nodes_accept_and_refuse_the_same_names(name in names()) {
        let shared = check_shard_name(&name).is_ok();
        prop_assert_eq!(hub_creates(&name), shared, "hub vs grammar: {:?}", name);
        let resourcelease = name.split('.').next() == Some("resourcelease");
        prop_assert_eq!(node_accepts(&name), shared && resourcelease, "node vs grammar: {:?}", name);
        if resourcelease {
            prop_assert_eq!(node_accepts(&name), hub_creates(&name), "node vs hub: {:?}", name);
        }
        if shared {
            prop_assert!(name.len() <= MAX_SHARD_NAME_BYTES);
        }
    }
}

#[test]
fn names_the_old_hub_grammar_took_are_still_shard_ids_but_not_new_shards() {
    // Printable ASCII up to 200 bytes was the hub's grammar: such shards
    // exist and are still read, renewed and appended to; only creating a new
    // one needs the shared grammar.
    for old in ["Resourcelease.Users", "tenant:42/jobs", &"x".repeat(200)] {
        let id = ShardId::parse(old).expect("the old grammar still parses");
        assert!(id.check_new().is_err(), "{old}");
        assert!(!node_accepts(old), "{old}");
    }
    assert!(ShardId::parse("x".repeat(201)).is_err());
}
