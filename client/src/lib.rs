//! The OmniRelay client: lease queues embedded in a service, streaming every
//! mutation to the replication hub.
//!
//! The queue, dispatcher, middleware, peer health and replicators land here;
//! see `docs/ARCHITECTURE.md` for how they fit together.

pub use omnirelay_proto as proto;
