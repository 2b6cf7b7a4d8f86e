//! The serving lifecycle on its own (`shutdown::serve_grpc`): NOT_SERVING
//! first, then no new connections, and streams that do not end by
//! themselves cut once the grace period is over.

use std::sync::Arc;
use std::time::Duration;

use omnirelay_hub::health::{Health, Probe, ProbeFuture};
use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::shutdown::{GrpcServing, serve_grpc};
use omnirelay_hub::store::sqlite::SqliteStore;
use omnirelay_hub::{Config, Hub};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::support;

/// Bound on how long the test waits for anything (a hang guard, not a
/// performance assertion).
const HANG_GUARD: Duration = Duration::from_secs(30);

struct AlwaysReady;

impl Probe for AlwaysReady {
    fn check(&self) -> ProbeFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn shutdown_reports_not_serving_stops_accepting_and_cuts_streams_after_the_grace() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hub.db");
    let store = Arc::new(SqliteStore::open(&path).await.expect("open"));
    let hub = Hub::with_store(store, Arc::new(AlwaysReady), Config::for_sqlite(&path));
    let health = Arc::new(Health::new(Arc::new(AlwaysReady)).await);
    health.check().await.expect("ready");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Not the hub's own token: its streams are not told to end, as if they
    // ignored the drain, so only the grace period can end them.
    let draining = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let serving = GrpcServing {
        listener,
        tls: None,
        health: health.clone(),
        draining: draining.clone(),
        grace: Duration::from_millis(500),
    };
    let routes = tonic::service::Routes::new(hub.service());
    let server = tokio::spawn(serve_grpc(routes, serving, shutdown.clone().cancelled_owned()));

    let mut client = support::client(addr).await;
    support::acquire(&mut client, "cut.shard", "node", Duration::from_secs(60)).await;
    let mut subscription = client
        .subscribe(pb::SubscribeRequest {
            subscriber_id: "sink".into(),
            shard_ids: vec!["cut.shard".into()],
            progress_interval: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect()
        .await
        .expect("connect");
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(watch.message().await.expect("status").expect("open").status, 1, "SERVING before shutdown");

    shutdown.cancel();
    let next = tokio::time::timeout(HANG_GUARD, watch.message()).await.expect("the watcher hears of shutdown");
    assert_eq!(next.expect("update").expect("open").status, 2, "NOT_SERVING once shutdown begins");
    assert!(draining.is_cancelled(), "streams are told to drain");

    tokio::time::timeout(HANG_GUARD, server)
        .await
        .expect("serving should end after the grace period")
        .expect("the server task should not panic")
        .expect("serving should end cleanly");
    let end = tokio::time::timeout(HANG_GUARD, subscription.message()).await.expect("the stream should be cut");
    assert!(end.is_err(), "the subscription was cut, not ended normally: {end:?}");

    let refused = tokio::time::timeout(HANG_GUARD, tokio::net::TcpStream::connect(addr)).await.expect("no hang");
    assert!(refused.is_err(), "the listening socket should be closed");
    hub.close().await;
}
