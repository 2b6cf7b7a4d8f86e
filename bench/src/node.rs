//! The `node` scenario: enqueue -> lease -> complete cycles through one mesh
//! node over gRPC on loopback (in-memory replicator, the whole middleware
//! stack), against the same cycle on Redis Streams (XADD, XREADGROUP,
//! XACK) and against tonic's own server answering canned responses (the
//! ceiling of any gRPC node here), all measured in the same run, at 1, 8
//! and 64 concurrent workers, with p50 and p99 cycle latency. See
//! `bench/README.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use omnirelay_client::middleware::{AuthorizationTable, MiddlewareConfig, PrincipalConfig, TrustedProxies};
use omnirelay_client::node::{Node, NodeConfig};
use omnirelay_client::proto::resourcelease::v1 as pb;
use omnirelay_client::{InMemoryReplicator, QueueConfig};
use pb::resource_lease_client::ResourceLeaseClient;
use tonic::transport::Channel;

use crate::BODY_BYTES;

/// Worker counts of the scenario.
const WORKERS: [usize; 3] = [1, 8, 64];

/// Events the node's in-memory replicator keeps: bounded so a long run
/// measures the cycle, not memory growth.
const RETAINED_EVENTS: usize = 4096;

/// Stream entries Redis keeps (`XADD MAXLEN ~`), for the same reason.
const REDIS_MAXLEN: usize = 100_000;

/// The namespace the benchmark uses.
const NAMESPACE: &str = "resourcelease.bench";

/// One measurement: cycles per second and cycle latency percentiles.
struct Measured {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// Runs the scenario for `seconds` per system and worker count.
///
/// The node runs on a current-thread runtime of its own thread (as Redis
/// runs one event loop in its own process), the workers of both systems on
/// a two-thread runtime, so client-side protocol work (h2 and protobuf for
/// gRPC, RESP for Redis) is not capped at one core. The node thread's CPU
/// time per cycle is reported too (from `/proc`), since on two shared cores
/// the clients take most of the machine.
pub(crate) fn run(seconds: u64, redis_url: &str) {
    let duration = Duration::from_secs(seconds);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::Builder::new()
        .name("node".into())
        .spawn(move || {
            current_thread().block_on(async move {
                let node = start_node();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
                let tid = std::fs::read_to_string("/proc/thread-self/stat")
                    .ok()
                    .and_then(|stat| stat.split_whitespace().next().map(str::to_string));
                addr_tx
                    .send((listener.local_addr().expect("an address"), tid))
                    .expect("the bench waits for the address");
                let served = node.serve(listener, async {
                    let _ = stopped.await;
                });
                if let Err(err) = served.await {
                    eprintln!("the node failed: {err}");
                }
                node.shutdown().await;
            });
        })
        .expect("the node thread starts");
    let (addr, tid) = addr_rx.recv().expect("the node starts");
    let (bare_addr, stop_bare, bare) = start_bare();
    let node_cpu = move || tid.as_deref().and_then(thread_cpu);
    clients().block_on(async {
        eprintln!("enqueue -> lease -> complete, {BODY_BYTES}-byte bodies, {seconds} s per row");
        eprintln!(
            "{:<32} {:>8} {:>14} {:>10} {:>10} {:>10} {:>16}",
            "system", "workers", "cycles/s", "p50", "p99", "vs redis", "node CPU/cycle"
        );
        for workers in WORKERS {
            let redis = measure(workers, duration, |n| RedisWorker::connect(redis_url, n)).await;
            let before = node_cpu();
            let omnirelay = measure(workers, duration, |n| GrpcWorker::connect(addr, n)).await;
            // The node's CPU over the whole row (warm-up included) per
            // measured cycle: an upper bound.
            let per_cycle = before.zip(node_cpu()).map(|(before, after)| {
                format!("{:.0}us", (after - before).as_secs_f64() * 1e6 / (omnirelay.rate * duration.as_secs_f64()))
            });
            let row = |name: &str, m: &Measured, ratio: f64, cpu: &str| {
                eprintln!(
                    "{name:<32} {workers:>8} {:>14.0} {:>8.0}us {:>8.0}us {:>9.2}x {cpu:>16}",
                    m.rate,
                    m.p50.as_secs_f64() * 1e6,
                    m.p99.as_secs_f64() * 1e6,
                    ratio
                );
            };
            let bare = measure(workers, duration, |n| GrpcWorker::connect(bare_addr, n)).await;
            row("redis streams", &redis, 1.0, "");
            row("omnirelay node (gRPC)", &omnirelay, omnirelay.rate / redis.rate, per_cycle.as_deref().unwrap_or("?"));
            row("bare tonic, canned answers", &bare, bare.rate / redis.rate, "");
        }
    });
    let _ = stop.send(());
    server.join().expect("the node thread ends");
    let _ = stop_bare.send(());
    bare.join().expect("the bare server thread ends");
}

/// The ceiling of any gRPC node here: tonic's own server on its own
/// current-thread runtime, answering the three calls with canned responses
/// (no middleware, no queue, no events).
fn start_bare() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("bare".into())
        .spawn(move || {
            current_thread().block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
                addr_tx.send(listener.local_addr().expect("an address")).expect("the bench waits for the address");
                let served = tonic::transport::Server::builder()
                    .add_service(pb::resource_lease_server::ResourceLeaseServer::new(Bare))
                    .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(err) = served {
                    eprintln!("the bare server failed: {err}");
                }
            });
        })
        .expect("the bare server thread starts");
    (addr_rx.recv().expect("the bare server starts"), stop, thread)
}

