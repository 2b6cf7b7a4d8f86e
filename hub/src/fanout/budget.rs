//! The replica's memory budget for subscriptions: one limit in bytes
//! (`--subscription-memory`) for everything the hub holds on behalf of its
//! subscribers, so no number of slow or stalled readers can grow a replica
//! past it.
//!
//! What draws on it:
//!
//! - each subscription, while open, a fixed allowance for what it costs
//!   outside the hub's own queues: the HTTP/2 send buffer of its stream, its
//!   tasks and channels ([`crate::defaults::SUBSCRIPTION_OVERHEAD_BYTES`]),
//!   plus a smaller one per followed shard;
//! - the frames queued for a subscription, from when they are built until the
//!   gRPC stream has taken them and asked for the next one, at their encoded
//!   size; and room reserved for a catch-up page before it is read;
//! - the live tails' recent events, which are a cache: under pressure they
//!   are dropped first, and subscribers read from the store instead.
//!
//! When a subscription needs bytes the budget does not have, the
//! subscription holding the most queued bytes (the one furthest behind) is
//! ended, its frames dropped at once, and its client told to resume from its
//! checkpoint; if that is the one asking, it ends itself. A subscription that
//! cannot even get its fixed allowance (every byte is held by allowances) is
//! refused with RESOURCE_EXHAUSTED.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::telemetry;

/// The budget of one replica. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    limit: usize,
    state: Mutex<State>,
    /// Woken whenever bytes are returned.
    released: Notify,
    /// Highest `used` seen (tests and the gauge's companion).
    peak: AtomicUsize,
}

#[derive(Default)]
struct State {
    used: usize,
    next_id: u64,
    accounts: HashMap<u64, Entry>,
}

struct Entry {
    /// Bytes that only ending the holder returns (allowances).
    fixed: usize,
    /// Bytes of queued frames and reservations: what ending it frees.
    flexible: usize,
    /// Told to end when it is chosen to make room; `None` for holders that
    /// cannot be ended (the live tails).
    evict: Option<Weak<dyn Evict>>,
    /// Already told to end: not chosen again.
    evicted: bool,
}

/// Something the budget can end to make room.
pub(crate) trait Evict: Send + Sync {
    /// Ends the holder and drops what it queued (returning its bytes).
    fn evict(&self);
}

/// Why bytes were not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exhausted {
    /// The bytes asked for.
    pub(crate) wanted: usize,
    /// The budget's limit.
    pub(crate) limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Budget {
        metrics::gauge!(telemetry::SUBSCRIPTION_MEMORY_LIMIT).set(limit as f64);
        metrics::gauge!(telemetry::SUBSCRIPTION_MEMORY).set(0.0);
        Budget {
            inner: Arc::new(Inner {
                limit,
                state: Mutex::new(State::default()),
                released: Notify::new(),
                peak: AtomicUsize::new(0),
            }),
        }
    }

    /// The limit in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        self.inner.lock().used
    }

    /// The most bytes ever held at once.
    pub(crate) fn peak(&self) -> usize {
        self.inner.peak.load(Ordering::Relaxed)
    }

    /// Opens an account; `evict` (if any) is how the budget ends it.
    pub(crate) fn account(&self, evict: Option<Weak<dyn Evict>>) -> Account {
        let mut state = self.inner.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.accounts.insert(id, Entry { fixed: 0, flexible: 0, evict, evicted: false });
        Account { budget: self.clone(), id }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn give_back(&self, id: u64, bytes: usize, fixed: bool) {
        if bytes == 0 {
            return;
        }
        let used = {
            let mut state = self.lock();
            state.used -= bytes;
            if let Some(entry) = state.accounts.get_mut(&id) {
                if fixed {
                    entry.fixed -= bytes;
                } else {
                    entry.flexible -= bytes;
                }
            }
            state.used
        };
        metrics::gauge!(telemetry::SUBSCRIPTION_MEMORY).set(used as f64);
        self.released.notify_waiters();
    }
}

