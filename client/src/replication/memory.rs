//! The in-memory replicator: a per-shard log in process memory.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use super::{
    Appended, Batch, HeldLease, LogPage, LoggedEvent, MAX_HELD_LEASES, PublishFuture, ReplicationError, Replicator,
    ReplicatorFuture, ShardGrant, StoredSnapshot,
};
use crate::event::{Event, SequencedEvent};
use crate::ids::{Epoch, ProducerId, Sequence, ShardId};

/// A failure to inject into the next publishes of an [`InMemoryReplicator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishFault {
    /// Refuse the batch without writing it (a connection that failed early).
    BeforeWrite,
    /// Write the batch, then report failure (an acknowledgement lost on the
    /// way back): a retry must be recognised, not written twice.
    AfterWrite,
}

/// A replicator that keeps each shard's log in memory.
///
/// It behaves like the hub where a queue can tell: sequences gapless from 1,
/// batches atomic, retried batches recognised by `(producer,
/// producer_seq)`, skipped producer sequences refused, a batch that expects
/// another first sequence than the log's next refused, shard leases whose
/// every grant bumps the epoch, stale epochs refused once a shard's lease
/// was granted (a shard never acquired accepts epoch zero, so a queue can
/// be used without ownership in tests and examples), and the newest
/// snapshot per shard. It keeps all events, or the newest `retention` per
/// shard; reading below what it kept fails with
/// [`ReplicationError::Trimmed`], as the hub's retention does. Failures can
/// be injected with [`InMemoryReplicator::inject`]. Nothing survives the
/// process; use it for tests, development and benchmarks.
#[derive(Debug, Default)]
pub struct InMemoryReplicator {
    retention: Option<usize>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Few shards per replicator: a scan that compares pointers first beats
    /// hashing the name on every publish.
    shards: Vec<ShardLog>,
    faults: VecDeque<PublishFault>,
}

#[derive(Debug)]
struct ShardLog {
    shard: ShardId,
    head: Sequence,
    events: Ring,
    /// Batches written (not retries).
    batches: u64,
    /// The last batch of each recent producer, the one that wrote last at
    /// the end (it is checked first).
    producers: Vec<(ProducerId, u64, Appended)>,
    /// The current grant: its epoch (zero until the first grant), holder
    /// and expiry.
    epoch: Epoch,
    owner: Option<String>,
    expires_at: Option<tokio::time::Instant>,
    snapshot: Option<StoredSnapshot>,
}

/// The retained events, oldest first: a `Vec` that grows without a
/// retention limit, and is overwritten in place, oldest slot first, once it
/// holds `retention` events (a benchmark publishes millions; no shifting, no
/// reallocation).
#[derive(Debug, Default)]
struct Ring {
    slots: Vec<SequencedEvent>,
    /// Index of the oldest event once the ring is full; zero until then.
    oldest: usize,
}

impl Ring {
    /// Appends a copy of `event` at `sequence`, overwriting the oldest slot
    /// in place once the ring holds `retention` events.
    #[inline]
    fn push(&mut self, sequence: Sequence, event: &Event, retention: Option<usize>) {
        match retention {
            Some(0) => {}
            Some(retention) if self.slots.len() >= retention => {
                let slot = &mut self.slots[self.oldest];
                slot.sequence = sequence;
                slot.event.clone_from(event);
                self.oldest += 1;
                if self.oldest == self.slots.len() {
                    self.oldest = 0;
                }
            }
            _ => self.slots.push(SequencedEvent { sequence, event: event.clone() }),
        }
    }

    /// The events after `after`, oldest first (found by binary search: both
    /// halves of the ring are in sequence order).
    fn after(&self, after: Sequence) -> impl Iterator<Item = &SequencedEvent> {
        let (newer, older) = self.slots.split_at(self.oldest);
        let skip = older.partition_point(|e| e.sequence <= after);
        let newer = if skip < older.len() { newer } else { &newer[newer.partition_point(|e| e.sequence <= after)..] };
        older[skip..].iter().chain(newer)
    }

    /// The oldest sequence kept; `None` when nothing is kept.
    fn low(&self) -> Option<Sequence> {
        self.slots.get(self.oldest).map(|e| e.sequence)
    }
}

/// Producers remembered per shard for retry detection: one owner at a time
/// writes a shard, so a handful covers every incarnation still retrying.
const PRODUCERS_REMEMBERED: usize = 16;

