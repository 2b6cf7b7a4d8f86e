//! The append decision: what becomes of a batch, judged against the shard
//! and the producer's records as the writing transaction sees them. Pure (no
//! database): both stores call [`decide`] on the rows they read or locked,
//! so they answer alike, and every outcome is unit-tested here.
//!
//! A retry of a batch already written (its `(producer, producer_seq)` is on
//! record) is answered with the original acknowledgement whatever the shard
//! looks like now; anything else is checked against the lease, the epoch,
//! the producer's sequence and the expected head, in that order.

use super::{AppendAck, AppendBatch, StoreError, count_mismatch};
use crate::log::ids::Epoch;
use crate::log::ids::{InvalidInput, ProducerSeq, Sequence};

/// What to do with a batch the store may answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Write it after the shard's head.
    Write,
    /// A retry of a batch already written: answer the original
    /// acknowledgement (marked duplicate), write nothing.
    Duplicate(AppendAck),
}

/// Decides a batch: `shard` is the shard's row (`None`: no such shard),
/// `recorded` the acknowledgement recorded for the batch's
/// `(producer, producer_seq)`, `latest` the producer's newest recorded batch
/// on the shard. A known retry must resend as many events as were written;
/// everything else goes through [`check`]. Nothing is written on an error.
pub(crate) fn decide(
    batch: &AppendBatch,
    shard: Option<ShardView>,
    recorded: Option<AppendAck>,
    latest: Option<ProducerSeq>,
) -> Result<Verdict, StoreError> {
    if let Some(ack) = recorded {
        let written = (ack.last.0 - ack.first.0 + 1) as usize;
        if written != batch.events.len() {
            return Err(count_mismatch(batch, written));
        }
        return Ok(Verdict::Duplicate(AppendAck { duplicate: true, ..ack }));
    }
    let Some(shard) = shard else { return Err(StoreError::NoLease { shard: batch.shard.clone() }) };
    check(batch, shard, latest)?;
    Ok(Verdict::Write)
}

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

/// Checks a batch that is not a known retry, in this order:
/// the lease is held; the batch's epoch is the shard's; the producer
/// sequence follows the producer's latest (a producer's first batch may
/// carry any number); the batch's expected first sequence, when set, is the
/// shard's next. `latest` is the producer's newest recorded batch on the
/// shard. Nothing is written on a refusal.
pub(crate) fn check(batch: &AppendBatch, shard: ShardView, latest: Option<ProducerSeq>) -> Result<(), StoreError> {
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
    use crate::log::event::{ChainHash, NewEvent};
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

    fn recorded(first: u64, last: u64) -> AppendAck {
        AppendAck { first: Sequence(first), last: Sequence(last), duplicate: false, last_hash: ChainHash::ZERO }
    }

    /// The outcome of one row of the table, as a short name.
    fn outcome(result: Result<Verdict, StoreError>) -> String {
        match result {
            Ok(Verdict::Write) => "write".into(),
            Ok(Verdict::Duplicate(ack)) => format!("duplicate {}..{} marked {}", ack.first, ack.last, ack.duplicate),
            Err(StoreError::NoLease { .. }) => "no lease".into(),
            Err(StoreError::StaleEpoch { given, current, .. }) => format!("stale epoch {given} (current {current})"),
            Err(StoreError::OutOfOrder { given, expected, .. }) => format!("out of order {given} (next {expected})"),
            Err(StoreError::HeadMismatch { expected, head, .. }) => format!("head mismatch {expected} (head {head})"),
            Err(StoreError::Invalid(invalid)) => format!("invalid {}", invalid.field),
            Err(other) => format!("unexpected {other}"),
        }
    }

    /// Every outcome of the decision, one row each: (case, batch, shard,
    /// recorded ack, producer's latest, expected outcome).
    #[test]
    fn every_outcome_of_the_decision() {
        let free = ShardView { held: false, ..SHARD };
        type Row = (&'static str, AppendBatch, Option<ShardView>, Option<AppendAck>, Option<u64>, &'static str);
        let rows: Vec<Row> = vec![
            ("the next batch", batch(5, 3, Some(11)), Some(SHARD), None, Some(4), "write"),
            ("no expected head", batch(5, 3, None), Some(SHARD), None, Some(4), "write"),
            ("a producer's first batch, any number", batch(9, 3, None), Some(SHARD), None, None, "write"),
            (
                "a retry of a written batch",
                batch(5, 3, None),
                Some(SHARD),
                Some(recorded(7, 7)),
                Some(5),
                "duplicate 7..7 marked true",
            ),
            (
                "a retry after the epoch moved on",
                batch(5, 2, None),
                Some(SHARD),
                Some(recorded(7, 7)),
                Some(9),
                "duplicate 7..7 marked true",
            ),
            (
                "a retry after the lease was released",
                batch(5, 3, None),
                Some(free),
                Some(recorded(7, 7)),
                Some(5),
                "duplicate 7..7 marked true",
            ),
            (
                "a retry with another event count",
                batch(5, 3, None),
                Some(SHARD),
                Some(recorded(7, 8)),
                Some(5),
                "invalid producer_seq",
            ),
            ("a shard that does not exist", batch(5, 3, None), None, None, None, "no lease"),
            ("a shard nobody holds", batch(5, 3, None), Some(free), None, Some(4), "no lease"),
            ("an older epoch", batch(5, 2, None), Some(SHARD), None, Some(4), "stale epoch 2 (current 3)"),
            ("a newer epoch", batch(5, 4, None), Some(SHARD), None, Some(4), "stale epoch 4 (current 3)"),
            (
                "a producer sequence that skips ahead",
                batch(7, 3, None),
                Some(SHARD),
                None,
                Some(4),
                "out of order 7 (next 5)",
            ),
            (
                "a producer sequence at the latest, unrecorded",
                batch(4, 3, None),
                Some(SHARD),
                None,
                Some(4),
                "invalid producer_seq",
            ),
            (
                "a producer sequence below the latest, unrecorded",
                batch(2, 3, None),
                Some(SHARD),
                None,
                Some(4),
                "invalid producer_seq",
            ),
            (
                "an expected head past the shard's next",
                batch(5, 3, Some(12)),
                Some(SHARD),
                None,
                Some(4),
                "head mismatch 12 (head 10)",
            ),
            (
                "an expected head behind the shard's next",
                batch(5, 3, Some(10)),
                Some(SHARD),
                None,
                Some(4),
                "head mismatch 10 (head 10)",
            ),
            // The order of the checks: lease, then epoch, then producer
            // sequence, then head.
            ("no lease and a stale epoch", batch(7, 2, Some(1)), Some(free), None, Some(4), "no lease"),
            (
                "a stale epoch and a skipped sequence",
                batch(7, 2, Some(1)),
                Some(SHARD),
                None,
                Some(4),
                "stale epoch 2 (current 3)",
            ),
            (
                "a skipped sequence and a wrong head",
                batch(7, 3, Some(1)),
                Some(SHARD),
                None,
                Some(4),
                "out of order 7 (next 5)",
            ),
        ];
        for (case, batch, shard, recorded, latest, expected) in rows {
            let got = outcome(decide(&batch, shard, recorded, latest.map(ProducerSeq)));
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn a_number_at_or_below_the_latest_without_a_record_is_named_honestly() {
        let refused = check(&batch(5, 3, None), SHARD, Some(ProducerSeq(10))).expect_err("refused");
        let message = refused.to_string();
        assert!(message.contains("producer_seq") && message.contains("the next is 11"), "{message}");
        assert!(!message.contains("was already used") && !message.contains("trimmed"), "{message}");
    }
}
