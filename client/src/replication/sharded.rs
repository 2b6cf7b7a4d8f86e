//! The sharded replicator: a different log per namespace, so each shard
//! chooses its durability (payments on the hub, a scratch queue in memory,
//! an edge node's queues in a local SQLite file).
//!
//! A shard goes to the replicator of its exact name if one is configured,
//! else to the one of the longest matching name prefix, else to the
//! fallback; with none of those, every call for it is refused
//! ([`ReplicationError::Rejected`], naming the shard), never silently sent
//! somewhere. The route of a shard never changes while the replicator
//! lives, so all of a shard's calls (appends, leases, reads, snapshots) go
//! to one log and that log's rules are the shard's rules.
//!
//! **`shard.id` on every event**: every event already records its shard in
//! its envelope (`ReplicationEvent.shard_id`, from the event's
//! [`Origin`](crate::queue::Origin)), and that is the shard it is routed by:
//! a batch holding an event of another shard is refused, so a log never
//! holds an event whose recorded shard is not the log's shard. (Domain
//! events carry no free-form metadata, so no separate `shard.id` tag is
//! added; the envelope field is the tag.)

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{
    Batch, LogPage, PublishFuture, ReplicationError, Replicator, ReplicatorFuture, ShardGrant, StoredSnapshot,
};
use crate::ids::{Epoch, Sequence, ShardId};

/// A [`Replicator`] that routes each shard to its own replicator. See the
/// [module docs](self).
#[derive(Default)]
pub struct ShardedReplicator {
    exact: Vec<(ShardId, Arc<dyn Replicator>)>,
    /// Longest prefix first.
    prefixes: Vec<(String, Arc<dyn Replicator>)>,
    fallback: Option<Arc<dyn Replicator>>,
}

impl std::fmt::Debug for ShardedReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedReplicator")
            .field("exact", &self.exact.iter().map(|(shard, _)| shard.as_str()).collect::<Vec<_>>())
            .field("prefixes", &self.prefixes.iter().map(|(prefix, _)| prefix.as_str()).collect::<Vec<_>>())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl ShardedReplicator {
    /// A router with no routes (every shard refused until some are added).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `shard` to `replicator`.
    #[must_use]
    pub fn shard(mut self, shard: impl Into<ShardId>, replicator: Arc<dyn Replicator>) -> Self {
        self.exact.push((shard.into(), replicator));
        self
    }

    /// Sends every shard whose name starts with `prefix` (and has no exact
    /// route) to `replicator`; the longest matching prefix wins.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>, replicator: Arc<dyn Replicator>) -> Self {
        self.prefixes.push((prefix.into(), replicator));
        self.prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        self
    }

    /// Sends every shard without another route to `replicator`.
    #[must_use]
    pub fn fallback(mut self, replicator: Arc<dyn Replicator>) -> Self {
        self.fallback = Some(replicator);
        self
    }

    /// The replicator `shard` goes to.
    pub fn route(&self, shard: &ShardId) -> Result<&Arc<dyn Replicator>, ReplicationError> {
        if let Some((_, replicator)) = self.exact.iter().find(|(name, _)| name == shard) {
            return Ok(replicator);
        }
        if let Some((_, replicator)) =
            self.prefixes.iter().find(|(prefix, _)| shard.as_str().starts_with(prefix.as_str()))
        {
            return Ok(replicator);
        }
        self.fallback
            .as_ref()
            .ok_or_else(|| ReplicationError::Rejected(format!("no replicator is configured for shard {shard}")))
    }
}

fn refused<T: Send + 'static>(error: ReplicationError) -> ReplicatorFuture<'static, T> {
    Box::pin(std::future::ready(Err(error)))
}

impl Replicator for ShardedReplicator {
    fn publish(&self, batch: &Batch) -> PublishFuture {
        if let Some(stray) = batch.events.iter().find(|event| event.origin.shard != batch.shard) {
            return PublishFuture::ready(Err(ReplicationError::Rejected(format!(
                "a batch for shard {} holds an event of shard {}",
                batch.shard, stray.origin.shard
            ))));
        }
        match self.route(&batch.shard) {
            Ok(replicator) => replicator.publish(batch),
            Err(err) => PublishFuture::ready(Err(err)),
        }
    }

