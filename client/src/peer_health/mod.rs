//! Peer health: which peers may be handed work, as seen from lease traffic.
//!
//! [`PeerLeaseHealthTracker`] is shared (an `Arc` inside, cheap to clone) by
//! the dispatcher, which reports what happens to leases, and the peer
//! choosers, which ask who is eligible. Per peer it keeps the last heartbeat,
//! active leases, expiries, failures, pending reassignments, metadata (region,
//! build) and a moving average of lease turnaround.
//!
//! # States
//!
//! ```text
//!             silent past the grace period
//!   Healthy ───────────────────────────────► Suspect
//!     │  ▲                                     │ ▲
//!     │  │ probation passes                    │ │ silent
//!     │  │                                     ▼ │
//!     │  └─────────────────────────────── Probation ◄── heartbeat
//!     │ N consecutive expiries/failures        │ ▲
//!     ▼                                        │ │ ejection time over (peer alive)
//!   Ejected ◄──────── one expiry/failure ──────┘ │
//!     └──────────────────────────────────────────┘
//! ```
//!
//! - **Healthy**: eligible at full weight. An idle peer stays healthy as long
//!   as it heartbeats: health comes from liveness and outcomes, not traffic.
//! - **Suspect**: silent for longer than the grace period; not eligible. A
//!   heartbeat moves it to probation.
//! - **Ejected**: `consecutive_failures_to_eject` lease expiries or failures
//!   in a row (outlier detection in the manner of Envoy). The n-th ejection
//!   lasts n × `base_ejection_time`, capped at `max_ejection_time`; the level
//!   decays while the peer stays healthy. At most `max_ejection_percent` of
//!   the peers are ejected at once (one is always allowed), so a bad deploy
//!   cannot empty the mesh.
//! - **Probation**: eligible, with a slow-start weight that ramps from
//!   `slow_start_min_weight` to 1 over `probation_period`; one expiry or
//!   failure ejects it again at once (like a half-open circuit breaker).
//!
//! States are evaluated lazily against the clock ([`tokio::time::Instant`], so
//! `#[tokio::test(start_paused = true)]` tests run without sleeping); no
//! background task is needed.
//!
//! ```
//! use std::time::Duration;
//! use omnirelay_client::PeerId;
//! use omnirelay_client::peer_health::{HealthConfig, PeerLeaseHealthTracker, PeerState};
//!
//! let tracker = PeerLeaseHealthTracker::new(HealthConfig::default()).expect("valid config");
//! let worker = PeerId::new("worker-1");
//! tracker.record_lease_granted(&worker);
//! tracker.record_lease_completed(&worker, Duration::from_millis(120));
//! assert_eq!(tracker.state(&worker), Some(PeerState::Healthy));
//! assert_eq!(tracker.snapshot().summary.eligible, 1);
//! ```

mod config;
pub mod defaults;
mod snapshot;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use config::HealthConfig;
pub use snapshot::{HealthSummary, LeaseHealthSnapshot, PeerHealthSnapshot};

use crate::{ErrorCode, PeerId};

/// Gauge: peers choosers may pick.
pub const HEALTHY_GAUGE: &str = "omnirelay_peer_lease_healthy";
/// Gauge: peers choosers skip (suspect or ejected).
pub const UNHEALTHY_GAUGE: &str = "omnirelay_peer_lease_unhealthy";
/// Gauge: leases held by unhealthy peers.
pub const PENDING_REASSIGNMENTS_GAUGE: &str = "omnirelay_peer_lease_pending_reassignments";
/// Counter: ejections, labelled by `peer`.
pub const EJECTIONS_COUNTER: &str = "omnirelay_peer_ejections_total";

/// Why the tracker refused its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    /// A threshold is out of range.
    #[error("{field}: {reason}")]
    InvalidConfig {
        /// The configuration field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl HealthError {
    /// The transport-independent code.
    pub fn code(&self) -> ErrorCode {
        match self {
            HealthError::InvalidConfig { .. } => ErrorCode::InvalidArgument,
        }
    }
}

