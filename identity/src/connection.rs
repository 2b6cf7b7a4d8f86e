//! What the transport knows about the connection a request came on: the
//! remote address and the client certificate chain.
//!
//! tonic supplies both through its own connect-info extensions; axum supplies
//! the address through `ConnectInfo<SocketAddr>`. A custom TLS acceptor (for
//! example one serving axum over rustls) inserts [`ClientCertChain`] and
//! [`RemoteAddr`] itself. [`ConnectionInfo::from_extensions`] reads all of
//! them, ours first, so the middleware is the same for every transport.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The certificate chain a client presented, leaf first, as the TLS layer
/// verified it. Transports insert it only after their TLS handshake checked
/// the chain against the configured client CA: the middleware reads the
/// identity from it but never re-verifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertChain(Arc<Vec<CertificateDer<'static>>>);

impl ClientCertChain {
    /// Wraps a verified chain (leaf first).
    pub fn new(chain: Arc<Vec<CertificateDer<'static>>>) -> Self {
        Self(chain)
    }

    /// The leaf (client) certificate, if the chain is not empty.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.0.first()
    }

    /// The whole chain, leaf first.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.0
    }
}

/// The remote address of the connection, for transports that do not provide
/// one of the connect-info types below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr(pub SocketAddr);

/// What the middleware knows about the connection of one request.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    /// The peer's socket address, when the transport reported it.
    pub remote_addr: Option<SocketAddr>,
    /// The client certificate chain, when the client presented one.
    pub client_certs: Option<ClientCertChain>,
}

impl ConnectionInfo {
    /// Reads the connection info from request extensions: [`RemoteAddr`] and
    /// [`ClientCertChain`] first, then tonic's `TlsConnectInfo` and
    /// `TcpConnectInfo`, then axum's `ConnectInfo<SocketAddr>`.
    pub fn from_extensions(extensions: &http::Extensions) -> Self {
        let mut info = ConnectionInfo {
            remote_addr: extensions.get::<RemoteAddr>().map(|a| a.0),
            client_certs: extensions.get::<ClientCertChain>().cloned(),
        };
        if let Some(tls) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
            info.remote_addr = info.remote_addr.or_else(|| tls.get_ref().remote_addr());
            if info.client_certs.is_none() {
                info.client_certs = tls.peer_certs().filter(|c| !c.is_empty()).map(ClientCertChain);
            }
        }
        if info.remote_addr.is_none() {
            info.remote_addr = extensions
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
                .or_else(|| extensions.get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0));
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_axum_and_explicit_extensions() {
        let addr: SocketAddr = "10.1.2.3:4567".parse().expect("addr");
        let mut extensions = http::Extensions::new();
        assert!(ConnectionInfo::from_extensions(&extensions).remote_addr.is_none());
        extensions.insert(axum::extract::ConnectInfo(addr));
        assert_eq!(ConnectionInfo::from_extensions(&extensions).remote_addr, Some(addr));
        let explicit: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        extensions.insert(RemoteAddr(explicit));
        let chain = ClientCertChain::new(Arc::new(vec![CertificateDer::from(vec![1, 2, 3])]));
        extensions.insert(chain);
        let info = ConnectionInfo::from_extensions(&extensions);
        assert_eq!(info.remote_addr, Some(explicit), "explicit extensions win");
        assert_eq!(info.client_certs.expect("chain").leaf().map(|c| c.as_ref().to_vec()), Some(vec![1, 2, 3]));
    }
}
