//! The sweeper: a background task that expires lapsed leases.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::Queue;

/// Expires lapsed leases of one queue every `interval`, so an idle queue
/// (no `lease` calls, which also expire on the way) still requeues the items
/// of dead workers. Owns its task: [`shutdown`](Self::shutdown) stops and
/// joins it, and dropping the sweeper cancels it.
#[derive(Debug)]
pub struct Sweeper {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Sweeper {
    /// Starts sweeping `queue` every `interval` (see
    /// [`SWEEP_INTERVAL`](crate::defaults::SWEEP_INTERVAL)).
    pub fn spawn(queue: Queue, interval: Duration) -> Self {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(queue, interval, cancel.clone()));
        Self { cancel, task: Some(task) }
    }

    /// Stops the sweeper and waits for its task to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(error = %error, "sweeper task ended abnormally");
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn run(queue: Queue, interval: Duration, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    // After a stall, sweep once and carry on; catching up on missed ticks
    // would only sweep an already swept queue.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticks.tick() => {}
        }
        match queue.expire_due().await {
            Ok(0) => {}
            Ok(expired) => tracing::debug!(shard = %queue.shard(), expired, "expired lapsed leases"),
            // The replicator is down: the next tick retries, and nothing was
            // applied in the meantime.
            Err(error) => tracing::warn!(shard = %queue.shard(), error = %error, "failed to expire leases"),
        }
    }
}
