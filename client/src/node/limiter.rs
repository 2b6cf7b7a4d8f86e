//! The node's concurrency-limiter slot: each namespace's calls draw on that
//! namespace's [`BackpressureAwareConcurrencyLimiter`].

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::Request;
use tower::{Layer, Service, ServiceExt};

use crate::backpressure::{BackpressureAwareConcurrencyLimit, BackpressureAwareConcurrencyLimiter};
use crate::ids::ShardId;
use crate::middleware::RpcRoute;

/// Layer of [`NamespaceConcurrencyLimit`], for the middleware's concurrency-limiter slot.
#[derive(Debug, Clone)]
pub struct NamespaceConcurrencyLimitLayer {
    limiters: Arc<HashMap<ShardId, Arc<BackpressureAwareConcurrencyLimiter>>>,
}

impl NamespaceConcurrencyLimitLayer {
    /// Limits each namespace's calls with its own limiter.
    pub fn new(limiters: HashMap<ShardId, Arc<BackpressureAwareConcurrencyLimiter>>) -> Self {
        Self { limiters: Arc::new(limiters) }
    }

    /// The limiter of a namespace, `None` when the node does not host it.
    pub fn limiter(&self, namespace: &ShardId) -> Option<&Arc<BackpressureAwareConcurrencyLimiter>> {
        self.limiters.get(namespace)
    }
}

impl<S> Layer<S> for NamespaceConcurrencyLimitLayer {
    type Service = NamespaceConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        NamespaceConcurrencyLimit { inner, limiters: Arc::clone(&self.limiters) }
    }
}

/// Runs each call under the concurrency budget of its namespace's queue:
/// the normal budget, or the smaller one while that queue is under
/// backpressure. A queue under backpressure therefore slows only its own
/// callers, never the node's other namespaces.
///
/// The permit is awaited inside the call (the namespace is known only
/// there), so the wait is bounded by the call's deadline, which the
/// deadline layer further out enforces. Calls for namespaces the node does
/// not host pass straight through (the service answers NOT_FOUND).
/// `poll_ready` is the inner service's readiness.
#[derive(Debug, Clone)]
pub struct NamespaceConcurrencyLimit<S> {
    inner: S,
    limiters: Arc<HashMap<ShardId, Arc<BackpressureAwareConcurrencyLimiter>>>,
}

impl<S, B> Service<Request<B>> for NamespaceConcurrencyLimit<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limiter = request
            .extensions()
            .get::<RpcRoute>()
            .and_then(|route| route.namespace.as_ref())
            .and_then(|namespace| self.limiters.get(namespace))
            .cloned();
        // The readied service takes the call; a clone stays for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        match limiter {
            None => {
                let mut inner = inner;
                inner.call(request).boxed()
            }
            Some(limiter) => BackpressureAwareConcurrencyLimit::new(inner, limiter).oneshot(request).boxed(),
        }
    }
}
