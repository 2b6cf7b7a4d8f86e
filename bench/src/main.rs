//! OmniRelay benchmarks. Each scenario lands with the capability it measures;
//! see `bench/README.md`.
//!
//! Usage: `omnirelay-bench <scenario> [cycles]`
//!
//! - `queue`: enqueue -> lease -> complete cycles per second with the
//!   in-memory replicator and 200-byte bodies, on one thread, on two threads
//!   sharing one queue, and on two threads with a queue each; plus a baseline
//!   (a mutex-guarded `VecDeque` and `HashMap` doing the same three steps
//!   without events) measured in the same run.
//! - `queue-cycles`: runs exactly `cycles` cycles on one thread and nothing
//!   else, for `valgrind --tool=callgrind` (see `bench/callgrind-queue.sh`).
//! - `hub [options]`: the hub against raw PostgreSQL on the same database
//!   (see `hub.rs` and bench/README.md).
//! - `node [seconds]`: the same cycle through one mesh node on loopback at
//!   1, 8 and 64 workers, as unary gRPC calls and as session messages (a
//!   session per worker, or one shared), against Redis Streams at
//!   `OMNIRELAY_BENCH_REDIS_URL` (default `redis://127.0.0.1:6379/`; a
//!   connection per worker, or one shared) and a canned-answer tonic server
//!   in the same run (see `node.rs`).
//! - `node-durable [seconds]`: the cycle through one node replicating to a
//!   hub on durable PostgreSQL at 1, 8 and 64 workers, against a PostgreSQL
//!   SKIP LOCKED queue on the same cluster, with CPU per cycle of the node,
//!   the hub and PostgreSQL; then the recovery time of a queue whose log
//!   holds a million events (see `durable.rs`).
//! - `forward [seconds]`: the cycle as unary calls to a namespace's owner
//!   directly and through another node that forwards them, at 1, 8 and 64
//!   workers, in the same run (see `forward.rs`).
//! - `failover [rounds]`: a mesh of two nodes on a hub on durable
//!   PostgreSQL; the time from a crash of one node (and from a graceful
//!   shutdown) until the other serves its namespaces, split into detection,
//!   acquisition, replay and first answer, with the default and a 2 s lease
//!   TTL (see `failover.rs`).
//! - `sinks [events] [rounds]`: one subscriber runtime into the PostgreSQL projection
//!   (exactly once) against `COPY` of the same rows, and into the NDJSON
//!   sink against `cat` of the same bytes (see `sinks.rs`).

/// The process allocator (see the workspace `Cargo.toml` for why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod durable;
mod failover;
mod forward;
mod hub;
mod node;
mod sinks;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use omnirelay_client::queue::{Caller, EnqueueRequest, LeaseRequest, Payload, Queue, QueueConfig};
use omnirelay_client::{InMemoryReplicator, PeerId};

/// Item body size the figures are quoted for.
pub(crate) const BODY_BYTES: usize = 200;

/// Events the in-memory replicator keeps per shard: enough to look like a
/// log, bounded so millions of cycles do not measure memory growth.
const RETAINED_EVENTS: usize = 4096;

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let mut args = all.iter();
    let scenario = args.next().cloned().unwrap_or_default();
    let cycles = args.next().and_then(|n| n.parse::<u64>().ok());
    match scenario.as_str() {
        "queue" => queue(cycles.unwrap_or(1_000_000)),
        "queue-cycles" => queue_cycles(cycles.unwrap_or(100_000)),
        "hub" => hub_scenario(&all[1..]),
        "node-durable" => durable::run(cycles.unwrap_or(10)),
        "failover" => failover::run(cycles.unwrap_or(3) as usize),
        "sinks" => {
            sinks::run(cycles.unwrap_or(100_000), args.next().and_then(|n| n.parse::<usize>().ok()).unwrap_or(5))
        }
        "forward" => forward::run(cycles.unwrap_or(5)),
        "node" => {
            let url = std::env::var("OMNIRELAY_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
            node::run(cycles.unwrap_or(5), &url)
        }
        _ => {
            eprintln!(
                "usage: omnirelay-bench <queue|queue-cycles|hub|node|node-durable|failover|forward|sinks> [options]; see bench/README.md"
            );
            eprintln!("  hub    {}", hub::SUMMARY);
            std::process::exit(2);
        }
    }
}

fn hub_scenario(args: &[String]) {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("the benchmark runtime should start");
    if let Err(err) = runtime.block_on(hub::run(args)) {
        eprintln!("benchmark failed: {err:#}");
        std::process::exit(1);
    }
}

