//! Events as the log stores them, and the hash chain that ties each event to
//! the one before it.
//!
//! An event's `body` is the canonical protobuf encoding of its
//! `ReplicationEvent` with `sequence`, `epoch`, `prev_hash` and `hash`
//! cleared (see `proto/omnirelay/replication/v1/replication.proto`); the log
//! assigns those four. The chain hash is
//! `SHA-256(prev_hash || be64(sequence) || be64(epoch) || body)`, with 32 zero
//! bytes before sequence 1. A reader that recomputes it for every event it
//! serves detects any edit, deletion or reordering of stored rows.

use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::log::ids::{Epoch, Sequence, ShardId};

/// A SHA-256 chain hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The hash "before" sequence 1.
    pub const ZERO: ChainHash = ChainHash([0; 32]);

    /// Computes the hash of the event at `sequence`, chained to `prev`.
    pub fn compute(prev: &ChainHash, sequence: Sequence, epoch: Epoch, body: &[u8]) -> ChainHash {
        let mut hasher = Sha256::new();
        hasher.update(prev.0);
        hasher.update(sequence.0.to_be_bytes());
        hasher.update(epoch.0.to_be_bytes());
        hasher.update(body);
        ChainHash(hasher.finalize().into())
    }

    /// Reads a hash from stored or received bytes; `None` unless exactly 32
    /// bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<ChainHash> {
        bytes.try_into().ok().map(ChainHash)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// All 32 bytes in lowercase hex (64 characters), the form operators
    /// save and pass back (`omnirelay-hub verify --anchor`).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Reads the 64-character hex form; `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<ChainHash> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ChainHash(bytes))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({self})")
    }
}

impl fmt::Display for ChainHash {
    /// Shows the first eight bytes in hex, enough to tell hashes apart in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// An event offered for appending: the producer's time and the canonical body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// When the producing queue recorded the event (stored alongside the body
    /// so subscriptions can start from a time).
    pub recorded_at: SystemTime,
    /// Canonical encoding with the log-assigned fields cleared.
    pub body: Bytes,
}

/// An event as stored in a shard's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    /// Position in the shard's log.
    pub sequence: Sequence,
    /// Lease epoch the event was appended under.
    pub epoch: Epoch,
    /// The producer's time.
    pub recorded_at: SystemTime,
    /// Canonical encoding with the log-assigned fields cleared.
    pub body: Bytes,
    /// Hash of the previous event (as stored), or [`ChainHash::ZERO`] at 1.
    pub prev_hash: ChainHash,
    /// This event's stored chain hash.
    pub hash: ChainHash,
}

impl LogEvent {
    /// Recomputes this event's hash from its content and `prev_hash`.
    pub fn expected_hash(&self) -> ChainHash {
        ChainHash::compute(&self.prev_hash, self.sequence, self.epoch, &self.body)
    }
}

/// A stored row before linking: what a store reads back for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// Position.
    pub sequence: Sequence,
    /// Epoch.
    pub epoch: Epoch,
    /// The producer's time.
    pub recorded_at: SystemTime,
    /// Canonical body.
    pub body: Bytes,
    /// Stored hash bytes (checked for length by [`link`]).
    pub hash: Bytes,
}

/// Links stored rows into events, each event's `prev_hash` being the stored
/// hash of the row before it (`anchor` for the first). Stores call this so a
/// reader sees exactly what is stored; [`verify`] then judges it.
///
/// A stored hash of the wrong length becomes an all-zero hash, which can never
/// verify, so the row is reported corrupt rather than dropped.
pub fn link(anchor: ChainHash, rows: Vec<StoredRow>) -> Vec<LogEvent> {
    let mut prev = anchor;
    rows.into_iter()
        .map(|row| {
            let hash = ChainHash::from_slice(&row.hash).unwrap_or(ChainHash::ZERO);
            let event = LogEvent {
                sequence: row.sequence,
                epoch: row.epoch,
                recorded_at: row.recorded_at,
                body: row.body,
                prev_hash: prev,
                hash,
            };
            prev = hash;
            event
        })
        .collect()
}

/// An event failed verification: it must not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shard {shard}: the event at sequence {sequence} fails the hash chain check ({reason})")]
pub struct CorruptEvent {
    /// Shard of the event.
    pub shard: ShardId,
    /// The first sequence that failed.
    pub sequence: Sequence,
    /// What was wrong: a hash mismatch, a missing sequence, a broken link.
    pub reason: String,
}

