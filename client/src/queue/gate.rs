//! The shard gate: an async lock with no data, held by one command at a time
//! from validation to the last applied event (across the publish), handed
//! to waiters in arrival order.
//!
//! Why not `tokio::sync::Mutex`: it takes an internal lock on every release
//! and charges the task's cooperative budget on every acquire, which cost
//! about a fifth of an uncontended enqueue -> lease -> complete cycle. Here
//! an uncontended acquire and release are one compare-and-swap each; only a
//! contended gate takes the waiter list's lock. The queue's data stays in a
//! `std::sync::Mutex` that only the gate holder locks, for short synchronous
//! sections, so that lock is never contended and never held across an
//! `.await`.
//!
//! Fairness: once someone waits, the gate is never free between holders: a
//! release hands it straight to the oldest waiter, and newcomers queue
//! behind (no barging), as with tokio's mutex.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// Nobody holds the gate.
const FREE: u8 = 0;
/// Held, nobody waiting.
const HELD: u8 = 1;
/// Held, and the waiter list is not empty (changed only under its lock).
const CONTENDED: u8 = 2;

/// An async lock without data; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: AtomicU8,
    /// Waiters in arrival order. Invariant (under this lock): the list is not
    /// empty exactly when `state` is `CONTENDED`.
    waiters: Mutex<VecDeque<Arc<Waiter>>>,
}

#[derive(Debug, Default)]
struct Waiter {
    slot: Mutex<Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    /// The gate was handed to this waiter.
    granted: bool,
    waker: Option<Waker>,
}

/// Poisoning carries no meaning here: every critical section below leaves the
/// list and slots consistent before anything can panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gate {
    /// A free gate.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Waits for the gate; it is held until the returned permit is dropped.
    #[inline]
    pub(crate) fn acquire(&self) -> Acquire<'_> {
        Acquire { gate: self, waiter: None }
    }

    /// Takes the gate if it is free, without waiting.
    #[inline]
    pub(crate) fn try_permit(&self) -> Option<Permit<'_>> {
        self.try_acquire().then(|| Permit { gate: self })
    }

    #[inline]
    fn try_acquire(&self) -> bool {
        self.state.compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// Frees the gate, or hands it to the oldest waiter.
    #[inline]
    fn release(&self) {
        if self.state.compare_exchange(HELD, FREE, Ordering::Release, Ordering::Relaxed).is_ok() {
            return;
        }
        self.hand_off();
    }

    #[cold]
    fn hand_off(&self) {
        let mut waiters = lock(&self.waiters);
        let next = waiters.pop_front().expect("a contended gate should have a waiter");
        if waiters.is_empty() {
            // Still held: by `next` now.
            self.state.store(HELD, Ordering::Release);
        }
        let waker = {
            let mut slot = lock(&next.slot);
            slot.granted = true;
            slot.waker.take()
        };
        drop(waiters);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Holds the gate; dropping it releases the gate (or hands it on).
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    gate: &'a Gate,
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        self.gate.release();
    }
}

/// The future of [`Gate::acquire`]. Dropping it while it waits leaves the
/// queue; dropping it after the gate was handed to it passes the gate on.
#[derive(Debug)]
pub(crate) struct Acquire<'a> {
    gate: &'a Gate,
    /// Set once this future waits in the list.
    waiter: Option<Arc<Waiter>>,
}

impl<'a> Future for Acquire<'a> {
    type Output = Permit<'a>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit<'a>> {
        let this = self.get_mut();
        if this.waiter.is_none() && this.gate.try_acquire() {
            return Poll::Ready(Permit { gate: this.gate });
        }
        this.poll_slow(cx)
    }
}

