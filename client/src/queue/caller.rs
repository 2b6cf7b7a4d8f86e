//! Who causes a queue's events: the caller of a command, or the queue
//! itself.

use crate::ids::{PeerId, Principal};

/// Who is calling: the normalized principal and the peer the request came
/// from. Recorded in every event the call causes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    /// Normalized identity (`rpc.principal`).
    pub principal: Principal,
    /// Calling peer (`rpc.peer`).
    pub peer: PeerId,
}

impl Caller {
    /// A caller.
    pub fn new(principal: impl Into<Principal>, peer: impl Into<PeerId>) -> Self {
        Self { principal: principal.into(), peer: peer.into() }
    }
}

/// The principal recorded for events the queue causes by itself (expiry).
pub const SYSTEM_PRINCIPAL: &str = "omnirelay:queue";
