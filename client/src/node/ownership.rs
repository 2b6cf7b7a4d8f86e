//! Shard ownership: each hosted namespace is served only while this node
//! holds the shard's lease on the log, under the lease's epoch.
//!
//! One `ShardOwner` task per namespace:
//!
//! 1. **Acquire** the shard's lease (`owner` = the node id). Every grant
//!    bumps the epoch, which fences out anything an earlier holder (or an
//!    earlier incarnation of this node) still has on its way to the log.
//! 2. **Recover**: rebuild the queue from the log (newest snapshot plus the
//!    tail, or a standby follower's warm copy plus the events after it) and
//!    serve it under the new epoch. Until then the queue answers
//!    UNAVAILABLE.
//! 3. **Serve**: renew the lease every `renew_every`; write a snapshot
//!    after `snapshot_every_events` durable events, or `snapshot_every`
//!    after the last one when anything changed, so a rebuild replays little
//!    and the log can be trimmed. If a renewal is refused (another epoch
//!    holds the shard) or cannot be confirmed before the lease's TTL less
//!    [`CLOCK_DRIFT_MARGIN`] has passed since the last confirmed one, the
//!    owner fences the queue itself, before anyone else can acquire the
//!    shard. When the queue fences itself (a batch refused or lost), the
//!    owner goes back to step 1.
//! 4. **Stop** (the node shuts down): let what was decided become durable,
//!    write a last snapshot, fence the queue and release the lease, so a
//!    next owner takes over at once with a short tail to replay.
//!
//! Every call to the log is bounded by [`LOG_CALL_TIMEOUT`]; failures are
//! retried with exponential backoff from [`RETRY_MIN`] to [`RETRY_MAX`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::defaults;
use crate::ids::{Epoch, PeerId};
use crate::queue::{Fence, FenceReason, Queue, Rebuilt, ShardStatus};
use crate::replication::{ReplicationError, Replicator, ShardGrant};

/// How a node decides which of its namespaces it serves: part of
/// [`OwnershipConfig`], applied by [`membership`](super::membership).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Assignment {
    /// Try to own every hosted namespace (one node, or hot standbys).
    #[default]
    Every,
    /// Spread the namespaces over the live members by rendezvous hashing.
    Rendezvous,
}

impl Assignment {
    /// `every` or `rendezvous`.
    pub fn as_str(self) -> &'static str {
        match self {
            Assignment::Every => "every",
            Assignment::Rendezvous => "rendezvous",
        }
    }
}

impl std::str::FromStr for Assignment {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "every" => Ok(Assignment::Every),
            "rendezvous" => Ok(Assignment::Rendezvous),
            other => Err(format!("unknown assignment {other:?} (expected every or rendezvous)")),
        }
    }
}

/// Longest a single call to the log (acquire, renew, release, a snapshot)
/// may take before it counts as failed: far above a healthy round trip,
/// well under the lease TTL so a renewal that hangs is noticed in time.
pub const LOG_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Shortest pause before retrying a failed acquire or rebuild.
pub const RETRY_MIN: Duration = Duration::from_millis(100);

/// Longest pause between retries: the log is down or another owner holds
/// the shard; checking every few seconds costs nothing and notices quickly.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// How much the node's clock may run slow against the log's over one lease
/// term. The node stops serving at `TTL - margin` after the start of its
/// last confirmed renewal, so even a node whose clock lags keeps away from
/// the moment another owner could acquire the shard. Half a second covers
/// NTP-disciplined hosts (milliseconds) and scheduling pauses with room.
pub const CLOCK_DRIFT_MARGIN: Duration = Duration::from_millis(500);

/// How often an owner asks again for a lease another owner holds: a
/// released shard is taken within a quarter second (graceful handovers
/// target one second), for four cheap calls per second per waiting shard.
pub const HELD_RETRY: Duration = Duration::from_millis(250);

/// How often the owner checks whether a snapshot is due.
pub const SNAPSHOT_CHECK: Duration = Duration::from_secs(1);

/// How long a stopping owner waits for decided events to become durable,
/// and for its last snapshot, before it releases the shard anyway.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Lease and snapshot settings of the shard owners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnershipConfig {
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How often the lease is renewed (a third of the TTL: two renewals may
    /// fail before the lease is in danger).
    pub renew_every: Duration,
    /// Durable events after which a snapshot is written.
    pub snapshot_every_events: u64,
    /// Longest time between snapshots of a shard that changed.
    pub snapshot_every: Duration,
    /// Which namespaces the node tries to own (see
    /// [`membership`](super::membership)).
    pub assignment: Assignment,
    /// Whether the owner stops serving when it cannot confirm a renewal
    /// within the TTL less [`CLOCK_DRIFT_MARGIN`]. Always true in service;
    /// only the failure drill turns it off (with
    /// [`Unfenced`](crate::replication::unfenced::Unfenced)) to prove that
    /// its checker notices what fencing prevents.
    #[doc(hidden)]
    pub self_fence: bool,
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        Self {
            lease_ttl: defaults::SHARD_LEASE_TTL,
            renew_every: defaults::SHARD_LEASE_TTL / 3,
            snapshot_every_events: defaults::SNAPSHOT_EVERY_EVENTS,
            snapshot_every: defaults::SNAPSHOT_EVERY,
            assignment: Assignment::Every,
            self_fence: true,
        }
    }
}

