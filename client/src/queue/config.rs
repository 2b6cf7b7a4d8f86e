//! A queue's settings and its clock, as its builder configured them.

use std::sync::Arc;
use std::time::Duration;

use super::error::{QueueError, Result};
use crate::clock::{Clock, Timestamp, TokioClock};
use crate::defaults;
use crate::ids::{PeerId, ShardId};

/// Settings of one queue. Every default is a named constant in
/// [`crate::defaults`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue's namespace, e.g. `resourcelease.users`.
    pub shard: ShardId,
    /// The peer hosting the queue (recorded in events the queue causes
    /// itself, such as expiries).
    pub node: PeerId,
    /// Most items held (pending + leased).
    pub capacity: u64,
    /// Pending depth at which backpressure turns on.
    pub high_watermark: u64,
    /// Pending depth at which backpressure turns off again.
    pub low_watermark: u64,
    /// Leases per item before a failure or expiry dead-letters it.
    pub max_attempts: u32,
    /// Lease duration when a worker does not ask for one.
    pub lease_duration: Duration,
    /// Longest lease (and heartbeat extension) granted.
    pub max_lease_duration: Duration,
    /// First delay of the exponential backoff after a failure.
    pub backoff_base: Duration,
    /// Longest backoff delay.
    pub backoff_max: Duration,
}

impl QueueConfig {
    /// The defaults for `shard`, hosted by `node`.
    pub fn new(shard: impl Into<ShardId>, node: impl Into<PeerId>) -> Self {
        Self {
            shard: shard.into(),
            node: node.into(),
            capacity: defaults::CAPACITY,
            high_watermark: defaults::HIGH_WATERMARK,
            low_watermark: defaults::LOW_WATERMARK,
            max_attempts: defaults::MAX_ATTEMPTS,
            lease_duration: defaults::LEASE_DURATION,
            max_lease_duration: defaults::LEASE_DURATION_MAX,
            backoff_base: defaults::BACKOFF_BASE,
            backoff_max: defaults::BACKOFF_MAX,
        }
    }

    /// Checks the settings against each other; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: &str| Err(QueueError::invalid(format!("config.{field}"), reason));
        if self.shard.as_str().trim().is_empty() {
            return invalid("shard", "must not be blank");
        }
        if self.capacity == 0 {
            return invalid("capacity", "must be at least 1");
        }
        if self.high_watermark == 0 || self.high_watermark > self.capacity {
            return invalid("high_watermark", "must be between 1 and capacity");
        }
        if self.low_watermark >= self.high_watermark {
            return invalid("low_watermark", "must be below high_watermark");
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts", "must be at least 1");
        }
        if self.max_lease_duration < defaults::LEASE_DURATION_MIN {
            return invalid("max_lease_duration", "must be at least LEASE_DURATION_MIN");
        }
        if self.lease_duration < defaults::LEASE_DURATION_MIN || self.lease_duration > self.max_lease_duration {
            return invalid("lease_duration", "must be between LEASE_DURATION_MIN and max_lease_duration");
        }
        if self.backoff_base.is_zero() || self.backoff_base > self.backoff_max {
            return invalid("backoff_base", "must be positive and at most backoff_max");
        }
        Ok(())
    }

    #[inline]
    pub(super) fn lease_duration(&self, requested: Option<Duration>) -> Duration {
        // `clamp` would first assert that the bounds are ordered, which
        // `validate` already made sure of.
        requested.unwrap_or(self.lease_duration).max(defaults::LEASE_DURATION_MIN).min(self.max_lease_duration)
    }
}

/// The queue's clock: the default [`TokioClock`] is called directly (every
/// command reads the clock once, and a call through `dyn Clock` cannot be
/// inlined); any other clock through its trait object.
pub(super) enum QueueClock {
    Tokio(TokioClock),
    Other(Arc<dyn Clock>),
}

impl QueueClock {
    pub(super) fn new(clock: impl Clock) -> Self {
        match (&clock as &dyn std::any::Any).downcast_ref::<TokioClock>() {
            Some(tokio) => QueueClock::Tokio(tokio.clone()),
            None => QueueClock::Other(Arc::new(clock)),
        }
    }

    #[inline]
    pub(super) fn now(&self) -> Timestamp {
        match self {
            QueueClock::Tokio(clock) => clock.now(),
            QueueClock::Other(clock) => clock.now(),
        }
    }
}