/// One holder's share of the budget: a subscription, or a live tail.
pub(crate) struct Account {
    budget: Budget,
    id: u64,
}

impl Account {
    /// The budget's limit.
    pub(crate) fn limit(&self) -> usize {
        self.budget.limit()
    }

    /// Takes `bytes` as a fixed allowance (returned when the grant drops),
    /// never ending anyone for it: allowances decide how many subscriptions
    /// fit, and a newcomer must not end an older subscriber to get in.
    pub(crate) fn allowance(&self, bytes: usize) -> Result<Grant, Exhausted> {
        match self.take(bytes, true, false) {
            Ok(grant) => Ok(grant),
            Err(_) => Err(Exhausted { wanted: bytes, limit: self.budget.limit() }),
        }
    }

    /// Takes `bytes` for queued frames or a reservation, ending the
    /// subscription furthest behind (by queued bytes) while the budget is
    /// short; fails when this account is that subscription.
    pub(crate) async fn reserve(&self, bytes: usize) -> Result<Grant, Exhausted> {
        loop {
            let released = self.budget.inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.take(bytes, false, true) {
                Ok(grant) => return Ok(grant),
                Err(Pressure::Evicted) => {
                    // Someone was told to end; its bytes come back as its
                    // frames and reservations drop. Wait for that (bounded:
                    // a reservation may be held by a read in progress), then
                    // judge again.
                    if self.budget.used() + bytes > self.budget.limit() {
                        let _ = tokio::time::timeout(crate::defaults::BUDGET_RETRY, released).await;
                    }
                }
                Err(Pressure::Refused) => return Err(Exhausted { wanted: bytes, limit: self.budget.limit() }),
            }
        }
    }

    /// Takes `bytes` only if the budget has them now (for caches).
    pub(crate) fn try_take(&self, bytes: usize) -> Option<Grant> {
        self.take(bytes, false, false).ok()
    }

    fn take(&self, bytes: usize, fixed: bool, evict: bool) -> Result<Grant, Pressure> {
        let inner = &self.budget.inner;
        let victim = {
            let mut state = inner.lock();
            if state.used + bytes <= inner.limit {
                state.used += bytes;
                let used = state.used;
                if let Some(entry) = state.accounts.get_mut(&self.id) {
                    if fixed {
                        entry.fixed += bytes;
                    } else {
                        entry.flexible += bytes;
                    }
                }
                drop(state);
                inner.peak.fetch_max(used, Ordering::Relaxed);
                metrics::gauge!(telemetry::SUBSCRIPTION_MEMORY).set(used as f64);
                return Ok(Grant { budget: Arc::downgrade(inner), id: self.id, bytes, fixed });
            }
            if !evict {
                return Err(Pressure::Refused);
            }
            let mine = state.accounts.get(&self.id).map_or(0, |entry| entry.flexible);
            // The furthest behind: most queued bytes. Never one that holds
            // no more than this account (ending a peer to let a slower one
            // go on would be backwards).
            let chosen = state
                .accounts
                .iter_mut()
                .filter(|(_, entry)| !entry.evicted && entry.evict.is_some() && entry.flexible > 0)
                .max_by_key(|(_, entry)| entry.flexible)
                .filter(|(id, entry)| **id != self.id && entry.flexible > mine);
            match chosen {
                Some((_, entry)) => {
                    entry.evicted = true;
                    entry.evict.as_ref().and_then(Weak::upgrade)
                }
                None => return Err(Pressure::Refused),
            }
        };
        // Outside the lock: ending it returns bytes, which takes the lock.
        if let Some(victim) = victim {
            metrics::counter!(telemetry::SUBSCRIPTIONS_ENDED, telemetry::LABEL_REASON => "memory").increment(1);
            victim.evict();
        }
        Err(Pressure::Evicted)
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.budget.inner.lock().accounts.remove(&self.id);
    }
}

