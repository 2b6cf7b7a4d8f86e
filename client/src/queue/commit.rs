//! The commit path: how a decided command's events reach the shard's log,
//! and when its caller hears the answer.
//!
//! A queue decides every command against its state under one short,
//! synchronous lock, then hands the command's events to the replicator.
//! The state it decides against is *speculative*: it includes the events of
//! earlier commands that were sent but are not yet durable, so commands are
//! decided in order without waiting one log round trip each. Three rules
//! make that safe:
//!
//! 1. **Applied in order, answered when durable.** Events are applied to the
//!    state in the order they were decided (and sent, since the owner is
//!    the shard's only writer and predicts every sequence). A caller hears
//!    its answer only once the batch holding its events is durable; since
//!    the log is ordered, so is everything decided before it. Reads that
//!    callers see (stats, dead letters) and refusals wait the same way for
//!    what they observed.
//! 2. **Bounded pipeline.** Up to [`REPLICATION_WINDOW`] batches are in
//!    flight. While the window is full, new commands' events are applied
//!    and collected into one *open batch*, sent as soon as a slot frees: the
//!    commands that arrive during a round trip share one batch. The open
//!    batch is bounded ([`OPEN_BATCH_MAX_EVENTS`],
//!    [`OPEN_BATCH_MAX_BYTES`]); when it is full, enqueues are refused with
//!    RESOURCE_EXHAUSTED and other commands wait for room.
//! 3. **Any doubt fences the shard.** A batch the log refuses (a stale
//!    epoch, an out-of-order producer sequence), one the replicator gave up
//!    on (it may or may not be written), or an answer with other sequences
//!    than predicted means the state may no longer be the log's. The shard
//!    then *fences* itself: every command waiting on a batch not yet
//!    durable is answered UNAVAILABLE, new commands are refused, and the
//!    state is thrown away until the shard is rebuilt from its log
//!    ([`Queue::recover`](super::Queue::recover)), normally by its owner
//!    after taking a new epoch, which fences out any batch still on its way.
//!    Nothing acknowledged is lost (it is in the log), and nothing
//!    unacknowledged was ever answered as done.
//!
//! A synchronous replicator (the in-memory one) answers inside `publish`:
//! its commands never wait, never allocate a landing and never touch the
//! pipeline task, so the hot path stays what it was.

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, OnceLock, PoisonError, Weak};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::{Notify, mpsc, watch};

use super::caller::{Caller, SYSTEM_PRINCIPAL};
use super::config::{QueueClock, QueueConfig};
use super::error::{QueueError, Result};
use super::observer::LeaseObserver;
use super::state::{ApplyError, QueueState};
use crate::backpressure::{BackpressureListener, BackpressureSignal};
use crate::clock::Timestamp;
use crate::defaults::{OPEN_BATCH_MAX_BYTES, OPEN_BATCH_MAX_EVENTS, REPLICATION_WINDOW};
use crate::event::{Event, EventKind, Origin, RequeueReason};
use crate::ids::{Epoch, ItemId, PeerId, ProducerId, Sequence, ShardId};
use crate::metrics::{self, QueueMetrics};
use crate::replication::{Appended, Batch, PublishFuture, ReplicationError, Replicator};

/// Why a shard stopped serving until it is rebuilt from its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FenceReason {
    /// Not rebuilt from its log yet (a node that has just started, or is
    /// rebuilding after a fence).
    Recovering,
    /// The log granted the shard to a newer epoch: another owner, or a newer
    /// incarnation of this one, writes it now.
    StaleEpoch,
    /// The replicator gave up on a batch: it may or may not be in the log.
    Unavailable,
    /// The log refused a batch for good.
    Rejected,
    /// The log assigned other sequences than the queue predicted, so the
    /// queue's state is not the log's.
    Diverged,
    /// The shard's lease was lost, or could not be renewed in time.
    LeaseLost,
    /// The node gave the shard up (it is stopping, or handing it over).
    Released,
}

impl FenceReason {
    /// Every reason.
    pub const ALL: [FenceReason; 7] = [
        FenceReason::Recovering,
        FenceReason::StaleEpoch,
        FenceReason::Unavailable,
        FenceReason::Rejected,
        FenceReason::Diverged,
        FenceReason::LeaseLost,
        FenceReason::Released,
    ];