impl OwnershipConfig {
    /// Checks the settings against each other; errors name the field.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.lease_ttl <= CLOCK_DRIFT_MARGIN * 2 {
            return Err(("lease_ttl", "must be more than twice the clock-drift margin (1 s)"));
        }
        if self.renew_every.is_zero() || self.renew_every >= self.lease_ttl - CLOCK_DRIFT_MARGIN {
            return Err(("renew_every", "must be positive and well below the lease TTL"));
        }
        if self.snapshot_every_events == 0 {
            return Err(("snapshot_every_events", "must be at least 1"));
        }
        if self.snapshot_every.is_zero() {
            return Err(("snapshot_every", "must be positive"));
        }
        Ok(())
    }
}

/// The task that owns one shard for the node. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct ShardOwner {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ShardOwner {
    /// Starts owning `queue`'s shard through `replicator` as `owner`; the
    /// first rebuild starts from `warm`, a standby follower's copy, when
    /// there is one (see [`follower`](super::follower)).
    pub(crate) fn spawn(
        queue: Queue,
        replicator: Arc<dyn Replicator>,
        owner: PeerId,
        config: OwnershipConfig,
        warm: Option<Rebuilt>,
    ) -> Self {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(own(queue, replicator, owner, config, warm, cancel.clone()));
        Self { cancel, task: Some(task) }
    }

    /// Stops owning the shard (see step 4 of the module docs) and waits for
    /// the task.
    pub(crate) async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(error = %error, "shard owner task ended abnormally");
        }
    }
}

impl Drop for ShardOwner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

type SnapshotFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A renewal in flight: when it was asked, and the log's answer.
type RenewalFuture<'a> =
    Pin<Box<dyn std::future::Future<Output = (Instant, Result<ShardGrant, ReplicationError>)> + Send + 'a>>;

