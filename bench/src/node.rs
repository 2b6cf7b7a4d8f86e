//! The `node` scenario: enqueue -> lease -> complete cycles through one mesh
//! node over gRPC on loopback (in-memory replicator, the whole middleware
//! stack), as three unary calls and as three messages on a session (one per
//! worker, or one shared by all workers), against the same cycle on Redis
//! Streams (XADD, XREADGROUP, XACK; a connection per worker, or one shared)
//! and against tonic's own server answering canned responses (the ceiling
//! of any gRPC node here), all measured in the same run, at 1, 8 and 64
//! concurrent workers, with p50 and p99 cycle latency. See
//! `bench/README.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use omnirelay_client::middleware::{AuthorizationTable, MiddlewareConfig, PrincipalConfig, TrustedProxies};
use omnirelay_client::node::{Node, NodeConfig};
use omnirelay_client::proto::resourcelease::v1 as pb;
use omnirelay_client::{InMemoryReplicator, QueueConfig};
use pb::resource_lease_client::ResourceLeaseClient;
use pb::session_request::Call;
use pb::session_response::Result as Answer;
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
pub(crate) const NAMESPACE: &str = "resourcelease.bench";

/// One measurement: cycles per second, cycle latency percentiles, and the
/// CPU time spent while the workers ran (warm-up included) per cycle run.
pub(crate) struct Measured {
    pub(crate) rate: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) cpu: Option<CpuPerCycle>,
}

/// CPU time per cycle, by who spent it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuPerCycle {
    /// The node's thread.
    pub(crate) node: Duration,
    /// The canned server's thread.
    pub(crate) canned: Duration,
    /// The Redis server process.
    redis: Duration,
    /// The workers: this process but the two server threads.
    pub(crate) clients: Duration,
}

/// Reads the CPU time (user + system, clock ticks of 10 ms) of the server
/// threads, the Redis process and this process, from `/proc`.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuClock {
    pub(crate) node_tid: Option<String>,
    pub(crate) canned_tid: Option<String>,
    pub(crate) redis_pid: Option<u32>,
}

/// A reading of [`CpuClock`].
#[derive(Debug, Clone, Copy)]
struct CpuReading {
    node: Duration,
    canned: Duration,
    redis: Duration,
    process: Duration,
}

impl CpuClock {
    fn read(&self) -> Option<CpuReading> {
        let thread = |tid: &Option<String>| {
            tid.as_deref().map_or(Some(Duration::ZERO), |tid| stat_cpu(&format!("/proc/self/task/{tid}/stat")))
        };
        Some(CpuReading {
            node: thread(&self.node_tid)?,
            canned: thread(&self.canned_tid)?,
            redis: self.redis_pid.map_or(Some(Duration::ZERO), |pid| stat_cpu(&format!("/proc/{pid}/stat")))?,
            process: stat_cpu("/proc/self/stat")?,
        })
    }

    /// The CPU spent between two readings, per cycle.
    fn per_cycle(before: Option<CpuReading>, after: Option<CpuReading>, cycles: u64) -> Option<CpuPerCycle> {
        let (before, after) = (before?, after?);
        let per = |spent: Duration| spent / u32::try_from(cycles.max(1)).unwrap_or(u32::MAX);
        let node = after.node.saturating_sub(before.node);
        let canned = after.canned.saturating_sub(before.canned);
        Some(CpuPerCycle {
            node: per(node),
            canned: per(canned),
            redis: per(after.redis.saturating_sub(before.redis)),
            clients: per(after.process.saturating_sub(before.process).saturating_sub(node).saturating_sub(canned)),
        })
    }
}

/// The Redis server's process id, from `INFO server`.
async fn redis_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut connection).await.ok()?;
    info.lines().find_map(|line| line.strip_prefix("process_id:")).and_then(|pid| pid.trim().parse().ok())
}

/// Which server a row measures, for its CPU column.
#[derive(Debug, Clone, Copy)]
enum Server {
    Redis,
    Node,
    Canned,
}

