//! The checks every event passes before a sink sees it.
//!
//! A [`ShardChain`] holds a shard's position (the last sequence the sink
//! has, and that event's hash) and admits the hub's events against it:
//!
//! - an event at or below the position is a repeat (the hub resent from an
//!   older checkpoint after a reconnection) and is dropped; the one *at* the
//!   position must carry the hash the position recorded;
//! - the next event must be exactly the position's sequence plus one
//!   ([`SinkError::Gap`] otherwise), link to the position's hash, and carry
//!   its own hash: `SHA-256(prev_hash || be64(sequence) || be64(epoch) ||
//!   body)`, the body being the served bytes without the four fields the log
//!   assigns (see `replication.proto`). Anything else is
//!   [`SinkError::Corrupt`].
//!
//! The hub verifies the chain before it serves an event too; checking again
//! here means a sink never trusts the network or a hub replica alone, and
//! that a sink's own stored hash pins the log it resumes on.

use bytes::Bytes;
use omnirelay_proto::Message as _;
use omnirelay_proto::raw::{RawEvent, walk};
use omnirelay_proto::replication::v1 as rpb;

use super::{SinkError, SinkEvent};
use crate::ids::{Sequence, ShardId};

/// Length of a chain hash.
const HASH_BYTES: usize = 32;

/// Fields of a served event that the log assigns, outside the hashed body:
/// sequence, epoch, prev_hash, hash.
const ASSIGNED_FIELDS: [u32; 4] = [2, 3, 8, 9];

/// A shard's position and the checks of the events that follow it.
/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct ShardChain {
    shard: ShardId,
    position: Sequence,
    /// Hash of the event at `position`; 32 zero bytes at position 0; `None`
    /// when a stored position carried none.
    hash: Option<Bytes>,
}

impl ShardChain {
    /// A chain at `position`, whose event had `hash` (when known).
    pub fn new(shard: ShardId, position: Sequence, hash: Option<Bytes>) -> Self {
        let hash = match (position, hash) {
            (Sequence::ZERO, _) => Some(Bytes::from_static(&[0; HASH_BYTES])),
            (_, hash) => hash,
        };
        Self { shard, position, hash }
    }

    /// The last admitted sequence.
    pub fn position(&self) -> Sequence {
        self.position
    }

    /// The hash of the event at the position, when known.
    pub fn hash(&self) -> Option<&Bytes> {
        self.hash.as_ref()
    }

    /// Checks `raw` (one frame's events, in order) and returns the events
    /// after the position, moving the position past them. On an error the
    /// position stays where it was.
    pub fn admit(&mut self, raw: &[RawEvent]) -> Result<Vec<SinkEvent>, SinkError> {
        self.admit_bytes(raw.iter().map(|raw| Bytes::copy_from_slice(raw.as_slice())))
    }

    /// [`admit`](Self::admit), taking the events: each event's bytes become
    /// its [`SinkEvent::raw`] (and back its bytes fields) without a copy.
    pub fn admit_owned(&mut self, raw: Vec<RawEvent>) -> Result<Vec<SinkEvent>, SinkError> {
        self.admit_bytes(raw.into_iter().map(RawEvent::into_bytes))
    }

    fn admit_bytes(&mut self, raw: impl ExactSizeIterator<Item = Bytes>) -> Result<Vec<SinkEvent>, SinkError> {
        let mut position = self.position;
        let mut hash = self.hash.clone();
        let mut admitted = Vec::with_capacity(raw.len());
        for raw in raw {
            let event = self.check(raw)?;
            if event.sequence <= position {
                if event.sequence == position
                    && let Some(expected) = &hash
                    && *expected != event.hash
                {
                    return Err(self.corrupt(format!(
                        "the event at sequence {position} does not have the hash this sink recorded for it"
                    )));
                }
                continue;
            }
            if event.sequence != position.after(1) {
                return Err(SinkError::Gap {
                    shard: self.shard.clone(),
                    expected: position.after(1),
                    got: event.sequence,
                });
            }
            if let Some(expected) = &hash
                && *expected != event.event.prev_hash
            {
                return Err(self.corrupt(format!(
                    "the event at sequence {} does not link to the event at sequence {position}",
                    event.sequence
                )));
            }
            position = event.sequence;
            hash = Some(event.hash.clone());
            admitted.push(event);
        }
        self.position = position;
        self.hash = hash;
        Ok(admitted)
    }

