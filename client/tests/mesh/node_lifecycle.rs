//! The node owns one sweeper per queue: lapsed leases are expired without
//! any call (and counted against their owner), and the sweepers stop with
//! the node.

use std::time::Duration;

use omnirelay_client::middleware::Procedure;
use omnirelay_client::{ErrorCode, PeerId};
use omnirelay_tests::eventually;
use serde_json::json;

use crate::node_support::{Auth, Client, Options, Outcome, Req, TestNode, Wire};

const N: &str = "resourcelease";

#[tokio::test]
async fn sweepers_expire_lapsed_leases_until_the_node_stops() {
    let node = TestNode::start(Options { sweep_interval: Duration::from_millis(20), ..Options::default() }).await;
    let operator = Auth::bearer(node.token("operator", &["operator"]));
    let mut client = Client::new(node.addr);
    let call = |procedure, body| Req::from_json(procedure, &body);
    for id in ["1", "2"] {
        let enqueue =
            call(Procedure::Enqueue, json!({"namespace": N, "payload": {"resource_type": "t", "resource_id": id}}));
        assert!(matches!(client.call(Wire::Http, &enqueue, &operator).await, Outcome::Ok(_)));
    }
    let lease = call(Procedure::Lease, json!({"namespace": N, "owner": "a", "lease_duration": "1s"}));
    assert!(matches!(client.call(Wire::Grpc, &lease, &operator).await, Outcome::Ok(_)));
    node.clock.advance(Duration::from_secs(2));
    // No call touches the queue: only the sweeper can expire the lease.
    eventually("the sweeper expires the lapsed lease", Duration::from_secs(10), || async {
        let stats = node.stats(N).await;
        if stats.active == 0 && stats.pending == 2 { Ok(()) } else { Err(format!("{stats:?}")) }
    })
    .await;
    let health = node.node.tracker().snapshot();
    let peer = health.peer(&PeerId::from("operator#a")).expect("the owner is known");
    assert_eq!(peer.lease_expiries, 1, "the expiry counts against its owner");

    assert!(matches!(client.call(Wire::Grpc, &lease, &operator).await, Outcome::Ok(_)));
    node.node.shutdown().await;
    assert!(
        matches!(client.call(Wire::Grpc, &lease, &operator).await, Outcome::Err { code: ErrorCode::Unavailable, .. }),
        "a stopped node released its shards and serves none"
    );
    node.clock.advance(Duration::from_secs(2));
    // A negative check needs a wait: ten sweep intervals without an expiry.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(node.stats(N).await.active, 1, "the sweepers stopped with the node");
    node.stop().await;
}