/// Answers every procedure with a canned response; `Lease` hands out an
/// (empty) lease so the worker's loop moves on.
struct Bare;

macro_rules! canned {
    ($($method:ident: $req:ident => $resp:ident),* $(,)?) => {
        #[tonic::async_trait]
        impl pb::resource_lease_server::ResourceLease for Bare {
            type SessionStream = futures_util::stream::BoxStream<'static, Result<pb::SessionResponse, tonic::Status>>;

            async fn session(
                &self,
                request: tonic::Request<tonic::Streaming<pb::SessionRequest>>,
            ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
                use futures_util::StreamExt;
                let answers = request.into_inner().map(|request| {
                    let request = request?;
                    Ok(pb::SessionResponse { id: request.id, result: request.call.map(canned_answer) })
                });
                Ok(tonic::Response::new(answers.boxed()))
            }

            async fn lease(&self, _: tonic::Request<pb::LeaseRequest>) -> Result<tonic::Response<pb::LeaseResponse>, tonic::Status> {
                let item = pb::WorkItem { lease: Some(pb::OwnershipHandle::default()), ..Default::default() };
                Ok(tonic::Response::new(pb::LeaseResponse { item: Some(item) }))
            }
            $(
                async fn $method(&self, _: tonic::Request<pb::$req>) -> Result<tonic::Response<pb::$resp>, tonic::Status> {
                    Ok(tonic::Response::new(pb::$resp::default()))
                }
            )*
        }
    };
}

/// The canned answer to a session's call, like the unary ones.
fn canned_answer(call: pb::session_request::Call) -> pb::session_response::Result {
    use pb::session_request::Call;
    use pb::session_response::Result as Answer;
    match call {
        Call::Enqueue(_) => Answer::Enqueue(pb::EnqueueResponse::default()),
        Call::Lease(_) => {
            let item = pb::WorkItem { lease: Some(pb::OwnershipHandle::default()), ..Default::default() };
            Answer::Lease(pb::LeaseResponse { item: Some(item) })
        }
        Call::Heartbeat(_) => Answer::Heartbeat(pb::HeartbeatResponse::default()),
        Call::Complete(_) => Answer::Complete(pb::CompleteResponse::default()),
        Call::Fail(_) => Answer::Fail(pb::FailResponse::default()),
    }
}

canned! {
    enqueue: EnqueueRequest => EnqueueResponse,
    heartbeat: HeartbeatRequest => HeartbeatResponse,
    complete: CompleteRequest => CompleteResponse,
    fail: FailRequest => FailResponse,
    drain: DrainRequest => DrainResponse,
    resume: ResumeRequest => ResumeResponse,
    restore: RestoreRequest => RestoreResponse,
    list_dead_letters: ListDeadLettersRequest => ListDeadLettersResponse,
    get_dead_letter: GetDeadLetterRequest => GetDeadLetterResponse,
    redrive_dead_letter: RedriveDeadLetterRequest => RedriveDeadLetterResponse,
    purge_dead_letters: PurgeDeadLettersRequest => PurgeDeadLettersResponse,
    stats: StatsRequest => StatsResponse,
}

/// CPU time (user + system) of one thread of this process, from
/// `/proc/self/task/{tid}/stat` (clock ticks of 10 ms).
fn thread_cpu(tid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the parenthesized name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime should build")
}

fn start_node() -> Node {
    let mut queue = QueueConfig::new(NAMESPACE, "bench-node");
    // The benchmark measures the cycle, not backpressure.
    queue.capacity = 1_000_000;
    queue.high_watermark = 900_000;
    queue.low_watermark = 800_000;
    let mut config = NodeConfig::new("bench-node");
    config.queues.push(queue);
    // Callers are identified by a trusted proxy header from loopback, as a
    // sidecar behind a TLS-terminating proxy sees them: the cheapest real
    // principal binding (a JWT would add a signature check per call).
    config.middleware = MiddlewareConfig {
        principal: PrincipalConfig::new()
            .trusted_proxies(TrustedProxies::parse(&["127.0.0.1"]).expect("a valid address")),
        authorization: AuthorizationTable::from_json(
            r#"{"rules": [{"principals": ["bench"], "procedures": ["enqueue", "lease", "complete"], "shards": ["resourcelease.bench"]}]}"#,
        )
        .expect("a valid table"),
        ..MiddlewareConfig::default()
    };
    Node::builder(config)
        .replicator(Arc::new(InMemoryReplicator::with_retention(RETAINED_EVENTS)), "in-memory")
        .build()
        .expect("a valid node")
}

