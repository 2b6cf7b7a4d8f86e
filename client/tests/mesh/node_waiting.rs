//! Calls that wait: lease long-polls (woken by an enqueue, bounded by the
//! call's deadline, keeping the waiting worker alive in peer health) and
//! the per-namespace backpressure limiter in the middleware's slot.

use std::time::{Duration, Instant};

use omnirelay_client::middleware::Procedure;
use omnirelay_client::node::ConcurrencyLimits;
use omnirelay_client::peer_health::HealthConfig;
use omnirelay_client::{ErrorCode, PeerId, QueueConfig};
use serde_json::json;

use crate::node_support::{Auth, Client, Options, Outcome, Req, TestNode, Wire};

const N: &str = "resourcelease";
const U: &str = "resourcelease.users";

fn req(procedure: Procedure, body: serde_json::Value) -> Req {
    Req::from_json(procedure, &body)
}

#[tokio::test]
async fn a_long_poll_is_woken_by_an_enqueue_and_keeps_its_worker_alive() {
    let health = HealthConfig { heartbeat_grace: Duration::from_millis(300), ..HealthConfig::default() };
    let node = TestNode::start(Options { health, ..Options::default() }).await;
    let worker = Auth::bearer(node.token("worker-1", &["worker"]));
    let producer = Auth::bearer(node.token("producer", &["producer"]));
    for wire in [Wire::Grpc, Wire::Http] {
        let waiting = {
            let (addr, worker) = (node.addr, worker.clone());
            tokio::spawn(async move {
                let lease = req(Procedure::Lease, json!({"namespace": N, "owner": "poller", "wait": "5s"}));
                Client::new(addr).call(wire, &lease, &worker).await
            })
        };
        // The worker waits for longer than the grace period and stays
        // healthy, marked alive between slices of its wait.
        let peer = PeerId::from("worker-1#poller");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!waiting.is_finished(), "{wire:?}: the long-poll waits");
        assert!(node.node.tracker().is_eligible(&peer), "{wire:?}: a polling worker is alive");
        let enqueue =
            req(Procedure::Enqueue, json!({"namespace": N, "payload": {"resource_type": "t", "resource_id": "x"}}));
        assert!(matches!(Client::new(node.addr).call(Wire::Grpc, &enqueue, &producer).await, Outcome::Ok(_)));
        let leased = waiting.await.expect("joins");
        assert_eq!(leased.value()["item"]["payload"]["resource_id"], "x", "{wire:?}");
        let complete = req(Procedure::Complete, json!({"namespace": N, "handle": leased.value()["item"]["lease"]}));
        assert!(matches!(Client::new(node.addr).call(wire, &complete, &worker).await, Outcome::Ok(_)));
    }
    node.stop().await;
}

#[tokio::test]
async fn a_long_poll_answers_before_the_call_deadline() {
    let node = TestNode::start(Options::default()).await;
    let worker = Auth::bearer(node.token("worker-1", &["worker"]));
    for (wire, auth) in [
        (Wire::Grpc, worker.clone().header("grpc-timeout", "600m")),
        (Wire::Http, worker.clone().header("x-omnirelay-timeout-ms", "600")),
    ] {
        let started = Instant::now();
        let lease = req(Procedure::Lease, json!({"namespace": N, "owner": "a", "wait": "20s"}));
        let outcome = Client::new(node.addr).call(wire, &lease, &auth).await;
        // Empty, not DEADLINE_EXCEEDED: the wait ends early enough to answer.
        assert_eq!(outcome.value()["item"], serde_json::Value::Null, "{wire:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{wire:?}: {:?}", started.elapsed());
    }
    node.stop().await;
}

#[tokio::test]
async fn a_namespace_under_backpressure_holds_back_its_own_calls_only() {
    let mut users = QueueConfig::new(U, "test-node");
    users.capacity = 8;
    users.high_watermark = 2;
    users.low_watermark = 0;
    let options = Options {
        queues: vec![QueueConfig::new(N, "test-node"), users],
        concurrency_limits: ConcurrencyLimits { normal: 64, backpressure: 1 },
        ..Options::default()
    };
    let node = TestNode::start(options).await;
    let operator = Auth::bearer(node.token("operator", &["operator"]));
    let mut client = Client::new(node.addr);
    for id in ["1", "2"] {
        let enqueue =
            req(Procedure::Enqueue, json!({"namespace": U, "payload": {"resource_type": "t", "resource_id": id}}));
        assert!(matches!(client.call(Wire::Grpc, &enqueue, &operator).await, Outcome::Ok(_)));
    }
    let lease = req(Procedure::Lease, json!({"namespace": U, "owner": "w"}));
    assert!(matches!(client.call(Wire::Grpc, &lease, &operator).await, Outcome::Ok(_)));
    assert!(node.stats(U).await.backpressure.active);

    // A waiting drain holds the namespace's only permit under backpressure.
    let draining = {
        let (addr, operator) = (node.addr, operator.clone());
        tokio::spawn(async move {
            let drain =
                req(Procedure::Drain, json!({"namespace": U, "mode": "DRAIN_MODE_WAIT", "wait_timeout": "1.5s"}));
            Client::new(addr).call(Wire::Http, &drain, &operator).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for wire in [Wire::Grpc, Wire::Http] {
        // The node's own deadline header: tonic's client would enforce a
        // grpc-timeout itself and race the node's answer.
        let held = operator.clone().header("x-omnirelay-timeout-ms", "300");
        let stats = client.call(wire, &req(Procedure::Stats, json!({"namespace": U})), &held).await;
        assert_eq!(stats.code(), Some(ErrorCode::DeadlineExceeded), "{wire:?}: {stats:?}");
        let other = client.call(wire, &req(Procedure::Stats, json!({"namespace": N})), &held).await;
        assert!(matches!(other, Outcome::Ok(_)), "{wire:?}: another namespace is not held back: {other:?}");
    }
    let drained = draining.await.expect("joins");
    assert_eq!(drained.value()["snapshot"]["in_flight"].as_array().map(Vec::len), Some(1));
    let stats = client.call(Wire::Grpc, &req(Procedure::Stats, json!({"namespace": U})), &operator).await;
    assert!(matches!(stats, Outcome::Ok(_)), "the permit is free again: {stats:?}");
    node.stop().await;
}
