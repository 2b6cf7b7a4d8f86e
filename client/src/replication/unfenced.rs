//! **Test only: never use it to serve.** A replicator wrapper that switches
//! the log's fences off as seen from the node: a batch the log refuses or
//! does not confirm (a stale epoch, a head mismatch, an outage) is reported
//! as appended at the sequences the queue predicted, and a refused or
//! failed lease renewal as granted. A queue behind it therefore keeps
//! acknowledging after another node took its shard over, exactly as a
//! system without fencing would.
//!
//! It exists for one purpose: the failure drill (`tests/suite/drill.rs`)
//! runs once with it to prove that its history checker sees lost
//! acknowledgements, stale writes and doubly owned items when they happen.
//! The sidecar enables it only with the hidden `--unsafe-disable-fencing`
//! flag, and logs an error at start when it does.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{
    Appended, Batch, HeldLease, LogPage, PublishFuture, Replicator, ReplicatorFuture, ShardGrant, StoredSnapshot,
};
use crate::ids::{Epoch, Sequence, ShardId};

/// See the [module docs](self): acknowledges what the log refused.
#[doc(hidden)]
#[derive(Clone)]
pub struct Unfenced {
    inner: Arc<dyn Replicator>,
}

impl std::fmt::Debug for Unfenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unfenced").finish_non_exhaustive()
    }
}

impl Unfenced {
    /// Wraps `inner`, ignoring its fences.
    pub fn new(inner: Arc<dyn Replicator>) -> Self {
        Self { inner }
    }
}

impl Replicator for Unfenced {
    fn publish(&self, batch: &Batch) -> PublishFuture {
        let appended = self.inner.publish(batch);
        let (first, count) = (batch.first, batch.events.len() as u64);
        PublishFuture::new(async move {
            match appended.await {
                Ok(appended) => Ok(appended),
                // A batch without an expected start cannot be made up.
                Err(error) if first == Sequence::ZERO => Err(error),
                Err(error) => {
                    tracing::error!(error = %error, "fencing is off: acknowledging a batch the log did not take");
                    Ok(Appended { first, count, deduplicated: false })
                }
            }
        })
    }

    fn acquire_shard(&self, shard: &ShardId, owner: &str, ttl: Duration) -> ReplicatorFuture<'_, ShardGrant> {
        self.inner.acquire_shard(shard, owner, ttl)
    }

    fn renew_shard(
        &self,
        shard: &ShardId,
        owner: &str,
        epoch: Epoch,
        ttl: Duration,
    ) -> ReplicatorFuture<'_, ShardGrant> {
        let renewed = self.inner.renew_shard(shard, owner, epoch, ttl);
        let owner = owner.to_string();
        Box::pin(async move {
            match renewed.await {
                Ok(grant) if grant.granted => Ok(grant),
                _ => Ok(ShardGrant { granted: true, owner, epoch, head: Sequence::ZERO, ttl: Some(ttl) }),
            }
        })
    }

    fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool> {
        self.inner.release_shard(shard, owner, epoch)
    }

    fn held_leases(&self, prefix: &str) -> ReplicatorFuture<'_, Vec<HeldLease>> {
        self.inner.held_leases(prefix)
    }

    fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage> {
        self.inner.read_log(shard, after, limit)
    }

    fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>> {
        self.inner.latest_snapshot(shard)
    }

    fn put_snapshot(&self, shard: &ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> ReplicatorFuture<'_, ()> {
        self.inner.put_snapshot(shard, sequence, epoch, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryReplicator;
    use crate::replication::contract::batch;

    /// The wrapper really does what the drill relies on: a batch under a
    /// stale epoch, refused by the log, is acknowledged anyway, and a
    /// refused renewal is reported as granted.
    #[tokio::test]
    async fn refused_batches_and_renewals_are_reported_as_taken() {
        let log: Arc<dyn Replicator> = Arc::new(InMemoryReplicator::new());
        let shard = ShardId::new("resourcelease.unfenced");
        let ttl = Duration::from_secs(10);
        let old = log.acquire_shard(&shard, "a", ttl).await.expect("grant").epoch;
        log.release_shard(&shard, "a", old).await.expect("release");
        let new = log.acquire_shard(&shard, "b", ttl).await.expect("grant").epoch;
        assert_ne!(old, new);

        let mut stale = batch(&shard, "producer-a", 1, 1, 2);
        stale.epoch = old;
        stale.first = Sequence::new(1);
        assert!(log.publish(&stale).await.is_err(), "the log refuses the stale epoch");
        let unfenced = Unfenced::new(Arc::clone(&log));
        let appended = unfenced.publish(&stale).await.expect("acknowledged anyway");
        assert_eq!((appended.first, appended.count), (Sequence::new(1), 2));
        let page = log.read_log(&shard, Sequence::ZERO, 10).await.expect("read");
        assert!(page.events.is_empty(), "nothing was written: {page:?}");

        let refused = log.renew_shard(&shard, "a", old, ttl).await;
        assert!(refused.as_ref().map_or(true, |grant| !grant.granted), "the log refuses the renewal: {refused:?}");
        assert!(unfenced.renew_shard(&shard, "a", old, ttl).await.expect("granted").granted);
    }
}