/// Something that runs one cycle.
trait Worker: Send + 'static {
    fn cycle(&mut self, n: u64) -> impl std::future::Future<Output = ()> + Send;
}

/// Runs `workers` workers for `duration` after a short warm-up, and
/// measures.
async fn measure<W, F, Fut>(workers: usize, duration: Duration, connect: F) -> Measured
where
    W: Worker,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = W>,
{
    let mut connected = Vec::with_capacity(workers);
    for n in 0..workers {
        connected.push(connect(n).await);
    }
    let warmup = Duration::from_millis(500);
    let start = Instant::now() + warmup;
    let end = start + duration;
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|mut worker| {
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                loop {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    worker.cycle(n).await;
                    n += 1;
                    if began >= start {
                        latencies.push(began.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("a worker task should finish"));
    }
    all.sort_unstable();
    let at = |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied();
    Measured {
        rate: all.len() as f64 / duration.as_secs_f64(),
        p50: at(0.50).unwrap_or_default(),
        p99: at(0.99).unwrap_or_default(),
    }
}

/// A gRPC worker with its own connection.
struct GrpcWorker {
    client: ResourceLeaseClient<Channel>,
    owner: String,
    body: Bytes,
}

impl GrpcWorker {
    async fn connect(addr: std::net::SocketAddr, n: usize) -> Self {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a valid URI")
            .connect()
            .await
            .expect("the node should accept connections");
        Self {
            client: ResourceLeaseClient::new(channel),
            owner: format!("w{n}"),
            body: Bytes::from(vec![7u8; BODY_BYTES]),
        }
    }

    fn request<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("x-client-principal", tonic::metadata::MetadataValue::from_static("bench"));
        request
    }
}

impl Worker for GrpcWorker {
    async fn cycle(&mut self, n: u64) {
        let payload = pb::ItemPayload {
            resource_type: "bench".into(),
            resource_id: format!("{}/{n}", self.owner),
            body: self.body.clone(),
            ..Default::default()
        };
        let enqueue = pb::EnqueueRequest { namespace: NAMESPACE.into(), payload: Some(payload), ..Default::default() };
        self.client.enqueue(Self::request(enqueue)).await.expect("enqueue should succeed");
        // With several workers another may take the item just enqueued (and
        // this one theirs): every cycle is still one enqueue, one lease and
        // one complete.
        let handle = loop {
            let lease =
                pb::LeaseRequest { namespace: NAMESPACE.into(), owner: self.owner.clone(), ..Default::default() };
            let response = self.client.lease(Self::request(lease)).await.expect("lease should succeed");
            if let Some(handle) = response.into_inner().item.and_then(|item| item.lease) {
                break handle;
            }
            tokio::task::yield_now().await;
        };
        let complete = pb::CompleteRequest { namespace: NAMESPACE.into(), handle: Some(handle) };
        self.client.complete(Self::request(complete)).await.expect("complete should succeed");
    }
}

/// A Redis Streams worker with its own connection, in one consumer group.
struct RedisWorker {
    connection: redis::aio::MultiplexedConnection,
    consumer: String,
    body: Vec<u8>,
}

const STREAM: &str = "omnirelay-bench:stream";
const GROUP: &str = "omnirelay-bench";

impl RedisWorker {
    async fn connect(url: &str, n: usize) -> Self {
        let client = redis::Client::open(url).expect("a valid Redis URL");
        let mut connection = client.get_multiplexed_async_connection().await.expect("Redis should accept connections");
        if n == 0 {
            let _: Result<(), _> = redis::cmd("DEL").arg(STREAM).query_async(&mut connection).await;
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(STREAM)
                .arg(GROUP)
                .arg("$")
                .arg("MKSTREAM")
                .query_async(&mut connection)
                .await
                .expect("the consumer group should be created");
        }
        Self { connection, consumer: format!("c{n}"), body: vec![7u8; BODY_BYTES] }
    }
}

impl Worker for RedisWorker {
    async fn cycle(&mut self, _n: u64) {
        let _: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(REDIS_MAXLEN)
            .arg("*")
            .arg("body")
            .arg(&self.body)
            .query_async(&mut self.connection)
            .await
            .expect("XADD should succeed");
        let id = loop {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(1)
                .arg("STREAMS")
                .arg(STREAM)
                .arg(">")
                .query_async(&mut self.connection)
                .await
                .expect("XREADGROUP should succeed");
            if let Some(entry) = reply.keys.first().and_then(|key| key.ids.first()) {
                break entry.id.clone();
            }
            tokio::task::yield_now().await;
        };
        let _: u64 = redis::cmd("XACK")
            .arg(STREAM)
            .arg(GROUP)
            .arg(&id)
            .query_async(&mut self.connection)
            .await
            .expect("XACK should succeed");
    }
}

/// The workers' runtime: two threads, so client-side protocol work (h2
/// framing for gRPC, RESP for Redis) is not capped at one core.
fn clients() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime should build")
}
