//! Graceful shutdown: NOT_SERVING first, then no new connections, open
//! streams cut after the grace period.

use std::sync::Arc;
use std::time::Duration;

use omnirelay_hub::health::{Health, Probe, ProbeFuture};
use omnirelay_hub::shutdown::{GrpcServing, serve_grpc};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

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
async fn shutdown_reports_not_serving_then_stops_accepting_and_cuts_streams_after_the_grace() {
    let health = Arc::new(Health::new(Arc::new(AlwaysReady)).await);
    health.check().await.expect("ready");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let draining = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let serving = GrpcServing {
        listener,
        tls: None,
        health: health.clone(),
        draining: draining.clone(),
        grace: Duration::from_millis(500),
    };
    let server =
        tokio::spawn(serve_grpc(tonic::service::Routes::default(), serving, shutdown.clone().cancelled_owned()));

    // A client watching the health status holds a stream open, as a
    // subscriber would.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect()
        .await
        .expect("connect");
    let mut client = HealthClient::new(channel);
    let mut watch =
        client.watch(HealthCheckRequest { service: String::new() }).await.expect("watch should start").into_inner();
    let first = watch.message().await.expect("first status").expect("stream open");
    assert_eq!(first.status, 1, "SERVING before shutdown");

    shutdown.cancel();
    let next = tokio::time::timeout(HANG_GUARD, watch.message())
        .await
        .expect("the watcher should hear about shutdown")
        .expect("status update")
        .expect("stream still open");
    assert_eq!(next.status, 2, "NOT_SERVING once shutdown begins");
    assert!(draining.is_cancelled(), "streams are told to drain");

    // The watch stream never ends by itself: the grace period bounds it.
    tokio::time::timeout(HANG_GUARD, server)
        .await
        .expect("serving should end after the grace period")
        .expect("the server task should not panic")
        .expect("serving should end cleanly");
    let end = tokio::time::timeout(HANG_GUARD, watch.message()).await.expect("the stream should be cut");
    assert!(!matches!(end, Ok(Some(_))), "no more statuses after the server stopped: {end:?}");

    let refused = tokio::time::timeout(HANG_GUARD, tokio::net::TcpStream::connect(addr)).await.expect("no hang");
    assert!(refused.is_err(), "the listening socket should be closed");
}