async fn own(
    queue: Queue,
    replicator: Arc<dyn Replicator>,
    owner: PeerId,
    config: OwnershipConfig,
    mut warm: Option<Rebuilt>,
    cancel: CancellationToken,
) {
    let shard = queue.shard().clone();
    let mut backoff = RETRY_MIN;
    // Whether the wait for another owner's lease was logged already.
    let mut waiting = false;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        // 1. Acquire.
        let asked = Instant::now();
        let grant = tokio::select! {
            () = cancel.cancelled() => return,
            grant = bounded(replicator.acquire_shard(&shard, owner.as_str(), config.lease_ttl)) => grant,
        };
        let epoch = match grant {
            Ok(grant) if grant.granted => {
                waiting = false;
                grant.epoch
            }
            Ok(grant) => {
                if !waiting {
                    tracing::info!(shard = %shard, holder = %grant.owner, "shard is held by another owner; waiting");
                    waiting = true;
                }
                if pause(&cancel, grant.ttl.unwrap_or(HELD_RETRY).clamp(RETRY_MIN, HELD_RETRY)).await {
                    return;
                }
                continue;
            }
            Err(error) => {
                tracing::warn!(shard = %shard, error = %error, "failed to acquire the shard; retrying");
                if pause(&cancel, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        // 2. Recover.
        let recovered = tokio::select! {
            () = cancel.cancelled() => {
                release(&*replicator, &queue, &owner, epoch).await;
                return;
            }
            recovered = queue.recover_from(epoch, warm.take()) => recovered,
        };
        if let Err(error) = recovered {
            tracing::warn!(shard = %shard, error = %error, "failed to rebuild the shard from its log; retrying");
            if pause(&cancel, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(RETRY_MAX);
            continue;
        }
        backoff = RETRY_MIN;
        // 3. Serve until the queue fences, the lease is lost, or the node
        // stops.
        match serve(&queue, &*replicator, &owner, epoch, asked, config, &cancel).await {
            Served::Stopped => {
                stop(&queue, &*replicator, &owner, epoch).await;
                return;
            }
            Served::Fenced => {
                if pause(&cancel, RETRY_MIN).await {
                    return;
                }
            }
        }
    }
}

enum Served {
    Stopped,
    Fenced,
}

async fn serve(
    queue: &Queue,
    replicator: &dyn Replicator,
    owner: &PeerId,
    epoch: Epoch,
    acquired_at: Instant,
    config: OwnershipConfig,
    cancel: &CancellationToken,
) -> Served {
    let shard = queue.shard().clone();
    let mut status = queue.status();
    // The lease is safe until TTL - margin after the start of the last
    // confirmed grant or renewal (the log measured its TTL from a moment
    // after that start).
    let mut safe_until = acquired_at + config.lease_ttl.saturating_sub(CLOCK_DRIFT_MARGIN);
    let mut renewals = tokio::time::interval_at(Instant::now() + config.renew_every, config.renew_every);
    renewals.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut checks = tokio::time::interval_at(Instant::now() + SNAPSHOT_CHECK, SNAPSHOT_CHECK);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_snapshot = Instant::now();
    let mut snapshotting: Option<SnapshotFuture> = None;
    // The renewal in flight, raced against `safe_until`: a renewal that
    // hangs (a partition stalls the connection) must not hold the owner
    // past the moment it has to stop serving.
    let mut renewing: Option<RenewalFuture<'_>> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Served::Stopped,
            changed = status.changed() => {
                if changed.is_err() || matches!(*status.borrow_and_update(), ShardStatus::Fenced(_)) {
                    return Served::Fenced;
                }
            }
            () = tokio::time::sleep_until(safe_until), if config.self_fence => {
                queue.fence(Fence::new(
                    FenceReason::LeaseLost,
                    format!("no renewal of epoch {epoch} was confirmed within the lease TTL less the clock-drift margin"),
                ));
                return Served::Fenced;
            }
            _ = renewals.tick(), if renewing.is_none() => {
                let shard = shard.clone();
                renewing = Some(Box::pin(async move {
                    let asked = Instant::now();
                    (asked, bounded(replicator.renew_shard(&shard, owner.as_str(), epoch, config.lease_ttl)).await)
                }));
            }
            (asked, renewed) = async { renewing.as_mut().expect("polled only while renewing").await },
                if renewing.is_some() => {
                renewing = None;
                match renewed {
                    Ok(_) => safe_until = asked + config.lease_ttl.saturating_sub(CLOCK_DRIFT_MARGIN),
                    Err(ReplicationError::Unavailable(error)) => {
                        tracing::warn!(shard = %shard, error = %error, "failed to renew the shard lease; retrying");
                    }
                    Err(error) => {
                        let reason = match error {
                            ReplicationError::StaleEpoch { .. } => FenceReason::StaleEpoch,
                            _ => FenceReason::LeaseLost,
                        };
                        queue.fence(Fence::new(reason, format!("renewing the shard lease: {error}")));
                        return Served::Fenced;
                    }
                }
            }
            _ = checks.tick(), if snapshotting.is_none() => {
                let since = queue.events_since_snapshot();
                if since >= config.snapshot_every_events
                    || (since > 0 && last_snapshot.elapsed() >= config.snapshot_every)
                {
                    last_snapshot = Instant::now();
                    let queue = queue.clone();
                    snapshotting = Some(Box::pin(async move { snapshot(&queue).await }));
                }
            }
            () = async { snapshotting.as_mut().expect("polled only while snapshotting").await },
                if snapshotting.is_some() => {
                snapshotting = None;
            }
        }
    }
}

async fn snapshot(queue: &Queue) {
    match tokio::time::timeout(LOG_CALL_TIMEOUT * 4, queue.write_snapshot()).await {
        Ok(Ok(Some(sequence))) => tracing::debug!(shard = %queue.shard(), sequence = %sequence, "snapshot written"),
        Ok(Ok(None)) => {}
        Ok(Err(error)) => tracing::warn!(shard = %queue.shard(), error = %error, "failed to write a snapshot"),
        Err(_) => tracing::warn!(shard = %queue.shard(), "writing a snapshot timed out"),
    }
}

/// Step 4: settle, snapshot, fence, release.
async fn stop(queue: &Queue, replicator: &dyn Replicator, owner: &PeerId, epoch: Epoch) {
    let _ = tokio::time::timeout(STOP_GRACE, queue.settled()).await;
    let _ = tokio::time::timeout(STOP_GRACE, queue.write_snapshot()).await;
    release(replicator, queue, owner, epoch).await;
}

async fn release(replicator: &dyn Replicator, queue: &Queue, owner: &PeerId, epoch: Epoch) {
    queue.fence(Fence::new(FenceReason::Released, "the node is stopping and released the shard"));
    match bounded(replicator.release_shard(queue.shard(), owner.as_str(), epoch)).await {
        Ok(true) => tracing::info!(shard = %queue.shard(), epoch = %epoch, "released the shard"),
        Ok(false) => tracing::info!(shard = %queue.shard(), epoch = %epoch, "the shard was no longer ours to release"),
        Err(error) => tracing::warn!(shard = %queue.shard(), error = %error, "failed to release the shard"),
    }
}

/// A log call bounded by [`LOG_CALL_TIMEOUT`].
pub(crate) async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, ReplicationError>>,
) -> Result<T, ReplicationError> {
    match tokio::time::timeout(LOG_CALL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(ReplicationError::Unavailable(format!("no answer within {LOG_CALL_TIMEOUT:?}"))),
    }
}

