//! A [`LogStore`] decorator that times every store operation for the
//! `omnirelay_hub_db_latency_seconds{operation}` histogram and counts
//! failures in `omnirelay_hub_db_errors_total{operation}`, whatever the
//! store.
//!
//! Appends are not timed here: one append resolves after its group commit,
//! so its time is mostly queueing; each store's committer times the commit
//! transaction itself, and the service times the whole batch
//! (`omnirelay_hub_append_latency_seconds`). A rejection the caller caused
//! (stale epoch, invalid input) is not a store failure; only outages and
//! internal errors count as errors.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::log::event::ChainHash;
use crate::log::ids::{Epoch, OwnerId, Sequence, ShardId, SubscriberId};
use crate::security::principal::Principal;
use crate::store::{
    AppendAck, AppendBatch, Checkpoint, CheckpointCommit, EventPage, LeaseGrant, LogChange, LogStore, RetentionOutcome,
    RetentionPolicy, ShardLease, ShardState, Snapshot, StoreError, StoreFuture,
};
use crate::telemetry::{self, DbOperation};

/// Times the operations of the store it wraps.
pub struct Metered {
    inner: Arc<dyn LogStore>,
}

impl Metered {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn LogStore>) -> Self {
        Self { inner }
    }
}

/// Whether a result is a failure of the store (rather than a refusal the
/// caller caused).
pub(crate) fn is_store_failure<T>(result: &Result<T, StoreError>) -> bool {
    matches!(
        result,
        Err(StoreError::Unavailable { .. } | StoreError::Internal { .. } | StoreError::Schema(_) | StoreError::Closed)
    )
}

fn timed<'a, T: Send + 'a>(operation: DbOperation, future: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
    Box::pin(async move {
        let started = Instant::now();
        let result = future.await;
        telemetry::record_db_operation(operation, started.elapsed(), !is_store_failure(&result));
        result
    })
}

impl LogStore for Metered {
    fn append(&self, batch: AppendBatch) -> StoreFuture<'static, AppendAck> {
        self.inner.append(batch)
    }

    fn acquire_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        ttl: Duration,
    ) -> StoreFuture<'_, LeaseGrant> {
        timed(DbOperation::ShardLease, self.inner.acquire_shard_as(shard, owner, principal, ttl))
    }

    fn renew_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        epoch: Epoch,
        ttl: Duration,
    ) -> StoreFuture<'_, ShardLease> {
        timed(DbOperation::ShardLease, self.inner.renew_shard_as(shard, owner, principal, epoch, ttl))
    }

    fn release_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        epoch: Epoch,
    ) -> StoreFuture<'_, bool> {
        timed(DbOperation::ShardLease, self.inner.release_shard_as(shard, owner, principal, epoch))
    }

    fn shard_state(&self, shard: ShardId) -> StoreFuture<'_, Option<ShardState>> {
        timed(DbOperation::ShardLease, self.inner.shard_state(shard))
    }

    fn list_shards(&self, prefix: String) -> StoreFuture<'_, Vec<ShardState>> {
        timed(DbOperation::ShardLease, self.inner.list_shards(prefix))
    }

    fn read_range(
        &self,
        shard: ShardId,
        from: Sequence,
        to: Option<Sequence>,
        limit: usize,
        max_bytes: usize,
    ) -> StoreFuture<'_, EventPage> {
        timed(DbOperation::ReadRange, self.inner.read_range(shard, from, to, limit, max_bytes))
    }

    fn sequence_at(&self, shard: ShardId, since: SystemTime) -> StoreFuture<'_, Option<Sequence>> {
        timed(DbOperation::ReadRange, self.inner.sequence_at(shard, since))
    }

    fn commit_checkpoint(
        &self,
        subscriber: SubscriberId,
        shard: ShardId,
        sequence: Sequence,
        hash: Option<ChainHash>,
    ) -> StoreFuture<'_, CheckpointCommit> {
        timed(DbOperation::Checkpoint, self.inner.commit_checkpoint(subscriber, shard, sequence, hash))
    }

    fn checkpoints(&self, subscriber: Option<SubscriberId>, shards: Vec<ShardId>) -> StoreFuture<'_, Vec<Checkpoint>> {
        timed(DbOperation::Checkpoint, self.inner.checkpoints(subscriber, shards))
    }

    fn checkpoint_page(
        &self,
        subscriber: Option<SubscriberId>,
        shards: Vec<ShardId>,
        after: Option<(SubscriberId, ShardId)>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Checkpoint>> {
        timed(DbOperation::Checkpoint, self.inner.checkpoint_page(subscriber, shards, after, limit))
    }

    fn put_snapshot(&self, shard: ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> StoreFuture<'_, Snapshot> {
        timed(DbOperation::Snapshot, self.inner.put_snapshot(shard, sequence, epoch, data))
    }

    fn snapshot(&self, shard: ShardId, at_or_below: Option<Sequence>) -> StoreFuture<'_, Option<Snapshot>> {
        timed(DbOperation::Snapshot, self.inner.snapshot(shard, at_or_below))
    }

    fn apply_retention(&self, shard: ShardId, policy: RetentionPolicy) -> StoreFuture<'_, RetentionOutcome> {
        timed(DbOperation::Retention, self.inner.apply_retention(shard, policy))
    }

    fn changes(&self) -> broadcast::Receiver<LogChange> {
        self.inner.changes()
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        self.inner.close()
    }
}
