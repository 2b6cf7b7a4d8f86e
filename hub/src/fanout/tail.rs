//! The live tail: per replica, one feed per followed shard that publishes
//! the shard's new events to every subscriber of the replica.
//!
//! A feed learns of new heads from the store's change stream: commits made
//! by this replica arrive with their events (no read at all), commits of
//! other replicas arrive as LISTEN/NOTIFY heads and are read from the store
//! once, by the feed, whatever the number of subscribers. Subscribers receive
//! the feed through a bounded broadcast channel: publishing never waits, and
//! a subscriber that falls too far behind is told it lagged and catches up by
//! reading on its own, so a slow subscriber slows neither appends nor its
//! peers.
//!
//! The channel carries weak references: the events themselves live in the
//! feed's ring of recent events, bounded by [`defaults::TAIL_RING_BYTES`] and
//! drawn from the replica's subscription memory budget (a cache, dropped
//! first when the budget runs short). A subscriber that was not looking, so
//! that a chunk left the ring before it got there, catches up from the store
//! like one that lagged; no subscriber, however slow, keeps events alive.
//!
//! A feed lives while someone holds it: once no subscriber has held it for
//! [`defaults::FEED_IDLE_RETIRE`], its reader removes it from the map and
//! stops, so a long-running replica keeps feeds for the shards it serves
//! now, not for every shard it ever served.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::defaults;
use crate::fanout::budget::{Account, Budget, Grant};
use crate::log::event::{ChainHash, CorruptEvent, LogEvent};
use crate::log::ids::{Sequence, ShardId};
use crate::store::{LogChange, LogStore, StoreError};
use crate::telemetry::{HubCounters, ReadPurpose};

/// What a feed publishes.
#[derive(Debug, Clone)]
pub(crate) enum TailChunk {
    /// Consecutive, verified events, while they are in the feed's ring of
    /// recent events (a reference that no longer upgrades means: read them
    /// from the store).
    Events(std::sync::Weak<[LogEvent]>),
    /// The feed met a corrupt event and will not publish it.
    Corrupt(Arc<CorruptEvent>),
}