/// Sleeps `duration` unless cancelled first (then true).
async fn pause(cancel: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(duration) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use bytes::Bytes;

    use super::*;
    use crate::InMemoryReplicator;
    use crate::ids::{Sequence, ShardId};
    use crate::queue::{FenceReason, QueueConfig};
    use crate::replication::{Batch, HeldLease, LogPage, PublishFuture, ReplicatorFuture, StoredSnapshot};

    /// A log whose renewals never answer once `stalled` is set, as through
    /// a partition that stalls the connection without an error.
    struct StallingRenewals {
        log: InMemoryReplicator,
        stalled: AtomicBool,
    }

    impl Replicator for StallingRenewals {
        fn publish(&self, batch: &Batch) -> PublishFuture {
            self.log.publish(batch)
        }
        fn acquire_shard(&self, shard: &ShardId, owner: &str, ttl: Duration) -> ReplicatorFuture<'_, ShardGrant> {
            self.log.acquire_shard(shard, owner, ttl)
        }
        fn renew_shard(
            &self,
            shard: &ShardId,
            owner: &str,
            epoch: Epoch,
            ttl: Duration,
        ) -> ReplicatorFuture<'_, ShardGrant> {
            if self.stalled.load(Ordering::SeqCst) {
                return Box::pin(std::future::pending());
            }
            self.log.renew_shard(shard, owner, epoch, ttl)
        }
        fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool> {
            self.log.release_shard(shard, owner, epoch)
        }
        fn held_leases(&self, prefix: &str) -> ReplicatorFuture<'_, Vec<HeldLease>> {
            self.log.held_leases(prefix)
        }
        fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage> {
            self.log.read_log(shard, after, limit)
        }
        fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>> {
            self.log.latest_snapshot(shard)
        }
        fn put_snapshot(
            &self,
            shard: &ShardId,
            sequence: Sequence,
            epoch: Epoch,
            data: Bytes,
        ) -> ReplicatorFuture<'_, ()> {
            self.log.put_snapshot(shard, sequence, epoch, data)
        }
    }

    /// Found by the failure drill: a renewal that hangs (longer than the
    /// TTL allows: [`LOG_CALL_TIMEOUT`] is 3 s, the drill's TTL 2 s) must not
    /// hold the owner past its deadline. The owner fences at TTL less the
    /// clock-drift margin after its last confirmed renewal, while the
    /// renewal is still in flight. Tokio's paused clock makes the instant
    /// exact.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_renewal_does_not_delay_the_self_fence() {
        let log = Arc::new(StallingRenewals { log: InMemoryReplicator::new(), stalled: AtomicBool::new(false) });
        let config = OwnershipConfig {
            lease_ttl: Duration::from_secs(2),
            renew_every: Duration::from_millis(600),
            ..OwnershipConfig::default()
        };
        let queue =
            Queue::builder(QueueConfig::new("resourcelease.stall", "node-a"), log.clone() as Arc<dyn Replicator>)
                .recovering()
                .build()
                .expect("a valid queue");
        let owner = ShardOwner::spawn(queue.clone(), log.clone(), PeerId::from("node-a"), config, None);
        let mut status = queue.status();
        while !matches!(*status.borrow_and_update(), ShardStatus::Serving { .. }) {
            status.changed().await.expect("the owner runs");
        }
        // Two renewals confirmed, then the connection stalls just after
        // the second one.
        tokio::time::sleep(Duration::from_millis(1_250)).await;
        log.stalled.store(true, Ordering::SeqCst);
        let last_confirmed = Instant::now() - Duration::from_millis(50);
        while !matches!(*status.borrow_and_update(), ShardStatus::Fenced(_)) {
            status.changed().await.expect("the owner runs");
        }
        let fenced_after = last_confirmed.elapsed();
        assert!(
            fenced_after <= config.lease_ttl - CLOCK_DRIFT_MARGIN,
            "fenced {fenced_after:?} after the last confirmed renewal; the lease is safe only for {:?}",
            config.lease_ttl - CLOCK_DRIFT_MARGIN
        );
        assert_eq!(queue.replication().fence.map(|fence| fence.reason), Some(FenceReason::LeaseLost));
        owner.shutdown().await;
    }
}
