//! Subscriptions: one driver task per `Subscribe` stream, one follower task
//! per followed shard.
//!
//! A follower catches up by reading the store in pages (its own reads: only
//! it needs that history), then follows the shard's shared live tail.
//! Whenever it finds a gap (it lagged behind the tail's bounded buffer, the
//! events left the tail's cache, or the tail skipped while nobody listened)
//! it goes back to catch-up reads from its position, so it never skips,
//! never reorders and never repeats an event. Each event it delivers is
//! verified against the hash chain and against the event delivered before
//! it. A position below the retention low-water mark is answered with the
//! newest snapshot, then the events after it, on the same stream.
//!
//! Frames go into the subscription's [`outbox::Outbox`], which the gRPC
//! stream drains; its size in bytes is bounded per subscription and by the
//! replica's subscription memory budget (see [`crate::fanout::budget`]). A client
//! that reads slowly fills its outbox: its followers then stop taking live
//! events (holding none) and catch up from the store page by page as room
//! frees, which stalls only that subscription. One that falls furthest
//! behind when the budget runs short, or takes nothing for
//! [`defaults::SUBSCRIBER_STALL_TIMEOUT`], is ended with UNAVAILABLE and
//! resumes from its checkpoint. The driver adds progress frames when idle.

mod outbox;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::outbox::{Outbox, Pushed, Reservation};
use crate::api::error::HubError;
use crate::api::wire::{self, Selection, Start};
use crate::defaults;
use crate::fanout::budget::{Budget, Grant};
use crate::fanout::tail::{Feed, Tail, TailChunk};
use crate::log::event::{ChainHash, CorruptEvent, LogEvent};
use crate::log::ids::{Sequence, ShardId};
use crate::proto::hub::v1 as pb;
use crate::store::{LogStore, StoreError};
use crate::telemetry::{self, HubCounters, ReadPurpose, SubscriberLag};

/// The subscription side of a hub replica.
#[derive(Clone)]
pub(crate) struct Subscriptions {
    pub(crate) store: Arc<dyn LogStore>,
    pub(crate) tail: Tail,
    pub(crate) counters: Arc<HubCounters>,
    /// What all subscriptions of the replica may hold.
    pub(crate) budget: Budget,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

/// A response stream of a subscription.
pub(crate) use self::outbox::FrameStream;

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
        // The subscription's share of the budget, before anything is built:
        // a replica whose budget is held by open subscriptions refuses more.
        let outbox = Outbox::new(&self.budget, selection.subscriber.clone());
        let memory_error = |exhausted: crate::fanout::budget::Exhausted| HubError::SubscriptionMemory {
            wanted: exhausted.wanted,
            limit: exhausted.limit,
        };
        let allowance = outbox.allowance(defaults::SUBSCRIPTION_OVERHEAD_BYTES).map_err(|exhausted| {
            metrics::counter!(telemetry::SUBSCRIPTIONS_ENDED, telemetry::LABEL_REASON => "refused").increment(1);
            memory_error(exhausted)
        })?;
        let mut followers = Vec::new();
        for (shard, head) in initial {
            let follower = self.follower(shard, &selection, &checkpoints, false, head, &outbox).await?;
            followers.push(follower);
        }

