//! Smooth weighted round robin.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::PeerChooser;
use crate::PeerId;
use crate::peer_health::{PeerCandidate, PeerLeaseHealthTracker};

/// Rotates over eligible peers, giving each a share of picks proportional to
/// its weight (smooth weighted round robin, as in nginx): with equal weights it
/// is plain rotation in peer-id order, and a peer in slow start is picked
/// evenly spread out rather than in bursts.
#[derive(Debug)]
pub struct RoundRobinChooser {
    tracker: PeerLeaseHealthTracker,
    /// Running credit per peer; peers that left are pruned on each pick.
    credit: Mutex<HashMap<PeerId, f64>>,
}

impl RoundRobinChooser {
    /// A chooser over the tracker's peers.
    pub fn new(tracker: PeerLeaseHealthTracker) -> Self {
        Self { tracker, credit: Mutex::new(HashMap::new()) }
    }
}

impl PeerChooser for RoundRobinChooser {
    fn tracker(&self) -> &PeerLeaseHealthTracker {
        &self.tracker
    }

    fn pick(&self, eligible: &[PeerCandidate]) -> PeerId {
        // The credits are plain numbers; a panic elsewhere cannot leave them in
        // a state worse than a skewed rotation.
        let mut credit = self.credit.lock().unwrap_or_else(PoisonError::into_inner);
        credit.retain(|peer, _| eligible.iter().any(|c| &c.peer == peer));
        let total: f64 = eligible.iter().map(|c| c.weight).sum();
        let mut best: Option<(&PeerId, f64)> = None;
        for candidate in eligible {
            let value = credit.entry(candidate.peer.clone()).or_insert(0.0);
            *value += candidate.weight;
            // Strictly greater: ties go to the first in peer-id order.
            if best.is_none_or(|(_, b)| *value > b) {
                best = Some((&candidate.peer, *value));
            }
        }
        let (chosen, _) = best.expect("pick is only called with at least one eligible peer");
        let chosen = chosen.clone();
        if let Some(value) = credit.get_mut(&chosen) {
            *value -= total;
        }
        chosen
    }
}