/// The live tails of one replica.
#[derive(Clone)]
pub(crate) struct Tail {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn LogStore>,
    counters: Arc<HubCounters>,
    /// The feeds' rings' share of the subscription memory budget.
    memory: Account,
    feeds: Mutex<HashMap<ShardId, Arc<Feed>>>,
    discovered: broadcast::Sender<ShardId>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// One shard's live tail.
pub(crate) struct Feed {
    shard: ShardId,
    chunks: broadcast::Sender<TailChunk>,
    head: watch::Sender<Sequence>,
    /// Set once the reader knows where to publish from.
    ready: watch::Sender<bool>,
    state: Mutex<FeedState>,
    wake: Notify,
    /// Recent published chunks, what the announcements point to.
    ring: Mutex<Ring>,
}

/// A feed's recent chunks and the budget they hold.
#[derive(Default)]
struct Ring {
    chunks: VecDeque<(Arc<[LogEvent]>, Grant)>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct FeedState {
    /// Highest head announced.
    target: Sequence,
    /// Events committed by this replica, not yet published.
    direct: VecDeque<Arc<[LogEvent]>>,
}

impl Tail {
    /// Starts the tail: a dispatcher task that routes the store's changes to
    /// feeds. Feeds start on first use.
    pub(crate) fn start(store: Arc<dyn LogStore>, counters: Arc<HubCounters>, budget: &Budget) -> Tail {
        let (discovered, _) = broadcast::channel(defaults::CHANGES_BUFFER);
        let inner = Arc::new(Inner {
            store,
            counters,
            memory: budget.account(None),
            feeds: Mutex::new(HashMap::new()),
            discovered,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let changes = inner.store.changes();
        inner.tasks.spawn(dispatch(inner.clone(), changes));
        Tail { inner }
    }

    /// The feed of `shard`, started on first use. Resolves once the feed
    /// knows the shard's head: a subscriber that listens from then on and
    /// catches up from the store by itself misses nothing, because the feed
    /// publishes every event after that head (or after a later one it moved
    /// to while nobody listened, which the subscriber's catch-up then covers).
    pub(crate) async fn feed(&self, shard: &ShardId) -> Result<Arc<Feed>, StoreError> {
        let feed = {
            let mut feeds = self.inner.feeds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match feeds.get(shard) {
                Some(feed) => feed.clone(),
                None => {
                    let (chunks, _) = broadcast::channel(defaults::TAIL_BUFFER_CHUNKS);
                    let feed = Arc::new(Feed {
                        shard: shard.clone(),
                        chunks,
                        head: watch::Sender::new(Sequence::ZERO),
                        ready: watch::Sender::new(false),
                        state: Mutex::new(FeedState::default()),
                        wake: Notify::new(),
                        ring: Mutex::new(Ring::default()),
                    });
                    feeds.insert(shard.clone(), feed.clone());
                    metrics::gauge!(crate::telemetry::TAIL_FEEDS).set(feeds.len() as f64);
                    self.inner.tasks.spawn(read(self.inner.clone(), feed.clone()));
                    feed
                }
            }
        };
        let mut ready = feed.ready.subscribe();
        match tokio::time::timeout(defaults::FEED_START_TIMEOUT, ready.wait_for(|ready| *ready)).await {
            Ok(Ok(_)) => Ok(feed),
            _ => Err(StoreError::Unavailable {
                what: "start the live tail",
                source: format!("the head of shard {shard} could not be read").into(),
            }),
        }
    }

    /// How many feeds this replica runs.
    #[cfg(test)]
    pub(crate) fn feeds(&self) -> usize {
        self.inner.feeds.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    /// The highest head this replica has heard of for `shard`, if it has a
    /// feed.
    pub(crate) fn head(&self, shard: &ShardId) -> Option<Sequence> {
        self.inner.feeds.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(shard).map(|feed| feed.head())
    }

    /// Shards announced by commits (for pattern subscriptions); a receiver
    /// that lags should rescan the store.
    pub(crate) fn discoveries(&self) -> broadcast::Receiver<ShardId> {
        self.inner.discovered.subscribe()
    }

    /// Stops the dispatcher and every feed; subscribers see their feeds
    /// close.
    pub(crate) async fn close(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.feeds.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
    }
}

impl Feed {
    /// Receives the chunks published from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<TailChunk> {
        self.chunks.subscribe()
    }

    /// The highest head this replica has heard of.
    pub(crate) fn head(&self) -> Sequence {
        *self.head.borrow()
    }

    /// Keeps `events` in the ring (as far as the budget allows) and
    /// announces them.
    fn publish(&self, memory: &Account, events: Arc<[LogEvent]>) {
        let bytes: usize = events.iter().map(event_bytes).sum();
        let announced = Arc::downgrade(&events);
        {
            let mut ring = self.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            // Make room in this ring first; what the budget still lacks
            // leaves the ring empty, and subscribers read the store.
            let grant = loop {
                if ring.bytes + bytes <= defaults::TAIL_RING_BYTES
                    && let Some(grant) = memory.try_take(bytes)
                {
                    break Some(grant);
                }
                match ring.chunks.pop_front() {
                    Some((_, dropped)) => ring.bytes -= dropped.bytes(),
                    None => break memory.try_take(bytes).filter(|_| bytes <= defaults::TAIL_RING_BYTES),
                }
            };
            if let Some(grant) = grant {
                ring.bytes += grant.bytes();
                ring.chunks.push_back((events, grant));
            }
        }
        let _ = self.chunks.send(TailChunk::Events(announced));
    }

    fn offer(&self, head: Sequence, events: Option<Arc<[LogEvent]>>) {
        {
            let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            state.target = state.target.max(head);
            if let Some(events) = events.filter(|events| !events.is_empty()) {
                state.direct.push_back(events);
            }
        }
        self.head.send_if_modified(|known| {
            let moved = head > *known;
            *known = (*known).max(head);
            moved
        });
        self.wake.notify_one();
    }
}

/// Routes store changes to feeds.
async fn dispatch(inner: Arc<Inner>, mut changes: broadcast::Receiver<LogChange>) {
    loop {
        let change = tokio::select! {
            () = inner.cancel.cancelled() => return,
            change = changes.recv() => change,
        };
        match change {
            Ok(LogChange::Appended { shard, head, events }) => {
                let _ = inner.discovered.send(shard.clone());
                let feed = inner.feeds.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&shard).cloned();
                if let Some(feed) = feed {
                    feed.offer(head, events);
                }
            }
            Ok(LogChange::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => resync(&inner).await,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Re-reads every shard's head after changes may have been missed.
async fn resync(inner: &Inner) {
    match inner.store.list_shards(String::new()).await {
        Ok(shards) => {
            for state in shards {
                let shard = state.lease.shard;
                let _ = inner.discovered.send(shard.clone());
                let feed = inner.feeds.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&shard).cloned();
                if let Some(feed) = feed {
                    feed.offer(state.lease.head, None);
                }
            }
        }
        Err(err) => tracing::warn!(error = %err, "failed to resynchronise the live tail; relying on the next change"),
    }
}

/// What a feed's reader does next.
enum Step {
    /// Nothing new.
    Idle,
    /// Publish events this replica committed.
    Publish(Arc<[LogEvent]>),
    /// Read events from the store, from..=to.
    Read(Sequence, Sequence),
    /// Nobody listens: move the position without reading.
    Skip(Sequence, Option<ChainHash>),
}

/// A feed's reader: publishes every event once, in order.
async fn read(inner: Arc<Inner>, feed: Arc<Feed>) {
    // Nothing before the head at start is published: subscribers catch up
    // to it by themselves.
    let mut published = loop {
        match inner.store.shard_state(feed.shard.clone()).await {
            Ok(state) => break state.map_or(Sequence::ZERO, |s| s.lease.head),
            Err(err) => {
                tracing::warn!(shard = %feed.shard, error = %err, "failed to start a live tail; retrying");
                tokio::select! {
                    () = inner.cancel.cancelled() => return,
                    () = tokio::time::sleep(defaults::TAIL_RETRY) => {}
                }
            }
        }
    };
    let mut last_hash: Option<ChainHash> = None;
    feed.head.send_if_modified(|known| {
        let moved = published > *known;
        *known = (*known).max(published);
        moved
    });
    feed.ready.send_replace(true);
    loop {
        let step = next_step(&feed, published);
        match step {
            Step::Idle => {
                tokio::select! {
                    () = inner.cancel.cancelled() => return,
                    () = feed.wake.notified() => {}
                    () = tokio::time::sleep(defaults::FEED_IDLE_RETIRE) => {
                        if retire_if_unheld(&inner, &feed) {
                            return;
                        }
                    }
                }
            }
            Step::Skip(to, hash) => {
                published = to;
                last_hash = hash;
            }
            Step::Publish(events) => {
                let last = &events[events.len() - 1];
                published = last.sequence;
                last_hash = Some(last.hash);
                feed.publish(&inner.memory, events);
            }
            Step::Read(from, to) => {
                inner.counters.read(ReadPurpose::Tail);
                let read = inner.store.read_range(
                    feed.shard.clone(),
                    from,
                    Some(to),
                    defaults::TAIL_READ_BATCH,
                    defaults::TAIL_READ_BYTES,
                );
                match read.await {
                    Ok(page) => {
                        // The page's own checks (a hole before, inside or at
                        // the end of it; links; hashes), then its link to
                        // what this feed published last.
                        let chained = page.verify().and_then(|()| match (last_hash, page.events.first()) {
                            (Some(hash), Some(_)) if hash != page.anchor => Err(CorruptEvent {
                                shard: feed.shard.clone(),
                                sequence: from,
                                reason: "it does not link to the event before it".into(),
                            }),
                            _ => Ok(()),
                        });
                        match chained {
                            // Announced but not visible (yet): never skip;
                            // wait for the next change or retry shortly.
                            Ok(()) if page.events.is_empty() => sleep_or_cancel(&inner).await,
                            Ok(()) => {
                                let last = &page.events[page.events.len() - 1];
                                published = last.sequence;
                                last_hash = Some(last.hash);
                                feed.publish(&inner.memory, Arc::from(page.events));
                            }
                            Err(corrupt) => {
                                tracing::error!(shard = %feed.shard, sequence = %corrupt.sequence, reason = %corrupt.reason, "live tail met a corrupt event");
                                // Publish the valid events before it, then
                                // skip past it: subscribers deliver those and
                                // stop with an error when they reach it;
                                // nothing corrupt is published.
                                let valid: Vec<LogEvent> =
                                    page.events.into_iter().take_while(|e| e.sequence < corrupt.sequence).collect();
                                if !valid.is_empty() {
                                    feed.publish(&inner.memory, Arc::from(valid));
                                }
                                published = to;
                                last_hash = None;
                                let _ = feed.chunks.send(TailChunk::Corrupt(Arc::new(corrupt)));
                            }
                        }
                    }
                    Err(StoreError::Trimmed { low, .. }) => {
                        // Retention outran the tail; subscribers catch up
                        // through the snapshot themselves.
                        published = low.prev();
                        last_hash = None;
                    }
                    Err(err) => {
                        tracing::warn!(shard = %feed.shard, error = %err, "live tail read failed; retrying");
                        sleep_or_cancel(&inner).await;
                    }
                }
            }
        }
    }
}

/// Removes `feed` from the replica's map when nobody but the map and this
/// reader holds it. Race-free: a new holder can only get the feed from the
/// map, under the lock held here, and every other holder counts.
fn retire_if_unheld(inner: &Inner, feed: &Arc<Feed>) -> bool {
    let mut feeds = inner.feeds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // The map's reference and this reader's.
    if Arc::strong_count(feed) > 2 || feed.chunks.receiver_count() > 0 {
        return false;
    }
    feed.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).chunks.clear();
    if feeds.get(&feed.shard).is_some_and(|held| Arc::ptr_eq(held, feed)) {
        feeds.remove(&feed.shard);
        metrics::gauge!(crate::telemetry::TAIL_FEEDS).set(feeds.len() as f64);
    }
    tracing::debug!(shard = %feed.shard, "retired an unused live-tail feed");
    true
}

async fn sleep_or_cancel(inner: &Inner) {
    tokio::select! {
        () = inner.cancel.cancelled() => {}
        () = tokio::time::sleep(defaults::TAIL_RETRY) => {}
    }
}

/// What one event costs in a ring: its body and the rest of `LogEvent`.
fn event_bytes(event: &LogEvent) -> usize {
    event.body.len() + std::mem::size_of::<LogEvent>()
}

/// Decides the reader's next step from what was announced.
fn next_step(feed: &Feed, published: Sequence) -> Step {
    let mut state = feed.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    while state.direct.front().is_some_and(|events| events[events.len() - 1].sequence <= published) {
        state.direct.pop_front();
    }
    if let Some(front) = state.direct.front()
        && front[0].sequence <= published
    {
        // Partly published already (a bounded store read got into it first):
        // keep the rest.
        let rest: Arc<[LogEvent]> = front.iter().filter(|e| e.sequence > published).cloned().collect();
        state.direct[0] = rest;
    }
    let direct_end = state.direct.back().map(|events| events[events.len() - 1].sequence);
    let target = state.target.max(direct_end.unwrap_or_default());
    if target <= published {
        return Step::Idle;
    }
    if let Some(front) = state.direct.front()
        && front[0].sequence == published.next()
    {
        return state.direct.pop_front().map_or(Step::Idle, Step::Publish);
    }
    if feed.chunks.receiver_count() == 0 {
        // Nobody listens: remember the position, read nothing. A subscriber
        // that arrives later catches up from the store by itself.
        let hash = match state.direct.back() {
            Some(events) if events[events.len() - 1].sequence == target => Some(events[events.len() - 1].hash),
            _ => None,
        };
        state.direct.clear();
        return Step::Skip(target, hash);
    }
    let to = match state.direct.front() {
        Some(front) if front[0].sequence > published.next() => front[0].sequence.prev(),
        _ => target,
    };
    Step::Read(published.next(), to)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::log::event::{NewEvent, chain};
    use crate::log::ids::Epoch;

    fn feed() -> Feed {
        feed_named("resourcelease.t")
    }

    fn feed_named(shard: &str) -> Feed {
        let (chunks, _) = broadcast::channel(8);
        Feed {
            shard: ShardId::parse(shard).expect("valid"),
            chunks,
            head: watch::Sender::new(Sequence::ZERO),
            ready: watch::Sender::new(true),
            state: Mutex::new(FeedState::default()),
            wake: Notify::new(),
            ring: Mutex::new(Ring::default()),
        }
    }

    fn events(first: u64, n: usize) -> Arc<[LogEvent]> {
        let new: Vec<NewEvent> =
            (0..n).map(|i| NewEvent { recorded_at: SystemTime::UNIX_EPOCH, body: format!("{i}").into() }).collect();
        Arc::from(chain(ChainHash::ZERO, Sequence(first), Epoch(1), &new))
    }

    fn describe(step: Step) -> String {
        match step {
            Step::Idle => "idle".into(),
            Step::Publish(events) => format!("publish {}..={}", events[0].sequence, events[events.len() - 1].sequence),
            Step::Read(from, to) => format!("read {from}..={to}"),
            Step::Skip(to, hash) => format!("skip to {to} ({})", if hash.is_some() { "hash" } else { "no hash" }),
        }
    }

    #[test]
    fn local_commits_publish_without_reading_and_gaps_are_read() {
        let feed = feed();
        let _listener = feed.subscribe();
        feed.offer(Sequence(3), Some(events(1, 3)));
        assert_eq!(describe(next_step(&feed, Sequence::ZERO)), "publish 1..=3");
        // Another replica committed 4..=6; this one 7..=8.
        feed.offer(Sequence(6), None);
        feed.offer(Sequence(8), Some(events(7, 2)));
        assert_eq!(describe(next_step(&feed, Sequence(3))), "read 4..=6");
        assert_eq!(describe(next_step(&feed, Sequence(6))), "publish 7..=8");
        assert_eq!(describe(next_step(&feed, Sequence(8))), "idle");
    }

    #[test]
    fn a_partly_published_local_commit_publishes_only_the_rest() {
        let feed = feed();
        let _listener = feed.subscribe();
        feed.offer(Sequence(10), Some(events(1, 10)));
        assert_eq!(describe(next_step(&feed, Sequence(4))), "publish 5..=10");
    }

    #[tokio::test]
    async fn a_feed_nobody_holds_is_retired_and_a_held_one_is_kept() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = crate::store::sqlite::SqliteStore::open(dir.path().join("log.db")).await.expect("open");
        let store: Arc<dyn LogStore> = Arc::new(store);
        let tail = Tail::start(store, Arc::new(HubCounters::default()), &Budget::new(defaults::SUBSCRIPTION_MEMORY));
        let (kept, dropped) = (
            ShardId::parse("resourcelease.kept").expect("valid"),
            ShardId::parse("resourcelease.gone").expect("valid"),
        );
        let held = tail.feed(&kept).await.expect("feed");
        let _listener = held.subscribe();
        drop(tail.feed(&dropped).await.expect("feed"));
        assert_eq!(tail.feeds(), 2);

        // Idle readers only wait on timers now: let paused time run them.
        tokio::time::pause();
        tokio::time::sleep(defaults::FEED_IDLE_RETIRE * 2).await;
        assert_eq!(tail.feeds(), 1, "only the held feed stays");
        assert!(tail.head(&dropped).is_none());
        assert!(tail.head(&kept).is_some());
        // Asking again starts a fresh feed (its start reads the store).
        tokio::time::resume();
        let again = tail.feed(&dropped).await.expect("feed again");
        assert_eq!(tail.feeds(), 2);
        drop((again, held));
        tail.close().await;
    }

    fn big_events(first: u64, bytes: usize) -> Arc<[LogEvent]> {
        let new = vec![NewEvent { recorded_at: SystemTime::UNIX_EPOCH, body: vec![7u8; bytes].into() }];
        Arc::from(chain(ChainHash::ZERO, Sequence(first), Epoch(1), &new))
    }

    fn announced(listener: &mut broadcast::Receiver<TailChunk>) -> std::sync::Weak<[LogEvent]> {
        match listener.try_recv().expect("an announcement") {
            TailChunk::Events(events) => events,
            TailChunk::Corrupt(corrupt) => panic!("unexpected {corrupt:?}"),
        }
    }

    #[test]
    fn the_ring_keeps_recent_events_within_its_bytes_and_the_budget() {
        let feed = feed();
        let mut listener = feed.subscribe();
        let budget = Budget::new(defaults::SUBSCRIPTION_MEMORY);
        let memory = budget.account(None);
        // Two fit (with what each event costs beside its body), three do not.
        let chunk = defaults::TAIL_RING_BYTES / 2 - 4096;
        for first in 1..=3 {
            feed.publish(&memory, big_events(first, chunk));
        }
        let (one, two, three) = (announced(&mut listener), announced(&mut listener), announced(&mut listener));
        assert!(one.upgrade().is_none(), "the oldest left the ring to keep it within its bytes");
        assert!(two.upgrade().is_some() && three.upgrade().is_some());
        assert!(budget.used() <= defaults::TAIL_RING_BYTES, "the ring's bytes come from the budget");

        // A budget with no room keeps nothing: listeners read the store.
        let tight = Budget::new(chunk / 2);
        let other = feed_named("resourcelease.tight");
        let mut listener = other.subscribe();
        other.publish(&tight.account(None), big_events(1, chunk));
        assert!(announced(&mut listener).upgrade().is_none());
        assert_eq!(tight.used(), 0);
    }

    #[test]
    fn without_listeners_the_feed_moves_without_reading() {
        let feed = feed();
        feed.offer(Sequence(5), None);
        assert_eq!(describe(next_step(&feed, Sequence::ZERO)), "skip to 5 (no hash)");
        feed.offer(Sequence(12), None);
        feed.offer(Sequence(14), Some(events(13, 2)));
        assert_eq!(describe(next_step(&feed, Sequence(5))), "skip to 14 (hash)");
        assert_eq!(feed.head(), Sequence(14));
    }
}