    /// The stable name (metric label, logs, diagnostics).
    pub fn as_str(self) -> &'static str {
        match self {
            FenceReason::Recovering => "recovering",
            FenceReason::StaleEpoch => "stale_epoch",
            FenceReason::Unavailable => "unavailable",
            FenceReason::Rejected => "rejected",
            FenceReason::Diverged => "diverged",
            FenceReason::LeaseLost => "lease_lost",
            FenceReason::Released => "released",
        }
    }
}

/// A fenced shard: why, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The category.
    pub reason: FenceReason,
    /// What happened.
    pub detail: String,
}

impl Fence {
    /// A fence for `reason`.
    pub fn new(reason: FenceReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }

    fn from_error(error: &ReplicationError) -> Self {
        let reason = match error {
            ReplicationError::StaleEpoch { .. } => FenceReason::StaleEpoch,
            ReplicationError::Unavailable(_) => FenceReason::Unavailable,
            ReplicationError::Rejected(_) | ReplicationError::Trimmed { .. } | ReplicationError::Corrupt(_) => {
                FenceReason::Rejected
            }
        };
        Self::new(reason, error.to_string())
    }
}

/// Whether a queue serves its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardStatus {
    /// Serving under `epoch`.
    Serving {
        /// The epoch its batches carry.
        epoch: Epoch,
    },
    /// Fenced until rebuilt from its log.
    Fenced(Fence),
}

/// The outcome of one batch, awaited by the commands whose events it holds.
#[derive(Debug, Default)]
pub(super) struct Landing {
    outcome: OnceLock<std::result::Result<(), Fence>>,
    notify: Notify,
}

impl Landing {
    fn land(&self, outcome: std::result::Result<(), Fence>) {
        let _ = self.outcome.set(outcome);
        self.notify.notify_waiters();
    }

    async fn wait(&self) -> std::result::Result<(), Fence> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the outcome is read: a landing between the
            // two still wakes this waiter.
            notified.as_mut().enable();
            if let Some(outcome) = self.outcome.get() {
                return outcome.clone();
            }
            notified.await;
        }
    }
}

/// What a command waits for before it answers.
#[must_use = "a command answers only once what it decided is durable"]
pub(super) enum Ticket {
    /// Everything the command saw or wrote is durable.
    Done,
    /// Durable once this batch lands.
    Pending(Arc<Landing>),
    /// The shard fenced itself before it was.
    Fenced(Fence),
}

impl Ticket {
    #[inline]
    pub(super) fn is_done(&self) -> bool {
        matches!(self, Ticket::Done)
    }

    /// Waits until the batch is durable; UNAVAILABLE when the shard fenced
    /// itself first.
    pub(super) async fn wait(self, shard: &ShardId) -> Result<()> {
        let fence = match self {
            Ticket::Done => return Ok(()),
            Ticket::Fenced(fence) => fence,
            Ticket::Pending(landing) => match landing.wait().await {
                Ok(()) => return Ok(()),
                Err(fence) => fence,
            },
        };
        Err(fenced(shard, &fence))
    }
}

/// The error a command gets from a fenced shard.
pub(super) fn fenced(shard: &ShardId, fence: &Fence) -> QueueError {
    QueueError::Fenced { shard: shard.clone(), reason: fence.reason, detail: fence.detail.clone() }
}

/// A sealed batch the replicator has, not yet durable.
struct Flight {
    producer_seq: u64,
    first: Sequence,
    count: u64,
    landing: Arc<Landing>,
    sent_at: tokio::time::Instant,
}

/// A pending answer handed to the pipeline task.
struct Sent {
    generation: u64,
    answer: PublishFuture,
}

/// What every handle of a queue shares.
pub(super) struct Shared {
    pub(super) config: QueueConfig,
    pub(super) replicator: Arc<dyn Replicator>,
    pub(super) clock: QueueClock,
    pub(super) listeners: Vec<Arc<dyn BackpressureListener>>,
    pub(super) observers: Vec<Arc<dyn LeaseObserver>>,
    pub(super) metrics: QueueMetrics,
    /// Origin of events the queue causes itself.
    pub(super) system: Arc<Origin>,
    /// The state and the pipeline's bookkeeping. Locked for short,
    /// synchronous sections only, never across an `.await`.
    core: StdMutex<Core>,
    /// Woken after every applied batch while someone waits (long polls,
    /// waiting drains), and when the shard fences or is rebuilt.
    pub(super) changed: Notify,
    /// How many callers wait on `changed`; zero keeps the hot path free of
    /// notifications.
    pub(super) waiting: AtomicUsize,
    /// Woken when the open batch is sent (room for more) or the shard fences.
    room: Notify,
    /// The task that awaits the replicator's answers, started by the first
    /// answer that is not immediate.
    pipeline: OnceLock<mpsc::UnboundedSender<Sent>>,
    status: watch::Sender<ShardStatus>,
}

