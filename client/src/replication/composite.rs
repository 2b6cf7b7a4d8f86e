//! The composite replicator: one authoritative log, mirrored to others.
//!
//! **The primary is authoritative.** Every decision a queue relies on is the
//! primary's: the sequences a batch gets, retry recognition, epochs and
//! shard leases, reads for recovery, snapshots. The secondaries are copies:
//! each accepted batch is written to every secondary at the *same*
//! sequences, so a secondary's log is a prefix of the primary's and can be
//! promoted (or read by a consumer) as it is.
//!
//! **When a secondary fails**, the primary's answer stands: the batch is in
//! the authoritative log. What the caller hears depends on the
//! [`MirrorMode`]:
//!
//! - [`MirrorMode::Synchronous`]: a batch is answered only once every
//!   secondary has it too. A secondary that fails turns the answer into
//!   [`ReplicationError::Unavailable`] (the batch *is* in the primary, as
//!   after a lost acknowledgement), so the queue fences its shard and
//!   rebuilds it from the primary; nothing acknowledged is missing from any
//!   log. Availability is that of the least available log.
//! - [`MirrorMode::Asynchronous`]: a batch is answered once the primary has
//!   it; a background task copies it to the secondaries in order. A failing
//!   secondary only falls behind (counted in
//!   [`CompositeReplicator::mirror_failures`], logged); an acknowledged batch
//!   may be missing from a secondary until it recovers.
//!
//! Either way a secondary that fell behind (a failure, a restart, a copy
//! dropped because the background queue was full) is **caught up from the
//! primary's log** before its next write, so it never has a gap: mirrors
//! write with the expected first sequence set, and the secondary refuses
//! anything else. Catch-up needs the missing events to still be in the
//! primary; a secondary that fell behind the primary's retention stays
//! behind (reported) until it is re-seeded.
//!
//! Secondaries are written under epoch zero by the composite's own producer
//! (fencing is the primary's job), so a secondary must not be another
//! writer's primary while it mirrors; its shard leases are never taken.
//! Snapshots are copied to secondaries that already hold their sequence, on
//! a best-effort basis (a snapshot only shortens a rebuild).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    Appended, Batch, LogPage, PublishFuture, ReplicationError, Replicator, ReplicatorFuture, ShardGrant, StoredSnapshot,
};
use crate::event::Event;
use crate::ids::{Epoch, ProducerId, Sequence, ShardId};

/// Events read from the primary per catch-up batch: large enough that a
/// secondary a few thousand events behind catches up in a few round trips,
/// small enough to stay far below any log's batch size limit.
const CATCH_UP_PAGE: usize = 256;

/// Copies queued for the background mirror in [`MirrorMode::Asynchronous`]
/// before further copies are dropped (the secondaries then catch up from the
/// primary's log instead): bounds memory while a secondary is down.
const MIRROR_QUEUE: usize = 1024;

/// When a batch is answered, relative to its copies. See the
/// [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorMode {
    /// Answered once the primary and every secondary have it.
    Synchronous,
    /// Answered once the primary has it; copied in the background.
    Asynchronous,
}

/// A [`Replicator`] that writes to a primary and mirrors to secondaries.
/// See the [module docs](self). Must be created inside a tokio runtime in
/// [`MirrorMode::Asynchronous`] (its mirror task ends when it is dropped).
pub struct CompositeReplicator {
    inner: Arc<Inner>,
    background: Option<mpsc::Sender<Transfer>>,
}

impl std::fmt::Debug for CompositeReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.inner.secondaries.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("CompositeReplicator")
            .field("mode", &self.inner.mode)
            .field("secondaries", &names)
            .finish_non_exhaustive()
    }
}

struct Inner {
    primary: Arc<dyn Replicator>,
    secondaries: Vec<Secondary>,
    mode: MirrorMode,
    /// Distinguishes this composite's mirror producers from any other's.
    instance: String,
}

struct Secondary {
    name: String,
    log: Arc<dyn Replicator>,
    /// What the composite knows of each shard's copy; the lock also keeps
    /// the copies of one secondary in order.
    shards: tokio::sync::Mutex<HashMap<ShardId, Mirror>>,
    failures: AtomicU64,
}

/// The composite's view of one shard on one secondary.
struct Mirror {
    /// The copy's head, when known (re-read after any failure).
    head: Option<Sequence>,
    /// The producer writing the copy: replaced after any failure, so a
    /// batch whose fate is unknown is never confused with the next one.
    producer: ProducerId,
    producer_seq: u64,
}

/// A batch the primary accepted, to copy.
struct Transfer {
    shard: ShardId,
    appended: Appended,
    events: Arc<Vec<Event>>,
}