/// Why [`Account::take`] did not grant.
enum Pressure {
    /// Someone was ended to make room: try again.
    Evicted,
    /// Nobody can make room.
    Refused,
}

/// Bytes held from the budget; returned when dropped.
#[derive(Debug)]
pub(crate) struct Grant {
    budget: Weak<Inner>,
    id: u64,
    bytes: usize,
    fixed: bool,
}

impl Grant {
    /// The bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Splits `bytes` (at most what is held) off into a grant of its own.
    pub(crate) fn split(&mut self, bytes: usize) -> Grant {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Grant { budget: self.budget.clone(), id: self.id, bytes, fixed: self.fixed }
    }

    /// Adds `other` (from the same account) to this grant.
    pub(crate) fn merge(&mut self, mut other: Grant) {
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.upgrade() {
            budget.give_back(self.id, self.bytes, self.fixed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder that records being ended and drops its grants then.
    struct Holder {
        ended: std::sync::atomic::AtomicBool,
        grants: Mutex<Vec<Grant>>,
    }

    impl Evict for Holder {
        fn evict(&self) {
            self.ended.store(true, Ordering::SeqCst);
            self.grants.lock().expect("not poisoned").clear();
        }
    }

    fn holder() -> Arc<Holder> {
        Arc::new(Holder { ended: Default::default(), grants: Mutex::new(Vec::new()) })
    }

    fn weak(holder: &Arc<Holder>) -> Option<Weak<dyn Evict>> {
        let holder: Arc<dyn Evict> = holder.clone();
        Some(Arc::downgrade(&holder))
    }

    #[tokio::test]
    async fn the_furthest_behind_is_ended_to_make_room_and_never_the_asker_for_a_slower_one() {
        let budget = Budget::new(100);
        let (slow, fast) = (holder(), holder());
        let slow_account = budget.account(weak(&slow));
        let fast_account = budget.account(weak(&fast));
        let grant = slow_account.reserve(80).await.expect("room");
        slow.grants.lock().expect("not poisoned").push(grant);
        let fast_grant = fast_account.reserve(10).await.expect("room");
        // The fast one needs more than is left: the slow one goes.
        let more = fast_account.reserve(20).await.expect("room after ending the slow one");
        assert!(slow.ended.load(Ordering::SeqCst));
        assert!(!fast.ended.load(Ordering::SeqCst));
        assert_eq!(budget.used(), 30);
        // The slow one, asking for more than fits while holding the most, is
        // refused rather than ending the fast one.
        let grant = slow_account.reserve(60).await.expect("fits");
        slow.grants.lock().expect("not poisoned").push(grant);
        assert_eq!(slow_account.reserve(20).await.expect_err("it is the furthest behind").wanted, 20);
        assert!(!fast.ended.load(Ordering::SeqCst));
        drop((fast_grant, more));
        assert!(budget.peak() <= budget.limit());
    }

    #[test]
    fn allowances_and_caches_never_end_anyone() {
        let budget = Budget::new(100);
        let holder = holder();
        let account = budget.account(weak(&holder));
        let held = account.try_take(70).expect("room");
        holder.grants.lock().expect("not poisoned").push(held);
        let newcomer = budget.account(None);
        assert!(newcomer.allowance(40).is_err());
        assert!(newcomer.try_take(40).is_none());
        assert!(!holder.ended.load(Ordering::SeqCst));
        let mut grant = newcomer.allowance(30).expect("fits");
        let part = grant.split(10);
        assert_eq!((grant.bytes(), part.bytes(), budget.used()), (20, 10, 100));
        drop(part);
        assert_eq!(budget.used(), 90);
        drop(account);
        drop(holder);
        assert_eq!(budget.used(), 20, "grants outlive their account's entry and still return");
        drop(grant);
        assert_eq!(budget.used(), 0);
    }
}