/// The state and everything the commit path keeps beside it.
pub(super) struct Core {
    /// The speculative state: every decided event applied.
    pub(super) state: QueueState,
    /// Random per queue incarnation: ids from different nodes or restarts
    /// never collide, and a counter keeps them cheap.
    nonce: u64,
    counter: u64,
    /// Origin of the last caller, reused while the caller does not change.
    origin: Arc<Origin>,
    /// Recorded times never go backwards, even if the clock does.
    last_now: Timestamp,
    /// The events of the command being decided, not applied yet. Its
    /// buffer is reused, and it is the batch handed to the replicator.
    fresh: Box<Batch>,
    /// Events applied but not sent yet (the window was full), oldest first.
    open: Vec<Event>,
    open_first: Sequence,
    open_bytes: usize,
    open_landing: Option<Arc<Landing>>,
    /// Batches the replicator has, oldest first.
    in_flight: VecDeque<Flight>,
    producer_seq: u64,
    epoch: Epoch,
    /// Bumped at every fence and rebuild: answers to batches of an earlier
    /// generation are ignored.
    generation: u64,
    fence: Option<Fence>,
    /// The last sequence known durable.
    durable: Sequence,
    /// The sequence of the newest snapshot written to the log.
    snapshot_at: Sequence,
}

impl Shared {
    // The builder's parts, passed on as they are.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        config: QueueConfig,
        replicator: Arc<dyn Replicator>,
        clock: QueueClock,
        listeners: Vec<Arc<dyn BackpressureListener>>,
        observers: Vec<Arc<dyn LeaseObserver>>,
        state: QueueState,
        epoch: Epoch,
        fence: Option<Fence>,
    ) -> Self {
        let system = Arc::new(Origin {
            shard: config.shard.clone(),
            principal: crate::ids::Principal::from(SYSTEM_PRINCIPAL),
            peer: config.node.clone(),
        });
        let metrics = QueueMetrics::new(&config.shard, FenceReason::ALL.map(FenceReason::as_str));
        // The gauges start at the state's values; afterwards each applied
        // batch updates them (the dead-letter gauge when its count changed).
        metrics.pending.set(state.pending() as f64);
        metrics.active.set(state.active() as f64);
        metrics.dead_letters.set(state.dead_letters() as f64);
        let nonce = random_u64();
        let durable = state.last_sequence();
        let status = match &fence {
            Some(fence) => ShardStatus::Fenced(fence.clone()),
            None => ShardStatus::Serving { epoch },
        };
        let core = Core {
            state,
            nonce,
            counter: 0,
            origin: Arc::clone(&system),
            last_now: Timestamp::EPOCH,
            fresh: Box::new(Batch {
                shard: config.shard.clone(),
                producer: producer_id(&config, nonce),
                producer_seq: 0,
                epoch,
                first: Sequence::ZERO,
                events: Vec::new(),
            }),
            open: Vec::new(),
            open_first: Sequence::ZERO,
            open_bytes: 0,
            open_landing: None,
            in_flight: VecDeque::new(),
            producer_seq: 0,
            epoch,
            generation: 0,
            fence,
            durable,
            snapshot_at: Sequence::ZERO,
        };
        Self {
            config,
            replicator,
            clock,
            listeners,
            observers,
            metrics,
            system,
            core: StdMutex::new(core),
            changed: Notify::new(),
            waiting: AtomicUsize::new(0),
            room: Notify::new(),
            pipeline: OnceLock::new(),
            status: watch::Sender::new(status),
        }
    }

    /// Locks the state. A panic under this lock (a listener or observer
    /// that panicked) leaves the state as the events applied so far made it:
    /// poisoning is not a reason to stop.
    #[inline]
    pub(super) fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The shard's status, as a watch that changes at every fence and
    /// rebuild.
    pub(super) fn status(&self) -> watch::Receiver<ShardStatus> {
        self.status.subscribe()
    }

    /// Locks the state for a command. Refuses at once when the shard is
    /// fenced, or when the open batch is full and the command adds work;
    /// `None` when another command must wait for room.
    #[inline]
    pub(super) fn try_command(&self, adds_work: bool) -> Result<Option<MutexGuard<'_, Core>>> {
        let core = self.core();
        if let Some(fence) = &core.fence {
            return Err(fenced(&self.config.shard, fence));
        }
        if core.has_room() {
            return Ok(Some(core));
        }
        if adds_work {
            return Err(self.backlog(&core));
        }
        Ok(None)
    }

    /// Waits until the open batch has room (or the shard fenced), after a
    /// [`try_command`](Self::try_command) found none.
    pub(super) async fn wait_for_room(&self) {
        let room = self.room.notified();
        tokio::pin!(room);
        // Registered before looking: room made after the look still wakes
        // this waiter.
        room.as_mut().enable();
        let ready = {
            let core = self.core();
            core.fence.is_some() || core.has_room()
        };
        if !ready {
            room.await;
        }
    }

    #[cold]
    fn backlog(&self, core: &Core) -> QueueError {
        let now = core.last_now;
        QueueError::ReplicationBacklog {
            unacknowledged: core.state.last_sequence().get().saturating_sub(core.durable.get()),
            signal: self.signal(core, now),
        }
    }

    /// The live signal: the state's flag with the current depth and the
    /// configured watermarks.
    pub(super) fn signal(&self, core: &Core, now: Timestamp) -> BackpressureSignal {
        BackpressureSignal {
            active: core.state.backpressure().active,
            pending: core.state.pending(),
            high: self.config.high_watermark,
            low: self.config.low_watermark,
            observed_at: now,
            shard: self.config.shard.clone(),
        }
    }

    /// Adds a `BackpressureChanged` event if `pending_after` crosses a
    /// watermark (hysteresis: on at `high`, off at `low`).
    #[inline(always)]
    pub(super) fn push_backpressure(&self, core: &mut Core, origin: &Arc<Origin>, now: Timestamp, pending_after: u64) {
        let config = &self.config;
        let active = core.state.backpressure().active;
        let flip = if active { pending_after <= config.low_watermark } else { pending_after >= config.high_watermark };
        if flip {
            let signal = BackpressureSignal {
                active: !active,
                pending: pending_after,
                high: config.high_watermark,
                low: config.low_watermark,
                observed_at: now,
                shard: config.shard.clone(),
            };
            core.push(origin, now, EventKind::BackpressureChanged { signal });
        }
    }

    // ----- commit -----

    /// Sends the events the command decided (in the core's fresh batch) to
    /// the log: at once when the window has room and nothing waits before
    /// them, else into the open batch. Returns what the command waits for:
    /// this batch, or, with nothing to write, whatever it saw that is not
    /// durable yet.
    #[inline]
    pub(super) fn commit(self: &Arc<Self>, core: &mut Core) -> Ticket {
        if core.fresh.events.is_empty() {
            return core.tail_ticket();
        }
        if core.open.is_empty() && core.in_flight.len() < REPLICATION_WINDOW {
            let first = core.state.last_sequence().after(1);
            self.send(core, first, None)
        } else {
            self.stage(core)
        }
    }

    /// Seals the fresh batch as the producer's next and hands it to the
    /// replicator. `staged` is the landing of an open batch whose events
    /// were applied already; otherwise they are applied here, right after
    /// the replicator took them (nothing else runs in between: the lock is
    /// held).
    #[inline]
    fn send(self: &Arc<Self>, core: &mut Core, first: Sequence, staged: Option<Arc<Landing>>) -> Ticket {
        core.producer_seq += 1;
        let producer_seq = core.producer_seq;
        let count = core.fresh.events.len() as u64;
        let batch = &mut *core.fresh;
        batch.producer_seq = producer_seq;
        batch.epoch = core.epoch;
        batch.first = first;
        let mut answer = self.replicator.publish(batch);
        match answer.take_ready() {
            Some(Ok(appended)) if appended.first == first && appended.count == count => {
                match staged {
                    None => self.apply_fresh(core),
                    Some(landing) => {
                        core.fresh.events.clear();
                        landing.land(Ok(()));
                    }
                }
                core.durable = appended.last();
                self.metrics.replicated.increment(count);
                Ticket::Done
            }
            Some(answer) => self.refused(core, first, count, answer, staged),
            None => {
                let landing = match staged {
                    None => {
                        self.apply_fresh(core);
                        Arc::new(Landing::default())
                    }
                    Some(landing) => {
                        core.fresh.events.clear();
                        landing
                    }
                };
                let sent_at = tokio::time::Instant::now();
                core.in_flight.push_back(Flight { producer_seq, first, count, landing: Arc::clone(&landing), sent_at });
                self.dispatch(Sent { generation: core.generation, answer });
                self.metrics.in_flight.set(core.in_flight.len() as f64);
                self.update_lag(core);
                Ticket::Pending(landing)
            }
        }
    }

    /// An immediate answer other than the expected acknowledgement.
    #[cold]
    fn refused(
        &self,
        core: &mut Core,
        first: Sequence,
        count: u64,
        answer: std::result::Result<Appended, ReplicationError>,
        staged: Option<Arc<Landing>>,
    ) -> Ticket {
        core.fresh.events.clear();
        let fence = match answer {
            Ok(appended) => diverged(first, count, &appended),
            Err(error) => Fence::from_error(&error),
        };
        if let Some(landing) = staged {
            landing.land(Err(fence.clone()));
        }
        self.fence(core, fence)
    }

    /// Applies the fresh events and moves them into the open batch: the
    /// window is full, so they wait there, and commands decided after them
    /// see them.
    #[cold]
    fn stage(&self, core: &mut Core) -> Ticket {
        if core.open.is_empty() {
            core.open_first = core.state.last_sequence().after(1);
            core.open_landing = Some(Arc::new(Landing::default()));
        }
        let dead_letters_before = core.state.dead_letters();
        let Core { fresh, open, open_bytes, state, .. } = core;
        let mut sequence = state.last_sequence();
        for event in fresh.events.drain(..) {
            sequence = sequence.after(1);
            *open_bytes += event.approx_bytes();
            apply_accepted(self, state, sequence, event.clone());
            open.push(event);
        }
        self.applied(core, dead_letters_before);
        self.update_lag(core);
        Ticket::Pending(Arc::clone(core.open_landing.as_ref().expect("the open batch has a landing")))
    }

    /// Applies the fresh batch's events in order, emptying it.
    #[inline]
    fn apply_fresh(&self, core: &mut Core) {
        let dead_letters_before = core.state.dead_letters();
        let Core { fresh, state, .. } = core;
        let mut sequence = state.last_sequence();
        if fresh.events.len() == 1 {
            // Most commands write one event: no iterator to set up and drop.
            let event = fresh.events.pop().expect("one event");
            apply_accepted(self, state, sequence.after(1), event);
        } else {
            for event in fresh.events.drain(..) {
                sequence = sequence.after(1);
                apply_accepted(self, state, sequence, event);
            }
        }
        self.applied(core, dead_letters_before);
    }

    /// After a batch was applied: gauges (the dead-letter gauge only when
    /// its count changed, which most batches do not) and waiters.
    #[inline]
    fn applied(&self, core: &Core, dead_letters_before: u64) {
        let state = &core.state;
        self.metrics.pending.set(state.pending() as f64);
        self.metrics.active.set(state.active() as f64);
        if state.dead_letters() != dead_letters_before {
            self.metrics.dead_letters.set(state.dead_letters() as f64);
        }
        if self.waiting.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    fn update_lag(&self, core: &Core) {
        let lag = core.state.last_sequence().get().saturating_sub(core.durable.get());
        self.metrics.lag_events.set(lag as f64);
        let oldest = core.in_flight.front().map_or(0.0, |flight| flight.sent_at.elapsed().as_secs_f64());
        self.metrics.lag_seconds.set(oldest);
    }

    /// Hands a pending answer to the pipeline task, starting it on first
    /// use (synchronous replicators never need it).
    fn dispatch(self: &Arc<Self>, sent: Sent) {
        let pipeline = self.pipeline.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(pipeline(Arc::downgrade(self), receiver));
            sender
        });
        // The task ends only when this queue is gone, so a send cannot fail
        // while `self` is alive; were it to, the batch would never land and
        // the shard would have to be fenced by its owner's lease.
        if pipeline.send(sent).is_err() {
            tracing::error!(shard = %self.config.shard, "the replication pipeline task is gone");
        }
    }

    /// Settles the oldest batch in flight with the replicator's answer.
    fn landed(self: &Arc<Self>, generation: u64, answer: std::result::Result<Appended, ReplicationError>) {
        let mut core = self.core();
        if core.generation != generation {
            return; // fenced (and maybe rebuilt) meanwhile
        }
        let Some(flight) = core.in_flight.front() else { return };
        match answer {
            Ok(appended) if appended.first == flight.first && appended.count == flight.count => {
                let flight = core.in_flight.pop_front().expect("the front flight exists");
                core.durable = appended.last();
                self.metrics.replicated.increment(flight.count);
                self.metrics.append.record(flight.sent_at.elapsed().as_secs_f64());
                flight.landing.land(Ok(()));
                if !core.open.is_empty() {
                    self.send_open(&mut core);
                }
                self.metrics.in_flight.set(core.in_flight.len() as f64);
                self.update_lag(&core);
            }
            Ok(appended) => {
                let fence = diverged(flight.first, flight.count, &appended);
                let _ = self.fence(&mut core, fence);
            }
            Err(error) => {
                tracing::debug!(shard = %self.config.shard, producer_seq = flight.producer_seq, "batch failed");
                let _ = self.fence(&mut core, Fence::from_error(&error));
            }
        }
    }

    /// Sends the open batch (a slot just freed).
    fn send_open(self: &Arc<Self>, core: &mut Core) {
        let landing = core.open_landing.take().expect("an open batch has a landing");
        let first = core.open_first;
        debug_assert!(core.fresh.events.is_empty(), "nothing is decided outside a command");
        let Core { fresh, open, .. } = &mut *core;
        std::mem::swap(&mut fresh.events, open);
        core.open_bytes = 0;
        let _ = self.send(core, first, Some(landing));
        self.room.notify_waiters();
    }

    /// Fences the shard: see the module docs. Idempotent.
    pub(super) fn fence(&self, core: &mut Core, fence: Fence) -> Ticket {
        if let Some(existing) = &core.fence {
            return Ticket::Fenced(existing.clone());
        }
        if matches!(fence.reason, FenceReason::Recovering | FenceReason::Released) {
            tracing::info!(shard = %self.config.shard, reason = fence.reason.as_str(), detail = %fence.detail, "shard not serving");
        } else {
            tracing::warn!(
                shard = %self.config.shard,
                reason = fence.reason.as_str(),
                detail = %fence.detail,
                in_flight = core.in_flight.len(),
                "shard fenced; it serves again once rebuilt from its log"
            );
        }
        ::metrics::counter!(metrics::REPLICATION_FENCED, metrics::SHARD_LABEL => self.config.shard.to_string(), "reason" => fence.reason.as_str())
            .increment(1);
        core.generation += 1;
        for flight in core.in_flight.drain(..) {
            flight.landing.land(Err(fence.clone()));
        }
        if let Some(landing) = core.open_landing.take() {
            landing.land(Err(fence.clone()));
        }
        core.open.clear();
        core.open_bytes = 0;
        core.fresh.events.clear();
        core.fence = Some(fence.clone());
        self.status.send_replace(ShardStatus::Fenced(fence.clone()));
        self.metrics.in_flight.set(0.0);
        self.metrics.lag_events.set(0.0);
        self.metrics.lag_seconds.set(0.0);
        self.changed.notify_waiters();
        self.room.notify_waiters();
        Ticket::Fenced(fence)
    }

    /// Installs a state rebuilt from the log, to serve under `epoch` with a
    /// new producer incarnation. Fences first if the shard still serves.
    pub(super) fn install(&self, state: QueueState, epoch: Epoch, snapshot_at: Sequence) {
        let mut core = self.core();
        if core.fence.is_none() {
            let _ = self.fence(&mut core, Fence::new(FenceReason::Recovering, "rebuilt from the log"));
        }
        let was_active = core.state.backpressure().active;
        core.generation += 1;
        core.nonce = random_u64();
        core.counter = 0;
        core.fresh.producer = producer_id(&self.config, core.nonce);
        core.fresh.epoch = epoch;
        core.producer_seq = 0;
        core.epoch = epoch;
        core.durable = state.last_sequence();
        core.snapshot_at = snapshot_at;
        core.state = state;
        core.fence = None;
        self.metrics.pending.set(core.state.pending() as f64);
        self.metrics.active.set(core.state.active() as f64);
        self.metrics.dead_letters.set(core.state.dead_letters() as f64);
        // Listeners (the concurrency limiter, diagnostics) heard every transition
        // the state before saw; if the rebuilt state's differs, that is a
        // transition for them too.
        if core.state.backpressure().active != was_active {
            let signal = core.state.backpressure().clone();
            for listener in &self.listeners {
                listener.on_signal(&signal);
            }
        }
        self.status.send_replace(ShardStatus::Serving { epoch });
        drop(core);
        self.changed.notify_waiters();
        self.room.notify_waiters();
    }

    /// The epoch, the newest durable sequence and the newest snapshot.
    pub(super) fn positions(&self) -> (Epoch, Sequence, Sequence) {
        let core = self.core();
        (core.epoch, core.durable, core.snapshot_at)
    }

    /// Records a snapshot written at `sequence` under `epoch`.
    pub(super) fn snapshot_written(&self, epoch: Epoch, sequence: Sequence) {
        let mut core = self.core();
        if core.epoch == epoch && core.fence.is_none() {
            core.snapshot_at = core.snapshot_at.max(sequence);
        }
    }
}

