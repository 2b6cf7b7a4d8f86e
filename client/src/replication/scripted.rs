//! A replicator for tests of the commit path: an in-memory log whose answers
//! arrive late, out of order, lost after the write, or refused before it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::{
    Batch, InMemoryReplicator, LogPage, PublishFuture, ReplicationError, Replicator, ReplicatorFuture, ShardGrant,
    StoredSnapshot,
};
use crate::ids::{Epoch, Sequence, ShardId};

/// What one publish answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Written, then acknowledged.
    Ack,
    /// Written, then the answer is lost (UNAVAILABLE).
    LostAfterWrite,
    /// Not written (UNAVAILABLE).
    FailedBeforeWrite,
}

/// Writes each batch to an in-memory log when it is published (so the log
/// keeps publish order, as the hub keeps a stream's order) and answers after
/// a scripted delay: batches published together may be answered in any
/// order.
#[derive(Debug)]
pub(crate) struct ScriptedReplicator {
    pub(crate) log: Arc<InMemoryReplicator>,
    script: Mutex<VecDeque<(Duration, Answer)>>,
    delay: Duration,
}

impl ScriptedReplicator {
    /// Acknowledges every batch after `delay`, unless scripted otherwise.
    pub(crate) fn new(delay: Duration) -> Self {
        Self { log: Arc::new(InMemoryReplicator::new()), script: Mutex::default(), delay }
    }

    /// Scripts the next publishes' delays and answers, in order.
    pub(crate) fn script(&self, answers: impl IntoIterator<Item = (Duration, Answer)>) {
        self.script.lock().expect("script lock").extend(answers);
    }
}

impl Replicator for ScriptedReplicator {
    fn publish(&self, batch: &Batch) -> PublishFuture {
        let (delay, answer) = self.script.lock().expect("script lock").pop_front().unwrap_or((self.delay, Answer::Ack));
        let result = match answer {
            Answer::Ack => self.log.append(batch),
            Answer::LostAfterWrite => {
                let _ = self.log.append(batch);
                Err(ReplicationError::Unavailable("scripted: the answer was lost after the write".into()))
            }
            Answer::FailedBeforeWrite => {
                Err(ReplicationError::Unavailable("scripted: the batch failed before the write".into()))
            }
        };
        PublishFuture::new(async move {
            tokio::time::sleep(delay).await;
            result
        })
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
        self.log.renew_shard(shard, owner, epoch, ttl)
    }

    fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool> {
        self.log.release_shard(shard, owner, epoch)
    }

    fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage> {
        self.log.read_log(shard, after, limit)
    }

    fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>> {
        self.log.latest_snapshot(shard)
    }

    fn put_snapshot(&self, shard: &ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> ReplicatorFuture<'_, ()> {
        self.log.put_snapshot(shard, sequence, epoch, data)
    }
}
