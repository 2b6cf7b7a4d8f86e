//! A whole hub replica (`Hub::open` + `serve_on`, what `run` does) and its
//! operational surface: readiness as PostgreSQL comes and goes, `/metrics`,
//! mutual TLS in front of the Hub service, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use omnirelay_hub::config::TlsFiles;
use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::proto::hub::v1::hub_client::HubClient;
use omnirelay_hub::{Config, Hub, telemetry};
use omnirelay_tests::{EVENTUALLY_TIMEOUT, PgCluster, PgOptions, eventually};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::pki::{Issued, Pki, uri};
use crate::support::{self, Appender};
use omnirelay_tests::http::http_get;

/// Health probe interval in these tests: short, so a stopped database shows
/// within a fraction of a second.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Bound on waiting for anything (a hang guard, not a performance claim).
const HANG_GUARD: Duration = Duration::from_secs(30);

/// A replica serving on ephemeral loopback ports; aborted on drop.
struct Replica {
    grpc: SocketAddr,
    admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Replica {
    async fn start(config: Config) -> Replica {
        let config = Config { health_interval: PROBE_INTERVAL, retention_interval: None, ..config };
        Replica::serve(Hub::open(config).await.expect("the hub should open")).await
    }

    /// Serves an opened hub on ephemeral loopback ports.
    async fn serve(hub: Hub) -> Replica {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let (grpc_address, admin_address) = (grpc.local_addr().expect("addr"), admin.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(hub.serve_on(grpc, admin, async move {
            let _ = stopped.await;
        }));
        Replica { grpc: grpc_address, admin: admin_address, stop: Some(stop), served: Some(served) }
    }

    /// Starts shutdown and waits (bounded) for the replica to finish.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = self.served.take().expect("served once");
        tokio::time::timeout(HANG_GUARD, served)
            .await
            .expect("shutdown should finish without waiting for the grace period")
            .expect("the hub task should not panic")
            .expect("the hub should stop cleanly");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(served) = self.served.take() {
            served.abort();
        }
    }
}

async fn plain_channel(addr: SocketAddr) -> Result<Channel, String> {
    Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())
}

async fn grpc_health(channel: Channel, service: &str) -> Result<i32, String> {
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.into() })
        .await
        .map(|response| response.into_inner().status)
        .map_err(|status| status.to_string())
}

