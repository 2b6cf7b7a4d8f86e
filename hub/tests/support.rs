//! Shared setup: migrated databases, stores, in-process hub replicas and
//! clients.

use omnirelay_hub::proto::raw::RawEvent;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::proto::hub::v1::hub_client::HubClient;
use omnirelay_hub::proto::replication::v1 as rpb;
use omnirelay_hub::store::postgres::{PgStore, PgStoreConfig};
use omnirelay_hub::telemetry::HubCounters;
use omnirelay_hub::{Config, Hub};
use omnirelay_tests::TestDb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// A fresh database with the hub schema, copied from a template migrated
/// once per server (keyed by the migrations' fingerprint).
pub(crate) async fn migrated_db() -> TestDb {
    let key = format!("hub_{}", omnirelay_hub::schema::fingerprint());
    TestDb::from_template(&key, |url| async move {
        omnirelay_hub::store::postgres::migrate(&url).await?;
        Ok(())
    })
    .await
}

/// A store on `db`.
pub(crate) async fn store(db: &TestDb) -> PgStore {
    PgStore::open(PgStoreConfig::new(db.url())).await.expect("the store should open on a migrated database")
}

/// A fresh store and the database it lives in.
pub(crate) async fn fresh_store() -> (PgStore, TestDb) {
    let db = migrated_db().await;
    (store(&db).await, db)
}

/// A fresh embedded SQLite store and the directory its file lives in.
pub(crate) async fn fresh_sqlite_store() -> (omnirelay_hub::store::sqlite::SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = omnirelay_hub::store::sqlite::SqliteStore::open(dir.path().join("hub.db"))
        .await
        .expect("the SQLite store should open in an empty directory");
    (store, dir)
}

/// An in-process hub replica on 127.0.0.1:0.
pub(crate) struct TestHub {
    pub(crate) address: SocketAddr,
    pub(crate) counters: Arc<HubCounters>,
    pub(crate) memory: omnirelay_hub::SubscriptionMemory,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestHub {
    /// Starts a replica on the database at `url`, retention off (tests run
    /// it explicitly).
    pub(crate) async fn start(url: &str) -> TestHub {
        let config = Config { retention_interval: None, ..Config::for_postgres(url).expect("harness URLs are valid") };
        TestHub::start_with(config).await
    }

    /// Starts a replica with `config` (its listen addresses are ignored).
    pub(crate) async fn start_with(config: Config) -> TestHub {
        let hub = Hub::open(config).await.expect("the hub should open");
        let counters = hub.counters();
        let memory = hub.subscription_memory();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let address = listener.local_addr().expect("bound address");
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(hub.serve(listener, async move {
            let _ = stopped.await;
        }));
        TestHub { address, counters, memory, stop: Some(stop), served: Some(served) }
    }

    /// A client of this replica.
    pub(crate) async fn client(&self) -> HubClient<Channel> {
        client(self.address).await
    }

    /// Shuts the replica down gracefully and waits for it.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(30), served)
                .await
                .expect("the hub should shut down within 30 s")
                .expect("the hub task should not panic")
                .expect("the hub should shut down cleanly");
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(served) = self.served.take() {
            served.abort();
        }
    }
}

/// A client of the hub at `address`, with the message limit raised to the
/// hub's (snapshots) and HTTP/2 keepalive on.
pub(crate) async fn client(address: SocketAddr) -> HubClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("a valid endpoint")
        .http2_keep_alive_interval(Duration::from_millis(500))
        .keep_alive_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect to the hub");
    HubClient::new(channel)
        .max_decoding_message_size(omnirelay_hub::defaults::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(omnirelay_hub::defaults::MAX_MESSAGE_BYTES)
}

/// A queue event whose item id is `item` (distinct bodies per item).
pub(crate) fn event(item: &str) -> rpb::ReplicationEvent {
    rpb::ReplicationEvent {
        principal: "spiffe://omnirelay/test".into(),
        peer_id: "node-test".into(),
        recorded_at: Some(omnirelay_hub::wire::to_timestamp(SystemTime::now())),
        event: Some(rpb::replication_event::Event::Completed(rpb::Completed {
            item_id: item.to_string(),
            fencing_token: 1,
        })),
        ..Default::default()
    }
}

/// The item id carried by an event built by [`event`].
pub(crate) fn item_of(event: &rpb::ReplicationEvent) -> String {
    match &event.event {
        Some(rpb::replication_event::Event::Completed(completed)) => completed.item_id.clone(),
        other => panic!("unexpected event {other:?}"),
    }
}

