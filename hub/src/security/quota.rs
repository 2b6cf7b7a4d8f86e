//! Per-principal limits: how many append streams and subscriptions one
//! caller may hold open on a replica. A caller at a limit is refused with
//! RESOURCE_EXHAUSTED naming the limit, before anything is opened; other
//! callers are unaffected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

#[cfg(test)]
mod tests {
    use super::*;

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
