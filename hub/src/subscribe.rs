//! Subscriptions: one driver task per `Subscribe` stream, one follower task
//! per followed shard.
//!
//! A follower catches up by reading the store in large batches (its own
//! reads: only it needs that history), then follows the shard's shared live
//! tail. Whenever it finds a gap (it lagged behind the tail's bounded buffer,
//! or the tail skipped while nobody listened) it goes back to catch-up reads
//! from its position, so it never skips, never reorders and never repeats an
//! event. Each event it delivers is verified against the hash chain and
//! against the event delivered before it. A position below the retention
//! low-water mark is answered with the newest snapshot, then the events after
//! it, on the same stream.
//!
//! Frames pass through a bounded buffer to the driver, which forwards them to
//! the gRPC stream and adds progress frames when idle; a client that reads
//! slowly fills the buffer, which stalls only its own followers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::defaults;
use crate::error::HubError;
use crate::event::{ChainHash, CorruptEvent, LogEvent};
use crate::ids::{Sequence, ShardId};
use crate::proto::hub::v1 as pb;
use crate::store::{LogStore, StoreError};
use crate::tail::{Feed, Tail, TailChunk};
use crate::telemetry::{self, HubCounters, ReadPurpose, SubscriberLag};
use crate::wire::{self, Selection, Start};

/// The subscription side of a hub replica.
#[derive(Clone)]
pub(crate) struct Subscriptions {
    pub(crate) store: Arc<dyn LogStore>,
    pub(crate) tail: Tail,
    pub(crate) counters: Arc<HubCounters>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

/// A response stream of a subscription.
pub(crate) type FrameStream = ReceiverStream<Result<pb::SubscribeResponse, tonic::Status>>;

impl Subscriptions {
    /// Starts a subscription. Positions are fixed before this returns (so
    /// "latest" means after every event acknowledged before the call); the
    /// frames come out of the returned stream, which ends (with a status when
    /// it failed) when the subscription does.
    pub(crate) async fn start(&self, selection: Selection) -> Result<FrameStream, HubError> {
        // Subscribe to discoveries before listing, so no shard created in
        // between is missed.
        let discovered = self.tail.discoveries();
        let checkpoints: HashMap<ShardId, (Sequence, Option<ChainHash>)> = match selection.start {
            Start::Checkpoint => self
                .store
                .checkpoints(Some(selection.subscriber.clone()), Vec::new())
                .await?
                .into_iter()
                .map(|c| (c.shard, (c.sequence, c.hash)))
                .collect(),
            _ => HashMap::new(),
        };
        let mut initial: Vec<(ShardId, Option<Sequence>)> =
            selection.shards.iter().map(|s| (s.clone(), None)).collect();
        if let Some(pattern) = &selection.pattern {
            for state in self.store.list_shards(pattern.prefix().to_string()).await? {
                if pattern.matches(&state.lease.shard) {
                    initial.push((state.lease.shard, Some(state.lease.head)));
                }
            }
        }
        let mut followed = HashSet::new();
        initial.retain(|(shard, _)| followed.insert(shard.clone()));
        if initial.len() > defaults::MAX_FOLLOWED_SHARDS {
            return Err(HubError::TooManyShards { wanted: initial.len(), limit: defaults::MAX_FOLLOWED_SHARDS });
        }
        let (frames_in, frames) = mpsc::channel(defaults::SUBSCRIBER_BUFFER_FRAMES);
        let mut followers = Vec::new();
        for (shard, head) in initial {
            followers.push(self.follower(shard, &selection, &checkpoints, false, head, &frames_in).await?);
        }

        // One frame in the gRPC channel; the subscription's own buffer holds
        // the rest, so its size alone bounds what a slow client pins.
        let (out, responses) = mpsc::channel(1);
        let this = self.clone();
        self.tasks.spawn(async move {
            metrics::gauge!(telemetry::SUBSCRIBERS).increment(1.0);
            let subscriber = selection.subscriber.clone();
            let driver = Driver { selection, checkpoints, followed, frames_in, discovered };
            if let Err(err) = this.drive(driver, followers, frames, &out).await {
                tracing::debug!(subscriber = %subscriber, error = %err, "subscription ended with an error");
                let _ = out.send(Err(err.into())).await;
            }
            metrics::gauge!(telemetry::SUBSCRIBERS).decrement(1.0);
        });
        Ok(ReceiverStream::new(responses))
    }