/// Acquires `shard` for `owner` and returns the epoch.
pub(crate) async fn acquire(client: &mut HubClient<Channel>, shard: &str, owner: &str, ttl: Duration) -> u64 {
    let response = client
        .acquire_shard(pb::AcquireShardRequest {
            shard_id: shard.into(),
            owner: owner.into(),
            ttl: Some(ttl.try_into().expect("a valid duration")),
        })
        .await
        .expect("acquire should succeed")
        .into_inner();
    assert!(response.granted, "{owner} should be granted {shard}");
    response.lease.expect("a lease").epoch
}

/// An open append stream.
pub(crate) struct Appender {
    requests: mpsc::Sender<pb::AppendRequest>,
    responses: tonic::Streaming<pb::AppendResponse>,
}

impl Appender {
    /// Opens an append stream.
    pub(crate) async fn open(client: &mut HubClient<Channel>) -> Appender {
        let (requests, outbound) = mpsc::channel(1024);
        let responses =
            client.append(ReceiverStream::new(outbound)).await.expect("open the append stream").into_inner();
        Appender { requests, responses }
    }

    /// Sends a batch without waiting for its answer.
    pub(crate) async fn send(&self, request: pb::AppendRequest) {
        self.requests.send(request).await.expect("the append stream should accept requests");
    }

    /// The next answer.
    pub(crate) async fn next(&mut self) -> pb::AppendResponse {
        tokio::time::timeout(Duration::from_secs(30), self.responses.message())
            .await
            .expect("an append answer within 30 s")
            .expect("the append stream should not fail")
            .expect("the append stream should not end")
    }

    /// Sends a batch and waits for its answer.
    pub(crate) async fn append(&mut self, request: pb::AppendRequest) -> pb::append_response::Result {
        self.send(request).await;
        self.next().await.result.expect("an answer carries a result")
    }
}

/// A batch request.
pub(crate) fn batch(shard: &str, producer: &str, producer_seq: u64, epoch: u64, items: &[&str]) -> pb::AppendRequest {
    pb::AppendRequest {
        expected_first_sequence: 0,
        batch_id: producer_seq,
        shard_id: shard.into(),
        producer_id: producer.into(),
        producer_seq,
        epoch,
        events: items.iter().map(|item| RawEvent::encode(&event(item))).collect(),
    }
}

/// Unwraps an acknowledgement.
pub(crate) fn ack(result: pb::append_response::Result) -> pb::AppendAck {
    match result {
        pb::append_response::Result::Ack(ack) => ack,
        pb::append_response::Result::Error(err) => panic!("expected an ack, got {err:?}"),
    }
}

/// Unwraps an append error.
pub(crate) fn rejection(result: pb::append_response::Result) -> pb::AppendError {
    match result {
        pb::append_response::Result::Error(err) => err,
        pb::append_response::Result::Ack(ack) => panic!("expected a rejection, got {ack:?}"),
    }
}

/// A hub replica running as a real `omnirelay-hub` process, killed on drop.
pub(crate) struct HubProcess {
    pub(crate) address: SocketAddr,
    child: tokio::process::Child,
}

impl HubProcess {
    /// Starts `omnirelay-hub serve` on a free loopback port and waits until
    /// it accepts gRPC calls.
    pub(crate) async fn start(url: &str) -> HubProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("find a free port")
            .port();
        let address: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_omnirelay-hub"))
            .args(["serve", "--listen", &address.to_string(), "--admin-listen", "127.0.0.1:0", "--database-url", url])
            .env("OMNIRELAY_HUB_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("start omnirelay-hub");
        let process = HubProcess { address, child };
        omnirelay_tests::eventually("the hub process serves", Duration::from_secs(30), || async {
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("http://{address}")).map_err(|e| e.to_string())?;
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            HubClient::new(channel)
                .get_checkpoints(pb::GetCheckpointsRequest::default())
                .await
                .map(drop)
                .map_err(|status| status.to_string())
        })
        .await;
        process
    }

    /// Kills the process at once (SIGKILL), the way a crash would.
    pub(crate) async fn kill(&mut self) {
        self.child.kill().await.expect("kill the hub process");
    }

    /// A client of this replica.
    pub(crate) async fn client(&self) -> HubClient<Channel> {
        client(self.address).await
    }
}

/// Served events decoded (what any client does with them).
pub(crate) fn decoded(events: &[RawEvent]) -> Vec<rpb::ReplicationEvent> {
    events.iter().map(|event| event.decode().expect("a served event decodes")).collect()
}

/// Rewrites a raw event through its decoded form (tests that shape events).
pub(crate) fn reshape(event: &mut RawEvent, change: impl FnOnce(&mut rpb::ReplicationEvent)) {
    let mut decoded = event.decode().expect("the test's own event decodes");
    change(&mut decoded);
    *event = RawEvent::encode(&decoded);
}
