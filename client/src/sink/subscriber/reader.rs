//! The reading half of a subscriber session: a task that takes the hub's
//! frames off the `Subscribe` stream, decodes them and checks their events
//! against the shards' chains, one frame ahead of the sink.
//!
//! Decoding a frame and checking its events (a protobuf decode and a
//! SHA-256 per event) is most of the runtime's own work per event. Done
//! in line, it waited for the sink (a database transaction, a file sync)
//! and the sink waited for it; on a task of its own it overlaps with the
//! sink's work on the frame before. The reader admits events on its own
//! copies of the chains, which move exactly as the session's do as long as
//! the sink takes every frame; when the sink fails or the session stops,
//! the session ends and the reader with it (it is aborted), and the next
//! session starts a reader from the session's positions again. Nothing is
//! handed to the sink out of order or twice: the session applies what the
//! reader sends in order, one frame at a time.
//!
//! Memory: the reader holds the frame it reads, the channel one more
//! ([`AHEAD_FRAMES`]), and the session the one the sink works on: at most
//! three frames of up to 3 MiB each.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use omnirelay_proto::Message as _;
use omnirelay_proto::hub::v1 as pb;
use omnirelay_proto::replication::v1 as rpb;
use tokio::sync::mpsc;

use crate::ids::{Sequence, ShardId};
use crate::sink::chain::ShardChain;
use crate::sink::{SinkError, SinkEvent, SinkSnapshot};
use crate::wire;

/// Frames the reader prepares ahead of the one the sink works on: one is
/// enough to overlap decoding with the sink; more would only hold memory.
pub(super) const AHEAD_FRAMES: usize = 1;

/// A frame, decoded and checked, or why the stream ended.
pub(super) enum Prepared {
    /// New events of a shard (never empty), and the shard's chain once they
    /// are admitted: the session's position after the sink applied them.
    Events {
        /// The shard.
        shard: ShardId,
        /// The events after the chain's previous position.
        events: Vec<SinkEvent>,
        /// The chain past them.
        chain: ShardChain,
        /// `recorded_at` of the first event (now when it has none).
        recorded: SystemTime,
    },
    /// The shards' heads while the stream is idle.
    Progress(pb::Progress),
    /// A snapshot that moves a shard's position forward (trimmed events).
    Snapshot(SinkSnapshot),
    /// An event or snapshot that breaks the log: the session fails.
    Failed(SinkError),
    /// The hub answered with an error status.
    Status(tonic::Status),
    /// The stream ended or went silent (the reason).
    Broken(String),
}

/// Reads `stream` until it ends, sending each prepared frame to `out`;
/// `chains` are the session's positions when the stream opened.
pub(super) async fn read(
    mut stream: tonic::Streaming<pb::SubscribeResponse>,
    mut chains: HashMap<ShardId, ShardChain>,
    silence: Duration,
    out: mpsc::Sender<Prepared>,
) {
    loop {
        let frame = match tokio::time::timeout(silence, stream.message()).await {
            Err(_) => Prepared::Broken(format!("the stream was silent for {silence:?}")),
            Ok(Err(status)) => Prepared::Status(status),
            Ok(Ok(None)) => Prepared::Broken("the hub ended the stream".into()),
            Ok(Ok(Some(frame))) => match prepare(&mut chains, frame) {
                Ok(Some(prepared)) => prepared,
                Ok(None) => continue,
                Err(err) => Prepared::Failed(err),
            },
        };
        let last = matches!(frame, Prepared::Failed(_) | Prepared::Status(_) | Prepared::Broken(_));
        if out.send(frame).await.is_err() || last {
            return;
        }
    }
}

/// Decodes and checks one frame; `None` when it holds nothing new.
fn prepare(
    chains: &mut HashMap<ShardId, ShardChain>,
    frame: pb::SubscribeResponse,
) -> Result<Option<Prepared>, SinkError> {
    match frame.frame {
        Some(pb::subscribe_response::Frame::Events(batch)) => {
            let shard = ShardId::from(batch.shard_id);
            let chain =
                chains.entry(shard.clone()).or_insert_with(|| ShardChain::new(shard.clone(), Sequence::ZERO, None));
            let events = chain.admit_owned(batch.events)?;
            let Some(first) = events.first() else { return Ok(None) };
            let recorded = wire::timestamp_from_pb("recorded_at", first.event.recorded_at.as_ref())
                .map(|at| SystemTime::UNIX_EPOCH + Duration::from_nanos(at.as_unix_nanos()))
                .unwrap_or_else(|_| SystemTime::now());
            Ok(Some(Prepared::Events { shard, events, chain: chain.clone(), recorded }))
        }
        Some(pb::subscribe_response::Frame::Progress(progress)) => Ok(Some(Prepared::Progress(progress))),
        Some(pb::subscribe_response::Frame::Snapshot(frame)) => {
            let Some(snapshot) = frame.snapshot else { return Ok(None) };
            let shard = ShardId::from(snapshot.shard_id.clone());
            let corrupt = |reason: String| SinkError::Corrupt { shard: shard.clone(), reason };
            let state = rpb::QueueState::decode(snapshot.data.as_ref()).map_err(|err| {
                corrupt(format!("the snapshot at sequence {} does not decode: {err}", snapshot.sequence))
            })?;
            if state.sequence != snapshot.sequence || state.shard_id != snapshot.shard_id {
                return Err(corrupt(format!(
                    "the snapshot at sequence {} holds the state of {} at {}",
                    snapshot.sequence, state.shard_id, state.sequence
                )));
            }
            let chain =
                chains.entry(shard.clone()).or_insert_with(|| ShardChain::new(shard.clone(), Sequence::ZERO, None));
            let sequence = Sequence::new(snapshot.sequence);
            if !chain.admit_snapshot(sequence, snapshot.hash.clone())? {
                return Ok(None);
            }
            Ok(Some(Prepared::Snapshot(SinkSnapshot { shard, sequence, hash: snapshot.hash, state })))
        }
        None => Ok(None),
    }
}
