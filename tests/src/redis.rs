//! Throwaway Redis servers for tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::binaries::find_redis_server;
use crate::{HarnessError, Result};

/// Environment variable naming an existing Redis server, e.g.
/// `redis://127.0.0.1:6379/`. Tests then share it and keep apart by key prefix.
pub const REDIS_URL_ENV: &str = "OMNIRELAY_TEST_REDIS_URL";

/// Longest wait for a fresh `redis-server` to answer PING; it starts in
/// milliseconds, so seconds mean it failed.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A Redis server for one test: private (killed on drop) unless
/// `OMNIRELAY_TEST_REDIS_URL` is set.
#[derive(Debug)]
pub struct TestRedis {
    url: String,
    prefix: String,
    child: Option<Child>,
}

impl TestRedis {
    /// Starts (or attaches to) a server; panics with the fix when Redis is
    /// unavailable.
    pub async fn new() -> Self {
        Self::try_new().await.unwrap_or_else(|err| panic!("test Redis unavailable: {err}"))
    }

    /// Starts (or attaches to) a server.
    pub async fn try_new() -> Result<Self> {
        let prefix = format!("omnirelay-test:{}:{}:", std::process::id(), next_id());
        if let Ok(url) = std::env::var(REDIS_URL_ENV) {
            return Ok(Self { url, prefix, child: None });
        }
        let binary = find_redis_server()?;
        let port = crate::tools::free_port();
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| HarnessError::Io { what: "start redis-server".into(), source })?;
        let redis = Self { url: format!("redis://127.0.0.1:{port}/"), prefix, child: Some(child) };
        redis.wait_ready().await?;
        Ok(redis)
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A prefix unique to this test; keys must start with it, since the
    /// server may be shared.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A connection manager (reconnects on its own) to the server.
    pub async fn connection(&self) -> redis::aio::ConnectionManager {
        let client = redis::Client::open(self.url.as_str()).expect("harness Redis URLs should parse");
        redis::aio::ConnectionManager::new(client).await.unwrap_or_else(|err| panic!("connect to test Redis: {err}"))
    }

    async fn wait_ready(&self) -> Result<()> {
        let client = redis::Client::open(self.url.as_str())
            .map_err(|err| HarnessError::Process { what: "open Redis client".into(), detail: err.to_string() })?;
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            let attempt = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            };
            match attempt.await {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    return Err(HarnessError::Process {
                        what: "wait for redis-server".into(),
                        detail: err.to_string(),
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn next_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}