/// Waits until `/readyz` answers `code` and the gRPC status of the Hub
/// service is `grpc` (1 SERVING, 2 NOT_SERVING); returns the `/readyz` body.
async fn wait_for(replica: &Replica, code: u16, grpc: i32) -> String {
    eventually(&format!("/readyz {code} and gRPC health {grpc}"), EVENTUALLY_TIMEOUT, || async {
        let (status, body) = http_get(replica.admin, "/readyz").await?;
        let health = grpc_health(plain_channel(replica.grpc).await?, "omnirelay.hub.v1.Hub").await?;
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

async fn one_event(client: &mut HubClient<Channel>, shard: &str, producer_seq: u64, epoch: u64) -> pb::AppendAck {
    let mut appender = Appender::open(client).await;
    support::ack(appender.append(support::batch(shard, "producer", producer_seq, epoch, &["item"])).await)
}

#[tokio::test]
async fn readiness_follows_postgres_stopping_and_starting_again() {
    let cluster = Arc::new(
        run_blocking(|| PgCluster::start(PgOptions::default()))
            .await
            .unwrap_or_else(|err| panic!("PostgreSQL unavailable: {err}")),
    );
    let url = cluster.url("postgres");
    omnirelay_hub::store::postgres::migrate(&url).await.expect("migrate");
    let replica = Replica::start(Config::for_postgres(&url).expect("valid URL")).await;
    assert_eq!(wait_for(&replica, 200, 1).await, "ready\n");

    let stop = cluster.clone();
    run_blocking(move || stop.stop()).await.expect("PostgreSQL should stop");
    let body = wait_for(&replica, 503, 2).await;
    assert!(body.starts_with("not ready: store unreachable"), "{body}");
    // Liveness does not depend on the database.
    assert_eq!(http_get(replica.admin, "/healthz").await, Ok((200, "ok\n".into())));

    let start = cluster.clone();
    run_blocking(move || start.start_again()).await.expect("PostgreSQL should start again");
    assert_eq!(wait_for(&replica, 200, 1).await, "ready\n");
    // The pool replaced its dead connections: appends work again.
    let mut client = support::client(replica.grpc).await;
    let epoch = support::acquire(&mut client, "ready.shard", "node", Duration::from_secs(60)).await;
    // The recorder is process-wide: other tests in this process count
    // too, so counters are compared before and after this test's append.
    let (_, before) = http_get(replica.admin, "/metrics").await.expect("/metrics should answer");
    assert_eq!(one_event(&mut client, "ready.shard", 1, epoch).await.first_sequence, 1);

    let (status, metrics) = http_get(replica.admin, "/metrics").await.expect("/metrics should answer");
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
        assert!(metrics.contains(&format!("# TYPE {name} ")), "{name} missing from /metrics:\n{metrics}");
    }
    // Gauges are process-wide as well: the pool size is the last opened
    // store's (another test's may be smaller) and `ready` the last judged
    // replica's, so they are checked for a value, not this replica's value
    // (its readiness is its /readyz, above).
    assert!(counter(&metrics, telemetry::DB_POOL_MAX) >= 1.0, "{metrics}");
    assert!(metrics.lines().any(|line| line.starts_with("omnirelay_hub_ready ")), "{metrics}");
    let appended = "omnirelay_hub_append_batches_total{outcome=\"appended\"}";
    assert!(counter(&metrics, appended) - counter(&before, appended) >= 1.0, "{metrics}");
    // Probes failed while PostgreSQL was down, and were counted.
    assert!(!metrics.contains("omnirelay_hub_db_errors_total{operation=\"probe\"} 0"), "{metrics}");
    replica.stop().await;
}

#[tokio::test]
async fn the_embedded_store_serves_and_records_metrics() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let replica = Replica::start(Config::for_sqlite(dir.path().join("hub.db"))).await;
    wait_for(&replica, 200, 1).await;
    let mut client = support::client(replica.grpc).await;
    // Counters are process-wide (other tests in this process count too):
    // compare before and after this test's calls.
    let (_, before) = http_get(replica.admin, "/metrics").await.expect("/metrics");
    let epoch = support::acquire(&mut client, "embedded.shard", "node", Duration::from_secs(60)).await;
    assert_eq!(one_event(&mut client, "embedded.shard", 1, epoch).await.last_sequence, 1);
    let (_, metrics) = http_get(replica.admin, "/metrics").await.expect("/metrics");
    for series in [
        "omnirelay_hub_append_batches_total{outcome=\"appended\"}",
        "omnirelay_hub_db_latency_seconds_count{operation=\"append\"}",
        "omnirelay_hub_append_latency_seconds_count",
        "omnirelay_hub_db_latency_seconds_count{operation=\"shard_lease\"}",
    ] {
        assert!(counter(&metrics, series) - counter(&before, series) >= 1.0, "{series}:\n{metrics}");
    }
    // A subscriber that caught up has no lag.
    let mut subscription = client
        .subscribe(pb::SubscribeRequest {
            subscriber_id: "sink".into(),
            shard_ids: vec!["embedded.shard".into()],
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    subscription.message().await.expect("a frame").expect("open");
    let metrics = eventually("the subscriber's lag series", EVENTUALLY_TIMEOUT, || async {
        let (_, metrics) = http_get(replica.admin, "/metrics").await?;
        let series = "omnirelay_hub_subscriber_lag_events{subscriber=\"sink\",shard=\"embedded.shard\"} 0";
        if metrics.contains(series) { Ok(metrics) } else { Err(metrics) }
    })
    .await;
    // Other tests' subscribers in this process count too.
    assert!(counter(&metrics, "omnirelay_hub_subscribers") >= 1.0, "{metrics}");
    replica.stop().await;
}

async fn tls_channel(addr: SocketAddr, ca_pem: &str, identity: Option<&Issued>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
    }
    Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .timeout(HANG_GUARD)
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn with_mutual_tls_the_hub_serves_certified_callers_only() {
    let pki = Pki::new("hub test ca");
    let server = pki.server();
    let dir = tempfile::tempdir().expect("temporary directory");
    let tls = TlsFiles {
        cert: pki.write("server.pem", &server.cert_pem),
        key: pki.write("server.key", &server.key_pem),
        client_ca: Some(pki.write("clients.pem", &pki.ca_pem())),
    };
    // Mutual TLS identifies callers, so the grants are enforced.
    let access = omnirelay_hub::access::Access::from_json(
        r#"{"grants": [{"principals": ["spiffe://test/sa/dispatcher"], "hub_roles": ["producer"], "shards": ["*"]}]}"#,
    )
    .expect("a valid access file");
    let replica =
        Replica::start(Config { tls: Some(tls), access, ..Config::for_sqlite(dir.path().join("hub.db")) }).await;

    let dispatcher = pki.issue("dispatcher", vec![uri("spiffe://test/sa/dispatcher")]);
    let channel = tls_channel(replica.grpc, &pki.ca_pem(), Some(&dispatcher)).await.expect("TLS connect");
    let ready = eventually("SERVING over mutual TLS", EVENTUALLY_TIMEOUT, || {
        let channel = channel.clone();
        async move {
            match grpc_health(channel, "").await? {
                1 => Ok(()),
                other => Err(format!("status {other}")),
            }
        }
    });
    ready.await;
    let mut client = HubClient::new(channel);
    let epoch = support::acquire(&mut client, "mtls.shard", "node", Duration::from_secs(60)).await;
    assert_eq!(one_event(&mut client, "mtls.shard", 1, epoch).await.first_sequence, 1);

    // A certificate from the CA whose principal has no grant is identified,
    // then denied, and changes nothing.
    let stranger = pki.issue("stranger", vec![uri("spiffe://test/sa/stranger")]);
    let channel = tls_channel(replica.grpc, &pki.ca_pem(), Some(&stranger)).await.expect("TLS connect");
    let denied = HubClient::new(channel)
        .renew_shard(pb::RenewShardRequest { shard_id: "mtls.shard".into(), owner: "node".into(), epoch, ttl: None })
        .await
        .expect_err("no grant, no renewal");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("spiffe://test/sa/stranger"), "{}", denied.message());

    let anonymous = tls_channel(replica.grpc, &pki.ca_pem(), None).await;
    let refused = match anonymous {
        Err(connect) => connect,
        Ok(channel) => HubClient::new(channel)
            .acquire_shard(pb::AcquireShardRequest { shard_id: "mtls.other".into(), owner: "x".into(), ttl: None })
            .await
            .expect_err("a caller without a certificate must be refused")
            .to_string(),
    };
    let (_, metrics) = http_get(replica.admin, "/metrics").await.expect("/metrics");
    assert!(
        !metrics.contains("omnirelay_hub_tls_handshake_failures_total{reason=\"handshake\"} 0"),
        "the refusal is counted ({refused}):\n{metrics}"
    );
    replica.stop().await;
}

#[tokio::test]
async fn shutdown_reports_not_serving_ends_subscriptions_and_releases_the_store() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hub.db");
    // A grace period far beyond the hang guard: if the streams did not end
    // by themselves, stopping would time out.
    let config = Config { shutdown_grace: Duration::from_secs(600), ..Config::for_sqlite(&path) };
    let replica = Replica::start(config).await;
    wait_for(&replica, 200, 1).await;

    let mut client = support::client(replica.grpc).await;
    let epoch = support::acquire(&mut client, "drain.shard", "node", Duration::from_secs(60)).await;
    one_event(&mut client, "drain.shard", 1, epoch).await;
    let mut subscription = client
        .subscribe(pb::SubscribeRequest {
            subscriber_id: "sink".into(),
            shard_ids: vec!["drain.shard".into()],
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let first = tokio::time::timeout(HANG_GUARD, subscription.message()).await.expect("a first frame");
    assert!(matches!(first, Ok(Some(_))), "{first:?}");
    let mut watch = HealthClient::new(plain_channel(replica.grpc).await.expect("connect"))
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(watch.message().await.expect("status").expect("open").status, 1);

    let stopping = tokio::spawn(replica.stop());
    let status = tokio::time::timeout(HANG_GUARD, watch.message()).await.expect("a status update");
    assert_eq!(status.expect("update").expect("open").status, 2, "NOT_SERVING once shutdown begins");
    let ended = loop {
        match tokio::time::timeout(HANG_GUARD, subscription.message()).await.expect("the subscription ends") {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    match ended {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(end) => assert!(end.is_none()),
    }
    stopping.await.expect("the replica stopped in time");

    // The store was closed: the file's lock is free for the next replica.
    let reopened = omnirelay_hub::store::sqlite::SqliteStore::open(&path).await.expect("the file is free");
    omnirelay_hub::store::LogStore::close(&reopened).await.expect("close");
}

#[tokio::test]
async fn readiness_names_the_migration_to_run_when_the_schema_falls_behind() {
    use omnirelay_hub::health::{NotReady, Probe};
    let (store, db) = support::fresh_store().await;
    store.check().await.expect("a migrated database is ready");
    // As if the database had been restored from a backup older than the
    // schema this build needs.
    db.client().await.batch_execute("DELETE FROM refinery_schema_history").await.expect("rewind the history");
    match store.check().await {
        Err(NotReady::Schema(message)) => assert!(message.contains("run `omnirelay-hub migrate`"), "{message}"),
        other => panic!("expected a schema refusal, got {other:?}"),
    }
    omnirelay_hub::store::LogStore::close(&store).await.expect("close");
}

/// The value of a series (a counter or a gauge) in a `/metrics` text, 0
/// when absent.
fn counter(metrics: &str, series: &str) -> f64 {
    metrics.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

#[tokio::test]
async fn a_full_disk_is_named_in_answers_readiness_and_metrics_and_heals_without_a_restart() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hub.db");
    let store = Arc::new(omnirelay_hub::store::sqlite::SqliteStore::open(&path).await.expect("open"));
    let config = Config { health_interval: PROBE_INTERVAL, retention_interval: None, ..Config::for_sqlite(&path) };
    let replica = Replica::serve(Hub::with_store(store.clone(), store.clone(), config)).await;
    wait_for(&replica, 200, 1).await;
    let mut client = support::client(replica.grpc).await;
    let shard = "full.shard";
    let epoch = support::acquire(&mut client, shard, "node", Duration::from_secs(600)).await;
    assert_eq!(one_event(&mut client, shard, 1, epoch).await.first_sequence, 1);

    // The "disk" fills up: the file may not grow any more.
    store.cap_pages(1).await.expect("cap the file at its size");
    let big: Vec<String> = (0..64).map(|i| format!("{i}-{}", "x".repeat(16 * 1024))).collect();
    let items: Vec<&str> = big.iter().map(String::as_str).collect();
    let mut appender = Appender::open(&mut client).await;
    let refused = support::rejection(appender.append(support::batch(shard, "producer", 2, epoch, &items)).await);
    assert_eq!(refused.code, pb::AppendErrorCode::Unavailable as i32, "{refused:?}");
    assert!(refused.message.contains("database or disk is full"), "the answer names the cause: {}", refused.message);
    let body = wait_for(&replica, 503, 2).await;
    assert!(body.contains("store cannot write: database or disk is full"), "{body}");
    let (_, metrics) = http_get(replica.admin, "/metrics").await.expect("/metrics");
    assert!(counter(&metrics, "omnirelay_hub_store_unavailable_total{fault=\"disk_full\"}") >= 1.0, "{metrics}");
    // The `ready` gauge is process-wide (another test's replica may have
    // set it since); this replica's readiness is its /readyz, above.

    // Space is freed: the same batch goes through, no restart, and the
    // replica is ready again.
    store.cap_pages(u64::from(u32::MAX)).await.expect("lift the cap");
    let written = support::ack(appender.append(support::batch(shard, "producer", 2, epoch, &items)).await);
    assert_eq!((written.first_sequence, written.duplicate), (2, false));
    assert_eq!(wait_for(&replica, 200, 1).await, "ready\n");
    replica.stop().await;
}

#[tokio::test]
async fn readiness_names_the_cause_postgresql_gave() {
    let db = support::migrated_db().await;
    let replica = Replica::start(Config::for_postgres(db.url()).expect("valid URL")).await;
    wait_for(&replica, 200, 1).await;
    // ALTER DATABASE cannot target the database it is connected to.
    let (base, _) = db.url().rsplit_once('/').expect("a URL with a database");
    let (admin, connection) =
        tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls).await.expect("connect as admin");
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false", db.name()))
        .await
        .expect("refuse new connections");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db.name()],
        )
        .await
        .expect("drop the hub's connections");
    // The first probes may meet a connection being terminated: PostgreSQL's
    // "terminating connection due to administrator command", or only the
    // closed connection when that message did not reach the client. The
    // next ones fail to connect, and /readyz carries PostgreSQL's own words.
    wait_for(&replica, 503, 2).await;
    eventually("/readyz names the refused connection in PostgreSQL's words", EVENTUALLY_TIMEOUT, || async {
        let (_, body) = http_get(replica.admin, "/readyz").await?;
        if body.contains("FATAL:") && body.contains("is not currently accepting connections") {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;
    admin
        .batch_execute(&format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true", db.name()))
        .await
        .expect("accept connections again");
    wait_for(&replica, 200, 1).await;
    replica.stop().await;
}

#[tokio::test]
async fn grpc_health_checks_judge_now_like_readyz() {
    let cluster = Arc::new(
        run_blocking(|| PgCluster::start(PgOptions::default()))
            .await
            .unwrap_or_else(|err| panic!("PostgreSQL unavailable: {err}")),
    );
    let url = cluster.url("postgres");
    omnirelay_hub::store::postgres::migrate(&url).await.expect("migrate");
    // The monitor alone would not notice anything for an hour.
    let config = Config {
        health_interval: Duration::from_secs(3600),
        retention_interval: None,
        ..Config::for_postgres(&url).expect("valid URL")
    };
    let replica = Replica::serve(Hub::open(config).await.expect("open")).await;
    let service = "omnirelay.hub.v1.Hub";
    let channel = plain_channel(replica.grpc).await.expect("connect");
    assert_eq!(grpc_health(channel.clone(), service).await, Ok(1), "SERVING after the first probe");

    let stop = cluster.clone();
    run_blocking(move || stop.stop()).await.expect("PostgreSQL should stop");
    // No /readyz call in between: Check itself judges the store now.
    assert_eq!(grpc_health(channel.clone(), service).await, Ok(2), "NOT_SERVING as soon as the store is gone");
    let start = cluster.clone();
    run_blocking(move || start.start_again()).await.expect("PostgreSQL should start again");
    eventually("gRPC health SERVING again", EVENTUALLY_TIMEOUT, || async {
        match grpc_health(channel.clone(), service).await? {
            1 => Ok(()),
            other => Err(format!("status {other}")),
        }
    })
    .await;
    replica.stop().await;
}
