//! A tower concurrency limit that tightens while a queue is under
//! backpressure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;
use tower::{Layer, Service};

use super::{BackpressureListener, BackpressureSignal};

/// Two concurrency budgets and a switch between them, flipped by backpressure
/// signals.
///
/// Register it as a queue's [`BackpressureListener`] and put its
/// [`layer`](Self::layer) in the service stack: while the signal is off,
/// at most `normal` requests run at once; while it is on, new requests take
/// permits from the (smaller) `backpressure` budget, so the node sheds load
/// without rejecting. Requests already running keep their permit.
#[derive(Debug)]
pub struct BackpressureAwareConcurrencyLimiter {
    active: AtomicBool,
    normal: Arc<Semaphore>,
    backpressure: Arc<Semaphore>,
}

impl BackpressureAwareConcurrencyLimiter {
    /// A limiter allowing `normal` concurrent requests normally and
    /// `backpressure` while the signal is on.
    pub fn new(normal: usize, backpressure: usize) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicBool::new(false),
            normal: Arc::new(Semaphore::new(normal)),
            backpressure: Arc::new(Semaphore::new(backpressure)),
        })
    }

    /// True while the backpressure budget is in force.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The tower layer drawing on this limiter.
    pub fn layer(self: &Arc<Self>) -> BackpressureAwareConcurrencyLimitLayer {
        BackpressureAwareConcurrencyLimitLayer { limiter: Arc::clone(self) }
    }
}

impl BackpressureListener for BackpressureAwareConcurrencyLimiter {
    fn on_signal(&self, signal: &BackpressureSignal) {
        self.active.store(signal.active, Ordering::Release);
    }
}

/// Applies [`BackpressureAwareConcurrencyLimit`] to a service.
#[derive(Debug, Clone)]
pub struct BackpressureAwareConcurrencyLimitLayer {
    limiter: Arc<BackpressureAwareConcurrencyLimiter>,
}

impl<S> Layer<S> for BackpressureAwareConcurrencyLimitLayer {
    type Service = BackpressureAwareConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BackpressureAwareConcurrencyLimit::new(inner, Arc::clone(&self.limiter))
    }
}

/// Limits in-flight requests to the budget the backpressure signal selects.
///
/// `poll_ready` is pending until a permit of the currently selected budget is
/// free and the inner service is ready; the permit is held until the response
/// future completes or is dropped. If the signal flips while waiting, the
/// wait moves to the other budget.
#[derive(Debug)]
pub struct BackpressureAwareConcurrencyLimit<S> {
    inner: S,
    limiter: Arc<BackpressureAwareConcurrencyLimiter>,
    normal: PollSemaphore,
    backpressure: PollSemaphore,
    /// Which budget the pending wait is on, to cancel it when the signal flips.
    waiting_on_backpressure: Option<bool>,
    permit: Option<OwnedSemaphorePermit>,
}

impl<S: Clone> Clone for BackpressureAwareConcurrencyLimit<S> {
    fn clone(&self) -> Self {
        // A clone waits and holds permits of its own.
        Self::new(self.inner.clone(), Arc::clone(&self.limiter))
    }
}

impl<S> BackpressureAwareConcurrencyLimit<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, limiter: Arc<BackpressureAwareConcurrencyLimiter>) -> Self {
        Self {
            normal: PollSemaphore::new(Arc::clone(&limiter.normal)),
            backpressure: PollSemaphore::new(Arc::clone(&limiter.backpressure)),
            inner,
            limiter,
            waiting_on_backpressure: None,
            permit: None,
        }
    }
}

impl<S, Request> Service<Request> for BackpressureAwareConcurrencyLimit<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.permit.is_none() {
            let under_backpressure = self.limiter.is_active();
            if self.waiting_on_backpressure == Some(!under_backpressure) {
                // The signal flipped while we waited: give up our place in the
                // old budget's queue so it does not hold a permit for nobody.
                if under_backpressure {
                    self.normal = PollSemaphore::new(Arc::clone(&self.limiter.normal));
                } else {
                    self.backpressure = PollSemaphore::new(Arc::clone(&self.limiter.backpressure));
                }
            }
            self.waiting_on_backpressure = Some(under_backpressure);
            let semaphore = if under_backpressure { &mut self.backpressure } else { &mut self.normal };
            let permit = ready!(semaphore.poll_acquire(cx)).expect("the limiter never closes its semaphores");
            self.waiting_on_backpressure = None;
            self.permit = Some(permit);
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let permit = self.permit.take().expect("poll_ready should have acquired a permit before call");
        ResponseFuture { inner: self.inner.call(request), _permit: permit }
    }
}

pin_project_lite::pin_project! {
    /// The response of [`BackpressureAwareConcurrencyLimit`]: the inner future plus
    /// the permit it runs under.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        _permit: OwnedSemaphorePermit,
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::ids::ShardId;
    use tower_test::{assert_request_eq, mock};

    fn signal(active: bool) -> BackpressureSignal {
        BackpressureSignal {
            active,
            pending: 0,
            high: 10,
            low: 5,
            observed_at: Timestamp::EPOCH,
            shard: ShardId::from("resourcelease"),
        }
    }

    #[tokio::test]
    async fn backpressure_swaps_to_the_smaller_budget_and_back() {
        let limiter = BackpressureAwareConcurrencyLimiter::new(2, 1);
        let (mut service, mut handle) = mock::spawn_layer::<&str, &str, _>(limiter.layer());
        let (mut other, _other_handle) = mock::spawn_layer::<&str, &str, _>(limiter.layer());
        let (mut third, _third_handle) = mock::spawn_layer::<&str, &str, _>(limiter.layer());
        handle.allow(10);

        // Normal budget: two requests may run at once.
        assert!(service.poll_ready().is_ready());
        let one = service.call("one");
        assert!(other.poll_ready().is_ready());
        assert!(third.poll_ready().is_pending(), "the normal budget of 2 is used up");
        assert_request_eq!(handle, "one").send_response("1");
        assert_eq!(one.await.ok(), Some("1"));
        assert!(third.poll_ready().is_ready(), "a finished request frees its permit");
        drop((other, third));

        // Under backpressure only one runs at a time.
        limiter.on_signal(&signal(true));
        assert!(limiter.is_active());
        assert!(service.poll_ready().is_ready());
        let held = service.call("held");
        let (mut waiting, _waiting_handle) = mock::spawn_layer::<&str, &str, _>(limiter.layer());
        assert!(waiting.poll_ready().is_pending(), "the backpressure budget of 1 is in use");

        // Back to normal: the waiter moves to the normal budget at once.
        limiter.on_signal(&signal(false));
        assert!(waiting.poll_ready().is_ready());
        assert_request_eq!(handle, "held").send_response("ok");
        assert_eq!(held.await.ok(), Some("ok"));
    }
}
