//! Accepting gRPC connections: plain TCP or TLS, with the caller's identity
//! attached to every request.
//!
//! [`incoming`] turns a bound listener into the stream of connections tonic
//! serves. TLS handshakes run concurrently (bounded in number and time) in a
//! task set the stream owns, so a slow or hostile client never blocks the
//! accept loop, and dropping the stream (tonic does when shutdown starts)
//! closes the listening socket and aborts handshakes in flight. Failed
//! handshakes are logged and counted, never surfaced to tonic.
//!
//! Each [`Connection`] carries a [`ConnectionInfo`] (remote address and, under
//! mutual TLS, the [`Principal`]); tonic copies it into every request's
//! extensions, where [`principal`] finds it.

use std::convert::Infallible;
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::defaults;
use omnirelay_identity::{ClientCertChain, CredentialError};

use crate::security::principal::Principal;
use crate::security::tls::ServerTls;
use crate::telemetry;

/// What the hub knows about the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The certificate's principal (its single URI SAN); `Some` exactly
    /// when mutual TLS is on.
    pub principal: Option<Principal>,
    /// The verified client certificate chain, leaf first, under mutual TLS:
    /// what the identity layer binds a caller from (see [`crate::security::access`]).
    pub client_certs: Option<ClientCertChain>,
}

/// The principal of the connection a request arrived on, if authenticated.
pub fn principal<T>(request: &tonic::Request<T>) -> Option<&Principal> {
    request.extensions().get::<ConnectionInfo>().and_then(|info| info.principal.as_ref())
}

/// The principal of the connection an HTTP request (as a tower layer sees
/// it) arrived on, if authenticated.
pub fn http_principal<B>(request: &http::Request<B>) -> Option<&Principal> {
    request.extensions().get::<ConnectionInfo>().and_then(|info| info.principal.as_ref())
}

/// One accepted connection, plain or TLS.
///
/// Reads and writes fail once the acceptor's `cut` token is cancelled: that
/// is how shutdown ends connections still open after the grace period
/// (hyper runs each connection in a task of its own, which dropping the
/// server does not stop).
pub struct Connection {
    io: Io,
    info: ConnectionInfo,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("io", &self.io).field("info", &self.info).finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connection {
    fn new(io: Io, info: ConnectionInfo, cut: &CancellationToken) -> Self {
        Self { io, info, cut: Box::pin(cut.clone().cancelled_owned()) }
    }

    /// What is known about the other end.
    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// An error once the connection was cut; registers for the wake-up
    /// otherwise, so a connection blocked on a read notices the cut.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.cut
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut: the hub is shutting down"))
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(err) = self.poll_cut(cx) {
            return Poll::Ready(Err(err));
        }
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(err) = self.poll_cut(cx) {
            return Poll::Ready(Err(err));
        }
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(err) = self.poll_cut(cx) {
            return Poll::Ready(Err(err));
        }
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(stream) => stream.is_write_vectored(),
            Io::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

/// Why a TLS connection was refused.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("TLS handshake did not finish within {:?}", defaults::TLS_HANDSHAKE_TIMEOUT)]
    Timeout,
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("mutual TLS is on but the client presented no certificate")]
    NoClientCertificate,
    #[error("no principal in the client certificate")]
    Principal(#[source] CredentialError),
}

impl HandshakeError {
    /// Label value of the handshake-failure counter.
    fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Timeout => "timeout",
            HandshakeError::Tls(_) => "handshake",
            HandshakeError::NoClientCertificate | HandshakeError::Principal(_) => "principal",
        }
    }
}

/// The connections arriving on `listener`, through TLS when `tls` is set.
/// Cancelling `cut` makes every connection's reads and writes fail.
///
/// The stream never ends and never yields an error: accept errors are
/// logged and retried after a pause, failed handshakes logged and counted.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    cut: CancellationToken,
) -> impl Stream<Item = Result<Connection, Infallible>> + Send + 'static {
    let acceptor = Acceptor { listener, tls, cut, handshakes: JoinSet::new() };
    futures_util::stream::unfold(acceptor, |mut acceptor| async move {
        let connection = acceptor.next().await;
        Some((Ok(connection), acceptor))
    })
}

struct Acceptor {
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    cut: CancellationToken,
    /// Handshakes in flight; aborted when the acceptor is dropped.
    handshakes: JoinSet<(SocketAddr, Result<Connection, HandshakeError>)>,
}

impl Acceptor {
    async fn next(&mut self) -> Connection {
        loop {
            let room = self.handshakes.len() < defaults::TLS_HANDSHAKES_IN_FLIGHT;
            tokio::select! {
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => match done {
                    Ok((_, Ok(connection))) => return connection,
                    Ok((remote, Err(err))) => {
                        metrics::counter!(telemetry::TLS_HANDSHAKE_FAILURES, telemetry::LABEL_REASON => err.reason())
                            .increment(1);
                        tracing::warn!(remote = %remote, error = %DisplayChain(&err), "refused a TLS connection");
                    }
                    Err(join) => tracing::error!(error = %join, "TLS handshake task failed"),
                },
                accepted = self.listener.accept(), if room => match accepted {
                    Ok((stream, remote)) => {
                        // gRPC frames are small and latency matters more than
                        // packet count.
                        if let Err(err) = stream.set_nodelay(true) {
                            tracing::debug!(remote = %remote, error = %err, "could not set TCP_NODELAY");
                        }
                        match &self.tls {
                            None => {
                                let info = ConnectionInfo { remote_addr: remote, principal: None, client_certs: None };
                                return Connection::new(Io::Plain(stream), info, &self.cut);
                            }
                            Some(tls) => {
                                let (tls, cut) = (tls.clone(), self.cut.clone());
                                self.handshakes
                                    .spawn(async move { (remote, handshake(&tls, stream, remote, &cut).await) });
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "failed to accept a connection; pausing");
                        tokio::time::sleep(defaults::ACCEPT_ERROR_BACKOFF).await;
                    }
                },
            }
        }
    }
}

async fn handshake(
    tls: &ServerTls,
    stream: TcpStream,
    remote: SocketAddr,
    cut: &CancellationToken,
) -> Result<Connection, HandshakeError> {
    let stream = tokio::time::timeout(defaults::TLS_HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::Tls)?;
    let (principal, client_certs) = if tls.is_mutual() {
        let chain = stream
            .get_ref()
            .1
            .peer_certificates()
            .filter(|chain| !chain.is_empty())
            .ok_or(HandshakeError::NoClientCertificate)?;
        let chain = ClientCertChain::new(Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect()));
        // The identity layer's rule, the node's too: the single URI SAN.
        let leaf = chain.leaf().ok_or(HandshakeError::NoClientCertificate)?;
        let uri = omnirelay_identity::mtls::certificate_san_uri(leaf).map_err(HandshakeError::Principal)?;
        (Some(Principal::new(uri)), Some(chain))
    } else {
        (None, None)
    };
    Ok(Connection::new(Io::Tls(Box::new(stream)), ConnectionInfo { remote_addr: remote, principal, client_certs }, cut))
}

/// Displays an error with its sources, `a: b: c`.
struct DisplayChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}
