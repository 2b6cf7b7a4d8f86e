//! Stopping gracefully: the signals that start it and the order it follows.
//!
//! On SIGTERM or SIGINT (or the `shutdown` future handed to
//! [`serve_grpc`]) the hub:
//!
//! 1. reports NOT_SERVING (gRPC health, `/readyz`, the ready gauge), so load
//!    balancers and Kubernetes stop sending new work;
//! 2. cancels the [`Draining`] token, on which long streams (Subscribe,
//!    Append) end themselves with UNAVAILABLE so their clients reconnect to
//!    another replica and resume from their checkpoints;
//! 3. stops accepting connections (the listening socket closes) and sends
//!    HTTP/2 GOAWAY on open ones, letting in-flight calls finish;
//! 4. waits at most the grace period (`--shutdown-grace`) for them, then
//!    cuts the connections still open (their reads and writes fail);
//! 5. returns, so the caller closes the store (pool) and the admin server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::replica::health::Health;
use crate::security::tls::ServerTls;
use crate::security::transport;
use crate::telemetry;

/// HTTP/2 keepalive ping interval on gRPC connections: a client that
/// vanished without closing (a killed pod, a dropped NAT entry) is noticed
/// within interval plus timeout, so its Subscribe stream stops holding
/// resources.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a keepalive ping may go unanswered before the connection is
/// closed.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long cut connections get to notice and close: they only need to be
/// polled once, so anything longer means a stuck task, not slow IO.
pub const CUT_WAIT: Duration = Duration::from_secs(1);

/// Cancelled when shutdown begins; long-lived streams watch it and end so
/// the drain does not wait for the grace period.
pub type Draining = CancellationToken;

/// Resolves on SIGTERM or SIGINT, naming the signal.
pub async fn signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}

/// What [`serve_grpc`] needs besides the routes.
#[derive(Debug)]
pub struct GrpcServing {
    /// The bound listener.
    pub listener: TcpListener,
    /// TLS, when configured.
    pub tls: Option<Arc<ServerTls>>,
    /// Readiness, turned NOT_SERVING when shutdown begins.
    pub health: Arc<Health>,
    /// Cancelled when shutdown begins.
    pub draining: Draining,
    /// Longest wait for open calls and streams after accepting stopped.
    pub grace: Duration,
}

/// Errors of the gRPC server itself.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The server failed (not a request: the server).
    #[error("the gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `routes` (the health service is added here) until `shutdown`
/// resolves, then drains in the order the module documentation gives.
pub async fn serve_grpc(
    routes: tonic::service::Routes,
    serving: GrpcServing,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let GrpcServing { listener, tls, health, draining, grace } = serving;
    let local = listener.local_addr().map_or_else(|err| format!("unknown ({err})"), |addr| addr.to_string());
    let stop_accepting = CancellationToken::new();
    let cut = CancellationToken::new();
    let routes = routes.add_service(health.grpc_service());
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        // Every call, the Hub's and the health service's alike, runs in one
        // request span (exported over OTLP when configured).
        .trace_fn(telemetry::traces::request_span)
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL.
        .layer(crate::api::decoding::DecodeErrorsLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            transport::incoming(listener, tls, cut.clone()),
            stop_accepting.clone().cancelled_owned(),
        );
    tokio::pin!(server);

    tokio::select! {
        result = &mut server => {
            // Only an error ends the server before the signal.
            result?;
            return Ok(());
        }
        () = shutdown => {}
    }
    tracing::info!(listen = %local, grace = ?grace, "shutting down: not serving, draining streams");
    health.set_shutting_down().await;
    draining.cancel();
    stop_accepting.cancel();
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => {
            result?;
            tracing::info!("all calls finished");
        }
        Err(_) => {
            tracing::warn!(grace = ?grace, "grace period over; cutting the remaining connections");
            cut.cancel();
            if tokio::time::timeout(CUT_WAIT, &mut server).await.is_err() {
                tracing::warn!("connections still open after being cut; leaving them");
            }
        }
    }
    Ok(())
}
