//! The OmniRelay client: lease queues embedded in a service, streaming every
//! mutation to the replication hub.
//!
//! See `docs/ARCHITECTURE.md` for how the parts fit together:
//!
//! - [`queue`]: the lease queue. A [`Queue`] is a deterministic state
//!   machine: commands (enqueue, lease, heartbeat, complete, fail, drain,
//!   restore, dead letters) become [`queue::Event`]s, which are applied only
//!   after the queue's [`Replicator`] accepted them. Replaying the events
//!   ([`QueueState::replay`]) rebuilds the exact state.
//! - [`replication`]: the [`Replicator`] trait, its contract suite and its
//!   implementations (in memory, the hub (feature `hub`), SQLite (feature
//!   `sqlite`), object storage (feature `object-store`), composite,
//!   sharded).
//! - [`effects`]: deterministic effect capture: state stores (in memory, file
//!   system, SQLite, PostgreSQL, Redis) and the [`effects::EffectCoordinator`].
//! - [`backpressure`]: watermark signals, listeners, diagnostics and a
//!   backpressure-aware tower concurrency limit.
//! - [`clock`]: injected time ([`TokioClock`] by default, [`ManualClock`] for
//!   tests).
//! - [`wire`]: the one conversion between domain and protobuf types.
//! - [`ErrorCode`]: the closed set of failures, mapped once to gRPC and HTTP.
//! - [`ShardId`], [`PeerId`], [`Principal`] and the queue's ids.
//! - [`peer_health`]: the [`PeerLeaseHealthTracker`] shared by the dispatcher and
//!   the choosers (healthy, probation, suspect, ejected; snapshots, gauges).
//! - [`chooser`]: round robin, fewest pending and power of two choices over
//!   the tracker ([`PeerChooser`]).
//! - [`middleware`] (feature `middleware`): the tower stack every mesh call
//!   passes, for tonic and axum alike ([`middleware::MeshLayer`]: tracing,
//!   principal binding, deadlines, size limits, authorization, a
//!   concurrency-limiter slot).
//! - [`shard`]: namespaces, the payload-to-shard router and `rpc-shard-key`.
//! - [`node`] (feature `node`; with it [`mesh`], the routing client): the
//!   mesh node: one queue per namespace served over gRPC and
//!   HTTP/JSON behind the middleware, peer health wired to every queue,
//!   per-namespace backpressure limits, diagnostics endpoints, and a
//!   plain or mutual-TLS accept loop ([`node::Node`]).
//! - [`sink`] (feature `sinks`): consumers of shard logs: the [`ReplicationSink`] trait, the
//!   [`sink::Subscriber`] runtime that feeds one from a hub subscription
//!   (ordered, verified, checkpointed, resumed after failover), and the
//!   NDJSON file and webhook sinks and (feature `postgres`) the PostgreSQL
//!   projection.
//!
//! Cargo features choose what is built. The defaults (`node`, `middleware`,
//! `hub`, `sinks`, `sqlite`) are everything the workspace's binaries use;
//! `postgres`, `redis` and `object-store` add stores. With
//! `default-features = false` the crate is the lease queue alone (the queue,
//! the replicator trait and the in-memory, composite and sharded
//! replicators, backpressure, peer health, choosers, shard routing, effects
//! in memory and in files), without axum, hyper, JWT, OpenTelemetry or the
//! Prometheus exporter; the example below builds that way. See
//! `client/Cargo.toml` for what each feature pulls in.
//!
//! ```
//! use std::sync::Arc;
//! use omnirelay_client::queue::{Caller, EnqueueRequest, FailRequest, LeaseRequest, Payload, Queue, QueueConfig};
//! use omnirelay_client::{ErrorCode, InMemoryReplicator, QueueState};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let replicator = Arc::new(InMemoryReplicator::new());
//! let config = QueueConfig::new("resourcelease.users", "node-a");
//! let queue = Queue::builder(config, replicator.clone()).build()?;
//! let producer = Caller::new("spiffe://example/producer", "node-a");
//! let worker = Caller::new("spiffe://example/worker", "worker-1");
//!
//! // Enqueue, lease, fail once, lease again, complete.
//! let payload = Payload::new("user", "42", "rebuild profile").with_request_id("req-1");
//! let item = queue.enqueue(&producer, EnqueueRequest::new(payload.clone())).await?;
//! assert!(queue.enqueue(&producer, EnqueueRequest::new(payload)).await?.deduplicated);
//!
//! let first = queue.lease(&worker, LeaseRequest::new("worker-1")).await?.expect("pending");
//! assert_eq!(first.handle.item_id, item.item_id);
//! let retry_now = FailRequest { error: "timeout".into(), requeue_delay: Some(Default::default()), ..Default::default() };
//! queue.fail(&worker, &first.handle, retry_now).await?;
//!
//! let second = queue.lease(&worker, LeaseRequest::new("worker-1")).await?.expect("requeued");
//! assert!(second.handle.fencing_token > first.handle.fencing_token);
//! // The first lease's token is stale now: rejected, nothing changes.
//! let stale = queue.complete(&worker, &first.handle).await.unwrap_err();
//! assert_eq!(stale.code(), ErrorCode::Aborted);
//! queue.complete(&worker, &second.handle).await?;
//!
//! // The log rebuilds the same state, byte for byte.
//! let replayed = QueueState::replay(queue.shard().clone(), &replicator.events(queue.shard()))?;
//! assert_eq!(replayed.encode(), queue.encode_state().await);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

pub mod backpressure;
pub mod chooser;
pub mod clock;
pub mod defaults;
pub mod effects;
pub mod error;
mod event;
pub mod ids;
mod item;
#[cfg(feature = "node")]
pub mod mesh;
pub mod metrics;
#[cfg(feature = "middleware")]
pub mod middleware;
#[cfg(feature = "node")]
pub mod node;
pub mod peer_health;
pub mod queue;
pub mod replication;
pub mod shard;
#[cfg(feature = "sinks")]
pub mod sink;
mod sync;
pub mod wire;

pub use backpressure::{BackpressureListener, BackpressureSignal};
pub use chooser::PeerChooser;
pub use clock::{Clock, ManualClock, SystemClock, Timestamp, TokioClock};
pub use error::ErrorCode;
pub use ids::{FencingToken, ItemId, LeaseId, PeerId, Principal, ProducerId, Sequence, ShardId};
pub use omnirelay_proto as proto;
pub use peer_health::PeerLeaseHealthTracker;
pub use queue::{Queue, QueueConfig, QueueError, QueueState};
pub use replication::{InMemoryReplicator, Replicator};
#[cfg(feature = "sinks")]
pub use sink::ReplicationSink;
