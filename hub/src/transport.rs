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
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::defaults;
use crate::principal::{Principal, PrincipalError};
use crate::telemetry::names;
use crate::tls::ServerTls;

/// What the hub knows about the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The authenticated caller; `Some` exactly when mutual TLS is on.
    pub principal: Option<Principal>,
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
#[derive(Debug)]
pub struct Connection {
    io: Io,
    info: ConnectionInfo,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connection {
    /// What is known about the other end.
    pub fn info(&self) -> &ConnectionInfo {
        &self.info
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
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
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
    Principal(#[source] PrincipalError),
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
///
/// The stream never ends and never yields an error: accept errors are
/// logged and retried after a pause, failed handshakes logged and counted.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
) -> impl Stream<Item = Result<Connection, Infallible>> + Send + 'static {
    let acceptor = Acceptor { listener, tls, handshakes: JoinSet::new() };
    futures_util::stream::unfold(acceptor, |mut acceptor| async move {
        let connection = acceptor.next().await;
        Some((Ok(connection), acceptor))
    })
}

struct Acceptor {
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
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
                        metrics::counter!(names::TLS_HANDSHAKE_FAILURES, names::LABEL_REASON => err.reason())
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
                                let info = ConnectionInfo { remote_addr: remote, principal: None };
                                return Connection { io: Io::Plain(stream), info };
                            }
                            Some(tls) => {
                                let tls = tls.clone();
                                self.handshakes.spawn(async move { (remote, handshake(&tls, stream, remote).await) });
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

async fn handshake(tls: &ServerTls, stream: TcpStream, remote: SocketAddr) -> Result<Connection, HandshakeError> {
    let stream = tokio::time::timeout(defaults::TLS_HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream))
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::Tls)?;
    let principal = if tls.is_mutual() {
        let certificate = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or(HandshakeError::NoClientCertificate)?;
        Some(Principal::from_certificate(certificate).map_err(HandshakeError::Principal)?)
    } else {
        None
    };
    Ok(Connection { io: Io::Tls(Box::new(stream)), info: ConnectionInfo { remote_addr: remote, principal } })
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