/// Where a peer stands. Healthy and Probation are eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Eligible at full weight.
    Healthy,
    /// Eligible at a slow-start weight; one more failure ejects.
    Probation,
    /// Silent past the grace period; not eligible until it heartbeats.
    Suspect,
    /// Ejected for failing leases; not eligible until the ejection ends.
    Ejected,
}

impl PeerState {
    /// True when choosers may pick a peer in this state.
    pub fn is_eligible(self) -> bool {
        matches!(self, PeerState::Healthy | PeerState::Probation)
    }

    /// The snake-case name used in logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Healthy => "healthy",
            PeerState::Probation => "probation",
            PeerState::Suspect => "suspect",
            PeerState::Ejected => "ejected",
        }
    }
}

/// What a peer announces about itself, for dashboards that correlate health
/// with deployments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerMetadata {
    /// Region or zone the peer runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Build (version or commit) the peer runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
}

/// A peer as choosers see it: eligibility, weight and load.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerCandidate {
    /// The peer.
    pub peer: PeerId,
    /// Its state at the time of the call.
    pub state: PeerState,
    /// Slow-start weight in (0, 1] when eligible, 0 otherwise.
    pub weight: f64,
    /// Leases it holds now.
    pub active_leases: u32,
    /// Moving average of its lease turnaround, or the configured default
    /// before its first completion.
    pub turnaround: Duration,
}

impl PeerCandidate {
    /// True when choosers may pick this peer.
    pub fn is_eligible(&self) -> bool {
        self.state.is_eligible()
    }
}

/// Shared view of peer health, fed by lease events and read by choosers and
/// diagnostics. Cloning is cheap; all clones share one state.
#[derive(Debug, Clone)]
pub struct PeerLeaseHealthTracker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: HealthConfig,
    peers: Mutex<HashMap<PeerId, PeerRecord>>,
    /// Whether this tracker sets the process-wide peer gauges: the one a
    /// node keeps for its workers does; a second one (a node's view of the
    /// other nodes it forwards to) must not overwrite them.
    gauges: bool,
}

#[derive(Debug, Clone)]
struct PeerRecord {
    metadata: PeerMetadata,
    state: PeerState,
    state_since: Instant,
    last_heartbeat: Instant,
    ejected_until: Instant,
    ejection_level: u32,
    level_since: Instant,
    consecutive_failures: u32,
    active_leases: u32,
    leases_granted: u64,
    leases_completed: u64,
    lease_failures: u64,
    lease_expiries: u64,
    ejections: u64,
    turnaround_ewma_secs: Option<f64>,
}

/// What a failure-like event was, for logs.
#[derive(Debug, Clone, Copy)]
enum Strike {
    Expired,
    Failed,
}

impl PeerLeaseHealthTracker {
    /// Creates a tracker after validating its thresholds.
    pub fn new(config: HealthConfig) -> Result<Self, HealthError> {
        config.validate()?;
        Ok(Self { inner: Arc::new(Inner { config, peers: Mutex::new(HashMap::new()), gauges: true }) })
    }

    /// A tracker that leaves the process-wide gauges alone: for a second
    /// set of peers in the same process (a node tracks its workers with
    /// the gauged tracker and the nodes it forwards calls to with this one).
    pub fn without_gauges(config: HealthConfig) -> Result<Self, HealthError> {
        config.validate()?;
        Ok(Self { inner: Arc::new(Inner { config, peers: Mutex::new(HashMap::new()), gauges: false }) })
    }

    /// The thresholds in force.
    pub fn config(&self) -> &HealthConfig {
        &self.inner.config
    }

    /// Adds a peer (counting as a heartbeat), or updates the metadata of a
    /// known one.
    pub fn register(&self, peer: &PeerId, metadata: PeerMetadata) {
        let now = Instant::now();
        let mut peers = self.lock();
        let record = Self::entry(&mut peers, peer, now);
        record.metadata = metadata;
        self.heartbeat_locked(peer, record, now);
        self.publish_gauges(&peers);
    }