    fn acquire_shard(&self, shard: &ShardId, owner: &str, ttl: Duration) -> ReplicatorFuture<'_, ShardGrant> {
        match self.route(shard) {
            Ok(replicator) => replicator.acquire_shard(shard, owner, ttl),
            Err(err) => refused(err),
        }
    }

    fn renew_shard(
        &self,
        shard: &ShardId,
        owner: &str,
        epoch: Epoch,
        ttl: Duration,
    ) -> ReplicatorFuture<'_, ShardGrant> {
        match self.route(shard) {
            Ok(replicator) => replicator.renew_shard(shard, owner, epoch, ttl),
            Err(err) => refused(err),
        }
    }

    fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool> {
        match self.route(shard) {
            Ok(replicator) => replicator.release_shard(shard, owner, epoch),
            Err(err) => refused(err),
        }
    }

    fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage> {
        match self.route(shard) {
            Ok(replicator) => replicator.read_log(shard, after, limit),
            Err(err) => refused(err),
        }
    }

    fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>> {
        match self.route(shard) {
            Ok(replicator) => replicator.latest_snapshot(shard),
            Err(err) => refused(err),
        }
    }

    fn put_snapshot(&self, shard: &ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> ReplicatorFuture<'_, ()> {
        match self.route(shard) {
            Ok(replicator) => replicator.put_snapshot(shard, sequence, epoch, data),
            Err(err) => refused(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryReplicator;
    use crate::replication::contract::{self, Durability, batch, numbers};

    #[tokio::test]
    async fn passes_the_replicator_contract_with_shards_on_different_logs() {
        let (contract_log, neighbours) = (Arc::new(InMemoryReplicator::new()), Arc::new(InMemoryReplicator::new()));
        let sharded: Arc<dyn Replicator> = Arc::new(
            ShardedReplicator::new()
                .prefix("contract.", contract_log.clone())
                .prefix("contract.reads.", neighbours.clone())
                .fallback(Arc::new(InMemoryReplicator::new())),
        );
        contract::check(
            || {
                let sharded = Arc::clone(&sharded);
                async move { sharded }
            },
            Durability::Volatile,
        )
        .await;
        let neighbour = ShardId::from("contract.reads.neighbour");
        assert_eq!(numbers(neighbours.as_ref(), &neighbour, 0, 10).await, vec![100], "the longest prefix wins");
        assert!(contract_log.events(&neighbour).is_empty());
        assert_eq!(contract_log.head(&ShardId::from("contract.gapless")), Sequence::new(13));
    }

    #[tokio::test]
    async fn exact_routes_beat_prefixes_and_unrouted_shards_are_refused() {
        let (exact, prefix) = (Arc::new(InMemoryReplicator::new()), Arc::new(InMemoryReplicator::new()));
        let sharded = ShardedReplicator::new()
            .prefix("resourcelease.", prefix.clone())
            .shard("resourcelease.payments", exact.clone());
        let payments = ShardId::from("resourcelease.payments");
        let users = ShardId::from("resourcelease.users");
        sharded.publish(&batch(&payments, "p", 1, 1, 1)).await.expect("routed");
        sharded.publish(&batch(&users, "p", 1, 1, 2)).await.expect("routed");
        assert_eq!((exact.head(&payments), prefix.head(&payments)), (Sequence::new(1), Sequence::ZERO));
        assert_eq!((prefix.head(&users), exact.head(&users)), (Sequence::new(2), Sequence::ZERO));
        let other = ShardId::from("audit");
        let refused = sharded.publish(&batch(&other, "p", 1, 1, 1)).await;
        assert!(matches!(&refused, Err(ReplicationError::Rejected(m)) if m.contains("audit")), "{refused:?}");
        assert!(sharded.acquire_shard(&other, "a", Duration::from_secs(1)).await.is_err());
    }

    #[tokio::test]
    async fn an_event_of_another_shard_is_refused() {
        let log = Arc::new(InMemoryReplicator::new());
        let sharded = ShardedReplicator::new().fallback(log.clone());
        let shard = ShardId::from("a");
        let mut mixed = batch(&shard, "p", 1, 1, 2);
        mixed.events.push(contract::event(&ShardId::from("b"), 3));
        let refused = sharded.publish(&mixed).await;
        assert!(matches!(refused, Err(ReplicationError::Rejected(_))), "{refused:?}");
        assert_eq!(log.head(&shard), Sequence::ZERO, "nothing was written");
    }
}