impl CompositeReplicator {
    /// Writes to `primary` and mirrors to `secondaries` (each named for logs
    /// and errors) as `mode` says.
    pub fn new(
        primary: Arc<dyn Replicator>,
        secondaries: impl IntoIterator<Item = (String, Arc<dyn Replicator>)>,
        mode: MirrorMode,
    ) -> Self {
        let inner = Arc::new(Inner {
            primary,
            secondaries: secondaries
                .into_iter()
                .map(|(name, log)| Secondary {
                    name,
                    log,
                    shards: tokio::sync::Mutex::default(),
                    failures: AtomicU64::new(0),
                })
                .collect(),
            mode,
            instance: format!("composite-{:016x}", fastrand::u64(..)),
        });
        let background = (mode == MirrorMode::Asynchronous).then(|| {
            let (copies, mut queue) = mpsc::channel::<Transfer>(MIRROR_QUEUE);
            let inner = Arc::clone(&inner);
            // Owned through the channel: it ends once the replicator (the
            // only sender) is dropped and the queued copies are written.
            tokio::spawn(async move {
                while let Some(copy) = queue.recv().await {
                    // Failures are counted and logged by `mirror`; the next
                    // copy catches the secondary up.
                    let _ = inner.mirror(&copy).await;
                }
            });
            copies
        });
        Self { inner, background }
    }

    /// How many copies to each secondary failed so far, by name.
    pub fn mirror_failures(&self) -> Vec<(String, u64)> {
        self.inner.secondaries.iter().map(|s| (s.name.clone(), s.failures.load(Ordering::Relaxed))).collect()
    }

    /// Brings every secondary's copy of `shard` up to the primary's head
    /// now (after an outage, or to seed a new secondary); the first error
    /// is returned, the other secondaries are still caught up.
    pub async fn catch_up(&self, shard: &ShardId) -> Result<(), ReplicationError> {
        let head = head_of(self.inner.primary.as_ref(), shard).await?;
        if head == Sequence::ZERO {
            return Ok(());
        }
        let copy = Transfer {
            shard: shard.clone(),
            appended: Appended { first: head, count: 1, deduplicated: true },
            events: Arc::new(Vec::new()),
        };
        self.inner.mirror(&copy).await
    }
}

/// The head of `shard` in `log`.
async fn head_of(log: &dyn Replicator, shard: &ShardId) -> Result<Sequence, ReplicationError> {
    match log.read_log(shard, Sequence::ZERO, 0).await {
        Ok(page) => Ok(page.head),
        Err(ReplicationError::Trimmed { low, .. }) => {
            Ok(log.read_log(shard, Sequence::new(low.get().saturating_sub(1)), 0).await?.head)
        }
        Err(err) => Err(err),
    }
}