/// Awaits the replicator's answers in the order the batches were sent (an
/// answer that arrives early waits for the ones before it) and settles them.
/// Holds the queue weakly: it ends when the queue is dropped.
async fn pipeline(shared: Weak<Shared>, mut sent: mpsc::UnboundedReceiver<Sent>) {
    let mut answers = FuturesOrdered::new();
    loop {
        tokio::select! {
            next = sent.recv() => match next {
                Some(Sent { generation, answer }) => answers.push_back(async move { (generation, answer.await) }),
                None => return,
            },
            Some((generation, answer)) = answers.next(), if !answers.is_empty() => {
                let Some(shared) = shared.upgrade() else { return };
                shared.landed(generation, answer);
            }
        }
    }
}

fn diverged(first: Sequence, count: u64, appended: &Appended) -> Fence {
    Fence::new(
        FenceReason::Diverged,
        format!("the log assigned {}..={} to a batch of {count} expected at {first}", appended.first, appended.last()),
    )
}

fn producer_id(config: &QueueConfig, nonce: u64) -> ProducerId {
    ProducerId::new(format!("{}/{nonce:016x}", config.node))
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState is seeded from the OS per process and perturbed per
    // instance: enough to keep id prefixes of queue instances apart without
    // another dependency.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(u64::from(std::process::id()));
    hasher.finish()
}