impl<'a> Acquire<'a> {
    #[cold]
    fn poll_slow(&mut self, cx: &mut Context<'_>) -> Poll<Permit<'a>> {
        let this = self;
        let gate = this.gate;
        if let Some(waiter) = &this.waiter {
            let mut slot = lock(&waiter.slot);
            if slot.granted {
                drop(slot);
                this.waiter = None;
                return Poll::Ready(Permit { gate });
            }
            if !slot.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                slot.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        if gate.try_acquire() {
            return Poll::Ready(Permit { gate });
        }
        let mut waiters = lock(&gate.waiters);
        loop {
            match gate.state.load(Ordering::Acquire) {
                FREE if gate.try_acquire() => return Poll::Ready(Permit { gate }),
                HELD if gate.state.compare_exchange(HELD, CONTENDED, Ordering::AcqRel, Ordering::Relaxed).is_ok() => {
                    break;
                }
                CONTENDED => break,
                // Released or taken between the load and the exchange.
                _ => {}
            }
        }
        let waiter = Arc::new(Waiter { slot: Mutex::new(Slot { granted: false, waker: Some(cx.waker().clone()) }) });
        waiters.push_back(Arc::clone(&waiter));
        this.waiter = Some(waiter);
        Poll::Pending
    }
}

impl Drop for Acquire<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.waiter.is_some() {
            self.leave();
        }
    }
}

impl Acquire<'_> {
    #[cold]
    fn leave(&mut self) {
        let Some(waiter) = self.waiter.take() else { return };
        let mut waiters = lock(&self.gate.waiters);
        if let Some(position) = waiters.iter().position(|queued| Arc::ptr_eq(queued, &waiter)) {
            waiters.remove(position);
            if waiters.is_empty() {
                self.gate.state.store(HELD, Ordering::Release);
            }
            return;
        }
        drop(waiters);
        // No longer queued, so the gate was handed to us: pass it on.
        self.gate.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[tokio::test]
    async fn an_uncontended_gate_is_taken_and_freed() {
        let gate = Gate::new();
        let permit = gate.acquire().await;
        assert_eq!(gate.state.load(Ordering::Relaxed), HELD);
        drop(permit);
        assert_eq!(gate.state.load(Ordering::Relaxed), FREE);
        let acquire = gate.acquire();
        assert_send(&acquire);
        drop(acquire.await);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_the_gate_in_arrival_order_and_newcomers_queue_behind() {
        let gate = Arc::new(Gate::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = gate.acquire().await;
        let mut tasks = Vec::new();
        for n in 0..4 {
            let (gate, order) = (Arc::clone(&gate), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire().await;
                lock(&order).push(n);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            // Let each task queue before the next arrives.
            tokio::task::yield_now().await;
        }
        drop(first);
        // A newcomer after the release must not overtake the queued waiters.
        let late = gate.acquire().await;
        lock(&order).push(99);
        drop(late);
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(*lock(&order), vec![0, 1, 2, 3, 99]);
        assert_eq!(gate.state.load(Ordering::Relaxed), FREE);
    }

    #[test]
    fn try_permit_fails_without_touching_a_held_gate() {
        let gate = Gate::new();
        let held = gate.try_permit().expect("a free gate");
        assert!(gate.try_permit().is_none());
        assert_eq!(gate.state.load(Ordering::Relaxed), HELD, "still held by the first permit");
        drop(held);
        assert!(gate.try_permit().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let gate = Gate::new();
        let held = gate.acquire().await;
        let cancelled = tokio::time::timeout(Duration::from_millis(5), gate.acquire()).await;
        assert!(cancelled.is_err(), "the gate is held");
        assert_eq!(gate.state.load(Ordering::Relaxed), HELD, "nobody waits any more");
        drop(held);
        assert_eq!(gate.state.load(Ordering::Relaxed), FREE);
    }

    #[tokio::test]
    async fn a_waiter_dropped_after_the_hand_off_passes_the_gate_on() {
        let gate = Gate::new();
        let held = gate.acquire().await;
        let mut handed = Box::pin(gate.acquire());
        let mut next = Box::pin(gate.acquire());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(handed.as_mut().poll(&mut cx).is_pending());
        assert!(next.as_mut().poll(&mut cx).is_pending());
        drop(held);
        // `handed` owns the gate now, without having been polled again.
        drop(handed);
        assert!(matches!(next.as_mut().poll(&mut cx), Poll::Ready(_)), "the gate was passed on");
        assert_eq!(gate.state.load(Ordering::Relaxed), FREE);
    }
}