    async fn drive(
        &self,
        mut driver: Driver,
        initial: Vec<Follower>,
        mut frames: mpsc::Receiver<pb::SubscribeResponse>,
        out: &mpsc::Sender<Result<pb::SubscribeResponse, tonic::Status>>,
    ) -> Result<(), HubError> {
        let mut followers = JoinSet::new();
        for follower in initial {
            followers.spawn(follower.run());
        }
        let pattern = driver.selection.pattern.clone();
        let mut rescan = tokio::time::interval(defaults::PATTERN_RESCAN);
        rescan.reset();
        let interval = driver.selection.progress_interval;
        let idle = tokio::time::sleep(interval);
        tokio::pin!(idle);
        loop {
            let mut found = Vec::new();
            tokio::select! {
                () = self.cancel.cancelled() => return Err(HubError::ShuttingDown),
                () = out.closed() => return Ok(()),
                Some(frame) = frames.recv() => {
                    if out.send(Ok(frame)).await.is_err() {
                        return Ok(());
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + interval);
                }
                () = &mut idle => {
                    let heads = driver
                        .followed
                        .iter()
                        .filter_map(|shard| Some((shard.to_string(), self.tail.head(shard)?.0)))
                        .collect();
                    let progress = pb::Progress { heads, at: Some(wire::to_timestamp(SystemTime::now())) };
                    let frame = pb::SubscribeResponse { frame: Some(pb::subscribe_response::Frame::Progress(progress)) };
                    if out.send(Ok(frame)).await.is_err() {
                        return Ok(());
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + interval);
                }
                Some(joined) = followers.join_next() => match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        // Deliver what the follower queued before it failed
                        // (the valid events before a corrupt one), then fail.
                        while let Ok(frame) = frames.try_recv() {
                            if out.send(Ok(frame)).await.is_err() {
                                return Ok(());
                            }
                        }
                        return Err(err);
                    }
                    Err(panicked) => {
                        return Err(StoreError::Internal { what: "follow a shard", source: Box::new(panicked) }.into());
                    }
                },
                shard = driver.discovered.recv(), if pattern.is_some() => match shard {
                    Ok(shard) => found.push(shard),
                    Err(broadcast::error::RecvError::Lagged(_)) => rescan.reset_immediately(),
                    Err(broadcast::error::RecvError::Closed) => return Err(HubError::ShuttingDown),
                },
                _ = rescan.tick(), if pattern.is_some() => {
                    if let Some(pattern) = &pattern {
                        found.extend(self.store.list_shards(pattern.prefix().to_string()).await?.into_iter().map(|s| s.lease.shard));
                    }
                }
            }
            for shard in found {
                if pattern.as_ref().is_some_and(|p| p.matches(&shard)) && !driver.followed.contains(&shard) {
                    if driver.followed.len() >= defaults::MAX_FOLLOWED_SHARDS {
                        return Err(HubError::TooManyShards {
                            wanted: driver.followed.len() + 1,
                            limit: defaults::MAX_FOLLOWED_SHARDS,
                        });
                    }
                    driver.followed.insert(shard.clone());
                    let follower = self
                        .follower(shard, &driver.selection, &driver.checkpoints, true, None, &driver.frames_in)
                        .await?;
                    followers.spawn(follower.run());
                }
            }
        }
    }

    /// Prepares a follower for `shard`: listens to its live tail, then fixes
    /// its position (in that order, so nothing published in between is lost).
    async fn follower(
        &self,
        shard: ShardId,
        selection: &Selection,
        checkpoints: &HashMap<ShardId, (Sequence, Option<ChainHash>)>,
        discovered_later: bool,
        known_head: Option<Sequence>,
        frames: &mpsc::Sender<pb::SubscribeResponse>,
    ) -> Result<Follower, HubError> {
        let feed = self.tail.feed(&shard).await?;
        let live = feed.subscribe();
        let head = || async {
            match known_head {
                Some(head) => Ok::<_, HubError>(head),
                None => Ok(self.store.shard_state(shard.clone()).await?.map_or(Sequence::ZERO, |s| s.lease.head)),
            }
        };
        let cursor = match selection.start {
            Start::Checkpoint => checkpoints.get(&shard).map_or(Sequence::ZERO, |(sequence, _)| *sequence),
            Start::After(sequence) => sequence,
            // A shard created after the subscription started: all of it is new.
            Start::Latest if discovered_later => Sequence::ZERO,
            Start::Latest => head().await?,
            Start::Since(at) => {
                let head = head().await?;
                match self.store.sequence_at(shard.clone(), at).await? {
                    Some(sequence) => sequence.prev(),
                    None => head,
                }
            }
        };
        // A checkpoint pins the event it stops at: the first event delivered
        // must link to the hash recorded with it.
        let start_hash = match selection.start {
            Start::Checkpoint => checkpoints.get(&shard).and_then(|(_, hash)| *hash),
            _ => None,
        };
        Ok(Follower {
            store: self.store.clone(),
            counters: self.counters.clone(),
            frames: frames.clone(),
            feed,
            lag: SubscriberLag::new(&selection.subscriber, &shard),
            shard,
            live,
            start: cursor,
            start_hash,
        })
    }
}