    /// Forgets a peer (it left the mesh). Returns whether it was known.
    pub fn remove(&self, peer: &PeerId) -> bool {
        let mut peers = self.lock();
        let removed = peers.remove(peer).is_some();
        if removed {
            self.publish_gauges(&peers);
        }
        removed
    }

    /// Records that a peer is alive (a worker heartbeat, on a lease or on its
    /// own). A suspect peer moves to probation; an ejected one stays ejected.
    pub fn record_heartbeat(&self, peer: &PeerId) {
        self.update(peer, true, |tracker, peer, record, now| tracker.heartbeat_locked(peer, record, now));
    }

    /// Records a lease granted to a peer (which also shows it is alive).
    pub fn record_lease_granted(&self, peer: &PeerId) {
        self.update(peer, true, |tracker, peer, record, now| {
            tracker.heartbeat_locked(peer, record, now);
            record.active_leases = record.active_leases.saturating_add(1);
            record.leases_granted += 1;
        });
    }

    /// Records a completed lease and how long it took from grant to
    /// completion. Resets the peer's consecutive failures.
    pub fn record_lease_completed(&self, peer: &PeerId, turnaround: Duration) {
        let alpha = self.inner.config.turnaround_ewma_alpha;
        self.update(peer, true, |tracker, peer, record, now| {
            tracker.heartbeat_locked(peer, record, now);
            record.active_leases = record.active_leases.saturating_sub(1);
            record.leases_completed += 1;
            record.consecutive_failures = 0;
            let sample = turnaround.as_secs_f64();
            record.turnaround_ewma_secs = Some(match record.turnaround_ewma_secs {
                None => sample,
                Some(average) => average + alpha * (sample - average),
            });
        });
    }

    /// Records a lease the peer reported as failed. The peer is alive, but the
    /// failure counts towards ejection. Failures do not feed the turnaround
    /// average: a peer that fails fast must not look fast.
    pub fn record_lease_failed(&self, peer: &PeerId) {
        self.update(peer, true, |tracker, peer, record, now| {
            tracker.heartbeat_locked(peer, record, now);
            record.active_leases = record.active_leases.saturating_sub(1);
            record.lease_failures += 1;
        });
        self.strike(peer, Strike::Failed);
    }

    /// Records a lease that expired in the peer's hands. Counts towards
    /// ejection; says nothing about liveness. Unknown peers are ignored (they
    /// left the mesh).
    pub fn record_lease_expired(&self, peer: &PeerId) {
        let known = self.update(peer, false, |_, _, record, _| {
            record.active_leases = record.active_leases.saturating_sub(1);
            record.lease_expiries += 1;
        });
        if known {
            self.strike(peer, Strike::Expired);
        }
    }

    /// Records a lease handed back without fault (a drain in hand-back mode).
    pub fn record_lease_released(&self, peer: &PeerId) {
        self.update(peer, false, |_, _, record, _| {
            record.active_leases = record.active_leases.saturating_sub(1);
        });
    }

    /// The state of a peer now, or `None` for an unknown peer.
    pub fn state(&self, peer: &PeerId) -> Option<PeerState> {
        let now = Instant::now();
        let mut peers = self.lock();
        let record = peers.get_mut(peer)?;
        let changed = self.refresh(peer, record, now);
        let state = record.state;
        if changed {
            self.publish_gauges(&peers);
        }
        Some(state)
    }

    /// True when choosers may pick the peer now (known, and healthy or in
    /// probation).
    pub fn is_eligible(&self, peer: &PeerId) -> bool {
        self.state(peer).is_some_and(PeerState::is_eligible)
    }

    /// Every known peer with its state, weight and load, ordered by peer id.
    pub fn candidates(&self) -> Vec<PeerCandidate> {
        let now = Instant::now();
        let config = &self.inner.config;
        let mut peers = self.lock();
        let changed = self.refresh_all(&mut peers, now);
        let mut candidates: Vec<_> = peers
            .iter()
            .map(|(peer, record)| PeerCandidate {
                peer: peer.clone(),
                state: record.state,
                weight: record.weight(now, config),
                active_leases: record.active_leases,
                turnaround: record.turnaround_ewma_secs.map_or(config.default_turnaround, Duration::from_secs_f64),
            })
            .collect();
        if changed {
            self.publish_gauges(&peers);
        }
        drop(peers);
        candidates.sort_by(|a, b| a.peer.cmp(&b.peer));
        candidates
    }