/// Runs the scenario for `seconds` per system and worker count.
///
/// The node runs on a current-thread runtime of its own thread (as Redis
/// runs one event loop in its own process), the workers of every system on
/// a two-thread runtime, so client-side protocol work (h2 and protobuf for
/// gRPC, RESP for Redis) is not capped at one core. Each row also reports
/// the CPU time per cycle of its server (the node's thread, the canned
/// server's thread or the Redis process) and of its clients (this process
/// but the server threads), from `/proc`: on two shared cores the rates
/// swing with the other engineers' load, the CPU per cycle much less.
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
                addr_tx
                    .send((listener.local_addr().expect("an address"), thread_id()))
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
    let (addr, node_tid) = addr_rx.recv().expect("the node starts");
    let (bare_addr, canned_tid, stop_bare, bare) = start_bare();
    clients().block_on(async {
        let cpu = CpuClock { node_tid, canned_tid, redis_pid: redis_pid(redis_url).await };
        eprintln!("enqueue -> lease -> complete, {BODY_BYTES}-byte bodies, {seconds} s per row");
        eprintln!(
            "{:<40} {:>7} {:>9} {:>9} {:>9} {:>8} {:>9} {:>10} {:>10}",
            "system", "workers", "cycles/s", "p50", "p99", "vs redis", "vs shared", "server CPU", "client CPU"
        );
        for workers in WORKERS {
            let row = |name: &str, m: &Measured, redis: f64, shared: Option<f64>, server: Server| {
                let us = |d: Duration| format!("{:.1}us", d.as_secs_f64() * 1e6);
                let (server_cpu, client_cpu) = m.cpu.map_or((String::from("?"), String::from("?")), |cpu| {
                    let server = match server {
                        Server::Redis => cpu.redis,
                        Server::Node => cpu.node,
                        Server::Canned => cpu.canned,
                    };
                    (us(server), us(cpu.clients))
                });
                eprintln!(
                    "{name:<40} {workers:>7} {:>9.0} {:>7.0}us {:>7.0}us {:>7.2}x {:>9} {server_cpu:>10} {client_cpu:>10}",
                    m.rate,
                    m.p50.as_secs_f64() * 1e6,
                    m.p99.as_secs_f64() * 1e6,
                    m.rate / redis,
                    shared.map(|shared| format!("{:.2}x", m.rate / shared)).unwrap_or_default(),
                );
            };
            let redis = measure(workers, duration, &cpu, |n| RedisWorker::connect(redis_url, n)).await;
            row("redis streams, connection per worker", &redis, redis.rate, None, Server::Redis);
            let unary = measure(workers, duration, &cpu, |n| GrpcWorker::connect(addr, n)).await;
            row("node, unary gRPC", &unary, redis.rate, None, Server::Node);
            let session = measure(workers, duration, &cpu, |n| SessionWorker::open(addr, n)).await;
            row("node, session per worker", &session, redis.rate, None, Server::Node);
            let first = RedisWorker::connect(redis_url, 0).await;
            let redis_shared = measure(workers, duration, &cpu, |n| first.share(n)).await;
            row("redis streams, one shared connection", &redis_shared, redis.rate, Some(redis_shared.rate), Server::Redis);
            let shared_session = SharedSession::open(addr).await;
            let shared = measure(workers, duration, &cpu, |n| shared_session.worker(n)).await;
            row("node, one session shared", &shared, redis.rate, Some(redis_shared.rate), Server::Node);
            let bare_unary = measure(workers, duration, &cpu, |n| GrpcWorker::connect(bare_addr, n)).await;
            row("canned tonic server, unary", &bare_unary, redis.rate, None, Server::Canned);
            let bare_session = measure(workers, duration, &cpu, |n| SessionWorker::open(bare_addr, n)).await;
            row("canned tonic server, session per worker", &bare_session, redis.rate, None, Server::Canned);
        }
    });
    let _ = stop.send(());
    server.join().expect("the node thread ends");
    let _ = stop_bare.send(());
    bare.join().expect("the bare server thread ends");
}

/// The ceiling of any gRPC node here: tonic's own server on its own
/// current-thread runtime, answering the three calls (or the three session
/// messages) with canned responses (no middleware, no queue, no events).
fn start_bare() -> (std::net::SocketAddr, Option<String>, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)
{
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("bare".into())
        .spawn(move || {
            current_thread().block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
                addr_tx
                    .send((listener.local_addr().expect("an address"), thread_id()))
                    .expect("the bench waits for the address");
                // Small calls: no Nagle, as the node's own accept loop.
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                let served = tonic::transport::Server::builder()
                    .add_service(pb::resource_lease_server::ResourceLeaseServer::new(Bare))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(err) = served {
                    eprintln!("the bare server failed: {err}");
                }
            });
        })
        .expect("the bare server thread starts");
    let (addr, tid) = addr_rx.recv().expect("the bare server starts");
    (addr, tid, stop, thread)
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
    purge_drained: PurgeDrainedRequest => PurgeDrainedResponse,
    list_dead_letters: ListDeadLettersRequest => ListDeadLettersResponse,
    get_dead_letter: GetDeadLetterRequest => GetDeadLetterResponse,
    redrive_dead_letter: RedriveDeadLetterRequest => RedriveDeadLetterResponse,
    purge_dead_letters: PurgeDeadLettersRequest => PurgeDeadLettersResponse,
    stats: StatsRequest => StatsResponse,
}