        let this = self.clone();
        let stream = outbox.stream(allowance);
        self.tasks.spawn(async move {
            metrics::gauge!(telemetry::SUBSCRIBERS).increment(1.0);
            let subscriber = selection.subscriber.clone();
            let driver = Driver { selection, checkpoints, followed, outbox: outbox.clone(), discovered };
            let ended = this.drive(driver, followers).await;
            if let Err(err) = &ended {
                tracing::debug!(subscriber = %subscriber, error = %err, "subscription ended with an error");
            }
            // Frames already queued (the valid events before a corrupt one,
            // say) go out first, then the status.
            outbox.finish(ended.err().map(tonic::Status::from));
            metrics::gauge!(telemetry::SUBSCRIBERS).decrement(1.0);
        });
        Ok(stream)
    }

    async fn drive(&self, mut driver: Driver, initial: Vec<Follower>) -> Result<(), HubError> {
        let outbox = driver.outbox.clone();
        let mut followers = JoinSet::new();
        for follower in initial {
            followers.spawn(follower.run());
        }
        let pattern = driver.selection.pattern.clone();
        let mut rescan = tokio::time::interval(defaults::PATTERN_RESCAN);
        rescan.reset();
        let interval = driver.selection.progress_interval;
        // Looks twice per interval, so an idle stream hears within one and a
        // half intervals.
        let mut progress = tokio::time::interval(interval / 2);
        progress.reset();
        let mut stall_check = tokio::time::interval(defaults::SUBSCRIBER_STALL_TIMEOUT / 4);
        stall_check.reset();
        loop {
            let mut found = Vec::new();
            tokio::select! {
                () = self.cancel.cancelled() => return Err(HubError::ShuttingDown),
                () = outbox.gone() => return Ok(()),
                // Ended by the budget or as stalled; the status is queued.
                () = outbox.ended() => return Ok(()),
                _ = progress.tick() => {
                    if outbox.idle_for() >= interval {
                        let heads = driver
                            .followed
                            .iter()
                            .filter_map(|shard| Some((shard.to_string(), self.tail.head(shard)?.0)))
                            .collect();
                        let progress = pb::Progress { heads, at: Some(wire::to_timestamp(SystemTime::now())) };
                        let frame = pb::SubscribeResponse { frame: Some(pb::subscribe_response::Frame::Progress(progress)) };
                        // A full outbox needs no progress frame to look alive.
                        if outbox.push(frame).await == Pushed::Ended {
                            return Ok(());
                        }
                    }
                }
                _ = stall_check.tick() => {
                    if let Some(waited) = outbox.stalled_for().filter(|waited| *waited >= defaults::SUBSCRIBER_STALL_TIMEOUT) {
                        outbox.stall(waited);
                        return Ok(());
                    }
                }
                Some(joined) = followers.join_next() => match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => return Err(err),
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
                    let follower =
                        self.follower(shard, &driver.selection, &driver.checkpoints, true, None, &outbox).await?;
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
        outbox: &Arc<Outbox>,
    ) -> Result<Follower, HubError> {
        let allowance = outbox
            .allowance(defaults::FOLLOWER_OVERHEAD_BYTES)
            .map_err(|exhausted| HubError::SubscriptionMemory { wanted: exhausted.wanted, limit: exhausted.limit })?;
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
            // Past the head is refused like a checkpoint past the head: the
            // follower would wait for sequences the shard's own appends
            // never reach and deliver nothing. A shard found later by a
            // pattern starts from its beginning instead.
            Start::After(_) if discovered_later => Sequence::ZERO,
            Start::After(sequence) => {
                let head = head().await?;
                if sequence > head {
                    return Err(StoreError::PastHead { field: "start.after_sequence", shard, sequence, head }.into());
                }
                sequence
            }
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
            outbox: outbox.clone(),
            _allowance: allowance,
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
    outbox: Arc<Outbox>,
    discovered: broadcast::Receiver<ShardId>,
}

/// Follows one shard for one subscription.
struct Follower {
    store: Arc<dyn LogStore>,
    counters: Arc<HubCounters>,
    outbox: Arc<Outbox>,
    /// This follower's fixed share of the budget.
    _allowance: Grant,
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

/// How far a delivery got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivered {
    /// Every event was queued.
    All,
    /// The subscription's room ran out (live events only): the rest was
    /// dropped, to be read from the store once the client has caught up.
    Full,
    /// The subscription ended.
    Ended,
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
                let chunk = tokio::select! {
                    chunk = self.live.recv() => chunk,
                    () = self.outbox.ended() => return Ok(()),
                };
                match chunk {
                    Ok(TailChunk::Events(events)) => {
                        // Gone from the feed's cache: read them from the store.
                        let Some(events) = events.upgrade() else { break };
                        let fresh: Vec<LogEvent> =
                            events.iter().filter(|e| e.sequence > position.cursor).cloned().collect();
                        drop(events);
                        let Some(first) = fresh.first() else { continue };
                        if first.sequence != position.cursor.next() {
                            break; // A gap: read it from the store.
                        }
                        match self.deliver(&mut position, &fresh, None).await? {
                            Delivered::All => {}
                            // Catch up from the store once there is room.
                            Delivered::Full => break,
                            Delivered::Ended => return Ok(()),
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

    /// Reads and delivers from the store, a page at a time and each page
    /// only once its room is reserved, until the head it saw; false when the
    /// subscription ended.
    async fn catch_up(&self, position: &mut Position) -> Result<bool, HubError> {
        loop {
            let Some(mut room) = self.outbox.reserve(defaults::CATCH_UP_BYTES).await else { return Ok(false) };
            self.counters.read(ReadPurpose::CatchUp);
            let page = match self
                .store
                .read_range(
                    self.shard.clone(),
                    position.cursor.next(),
                    None,
                    defaults::CATCH_UP_BATCH,
                    // Half the room in bodies: the frames' own fields take
                    // the rest.
                    defaults::CATCH_UP_BYTES / 2,
                )
                .await
            {
                Ok(page) => page,
                Err(StoreError::Trimmed { .. }) => {
                    if !self.send_snapshot(position, &mut room).await? {
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
                    self.deliver(position, &valid, Some(&mut room)).await?;
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
            let Some(last) = page.events.last() else { return Ok(true) };
            if self.deliver(position, &page.events, Some(&mut room)).await? == Delivered::Ended {
                return Ok(false);
            }
            // Caught up with the head this read saw: the live tail has the
            // rest.
            if last.sequence >= page.head {
                return Ok(true);
            }
        }
    }

    /// Sends the newest snapshot in place of trimmed events.
    async fn send_snapshot(&self, position: &mut Position, room: &mut Reservation) -> Result<bool, HubError> {
        let snapshot = self.store.snapshot(self.shard.clone(), None).await?.ok_or_else(|| StoreError::Internal {
            what: "replace trimmed events with a snapshot",
            source: format!("shard {} was trimmed but has no snapshot", self.shard).into(),
        })?;
        let frame = pb::SubscribeResponse {
            frame: Some(pb::subscribe_response::Frame::Snapshot(pb::SnapshotFrame {
                snapshot: Some(wire::snapshot(&snapshot, true)),
            })),
        };
        if !room.push(frame).await {
            return Ok(false);
        }
        position.cursor = snapshot.sequence;
        position.hash = Some(snapshot.hash);
        position.from_checkpoint = false;
        Ok(true)
    }

    /// Delivers consecutive events that follow the position, in frames of
    /// up to [`defaults::MAX_FRAME_BYTES`] ([`defaults::LAGGING_FRAME_BYTES`]
    /// for live events to a client that is behind), on `room` when given,
    /// else as far as the subscription's room goes. The position moves with
    /// every frame queued.
    async fn deliver(
        &self,
        position: &mut Position,
        events: &[LogEvent],
        mut room: Option<&mut Reservation>,
    ) -> Result<Delivered, HubError> {
        if let (Some(hash), Some(first)) = (position.hash, events.first())
            && first.prev_hash != hash
        {
            return Err(CorruptEvent {
                shard: self.shard.clone(),
                sequence: first.sequence,
                reason: position.broken_link(),
            }
            .into());
        }
        let frame_bytes = if room.is_none() && self.outbox.is_behind() {
            defaults::LAGGING_FRAME_BYTES
        } else {
            defaults::MAX_FRAME_BYTES
        };
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut last: Option<&LogEvent> = None;
        for event in events {
            let served = match wire::event(&self.shard, event) {
                Ok(served) => served,
                Err(corrupt) => {
                    // The events before it are verified: deliver them, then
                    // fail, as for any other corruption.
                    if let Some(last) = last {
                        self.send_events(position, std::mem::take(&mut batch), last, room.as_deref_mut()).await;
                    }
                    return Err(corrupt.into());
                }
            };
            let size = served.encoded_len();
            if let Some(before) = last
                && bytes + size > frame_bytes
            {
                let sent = self.send_events(position, std::mem::take(&mut batch), before, room.as_deref_mut()).await;
                if sent != Delivered::All {
                    return Ok(sent);
                }
                bytes = 0;
            }
            bytes += size;
            batch.push(served);
            last = Some(event);
        }
        let sent = match last {
            Some(last) => self.send_events(position, batch, last, room).await,
            None => Delivered::All,
        };
        if sent == Delivered::All {
            self.lag.set(self.feed.head().max(position.cursor), position.cursor);
        }
        Ok(sent)
    }

    /// Queues one frame of events ending with `last`, and moves the
    /// position past them once it is queued.
    async fn send_events(
        &self,
        position: &mut Position,
        events: Vec<crate::proto::raw::RawEvent>,
        last: &LogEvent,
        room: Option<&mut Reservation>,
    ) -> Delivered {
        let count = events.len() as u64;
        let frame = pb::SubscribeResponse {
            frame: Some(pb::subscribe_response::Frame::Events(pb::EventBatch {
                shard_id: self.shard.to_string(),
                events,
            })),
        };
        let sent = match room {
            Some(room) => {
                if room.push(frame).await {
                    Delivered::All
                } else {
                    Delivered::Ended
                }
            }
            None => match self.outbox.push(frame).await {
                Pushed::Queued => Delivered::All,
                Pushed::Full => Delivered::Full,
                Pushed::Ended => Delivered::Ended,
            },
        };
        if sent == Delivered::All {
            position.cursor = last.sequence;
            position.hash = Some(last.hash);
            position.from_checkpoint = false;
            self.counters.delivered(count);
        }
        sent
    }
}