impl Core {
    /// Whether the open batch may take another command's events.
    #[inline]
    fn has_room(&self) -> bool {
        self.open.len() < OPEN_BATCH_MAX_EVENTS && self.open_bytes < OPEN_BATCH_MAX_BYTES
    }

    /// What a command that saw the current state waits for: the newest batch
    /// not yet durable.
    #[inline]
    pub(super) fn tail_ticket(&self) -> Ticket {
        if let Some(fence) = &self.fence {
            return Ticket::Fenced(fence.clone());
        }
        if let Some(landing) = &self.open_landing {
            return Ticket::Pending(Arc::clone(landing));
        }
        match self.in_flight.back() {
            Some(flight) => Ticket::Pending(Arc::clone(&flight.landing)),
            None => Ticket::Done,
        }
    }

    /// The fence, if the shard is fenced.
    #[inline]
    pub(super) fn fence(&self) -> Option<&Fence> {
        self.fence.as_ref()
    }

    #[inline]
    pub(super) fn next_id(&mut self) -> u128 {
        self.counter += 1;
        (u128::from(self.nonce) << 64) | u128::from(self.counter)
    }

    #[inline]
    pub(super) fn next_item_id(&mut self) -> ItemId {
        loop {
            let id = ItemId::from_u128(self.next_id());
            if !self.state.contains(id) {
                return id;
            }
        }
    }