/// CPU time (user + system) from a `/proc/.../stat` file (clock ticks of
/// 10 ms).
fn stat_cpu(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesized name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The id of the calling thread, for reading its CPU time.
pub(crate) fn thread_id() -> Option<String> {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|stat| stat.split_whitespace().next().map(str::to_string))
}

pub(crate) fn current_thread() -> tokio::runtime::Runtime {
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
pub(crate) trait Worker: Send + 'static {
    fn cycle(&mut self, n: u64) -> impl std::future::Future<Output = ()> + Send;
}

/// Runs `workers` workers for `duration` after a short warm-up, and
/// measures.
pub(crate) async fn measure<W, F, Fut>(workers: usize, duration: Duration, cpu: &CpuClock, connect: F) -> Measured
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
    let before = cpu.read();
    let start = Instant::now() + warmup;
    let end = start + duration;
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|mut worker| {
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                // n counts every cycle run, warm-up included.
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
                (latencies, n)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut cycles = 0;
    for task in tasks {
        let (latencies, ran) = task.await.expect("a worker task should finish");
        all.extend(latencies);
        cycles += ran;
    }
    let cpu = CpuClock::per_cycle(before, cpu.read(), cycles);
    all.sort_unstable();
    let at = |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied();
    Measured {
        rate: all.len() as f64 / duration.as_secs_f64(),
        p50: at(0.50).unwrap_or_default(),
        p99: at(0.99).unwrap_or_default(),
        cpu,
    }
}

/// A gRPC worker with its own connection.
pub(crate) struct GrpcWorker {
    client: ResourceLeaseClient<Channel>,
    owner: String,
    body: Bytes,
}