    /// Snapshots every peer plus the summary (eligible, unhealthy, pending
    /// reassignments), and refreshes the peer gauges.
    pub fn snapshot(&self) -> LeaseHealthSnapshot {
        let now = Instant::now();
        let config = &self.inner.config;
        let mut peers = self.lock();
        self.refresh_all(&mut peers, now);
        let snapshots = peers.iter().map(|(peer, record)| record.snapshot(peer, now, config)).collect();
        self.publish_gauges(&peers);
        drop(peers);
        LeaseHealthSnapshot::from_peers(snapshots)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PeerId, PeerRecord>> {
        // Every update is a few assignments that cannot leave a record half
        // changed in a way later reads would misjudge, so a panic elsewhere
        // while holding the lock must not take peer health down with it.
        self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entry<'a>(peers: &'a mut HashMap<PeerId, PeerRecord>, peer: &PeerId, now: Instant) -> &'a mut PeerRecord {
        peers.entry(peer.clone()).or_insert_with(|| {
            tracing::info!(peer = %peer, "peer joined");
            PeerRecord::new(now)
        })
    }

    /// Applies `change` to a peer after refreshing its state; `create` says
    /// whether an unknown peer is added (events that prove it exists) or the
    /// event ignored. Returns whether the peer was known or created.
    fn update(
        &self,
        peer: &PeerId,
        create: bool,
        change: impl FnOnce(&Self, &PeerId, &mut PeerRecord, Instant),
    ) -> bool {
        let now = Instant::now();
        let mut peers = self.lock();
        let record = if create {
            Self::entry(&mut peers, peer, now)
        } else if let Some(record) = peers.get_mut(peer) {
            record
        } else {
            tracing::debug!(peer = %peer, "lease event for an unknown peer ignored");
            return false;
        };
        self.refresh(peer, record, now);
        change(self, peer, record, now);
        self.publish_gauges(&peers);
        true
    }

    fn heartbeat_locked(&self, peer: &PeerId, record: &mut PeerRecord, now: Instant) {
        self.refresh(peer, record, now);
        record.last_heartbeat = now;
        if record.state == PeerState::Suspect {
            record.transition(peer, PeerState::Probation, now, "heard from again");
        }
    }

    /// Counts an expiry or failure and ejects when the peer crossed its
    /// threshold (or was in probation).
    fn strike(&self, peer: &PeerId, strike: Strike) {
        let now = Instant::now();
        let config = &self.inner.config;
        let mut peers = self.lock();
        self.refresh_all(&mut peers, now);
        let total = peers.len();
        let ejected = peers.values().filter(|r| r.state == PeerState::Ejected).count();
        let Some(record) = peers.get_mut(peer) else {
            return;
        };
        record.consecutive_failures = record.consecutive_failures.saturating_add(1);
        let due = match record.state {
            PeerState::Probation => true,
            PeerState::Healthy => record.consecutive_failures >= config.consecutive_failures_to_eject,
            PeerState::Suspect | PeerState::Ejected => false,
        };
        if due {
            // As in Envoy: the first ejection is always allowed; after that
            // the ejected share must stay within the cap.
            let allowed = ejected == 0 || (ejected + 1) * 100 <= usize::from(config.max_ejection_percent) * total;
            if allowed {
                record.eject(peer, now, config, strike);
            } else {
                tracing::warn!(
                    peer = %peer,
                    ejected,
                    peers = total,
                    max_ejection_percent = config.max_ejection_percent,
                    "ejection skipped: too many peers ejected already"
                );
            }
        }
        self.publish_gauges(&peers);
    }

    fn refresh(&self, peer: &PeerId, record: &mut PeerRecord, now: Instant) -> bool {
        record.refresh(peer, now, &self.inner.config)
    }

