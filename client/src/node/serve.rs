//! The node's accept loop: plain TCP or rustls, HTTP/1.1 and HTTP/2 on one
//! port (gRPC needs HTTP/2; HTTP/JSON clients may use either), with the
//! connection facts the middleware reads attached to every request.
//!
//! Per connection the loop inserts [`RemoteAddr`] and, after a TLS handshake
//! in which the client presented a certificate, the verified
//! [`ClientCertChain`] into each request's extensions, so principal binding
//! works the same for gRPC and HTTP/JSON. Handshakes run in the
//! connection's own task (bounded in number and time), never in the accept
//! loop. Every connection task is owned by the loop: when the shutdown
//! future resolves the listener closes, open connections get GOAWAY (or
//! `Connection: close`) and up to [`SHUTDOWN_GRACE`] to finish their calls,
//! and whatever is left is then cut.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::defaults::{
    ACCEPT_ERROR_PAUSE, HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT, MAX_CONCURRENT_HANDSHAKES, SHUTDOWN_GRACE,
    TLS_HANDSHAKE_TIMEOUT,
};
pub use super::tls::TlsAcceptorConfig;
use crate::middleware::{ClientCertChain, RemoteAddr};

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener's address could not be read.
    #[error("cannot read the listener's address")]
    Listener(#[source] std::io::Error),
}

/// Serves `router` on `listener` (through TLS when `tls` is set) until
/// `shutdown` resolves, then drains as the [module docs](self) say.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptorConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let local = listener.local_addr().map_err(ServeError::Listener)?;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT);
    let builder = Arc::new(builder);
    let acceptor = tls.map(|tls| tokio_rustls::TlsAcceptor::from(tls.config));
    let handshakes = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tracing::info!(addr = %local, tls = acceptor.is_some(), "serving the mesh node");
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "failed to accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Small unary calls: Nagle would hold their answers back.
        let _ = stream.set_nodelay(true);
        let connection =
            Connection { builder: Arc::clone(&builder), router: router.clone(), remote, watcher: graceful.watcher() };
        match &acceptor {
            None => connections.spawn(connection.serve(TokioIo::new(stream), None)),
            Some(acceptor) => {
                connections.spawn(connection.handshake(acceptor.clone(), stream, Arc::clone(&handshakes)))
            }
        };
    }
    drop(listener);
    tracing::info!(addr = %local, connections = graceful.count(), "stopped accepting; draining connections");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!(addr = %local, "calls still running after the shutdown grace; cutting their connections");
        }
    }
    connections.shutdown().await;
    Ok(())
}

/// One accepted connection and what serving it needs.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: Router,
    remote: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
}

impl Connection {
    async fn handshake(self, acceptor: tokio_rustls::TlsAcceptor, stream: TcpStream, handshakes: Arc<Semaphore>) {
        let Ok(permit) = handshakes.acquire_owned().await else { return };
        let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                // A wrong CA, no common protocol, a port scan: the client's
                // problem, and it learned of it from the alert it got.
                tracing::debug!(peer = %self.remote, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %self.remote, "TLS handshake timed out");
                return;
            }
        };
        drop(permit);
        let chain = stream
            .get_ref()
            .1
            .peer_certificates()
            .filter(|chain| !chain.is_empty())
            .map(|chain| ClientCertChain::new(Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect())));
        self.serve(TokioIo::new(stream), chain).await;
    }

    async fn serve<I>(self, io: TokioIo<I>, chain: Option<ClientCertChain>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let remote = RemoteAddr(self.remote);
        let service = self.router.map_request(move |mut request: http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(remote);
            if let Some(chain) = &chain {
                request.extensions_mut().insert(chain.clone());
            }
            request
        });
        let connection = self.builder.serve_connection(io, TowerToHyperService::new(service));
        if let Err(err) = self.watcher.watch(connection.into_owned()).await {
            tracing::debug!(peer = %self.remote, error = %err, "connection ended with an error");
        }
    }
}
