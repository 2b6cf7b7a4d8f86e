//! Nodes that share a log spread their namespaces by rendezvous hashing
//! over the live members, and hand them over when a node joins or leaves.
//! (Killed processes and the hub are in `tests/suite/mesh.rs`.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use omnirelay_client::node::membership::{MEMBER_PREFIX, rendezvous_owner};
use omnirelay_client::node::{Assignment, Node, NodeConfig};
use omnirelay_client::queue::{Caller, EnqueueRequest, Payload};
use omnirelay_client::replication::Replicator;
use omnirelay_client::{InMemoryReplicator, QueueConfig, ShardId};

const NAMESPACES: [&str; 6] =
    ["resourcelease.a", "resourcelease.b", "resourcelease.c", "resourcelease.d", "resourcelease.e", "resourcelease.f"];

/// Far above a handover (a membership poll, a snapshot, a release, a
/// rebuild); only reached when the mesh fails to converge.
const CONVERGE: Duration = Duration::from_secs(30);

fn node(id: &str, replicator: &Arc<InMemoryReplicator>) -> Node {
    let mut config = NodeConfig::new(id);
    config.queues = NAMESPACES.iter().map(|ns| QueueConfig::new(*ns, id)).collect();
    config.ownership.assignment = Assignment::Rendezvous;
    config.ownership.lease_ttl = Duration::from_secs(2);
    config.ownership.renew_every = Duration::from_millis(600);
    Node::builder(config).replicator(replicator.clone(), "in-memory").build().expect("valid node")
}

/// Which node serves each namespace: each namespace must be served by
/// exactly one of `nodes`; `None` until then.
fn serving(nodes: &[&Node]) -> Option<BTreeMap<String, String>> {
    let mut owners = BTreeMap::new();
    for ns in NAMESPACES {
        let shard = ShardId::new(ns);
        let servers: Vec<_> =
            nodes.iter().filter(|node| node.queue(&shard).expect("hosted").replication().fence.is_none()).collect();
        match servers.as_slice() {
            [one] => owners.insert(ns.to_string(), one.node_id().to_string()),
            [] => return None,
            many => panic!("{ns} is served by {} nodes at once", many.len()),
        };
    }
    Some(owners)
}

/// Waits until every namespace is served by the node rendezvous hashing
/// gives it among `nodes`, checking at every step that none is served twice.
async fn converge(nodes: &[&Node]) -> BTreeMap<String, String> {
    let ids: Vec<String> = nodes.iter().map(|node| node.node_id().to_string()).collect();
    let expected: BTreeMap<String, String> = NAMESPACES
        .iter()
        .map(|ns| (ns.to_string(), rendezvous_owner(ns, ids.iter().map(String::as_str)).expect("members").to_string()))
        .collect();
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        if let Some(owners) = serving(nodes)
            && owners == expected
        {
            return owners;
        }
        assert!(tokio::time::Instant::now() < deadline, "no convergence to {expected:?}; now {:?}", serving(nodes));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn enqueue(node: &Node, ns: &str, resource: &str) {
    let producer = Caller::new("spiffe://test/producer", "producer-1");
    node.queue(&ShardId::new(ns))
        .expect("hosted")
        .enqueue(&producer, EnqueueRequest::new(Payload::new("job", resource, "body")))
        .await
        .expect("the owner takes the enqueue");
}

fn by_id<'a>(nodes: &[&'a Node], id: &str) -> &'a Node {
    nodes.iter().find(|node| node.node_id().as_str() == id).expect("known node")
}

#[tokio::test]
async fn namespaces_spread_over_the_members_and_move_only_when_a_member_joins_or_leaves() {
    let log = Arc::new(InMemoryReplicator::new());
    let a = node("node-a", &log);
    let b = node("node-b", &log);
    let owners = converge(&[&a, &b]).await;
    // Every node knows its share, and only its share is ready.
    for member in [&a, &b] {
        let mine: Vec<_> = owners.iter().filter(|(_, owner)| *owner == member.node_id().as_str()).collect();
        assert_eq!(member.assigned().len(), mine.len());
    }
    // The member leases are on the log, one per node.
    let members = log.held_leases(MEMBER_PREFIX).await.expect("list");
    assert_eq!(members.iter().map(|lease| lease.owner.as_str()).collect::<Vec<_>>(), ["node-a", "node-b"]);

    // Work on every namespace, through its owner.
    for (ns, owner) in &owners {
        enqueue(by_id(&[&a, &b], owner), ns, "before-join").await;
    }

    // A third node joins: it takes only the namespaces it wins, each handed
    // over with its items.
    let c = node("node-c", &log);
    let joined = converge(&[&a, &b, &c]).await;
    for (ns, owner) in &joined {
        if owner != "node-c" {
            assert_eq!(&owners[ns], owner, "{ns} moved between members that stayed");
        }
        let server = by_id(&[&a, &b, &c], owner);
        assert_eq!(server.queue(&ShardId::new(ns)).expect("hosted").stats_now().pending, 1, "{ns} on {owner}");
    }
    assert!(joined.values().any(|owner| owner == "node-c"), "the newcomer won some namespace: {joined:?}");
    for (ns, owner) in &joined {
        enqueue(by_id(&[&a, &b, &c], owner), ns, "after-join").await;
    }

    // node-b leaves gracefully: its namespaces move to the others with
    // everything acknowledged on them.
    b.shutdown().await;
    let left = converge(&[&a, &c]).await;
    for (ns, owner) in &left {
        let server = by_id(&[&a, &c], owner);
        assert_eq!(server.queue(&ShardId::new(ns)).expect("hosted").stats_now().pending, 2, "{ns} on {owner}");
    }
    let members = log.held_leases(MEMBER_PREFIX).await.expect("list");
    assert_eq!(members.iter().map(|lease| lease.owner.as_str()).collect::<Vec<_>>(), ["node-a", "node-c"]);
    a.shutdown().await;
    c.shutdown().await;
}

#[test]
fn rendezvous_needs_a_node_id_that_fits_a_member_lease() {
    let mut config = NodeConfig::new("has space");
    config.queues = vec![QueueConfig::new("resourcelease.a", "has space")];
    config.ownership.assignment = Assignment::Rendezvous;
    let err = config.validate().expect_err("a node id with a space");
    assert_eq!(err.field, "node_id");
    config.ownership.assignment = Assignment::Every;
    config.validate().expect("any id without rendezvous");
}