impl Inner {
    /// Copies a batch to every secondary; the first failure is returned
    /// (the others are still written).
    async fn mirror(&self, copy: &Transfer) -> Result<(), ReplicationError> {
        let mut first_error = None;
        for secondary in &self.secondaries {
            if let Err(err) = self.mirror_to(secondary, copy).await {
                secondary.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    secondary = %secondary.name,
                    shard = %copy.shard,
                    error = %err,
                    "failed to mirror a batch to a secondary log; it catches up on the next batch"
                );
                first_error.get_or_insert(ReplicationError::Unavailable(format!(
                    "secondary log {}: {err} (the batch is in the primary log)",
                    secondary.name
                )));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn mirror_to(&self, secondary: &Secondary, copy: &Transfer) -> Result<(), ReplicationError> {
        let mut shards = secondary.shards.lock().await;
        let mirror = shards.entry(copy.shard.clone()).or_insert_with(|| self.fresh_mirror());
        let result = self.write_copy(secondary, mirror, copy).await;
        if result.is_err() {
            *mirror = self.fresh_mirror();
        }
        result
    }

    fn fresh_mirror(&self) -> Mirror {
        Mirror {
            head: None,
            producer: ProducerId::from(format!("{}-{:08x}", self.instance, fastrand::u32(..))),
            producer_seq: 0,
        }
    }

    async fn write_copy(
        &self,
        secondary: &Secondary,
        mirror: &mut Mirror,
        copy: &Transfer,
    ) -> Result<(), ReplicationError> {
        let shard = &copy.shard;
        let mut head = match mirror.head {
            Some(head) => head,
            None => head_of(secondary.log.as_ref(), shard).await?,
        };
        mirror.head = Some(head);
        let last = copy.appended.last();
        // Missing events before this batch (a failure, a dropped copy, or
        // copies answered out of order): read them from the primary.
        while head.after(1) < copy.appended.first || (copy.events.is_empty() && head < last) {
            let page = match self.primary.read_log(shard, head, CATCH_UP_PAGE).await {
                Err(ReplicationError::Trimmed { low, .. }) => {
                    return Err(ReplicationError::Rejected(format!(
                        "secondary log {} is at {head} of shard {shard} but the primary kept only events from {low}; \
                         re-seed it",
                        secondary.name
                    )));
                }
                other => other?,
            };
            let events: Vec<Event> = page
                .events
                .into_iter()
                .map(|logged| logged.event.event)
                .take(usize::try_from(last.get() - head.get()).unwrap_or(usize::MAX))
                .collect();
            if events.is_empty() {
                return Err(ReplicationError::Corrupt(format!(
                    "shard {shard}: the primary's log has no event after {head}, below its answer's {last}"
                )));
            }
            head = self.write(secondary, mirror, shard, head, events).await?;
        }
        if head < last && !copy.events.is_empty() {
            let skip = usize::try_from(head.get() + 1 - copy.appended.first.get()).unwrap_or(usize::MAX);
            let events = copy.events.iter().skip(skip).cloned().collect();
            self.write(secondary, mirror, shard, head, events).await?;
        }
        Ok(())
    }

    /// Writes `events` to the secondary right after `head`; returns the new
    /// head.
    async fn write(
        &self,
        secondary: &Secondary,
        mirror: &mut Mirror,
        shard: &ShardId,
        head: Sequence,
        events: Vec<Event>,
    ) -> Result<Sequence, ReplicationError> {
        let batch = Batch {
            shard: shard.clone(),
            producer: mirror.producer.clone(),
            producer_seq: mirror.producer_seq + 1,
            epoch: Epoch::ZERO,
            first: head.after(1),
            events,
        };
        let appended = secondary.log.publish(&batch).await?;
        mirror.producer_seq += 1;
        mirror.head = Some(appended.last());
        Ok(appended.last())
    }
}

impl Replicator for CompositeReplicator {
    fn publish(&self, batch: &Batch) -> PublishFuture {
        let primary = self.inner.primary.publish(batch);
        if self.inner.secondaries.is_empty() {
            return primary;
        }
        let (shard, events) = (batch.shard.clone(), Arc::new(batch.events.clone()));
        let inner = Arc::clone(&self.inner);
        let background = self.background.clone();
        PublishFuture::new(async move {
            let appended = primary.await?;
            let copy = Transfer { shard, appended, events };
            match background {
                None => inner.mirror(&copy).await?,
                Some(queue) => {
                    if queue.try_send(copy).is_err() {
                        // Full (a secondary is slow or down): the next copy
                        // that gets through catches it up from the primary.
                        tracing::debug!("mirror queue full; secondaries will catch up from the primary");
                    }
                }
            }
            Ok(appended)
        })
    }

    fn acquire_shard(&self, shard: &ShardId, owner: &str, ttl: Duration) -> ReplicatorFuture<'_, ShardGrant> {
        self.inner.primary.acquire_shard(shard, owner, ttl)
    }

    fn renew_shard(
        &self,
        shard: &ShardId,
        owner: &str,
        epoch: Epoch,
        ttl: Duration,
    ) -> ReplicatorFuture<'_, ShardGrant> {
        self.inner.primary.renew_shard(shard, owner, epoch, ttl)
    }

    fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool> {
        self.inner.primary.release_shard(shard, owner, epoch)
    }

