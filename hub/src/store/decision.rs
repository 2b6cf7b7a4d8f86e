//! The append decision: whether a batch that is not a known retry may be
//! written to its shard, judged against the shard as the writing
//! transaction sees it. Pure (no database): both stores call it on the rows
//! they locked, in the same order of checks, so they refuse alike.
//!
//! A retry of a batch already written is recognised before this (by its
//! `(producer, producer_seq)` record) and answered with the original
//! acknowledgement whatever the shard looks like now.

use super::{AppendBatch, StoreError};
use crate::log::ids::Epoch;
use crate::log::ids::{InvalidInput, ProducerSeq, Sequence};

/// The shard as the deciding transaction sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShardView {
    /// Someone holds the shard's lease.
    pub(crate) held: bool,
    /// The current epoch.
    pub(crate) epoch: Epoch,
    /// The last sequence written.
    pub(crate) head: Sequence,
}

/// Decides a batch that is not a known retry, checking in this order:
/// the lease is held; the batch's epoch is the shard's; the producer
/// sequence follows the producer's latest (a producer's first batch may
/// carry any number); the batch's expected first sequence, when set, is the
/// shard's next. `latest` is the producer's newest recorded batch on the
/// shard. Nothing is written on a refusal.
pub(crate) fn decide(batch: &AppendBatch, shard: ShardView, latest: Option<ProducerSeq>) -> Result<(), StoreError> {
    if !shard.held {
        return Err(StoreError::NoLease { shard: batch.shard.clone() });
    }
    if shard.epoch != batch.epoch {
        return Err(StoreError::StaleEpoch { shard: batch.shard.clone(), given: batch.epoch, current: shard.epoch });
    }
    if let Some(latest) = latest {
        if batch.producer_seq <= latest {
            return Err(InvalidInput::new(
                "producer_seq",
                // Only what is known: the store cannot tell a number the
                // producer skipped (it started above it) from one whose
                // record retention dropped, so it claims neither.
                format!(
                    "{} is not after producer {}'s latest batch {latest} on shard {}, and no batch {} of it is \
                     on record; producer sequences only move forward, the next is {}; nothing was written",
                    batch.producer_seq,
                    batch.producer,
                    batch.shard,
                    batch.producer_seq,
                    latest.0 + 1
                ),
            )
            .into());
        }
        if batch.producer_seq.0 != latest.0 + 1 {
            return Err(StoreError::OutOfOrder {
                shard: batch.shard.clone(),
                producer: batch.producer.clone(),
                given: batch.producer_seq,
                expected: ProducerSeq(latest.0 + 1),
            });
        }
    }
    if let Some(expected) = batch.expected_first
        && expected != shard.head.next()
    {
        return Err(StoreError::HeadMismatch { shard: batch.shard.clone(), expected, head: shard.head });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::event::NewEvent;
    use crate::log::ids::{ProducerId, ShardId};

    fn batch(producer_seq: u64, epoch: u64, expected_first: Option<u64>) -> AppendBatch {
        AppendBatch {
            shard: ShardId::parse("resourcelease.users").expect("valid"),
            producer: ProducerId::parse("node-a/1").expect("valid"),
            producer_seq: ProducerSeq(producer_seq),
            epoch: Epoch(epoch),
            expected_first: expected_first.map(Sequence),
            events: vec![NewEvent {
                recorded_at: std::time::SystemTime::UNIX_EPOCH,
                body: bytes::Bytes::from_static(b"x"),
            }],
        }
    }

    const SHARD: ShardView = ShardView { held: true, epoch: Epoch(3), head: Sequence(10) };

    #[test]
    fn a_batch_that_follows_is_accepted() {
        assert!(decide(&batch(5, 3, Some(11)), SHARD, Some(ProducerSeq(4))).is_ok());
        assert!(decide(&batch(9, 3, None), SHARD, None).is_ok(), "a producer's first batch may carry any number");
    }

    #[test]
    fn each_refusal_has_its_case_in_order_of_the_checks() {
        let free = ShardView { held: false, ..SHARD };
        assert!(matches!(decide(&batch(5, 2, Some(1)), free, None), Err(StoreError::NoLease { .. })));
        assert!(matches!(
            decide(&batch(5, 2, Some(1)), SHARD, Some(ProducerSeq(9))),
            Err(StoreError::StaleEpoch { given: Epoch(2), current: Epoch(3), .. })
        ));
        assert!(matches!(
            decide(&batch(7, 3, Some(1)), SHARD, Some(ProducerSeq(4))),
            Err(StoreError::OutOfOrder { expected: ProducerSeq(5), .. })
        ));
        assert!(matches!(
            decide(&batch(5, 3, Some(12)), SHARD, Some(ProducerSeq(4))),
            Err(StoreError::HeadMismatch { expected: Sequence(12), head: Sequence(10), .. })
        ));
    }

    #[test]
    fn a_number_at_or_below_the_latest_without_a_record_is_named_honestly() {
        let refused = decide(&batch(5, 3, None), SHARD, Some(ProducerSeq(10))).expect_err("refused");
        let message = refused.to_string();
        assert!(message.contains("producer_seq") && message.contains("the next is 11"), "{message}");
        assert!(!message.contains("was already used") && !message.contains("trimmed"), "{message}");
    }
}
