//! The seam through which lease grants, heartbeats and endings reach the
//! peer health tracker.

use std::time::Duration;

use crate::ids::PeerId;

/// Learns who holds, renews and gives up leases, in log order; the peer
/// health tracker implements it so expiries and failures count against the
/// owning peer.
///
/// Called while the shard is locked, right after the event was applied:
/// implementations must return at once. Every method defaults to doing
/// nothing.
pub trait LeaseObserver: Send + Sync + 'static {
    /// `owner` was granted a lease.
    fn lease_granted(&self, owner: &PeerId) {
        let _ = owner;
    }

    /// `owner` heartbeated a lease.
    fn heartbeat(&self, owner: &PeerId) {
        let _ = owner;
    }

    /// `owner` completed a lease `turnaround` after it was granted.
    fn lease_completed(&self, owner: &PeerId, turnaround: Duration) {
        let _ = (owner, turnaround);
    }

    /// `owner` reported a failure.
    fn lease_failed(&self, owner: &PeerId) {
        let _ = owner;
    }

    /// `owner`'s lease lapsed without a heartbeat.
    fn lease_expired(&self, owner: &PeerId) {
        let _ = owner;
    }

    /// A drain handed `owner`'s lease back (not the peer's fault).
    fn lease_released(&self, owner: &PeerId) {
        let _ = owner;
    }
}