    /// Moves the position to a snapshot at `sequence`; false (and nothing
    /// moves) when the position is already there or past it.
    pub fn admit_snapshot(&mut self, sequence: Sequence, hash: Bytes) -> Result<bool, SinkError> {
        if hash.len() != HASH_BYTES {
            return Err(self.corrupt(format!("the snapshot at sequence {sequence} has no valid hash")));
        }
        if sequence <= self.position {
            return Ok(false);
        }
        self.position = sequence;
        self.hash = Some(hash);
        Ok(true)
    }

    /// Decodes one event and checks that it is of this shard and that its
    /// hash is its own.
    fn check(&self, raw: Bytes) -> Result<SinkEvent, SinkError> {
        // Decoded from `Bytes`, the event's bytes fields share its buffer.
        let event = rpb::ReplicationEvent::decode(raw.clone())
            .map_err(|err| self.corrupt(format!("an event does not decode: {err}")))?;
        let sequence = Sequence::new(event.sequence);
        if event.shard_id != self.shard.as_str() {
            return Err(self.corrupt(format!("the event at sequence {sequence} names shard {:?}", event.shard_id)));
        }
        if event.hash.len() != HASH_BYTES || event.prev_hash.len() != HASH_BYTES {
            return Err(self.corrupt(format!("the event at sequence {sequence} has no valid chain hashes")));
        }
        let computed = chain_hash(&event.prev_hash, event.sequence, event.epoch, &raw)
            .map_err(|err| self.corrupt(format!("the event at sequence {sequence} does not parse: {err}")))?;
        if computed.as_ref() != event.hash.as_ref() {
            return Err(self.corrupt(format!("the event at sequence {sequence} does not match its hash")));
        }
        Ok(SinkEvent { shard: self.shard.clone(), sequence, hash: event.hash.clone(), raw, event })
    }

    fn corrupt(&self, reason: String) -> SinkError {
        SinkError::Corrupt { shard: self.shard.clone(), reason }
    }
}

