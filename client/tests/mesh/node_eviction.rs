//! Peer eviction through a real node: workers lease and heartbeat over
//! gRPC and HTTP/JSON, one goes silent, the diagnostics and the choosers
//! see it, and fresh heartbeats bring it back through probation.
//!
//! Runs on real time with a 600 ms grace period (peer health reads tokio's
//! clock, and the calls cross real sockets), so it takes about two seconds.

use std::time::Duration;

use omnirelay_client::PeerId;
use omnirelay_client::chooser::{FewestPendingChooser, PeerChooser, PowerOfTwoChooser, RoundRobinChooser};
use omnirelay_client::middleware::Procedure;
use omnirelay_client::node::LEASE_HEALTH_PATH;
use omnirelay_client::peer_health::HealthConfig;
use omnirelay_tests::eventually;
use serde_json::{Value, json};

use crate::node_support::{Auth, Client, Options, Outcome, Req, TestNode, Wire, get, get_json};

const N: &str = "resourcelease";

fn peer_state(health: &Value, peer: &str) -> Option<(String, bool)> {
    health["peers"]
        .as_array()?
        .iter()
        .find(|p| p["peer_id"] == peer)
        .map(|p| (p["state"].as_str().unwrap_or_default().to_string(), p["is_healthy"].as_bool().unwrap_or_default()))
}

async fn heartbeat(client: &mut Client, wire: Wire, auth: &Auth, handle: &Value) {
    let request = Req::from_json(Procedure::Heartbeat, &json!({"namespace": N, "handle": handle}));
    let outcome = client.call(wire, &request, auth).await;
    assert!(matches!(outcome, Outcome::Ok(_)), "heartbeat: {outcome:?}");
}

#[tokio::test]
async fn a_silent_worker_is_evicted_and_returns_through_probation() {
    let health = HealthConfig {
        heartbeat_grace: Duration::from_millis(600),
        probation_period: Duration::from_millis(600),
        ..HealthConfig::default()
    };
    let node = TestNode::start(Options { health, metrics: true, ..Options::default() }).await;
    let producer = Auth::bearer(node.token("producer", &["producer"]));
    let worker = Auth::bearer(node.token("worker-1", &["worker"]));
    let mut client = Client::new(node.addr);
    for id in ["1", "2", "3"] {
        let enqueue = Req::from_json(
            Procedure::Enqueue,
            &json!({"namespace": N, "payload": {"resource_type": "t", "resource_id": id}}),
        );
        assert!(matches!(client.call(Wire::Grpc, &enqueue, &producer).await, Outcome::Ok(_)));
    }
    // Three workers of one principal, on both transports.
    let workers = [("w1", Wire::Grpc), ("w2", Wire::Http), ("w3", Wire::Http)];
    let mut handles = Vec::new();
    for (owner, wire) in workers {
        let lease = Req::from_json(Procedure::Lease, &json!({"namespace": N, "owner": owner}));
        let outcome = client.call(wire, &lease, &worker).await;
        handles.push(outcome.value()["item"]["lease"].clone());
    }
    let silent = PeerId::from("worker-1#w3");
    let peers: Vec<PeerId> = ["worker-1#w1", "worker-1#w2", "worker-1#w3"].into_iter().map(PeerId::from).collect();
    assert!(peers.iter().all(|p| node.node.tracker().is_eligible(p)), "every worker starts eligible");

    // w1 and w2 keep heartbeating; w3 falls silent.
    let beating = {
        let (addr, worker, handles) = (node.addr, worker.clone(), handles.clone());
        tokio::spawn(async move {
            let mut client = Client::new(addr);
            loop {
                heartbeat(&mut client, Wire::Grpc, &worker, &handles[0]).await;
                heartbeat(&mut client, Wire::Http, &worker, &handles[1]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let health = eventually("the silent worker shows as unhealthy", Duration::from_secs(10), || async {
        let health = get_json(node.addr, LEASE_HEALTH_PATH).await;
        match peer_state(&health, silent.as_str()) {
            Some((state, false)) if state == "suspect" => Ok(health),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(health["summary"]["unhealthy"], 1);
    assert_eq!(health["summary"]["eligible"], 2);
    assert_eq!(health["summary"]["pending_reassignments"], 1, "the silent worker still holds a lease");
    assert_eq!(peer_state(&health, "worker-1#w1"), Some(("healthy".into(), true)));
    let (_, metrics) = get(node.addr, "/metrics").await;
    assert!(metrics.contains("omnirelay_peer_lease_unhealthy 1"), "{metrics}");
    assert!(metrics.contains("omnirelay_peer_lease_healthy 2"), "{metrics}");
    assert!(metrics.contains("omnirelay_peer_lease_pending_reassignments 1"), "{metrics}");

    let tracker = node.node.tracker().clone();
    let choosers: [Box<dyn PeerChooser>; 3] = [
        Box::new(RoundRobinChooser::new(tracker.clone())),
        Box::new(FewestPendingChooser::new(tracker.clone())),
        Box::new(PowerOfTwoChooser::with_seed(tracker.clone(), 7)),
    ];
    for chooser in &choosers {
        for _ in 0..30 {
            let picked = chooser.choose_from(&peers).expect("two peers are eligible");
            assert_ne!(picked, silent, "{chooser:?} picked the silent worker");
        }
    }

    // Fresh heartbeats: probation first (eligible, at a reduced weight),
    // then healthy once the probation period has passed.
    heartbeat(&mut client, Wire::Http, &worker, &handles[2]).await;
    let health = get_json(node.addr, LEASE_HEALTH_PATH).await;
    assert_eq!(peer_state(&health, silent.as_str()), Some(("probation".into(), true)));
    let weight = health["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["peer_id"] == silent.as_str()))
        .and_then(|p| p["weight"].as_f64())
        .expect("weight");
    assert!(weight < 1.0, "slow start: {weight}");
    assert!(choosers.iter().all(|c| c.choose_from(std::slice::from_ref(&silent)).is_ok()), "eligible again");
    eventually("the returning worker becomes healthy", Duration::from_secs(10), || async {
        heartbeat(&mut Client::new(node.addr), Wire::Grpc, &worker, &handles[2]).await;
        let health = get_json(node.addr, LEASE_HEALTH_PATH).await;
        match peer_state(&health, silent.as_str()) {
            Some((state, true)) if state == "healthy" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    beating.abort();
    node.stop().await;
}
