//! Fewest pending leases.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::PeerChooser;
use crate::PeerId;
use crate::peer_health::{PeerCandidate, PeerLeaseHealthTracker};

/// Picks the eligible peer holding the fewest leases relative to its weight:
/// the score is `(active_leases + 1) / weight`, so a peer in slow start looks
/// busier than it is. Ties rotate, so equal peers share the load.
#[derive(Debug)]
pub struct FewestPendingChooser {
    tracker: PeerLeaseHealthTracker,
    ties: AtomicUsize,
}

impl FewestPendingChooser {
    /// A chooser over the tracker's peers.
    pub fn new(tracker: PeerLeaseHealthTracker) -> Self {
        Self { tracker, ties: AtomicUsize::new(0) }
    }
}

impl PeerChooser for FewestPendingChooser {
    fn tracker(&self) -> &PeerLeaseHealthTracker {
        &self.tracker
    }

    fn pick(&self, eligible: &[PeerCandidate]) -> PeerId {
        let score = |c: &PeerCandidate| (f64::from(c.active_leases) + 1.0) / c.weight;
        let best = eligible.iter().map(score).fold(f64::INFINITY, f64::min);
        // Scores come from small integers and weights; treat values within a
        // rounding error as ties.
        let tied: Vec<&PeerCandidate> = eligible.iter().filter(|c| score(c) - best <= best * 1e-9).collect();
        let turn = self.ties.fetch_add(1, Ordering::Relaxed);
        tied[turn % tied.len()].peer.clone()
    }
}