/// The chain hash of a served event: SHA-256 over the previous hash, the
/// sequence and epoch (big endian) and the body (the served bytes without
/// the fields the log assigns).
pub fn chain_hash(
    prev_hash: &[u8],
    sequence: u64,
    epoch: u64,
    served: &[u8],
) -> Result<[u8; HASH_BYTES], omnirelay_proto::raw::Malformed> {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    context.update(prev_hash);
    context.update(&sequence.to_be_bytes());
    context.update(&epoch.to_be_bytes());
    for field in walk(served) {
        let field = field?;
        if !ASSIGNED_FIELDS.contains(&field.tag) {
            context.update(field.bytes);
        }
    }
    let digest = context.finish();
    let mut hash = [0; HASH_BYTES];
    hash.copy_from_slice(digest.as_ref());
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use omnirelay_proto::Message as _;
    use omnirelay_proto::replication::v1 as rpb;

    use super::*;

    const SHARD: &str = "resourcelease.users";

    /// A log of `n` events chained as the hub chains them.
    fn log(n: u64) -> Vec<RawEvent> {
        let mut prev = vec![0u8; HASH_BYTES];
        let mut events = Vec::new();
        for sequence in 1..=n {
            let body = rpb::ReplicationEvent {
                shard_id: SHARD.into(),
                principal: "p".into(),
                event: Some(rpb::replication_event::Event::Completed(rpb::Completed {
                    item_id: format!("item-{sequence}"),
                    fencing_token: sequence,
                })),
                ..Default::default()
            };
            let hash = chain_hash(&prev, sequence, 1, &body.encode_to_vec()).expect("parses");
            let served = rpb::ReplicationEvent {
                sequence,
                epoch: 1,
                prev_hash: prev.clone().into(),
                hash: hash.to_vec().into(),
                ..body
            };
            prev = hash.to_vec();
            events.push(RawEvent::encode(&served));
        }
        events
    }

    fn sequences(events: &[SinkEvent]) -> Vec<u64> {
        events.iter().map(|e| e.sequence.get()).collect()
    }

    #[test]
    fn consecutive_events_are_admitted_and_repeats_dropped() {
        let log = log(6);
        let mut chain = ShardChain::new(SHARD.into(), Sequence::ZERO, None);
        assert_eq!(sequences(&chain.admit(&log[..3]).expect("admits")), [1, 2, 3]);
        // A resend from an older checkpoint: the repeats are dropped.
        assert_eq!(sequences(&chain.admit(&log[1..5]).expect("admits")), [4, 5]);
        assert_eq!(chain.position(), Sequence::new(5));
    }

    #[test]
    fn a_gap_is_an_error_and_moves_nothing() {
        let log = log(6);
        let mut chain = ShardChain::new(SHARD.into(), Sequence::ZERO, None);
        chain.admit(&log[..2]).expect("admits");
        let err = chain.admit(&log[3..]).expect_err("sequence 3 is missing");
        assert!(matches!(err, SinkError::Gap { expected, got, .. } if expected.get() == 3 && got.get() == 4), "{err}");
        assert_eq!(chain.position(), Sequence::new(2));
    }

    #[test]
    fn a_resumed_position_must_match_the_log() {
        let log = log(4);
        let stored = log[1].decode().expect("decodes").hash;
        let mut chain = ShardChain::new(SHARD.into(), Sequence::new(2), Some(stored));
        assert_eq!(sequences(&chain.admit(&log).expect("admits")), [3, 4]);

        // A position whose hash the log no longer has.
        let mut chain = ShardChain::new(SHARD.into(), Sequence::new(2), Some(Bytes::from_static(&[7; 32])));
        let err = chain.admit(&log[2..]).expect_err("does not link");
        assert!(matches!(err, SinkError::Corrupt { .. }), "{err}");
        let err = chain.admit(&log[1..]).expect_err("the event at the position differs");
        assert!(matches!(err, SinkError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn an_edited_event_is_corrupt() {
        let log = log(3);
        let mut edited = log[1].decode().expect("decodes");
        edited.principal = "someone else".into();
        let mut chain = ShardChain::new(SHARD.into(), Sequence::ZERO, None);
        let err = chain.admit(&[log[0].clone(), RawEvent::encode(&edited)]).expect_err("the hash no longer matches");
        assert!(matches!(err, SinkError::Corrupt { .. }), "{err}");
        assert_eq!(chain.position(), Sequence::ZERO, "nothing of a failed frame is admitted");

        // Relinked to look consistent, yet its predecessor's hash differs.
        let mut forged = log[2].decode().expect("decodes");
        forged.prev_hash = Bytes::from_static(&[1; 32]);
        let body = rpb::ReplicationEvent {
            sequence: 0,
            epoch: 0,
            prev_hash: Bytes::new(),
            hash: Bytes::new(),
            ..forged.clone()
        };
        forged.hash = chain_hash(&forged.prev_hash, 3, 1, &body.encode_to_vec()).expect("parses").to_vec().into();
        let err = chain.admit(&[log[0].clone(), log[1].clone(), RawEvent::encode(&forged)]).expect_err("broken link");
        assert!(matches!(err, SinkError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn owned_frames_are_admitted_as_borrowed_ones_and_stop_on_a_gap_or_broken_link() {
        let log = log(6);
        let mut chain = ShardChain::new(SHARD.into(), Sequence::ZERO, None);
        let admitted = chain.admit_owned(log[..3].to_vec()).expect("admits");
        assert_eq!(sequences(&admitted), [1, 2, 3]);
        assert_eq!(admitted[2].raw.as_ref(), log[2].as_slice(), "the served bytes, kept");
        assert_eq!(admitted, ShardChain::new(SHARD.into(), Sequence::ZERO, None).admit(&log[..3]).expect("admits"));

        let err = chain.admit_owned(log[4..].to_vec()).expect_err("sequence 4 is missing");
        assert!(matches!(err, SinkError::Gap { expected, got, .. } if expected.get() == 4 && got.get() == 5), "{err}");
        let mut relinked = log[3].decode().expect("decodes");
        relinked.prev_hash = Bytes::from_static(&[9; 32]);
        let err = chain.admit_owned(vec![RawEvent::encode(&relinked)]).expect_err("a broken link");
        assert!(matches!(err, SinkError::Corrupt { .. }), "{err}");
        assert_eq!(chain.position(), Sequence::new(3), "a refused frame moves nothing");
        assert_eq!(sequences(&chain.admit_owned(log[3..].to_vec()).expect("admits")), [4, 5, 6]);
    }

    #[test]
    fn an_event_of_another_shard_is_refused() {
        let log = log(1);
        let mut chain = ShardChain::new("resourcelease.other".into(), Sequence::ZERO, None);
        assert!(matches!(chain.admit(&log), Err(SinkError::Corrupt { .. })));
    }

    #[test]
    fn a_snapshot_moves_the_position_forward_only() {
        let mut chain = ShardChain::new(SHARD.into(), Sequence::new(5), None);
        assert!(!chain.admit_snapshot(Sequence::new(3), Bytes::from_static(&[1; 32])).expect("valid"));
        assert!(chain.admit_snapshot(Sequence::new(9), Bytes::from_static(&[1; 32])).expect("valid"));
        assert_eq!(chain.position(), Sequence::new(9));
        assert!(chain.admit_snapshot(Sequence::new(10), Bytes::from_static(&[1; 3])).is_err());
    }
}
