//! A bounded wait for a condition, used instead of sleeps.

use std::future::Future;
use std::time::Duration;

/// Default bound of [`eventually`]: generous, because CI machines are shared
/// and slow, yet short enough that a broken test fails within a minute.
pub const EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between attempts: short enough to keep tests quick, long enough not
/// to spin a core on a two-core machine.
pub const EVENTUALLY_POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Some`, and returns that value; panics with
/// `what` and the last attempt's description once `timeout` has passed.
///
/// `check` returns `Ok(value)` when the condition holds, or `Err(why)` to
/// keep waiting; the last `why` is in the panic message.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match within(timeout, check).await {
        Ok(value) => value,
        Err(why) => panic!("{what}: still not true after {timeout:?}; last attempt: {why}"),
    }
}

/// [`eventually`] that returns the last attempt's `Err` once `timeout` has
/// passed instead of panicking, for a caller that adds context (a process's
/// log) to its failure message.
pub async fn within<T, F, Fut>(timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(why) if tokio::time::Instant::now() >= deadline => return Err(why),
            Err(_) => tokio::time::sleep(EVENTUALLY_POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let value = eventually("third call", Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= 3 { Ok(n) } else { Err(format!("call {n}")) }
        })
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "never: still not true")]
    async fn panics_with_the_last_reason_after_the_timeout() {
        eventually::<(), _, _>("never", Duration::from_secs(1), || async { Err("no".into()) }).await;
    }
}
