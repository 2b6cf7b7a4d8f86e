//! Readiness: whether this replica can serve, as the gRPC health service,
//! `/readyz` and the `omnirelay_hub_ready` gauge report it.
//!
//! A replica is ready when its store answers a probe (reachable, schema
//! current), its store can write (no append has failed for a full disk, a
//! read-only store or an I/O error since the last one that succeeded, see
//! [`WriteHealth`]), and it is not shutting down. [`Health`] owns that
//! judgement: every probe, whether from `/readyz`, from a gRPC health
//! `Check` or from the periodic [`Health::monitor`], updates the standard
//! gRPC health service (`grpc.health.v1.Health`, for the overall server `""`
//! and for `omnirelay.hub.v1.Hub`) and the gauge. `/readyz` and `Check`
//! both probe on demand (callers arriving during a probe share it), so they
//! never disagree; `Watch`
//! streams hear every change any probe finds, and the monitor probes at
//! once when appends start or stop failing. Once shutdown starts the status
//! is NOT_SERVING for good.
//!
//! The gRPC health service is implemented here (on tonic-health's generated
//! types) rather than taken from tonic-health's reporter, for one reason:
//! shutdown. A `Watch` stream never ends by itself, so a load balancer
//! watching a replica would hold the graceful drain open until the grace
//! period ran out. Here every `Watch` stream delivers NOT_SERVING and then
//! ends when shutdown begins, while `Check` keeps answering NOT_SERVING.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health as GrpcHealth, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::defaults;
use crate::store::{AppendAck, Fault, StoreError};
use crate::telemetry;

/// The gRPC service names whose status the hub reports: the overall server
/// (the empty name, per the health-checking protocol) and the Hub service.
pub const REPORTED_SERVICES: [&str; 2] = ["", crate::proto::hub::v1::hub_server::SERVICE_NAME];

/// A future returned by a [`Probe`].
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), NotReady>> + Send + 'a>>;

/// Something whose state decides readiness: the store.
pub trait Probe: Send + Sync + 'static {
    /// Checks that the store is reachable and its schema current. Called
    /// with a timeout; it need not bound itself.
    fn check(&self) -> ProbeFuture<'_>;

    /// Records gauges sampled rather than counted (the pool's size, idle and
    /// waiting counts); called before each `/metrics` render.
    fn record_gauges(&self) {}
}

/// Why the replica is not ready; the text is what `/readyz` answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// The store cannot be reached or failed the probe query.
    #[error("store unreachable: {0}")]
    Unreachable(String),
    /// The database's schema is not the one this build needs.
    #[error("{0}")]
    Schema(String),
    /// The probe did not answer within the readiness timeout.
    #[error("store probe timed out after {0:?}")]
    Timeout(Duration),
    /// The store answers reads but appends fail: a full disk, a read-only
    /// store, an I/O error.
    #[error("store cannot write: {0}")]
    CannotWrite(String),
    /// The replica is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

/// What the gRPC health service reports (the same for every reported
/// service name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reported {
    serving: bool,
    shutting_down: bool,
}

/// Whether the store can write, as this replica's appends show it. A read
/// probe cannot tell a full disk from a healthy one, so the appends are the
/// witness: one failing for a fault that stops writes ([`Fault::blocks_writes`])
/// makes the replica not ready; the next one that succeeds makes it ready
/// again. Because a replica that is not ready may get no appends to prove
/// itself with, the verdict also lapses [`defaults::WRITE_FAULT_HOLD`]
/// after the last failure, and the next append judges again.
#[derive(Debug, Default)]
pub struct WriteHealth {
    failed: Mutex<Option<WriteFailure>>,
    changed: Notify,
}

#[derive(Debug, Clone)]
struct WriteFailure {
    fault: Fault,
    /// The whole cause, for `/readyz` and the log (operators only).
    cause: String,
    at: Instant,
}

