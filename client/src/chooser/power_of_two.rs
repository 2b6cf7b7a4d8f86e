//! Power of two choices over the moving average of lease turnaround.

use std::sync::{Mutex, PoisonError};

use super::PeerChooser;
use crate::PeerId;
use crate::peer_health::{PeerCandidate, PeerLeaseHealthTracker};

/// Samples two distinct eligible peers at random and picks the cheaper, where
/// cost is `turnaround_ewma × (active_leases + 1) / weight`. Sampling two
/// instead of scanning all avoids herding every caller onto the single best
/// peer, while still steering away from slow or busy ones (the "power of two
/// choices"); the turnaround average plays the role Linkerd's peak-EWMA
/// latency plays for requests.
#[derive(Debug)]
pub struct PowerOfTwoChooser {
    tracker: PeerLeaseHealthTracker,
    rng: Mutex<fastrand::Rng>,
}

impl PowerOfTwoChooser {
    /// A chooser over the tracker's peers, randomly seeded.
    pub fn new(tracker: PeerLeaseHealthTracker) -> Self {
        Self { tracker, rng: Mutex::new(fastrand::Rng::new()) }
    }

    /// A chooser with a fixed seed, for reproducible tests and simulations.
    pub fn with_seed(tracker: PeerLeaseHealthTracker, seed: u64) -> Self {
        Self { tracker, rng: Mutex::new(fastrand::Rng::with_seed(seed)) }
    }
}

fn cost(candidate: &PeerCandidate) -> f64 {
    candidate.turnaround.as_secs_f64() * (f64::from(candidate.active_leases) + 1.0) / candidate.weight
}

impl PeerChooser for PowerOfTwoChooser {
    fn tracker(&self) -> &PeerLeaseHealthTracker {
        &self.tracker
    }

    fn pick(&self, eligible: &[PeerCandidate]) -> PeerId {
        if eligible.len() == 1 {
            return eligible[0].peer.clone();
        }
        let (a, b) = {
            // The generator state is a single integer; a poisoned lock still
            // holds a usable one.
            let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
            let a = rng.usize(..eligible.len());
            // Draw the second from the others so the two are distinct.
            let b = (a + 1 + rng.usize(..eligible.len() - 1)) % eligible.len();
            (a, b)
        };
        let (a, b) = (&eligible[a], &eligible[b]);
        if cost(b) < cost(a) { b.peer.clone() } else { a.peer.clone() }
    }
}