fn new_queue(shard: &str) -> Queue {
    let mut config = QueueConfig::new(shard, "bench-node");
    // The benchmark measures the cycle, not backpressure: room for every
    // item one worker can hold in flight.
    config.capacity = 1_000_000;
    config.high_watermark = 900_000;
    config.low_watermark = 800_000;
    Queue::builder(config, Arc::new(InMemoryReplicator::with_retention(RETAINED_EVENTS)))
        .build()
        .expect("the benchmark configuration should be valid")
}

/// Runs `cycles` enqueue -> lease -> complete cycles on `queue`.
async fn run_cycles(queue: &Queue, cycles: u64, worker: &str) {
    let body = Bytes::from(vec![7u8; BODY_BYTES]);
    let caller = Caller::new("spiffe://bench/worker", worker);
    let owner = PeerId::from(worker);
    let lease = LeaseRequest::new(owner);
    for n in 0..cycles {
        let payload = Payload::new("bench", resource_id(worker, n), body.clone());
        queue.enqueue(&caller, EnqueueRequest::new(payload)).await.expect("enqueue should succeed");
        // With two workers on one queue, the other may have taken the item we
        // just enqueued (and we then take theirs): every cycle still is one
        // enqueue, one lease and one complete.
        let leased = loop {
            if let Some(leased) = queue.lease(&caller, lease.clone()).await.expect("lease should succeed") {
                break leased;
            }
            tokio::task::yield_now().await;
        };
        queue.complete(&caller, &leased.handle).await.expect("complete should succeed");
    }
}

/// A short resource id per worker and cycle, built without `format!`.
fn resource_id(worker: &str, n: u64) -> String {
    let mut id = String::with_capacity(worker.len() + 21);
    id.push_str(worker);
    id.push('/');
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut value = n;
    loop {
        digits[len] = b'0' + (value % 10) as u8;
        len += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for digit in digits[..len].iter().rev() {
        id.push(char::from(*digit));
    }
    id
}

fn per_second(cycles: u64, elapsed: Duration) -> f64 {
    cycles as f64 / elapsed.as_secs_f64()
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime should build")
}

fn two_threads() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime should build")
}

fn queue(cycles: u64) {
    let body = Bytes::from(vec![7u8; BODY_BYTES]);

    // Baseline: the same three steps on plain collections behind one mutex.
    let baseline = current_thread().block_on(async {
        let state = tokio::sync::Mutex::new((VecDeque::new(), HashMap::new(), 0u64));
        let started = Instant::now();
        for n in 0..cycles {
            let mut guard = state.lock().await;
            guard.2 += 1;
            let id = guard.2;
            guard.0.push_back((id, resource_id("baseline", n), body.clone()));
            drop(guard);
            let mut guard = state.lock().await;
            let item = guard.0.pop_front().expect("pushed above");
            guard.1.insert(item.0, item);
            drop(guard);
            let mut guard = state.lock().await;
            guard.1.remove(&id);
        }
        per_second(cycles, started.elapsed())
    });

    let one = current_thread().block_on(async {
        let queue = new_queue("resourcelease.bench");
        run_cycles(&queue, cycles / 10, "warmup").await;
        let started = Instant::now();
        run_cycles(&queue, cycles, "worker-1").await;
        per_second(cycles, started.elapsed())
    });

    let shared = two_threads().block_on(async {
        let queue = new_queue("resourcelease.bench");
        let started = Instant::now();
        let tasks: Vec<_> = (0..2)
            .map(|n| {
                let queue = queue.clone();
                tokio::spawn(async move { run_cycles(&queue, cycles / 2, &format!("worker-{n}")).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("a worker task should finish");
        }
        per_second(cycles, started.elapsed())
    });

    let sharded = two_threads().block_on(async {
        let started = Instant::now();
        let tasks: Vec<_> = (0..2)
            .map(|n| {
                let queue = new_queue(&format!("resourcelease.bench{n}"));
                tokio::spawn(async move { run_cycles(&queue, cycles / 2, &format!("worker-{n}")).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("a worker task should finish");
        }
        per_second(cycles, started.elapsed())
    });

    let report = |name: &str, rate: f64| {
        eprintln!("{name:<44} {rate:>12.0} cycles/s  {:>5.2}x baseline", rate / baseline);
    };
    eprintln!("enqueue -> lease -> complete, {BODY_BYTES}-byte bodies, {cycles} cycles each");
    report("baseline (mutex + VecDeque + HashMap)", baseline);
    report("queue, 1 thread", one);
    report("queue, 2 threads, one shared queue", shared);
    report("queue, 2 threads, one queue each", sharded);
}

fn queue_cycles(cycles: u64) {
    current_thread().block_on(async {
        let queue = new_queue("resourcelease.bench");
        run_cycles(&queue, cycles, "worker-1").await;
    });
}