    fn held_leases(&self, prefix: &str) -> ReplicatorFuture<'_, Vec<super::HeldLease>> {
        // Leases live on the primary only (secondaries are written under
        // epoch zero), so it alone knows who holds what.
        self.inner.primary.held_leases(prefix)
    }

    fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage> {
        self.inner.primary.read_log(shard, after, limit)
    }

    fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>> {
        self.inner.primary.latest_snapshot(shard)
    }

    fn put_snapshot(&self, shard: &ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> ReplicatorFuture<'_, ()> {
        let shard = shard.clone();
        Box::pin(async move {
            self.inner.primary.put_snapshot(&shard, sequence, epoch, data.clone()).await?;
            for secondary in &self.inner.secondaries {
                let held = head_of(secondary.log.as_ref(), &shard).await.is_ok_and(|head| head >= sequence);
                if !held {
                    continue;
                }
                if let Err(err) = secondary.log.put_snapshot(&shard, sequence, Epoch::ZERO, data.clone()).await {
                    tracing::warn!(secondary = %secondary.name, shard = %shard, error = %err, "failed to copy a snapshot to a secondary log");
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryReplicator;
    use crate::replication::PublishFault;
    use crate::replication::contract::{self, Durability, batch, numbers};

    fn composite(mode: MirrorMode) -> (Arc<InMemoryReplicator>, Arc<InMemoryReplicator>, CompositeReplicator) {
        let (primary, secondary) = (Arc::new(InMemoryReplicator::new()), Arc::new(InMemoryReplicator::new()));
        let composite = CompositeReplicator::new(
            primary.clone(),
            [("mirror".to_string(), secondary.clone() as Arc<dyn Replicator>)],
            mode,
        );
        (primary, secondary, composite)
    }

    #[tokio::test]
    async fn passes_the_replicator_contract_and_mirrors_every_batch() {
        for mode in [MirrorMode::Synchronous, MirrorMode::Asynchronous] {
            let (primary, secondary, composite) = composite(mode);
            let composite: Arc<dyn Replicator> = Arc::new(composite);
            contract::check(
                || {
                    let composite = Arc::clone(&composite);
                    async move { composite }
                },
                Durability::Volatile,
            )
            .await;
            let shard = ShardId::from("contract.gapless");
            if mode == MirrorMode::Asynchronous {
                settle(&secondary, &shard, primary.head(&shard)).await;
            }
            assert_eq!(
                numbers(secondary.as_ref(), &shard, 0, 100).await,
                numbers(primary.as_ref(), &shard, 0, 100).await
            );
            assert_eq!(secondary.epoch(&shard), Epoch::ZERO, "the secondary's leases are never taken");
        }
    }

    /// Waits (bounded) for the background mirror to reach `head`.
    async fn settle(secondary: &InMemoryReplicator, shard: &ShardId, head: Sequence) {
        for _ in 0..200 {
            if secondary.head(shard) >= head {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the secondary did not catch up to {head}");
    }

    #[tokio::test]
    async fn a_failing_secondary_fails_a_synchronous_batch_that_the_primary_keeps_and_catches_up_later() {
        let (primary, secondary, composite) = composite(MirrorMode::Synchronous);
        let shard = ShardId::from("s");
        composite.publish(&batch(&shard, "p", 1, 1, 2)).await.expect("both logs up");
        secondary.inject([PublishFault::BeforeWrite]);
        let failed = composite.publish(&batch(&shard, "p", 2, 3, 2)).await;
        assert!(matches!(failed, Err(ReplicationError::Unavailable(_))), "{failed:?}");
        assert_eq!(primary.head(&shard), Sequence::new(4), "the primary, authoritative, kept the batch");
        assert_eq!(secondary.head(&shard), Sequence::new(2));
        assert_eq!(composite.mirror_failures(), vec![("mirror".to_string(), 1)]);
        // The retry the queue's rebuild makes unnecessary is still safe, and
        // the next batch brings the secondary up to date without a gap.
        assert_eq!(composite.publish(&batch(&shard, "p", 2, 3, 2)).await.map(|a| a.deduplicated), Ok(true));
        composite.publish(&batch(&shard, "p", 3, 5, 1)).await.expect("both logs up again");
        assert_eq!(numbers(secondary.as_ref(), &shard, 0, 100).await, vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn a_failing_secondary_does_not_fail_an_asynchronous_batch() {
        let (primary, secondary, composite) = composite(MirrorMode::Asynchronous);
        let shard = ShardId::from("s");
        secondary.inject([PublishFault::BeforeWrite]);
        composite.publish(&batch(&shard, "p", 1, 1, 2)).await.expect("answered by the primary");
        composite.publish(&batch(&shard, "p", 2, 3, 1)).await.expect("answered by the primary");
        settle(&secondary, &shard, Sequence::new(3)).await;
        assert_eq!(numbers(secondary.as_ref(), &shard, 0, 100).await, numbers(primary.as_ref(), &shard, 0, 100).await);
        assert_eq!(composite.mirror_failures(), vec![("mirror".to_string(), 1)]);
    }

    #[tokio::test]
    async fn a_failing_primary_writes_nothing_anywhere() {
        let (primary, secondary, composite) = composite(MirrorMode::Synchronous);
        let shard = ShardId::from("s");
        primary.inject([PublishFault::BeforeWrite]);
        assert!(composite.publish(&batch(&shard, "p", 1, 1, 2)).await.is_err());
        assert_eq!((primary.head(&shard), secondary.head(&shard)), (Sequence::ZERO, Sequence::ZERO));
    }

    #[tokio::test]
    async fn a_new_secondary_is_seeded_from_the_primary() {
        let primary = Arc::new(InMemoryReplicator::new());
        let shard = ShardId::from("s");
        primary.publish(&batch(&shard, "p", 1, 1, 600)).await.expect("publish");
        let secondary = Arc::new(InMemoryReplicator::new());
        let composite = CompositeReplicator::new(
            primary.clone(),
            [("new".to_string(), secondary.clone() as Arc<dyn Replicator>)],
            MirrorMode::Synchronous,
        );
        composite.catch_up(&shard).await.expect("seed");
        assert_eq!(secondary.head(&shard), Sequence::new(600));
        assert_eq!(numbers(secondary.as_ref(), &shard, 0, 1000).await, (1..=600).collect::<Vec<_>>());
    }
}