impl WriteHealth {
    /// Records the outcome of one append batch.
    pub fn observe(&self, result: &Result<AppendAck, StoreError>) {
        let mut failed = self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match result {
            Ok(_) => {
                if let Some(was) = failed.take() {
                    tracing::info!(fault = was.fault.label(), "appends succeed again; the store can write");
                    self.changed.notify_one();
                }
            }
            Err(err) => {
                let Some(fault) = err.fault().filter(|fault| fault.blocks_writes()) else { return };
                let cause = crate::store::causes(err);
                if failed.is_none() {
                    tracing::warn!(fault = fault.label(), error = %cause, "appends fail: the store cannot write");
                    self.changed.notify_one();
                }
                *failed = Some(WriteFailure { fault, cause, at: Instant::now() });
            }
        }
    }

    /// Why the store cannot write, if an append failed for that reason less
    /// than [`defaults::WRITE_FAULT_HOLD`] ago and none succeeded since.
    pub fn blocked(&self) -> Option<NotReady> {
        let failed = self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let failure = failed.as_ref().filter(|failure| failure.at.elapsed() < defaults::WRITE_FAULT_HOLD)?;
        Some(NotReady::CannotWrite(format!(
            "{} (the last append failed {:.0?} ago: {})",
            failure.fault.describe(),
            failure.at.elapsed(),
            failure.cause
        )))
    }
}

/// The last probe's result and when it finished, shared with the callers
/// that were waiting for it.
struct LastProbe {
    at: Instant,
    result: Result<(), NotReady>,
}

/// The replica's readiness, shared by the gRPC health service, the admin
/// server and the shutdown sequence.
pub struct Health {
    reported: watch::Sender<Reported>,
    probe: Arc<dyn Probe>,
    writes: Arc<WriteHealth>,
    shutting_down: AtomicBool,
    /// Serialises probes: a caller that finds, once it holds the lock, a
    /// result finished after it asked uses it instead of probing again.
    last: tokio::sync::Mutex<Option<LastProbe>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("reported", &*self.reported.borrow()).finish_non_exhaustive()
    }
}

impl Health {
    /// Starts NOT_SERVING until the first successful probe.
    pub async fn new(probe: Arc<dyn Probe>) -> Self {
        Self::with_writes(probe, Arc::new(WriteHealth::default())).await
    }

    /// [`Health::new`], also judging by `writes` (which the Hub service
    /// feeds with its appends' outcomes).
    pub async fn with_writes(probe: Arc<dyn Probe>, writes: Arc<WriteHealth>) -> Self {
        let (reported, _) = watch::channel(Reported { serving: false, shutting_down: false });
        let health = Self {
            reported,
            probe,
            writes,
            shutting_down: AtomicBool::new(false),
            last: tokio::sync::Mutex::new(None),
        };
        health.publish(false);
        health
    }

    /// The `grpc.health.v1.Health` service to add to the gRPC server. Its
    /// `Check` probes like `/readyz` does.
    pub fn grpc_service(self: &Arc<Self>) -> HealthServer<HealthService> {
        HealthServer::new(HealthService { reported: self.reported.subscribe(), health: Some(self.clone()) })
    }

    /// The probe this readiness is judged by.
    pub fn probe(&self) -> &Arc<dyn Probe> {
        &self.probe
    }

    /// Judges readiness now: the store probe (bounded by
    /// [`defaults::READINESS_TIMEOUT`]; callers that arrive while a probe
    /// runs share its result, so a burst of health checks costs one query),
    /// the appends' verdict and shutdown; publishes the result.
    pub async fn check(&self) -> Result<(), NotReady> {
        let result = if self.is_shutting_down() {
            Err(NotReady::ShuttingDown)
        } else {
            let asked = Instant::now();
            let mut last = self.last.lock().await;
            let probed = match last.as_ref() {
                Some(shared) if shared.at >= asked => shared.result.clone(),
                _ => {
                    let result = match tokio::time::timeout(defaults::READINESS_TIMEOUT, self.probe.check()).await {
                        Ok(result) => result,
                        Err(_) => Err(NotReady::Timeout(defaults::READINESS_TIMEOUT)),
                    };
                    *last = Some(LastProbe { at: Instant::now(), result: result.clone() });
                    result
                }
            };
            drop(last);
            probed.and_then(|()| self.writes.blocked().map_or(Ok(()), Err))
        };
        self.publish(result.is_ok());
        result
    }