impl GrpcWorker {
    pub(crate) async fn connect(addr: std::net::SocketAddr, n: usize) -> Self {
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

    /// A request as the bench's principal, named by the trusted-proxy header.
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

/// The cycle's three calls, as session messages.
fn enqueue_call(owner: &str, n: u64, body: &Bytes) -> Call {
    let payload = pb::ItemPayload {
        resource_type: "bench".into(),
        resource_id: format!("{owner}/{n}"),
        body: body.clone(),
        ..Default::default()
    };
    Call::Enqueue(pb::EnqueueRequest { namespace: NAMESPACE.into(), payload: Some(payload), ..Default::default() })
}

fn lease_call(owner: &str) -> Call {
    Call::Lease(pb::LeaseRequest { namespace: NAMESPACE.into(), owner: owner.into(), ..Default::default() })
}

fn complete_call(handle: pb::OwnershipHandle) -> Call {
    Call::Complete(pb::CompleteRequest { namespace: NAMESPACE.into(), handle: Some(handle) })
}

/// Panics unless the answer is a success.
fn succeeded(answer: Answer) -> Answer {
    match answer {
        Answer::Error(error) => panic!("a session call failed: {} {}", error.code, error.message),
        answer => answer,
    }
}

/// Sends one message on a session and waits for its answer.
trait SessionCalls: Send {
    fn call(&mut self, call: Call) -> impl std::future::Future<Output = Answer> + Send;
}

/// Runs one cycle on a session.
async fn session_cycle(session: &mut impl SessionCalls, owner: &str, n: u64, body: &Bytes) {
    succeeded(session.call(enqueue_call(owner, n, body)).await);
    // As in the unary cycle: another worker may take the item just
    // enqueued; every cycle is still one enqueue, one lease, one complete.
    let handle = loop {
        if let Answer::Lease(response) = succeeded(session.call(lease_call(owner)).await)
            && let Some(handle) = response.item.and_then(|item| item.lease)
        {
            break handle;
        }
        tokio::task::yield_now().await;
    };
    succeeded(session.call(complete_call(handle)).await);
}

/// The session's outbound half: a channel the request stream drains.
fn session_request<T>(
    outbound: tokio::sync::mpsc::Receiver<T>,
) -> tonic::Request<tokio_stream::wrappers::ReceiverStream<T>> {
    GrpcWorker::request(tokio_stream::wrappers::ReceiverStream::new(outbound))
}

/// A worker with a session of its own on its own connection: one message in
/// flight, as the Redis worker has one command in flight.
struct SessionWorker {
    session: OwnSession,
    owner: String,
    body: Bytes,
}

/// A session used by one worker.
struct OwnSession {
    send: tokio::sync::mpsc::Sender<pb::SessionRequest>,
    answers: tonic::Streaming<pb::SessionResponse>,
    next_id: u64,
}

impl SessionCalls for OwnSession {
    async fn call(&mut self, call: Call) -> Answer {
        self.next_id += 1;
        let id = self.next_id;
        self.send.send(pb::SessionRequest { id, timeout: None, call: Some(call) }).await.expect("the session is open");
        let answer = self.answers.message().await.expect("the session stays open").expect("an answer");
        assert_eq!(answer.id, id, "one message in flight");
        answer.result.expect("a result")
    }
}

impl SessionWorker {
    async fn open(addr: std::net::SocketAddr, n: usize) -> Self {
        let mut client = GrpcWorker::connect(addr, n).await.client;
        let (send, outbound) = tokio::sync::mpsc::channel(1);
        let answers = client.session(session_request(outbound)).await.expect("the session opens").into_inner();
        Self {
            session: OwnSession { send, answers, next_id: 0 },
            owner: format!("w{n}"),
            body: Bytes::from(vec![7u8; BODY_BYTES]),
        }
    }
}

impl Worker for SessionWorker {
    async fn cycle(&mut self, n: u64) {
        session_cycle(&mut self.session, &self.owner, n, &self.body).await;
    }
}

/// Callers waiting for their answers on a shared session, by message id.
type Waiting = std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Answer>>>;

/// One session shared by every worker of a process, as NATS, Kafka or
/// Pulsar clients share one connection: each worker still waits for each
/// answer (one message in flight per worker), so the session carries as
/// many messages at once as there are workers. A reader task routes
/// answers by id; it ends with the session.
struct SharedSession {
    send: tokio::sync::mpsc::Sender<pb::SessionRequest>,
    waiting: Arc<Waiting>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    reader: Arc<AbortOnDrop>,
}

/// Stops the reader task when the last handle of the session goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SharedSession {
    async fn open(addr: std::net::SocketAddr) -> Self {
        let mut client = GrpcWorker::connect(addr, 0).await.client;
        let (send, outbound) = tokio::sync::mpsc::channel(256);
        let mut answers = client.session(session_request(outbound)).await.expect("the session opens").into_inner();
        let waiting = Arc::new(Waiting::default());
        let routes = Arc::clone(&waiting);
        let reader = tokio::spawn(async move {
            while let Ok(Some(answer)) = answers.message().await {
                let waiter = routes.lock().expect("the map is never poisoned").remove(&answer.id);
                if let (Some(waiter), Some(result)) = (waiter, answer.result) {
                    let _ = waiter.send(result);
                }
            }
        });
        Self { send, waiting, next_id: Arc::default(), reader: Arc::new(AbortOnDrop(reader)) }
    }

    async fn worker(&self, n: usize) -> SharedSessionWorker {
        SharedSessionWorker {
            session: Self {
                send: self.send.clone(),
                waiting: Arc::clone(&self.waiting),
                next_id: Arc::clone(&self.next_id),
                reader: Arc::clone(&self.reader),
            },
            owner: format!("w{n}"),
            body: Bytes::from(vec![7u8; BODY_BYTES]),
        }
    }
}

impl SessionCalls for SharedSession {
    async fn call(&mut self, call: Call) -> Answer {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (answered, answer) = tokio::sync::oneshot::channel();
        self.waiting.lock().expect("the map is never poisoned").insert(id, answered);
        self.send.send(pb::SessionRequest { id, timeout: None, call: Some(call) }).await.expect("the session is open");
        answer.await.expect("the session answers every message")
    }
}

/// A worker on a [`SharedSession`].
struct SharedSessionWorker {
    session: SharedSession,
    owner: String,
    body: Bytes,
}

impl Worker for SharedSessionWorker {
    async fn cycle(&mut self, n: u64) {
        session_cycle(&mut self.session, &self.owner, n, &self.body).await;
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

    /// Another consumer on this worker's connection: redis-rs pipelines the
    /// commands of every worker sharing a multiplexed connection.
    async fn share(&self, n: usize) -> Self {
        Self { connection: self.connection.clone(), consumer: format!("s{n}"), body: vec![7u8; BODY_BYTES] }
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
pub(crate) fn clients() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime should build")
}
