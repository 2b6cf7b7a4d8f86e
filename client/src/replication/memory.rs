//! The in-memory replicator: a per-shard log in process memory.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::{Appended, Batch, PublishFuture, ReplicationError, Replicator};
use crate::ids::{ProducerId, Sequence, ShardId};
use crate::queue::{Event, SequencedEvent};

/// A failure to inject into the next publishes of an [`InMemoryReplicator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishFault {
    /// Refuse the batch without writing it (a connection that failed early).
    BeforeWrite,
    /// Write the batch, then report failure (an acknowledgement lost on the
    /// way back): the retry must be recognised, not written twice.
    AfterWrite,
}

/// A replicator that keeps each shard's log in memory.
///
/// It assigns sequences like the hub (gapless from 1, atomically per batch),
/// deduplicates retried batches by `(producer, producer_seq)`, and keeps the
/// events for replay (all of them, or the newest `retention`). Failures can be
/// injected with [`InMemoryReplicator::inject`]. Nothing survives the
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
    /// The last batch of each recent producer, the one that wrote last at
    /// the end (it is checked first): retries only ever repeat a producer's
    /// newest batch, because a producer sends its next batch only after this
    /// one was answered.
    producers: Vec<(ProducerId, u64, Appended)>,
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
    /// (benchmarks run millions of cycles); sequences stay gapless.
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the log consistent (every
        // mutation below is a single push or counter bump), so poisoning is
        // not a reason to stop serving.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[inline]
    fn append(&self, batch: &Batch) -> Result<Appended, ReplicationError> {
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

    /// The log of `shard`, created on its first batch.
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
            producers: Vec::new(),
        });
        self.shards.len() - 1
    }
}

impl ShardLog {
    #[inline]
    fn append(&mut self, batch: &Batch, retention: Option<usize>) -> Result<Appended, ReplicationError> {
        // The common case: the producer that wrote last sends its next batch.
        let newest = self.producers.len().wrapping_sub(1);
        match self.producers.last_mut() {
            Some((producer, seq, appended)) if *producer == batch.producer && *seq < batch.producer_seq => {
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

    /// Appends the events after the head.
    #[inline]
    fn write(&mut self, batch: &Batch, retention: Option<usize>) {
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
        let last = self.producers.iter().rposition(|(producer, _, _)| *producer == batch.producer);
        if let Some(index) = last {
            let (_, seq, appended) = &self.producers[index];
            if *seq == batch.producer_seq {
                return Ok(Appended { deduplicated: true, ..*appended });
            }
            if *seq > batch.producer_seq {
                return Err(ReplicationError::Rejected(format!(
                    "producer {} sent batch {} after batch {seq}",
                    batch.producer, batch.producer_seq
                )));
            }
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
}

impl Replicator for InMemoryReplicator {
    fn publish<'a>(&'a self, batch: &'a Batch) -> PublishFuture<'a> {
        PublishFuture::ready(self.append(batch))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::Timestamp;
    use crate::ids::{PeerId, Principal};
    use crate::queue::{Event, EventKind, Origin};

    fn batch(producer: &str, producer_seq: u64, events: usize) -> Batch {
        let origin =
            Arc::new(Origin { shard: ShardId::from("s"), principal: Principal::from("p"), peer: PeerId::from("n") });
        let event = Event { origin, recorded_at: Timestamp::EPOCH, kind: EventKind::Resumed };
        Batch {
            shard: ShardId::from("s"),
            producer: ProducerId::from(producer),
            producer_seq,
            events: vec![event; events],
        }
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
}
