//! The HTTP admin server: `/healthz`, `/readyz` and `/metrics`, on its own
//! listener (`--admin-listen`) so probes and scrapes never compete with gRPC
//! traffic and can be firewalled separately.
//!
//! - `GET /healthz` answers 200 while the process runs (liveness: restart
//!   the pod only when this fails).
//! - `GET /readyz` probes the store now and answers 200 when the replica is
//!   ready, else 503 with the reason (readiness: take the pod out of the
//!   Service).
//! - `GET /metrics` renders the Prometheus text format from the hub's
//!   recorder (see [`crate::telemetry`]), after sampling the pool gauges.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::replica::health::Health;

/// How often histogram samples are folded into buckets between scrapes, so
/// an unscraped replica's memory stays bounded (the exporter's own default).
pub const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    prometheus: PrometheusHandle,
}

/// The admin routes.
pub fn router(health: Arc<Health>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { health, prometheus })
}

/// Serves the admin routes on `listener` until `stop` is cancelled, running
/// the metrics upkeep meanwhile.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    prometheus: PrometheusHandle,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = tokio::spawn({
        let (prometheus, stop) = (prometheus.clone(), stop.clone());
        async move {
            let mut interval = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = interval.tick() => prometheus.run_upkeep(),
                }
            }
        }
    });
    let served =
        axum::serve(listener, router(health, prometheus)).with_graceful_shutdown(stop.clone().cancelled_owned()).await;
    // The server also ends on an IO error; the upkeep must end with it.
    stop.cancel();
    if let Err(err) = upkeep.await {
        tracing::error!(error = %err, "metrics upkeep task failed");
    }
    served
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.health.check().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    state.health.probe().record_gauges();
    ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], state.prometheus.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::health::{NotReady, Probe, ProbeFuture};
    use crate::telemetry;
    use axum::body::Body;
    use http_body_util::BodyExt as _;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::ServiceExt as _;

    #[derive(Default)]
    struct Scripted {
        answer: Mutex<Option<NotReady>>,
        gauge_samples: AtomicU32,
    }

    impl Probe for Scripted {
        fn check(&self) -> ProbeFuture<'_> {
            let answer = self.answer.lock().expect("not poisoned").clone();
            Box::pin(async move { answer.map_or(Ok(()), Err) })
        }

        fn record_gauges(&self) {
            self.gauge_samples.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn get(router: &Router, path: &str) -> (StatusCode, String) {
        let request = http::Request::get(path).body(Body::empty()).expect("valid request");
        let response = router.clone().oneshot(request).await.expect("axum routers are infallible");
        let status = response.status();
        let body = response.into_body().collect().await.expect("body should read").to_bytes();
        (status, String::from_utf8(body.to_vec()).expect("UTF-8 body"))
    }

    async fn admin(probe: Arc<Scripted>) -> (Router, Arc<Health>) {
        let health = Arc::new(Health::new(probe).await);
        (router(health.clone(), crate::telemetry::prometheus()), health)
    }

    #[tokio::test]
    async fn healthz_answers_while_not_ready() {
        let probe = Arc::new(Scripted::default());
        *probe.answer.lock().expect("not poisoned") = Some(NotReady::Unreachable("refused".into()));
        let (router, _) = admin(probe).await;
        assert_eq!(get(&router, "/healthz").await, (StatusCode::OK, "ok\n".into()));
    }

    #[tokio::test]
    async fn readyz_reports_the_probe_and_the_reason() {
        let probe = Arc::new(Scripted::default());
        let (router, health) = admin(probe.clone()).await;
        assert_eq!(get(&router, "/readyz").await, (StatusCode::OK, "ready\n".into()));
        *probe.answer.lock().expect("not poisoned") = Some(NotReady::Unreachable("connection refused".into()));
        let (status, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("connection refused"), "{body}");
        *probe.answer.lock().expect("not poisoned") = None;
        health.set_shutting_down().await;
        assert_eq!(
            get(&router, "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down\n".into())
        );
    }

    #[tokio::test]
    async fn metrics_render_the_catalog_and_sample_gauges() {
        let probe = Arc::new(Scripted::default());
        let (router, _) = admin(probe.clone()).await;
        let (status, body) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        for name in [
            telemetry::APPEND_BATCHES,
            telemetry::APPEND_EVENTS,
            telemetry::APPEND_LATENCY,
            telemetry::DB_LATENCY,
            telemetry::SUBSCRIBERS,
            telemetry::DB_ERRORS,
            telemetry::READY,
            telemetry::TLS_HANDSHAKE_FAILURES,
        ] {
            assert!(body.contains(&format!("# TYPE {name} ")), "{name} missing from:\n{body}");
        }
        assert!(body.contains("omnirelay_hub_append_batches_total{outcome=\"stale_epoch\"} 0"), "{body}");
        assert_eq!(probe.gauge_samples.load(Ordering::SeqCst), 1);
    }
}