    /// Marks the replica as shutting down: NOT_SERVING from now on, and
    /// every health `Watch` stream ends after telling its watcher so.
    pub async fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.publish(false);
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Probes every `interval` until `stop` is cancelled, logging changes.
    pub async fn monitor(&self, interval: Duration, stop: CancellationToken) {
        let mut was_ready = None;
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return,
                result = self.check() => result,
            };
            let ready = result.is_ok();
            if was_ready != Some(ready) {
                match &result {
                    Ok(()) => tracing::info!("ready: serving"),
                    Err(why) => tracing::warn!(reason = %why, "not ready: not serving"),
                }
                was_ready = Some(ready);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
                // Appends started or stopped failing: judge now, so Watch
                // streams hear it without waiting for the interval.
                () = self.writes.changed.notified() => {}
            }
        }
    }

    fn publish(&self, ready: bool) {
        // Shutdown may have begun while a probe ran; it must win.
        let shutting_down = self.is_shutting_down();
        let now = Reported { serving: ready && !shutting_down, shutting_down };
        // Watchers hear about changes only, as the protocol asks.
        self.reported.send_if_modified(|reported| std::mem::replace(reported, now) != now);
        metrics::gauge!(telemetry::READY).set(if now.serving { 1.0 } else { 0.0 });
    }
}

/// The `grpc.health.v1.Health` service of a replica (see the module
/// documentation for why it is not tonic-health's).
#[derive(Debug, Clone)]
pub struct HealthService {
    reported: watch::Receiver<Reported>,
    /// Probed by `Check`; `None` answers from the last published status.
    health: Option<Arc<Health>>,
}

impl HealthService {
    fn status(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        if !REPORTED_SERVICES.contains(&service) {
            return Err(tonic::Status::not_found(format!("service {service:?} is not reported by this server")));
        }
        Ok(wire_status(*self.reported.borrow()))
    }
}

fn wire_status(reported: Reported) -> ServingStatus {
    if reported.serving { ServingStatus::Serving } else { ServingStatus::NotServing }
}