impl InMemoryReplicator {
    /// A replicator that keeps every event.
    pub fn new() -> Self {
        Self::default()
    }

    /// A replicator that keeps only the newest `events` events per shard
    /// (a long-running node or a benchmark); sequences stay gapless.
    pub fn with_retention(events: usize) -> Self {
        Self { retention: Some(events), state: Mutex::default() }
    }

    /// Makes the next publishes fail, one fault per publish, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = PublishFault>) {
        self.lock().faults.extend(faults);
    }

    /// The retained events of `shard`, oldest first.
    pub fn events(&self, shard: &ShardId) -> Vec<SequencedEvent> {
        self.read(shard, Sequence::ZERO)
    }

    /// The retained events of `shard` after `after`, oldest first.
    pub fn read(&self, shard: &ShardId, after: Sequence) -> Vec<SequencedEvent> {
        let state = self.lock();
        let Some(log) = state.log(shard) else { return Vec::new() };
        log.events.after(after).cloned().collect()
    }

    /// The sequence of `shard`'s newest event (zero for an empty log).
    pub fn head(&self, shard: &ShardId) -> Sequence {
        self.lock().log(shard).map_or(Sequence::ZERO, |log| log.head)
    }

    /// How many batches `shard`'s log took (retries not counted).
    pub fn batches(&self, shard: &ShardId) -> u64 {
        self.lock().log(shard).map_or(0, |log| log.batches)
    }

    /// The shard's current epoch (zero until its lease was first granted).
    pub fn epoch(&self, shard: &ShardId) -> Epoch {
        self.lock().log(shard).map_or(Epoch::ZERO, |log| log.epoch)
    }

    /// Grants the shard's lease to `owner` whoever holds it, bumping the
    /// epoch: what a takeover by another node looks like to the fenced
    /// owner (tests use it to fence a queue).
    pub fn steal(&self, shard: &ShardId, owner: &str) -> Epoch {
        let mut state = self.lock();
        let log = state.log_mut(shard);
        log.grant(owner, None);
        log.epoch
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the log consistent (every
        // mutation below is a single push or counter bump), so poisoning is
        // not a reason to stop serving.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a batch at once (what `publish` answers).
    #[inline]
    pub(crate) fn append(&self, batch: &Batch) -> Result<Appended, ReplicationError> {
        let mut state = self.lock();
        if !state.faults.is_empty() {
            return Self::append_with_fault(&mut state, batch, self.retention);
        }
        state.log_mut(&batch.shard).append(batch, self.retention)
    }

    #[cold]
    fn append_with_fault(
        state: &mut State,
        batch: &Batch,
        retention: Option<usize>,
    ) -> Result<Appended, ReplicationError> {
        let fault = state.faults.pop_front();
        if fault == Some(PublishFault::BeforeWrite) {
            return Err(ReplicationError::Unavailable("injected failure before write".into()));
        }
        let appended = state.log_mut(&batch.shard).append(batch, retention)?;
        if fault == Some(PublishFault::AfterWrite) {
            return Err(ReplicationError::Unavailable("injected failure after write".into()));
        }
        Ok(appended)
    }
}

impl State {
    fn log(&self, shard: &ShardId) -> Option<&ShardLog> {
        self.shards.iter().find(|log| log.shard == *shard)
    }

    /// The log of `shard`, created on first use.
    #[inline]
    fn log_mut(&mut self, shard: &ShardId) -> &mut ShardLog {
        let index = match self.shards.iter().position(|log| log.shard == *shard) {
            Some(index) => index,
            None => self.add_log(shard),
        };
        &mut self.shards[index]
    }

    #[cold]
    fn add_log(&mut self, shard: &ShardId) -> usize {
        self.shards.push(ShardLog {
            shard: shard.clone(),
            head: Sequence::ZERO,
            events: Ring::default(),
            batches: 0,
            producers: Vec::new(),
            epoch: Epoch::ZERO,
            owner: None,
            expires_at: None,
            snapshot: None,
        });
        self.shards.len() - 1
    }
}

impl ShardLog {
    #[inline]
    fn append(&mut self, batch: &Batch, retention: Option<usize>) -> Result<Appended, ReplicationError> {
        if batch.epoch != self.epoch {
            return Err(self.stale(batch.epoch));
        }
        // The common case: the producer that wrote last sends its next batch.
        let newest = self.producers.len().wrapping_sub(1);
        match self.producers.last_mut() {
            Some((producer, seq, appended))
                if *producer == batch.producer
                    && *seq + 1 == batch.producer_seq
                    && (batch.first == Sequence::ZERO || batch.first == self.head.after(1)) =>
            {
                let first = self.head.after(1);
                let count = batch.events.len() as u64;
                *seq = batch.producer_seq;
                *appended = Appended { first, count, deduplicated: false };
                let appended = *appended;
                self.write(batch, retention);
                Ok(appended)
            }
            _ => self.append_other(batch, retention, newest),
        }
    }

    #[cold]
    fn stale(&self, given: Epoch) -> ReplicationError {
        ReplicationError::StaleEpoch { shard: self.shard.clone(), given, current: self.epoch }
    }

    /// Appends the events after the head.
    #[inline]
    fn write(&mut self, batch: &Batch, retention: Option<usize>) {
        self.batches += 1;
        let mut sequence = self.head;
        for event in &batch.events {
            sequence = sequence.after(1);
            self.events.push(sequence, event, retention);
        }
        self.head = sequence;
    }

    /// A retry, an out-of-order batch, or a producer other than the last
    /// writer.
    #[cold]
    fn append_other(
        &mut self,
        batch: &Batch,
        retention: Option<usize>,
        newest: usize,
    ) -> Result<Appended, ReplicationError> {
        if batch.events.is_empty() {
            return Err(ReplicationError::Rejected("a batch needs at least one event".into()));
        }
        let last = self.producers.iter().rposition(|(producer, _, _)| *producer == batch.producer);
        if let Some(index) = last {
            let (_, seq, appended) = &self.producers[index];
            if *seq == batch.producer_seq {
                return Ok(Appended { deduplicated: true, ..*appended });
            }
            if *seq > batch.producer_seq {
                return Err(ReplicationError::Rejected(format!(
                    "producer {} sent batch {} after batch {seq}; only its latest batch is remembered",
                    batch.producer, batch.producer_seq
                )));
            }
            if batch.producer_seq != *seq + 1 {
                return Err(ReplicationError::Rejected(format!(
                    "producer {} sent batch {}; the next expected is {} (nothing was written)",
                    batch.producer,
                    batch.producer_seq,
                    seq + 1
                )));
            }
        }
        if batch.first != Sequence::ZERO && batch.first != self.head.after(1) {
            return Err(ReplicationError::Rejected(format!(
                "shard {}: the batch expects to start at {} but the log's next sequence is {} (nothing was written)",
                self.shard,
                batch.first,
                self.head.after(1)
            )));
        }
        let appended = Appended { first: self.head.after(1), count: batch.events.len() as u64, deduplicated: false };
        self.write(batch, retention);
        match last {
            Some(index) if index == newest => {
                self.producers[index].1 = batch.producer_seq;
                self.producers[index].2 = appended;
            }
            Some(index) => {
                self.producers.remove(index);
                self.producers.push((batch.producer.clone(), batch.producer_seq, appended));
            }
            None => {
                if self.producers.len() == PRODUCERS_REMEMBERED {
                    self.producers.remove(0);
                }
                self.producers.push((batch.producer.clone(), batch.producer_seq, appended));
            }
        }
        Ok(appended)
    }

    fn grant(&mut self, owner: &str, ttl: Option<Duration>) {
        self.epoch = Epoch::new(self.epoch.get() + 1);
        self.owner = Some(owner.to_string());
        self.expires_at = ttl.map(|ttl| tokio::time::Instant::now() + ttl);
    }

    fn lease(&self, granted: bool, ttl: Option<Duration>) -> ShardGrant {
        ShardGrant {
            granted,
            owner: self.owner.clone().unwrap_or_default(),
            epoch: self.epoch,
            head: self.head,
            ttl: if granted {
                ttl
            } else {
                self.expires_at.map(|at| at.saturating_duration_since(tokio::time::Instant::now()))
            },
        }
    }

    fn live_holder(&self) -> Option<&str> {
        let live = self.expires_at.is_none_or(|at| tokio::time::Instant::now() < at);
        self.owner.as_deref().filter(|_| live)
    }
}

impl Replicator for InMemoryReplicator {
    fn publish(&self, batch: &Batch) -> PublishFuture {
        PublishFuture::ready(self.append(batch))
    }

    fn acquire_shard(&self, shard: &ShardId, owner: &str, ttl: Duration) -> ReplicatorFuture<'_, ShardGrant> {
        let mut state = self.lock();
        let log = state.log_mut(shard);
        let grant = match log.live_holder() {
            Some(holder) if holder != owner => log.lease(false, None),
            _ => {
                log.grant(owner, Some(ttl));
                log.lease(true, Some(ttl))
            }
        };
        Box::pin(std::future::ready(Ok(grant)))
    }

    fn renew_shard(
        &self,
        shard: &ShardId,
        owner: &str,
        epoch: Epoch,
        ttl: Duration,
    ) -> ReplicatorFuture<'_, ShardGrant> {
        let mut state = self.lock();
        let log = state.log_mut(shard);
        let result = if log.epoch != epoch {
            Err(log.stale(epoch))
        } else if log.owner.as_deref() != Some(owner) {
            Err(ReplicationError::Rejected(format!("shard {shard}: {owner} does not hold the lease")))
        } else {
            log.expires_at = Some(tokio::time::Instant::now() + ttl);
            Ok(log.lease(true, Some(ttl)))
        };
        Box::pin(std::future::ready(result))
    }

    fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool> {
        let mut state = self.lock();
        let log = state.log_mut(shard);
        let released = log.epoch == epoch && log.owner.as_deref() == Some(owner);
        if released {
            log.owner = None;
            log.expires_at = None;
        }
        Box::pin(std::future::ready(Ok(released)))
    }

    fn held_leases(&self, prefix: &str) -> ReplicatorFuture<'_, Vec<HeldLease>> {
        let state = self.lock();
        let mut held: Vec<_> = state
            .shards
            .iter()
            .filter(|log| log.shard.as_str().starts_with(prefix))
            .filter_map(|log| {
                log.live_holder().map(|owner| HeldLease {
                    shard: log.shard.clone(),
                    owner: owner.to_string(),
                    epoch: log.epoch,
                })
            })
            .collect();
        held.sort_by(|a, b| a.shard.as_str().cmp(b.shard.as_str()));
        held.truncate(MAX_HELD_LEASES);
        Box::pin(std::future::ready(Ok(held)))
    }

    fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage> {
        let state = self.lock();
        let result = match state.log(shard) {
            None => Ok(LogPage::default()),
            Some(log) => {
                let low = log.events.low().unwrap_or(log.head.after(1));
                if after.after(1) < low && after < log.head {
                    Err(ReplicationError::Trimmed { shard: shard.clone(), low })
                } else {
                    let events = log
                        .events
                        .after(after)
                        .take(limit)
                        .map(|event| LoggedEvent { event: event.clone(), link: None })
                        .collect();
                    Ok(LogPage { events, head: log.head, low })
                }
            }
        };
        Box::pin(std::future::ready(result))
    }

    fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>> {
        let snapshot = self.lock().log(shard).and_then(|log| log.snapshot.clone());
        Box::pin(std::future::ready(Ok(snapshot)))
    }

    fn put_snapshot(&self, shard: &ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> ReplicatorFuture<'_, ()> {
        let mut state = self.lock();
        let log = state.log_mut(shard);
        let result = if log.epoch != epoch {
            Err(log.stale(epoch))
        } else if sequence > log.head {
            Err(ReplicationError::Rejected(format!(
                "shard {shard}: snapshot at {sequence} is past the head {}",
                log.head
            )))
        } else {
            if log.snapshot.as_ref().is_none_or(|s| s.sequence <= sequence) {
                log.snapshot = Some(StoredSnapshot { sequence, data, hash: None });
            }
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::Timestamp;
    use crate::event::{Event, EventKind, Origin};
    use crate::ids::{PeerId, Principal};

    fn batch(producer: &str, producer_seq: u64, events: usize) -> Batch {
        let origin =
            Arc::new(Origin { shard: ShardId::from("s"), principal: Principal::from("p"), peer: PeerId::from("n") });
        let event = Event { origin, recorded_at: Timestamp::EPOCH, kind: EventKind::Resumed };
        Batch {
            shard: ShardId::from("s"),
            producer: ProducerId::from(producer),
            producer_seq,
            epoch: Epoch::ZERO,
            first: Sequence::ZERO,
            events: vec![event; events],
        }
    }

    #[tokio::test]
    async fn passes_the_replicator_contract() {
        let log = Arc::new(InMemoryReplicator::new());
        crate::replication::contract::check(
            || {
                let log = Arc::clone(&log);
                async move { log as Arc<dyn Replicator> }
            },
            crate::replication::contract::Durability::Volatile,
        )
        .await;
    }

    #[tokio::test]
    async fn sequences_are_gapless_per_shard_and_retries_are_recognised() {
        let replicator = InMemoryReplicator::new();
        let first = replicator.publish(&batch("a", 1, 2)).await.expect("publish");
        assert_eq!((first.first, first.count, first.deduplicated), (Sequence::new(1), 2, false));
        let retry = replicator.publish(&batch("a", 1, 2)).await.expect("retry");
        assert_eq!((retry.first, retry.deduplicated), (Sequence::new(1), true));
        let next = replicator.publish(&batch("b", 1, 1)).await.expect("other producer");
        assert_eq!(next.first, Sequence::new(3));
        assert_eq!(replicator.head(&ShardId::from("s")), Sequence::new(3));
        assert!(matches!(replicator.publish(&batch("b", 0, 1)).await, Err(ReplicationError::Rejected(_))));
    }

    #[tokio::test]
    async fn a_failure_after_the_write_is_recognised_on_retry() {
        let replicator = InMemoryReplicator::new();
        replicator.inject([PublishFault::AfterWrite]);
        assert!(replicator.publish(&batch("a", 1, 1)).await.is_err());
        assert_eq!(replicator.publish(&batch("a", 1, 1)).await.map(|a| a.deduplicated), Ok(true));
        assert_eq!(replicator.events(&ShardId::from("s")).len(), 1);
    }

    #[tokio::test]
    async fn retention_keeps_the_newest_events() {
        let replicator = InMemoryReplicator::with_retention(2);
        for seq in 1..=3 {
            replicator.publish(&batch("a", seq, 1)).await.expect("publish");
        }
        let kept: Vec<u64> = replicator.events(&ShardId::from("s")).iter().map(|e| e.sequence.get()).collect();
        assert_eq!(kept, vec![2, 3]);
    }

    #[tokio::test]
    async fn a_skipped_producer_sequence_is_refused_without_consuming_it() {
        let replicator = InMemoryReplicator::new();
        replicator.publish(&batch("a", 1, 1)).await.expect("publish");
        assert!(matches!(replicator.publish(&batch("a", 3, 1)).await, Err(ReplicationError::Rejected(_))));
        assert_eq!(replicator.publish(&batch("a", 2, 1)).await.map(|a| a.first), Ok(Sequence::new(2)));
    }

    #[tokio::test]
    async fn every_grant_bumps_the_epoch_and_stale_epochs_are_refused() {
        let replicator = InMemoryReplicator::new();
        let shard = ShardId::from("s");
        let grant = replicator.acquire_shard(&shard, "node-a", Duration::from_secs(10)).await.expect("acquire");
        assert!(grant.granted);
        assert_eq!(grant.epoch, Epoch::new(1));
        // Epoch zero is refused once the shard was granted.
        assert!(matches!(replicator.publish(&batch("a", 1, 1)).await, Err(ReplicationError::StaleEpoch { .. })));
        let mut fenced = batch("a", 1, 1);
        fenced.epoch = grant.epoch;
        replicator.publish(&fenced).await.expect("the holder's epoch is accepted");
        let other = replicator.acquire_shard(&shard, "node-b", Duration::from_secs(10)).await.expect("acquire");
        assert!(!other.granted, "a live lease is not granted to another owner");
        assert_eq!(other.owner, "node-a");
        let stolen = replicator.steal(&shard, "node-b");
        fenced.producer_seq = 2;
        assert_eq!(
            replicator.publish(&fenced).await,
            Err(ReplicationError::StaleEpoch { shard: shard.clone(), given: Epoch::new(1), current: stolen })
        );
        assert_eq!(replicator.head(&shard), Sequence::new(1), "nothing of the stale batch was written");
    }

    #[tokio::test]
    async fn reads_below_the_retained_events_say_they_were_trimmed() {
        let replicator = InMemoryReplicator::with_retention(2);
        let shard = ShardId::from("s");
        for seq in 1..=4 {
            replicator.publish(&batch("a", seq, 1)).await.expect("publish");
        }
        let trimmed = replicator.read_log(&shard, Sequence::new(1), 10).await;
        assert_eq!(trimmed, Err(ReplicationError::Trimmed { shard: shard.clone(), low: Sequence::new(3) }));
        let page = replicator.read_log(&shard, Sequence::new(2), 10).await.expect("kept");
        assert_eq!(page.events.iter().map(|e| e.event.sequence.get()).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!((page.head, page.low), (Sequence::new(4), Sequence::new(3)));
    }
}
