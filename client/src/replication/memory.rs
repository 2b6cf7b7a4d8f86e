//! The in-memory replicator: a per-shard log in process memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::{Appended, Batch, PublishFuture, ReplicationError, Replicator};
use crate::ids::{ProducerId, Sequence, ShardId};
use crate::queue::SequencedEvent;

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
    shards: HashMap<ShardId, ShardLog>,
    faults: VecDeque<PublishFault>,
}

#[derive(Debug, Default)]
struct ShardLog {
    head: Sequence,
    events: VecDeque<SequencedEvent>,
    /// The last batch of each producer: retries only ever repeat the newest
    /// batch, because a producer sends its next batch only after this one was
    /// answered.
    producers: HashMap<ProducerId, (u64, Appended)>,
}

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
        let Some(log) = state.shards.get(shard) else { return Vec::new() };
        let skip = log.events.partition_point(|e| e.sequence <= after);
        log.events.iter().skip(skip).cloned().collect()
    }

    /// The sequence of `shard`'s newest event (zero for an empty log).
    pub fn head(&self, shard: &ShardId) -> Sequence {
        self.lock().shards.get(shard).map_or(Sequence::ZERO, |log| log.head)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the log consistent (every
        // mutation below is a single push or counter bump), so poisoning is
        // not a reason to stop serving.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn append(&self, batch: &Batch) -> Result<Appended, ReplicationError> {
        let mut state = self.lock();
        let fault = state.faults.pop_front();
        if fault == Some(PublishFault::BeforeWrite) {
            return Err(ReplicationError::Unavailable("injected failure before write".into()));
        }
        if !state.shards.contains_key(&batch.shard) {
            state.shards.insert(batch.shard.clone(), ShardLog::default());
        }
        let log = state.shards.get_mut(&batch.shard).expect("the shard's log was inserted above");
        let appended = match log.producers.get(&batch.producer) {
            Some(&(seq, appended)) if seq == batch.producer_seq => Appended { deduplicated: true, ..appended },
            Some(&(seq, _)) if seq > batch.producer_seq => {
                return Err(ReplicationError::Rejected(format!(
                    "producer {} sent batch {} after batch {seq}",
                    batch.producer, batch.producer_seq
                )));
            }
            _ => {
                let first = log.head.after(1);
                for (offset, event) in batch.events.iter().enumerate() {
                    log.events.push_back(SequencedEvent { sequence: first.after(offset as u64), event: event.clone() });
                }
                log.head = log.head.after(batch.events.len() as u64);
                if let Some(retention) = self.retention {
                    while log.events.len() > retention {
                        log.events.pop_front();
                    }
                }
                let appended = Appended { first, count: batch.events.len() as u64, deduplicated: false };
                match log.producers.get_mut(&batch.producer) {
                    Some(last) => *last = (batch.producer_seq, appended),
                    None => {
                        log.producers.insert(batch.producer.clone(), (batch.producer_seq, appended));
                    }
                }
                appended
            }
        };
        if fault == Some(PublishFault::AfterWrite) {
            return Err(ReplicationError::Unavailable("injected failure after write".into()));
        }
        Ok(appended)
    }
}

impl Replicator for InMemoryReplicator {
    fn publish<'a>(&'a self, batch: &'a Batch) -> PublishFuture<'a> {
        let result = self.append(batch);
        Box::pin(std::future::ready(result))
    }
}