    #[inline]
    pub(super) fn now(&mut self, clock: &QueueClock) -> Timestamp {
        self.last_now = clock.now().max(self.last_now);
        self.last_now
    }

    #[inline]
    pub(super) fn origin(&mut self, shard: &ShardId, caller: &Caller) -> Arc<Origin> {
        // Compared by pointer first (string ids do): a caller reused across
        // calls shares the cached origin's strings.
        if self.origin.principal != caller.principal || self.origin.peer != caller.peer {
            self.new_origin(shard, caller);
        }
        Arc::clone(&self.origin)
    }

    #[cold]
    fn new_origin(&mut self, shard: &ShardId, caller: &Caller) {
        self.origin =
            Arc::new(Origin { shard: shard.clone(), principal: caller.principal.clone(), peer: caller.peer.clone() });
    }

    /// Adds an event to the command's batch.
    #[inline]
    pub(super) fn push(&mut self, origin: &Arc<Origin>, at: Timestamp, kind: EventKind) {
        self.fresh.events.push(Event { origin: Arc::clone(origin), recorded_at: at, kind });
    }

    /// The sequence the next decided event will get.
    #[inline]
    pub(super) fn next_sequence(&self) -> Sequence {
        self.state.last_sequence().after(1 + self.fresh.events.len() as u64)
    }
}

