//! The OmniRelay client: lease queues embedded in a service, streaming every
//! mutation to the replication hub.
//!
//! The queue, dispatcher, middleware, peer health and replicators land here;
//! see `docs/ARCHITECTURE.md` for how they fit together. Shared today:
//!
//! - [`ErrorCode`]: the closed set of failures, mapped once to gRPC and HTTP.
//! - [`ShardId`], [`PeerId`], [`Principal`]: identities used everywhere.
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

pub use error::ErrorCode;
pub use ids::{PeerId, Principal, ShardId};
pub use omnirelay_proto as proto;
