//! Standby followers: a node keeps a warm copy of each namespace it would
//! take over next (the second member in the namespace's rendezvous order),
//! so a takeover replays only the events since the copy's last poll
//! instead of the whole tail after the newest snapshot.
//!
//! A follower rebuilds the copy once (snapshot plus tail, checked as a
//! recovery checks it) and then reads what the owner appended every
//! [`FOLLOW_POLL`], through the replicator's `read_log` (the hub's
//! `ReadRange`), applying each event with its chain link verified. When the
//! namespace becomes this node's, the assigner stops the follower and hands
//! its copy to the new shard owner, which catches it up under its new epoch
//! (see [`Queue::recover_from`](crate::Queue::recover_from)). A copy that
//! cannot be caught up (trimmed below it, or broken) is dropped and rebuilt.
//!
//! Memory: one queue state per followed namespace, the same bound as the
//! queue itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::ids::ShardId;
use crate::queue::{Rebuilt, catch_up, recover};
use crate::replication::Replicator;

/// How often a follower reads what the owner appended: a takeover then
/// replays at most this long's worth of events, for two cheap reads per
/// second per followed namespace.
pub const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// Longest one catch-up (or the first rebuild) may take before the follower
/// gives its copy up and starts again; far above a healthy read of a page.
pub const FOLLOW_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a new owner waits for the follower to hand its copy over: a
/// read in flight usually ends in milliseconds; past this the copy is
/// dropped and the owner rebuilds from the snapshot, rather than delay the
/// takeover.
pub const HANDOFF_WAIT: Duration = Duration::from_secs(1);

/// A task keeping a warm copy of one namespace's state.
#[derive(Debug)]
pub(crate) struct Follower {
    cancel: CancellationToken,
    task: JoinHandle<Option<Rebuilt>>,
    sequence: Arc<AtomicU64>,
}

impl Follower {
    /// Starts following `shard` through `replicator`.
    pub(crate) fn spawn(replicator: Arc<dyn Replicator>, shard: ShardId) -> Self {
        let cancel = CancellationToken::new();
        let sequence = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(follow(replicator, shard, cancel.clone(), Arc::clone(&sequence)));
        Self { cancel, task, sequence }
    }

    /// The sequence the copy has reached (zero: not built yet).
    pub(crate) fn sequence(&self) -> u64 {
        self.sequence.load(Ordering::Relaxed)
    }

    /// Stops following and returns the copy, if one was built and the
    /// follower lets go of it within [`HANDOFF_WAIT`] (it finishes the read
    /// in flight first).
    pub(crate) async fn into_state(mut self) -> Option<Rebuilt> {
        self.cancel.cancel();
        match tokio::time::timeout(HANDOFF_WAIT, &mut self.task).await {
            Ok(joined) => joined.ok().flatten(),
            Err(_) => {
                self.task.abort();
                None
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn follow(
    replicator: Arc<dyn Replicator>,
    shard: ShardId,
    cancel: CancellationToken,
    sequence: Arc<AtomicU64>,
) -> Option<Rebuilt> {
    let mut warm: Option<Rebuilt> = None;
    let mut polls = tokio::time::interval(FOLLOW_POLL);
    polls.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return warm,
            _ = polls.tick() => {}
        }
        // Not raced against the cancellation: the copy is consistent only
        // between pages, and a read is bounded.
        let step = match warm.as_mut() {
            Some(copy) => tokio::time::timeout(FOLLOW_CALL_TIMEOUT, catch_up(&*replicator, &shard, copy))
                .await
                .map(|caught_up| caught_up.map(drop)),
            None => tokio::time::timeout(FOLLOW_CALL_TIMEOUT, recover(&*replicator, &shard))
                .await
                .map(|rebuilt| rebuilt.map(|rebuilt| warm = Some(rebuilt))),
        };
        match step {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(shard = %shard, error = %error, "standby copy dropped; rebuilding it");
                warm = None;
            }
            Err(_) => {
                tracing::debug!(shard = %shard, "standby read timed out; rebuilding the copy");
                warm = None;
            }
        }
        let reached = warm.as_ref().map_or(0, |copy| copy.state.last_sequence().get());
        sequence.store(reached, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryReplicator;
    use crate::queue::{Caller, EnqueueRequest, Payload, Queue, QueueConfig};

    /// A follower's copy reaches the owner's head, and a new owner that
    /// starts from it replays only what was appended after the copy's last
    /// poll, into exactly the state a full rebuild gives.
    #[tokio::test]
    async fn a_standby_copy_makes_a_takeover_replay_only_the_tail() {
        let log: Arc<dyn Replicator> = Arc::new(InMemoryReplicator::new());
        let shard = ShardId::new("resourcelease.follow");
        let ttl = Duration::from_secs(30);
        let producer = Caller::new("spiffe://test/producer", "producer-1");
        let first = log.acquire_shard(&shard, "node-a", ttl).await.expect("grant").epoch;
        let owner = Queue::builder(QueueConfig::new(shard.clone(), "node-a"), Arc::clone(&log))
            .recovering()
            .build()
            .expect("queue");
        owner.recover(first).await.expect("rebuilt");
        for n in 0..40 {
            owner
                .enqueue(&producer, EnqueueRequest::new(Payload::new("job", format!("r{n}"), "body")))
                .await
                .expect("enqueued");
        }
        let follower = Follower::spawn(Arc::clone(&log), shard.clone());
        tokio::time::timeout(Duration::from_secs(10), async {
            while follower.sequence() < 40 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the copy reaches the head");
        for n in 40..45 {
            owner
                .enqueue(&producer, EnqueueRequest::new(Payload::new("job", format!("r{n}"), "body")))
                .await
                .expect("enqueued");
        }
        owner.settled().await.expect("durable");
        let warm = follower.into_state().await.expect("a copy");
        assert!(warm.state.last_sequence().get() >= 40);
        let behind = 45 - warm.state.last_sequence().get();

        // Takeover: a new epoch, then the copy caught up.
        let second = log.acquire_shard(&shard, "node-b", ttl).await;
        let second = match second {
            Ok(grant) if grant.granted => grant.epoch,
            _ => {
                log.release_shard(&shard, "node-a", first).await.expect("release");
                log.acquire_shard(&shard, "node-b", ttl).await.expect("grant").epoch
            }
        };
        let taker = Queue::builder(QueueConfig::new(shard.clone(), "node-b"), Arc::clone(&log))
            .recovering()
            .build()
            .expect("queue");
        let recovered = taker.recover_from(second, Some(warm)).await.expect("caught up");
        assert_eq!(recovered.replayed, behind, "only the tail after the copy is replayed");
        let full = recover(&*log, &shard).await.expect("full rebuild");
        assert_eq!(taker.encode_state().await, full.state.encode(), "the same state as a full rebuild");
        assert_eq!(full.replayed, 45);
    }
}