/// A health `Watch` stream.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl GrpcHealth for HealthService {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.status(&request.get_ref().service)?;
        // Judge now, as `/readyz` does, rather than answer with what the
        // monitor saw up to an interval ago.
        if let Some(health) = &self.health {
            let _ = health.check().await;
        }
        let status = self.status(&request.get_ref().service)?;
        Ok(tonic::Response::new(HealthCheckResponse { status: status as i32 }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<WatchStream>, tonic::Status> {
        self.status(&request.get_ref().service)?;
        // The current status first, then every change; after the status
        // that announces shutdown, the stream ends.
        let stream = futures_util::stream::unfold(Some((self.reported.clone(), true)), |state| async move {
            let (mut reported, first) = state?;
            if !first && reported.changed().await.is_err() {
                return None;
            }
            let now = *reported.borrow_and_update();
            let next = (!now.shutting_down).then_some((reported, false));
            Some((Ok(HealthCheckResponse { status: wire_status(now) as i32 }), next))
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use std::sync::Mutex;

    /// A probe whose answer the test sets.
    struct Scripted(Mutex<Result<(), NotReady>>);

    impl Probe for Scripted {
        fn check(&self) -> ProbeFuture<'_> {
            let answer = self.0.lock().expect("not poisoned").clone();
            Box::pin(async move { answer })
        }
    }

    /// A probe that never answers.
    struct Hanging;

    impl Probe for Hanging {
        fn check(&self) -> ProbeFuture<'_> {
            Box::pin(std::future::pending())
        }
    }

    async fn status(health: &Health, service: &str) -> ServingStatus {
        let service_impl = HealthService { reported: health.reported.subscribe(), health: None };
        let response =
            GrpcHealth::check(&service_impl, tonic::Request::new(HealthCheckRequest { service: service.into() }))
                .await
                .expect("reported services are registered");
        ServingStatus::try_from(response.into_inner().status).expect("a known status")
    }

    #[tokio::test]
    async fn starts_not_serving_until_a_probe_succeeds() {
        let probe = Arc::new(Scripted(Mutex::new(Ok(()))));
        let health = Health::new(probe).await;
        for service in REPORTED_SERVICES {
            assert_eq!(status(&health, service).await, ServingStatus::NotServing, "{service:?}");
        }
        health.check().await.expect("probe says ready");
        for service in REPORTED_SERVICES {
            assert_eq!(status(&health, service).await, ServingStatus::Serving, "{service:?}");
        }
    }

    #[tokio::test]
    async fn failing_probe_turns_not_serving_and_back() {
        let probe = Arc::new(Scripted(Mutex::new(Ok(()))));
        let health = Health::new(probe.clone()).await;
        health.check().await.expect("ready");
        *probe.0.lock().expect("not poisoned") = Err(NotReady::Unreachable("connection refused".into()));
        assert_eq!(health.check().await, Err(NotReady::Unreachable("connection refused".into())));
        assert_eq!(status(&health, "").await, ServingStatus::NotServing);
        *probe.0.lock().expect("not poisoned") = Ok(());
        health.check().await.expect("ready again");
        assert_eq!(status(&health, "").await, ServingStatus::Serving);
    }

    #[tokio::test]
    async fn shutdown_is_final() {
        let health = Health::new(Arc::new(Scripted(Mutex::new(Ok(()))))).await;
        health.check().await.expect("ready");
        health.set_shutting_down().await;
        assert_eq!(status(&health, REPORTED_SERVICES[1]).await, ServingStatus::NotServing);
        assert_eq!(health.check().await, Err(NotReady::ShuttingDown));
        assert_eq!(status(&health, "").await, ServingStatus::NotServing);
    }

    #[tokio::test]
    async fn watch_streams_deliver_not_serving_then_end_at_shutdown() {
        let health = Health::new(Arc::new(Scripted(Mutex::new(Ok(()))))).await;
        let service = HealthService { reported: health.reported.subscribe(), health: None };
        let mut watch = GrpcHealth::watch(&service, tonic::Request::new(HealthCheckRequest { service: String::new() }))
            .await
            .expect("watch")
            .into_inner();
        async fn next(watch: &mut WatchStream) -> Option<i32> {
            watch.next().await.map(|item| item.expect("no error").status)
        }
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing as i32), "the current status first");
        health.check().await.expect("ready");
        health.check().await.expect("still ready: no repeated message");
        assert_eq!(next(&mut watch).await, Some(ServingStatus::Serving as i32));
        health.set_shutting_down().await;
        assert_eq!(next(&mut watch).await, Some(ServingStatus::NotServing as i32));
        assert_eq!(next(&mut watch).await, None, "the stream ends so the drain need not wait for it");
        // Check still answers during the drain.
        assert_eq!(status(&health, "").await, ServingStatus::NotServing);
    }

    #[tokio::test]
    async fn unknown_services_are_not_found() {
        let health = Health::new(Arc::new(Scripted(Mutex::new(Ok(()))))).await;
        let service = HealthService { reported: health.reported.subscribe(), health: None };
        let err =
            GrpcHealth::check(&service, tonic::Request::new(HealthCheckRequest { service: "other.Service".into() }))
                .await
                .expect_err("only the hub's services are reported");
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_probe_times_out_as_not_ready() {
        let health = Health::new(Arc::new(Hanging)).await;
        assert_eq!(health.check().await, Err(NotReady::Timeout(defaults::READINESS_TIMEOUT)));
        assert_eq!(status(&health, "").await, ServingStatus::NotServing);
    }

    #[tokio::test(start_paused = true)]
    async fn monitor_follows_the_probe_and_stops_when_cancelled() {
        let probe = Arc::new(Scripted(Mutex::new(Ok(()))));
        let health = Arc::new(Health::new(probe.clone()).await);
        let stop = CancellationToken::new();
        let monitor = tokio::spawn({
            let (health, stop) = (health.clone(), stop.clone());
            async move { health.monitor(Duration::from_secs(1), stop).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(status(&health, "").await, ServingStatus::Serving);
        *probe.0.lock().expect("not poisoned") = Err(NotReady::Unreachable("down".into()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(status(&health, "").await, ServingStatus::NotServing);
        stop.cancel();
        monitor.await.expect("the monitor should stop without panicking");
    }
}
