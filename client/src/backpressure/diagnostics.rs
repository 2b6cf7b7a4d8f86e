//! The diagnostics listener: latest signal plus a bounded transition stream.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::{BackpressureListener, BackpressureSignal};
use crate::defaults::BACKPRESSURE_TRANSITIONS_KEPT;

/// Keeps the latest backpressure signal and the most recent transitions, and
/// streams new transitions to any number of subscribers.
///
/// Every buffer is bounded ([`BACKPRESSURE_TRANSITIONS_KEPT`]): a subscriber
/// that falls behind loses the oldest transitions and is told how many
/// ([`Lagged`]) instead of slowing the queue down.
#[derive(Debug)]
pub struct BackpressureDiagnostics {
    recent: Mutex<VecDeque<BackpressureSignal>>,
    sender: broadcast::Sender<BackpressureSignal>,
}

/// A subscriber missed `0` transitions because it read too slowly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("missed {0} backpressure transitions")]
pub struct Lagged(pub u64);

/// A live stream of transitions from [`BackpressureDiagnostics::subscribe`].
#[derive(Debug)]
pub struct BackpressureTransitions {
    receiver: broadcast::Receiver<BackpressureSignal>,
}

impl BackpressureTransitions {
    /// The next transition; `Err(Lagged)` once after transitions were missed
    /// (then the stream continues), `None` when the diagnostics listener is
    /// gone.
    pub async fn next(&mut self) -> Option<Result<BackpressureSignal, Lagged>> {
        match self.receiver.recv().await {
            Ok(signal) => Some(Ok(signal)),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Err(Lagged(missed))),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl BackpressureDiagnostics {
    /// An empty listener.
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(BACKPRESSURE_TRANSITIONS_KEPT);
        Self { recent: Mutex::new(VecDeque::with_capacity(BACKPRESSURE_TRANSITIONS_KEPT)), sender }
    }

    /// The latest signal seen, if any.
    pub fn latest(&self) -> Option<BackpressureSignal> {
        self.lock().back().cloned()
    }

    /// The most recent transitions, oldest first (at most
    /// [`BACKPRESSURE_TRANSITIONS_KEPT`]).
    pub fn recent(&self) -> Vec<BackpressureSignal> {
        self.lock().iter().cloned().collect()
    }

    /// Streams transitions from now on.
    pub fn subscribe(&self) -> BackpressureTransitions {
        BackpressureTransitions { receiver: self.sender.subscribe() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<BackpressureSignal>> {
        // The deque is only pushed and popped: a panic elsewhere cannot leave
        // it half-updated.
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for BackpressureDiagnostics {
    fn default() -> Self {
        Self::new()
    }
}

impl BackpressureListener for BackpressureDiagnostics {
    fn on_signal(&self, signal: &BackpressureSignal) {
        {
            let mut recent = self.lock();
            if recent.len() == BACKPRESSURE_TRANSITIONS_KEPT {
                recent.pop_front();
            }
            recent.push_back(signal.clone());
        }
        // No subscribers is fine: the latest signal is still kept above.
        let _ = self.sender.send(signal.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::ids::ShardId;

    fn signal(active: bool, pending: u64) -> BackpressureSignal {
        BackpressureSignal {
            active,
            pending,
            high: 10,
            low: 5,
            observed_at: Timestamp::from_unix_nanos(pending),
            shard: ShardId::from("resourcelease"),
        }
    }

    #[tokio::test]
    async fn diagnostics_keep_the_latest_signal_and_stream_transitions() {
        let diagnostics = BackpressureDiagnostics::new();
        assert_eq!(diagnostics.latest(), None);
        let mut stream = diagnostics.subscribe();
        diagnostics.on_signal(&signal(true, 10));
        diagnostics.on_signal(&signal(false, 5));
        assert_eq!(diagnostics.latest(), Some(signal(false, 5)));
        assert_eq!(stream.next().await, Some(Ok(signal(true, 10))));
        assert_eq!(stream.next().await, Some(Ok(signal(false, 5))));
    }

    #[tokio::test]
    async fn slow_subscribers_are_told_they_lagged_and_memory_stays_bounded() {
        let diagnostics = BackpressureDiagnostics::new();
        let mut stream = diagnostics.subscribe();
        let total = BACKPRESSURE_TRANSITIONS_KEPT as u64 + 10;
        for n in 0..total {
            diagnostics.on_signal(&signal(n % 2 == 0, n));
        }
        assert_eq!(diagnostics.recent().len(), BACKPRESSURE_TRANSITIONS_KEPT);
        assert_eq!(diagnostics.recent().first().map(|s| s.pending), Some(10));
        assert_eq!(stream.next().await, Some(Err(Lagged(10))));
        assert_eq!(stream.next().await.and_then(Result::ok).map(|s| s.pending), Some(10));
    }
}