    fn refresh_all(&self, peers: &mut HashMap<PeerId, PeerRecord>, now: Instant) -> bool {
        let forget_after = self.inner.config.forget_after;
        let before = peers.len();
        peers.retain(|peer, record| {
            let keep = record.active_leases > 0 || now.saturating_duration_since(record.last_heartbeat) < forget_after;
            if !keep {
                tracing::info!(peer = %peer, silent_for = ?now.saturating_duration_since(record.last_heartbeat), "forgot a silent peer");
            }
            keep
        });
        let mut changed = peers.len() != before;
        for (peer, record) in peers.iter_mut() {
            changed |= self.refresh(peer, record, now);
        }
        changed
    }

    fn publish_gauges(&self, peers: &HashMap<PeerId, PeerRecord>) {
        if !self.inner.gauges {
            return;
        }
        let mut healthy = 0u32;
        let mut unhealthy = 0u32;
        let mut pending = 0u32;
        for record in peers.values() {
            if record.state.is_eligible() {
                healthy += 1;
            } else {
                unhealthy += 1;
                pending = pending.saturating_add(record.active_leases);
            }
        }
        metrics::gauge!(HEALTHY_GAUGE).set(f64::from(healthy));
        metrics::gauge!(UNHEALTHY_GAUGE).set(f64::from(unhealthy));
        metrics::gauge!(PENDING_REASSIGNMENTS_GAUGE).set(f64::from(pending));
    }
}

/// The tracker hears about leases straight from the queues of a node: each
/// queue built with `.observer(Arc::new(tracker.clone()))` reports its
/// grants, heartbeats and endings in log order, so expiries and failures
/// count against the owning peer without the node relaying anything.
impl crate::queue::LeaseObserver for PeerLeaseHealthTracker {
    fn lease_granted(&self, owner: &PeerId) {
        self.record_lease_granted(owner);
    }

    fn heartbeat(&self, owner: &PeerId) {
        self.record_heartbeat(owner);
    }

    fn lease_completed(&self, owner: &PeerId, turnaround: Duration) {
        self.record_lease_completed(owner, turnaround);
    }

    fn lease_failed(&self, owner: &PeerId) {
        self.record_lease_failed(owner);
    }

    fn lease_expired(&self, owner: &PeerId) {
        self.record_lease_expired(owner);
    }

    fn lease_released(&self, owner: &PeerId) {
        self.record_lease_released(owner);
    }
}

impl PeerRecord {
    fn new(now: Instant) -> Self {
        Self {
            metadata: PeerMetadata::default(),
            state: PeerState::Healthy,
            state_since: now,
            last_heartbeat: now,
            ejected_until: now,
            ejection_level: 0,
            level_since: now,
            consecutive_failures: 0,
            active_leases: 0,
            leases_granted: 0,
            leases_completed: 0,
            lease_failures: 0,
            lease_expiries: 0,
            ejections: 0,
            turnaround_ewma_secs: None,
        }
    }

    /// Brings the state up to `now`, dating each transition at the instant it
    /// became due (not at the instant someone looked), so lazy evaluation
    /// agrees with a peer watched continuously. Returns whether the state
    /// changed.
    fn refresh(&mut self, peer: &PeerId, now: Instant, config: &HealthConfig) -> bool {
        let mut changed = false;
        loop {
            // The last instant the peer still counts as alive.
            let alive_until = self.last_heartbeat + config.heartbeat_grace;
            let (next, at, reason) = match self.state {
                PeerState::Healthy if alive_until < now => {
                    (PeerState::Suspect, alive_until, "silent past the grace period")
                }
                PeerState::Probation => {
                    let proven_at = self.state_since + config.probation_period;
                    if alive_until < now && alive_until < proven_at {
                        (PeerState::Suspect, alive_until, "silent past the grace period")
                    } else if proven_at <= now {
                        (PeerState::Healthy, proven_at, "probation passed")
                    } else {
                        break;
                    }
                }
                PeerState::Ejected if self.ejected_until <= now => {
                    if self.ejected_until <= alive_until {
                        (PeerState::Probation, self.ejected_until, "ejection over")
                    } else {
                        (PeerState::Suspect, self.ejected_until, "ejection over, but silent")
                    }
                }
                PeerState::Healthy | PeerState::Ejected | PeerState::Suspect => break,
            };
            self.transition(peer, next, at, reason);
            changed = true;
        }
        if self.state == PeerState::Healthy && self.ejection_level > 0 {
            // The level decays while healthy, counted from the later of the
            // last level change and the start of this healthy stretch.
            let since = self.level_since.max(self.state_since);
            let steps = now.saturating_duration_since(since).as_nanos() / config.ejection_level_decay.as_nanos();
            let steps = u32::try_from(steps).unwrap_or(u32::MAX).min(self.ejection_level);
            if steps > 0 {
                self.ejection_level -= steps;
                self.level_since = since + config.ejection_level_decay * steps;
            }
        }
        changed
    }

