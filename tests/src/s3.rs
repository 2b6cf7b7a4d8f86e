//! A throwaway S3-compatible server for tests: `moto` in server mode, from
//! PyPI, in a cached virtual environment (`target/s3-venv`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{ensure_venv, free_port};
use crate::{HarnessError, Result};

/// The server's pinned requirements.
const REQUIREMENTS: &str = include_str!("../s3-requirements.txt");

/// Longest wait for a fresh server to answer: it starts in a second or two.
const S3_START_TIMEOUT: Duration = Duration::from_secs(30);

/// An S3-compatible server on a free loopback port with one empty bucket,
/// killed on drop. It checks no credentials: any key pair is accepted.
#[derive(Debug)]
pub struct TestS3 {
    endpoint: String,
    bucket: String,
    child: Child,
}

impl TestS3 {
    /// Starts a server (installing it on first use); panics with the fix
    /// when it cannot.
    pub async fn new() -> Self {
        tokio::task::spawn_blocking(Self::try_new)
            .await
            .expect("the S3 start thread should not panic")
            .unwrap_or_else(|err| panic!("test S3 server unavailable: {err}"))
    }

    /// Starts a server, blocking until it answers and its bucket exists.
    pub fn try_new() -> Result<Self> {
        let python = ensure_venv("s3", REQUIREMENTS, "tests/s3-requirements.txt")?;
        let port = free_port();
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| HarnessError::Io { what: "start moto_server".into(), source })?;
        let server = Self { endpoint: format!("http://127.0.0.1:{port}"), bucket: "omnirelay-test".into(), child };
        let deadline = Instant::now() + S3_START_TIMEOUT;
        // Creating the bucket doubles as the readiness probe.
        loop {
            match http_put(SocketAddr::from(([127, 0, 0, 1], port)), &format!("/{}", server.bucket)) {
                Ok(200) => return Ok(server),
                Ok(status) if Instant::now() >= deadline => {
                    return Err(HarnessError::Process {
                        what: "create the test bucket".into(),
                        detail: format!("HTTP {status}"),
                    });
                }
                Err(err) if Instant::now() >= deadline => {
                    return Err(HarnessError::Process { what: "wait for moto_server".into(), detail: err.to_string() });
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The server's URL (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bucket created for the test.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }
}

impl Drop for TestS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare `PUT path` (moto accepts unsigned requests); the status code.
fn http_put(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:.80}")))
}