/// Applies one event at `sequence`, with its metrics, listeners and
/// observers.
#[inline]
fn apply_accepted(shared: &Shared, state: &mut QueueState, sequence: Sequence, event: Event) {
    let metrics = &shared.metrics;
    match &event.kind {
        EventKind::Expired { .. } => metrics.expired.increment(1),
        EventKind::DeadLettered { .. } => metrics.dead_lettered.increment(1),
        EventKind::BackpressureChanged { signal } => {
            metrics.backpressure_transitions.increment(1);
            for listener in &shared.listeners {
                listener.on_signal(signal);
            }
        }
        _ => {}
    }
    if !shared.observers.is_empty() {
        return apply_observed(shared, state, sequence, event);
    }
    if let Err(error) = state.apply(sequence, event) {
        failed_to_apply(shared, &error);
    }
}

/// [`apply_accepted`] when someone observes leases: the lease an event ends
/// or renews is looked up before it is applied.
#[cold]
fn apply_observed(shared: &Shared, state: &mut QueueState, sequence: Sequence, event: Event) {
    let item_id = match &event.kind {
        EventKind::Heartbeat { item_id, .. }
        | EventKind::Completed { item_id, .. }
        | EventKind::Failed { item_id, .. }
        | EventKind::Requeued { item_id, reason: RequeueReason::HandedBack, .. } => Some(*item_id),
        _ => None,
    };
    let ended = item_id
        .and_then(|id| state.item(id))
        .and_then(|item| item.lease.as_ref())
        .map(|lease| (lease.owner.clone(), event.recorded_at.saturating_duration_since(lease.leased_at)));
    let kind = event.kind.clone();
    if let Err(error) = state.apply(sequence, event) {
        failed_to_apply(shared, &error);
    }
    notify_observers(&shared.observers, &kind, ended);
}

/// The events were decided against this very state, so an event that does
/// not apply is a bug; the log is the truth and a rebuild repairs the state.
#[cold]
fn failed_to_apply(shared: &Shared, error: &ApplyError) {
    tracing::error!(shard = %shared.config.shard, error = %error, "a decided event did not apply");
    debug_assert!(false, "a decided event did not apply: {error}");
}

fn notify_observers(
    observers: &[Arc<dyn LeaseObserver>],
    kind: &EventKind,
    ended: Option<(PeerId, std::time::Duration)>,
) {
    for observer in observers {
        match (kind, &ended) {
            (EventKind::Leased { owner, .. }, _) => observer.lease_granted(owner),
            (EventKind::Expired { owner, .. }, _) => observer.lease_expired(owner),
            (EventKind::Heartbeat { .. }, Some((owner, _))) => observer.heartbeat(owner),
            (EventKind::Completed { .. }, Some((owner, turnaround))) => observer.lease_completed(owner, *turnaround),
            (EventKind::Failed { .. }, Some((owner, _))) => observer.lease_failed(owner),
            (EventKind::Requeued { .. }, Some((owner, _))) => observer.lease_released(owner),
            _ => {}
        }
    }
}
