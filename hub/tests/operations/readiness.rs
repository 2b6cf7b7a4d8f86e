//! Readiness against a real PostgreSQL: `/readyz` and the gRPC health status
//! follow the database going away and coming back; `/metrics` exposes the
//! catalog and the pool gauges.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use omnirelay_hub::config::{DatabaseTls, DatabaseUrl, PostgresConfig};
use omnirelay_hub::database::{PoolProbe, connect_pool};
use omnirelay_hub::health::Health;
use omnirelay_hub::shutdown::{GrpcServing, serve_grpc};
use omnirelay_hub::telemetry;
use omnirelay_tests::{EVENTUALLY_TIMEOUT, PgCluster, PgOptions, eventually};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::http;

/// Health probe interval in these tests: short, so a stopped database shows
/// within a fraction of a second.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// A hub's operational surface on a real database: gRPC (health only) and
/// admin HTTP, stopped on drop.
struct Replica {
    grpc: SocketAddr,
    admin: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn replica(database_url: &str) -> Replica {
    let url = DatabaseUrl::parse(database_url).expect("harness URLs are valid");
    let pool = connect_pool(&PostgresConfig { url, tls: DatabaseTls::Disable, pool_size: 4, committers: 1 })
        .await
        .expect("pool");
    let health = Arc::new(Health::new(Arc::new(PoolProbe::new(pool))).await);
    let stop = CancellationToken::new();
    let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let (grpc, admin) = (grpc_listener.local_addr().expect("addr"), admin_listener.local_addr().expect("addr"));
    let serving = GrpcServing {
        listener: grpc_listener,
        tls: None,
        health: health.clone(),
        draining: CancellationToken::new(),
        grace: Duration::from_secs(1),
    };
    let tasks = vec![
        tokio::spawn({
            let stop = stop.clone();
            async move {
                serve_grpc(tonic::service::Routes::default(), serving, stop.cancelled_owned())
                    .await
                    .expect("gRPC serving should not fail");
            }
        }),
        tokio::spawn({
            let (health, stop) = (health.clone(), stop.clone());
            async move {
                omnirelay_hub::admin::serve(admin_listener, health, telemetry::prometheus(), stop)
                    .await
                    .expect("admin serving should not fail");
            }
        }),
        tokio::spawn({
            let (health, stop) = (health.clone(), stop.clone());
            async move { health.monitor(PROBE_INTERVAL, stop).await }
        }),
    ];
    Replica { grpc, admin, stop, tasks }
}

async fn grpc_status(addr: SocketAddr) -> Result<i32, String> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .map_err(|err| err.to_string())?
        .connect()
        .await
        .map_err(|err| err.to_string())?;
    let mut client = HealthClient::new(channel);
    client
        .check(HealthCheckRequest { service: "omnirelay.hub.v1.Hub".into() })
        .await
        .map(|response| response.into_inner().status)
        .map_err(|status| status.to_string())
}

/// Waits until `/readyz` answers `code` and the gRPC status is `grpc`
/// (1 SERVING, 2 NOT_SERVING); returns the `/readyz` body.
async fn wait_for(replica: &Replica, code: u16, grpc: i32) -> String {
    eventually(&format!("/readyz {code} and gRPC health {grpc}"), EVENTUALLY_TIMEOUT, || async {
        let (status, body) = http::get(replica.admin, "/readyz").await?;
        let health = grpc_status(replica.grpc).await?;
        if status == code && health == grpc {
            Ok(body)
        } else {
            Err(format!("/readyz {status} {body:?}, gRPC {health}"))
        }
    })
    .await
}

async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking harness call should not panic")
}

#[tokio::test]
async fn readiness_follows_postgres_stopping_and_starting_again() {
    let cluster = Arc::new(
        run_blocking(|| PgCluster::start(PgOptions::default()))
            .await
            .unwrap_or_else(|err| panic!("PostgreSQL unavailable: {err}")),
    );
    let replica = replica(&cluster.url("postgres")).await;
    wait_for(&replica, 200, 1).await;
    // Liveness does not depend on the database.
    assert_eq!(http::get(replica.admin, "/healthz").await, Ok((200, "ok\n".into())));

    run_blocking({
        let cluster = cluster.clone();
        move || cluster.stop()
    })
    .await
    .expect("PostgreSQL should stop");
    let body = wait_for(&replica, 503, 2).await;
    assert!(body.starts_with("not ready: store unreachable"), "{body}");
    assert_eq!(http::get(replica.admin, "/healthz").await, Ok((200, "ok\n".into())));

    run_blocking({
        let cluster = cluster.clone();
        move || cluster.start_again()
    })
    .await
    .expect("PostgreSQL should start again");
    assert_eq!(wait_for(&replica, 200, 1).await, "ready\n");
}

#[tokio::test]
async fn metrics_endpoint_exposes_the_catalog_and_the_pool() {
    let cluster = run_blocking(|| PgCluster::start(PgOptions::default()))
        .await
        .unwrap_or_else(|err| panic!("PostgreSQL unavailable: {err}"));
    let replica = replica(&cluster.url("postgres")).await;
    wait_for(&replica, 200, 1).await;
    let (status, body) = http::get(replica.admin, "/metrics").await.expect("/metrics should answer");
    assert_eq!(status, 200);
    for name in [
        telemetry::APPEND_BATCHES,
        telemetry::APPEND_EVENTS,
        telemetry::APPEND_LATENCY,
        telemetry::GROUP_BATCHES,
        telemetry::GROUP_EVENTS,
        telemetry::GROUP_SECONDS,
        telemetry::DB_READS,
        telemetry::EVENTS_DELIVERED,
        telemetry::SUBSCRIBERS,
        telemetry::DB_LATENCY,
        telemetry::DB_ERRORS,
        telemetry::DB_POOL_CONNECTIONS,
        telemetry::DB_POOL_AVAILABLE,
        telemetry::DB_POOL_WAITING,
        telemetry::DB_POOL_MAX,
        telemetry::READY,
        telemetry::TLS_HANDSHAKE_FAILURES,
    ] {
        assert!(body.contains(&format!("# TYPE {name} ")), "{name} missing from /metrics:\n{body}");
    }
    assert!(body.contains("omnirelay_hub_db_pool_max_connections 4"), "{body}");
    assert!(body.contains("omnirelay_hub_ready 1"), "{body}");
    // The readiness probes above were timed.
    assert!(body.contains("omnirelay_hub_db_latency_seconds_count{operation=\"probe\"}"), "{body}");
}