    fn transition(&mut self, peer: &PeerId, next: PeerState, at: Instant, reason: &'static str) {
        let from = self.state;
        self.state = next;
        self.state_since = at;
        match next {
            PeerState::Suspect | PeerState::Ejected => {
                tracing::warn!(peer = %peer, from = from.as_str(), to = next.as_str(), reason, "peer became unhealthy");
            }
            PeerState::Healthy | PeerState::Probation => {
                tracing::info!(peer = %peer, from = from.as_str(), to = next.as_str(), reason, "peer state changed");
            }
        }
    }

    fn eject(&mut self, peer: &PeerId, now: Instant, config: &HealthConfig, strike: Strike) {
        self.ejection_level = self.ejection_level.saturating_add(1);
        self.level_since = now;
        let length = config.base_ejection_time.saturating_mul(self.ejection_level).min(config.max_ejection_time);
        self.ejected_until = now + length;
        self.ejections += 1;
        let consecutive = self.consecutive_failures;
        self.consecutive_failures = 0;
        metrics::counter!(EJECTIONS_COUNTER, "peer" => peer.to_string()).increment(1);
        tracing::warn!(
            peer = %peer,
            consecutive,
            last = ?strike,
            ejection_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX),
            level = self.ejection_level,
            "ejecting peer"
        );
        self.transition(peer, PeerState::Ejected, now, "consecutive lease expiries or failures");
    }

    fn weight(&self, now: Instant, config: &HealthConfig) -> f64 {
        match self.state {
            PeerState::Healthy => 1.0,
            PeerState::Probation => {
                // Envoy's slow start: weight × max(min, time_factor^(1/aggression)).
                let window = config.probation_period.as_secs_f64();
                let elapsed = now.saturating_duration_since(self.state_since).as_secs_f64();
                let time_factor = if window > 0.0 { (elapsed / window).min(1.0) } else { 1.0 };
                time_factor.powf(1.0 / config.slow_start_aggression).max(config.slow_start_min_weight)
            }
            PeerState::Suspect | PeerState::Ejected => 0.0,
        }
    }

    fn snapshot(&self, peer: &PeerId, now: Instant, config: &HealthConfig) -> PeerHealthSnapshot {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let eligible = self.state.is_eligible();
        PeerHealthSnapshot {
            peer_id: peer.clone(),
            state: self.state,
            is_healthy: eligible,
            weight: self.weight(now, config),
            last_heartbeat_age_ms: millis(now.saturating_duration_since(self.last_heartbeat)),
            state_age_ms: millis(now.saturating_duration_since(self.state_since)),
            ejection_remaining_ms: (self.state == PeerState::Ejected)
                .then(|| millis(self.ejected_until.saturating_duration_since(now))),
            active_leases: self.active_leases,
            pending_reassignments: if eligible { 0 } else { self.active_leases },
            consecutive_failures: self.consecutive_failures,
            leases_granted: self.leases_granted,
            leases_completed: self.leases_completed,
            lease_failures: self.lease_failures,
            lease_expiries: self.lease_expiries,
            ejections: self.ejections,
            ejection_level: self.ejection_level,
            turnaround_ewma_ms: self.turnaround_ewma_secs.map(|s| s * 1000.0),
            metadata: self.metadata.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
