//! The hub replicator (work in progress).

/// Placeholder.
#[derive(Debug)]
pub struct HubReplicator;
/// Placeholder.
#[derive(Debug)]
pub struct HubReplicatorConfig;
/// Placeholder.
#[derive(Debug)]
pub struct HubEndpoint;
/// Placeholder.
#[derive(Debug)]
pub struct HubTls;
