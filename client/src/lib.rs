//! The OmniRelay client: lease queues embedded in a service, streaming every
//! mutation to the replication hub.
//!
//! The queue, dispatcher, middleware, peer health and replicators land here;
//! see `docs/ARCHITECTURE.md` for how they fit together. Shared today:
//!
//! - [`ErrorCode`]: the closed set of failures, mapped once to gRPC and HTTP.
//! - [`ShardId`], [`PeerId`], [`Principal`]: identities used everywhere.
//! - [`health`]: the [`PeerLeaseHealthTracker`] shared by the dispatcher and
//!   the choosers (healthy, probation, suspect, ejected; snapshots, gauges).
//! - [`chooser`]: round robin, fewest pending and power of two choices over
//!   the tracker ([`PeerChooser`]).
//! - [`middleware`]: the tower stack every mesh call passes, for tonic and
//!   axum alike ([`middleware::MeshLayer`]: tracing, principal binding,
//!   deadlines, size limits, authorization, a rate-limiter slot).
//! - [`shard`]: namespaces, the payload-to-shard router and `rpc-shard-key`.
//!
//! ```
//! use omnirelay_client::ErrorCode;
//!
//! assert_eq!(ErrorCode::Aborted.grpc(), tonic::Code::Aborted);
//! assert_eq!(ErrorCode::Aborted.http_status(), http::StatusCode::CONFLICT);
//! ```

pub mod chooser;
pub mod error;
pub mod health;
pub mod ids;
pub mod middleware;
pub mod shard;

pub use chooser::PeerChooser;
pub use error::ErrorCode;
pub use health::PeerLeaseHealthTracker;
pub use ids::{PeerId, Principal, ShardId};
pub use omnirelay_proto as proto;
