//! Per-principal limits: how many append streams and subscriptions one
//! caller may hold open on a replica, and how fast it may append. A caller
//! at a limit is refused with RESOURCE_EXHAUSTED naming the limit, before
//! anything is opened or written; other callers are unaffected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tonic::Status;

use crate::security::principal::Principal;

/// Open streams of one kind, counted per principal.
#[derive(Debug)]
pub struct StreamQuota {
    /// What is counted, for the refusal: `append streams`, `subscriptions`.
    what: &'static str,
    limit: usize,
    open: Mutex<HashMap<Principal, usize>>,
}

/// One open stream; its count is returned when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    quota: Arc<StreamQuota>,
    principal: Principal,
}

impl StreamQuota {
    /// A quota of `limit` open `what` per principal.
    pub fn new(what: &'static str, limit: usize) -> Arc<Self> {
        Arc::new(Self { what, limit, open: Mutex::new(HashMap::new()) })
    }

    /// Counts one more stream of `principal`, or RESOURCE_EXHAUSTED at the
    /// limit.
    pub fn acquire(self: &Arc<Self>, principal: &Principal) -> Result<StreamPermit, Status> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(principal.clone()).or_default();
        if *count >= self.limit {
            tracing::info!(principal = %principal, limit = self.limit, what = self.what, "refusing a stream over the limit");
            return Err(Status::resource_exhausted(format!(
                "{principal} already holds {} open {} on this replica, the per-principal limit; close one or retry on \
                 another replica",
                self.limit, self.what
            )));
        }
        *count += 1;
        Ok(StreamPermit { quota: self.clone(), principal: principal.clone() })
    }

    /// Streams `principal` holds now.
    pub fn held(&self, principal: &Principal) -> usize {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(principal).copied().unwrap_or(0)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.quota.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.principal) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.principal);
            }
        }
    }
}

/// Events per second per principal: a token bucket of `burst` events
/// refilled at `rate` events per second, one per principal. A batch takes
/// as many tokens as it has events, all or nothing.
#[derive(Debug)]
pub struct AppendRate {
    rate: f64,
    burst: u64,
    buckets: Mutex<HashMap<Principal, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl AppendRate {
    /// `rate` events per second with bursts of `burst` events, per principal.
    pub fn new(rate: f64, burst: u64) -> Arc<Self> {
        Arc::new(Self { rate, burst, buckets: Mutex::new(HashMap::new()) })
    }

    /// Takes `events` tokens of `principal`'s bucket, or RESOURCE_EXHAUSTED
    /// naming the limit when it holds fewer (then nothing is taken).
    pub fn take(&self, principal: &Principal, events: usize) -> Result<(), Status> {
        self.take_at(principal, events, Instant::now())
    }

    fn take_at(&self, principal: &Principal, events: usize, now: Instant) -> Result<(), Status> {
        #[allow(clippy::cast_precision_loss)] // exact below 2^53 events
        let (wanted, burst) = (events as f64, self.burst as f64);
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= crate::defaults::APPEND_RATE_BUCKETS && !buckets.contains_key(principal) {
            // A bucket refilled to the brim is the same as none.
            let (rate, burst) = (self.rate, burst);
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(principal.clone()).or_insert(Bucket { tokens: burst, at: now });
        let refilled = (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate).min(burst);
        *bucket = Bucket { tokens: refilled, at: now.max(bucket.at) };
        if refilled < wanted {
            tracing::info!(principal = %principal, limit = "append rate", events, "refusing a batch over the append rate");
            let advice = if wanted > burst {
                "the batch is larger than the burst; send smaller batches".to_string()
            } else {
                format!("{} events are available now; retry later", refilled.floor())
            };
            return Err(Status::resource_exhausted(format!(
                "append rate: a batch of {events} events is over {principal}'s per-principal limit of {} events/s with \
                 bursts of {} on this replica ({advice}); nothing of it was written",
                self.rate, self.burst
            )));
        }
        bucket.tokens = refilled - wanted;
        Ok(())
    }

    /// Principals with a bucket now (full ones may linger until pruned).
    pub fn principals(&self) -> usize {
        self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_principal_over_its_rate_is_refused_and_others_are_not() {
        let rate = AppendRate::new(10.0, 20);
        let (alice, bob) = (Principal::new("alice"), Principal::new("bob"));
        let start = Instant::now();
        rate.take_at(&alice, 15, start).expect("within the burst");
        let refused = rate.take_at(&alice, 10, start).expect_err("5 left, 10 wanted");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().starts_with("append rate:"), "{}", refused.message());
        assert!(refused.message().contains("10 events/s with bursts of 20"), "{}", refused.message());
        // The refusal took nothing: the 5 left are still there.
        rate.take_at(&alice, 5, start).expect("the refused batch took no tokens");
        rate.take_at(&bob, 20, start).expect("bob has his own bucket");
        // Half a second refills 5 events, never more than the burst.
        rate.take_at(&alice, 5, start + Duration::from_millis(500)).expect("refilled");
        rate.take_at(&alice, 1, start + Duration::from_millis(500)).expect_err("and no more");
        rate.take_at(&alice, 20, start + Duration::from_secs(3600)).expect("full again");
        rate.take_at(&alice, 1, start + Duration::from_secs(3600)).expect_err("the burst caps the refill");
        let too_big = rate.take_at(&bob, 21, start + Duration::from_secs(3600)).expect_err("larger than the burst");
        assert!(too_big.message().contains("larger than the burst"), "{}", too_big.message());
    }

    #[test]
    fn full_buckets_are_dropped_so_memory_stays_bounded() {
        let rate = AppendRate::new(1_000.0, 10);
        let start = Instant::now();
        let many = crate::defaults::APPEND_RATE_BUCKETS * 2;
        for i in 0..many {
            // Each principal appends once; a millisecond later its bucket
            // (10 events at 1,000/s) is full again, so it may be dropped.
            let at = start + Duration::from_millis(u64::try_from(i).expect("small") * 10);
            rate.take_at(&Principal::new(format!("p{i}")), 10, at).expect("within the burst");
        }
        assert!(rate.principals() <= crate::defaults::APPEND_RATE_BUCKETS, "{}", rate.principals());
    }

    #[test]
    fn a_principal_at_its_limit_is_refused_and_others_are_not() {
        let quota = StreamQuota::new("subscriptions", 2);
        let (alice, bob) = (Principal::new("alice"), Principal::new("bob"));
        let first = quota.acquire(&alice).expect("one");
        let _second = quota.acquire(&alice).expect("two");
        let refused = quota.acquire(&alice).expect_err("three is over the limit");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("2 open subscriptions"), "{}", refused.message());
        let _bob = quota.acquire(&bob).expect("bob has his own count");
        drop(first);
        assert_eq!(quota.held(&alice), 1);
        let _again = quota.acquire(&alice).expect("a closed stream frees its place");
    }
}
