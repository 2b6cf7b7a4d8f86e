//! The diagnostics endpoints of a real node: backpressure (latest and
//! streamed), replication, probes and metrics, outside the RPC stack.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use omnirelay_client::middleware::Procedure;
use omnirelay_client::node::{BACKPRESSURE_PATH, BACKPRESSURE_STREAM_PATH, REPLICATION_PATH};
use serde_json::json;

use crate::node_support::{Auth, Client, Options, Outcome, Req, TestNode, Wire, get, get_json};

const U: &str = "resourcelease.users";

async fn enqueue(client: &mut Client, auth: &Auth, id: &str) -> Outcome {
    let request = Req::from_json(
        Procedure::Enqueue,
        &json!({"namespace": U, "payload": {"resource_type": "t", "resource_id": id}}),
    );
    client.call(Wire::Http, &request, auth).await
}

#[tokio::test]
async fn diagnostics_report_backpressure_replication_probes_and_metrics() {
    let node = TestNode::start(Options { metrics: true, ..Options::default() }).await;
    let producer = Auth::bearer(node.token("producer", &["producer"]));
    let mut client = Client::new(node.addr);

    assert_eq!(get(node.addr, "/healthz").await.0, http::StatusCode::OK);
    assert_eq!(get(node.addr, "/readyz").await.0, http::StatusCode::OK);
    let quiet = get_json(node.addr, BACKPRESSURE_PATH).await;
    assert_eq!(quiet["namespaces"][U]["current"]["active"], false);
    assert_eq!(quiet["namespaces"][U]["latest_transition"], serde_json::Value::Null);
    let (status, _) = get(node.addr, &format!("{BACKPRESSURE_STREAM_PATH}?namespace=resourcelease.nope")).await;
    assert_eq!(status, http::StatusCode::NOT_FOUND);

    // Follow the transitions of one namespace while it crosses its high
    // watermark (2).
    let stream = tokio::net::TcpStream::connect(node.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(connection);
    let request = http::Request::get(format!("{BACKPRESSURE_STREAM_PATH}?namespace={U}"))
        .header(http::header::HOST, node.addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("stream response");
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.headers()[http::header::CONTENT_TYPE], "text/event-stream");
    let mut body = response.into_body();
    for id in ["1", "2"] {
        assert!(matches!(enqueue(&mut client, &producer, id).await, Outcome::Ok(_)));
    }
    let mut text = String::new();
    while !text.contains("\n\n") {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a transition within 10 s")
            .expect("the stream is open")
            .expect("a frame");
        if let Some(data) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(data));
        }
    }
    assert!(text.starts_with("event: backpressure\n"), "{text}");
    let data = text.lines().find_map(|line| line.strip_prefix("data: ")).expect("a data line");
    let signal: serde_json::Value = serde_json::from_str(data).expect("the signal is JSON");
    assert_eq!(
        (signal["active"].clone(), signal["namespace"].clone(), signal["pending"].clone()),
        (json!(true), json!(U), json!(2))
    );

    let latest = get_json(node.addr, BACKPRESSURE_PATH).await;
    assert_eq!(latest["namespaces"][U]["latest_transition"]["active"], true);
    assert_eq!(latest["namespaces"][U]["current"]["pending"], 2);
    assert_eq!(latest["namespaces"]["resourcelease"]["current"]["active"], false);

    let replication = get_json(node.addr, REPLICATION_PATH).await;
    let users = &replication["namespaces"][U];
    assert_eq!(users["replicator"], "in-memory");
    // Two Enqueued events and one BackpressureChanged.
    assert_eq!(users["last_sequence"], 3);
    assert_eq!(users["durable_sequence"], 3);
    assert_eq!(users["lag_events"], 0);
    assert_eq!(users["status"], "serving");
    assert_eq!(users["epoch"], 1, "the node took the shard's lease once");
    assert_eq!(replication["namespaces"]["resourcelease"]["last_sequence"], 0);

    let (status, metrics) = get(node.addr, "/metrics").await;
    assert_eq!(status, http::StatusCode::OK);
    assert!(metrics.contains(&format!("omnirelay_resourcelease_pending{{shard=\"{U}\"}} 2")), "{metrics}");
    assert!(
        metrics.contains(&format!("omnirelay_resourcelease_backpressure_transitions_total{{shard=\"{U}\"}} 1")),
        "{metrics}"
    );
    for gauge in
        ["omnirelay_peer_lease_healthy", "omnirelay_peer_lease_unhealthy", "omnirelay_peer_lease_pending_reassignments"]
    {
        assert!(metrics.lines().any(|line| line.starts_with(gauge)), "{gauge} missing from {metrics}");
    }

    // Stopping the node: /readyz turns 503 and open event streams end, so
    // they do not hold a graceful shutdown up.
    node.node.shutdown().await;
    assert_eq!(get(node.addr, "/readyz").await.0, http::StatusCode::SERVICE_UNAVAILABLE);
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(frame) = body.frame().await {
            frame.expect("frame");
        }
    })
    .await;
    assert!(end.is_ok(), "the event stream ends when the node stops");
    node.stop().await;
}