/// Verifies that `events` are the consecutive events starting at `first`,
/// each chained to the one before (the first to `anchor`) with a hash that
/// matches its content. Returns the first corrupt sequence otherwise.
pub fn verify(shard: &ShardId, first: Sequence, anchor: &ChainHash, events: &[LogEvent]) -> Result<(), CorruptEvent> {
    let corrupt = |sequence: Sequence, reason: String| CorruptEvent { shard: shard.clone(), sequence, reason };
    let mut expected = first;
    let mut prev = *anchor;
    for event in events {
        if event.sequence != expected {
            return Err(corrupt(expected, format!("missing; the next stored event is {}", event.sequence)));
        }
        if event.prev_hash != prev {
            return Err(corrupt(event.sequence, "its link to the previous event is broken".into()));
        }
        if event.expected_hash() != event.hash {
            return Err(corrupt(event.sequence, "its stored hash does not match its content".into()));
        }
        prev = event.hash;
        expected = expected.next();
    }
    Ok(())
}

/// Assigns hashes to new events appended after `prev` (the head hash) from
/// sequence `first` on, under `epoch`. Used by stores on the append path.
pub fn chain(prev: ChainHash, first: Sequence, epoch: Epoch, events: &[NewEvent]) -> Vec<LogEvent> {
    let mut prev_hash = prev;
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let sequence = Sequence(first.0 + i as u64);
            let hash = ChainHash::compute(&prev_hash, sequence, epoch, &event.body);
            let stored =
                LogEvent { sequence, epoch, recorded_at: event.recorded_at, body: event.body.clone(), prev_hash, hash };
            prev_hash = hash;
            stored
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> ShardId {
        ShardId::parse("resourcelease.users").expect("valid")
    }

    fn new_events(n: usize) -> Vec<NewEvent> {
        (0..n)
            .map(|i| NewEvent { recorded_at: SystemTime::UNIX_EPOCH, body: Bytes::from(format!("event {i}")) })
            .collect()
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let hash = ChainHash::compute(&ChainHash::ZERO, Sequence(1), Epoch(1), b"body");
        assert_eq!(ChainHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(hash.to_hex().len(), 64);
        assert_eq!(ChainHash::from_hex("abc"), None);
        assert_eq!(ChainHash::from_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn hash_follows_the_documented_formula() {
        let prev = ChainHash([7; 32]);
        let mut input = vec![7u8; 32];
        input.extend_from_slice(&5u64.to_be_bytes());
        input.extend_from_slice(&3u64.to_be_bytes());
        input.extend_from_slice(b"body");
        let expected: [u8; 32] = Sha256::digest(&input).into();
        assert_eq!(ChainHash::compute(&prev, Sequence(5), Epoch(3), b"body").0, expected);
    }

    #[test]
    fn a_chained_run_verifies_and_any_edit_is_caught_at_its_sequence() {
        let events = chain(ChainHash::ZERO, Sequence(1), Epoch(1), &new_events(5));
        verify(&shard(), Sequence(1), &ChainHash::ZERO, &events).expect("untouched chain verifies");

        let mut edited = events.clone();
        edited[2].body = Bytes::from_static(b"tampered");
        let err = verify(&shard(), Sequence(1), &ChainHash::ZERO, &edited).expect_err("edit must be caught");
        assert_eq!(err.sequence, Sequence(3));

        let mut missing = events.clone();
        missing.remove(1);
        let err = verify(&shard(), Sequence(1), &ChainHash::ZERO, &missing).expect_err("gap must be caught");
        assert_eq!(err.sequence, Sequence(2));
        assert!(err.reason.contains("missing"), "{err}");

        let mut epoch = events;
        epoch[4].epoch = Epoch(9);
        assert_eq!(verify(&shard(), Sequence(1), &ChainHash::ZERO, &epoch).expect_err("epoch").sequence, Sequence(5));
    }

    #[test]
    fn linking_stored_rows_exposes_a_corrupt_hash_at_its_own_sequence() {
        let events = chain(ChainHash::ZERO, Sequence(1), Epoch(2), &new_events(3));
        let mut rows: Vec<StoredRow> = events
            .iter()
            .map(|e| StoredRow {
                sequence: e.sequence,
                epoch: e.epoch,
                recorded_at: e.recorded_at,
                body: e.body.clone(),
                hash: Bytes::copy_from_slice(e.hash.as_bytes()),
            })
            .collect();
        assert_eq!(link(ChainHash::ZERO, rows.clone()), events);
        rows[1].hash = Bytes::from_static(b"short");
        let linked = link(ChainHash::ZERO, rows);
        let err = verify(&shard(), Sequence(1), &ChainHash::ZERO, &linked).expect_err("bad hash");
        assert_eq!(err.sequence, Sequence(2));
    }
}
