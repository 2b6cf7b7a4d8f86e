//! Recovery by replay: a queue's state rebuilt from its shard's log.
//!
//! The newest snapshot (if any) is decoded, then every event after it is read
//! page by page and applied in order. Nothing is trusted on the way: the
//! snapshot must be of this shard and at the sequence it claims, events
//! must follow each other without a gap, each chain link must hold (an
//! event's `prev_hash` is the hash of the event before it, the first one's
//! the hash the snapshot was taken at), and every event must apply to the
//! state. Anything else is [`ReplicationError::Corrupt`]: the shard is not
//! served from a log that does not hold together.

use bytes::Bytes;

use super::QueueState;
use crate::clock::Timestamp;
use crate::defaults::RECOVERY_PAGE_EVENTS;
use crate::ids::{Sequence, ShardId};
use crate::replication::{ReplicationError, Replicator, StoredSnapshot};

/// A state rebuilt from a shard's log.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    /// The state after the last event of the log.
    pub state: QueueState,
    /// The sequence of the snapshot it started from (zero: none).
    pub snapshot: Sequence,
    /// Events replayed after the snapshot.
    pub replayed: u64,
    /// Hash of the last event, from logs that keep a chain.
    pub last_hash: Option<Bytes>,
}

/// The hash before the first event of a chain.
const GENESIS_HASH: [u8; 32] = [0; 32];

/// Rebuilds `shard`'s queue state from `replicator`'s log: the newest
/// snapshot plus every event after it, each checked (see the module docs).
pub async fn recover(replicator: &dyn Replicator, shard: &ShardId) -> Result<Rebuilt, ReplicationError> {
    let snapshot = replicator.latest_snapshot(shard).await?;
    replay(replicator, shard, snapshot, Until::Head, &mut |_| {}).await
}

/// Where a [`replay`] stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// After the last event of the log.
    Head,
    /// After this sequence (or the head, if the log is shorter).
    Sequence(Sequence),
    /// After the last event recorded at or before this time; the queue
    /// records events in sequence order, so the first event recorded later
    /// ends the replay.
    Time(Timestamp),
}

/// What a [`replay`] reports after each page of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayProgress {
    /// The last sequence applied so far.
    pub at: Sequence,
    /// The log's head when the page was read.
    pub head: Sequence,
}

/// Rebuilds `shard`'s queue state as it was at `until`: `snapshot` (which
/// must not be past `until`; none means from an empty queue) plus the
/// events after it up to `until`, each checked as [`recover`] checks them.
/// `progress` is called after every page. This is what [`recover`] and the
/// operator CLI's time travel (`omnirelay inspect --at`) share.
pub async fn replay(
    replicator: &dyn Replicator,
    shard: &ShardId,
    snapshot: Option<StoredSnapshot>,
    until: Until,
    progress: &mut (dyn FnMut(ReplayProgress) + Send),
) -> Result<Rebuilt, ReplicationError> {
    let corrupt = |what: String| ReplicationError::Corrupt(format!("shard {shard}: {what}"));
    let mut rebuilt = match snapshot {
        Some(snapshot) => {
            let state = QueueState::decode(&snapshot.data)
                .map_err(|error| corrupt(format!("the snapshot at {} does not decode: {error}", snapshot.sequence)))?;
            if state.shard() != shard {
                return Err(corrupt(format!("the snapshot at {} is of shard {}", snapshot.sequence, state.shard())));
            }
            if state.last_sequence() != snapshot.sequence {
                return Err(corrupt(format!(
                    "the snapshot stored at {} reflects the log up to {}",
                    snapshot.sequence,
                    state.last_sequence()
                )));
            }
            Rebuilt { state, snapshot: snapshot.sequence, replayed: 0, last_hash: snapshot.hash }
        }
        None => {
            Rebuilt { state: QueueState::new(shard.clone()), snapshot: Sequence::ZERO, replayed: 0, last_hash: None }
        }
    };
    advance(replicator, shard, &mut rebuilt, until, progress).await?;
    Ok(rebuilt)
}

/// Applies every event of `shard`'s log after `rebuilt`'s state, checked as
/// [`recover`] checks them, and returns how many were applied (also added
/// to `rebuilt.replayed`). A standby follower calls it again and again to
/// keep a warm copy of a shard it may take over; a new owner calls it once
/// on that copy, so a takeover replays only the short tail. The state is
/// consistent between pages; after an error it must be dropped (rebuild
/// with [`recover`]): a trimmed tail answers [`ReplicationError::Trimmed`].
pub async fn catch_up(
    replicator: &dyn Replicator,
    shard: &ShardId,
    rebuilt: &mut Rebuilt,
) -> Result<u64, ReplicationError> {
    advance(replicator, shard, rebuilt, Until::Head, &mut |_| {}).await
}

/// The replay loop of [`replay`] and [`catch_up`]: applies the events after
/// `rebuilt`'s state up to `until`; returns how many.
async fn advance(
    replicator: &dyn Replicator,
    shard: &ShardId,
    rebuilt: &mut Rebuilt,
    until: Until,
    progress: &mut (dyn FnMut(ReplayProgress) + Send),
) -> Result<u64, ReplicationError> {
    let corrupt = |what: String| ReplicationError::Corrupt(format!("shard {shard}: {what}"));
    let Rebuilt { state, replayed, last_hash, .. } = rebuilt;
    let mut applied = 0;
    'pages: loop {
        let limit = match until {
            Until::Sequence(last) if last <= state.last_sequence() => break,
            Until::Sequence(last) => RECOVERY_PAGE_EVENTS
                .min(usize::try_from(last.get() - state.last_sequence().get()).unwrap_or(usize::MAX)),
            Until::Head | Until::Time(_) => RECOVERY_PAGE_EVENTS,
        };
        let page = replicator.read_log(shard, state.last_sequence(), limit).await?;
        if page.events.is_empty() {
            if state.last_sequence() < page.head {
                return Err(corrupt(format!(
                    "the log's head is {} but no event follows {}",
                    page.head,
                    state.last_sequence()
                )));
            }
            break;
        }
        for logged in page.events {
            if let Until::Time(time) = until
                && logged.event.event.recorded_at > time
            {
                progress(ReplayProgress { at: state.last_sequence(), head: page.head });
                break 'pages;
            }
            let expected = state.last_sequence().after(1);
            let sequence = logged.event.sequence;
            if sequence != expected {
                return Err(corrupt(format!("expected event {expected} next, the log returned {sequence}")));
            }
            if let Some(link) = logged.link {
                let previous = match (&*last_hash, sequence.get()) {
                    (Some(hash), _) => Some(hash.as_ref()),
                    (None, 1) => Some(GENESIS_HASH.as_slice()),
                    (None, _) => None,
                };
                if let Some(previous) = previous
                    && link.prev_hash.as_ref() != previous
                {
                    return Err(corrupt(format!("event {sequence} does not link to the event before it")));
                }
                *last_hash = Some(link.hash);
            }
            state.apply(sequence, logged.event.event).map_err(|error| corrupt(format!("replay failed: {error}")))?;
            *replayed += 1;
            applied += 1;
        }
        progress(ReplayProgress { at: state.last_sequence(), head: page.head });
        if state.last_sequence() >= page.head {
            break;
        }
    }
    Ok(applied)
}
