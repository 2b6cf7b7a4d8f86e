//! Peer choosers: which peer gets the next outbound call or lease assignment.
//!
//! Every chooser reads the shared [`PeerLeaseHealthTracker`], skips peers that
//! are not eligible (suspect, ejected, or unknown to the tracker), honours the
//! slow-start weight of peers in probation, and fails with
//! [`ChooserError::NoEligiblePeer`] (UNAVAILABLE) when nobody is left.
//!
//! - [`RoundRobinChooser`]: smooth weighted round robin; with equal weights,
//!   plain rotation in peer-id order.
//! - [`FewestPendingChooser`]: the peer holding the fewest leases relative to
//!   its weight; ties rotate.
//! - [`PowerOfTwoChooser`]: two random eligible peers, the one with the lower
//!   cost wins, where cost is the moving average of lease turnaround times
//!   the leases it holds plus one, divided by its weight (Linkerd's peak-EWMA
//!   idea applied to leases).
//!
//! ```
//! use omnirelay_client::PeerId;
//! use omnirelay_client::chooser::{PeerChooser, RoundRobinChooser};
//! use omnirelay_client::peer_health::{HealthConfig, PeerLeaseHealthTracker, PeerMetadata};
//!
//! let tracker = PeerLeaseHealthTracker::new(HealthConfig::default()).expect("valid config");
//! tracker.register(&PeerId::new("a"), PeerMetadata::default());
//! tracker.register(&PeerId::new("b"), PeerMetadata::default());
//! let chooser = RoundRobinChooser::new(tracker.clone());
//! let first = chooser.choose().expect("two eligible peers");
//! let second = chooser.choose().expect("two eligible peers");
//! assert_ne!(first, second);
//! ```

mod fewest_pending;
mod power_of_two;
mod round_robin;

use std::fmt;

pub use fewest_pending::FewestPendingChooser;
pub use power_of_two::PowerOfTwoChooser;
pub use round_robin::RoundRobinChooser;

use crate::peer_health::{PeerCandidate, PeerLeaseHealthTracker, PeerState};
use crate::{ErrorCode, PeerId};

/// Why no peer could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooserError {
    /// Every peer considered is unhealthy or unknown.
    #[error(
        "no eligible peer: {considered} considered ({suspect} suspect, {ejected} ejected, {unknown} unknown to the health tracker)"
    )]
    NoEligiblePeer {
        /// Peers considered.
        considered: usize,
        /// Of those, silent past the grace period.
        suspect: usize,
        /// Of those, ejected for failing leases.
        ejected: usize,
        /// Of those, never heard of (only with [`PeerChooser::choose_from`]).
        unknown: usize,
    },
}

impl ChooserError {
    /// The transport-independent code: no peer is available; retry later.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChooserError::NoEligiblePeer { .. } => ErrorCode::Unavailable,
        }
    }
}

/// Picks one eligible peer per call. Implementations are shared between
/// tasks, so they are `Send + Sync` and keep their rotation state inside.
pub trait PeerChooser: Send + Sync + fmt::Debug {
    /// Picks among every peer the tracker knows.
    fn choose(&self) -> Result<PeerId, ChooserError> {
        let candidates = self.tracker().candidates();
        pick_eligible(&candidates, 0, |eligible| self.pick(eligible))
    }

    /// Picks among the given peers only (for example the nodes that host a
    /// shard). Peers the tracker does not know are not eligible.
    fn choose_from(&self, peers: &[PeerId]) -> Result<PeerId, ChooserError> {
        let all = self.tracker().candidates();
        let candidates: Vec<_> = all.into_iter().filter(|c| peers.contains(&c.peer)).collect();
        let mut unique: Vec<&PeerId> = peers.iter().collect();
        unique.sort();
        unique.dedup();
        let unknown = unique.len() - candidates.len();
        pick_eligible(&candidates, unknown, |eligible| self.pick(eligible))
    }

    /// The tracker this chooser reads.
    fn tracker(&self) -> &PeerLeaseHealthTracker;

    /// Picks one of `eligible`, which is non-empty, ordered by peer id, and
    /// holds only eligible peers (weight in (0, 1]).
    fn pick(&self, eligible: &[PeerCandidate]) -> PeerId;
}

/// Filters to eligible candidates and hands them to `pick`, or explains why
/// there are none.
fn pick_eligible(
    candidates: &[PeerCandidate],
    unknown: usize,
    pick: impl FnOnce(&[PeerCandidate]) -> PeerId,
) -> Result<PeerId, ChooserError> {
    let eligible: Vec<PeerCandidate> = candidates.iter().filter(|c| c.is_eligible()).cloned().collect();
    if eligible.is_empty() {
        return Err(ChooserError::NoEligiblePeer {
            considered: candidates.len() + unknown,
            suspect: candidates.iter().filter(|c| c.state == PeerState::Suspect).count(),
            ejected: candidates.iter().filter(|c| c.state == PeerState::Ejected).count(),
            unknown,
        });
    }
    Ok(pick(&eligible))
}

#[cfg(test)]
mod tests;
