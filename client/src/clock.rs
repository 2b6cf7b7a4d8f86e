//! Time as an input: the queue reads "now" from an injected [`Clock`], records
//! it in every event, and replay uses the recorded times only.
//!
//! - [`TokioClock`] (the default) follows `tokio::time`, so tests with
//!   `#[tokio::test(start_paused = true)]` move it with `tokio::time::advance`.
//! - [`SystemClock`] reads the wall clock directly.
//! - [`ManualClock`] only moves when told to; property tests use it for time
//!   jumps.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: nanoseconds since the Unix epoch.
///
/// Plain integer arithmetic keeps events and queue state free of platform
/// time types, so an encoded state is the same on every machine.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch; also "unset" in events.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp from nanoseconds since the Unix epoch.
    pub const fn from_unix_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn as_unix_nanos(self) -> u64 {
        self.0
    }

    /// A timestamp from a `SystemTime`; times before the epoch clamp to it.
    pub fn from_system_time(time: SystemTime) -> Self {
        let nanos = time.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Self(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// This time plus `duration`, saturating at the far future.
    #[inline]
    pub fn saturating_add(self, duration: Duration) -> Self {
        // In 64-bit steps: `as_nanos` would multiply in 128 bits.
        let nanos = duration.as_secs().saturating_mul(1_000_000_000).saturating_add(u64::from(duration.subsec_nanos()));
        Self(self.0.saturating_add(nanos))
    }

    /// How long after `earlier` this time is (zero if it is not later).
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}.{:09})", self.0 / 1_000_000_000, self.0 % 1_000_000_000)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}s", self.0 / 1_000_000_000, self.0 % 1_000_000_000)
    }
}

/// A source of "now" for the queue and its sweeper.
///
/// Implementations must be cheap (the queue reads the clock on every command)
/// and should not go backwards; the queue tolerates a clock that does by never
/// letting recorded times decrease.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// A shared clock is a clock, so one clock can drive every queue of a node.
impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// Wall time anchored once, then advanced by `tokio::time::Instant`.
///
/// Under a paused tokio runtime the clock stands still until the test calls
/// `tokio::time::advance` (or the runtime auto-advances to the next timer), so
/// expiry and backoff are tested without sleeping. It is also monotonic, which
/// the raw wall clock is not.
#[derive(Debug, Clone)]
pub struct TokioClock {
    anchor_wall: Timestamp,
    anchor: tokio::time::Instant,
}

impl TokioClock {
    /// A clock anchored at the current wall time and tokio instant.
    pub fn new() -> Self {
        Self { anchor_wall: SystemClock.now(), anchor: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    #[inline]
    fn now(&self) -> Timestamp {
        // tokio's `Instant::now` (which follows paused time) and std's
        // subtraction, without tokio's wrappers around it.
        let elapsed = tokio::time::Instant::now().into_std().saturating_duration_since(self.anchor.into_std());
        self.anchor_wall.saturating_add(elapsed)
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self { nanos: Arc::new(AtomicU64::new(start.as_unix_nanos())) }
    }

    /// Moves the clock forward by `duration`.
    pub fn advance(&self, duration: Duration) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::SeqCst);
    }

    /// Sets the clock to `time`.
    pub fn set(&self, time: Timestamp) {
        self.nanos.store(time.as_unix_nanos(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_add_and_subtract_without_overflow() {
        let t = Timestamp::from_unix_nanos(5);
        assert_eq!(t.saturating_add(Duration::from_nanos(7)).as_unix_nanos(), 12);
        assert_eq!(Timestamp::from_unix_nanos(u64::MAX - 1).saturating_add(Duration::MAX).as_unix_nanos(), u64::MAX);
        assert_eq!(t.saturating_duration_since(Timestamp::from_unix_nanos(9)), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TokioClock::new();
        let before = clock.now();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(clock.now().saturating_duration_since(before), Duration::from_secs(30));
    }

    #[test]
    fn manual_clock_clones_share_time() {
        let clock = ManualClock::new(Timestamp::from_unix_nanos(1_000));
        let other = clock.clone();
        clock.advance(Duration::from_nanos(500));
        assert_eq!(other.now().as_unix_nanos(), 1_500);
    }
}