/// The driver's view of a subscription.
struct Driver {
    selection: Selection,
    checkpoints: HashMap<ShardId, (Sequence, Option<ChainHash>)>,
    followed: HashSet<ShardId>,
    frames_in: mpsc::Sender<pb::SubscribeResponse>,
    discovered: broadcast::Receiver<ShardId>,
}

/// Follows one shard for one subscription.
struct Follower {
    store: Arc<dyn LogStore>,
    counters: Arc<HubCounters>,
    frames: mpsc::Sender<pb::SubscribeResponse>,
    /// The shard's live tail, for its head.
    feed: Arc<Feed>,
    /// This subscriber's lag on this shard.
    lag: SubscriberLag,
    shard: ShardId,
    live: broadcast::Receiver<TailChunk>,
    /// Last sequence not to deliver (the resolved start position).
    start: Sequence,
    /// Hash of the event at `start` as the subscriber's checkpoint recorded
    /// it, when it starts from one.
    start_hash: Option<ChainHash>,
}

/// The position a follower has delivered through.
struct Position {
    /// Last delivered sequence.
    cursor: Sequence,
    /// Hash of the last delivered event (or snapshot); before the first
    /// delivery, the hash the checkpoint recorded, if any.
    hash: Option<ChainHash>,
    /// True until the first delivery: `hash` is then the checkpoint's.
    from_checkpoint: bool,
}

impl Position {
    /// Why an event that does not link to `hash` is corrupt.
    fn broken_link(&self) -> String {
        if self.from_checkpoint {
            format!("it does not link to the hash the subscriber's checkpoint recorded for sequence {}", self.cursor)
        } else {
            "it does not link to the event delivered before it".into()
        }
    }
}

impl Follower {
    async fn run(mut self) -> Result<(), HubError> {
        // The position moves as events are delivered; the methods below
        // borrow the follower and the position separately.
        let mut position = Position { cursor: self.start, hash: self.start_hash, from_checkpoint: true };
        loop {
            if !self.catch_up(&mut position).await? {
                return Ok(());
            }
            loop {
                match self.live.recv().await {
                    Ok(TailChunk::Events(events)) => {
                        let fresh: Vec<LogEvent> =
                            events.iter().filter(|e| e.sequence > position.cursor).cloned().collect();
                        let Some(first) = fresh.first() else { continue };
                        if first.sequence != position.cursor.next() {
                            break; // A gap: read it from the store.
                        }
                        if !self.deliver(&mut position, &fresh).await? {
                            return Ok(());
                        }
                    }
                    Ok(TailChunk::Corrupt(corrupt)) if corrupt.sequence > position.cursor => {
                        return Err(CorruptEvent::clone(&corrupt).into());
                    }
                    Ok(TailChunk::Corrupt(_)) => {}
                    // Fell behind the tail's buffer: catch up from the store.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Err(HubError::ShuttingDown),
                }
            }
        }
    }

