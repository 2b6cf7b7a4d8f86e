//! Default thresholds of peer health, each with the reason for its value.
//!
//! The outlier-detection numbers follow Envoy's defaults where the meaning is
//! the same, so operators who know Envoy find no surprises.

use std::time::Duration;

/// How long a peer may stay silent (no heartbeat, lease call or completion)
/// before it becomes suspect. Three missed beats of a 5 s worker heartbeat:
/// one lost packet or GC pause must not evict a worker.
pub const HEARTBEAT_GRACE: Duration = Duration::from_secs(15);

/// Consecutive lease expiries or failures that eject a healthy peer. Envoy's
/// `consecutive_5xx` default: enough to tell a broken peer from bad luck.
pub const CONSECUTIVE_FAILURES_TO_EJECT: u32 = 5;

/// Ejection time of a first ejection; the n-th ejection lasts n times this
/// (Envoy's `base_ejection_time`).
pub const BASE_EJECTION_TIME: Duration = Duration::from_secs(30);

/// Upper bound of an ejection however often a peer was ejected (Envoy's
/// `max_ejection_time`): a repaired peer is back within five minutes.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Largest share of peers that may be ejected at once, in percent. Lease
/// meshes are small (three to a few dozen peers), so Envoy's 10 % would
/// forbid every ejection; half keeps a majority serving. As in Envoy, one
/// ejection is always allowed when no peer is ejected.
pub const MAX_EJECTION_PERCENT: u8 = 50;

/// Probation after an ejection or a silence: the peer is eligible again but
/// one more expiry or failure ejects it at once, and slow start ramps its
/// weight up over this window. Matches the base ejection time so a flapping
/// peer spends as long proving itself as it spent out.
pub const PROBATION_PERIOD: Duration = Duration::from_secs(30);

/// Smallest slow-start weight, as a fraction of a healthy peer's (Envoy's
/// `min_weight_percent`, 10 %): a peer in probation still gets some traffic
/// to prove itself with.
pub const SLOW_START_MIN_WEIGHT: f64 = 0.1;

/// Slow-start aggression (Envoy's `aggression`): 1.0 ramps linearly; larger
/// values ramp faster early on.
pub const SLOW_START_AGGRESSION: f64 = 1.0;

/// Weight of the newest lease turnaround in its moving average. 0.3 follows a
/// change within about five leases while one slow lease moves the average by
/// less than a third.
pub const TURNAROUND_EWMA_ALPHA: f64 = 0.3;

/// Turnaround assumed for a peer that has not completed a lease yet, so
/// power-of-two-choices neither starves nor floods newcomers.
pub const DEFAULT_TURNAROUND: Duration = Duration::from_secs(1);

/// Time a peer must stay healthy to shed one level of its ejection multiplier
/// (Envoy lowers it while a host is healthy). One maximum ejection time: a
/// peer that behaved for five minutes starts over with short ejections.
pub const EJECTION_LEVEL_DECAY: Duration = Duration::from_secs(300);

/// Silence after which a peer holding no lease is forgotten (it left the
/// mesh without saying so, e.g. a replaced pod under a new name). An hour:
/// far past any ejection (five minutes at most), so a flapping peer cannot
/// shed its ejection history by going quiet for a while, and short enough
/// that the lease-health view and the choosers' lists do not fill with the
/// peers of past deployments. A peer that still holds leases is kept until
/// they end, so its pending reassignments stay visible.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);
