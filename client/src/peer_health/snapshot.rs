//! Serializable views of peer health, for diagnostics and the CLI.

use serde::{Deserialize, Serialize};

use super::{PeerMetadata, PeerState};
use crate::PeerId;

/// One peer as the tracker sees it at the moment of the snapshot. Times are
/// ages and remaining durations in milliseconds, so a snapshot never needs
/// the reader's clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerHealthSnapshot {
    /// The peer.
    pub peer_id: PeerId,
    /// Healthy, probation, suspect or ejected.
    pub state: PeerState,
    /// True when choosers may pick the peer (healthy or probation).
    pub is_healthy: bool,
    /// Load-balancing weight: 1.0 when healthy, ramping up during probation,
    /// 0 when not eligible.
    pub weight: f64,
    /// Milliseconds since the peer was last heard from.
    pub last_heartbeat_age_ms: u64,
    /// Milliseconds the peer has been in its current state.
    pub state_age_ms: u64,
    /// Milliseconds left of the ejection, while ejected.
    pub ejection_remaining_ms: Option<u64>,
    /// Leases the peer holds now.
    pub active_leases: u32,
    /// Leases held while the peer is not eligible: work that will move to
    /// another peer when the leases expire or are handed back.
    pub pending_reassignments: u32,
    /// Lease expiries and failures since the last completion.
    pub consecutive_failures: u32,
    /// Leases granted to the peer since it joined.
    pub leases_granted: u64,
    /// Leases the peer completed.
    pub leases_completed: u64,
    /// Leases the peer failed.
    pub lease_failures: u64,
    /// Leases that expired in the peer's hands.
    pub lease_expiries: u64,
    /// Times the peer was ejected.
    pub ejections: u64,
    /// Current ejection multiplier (the next ejection lasts one level more).
    pub ejection_level: u32,
    /// Moving average of lease turnaround (grant to completion), once known.
    pub turnaround_ewma_ms: Option<f64>,
    /// Region, build and other labels the peer announced.
    pub metadata: PeerMetadata,
}

/// Counts over all peers, as dashboards and the `/lease-health` route show
/// them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSummary {
    /// Peers known to the tracker.
    pub peers: u32,
    /// Peers choosers may pick (healthy or in probation).
    pub eligible: u32,
    /// Peers choosers skip (suspect or ejected).
    pub unhealthy: u32,
    /// Peers in probation (counted in `eligible`).
    pub probation: u32,
    /// Silent peers (counted in `unhealthy`).
    pub suspect: u32,
    /// Ejected peers (counted in `unhealthy`).
    pub ejected: u32,
    /// Leases held by unhealthy peers, summed.
    pub pending_reassignments: u32,
}

/// Everything the tracker knows: the payload of
/// `/omnirelay/control/lease-health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseHealthSnapshot {
    /// Counts over all peers.
    pub summary: HealthSummary,
    /// Every peer, ordered by peer id.
    pub peers: Vec<PeerHealthSnapshot>,
}

impl LeaseHealthSnapshot {
    /// Builds the summary from per-peer snapshots (also usable on snapshots
    /// gathered from several nodes).
    pub fn from_peers(mut peers: Vec<PeerHealthSnapshot>) -> Self {
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        let mut summary = HealthSummary::default();
        for peer in &peers {
            summary.peers += 1;
            if peer.is_healthy {
                summary.eligible += 1;
            } else {
                summary.unhealthy += 1;
            }
            match peer.state {
                PeerState::Healthy => {}
                PeerState::Probation => summary.probation += 1,
                PeerState::Suspect => summary.suspect += 1,
                PeerState::Ejected => summary.ejected += 1,
            }
            summary.pending_reassignments += peer.pending_reassignments;
        }
        Self { summary, peers }
    }

    /// The snapshot of one peer.
    pub fn peer(&self, peer: &PeerId) -> Option<&PeerHealthSnapshot> {
        self.peers.iter().find(|p| &p.peer_id == peer)
    }
}