    /// Reads and delivers from the store until the head it saw; false when
    /// the subscriber went away.
    async fn catch_up(&self, position: &mut Position) -> Result<bool, HubError> {
        loop {
            self.counters.read(ReadPurpose::CatchUp);
            let page = match self
                .store
                .read_range(self.shard.clone(), position.cursor.next(), None, defaults::CATCH_UP_BATCH)
                .await
            {
                Ok(page) => page,
                Err(StoreError::Trimmed { .. }) => {
                    if !self.send_snapshot(position).await? {
                        return Ok(false);
                    }
                    continue;
                }
                // Not created yet: the live tail announces its first events.
                Err(StoreError::UnknownShard { .. }) => return Ok(true),
                Err(err) => return Err(err.into()),
            };
            if let Err(corrupt) = page.verify() {
                // Deliver what precedes the corrupt event, then fail.
                let valid: Vec<LogEvent> =
                    page.events.iter().take_while(|e| e.sequence < corrupt.sequence).cloned().collect();
                if !valid.is_empty() {
                    self.deliver(position, &valid).await?;
                }
                return Err(corrupt.into());
            }
            if let (Some(hash), Some(_)) = (position.hash, page.events.first())
                && hash != page.anchor
            {
                return Err(CorruptEvent {
                    shard: self.shard.clone(),
                    sequence: page.from,
                    reason: position.broken_link(),
                }
                .into());
            }
            let full = page.events.len() == defaults::CATCH_UP_BATCH;
            if !page.events.is_empty() && !self.deliver(position, &page.events).await? {
                return Ok(false);
            }
            if !full {
                return Ok(true);
            }
        }
    }

    /// Sends the newest snapshot in place of trimmed events.
    async fn send_snapshot(&self, position: &mut Position) -> Result<bool, HubError> {
        let snapshot = self.store.snapshot(self.shard.clone(), None).await?.ok_or_else(|| StoreError::Internal {
            what: "replace trimmed events with a snapshot",
            source: format!("shard {} was trimmed but has no snapshot", self.shard).into(),
        })?;
        position.cursor = snapshot.sequence;
        position.hash = Some(snapshot.hash);
        position.from_checkpoint = false;
        let frame = pb::SubscribeResponse {
            frame: Some(pb::subscribe_response::Frame::Snapshot(pb::SnapshotFrame {
                snapshot: Some(wire::snapshot(&snapshot, true)),
            })),
        };
        Ok(self.frames.send(frame).await.is_ok())
    }

    /// Delivers consecutive events that follow the position; false when the
    /// subscriber went away.
    async fn deliver(&self, position: &mut Position, events: &[LogEvent]) -> Result<bool, HubError> {
        if let (Some(hash), Some(first)) = (position.hash, events.first())
            && first.prev_hash != hash
        {
            return Err(CorruptEvent {
                shard: self.shard.clone(),
                sequence: first.sequence,
                reason: "it does not link to the event delivered before it".into(),
            }
            .into());
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        for event in events {
            let served = match wire::event(&self.shard, event) {
                Ok(served) => served,
                Err(corrupt) => {
                    // The events before it are verified: deliver them, then
                    // fail, as for any other corruption.
                    if !batch.is_empty() {
                        self.send_events(std::mem::take(&mut batch)).await;
                    }
                    return Err(corrupt.into());
                }
            };
            let size = served.encoded_len();
            if !batch.is_empty() && bytes + size > defaults::MAX_FRAME_BYTES {
                if !self.send_events(std::mem::take(&mut batch)).await {
                    return Ok(false);
                }
                bytes = 0;
            }
            bytes += size;
            batch.push(served);
            position.cursor = event.sequence;
            position.hash = Some(event.hash);
            position.from_checkpoint = false;
        }
        let sent = self.send_events(batch).await;
        if sent {
            self.lag.set(self.feed.head().max(position.cursor), position.cursor);
        }
        Ok(sent)
    }

    async fn send_events(&self, events: Vec<crate::proto::replication::v1::ReplicationEvent>) -> bool {
        let count = events.len() as u64;
        let frame = pb::SubscribeResponse {
            frame: Some(pb::subscribe_response::Frame::Events(pb::EventBatch {
                shard_id: self.shard.to_string(),
                events,
            })),
        };
        let sent = self.frames.send(frame).await.is_ok();
        if sent {
            self.counters.delivered(count);
        }
        sent
    }
}
