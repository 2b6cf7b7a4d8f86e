//! Thresholds of the peer health tracker.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::HealthError;
use super::defaults;

/// Thresholds of [`PeerLeaseHealthTracker`](super::PeerLeaseHealthTracker).
/// [`HealthConfig::default`] uses the values of [`defaults`](super::defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Silence after which a peer becomes suspect.
    #[serde(with = "millis")]
    pub heartbeat_grace: Duration,
    /// Consecutive lease expiries or failures that eject a healthy peer.
    pub consecutive_failures_to_eject: u32,
    /// Length of a first ejection; the n-th lasts n times as long.
    #[serde(with = "millis")]
    pub base_ejection_time: Duration,
    /// Cap on an ejection's length.
    #[serde(with = "millis")]
    pub max_ejection_time: Duration,
    /// Largest share of peers ejected at once, 0 to 100. One ejection is
    /// always allowed while no peer is ejected.
    pub max_ejection_percent: u8,
    /// Probation (and slow-start window) after an ejection or a silence.
    #[serde(with = "millis")]
    pub probation_period: Duration,
    /// Smallest slow-start weight, in (0, 1].
    pub slow_start_min_weight: f64,
    /// Slow-start aggression, > 0; 1.0 ramps linearly.
    pub slow_start_aggression: f64,
    /// Weight of the newest turnaround in its moving average, in (0, 1].
    pub turnaround_ewma_alpha: f64,
    /// Turnaround assumed before a peer's first completion.
    #[serde(with = "millis")]
    pub default_turnaround: Duration,
    /// Healthy time that sheds one level of the ejection multiplier.
    #[serde(with = "millis")]
    pub ejection_level_decay: Duration,
    /// Silence after which a peer holding no lease is forgotten; longer
    /// than `heartbeat_grace` and `max_ejection_time`.
    #[serde(with = "millis")]
    pub forget_after: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            heartbeat_grace: defaults::HEARTBEAT_GRACE,
            consecutive_failures_to_eject: defaults::CONSECUTIVE_FAILURES_TO_EJECT,
            base_ejection_time: defaults::BASE_EJECTION_TIME,
            max_ejection_time: defaults::MAX_EJECTION_TIME,
            max_ejection_percent: defaults::MAX_EJECTION_PERCENT,
            probation_period: defaults::PROBATION_PERIOD,
            slow_start_min_weight: defaults::SLOW_START_MIN_WEIGHT,
            slow_start_aggression: defaults::SLOW_START_AGGRESSION,
            turnaround_ewma_alpha: defaults::TURNAROUND_EWMA_ALPHA,
            default_turnaround: defaults::DEFAULT_TURNAROUND,
            ejection_level_decay: defaults::EJECTION_LEVEL_DECAY,
            forget_after: defaults::FORGET_AFTER,
        }
    }
}

impl HealthConfig {
    /// Checks every threshold, naming the first field out of range.
    pub fn validate(&self) -> Result<(), HealthError> {
        let fail =
            |field: &'static str, reason: &str| Err(HealthError::InvalidConfig { field, reason: reason.to_string() });
        if self.heartbeat_grace.is_zero() {
            return fail("heartbeat_grace", "must be positive");
        }
        if self.consecutive_failures_to_eject == 0 {
            return fail("consecutive_failures_to_eject", "must be at least 1");
        }
        if self.base_ejection_time.is_zero() {
            return fail("base_ejection_time", "must be positive");
        }
        if self.max_ejection_time < self.base_ejection_time {
            return fail("max_ejection_time", "must not be shorter than base_ejection_time");
        }
        if self.max_ejection_percent > 100 {
            return fail("max_ejection_percent", "must be between 0 and 100");
        }
        if !(self.slow_start_min_weight > 0.0 && self.slow_start_min_weight <= 1.0) {
            return fail("slow_start_min_weight", "must be in (0, 1]");
        }
        if !(self.slow_start_aggression > 0.0 && self.slow_start_aggression.is_finite()) {
            return fail("slow_start_aggression", "must be a positive number");
        }
        if !(self.turnaround_ewma_alpha > 0.0 && self.turnaround_ewma_alpha <= 1.0) {
            return fail("turnaround_ewma_alpha", "must be in (0, 1]");
        }
        if self.default_turnaround.is_zero() {
            return fail("default_turnaround", "must be positive");
        }
        if self.ejection_level_decay.is_zero() {
            return fail("ejection_level_decay", "must be positive");
        }
        if self.forget_after <= self.heartbeat_grace || self.forget_after <= self.max_ejection_time {
            return fail(
                "forget_after",
                "must be longer than heartbeat_grace and max_ejection_time (a peer is forgotten only after it went silent and its ejection ran out)",
            );
        }
        Ok(())
    }
}

/// Durations as whole milliseconds in configuration files.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_as_json() {
        let config = HealthConfig::default();
        config.validate().expect("defaults should be valid");
        let json = serde_json::to_string(&config).expect("serialize");
        assert!(json.contains("\"heartbeat_grace\":15000"), "{json}");
        let back: HealthConfig = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, config);
        let partial: HealthConfig = serde_json::from_str(r#"{"heartbeat_grace": 2000}"#).expect("partial");
        assert_eq!(partial.heartbeat_grace, Duration::from_secs(2));
        assert_eq!(partial.probation_period, defaults::PROBATION_PERIOD);
    }

    #[test]
    fn out_of_range_thresholds_name_the_field() {
        type Mutation = fn(&mut HealthConfig);
        let cases: [(Mutation, &str); 6] = [
            (|c| c.heartbeat_grace = Duration::ZERO, "heartbeat_grace"),
            (|c| c.consecutive_failures_to_eject = 0, "consecutive_failures_to_eject"),
            (|c| c.max_ejection_time = Duration::from_secs(1), "max_ejection_time"),
            (|c| c.max_ejection_percent = 101, "max_ejection_percent"),
            (|c| c.slow_start_min_weight = 0.0, "slow_start_min_weight"),
            (|c| c.turnaround_ewma_alpha = f64::NAN, "turnaround_ewma_alpha"),
        ];
        for (mutate, field) in cases {
            let mut config = HealthConfig::default();
            mutate(&mut config);
            let err = config.validate().expect_err(field);
            assert!(err.to_string().starts_with(field), "{err}");
            assert_eq!(err.code(), crate::ErrorCode::InvalidArgument);
        }
    }
}
