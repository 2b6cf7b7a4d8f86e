//! A TCP fault proxy: sits between a client and a server on loopback and
//! partitions them on demand, the way a failed switch or a firewall rule
//! would.
//!
//! - [`Fault::None`]: bytes flow both ways.
//! - [`Fault::Stall`]: connections stay open but nothing moves (bytes
//!   already read are held, at most one buffer per direction); new
//!   connections are accepted and stall too. This is the nasty partition:
//!   no error, only silence, until deadlines fire. When the fault is lifted
//!   the held bytes are delivered late, as a healed network delivers
//!   queued packets.
//! - [`Fault::Reset`]: every open connection is closed and new ones are
//!   closed at once (a refused or reset connection).
//!
//! The proxy connects to the upstream anew for each client connection, so
//! an upstream that is restarted on the same port is reached again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Bytes read from one side before they are written to the other; also
/// the most a stalled direction holds.
pub const PROXY_BUFFER: usize = 64 * 1024;

/// Longest wait for the upstream's TCP handshake (loopback: instant, or
/// refused when the upstream is down).
pub const PROXY_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the proxy does to the traffic it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Hold everything, keep connections open.
    Stall,
    /// Close every connection.
    Reset,
}

/// A running fault proxy; stops (closing every connection) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    _tasks: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (fault, watching) = watch::channel(Fault::None);
        let tasks = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let connections = Arc::clone(&tasks);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut fault = watching.clone();
                let mut tasks = connections.lock().await;
                // Reap finished connections so the set stays bounded by
                // the open ones.
                while tasks.try_join_next().is_some() {}
                tasks.spawn(async move {
                    if *fault.borrow_and_update() == Fault::Reset {
                        return;
                    }
                    let connected = tokio::time::timeout(PROXY_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await;
                    let Ok(Ok(server)) = connected else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        () = pump(client_read, server_write, fault.clone()) => {}
                        () = pump(server_read, client_write, fault.clone()) => {}
                        () = wait_for(&mut fault, Fault::Reset) => {}
                    }
                });
            }
        });
        Ok(FaultProxy { addr, fault, _tasks: tasks, accept })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies `fault` to open and future connections.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.fault.send_replace(Fault::Reset);
        self.accept.abort();
    }
}

/// Copies `from` to `to` while the fault allows; returns when either side
/// closes or fails.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buffer = vec![0u8; PROXY_BUFFER];
    loop {
        if !flowing(&mut fault).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            // A stall that starts while waiting: go back and wait it out.
            changed = fault.changed() => {
                if changed.is_err() { return; }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // Bytes read just as a stall began are held until it ends.
        if !flowing(&mut fault).await || to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits until traffic may flow; false when the connection must close.
async fn flowing(fault: &mut watch::Receiver<Fault>) -> bool {
    loop {
        match *fault.borrow_and_update() {
            Fault::None => return true,
            Fault::Reset => return false,
            Fault::Stall => {}
        }
        if fault.changed().await.is_err() {
            return false;
        }
    }
}

async fn wait_for(fault: &mut watch::Receiver<Fault>, wanted: Fault) {
    loop {
        if *fault.borrow_and_update() == wanted {
            return;
        }
        if fault.changed().await.is_err() {
            // The proxy is gone: treat as a reset.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buffer).await {
                        if n == 0 || stream.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut answer = vec![0u8; message.len()];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn forwards_stalls_delivers_late_and_resets() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut stream, b"hello").await.expect("echo"), b"hello");

        // Stalled: no answer arrives (the client's own deadline fires)...
        proxy.set(Fault::Stall);
        stream.write_all(b"late").await.expect("write into the stall");
        let mut answer = [0u8; 4];
        let waited = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut answer)).await;
        assert!(waited.is_err(), "a stalled connection answers nothing");
        // ...and the held bytes arrive once the stall is lifted.
        proxy.set(Fault::None);
        stream.read_exact(&mut answer).await.expect("delivered late");
        assert_eq!(&answer, b"late");

        // Reset: the open connection is closed, and new ones too.
        proxy.set(Fault::Reset);
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await.expect("closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        let mut fresh = TcpStream::connect(proxy.addr()).await.expect("accepted");
        let refused = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut byte)).await.expect("closed");
        assert!(matches!(refused, Ok(0) | Err(_)), "{refused:?}");

        // Lifted: traffic flows on new connections.
        proxy.set(Fault::None);
        let mut again = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut again, b"back").await.expect("echo"), b"back");
    }
}
