//! The lease queue: a deterministic state machine behind every
//! `resourcelease` procedure.
//!
//! A [`Queue`] validates each command against its [`QueueState`], turns it
//! into [`Event`]s and hands them to its [`Replicator`]. Commands are decided
//! in order under one short lock against the state that includes events
//! still on their way to the log, so a queue never waits one log round trip
//! per command; each caller is answered once the events it depends on are
//! durable. A batch the log refuses or loses fences the shard until it is
//! rebuilt from the log ([`Queue::recover`]). `commit.rs` is that path.
//! Long-polling `lease` calls wait outside the lock and are woken when the
//! state changes.
//!
//! Time comes from an injected [`Clock`] and is recorded in each event, so a
//! queue rebuilt from its log ([`QueueState::replay`], or a snapshot from
//! [`QueueState::encode`] plus the tail, see [`recover`]) is exactly the
//! live one.

mod caller;
mod commit;
mod config;
mod error;
mod observer;
#[cfg(test)]
mod proptests;
mod recovery;
mod state;
mod sweeper;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;

pub use crate::event::{Event, EventKind, NewItem, Origin, RequeueReason, SequencedEvent};
pub use crate::item::{
    AttemptOutcome, AttemptRecord, DeadLetter, DeadLetterReason, DrainMode, DrainSnapshot, Lease, LeaseHandle, Payload,
    WorkItem,
};
pub use caller::{Caller, SYSTEM_PRINCIPAL};
pub use commit::{Fence, FenceReason, ShardStatus};
pub use config::QueueConfig;
pub use error::{QueueError, Result};
pub use observer::LeaseObserver;
pub use recovery::{Rebuilt, ReplayProgress, Until, catch_up, recover, replay};
pub(crate) use state::Completion;
pub use state::{ApplyError, QueueState};
pub use sweeper::Sweeper;

use commit::{Core, Shared, Ticket};
use config::QueueClock;

use crate::backpressure::{BackpressureListener, BackpressureSignal};
use crate::clock::{Clock, Timestamp, TokioClock};
use crate::defaults;
use crate::ids::{Epoch, FencingToken, ItemId, LeaseId, PeerId, Sequence, ShardId};
use crate::replication::Replicator;

/// What to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnqueueRequest {
    /// The work.
    pub payload: Payload,
    /// Higher leases first.
    pub priority: i32,
    /// Earliest lease, relative to now.
    pub delay: Duration,
}

impl EnqueueRequest {
    /// An immediate, priority-0 request.
    pub fn new(payload: Payload) -> Self {
        Self { payload, priority: 0, delay: Duration::ZERO }
    }
}

/// The answer to an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The new item, or the one the `request_id` created earlier.
    pub item_id: ItemId,
    /// True when the `request_id` matched and nothing was written.
    pub deduplicated: bool,
    /// Sequence of the `Enqueued` event (zero when deduplicated).
    pub sequence: Sequence,
}

/// What to lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    /// The peer that will own the lease.
    pub owner: PeerId,
    /// How long to wait for an eligible item (clamped to
    /// [`LEASE_WAIT_MAX`](defaults::LEASE_WAIT_MAX)).
    pub wait: Duration,
    /// Lease duration; `None` uses the queue default. Clamped.
    pub lease_duration: Option<Duration>,
}

impl LeaseRequest {
    /// A request that returns at once, with the default lease duration.
    pub fn new(owner: impl Into<PeerId>) -> Self {
        Self { owner: owner.into(), wait: Duration::ZERO, lease_duration: None }
    }

    /// Waits up to `wait` for an item.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

/// A granted lease: the handle to present back, and the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedItem {
    /// Proof of ownership.
    pub handle: LeaseHandle,
    /// The item, with its lease.
    pub item: WorkItem,
}

/// What `fail` should do with the item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailAction {
    /// Requeue, or dead-letter once `max_attempts` is reached.
    #[default]
    Requeue,
    /// Dead-letter now.
    DeadLetter,
}

/// A failure report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FailRequest {
    /// What went wrong (recorded in the attempt history).
    pub error: String,
    /// Requeue or dead-letter.
    pub action: FailAction,
    /// Fixed requeue delay; `None` means exponential backoff.
    pub requeue_delay: Option<Duration>,
}

/// Where a failed item went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Back to pending, eligible again at `not_before`.
    Requeued {
        /// When it becomes eligible.
        not_before: Timestamp,
    },
    /// To the dead-letter list.
    DeadLettered {
        /// Why.
        reason: DeadLetterReason,
    },
}

/// Which dead letters to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// Every dead letter.
    All,
    /// These (unknown ids are ignored).
    Items(Vec<ItemId>),
}

/// One page of dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPage {
    /// Dead letters, oldest first.
    pub dead_letters: Vec<DeadLetter>,
    /// Token of the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// What a restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Items added.
    pub restored: u32,
    /// Items skipped as already present.
    pub skipped: u32,
}

/// Queue depth and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// Items waiting (including delayed ones).
    pub pending: u64,
    /// Items leased.
    pub active: u64,
    /// Items in the dead-letter list.
    pub dead_letters: u64,
    /// True while a drain stops new leases.
    pub draining: bool,
    /// Most items the queue holds.
    pub capacity: u64,
    /// Current backpressure state.
    pub backpressure: BackpressureSignal,
    /// Sequence of the last applied event.
    pub last_sequence: Sequence,
}

/// What a rebuild from the log did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// The sequence the queue serves from (the log's head when read).
    pub sequence: Sequence,
    /// The snapshot it started from (zero: from the first event).
    pub snapshot: Sequence,
    /// Events replayed after the snapshot.
    pub replayed: u64,
    /// The epoch it serves under.
    pub epoch: Epoch,
}

/// Builds a [`Queue`].
pub struct QueueBuilder {
    config: QueueConfig,
    replicator: Arc<dyn Replicator>,
    clock: QueueClock,
    listeners: Vec<Arc<dyn BackpressureListener>>,
    observers: Vec<Arc<dyn LeaseObserver>>,
    state: Option<QueueState>,
    epoch: Epoch,
    recovering: bool,
}

impl QueueBuilder {
    /// Tells `observer` about every lease grant, heartbeat and ending.
    pub fn observer(mut self, observer: Arc<dyn LeaseObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    /// Reads time from `clock` instead of [`TokioClock`].
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = QueueClock::new(clock);
        self
    }

    /// Calls `listener` on every backpressure transition (and with the
    /// rebuilt state's signal after every rebuild).
    pub fn listener(mut self, listener: Arc<dyn BackpressureListener>) -> Self {
        self.listeners.push(listener);
        self
    }

    /// Starts from a rebuilt state (replayed from the log, or decoded from a
    /// snapshot) instead of an empty queue.
    pub fn state(mut self, state: QueueState) -> Self {
        self.state = Some(state);
        self
    }

    /// Writes batches under `epoch`, a lease on the shard the caller took
    /// from the log ([`Replicator::acquire_shard`]). Without it, batches
    /// carry [`Epoch::ZERO`], which only a log whose shard was never leased
    /// accepts (tests, examples).
    pub fn epoch(mut self, epoch: Epoch) -> Self {
        self.epoch = epoch;
        self
    }

    /// Builds the queue fenced ([`FenceReason::Recovering`]): it refuses
    /// every command with UNAVAILABLE until [`Queue::recover`] rebuilt it
    /// from its log. What a node does for every shard it starts to serve.
    pub fn recovering(mut self) -> Self {
        self.recovering = true;
        self
    }

    /// Builds the queue after checking the configuration.
    pub fn build(self) -> Result<Queue> {
        self.config.validate()?;
        let state = self.state.unwrap_or_else(|| QueueState::new(self.config.shard.clone()));
        if state.shard() != &self.config.shard {
            return Err(QueueError::invalid("state", format!("belongs to shard {}", state.shard())));
        }
        let fence =
            self.recovering.then(|| Fence::new(FenceReason::Recovering, "not rebuilt from the shard's log yet"));
        let shared = Shared::new(
            self.config,
            self.replicator,
            self.clock,
            self.listeners,
            self.observers,
            state,
            self.epoch,
            fence,
        );
        Ok(Queue { shared: Arc::new(shared) })
    }
}

/// A lease queue (one shard). Cheap to clone: clones share the queue.
///
/// ```
/// use omnirelay_client::queue::{Caller, EnqueueRequest, LeaseRequest, Payload, Queue, QueueConfig};
/// use omnirelay_client::replication::InMemoryReplicator;
/// use std::sync::Arc;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let queue = Queue::builder(QueueConfig::new("resourcelease.users", "node-a"), Arc::new(InMemoryReplicator::new()))
///     .build()?;
/// let producer = Caller::new("spiffe://example/producer", "node-a");
/// let worker = Caller::new("spiffe://example/worker", "worker-1");
///
/// queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", "42", "rebuild"))).await?;
/// let leased = queue.lease(&worker, LeaseRequest::new("worker-1")).await?.expect("an item is pending");
/// assert_eq!(leased.item.payload.resource_id, "42");
/// queue.complete(&worker, &leased.handle).await?;
/// assert_eq!(queue.stats().await?.pending, 0);
/// # Ok::<(), omnirelay_client::queue::QueueError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("shard", &self.shared.config.shard).finish_non_exhaustive()
    }
}

/// Counts a waiter on `changed` for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a command adds work to the queue: such a command is refused
/// (RESOURCE_EXHAUSTED) when the replication backlog is full; others wait
/// for room.
#[derive(Clone, Copy)]
enum Work {
    Adds,
    Drains,
}

impl Queue {
    /// Starts building a queue publishing to `replicator`.
    pub fn builder(config: QueueConfig, replicator: Arc<dyn Replicator>) -> QueueBuilder {
        QueueBuilder {
            config,
            replicator,
            clock: QueueClock::Tokio(TokioClock::new()),
            listeners: Vec::new(),
            observers: Vec::new(),
            state: None,
            epoch: Epoch::ZERO,
            recovering: false,
        }
    }

    /// The queue's configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.shared.config
    }

    /// The queue's shard.
    pub fn shard(&self) -> &ShardId {
        &self.shared.config.shard
    }

    /// Runs one command: decides it against the state under the lock (the
    /// decision may commit intermediate batches itself), commits what it
    /// decided, and answers once everything it saw or wrote is durable. A
    /// refusal waits the same way (it was decided against that state), and
    /// a shard that fences meanwhile turns any answer into UNAVAILABLE.
    #[inline]
    async fn run<T>(&self, work: Work, decide: impl FnOnce(&Arc<Shared>, &mut Core) -> Result<T>) -> Result<T> {
        let shared = &self.shared;
        let adds = matches!(work, Work::Adds);
        let (outcome, ticket) = {
            let mut core = loop {
                if let Some(core) = shared.try_command(adds)? {
                    break core;
                }
                shared.wait_for_room().await;
            };
            match decide(shared, &mut core) {
                Ok(value) => {
                    let ticket = shared.commit(&mut core);
                    (Ok(value), ticket)
                }
                Err(error) => (Err(error), core.tail_ticket()),
            }
        };
        if !ticket.is_done() {
            ticket.wait(&shared.config.shard).await?;
        }
        outcome
    }

    /// Reads the state, answering once what it read is durable.
    async fn read<T>(&self, read: impl FnOnce(&Shared, &mut Core) -> Result<T>) -> Result<T> {
        let shared = &self.shared;
        let (outcome, ticket) = {
            let mut core = shared.core();
            if let Some(fence) = core.fence() {
                return Err(commit::fenced(&shared.config.shard, fence));
            }
            (read(shared, &mut core), core.tail_ticket())
        };
        if !ticket.is_done() {
            ticket.wait(&shared.config.shard).await?;
        }
        outcome
    }

    /// Adds an item. A repeated `request_id` returns the item it created and
    /// writes nothing. Fails fast with RESOURCE_EXHAUSTED at capacity, under
    /// backpressure, or when the replication backlog is full; never waits
    /// for room.
    pub async fn enqueue(&self, caller: &Caller, request: EnqueueRequest) -> Result<Enqueued> {
        validate::payload("payload", &request.payload)?;
        validate::delay("delay", request.delay, defaults::ENQUEUE_DELAY_MAX)?;
        self.run(Work::Adds, |shared, core| {
            if !request.payload.request_id.is_empty()
                && let Some(item_id) = core.state.request(&request.payload.request_id)
            {
                return Ok(Enqueued { item_id, deduplicated: true, sequence: Sequence::ZERO });
            }
            let now = core.now(&shared.clock);
            let (pending, active) = (core.state.pending(), core.state.active());
            if pending + active >= shared.config.capacity {
                return Err(QueueError::AtCapacity {
                    capacity: shared.config.capacity,
                    signal: shared.signal(core, now),
                });
            }
            if core.state.backpressure().active || pending >= shared.config.high_watermark {
                return Err(QueueError::Backpressure { signal: shared.signal(core, now) });
            }
            let item_id = core.next_item_id();
            let origin = core.origin(&shared.config.shard, caller);
            let sequence = core.next_sequence();
            let new = NewItem {
                id: item_id,
                payload: Arc::new(request.payload),
                priority: request.priority,
                enqueued_at: now,
                not_before: now.saturating_add(request.delay),
            };
            core.push(&origin, now, EventKind::Enqueued(new));
            shared.push_backpressure(core, &origin, now, pending + 1);
            Ok(Enqueued { item_id, deduplicated: false, sequence })
        })
        .await
    }

    /// Leases the oldest eligible item (highest priority first, then queue
    /// order; delayed items and items whose resource is leased are skipped),
    /// waiting up to `request.wait` for one. `Ok(None)` when none became
    /// eligible in time.
    pub async fn lease(&self, caller: &Caller, request: LeaseRequest) -> Result<Option<LeasedItem>> {
        if validate::is_blank(request.owner.as_str()) {
            return Err(QueueError::invalid("owner", "is required and must not be blank"));
        }
        let wait = request.wait.min(defaults::LEASE_WAIT_MAX);
        if !wait.is_zero() {
            return self.lease_waiting(caller, &request, wait).await;
        }
        // A call that does not wait: one attempt, nothing to arm, and no
        // clock reads for the wait metric.
        match self.lease_once(caller, &request).await? {
            Ok(leased) => {
                self.shared.metrics.lease_wait.record(0.0);
                Ok(Some(leased))
            }
            Err(_) => Ok(None),
        }
    }

    /// [`lease`](Self::lease) for a call that waits up to `wait`.
    async fn lease_waiting(
        &self,
        caller: &Caller,
        request: &LeaseRequest,
        wait: Duration,
    ) -> Result<Option<LeasedItem>> {
        let shared = &*self.shared;
        let started = tokio::time::Instant::now();
        let deadline = started + wait;
        let _waiting = Waiting::new(&shared.waiting);
        loop {
            // Created before looking at the state: a change applied after we
            // looked wakes this future even though it is polled later.
            let changed = shared.changed.notified();
            let sleep_for = match self.lease_once(caller, request).await? {
                Ok(leased) => {
                    shared.metrics.lease_wait.record(started.elapsed().as_secs_f64());
                    return Ok(Some(leased));
                }
                Err(sleep_for) => sleep_for,
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let until = sleep_for.map_or(deadline, |d| (now + d).min(deadline));
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// One lease attempt: expires lapsed leases (one batch, so their items
    /// and resources are free for this lease), then grants the next eligible
    /// item. `Err(after)` when none is eligible: how long until a delayed
    /// item becomes eligible (`None`: until something changes).
    async fn lease_once(
        &self,
        caller: &Caller,
        request: &LeaseRequest,
    ) -> Result<std::result::Result<LeasedItem, Option<Duration>>> {
        self.run(Work::Drains, |shared, core| {
            let now = core.now(&shared.clock);
            if core.state.has_due_expiry(now) {
                plan_expiries(shared, core, now);
                if let Ticket::Fenced(fence) = shared.commit(core) {
                    return Err(commit::fenced(&shared.config.shard, &fence));
                }
            }
            if core.state.draining().is_some() {
                return Err(QueueError::Draining { shard: shared.config.shard.clone() });
            }
            let Some((item_id, attempt)) = core.state.next_eligible(now) else {
                return Ok(Err(core.state.next_not_before().map(|at| at.saturating_duration_since(now))));
            };
            plan_lease(shared, core, caller, request, item_id, attempt + 1, now);
            if let Ticket::Fenced(fence) = shared.commit(core) {
                return Err(commit::fenced(&shared.config.shard, &fence));
            }
            let item = core.state.item(item_id).expect("the lease was just applied");
            Ok(Ok(LeasedItem { handle: item.handle().expect("the item was just leased"), item: item.clone() }))
        })
        .await
    }

    /// Extends a lease by `extend_by` from now (`None`: the default lease
    /// duration), recording `progress` in the event. Returns the new expiry.
    pub async fn heartbeat(
        &self,
        caller: &Caller,
        handle: &LeaseHandle,
        extend_by: Option<Duration>,
        progress: BTreeMap<String, String>,
    ) -> Result<Timestamp> {
        validate::progress(&progress)?;
        self.run(Work::Drains, |shared, core| {
            let now = core.now(&shared.clock);
            check_handle(&core.state, handle, now)?;
            let expires_at = now.saturating_add(shared.config.lease_duration(extend_by));
            let origin = core.origin(&shared.config.shard, caller);
            let kind = EventKind::Heartbeat {
                item_id: handle.item_id,
                fencing_token: handle.fencing_token,
                expires_at,
                progress,
            };
            core.push(&origin, now, kind);
            Ok(expires_at)
        })
        .await
    }

    /// Completes a leased item and removes it. Repeating it with the same
    /// handle answers `Ok(true)` ("already completed") and writes nothing.
    pub async fn complete(&self, caller: &Caller, handle: &LeaseHandle) -> Result<bool> {
        self.run(Work::Drains, |shared, core| {
            let now = core.now(&shared.clock);
            if let Err(error) = check_handle(&core.state, handle, now) {
                // Completing again with the handle that completed it.
                if core.state.item(handle.item_id).is_none()
                    && core.state.completed_token(handle.item_id) == Some(handle.fencing_token)
                {
                    return Ok(true);
                }
                return Err(error);
            }
            let origin = core.origin(&shared.config.shard, caller);
            let kind = EventKind::Completed { item_id: handle.item_id, fencing_token: handle.fencing_token };
            core.push(&origin, now, kind);
            Ok(false)
        })
        .await
    }

    /// Reports a failed attempt: the item is requeued (after the requested
    /// delay, or exponential backoff), or dead-lettered when asked or when
    /// this was its last allowed attempt.
    pub async fn fail(&self, caller: &Caller, handle: &LeaseHandle, request: FailRequest) -> Result<FailOutcome> {
        validate::error_text(&request.error)?;
        if let Some(delay) = request.requeue_delay {
            validate::delay("requeue_delay", delay, defaults::REQUEUE_DELAY_MAX)?;
        }
        self.run(Work::Drains, |shared, core| {
            let config = &shared.config;
            let now = core.now(&shared.clock);
            let attempt = check_handle(&core.state, handle, now)?.attempt;
            let origin = core.origin(&config.shard, caller);
            let item_id = handle.item_id;
            let failed = EventKind::Failed { item_id, fencing_token: handle.fencing_token, error: request.error };
            core.push(&origin, now, failed);
            let outcome = if request.action == FailAction::DeadLetter {
                FailOutcome::DeadLettered { reason: DeadLetterReason::Requested }
            } else if attempt >= config.max_attempts {
                FailOutcome::DeadLettered { reason: DeadLetterReason::MaxAttempts }
            } else {
                let delay = request
                    .requeue_delay
                    .unwrap_or_else(|| state::backoff(item_id, attempt, config.backoff_base, config.backoff_max));
                FailOutcome::Requeued { not_before: now.saturating_add(delay) }
            };
            match outcome {
                FailOutcome::Requeued { not_before } => {
                    core.push(&origin, now, EventKind::Requeued { item_id, not_before, reason: RequeueReason::Failed });
                    let pending_after = core.state.pending() + 1;
                    shared.push_backpressure(core, &origin, now, pending_after);
                }
                FailOutcome::DeadLettered { reason } => {
                    core.push(&origin, now, EventKind::DeadLettered { item_id, reason });
                }
            }
            Ok(outcome)
        })
        .await
    }

    /// Expires every lease that lapsed by now (what the [`Sweeper`] calls):
    /// each gets an `Expired` event and is requeued, or dead-lettered if it
    /// was its last attempt. Returns how many leases expired.
    pub async fn expire_due(&self) -> Result<usize> {
        let mut expired = 0;
        let mut now = None;
        loop {
            let batch = self
                .run(Work::Drains, |shared, core| {
                    let now = *now.get_or_insert_with(|| core.now(&shared.clock));
                    if !core.state.has_due_expiry(now) {
                        return Ok(0);
                    }
                    Ok(plan_expiries(shared, core, now))
                })
                .await?;
            if batch == 0 {
                return Ok(expired);
            }
            expired += batch;
        }
    }

    /// Stops granting leases and returns a snapshot of the pending items.
    ///
    /// With [`DrainMode::Wait`] the drain waits up to `wait` (clamped to
    /// [`DRAIN_WAIT_MAX`](defaults::DRAIN_WAIT_MAX)) for leases in flight to
    /// end; leases still running then are listed in `in_flight`. With
    /// [`DrainMode::HandBack`] leases are handed back at once and their items
    /// are pending (and in the snapshot). Non-destructive: the queue keeps
    /// every item until [`resume`](Self::resume), or until the items that
    /// were restored elsewhere are dropped here
    /// ([`purge_drained`](Self::purge_drained)).
    pub async fn drain(&self, caller: &Caller, mode: DrainMode, wait: Option<Duration>) -> Result<DrainSnapshot> {
        let shared = &*self.shared;
        let waiting = Waiting::new(&shared.waiting);
        self.run(Work::Drains, |shared, core| {
            let now = core.now(&shared.clock);
            let origin = core.origin(&shared.config.shard, caller);
            if core.state.draining() != Some(mode) {
                core.push(&origin, now, EventKind::DrainStarted { mode });
            }
            if mode == DrainMode::HandBack {
                let leased: Vec<ItemId> = core.state.leased_items().iter().map(|item| item.id).collect();
                for &item_id in &leased {
                    core.push(
                        &origin,
                        now,
                        EventKind::Requeued { item_id, not_before: now, reason: RequeueReason::HandedBack },
                    );
                }
                let pending_after = core.state.pending() + leased.len() as u64;
                shared.push_backpressure(core, &origin, now, pending_after);
            }
            Ok(())
        })
        .await?;
        if mode == DrainMode::Wait {
            let deadline =
                tokio::time::Instant::now() + wait.unwrap_or(defaults::DRAIN_WAIT).min(defaults::DRAIN_WAIT_MAX);
            loop {
                let changed = shared.changed.notified();
                let active = self.read(|_, core| Ok(core.state.active())).await?;
                if active == 0 {
                    break;
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    break;
                }
            }
        }
        drop(waiting);
        self.run(Work::Drains, |shared, core| {
            let now = core.now(&shared.clock);
            let origin = core.origin(&shared.config.shard, caller);
            let items: Vec<WorkItem> = core.state.pending_items().into_iter().cloned().collect();
            let in_flight: Vec<WorkItem> = core.state.leased_items().into_iter().cloned().collect();
            let sequence = core.next_sequence();
            let kind = EventKind::Drained {
                pending: u32::try_from(items.len()).unwrap_or(u32::MAX),
                in_flight: u32::try_from(in_flight.len()).unwrap_or(u32::MAX),
            };
            core.push(&origin, now, kind);
            Ok(DrainSnapshot { shard: shared.config.shard.clone(), sequence, taken_at: now, items, in_flight })
        })
        .await
    }

    /// Grants leases again after a drain. `Ok(false)` if it was not draining.
    pub async fn resume(&self, caller: &Caller) -> Result<bool> {
        self.run(Work::Drains, |shared, core| {
            if core.state.draining().is_none() {
                return Ok(false);
            }
            let now = core.now(&shared.clock);
            let origin = core.origin(&shared.config.shard, caller);
            core.push(&origin, now, EventKind::Resumed);
            Ok(true)
        })
        .await
    }

    /// Loads a drain snapshot's pending items, keeping ids, attempts, errors,
    /// tokens and histories; items already present (same id, or same
    /// `request_id` as a remembered item) are skipped. All or nothing: at
    /// capacity nothing is restored. The items are written as one or more
    /// `Restored` events of one batch, each within the log's event limit.
    pub async fn restore(&self, caller: &Caller, snapshot: &DrainSnapshot) -> Result<Restored> {
        for (index, item) in snapshot.items.iter().enumerate() {
            let field = format!("snapshot.items[{index}]");
            validate::payload(&format!("{field}.payload"), &item.payload)?;
            validate::restored_item(&field, item)?;
        }
        self.run(Work::Adds, |shared, core| {
            let mut seen = std::collections::HashSet::new();
            let mut requests = std::collections::HashSet::new();
            let mut items = Vec::new();
            for item in &snapshot.items {
                let request_taken = !item.payload.request_id.is_empty()
                    && (core.state.request(&item.payload.request_id).is_some()
                        || !requests.insert(item.payload.request_id.as_str()));
                if core.state.contains(item.id) || !seen.insert(item.id) || request_taken {
                    continue;
                }
                let mut item = item.clone();
                item.lease = None;
                items.push(item);
            }
            let restored = items.len() as u64;
            let skipped = u32::try_from(snapshot.items.len() as u64 - restored).unwrap_or(u32::MAX);
            if items.is_empty() {
                return Ok(Restored { restored: 0, skipped });
            }
            let now = core.now(&shared.clock);
            let (pending, active) = (core.state.pending(), core.state.active());
            if pending + active + restored > shared.config.capacity {
                return Err(QueueError::AtCapacity {
                    capacity: shared.config.capacity,
                    signal: shared.signal(core, now),
                });
            }
            let origin = core.origin(&shared.config.shard, caller);
            let mut skipped_left = skipped;
            for chunk in validate::restore_chunks(items) {
                core.push(
                    &origin,
                    now,
                    EventKind::Restored { items: chunk, skipped: std::mem::take(&mut skipped_left) },
                );
            }
            shared.push_backpressure(core, &origin, now, pending + restored);
            Ok(Restored { restored: u32::try_from(restored).unwrap_or(u32::MAX), skipped })
        })
        .await
    }

    /// Drops pending items a drain handed over, once they were restored
    /// elsewhere, so a later [`resume`](Self::resume) cannot serve them
    /// twice. Only while the queue is draining (FAILED_PRECONDITION
    /// otherwise); ids that are not pending here (leased, dead-lettered,
    /// unknown) are skipped and counted. Returns how many were dropped.
    pub async fn purge_drained(&self, caller: &Caller, item_ids: &[ItemId]) -> Result<PurgedDrained> {
        if item_ids.is_empty() {
            return Err(QueueError::invalid("item_ids", "must name at least one item"));
        }
        if item_ids.len() > defaults::PURGE_DRAINED_MAX {
            return Err(QueueError::invalid(
                "item_ids",
                format!("{} ids; at most {} per call", item_ids.len(), defaults::PURGE_DRAINED_MAX),
            ));
        }
        self.run(Work::Drains, |shared, core| {
            if core.state.draining().is_none() {
                return Err(QueueError::NotDraining { shard: shared.config.shard.clone() });
            }
            let mut seen = std::collections::HashSet::new();
            let purged: Vec<ItemId> = item_ids
                .iter()
                .copied()
                .filter(|id| core.state.item(*id).is_some_and(|item| item.lease.is_none()) && seen.insert(*id))
                .collect();
            let skipped = u32::try_from(item_ids.len() - purged.len()).unwrap_or(u32::MAX);
            if purged.is_empty() {
                return Ok(PurgedDrained { purged: 0, skipped });
            }
            let count = u32::try_from(purged.len()).unwrap_or(u32::MAX);
            let now = core.now(&shared.clock);
            let origin = core.origin(&shared.config.shard, caller);
            let pending_after = core.state.pending() - purged.len() as u64;
            core.push(&origin, now, EventKind::DrainedPurged { item_ids: purged });
            shared.push_backpressure(core, &origin, now, pending_after);
            Ok(PurgedDrained { purged: count, skipped })
        })
        .await
    }

    /// Lists dead letters, oldest first, one page at a time.
    pub async fn dead_letters(&self, page_size: u32, page_token: Option<&str>) -> Result<DeadLetterPage> {
        let after = match page_token.filter(|token| !token.is_empty()) {
            None => None,
            Some(token) => Some(
                token
                    .parse::<u64>()
                    .map_err(|_| QueueError::invalid("page_token", "is not a token this queue issued"))?,
            ),
        };
        let size = match page_size {
            0 => defaults::DEAD_LETTER_PAGE_SIZE,
            n => n.min(defaults::DEAD_LETTER_PAGE_MAX),
        } as usize;
        self.read(|_, core| {
            let mut page = core.state.dead_letters_page(after, size + 1);
            let next_page_token = (page.len() > size).then(|| {
                page.truncate(size);
                page.last().map(|(order, _)| order.to_string()).unwrap_or_default()
            });
            Ok(DeadLetterPage {
                dead_letters: page.into_iter().map(|(_, letter)| letter.clone()).collect(),
                next_page_token,
            })
        })
        .await
    }

    /// One dead letter with its whole history.
    pub async fn dead_letter(&self, item_id: ItemId) -> Result<DeadLetter> {
        self.read(|_, core| {
            core.state.dead_letter(item_id).cloned().ok_or(QueueError::NotFound { what: "dead letter", item_id })
        })
        .await
    }

    /// Re-enqueues a dead letter as a pending item (same id and history,
    /// attempt count reset), at the back of the queue.
    pub async fn redrive(&self, caller: &Caller, item_id: ItemId) -> Result<ItemId> {
        self.run(Work::Adds, |shared, core| {
            if core.state.dead_letter(item_id).is_none() {
                return Err(QueueError::NotFound { what: "dead letter", item_id });
            }
            let now = core.now(&shared.clock);
            let (pending, active) = (core.state.pending(), core.state.active());
            if pending + active >= shared.config.capacity {
                return Err(QueueError::AtCapacity {
                    capacity: shared.config.capacity,
                    signal: shared.signal(core, now),
                });
            }
            let origin = core.origin(&shared.config.shard, caller);
            core.push(&origin, now, EventKind::Redriven { item_id, not_before: now });
            shared.push_backpressure(core, &origin, now, pending + 1);
            Ok(item_id)
        })
        .await
    }

    /// Deletes dead letters for good. Returns how many were deleted.
    pub async fn purge_dead_letters(&self, caller: &Caller, which: Purge) -> Result<u32> {
        if which == Purge::Items(Vec::new()) {
            return Err(QueueError::invalid("item_ids", "must name at least one item unless purging all"));
        }
        self.run(Work::Drains, |shared, core| {
            let item_ids: Vec<ItemId> = match which {
                Purge::All => {
                    core.state.dead_letters_page(None, usize::MAX).into_iter().map(|(_, l)| l.item.id).collect()
                }
                Purge::Items(ids) => {
                    let mut seen = std::collections::HashSet::new();
                    ids.into_iter().filter(|id| core.state.dead_letter(*id).is_some() && seen.insert(*id)).collect()
                }
            };
            if item_ids.is_empty() {
                return Ok(0);
            }
            let purged = u32::try_from(item_ids.len()).unwrap_or(u32::MAX);
            let now = core.now(&shared.clock);
            let origin = core.origin(&shared.config.shard, caller);
            core.push(&origin, now, EventKind::DeadLettersPurged { item_ids });
            Ok(purged)
        })
        .await
    }

    /// Depth, leases, dead letters and the backpressure state, once durable.
    pub async fn stats(&self) -> Result<QueueStats> {
        self.read(|shared, core| {
            let now = core.now(&shared.clock);
            Ok(QueueStats {
                pending: core.state.pending(),
                active: core.state.active(),
                dead_letters: core.state.dead_letters(),
                draining: core.state.draining().is_some(),
                capacity: shared.config.capacity,
                backpressure: shared.signal(core, now),
                last_sequence: core.state.last_sequence(),
            })
        })
        .await
    }

    /// [`stats`](Self::stats) as decided, without waiting for durability
    /// (and from a fenced shard's last state): for diagnostics that must
    /// answer while the log is unreachable.
    pub fn stats_now(&self) -> QueueStats {
        let shared = &self.shared;
        let mut core = shared.core();
        let now = core.now(&shared.clock);
        QueueStats {
            pending: core.state.pending(),
            active: core.state.active(),
            dead_letters: core.state.dead_letters(),
            draining: core.state.draining().is_some(),
            capacity: shared.config.capacity,
            backpressure: shared.signal(&core, now),
            last_sequence: core.state.last_sequence(),
        }
    }

    /// Runs `f` on the current state, as decided: it may include events not
    /// yet durable (use [`settled`](Self::settled) first to wait for them),
    /// and after a fence it is the state being thrown away. For inspection,
    /// snapshots and tests.
    pub async fn inspect<R>(&self, f: impl FnOnce(&QueueState) -> R) -> R {
        f(&self.shared.core().state)
    }

    /// Waits until every event decided so far is durable (or the shard
    /// fenced itself: UNAVAILABLE).
    pub async fn settled(&self) -> Result<()> {
        self.read(|_, _| Ok(())).await
    }

    /// The current state in its canonical encoding: what a snapshot stores,
    /// and what replaying the log must reproduce byte for byte.
    pub async fn encode_state(&self) -> Vec<u8> {
        self.inspect(QueueState::encode).await
    }

    /// The earliest lease expiry, for sweepers that sleep until it.
    pub async fn next_expiry(&self) -> Option<Timestamp> {
        self.shared.core().state.next_expiry()
    }

    /// Whether the queue serves its shard, as a watch that changes at every
    /// fence and rebuild (a node's shard owner waits on it).
    pub fn status(&self) -> tokio::sync::watch::Receiver<ShardStatus> {
        self.shared.status()
    }

    /// The replication pipeline's state, for diagnostics.
    pub fn replication(&self) -> ReplicationState {
        let (epoch, durable, snapshot) = self.shared.positions();
        let core = self.shared.core();
        ReplicationState { epoch, decided: core.state.last_sequence(), durable, snapshot, fence: core.fence().cloned() }
    }

    /// Fences the shard (see [`Fence`]): commands waiting on events not yet
    /// durable get UNAVAILABLE, new commands too, until
    /// [`recover`](Self::recover). A node calls it when it loses the
    /// shard's lease. Idempotent.
    pub fn fence(&self, fence: Fence) {
        let mut core = self.shared.core();
        let _ = self.shared.fence(&mut core, fence);
    }

    /// Rebuilds the queue from its log (the newest snapshot, then every
    /// event after it, checking each chain link) and serves it under
    /// `epoch` with a new producer incarnation. Call it after taking the
    /// shard's lease with a new epoch (which fences out any batch of the
    /// previous incarnation still on its way); leases granted before keep
    /// their fencing tokens. The queue is fenced while it rebuilds.
    pub async fn recover(&self, epoch: Epoch) -> Result<Recovered> {
        self.recover_from(epoch, None).await
    }

    /// [`recover`](Self::recover), starting from `warm`: a copy of the
    /// shard's state that a standby follower kept up to date from the same
    /// log (see [`catch_up`]), so only the events after it are replayed.
    /// Falls back to a full rebuild when the copy cannot be caught up (its
    /// tail was trimmed, or it does not hold together).
    pub async fn recover_from(&self, epoch: Epoch, warm: Option<Rebuilt>) -> Result<Recovered> {
        let shared = &self.shared;
        self.fence(Fence::new(FenceReason::Recovering, "rebuilding from the shard's log"));
        let started = tokio::time::Instant::now();
        let shard = &shared.config.shard;
        let caught_up = match warm {
            Some(mut warm) if warm.state.shard() == shard => {
                warm.replayed = 0;
                match catch_up(&*shared.replicator, shard, &mut warm).await {
                    Ok(_) => Some(warm),
                    Err(error) => {
                        tracing::warn!(shard = %shard, error = %error, "the standby copy could not be caught up; rebuilding from the snapshot");
                        None
                    }
                }
            }
            _ => None,
        };
        let rebuilt = match caught_up {
            Some(rebuilt) => rebuilt,
            None => recover(&*shared.replicator, shard).await.map_err(QueueError::Replication)?,
        };
        let recovered = Recovered {
            sequence: rebuilt.state.last_sequence(),
            snapshot: rebuilt.snapshot,
            replayed: rebuilt.replayed,
            epoch,
        };
        shared.install(rebuilt.state, epoch, rebuilt.snapshot);
        ::metrics::histogram!(crate::metrics::RECOVERY, crate::metrics::SHARD_LABEL => shared.config.shard.to_string())
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            shard = %shared.config.shard,
            epoch = %epoch,
            sequence = %recovered.sequence,
            snapshot = %recovered.snapshot,
            replayed = recovered.replayed,
            "shard rebuilt from its log"
        );
        Ok(recovered)
    }

    /// Events durable since the newest snapshot this incarnation knows of.
    pub fn events_since_snapshot(&self) -> u64 {
        let (_, durable, snapshot) = self.shared.positions();
        durable.get().saturating_sub(snapshot.get())
    }

    /// Writes a snapshot of the state to the log (once what it reflects is
    /// durable), so a rebuild replays only what follows it and retention can
    /// trim the events before it. `Ok(None)` when nothing changed since the
    /// last one, or when the state encodes larger than the log stores
    /// ([`MAX_SNAPSHOT_BYTES`](omnirelay_proto::limits::MAX_SNAPSHOT_BYTES);
    /// logged and counted, the log then keeps more events).
    pub async fn write_snapshot(&self) -> Result<Option<Sequence>> {
        let shared = &self.shared;
        let shard = &shared.config.shard;
        let outcome = |outcome: &'static str| {
            ::metrics::counter!(crate::metrics::SNAPSHOTS, crate::metrics::SHARD_LABEL => shard.to_string(), "outcome" => outcome)
                .increment(1);
        };
        let (sequence, epoch, data, ticket) = {
            let (epoch, _, snapshot_at) = shared.positions();
            let core = shared.core();
            if let Some(fence) = core.fence() {
                return Err(commit::fenced(shard, fence));
            }
            let sequence = core.state.last_sequence();
            if sequence <= snapshot_at {
                return Ok(None);
            }
            (sequence, epoch, Bytes::from(core.state.encode()), core.tail_ticket())
        };
        if data.len() > omnirelay_proto::limits::MAX_SNAPSHOT_BYTES {
            outcome("too_large");
            tracing::warn!(shard = %shard, bytes = data.len(), "queue state too large to snapshot; the log keeps its events");
            return Ok(None);
        }
        ticket.wait(shard).await?;
        if let Err(error) = shared.replicator.put_snapshot(shard, sequence, epoch, data).await {
            outcome("failed");
            return Err(QueueError::Replication(error));
        }
        shared.snapshot_written(epoch, sequence);
        outcome("written");
        Ok(Some(sequence))
    }
}

/// The state of a queue's replication, for diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationState {
    /// The epoch batches carry.
    pub epoch: Epoch,
    /// The last sequence decided (applied to the state).
    pub decided: Sequence,
    /// The last sequence known durable.
    pub durable: Sequence,
    /// The newest snapshot written to the log.
    pub snapshot: Sequence,
    /// Why the shard is fenced, if it is.
    pub fence: Option<Fence>,
}

/// What [`Queue::purge_drained`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgedDrained {
    /// Items dropped.
    pub purged: u32,
    /// Ids skipped: not pending here (leased, dead-lettered, unknown) or
    /// repeated.
    pub skipped: u32,
}

/// Plans the lease of `item_id` (the next eligible item) at `now`, as its
/// `attempt`.
#[inline]
fn plan_lease(
    shared: &Shared,
    core: &mut Core,
    caller: &Caller,
    request: &LeaseRequest,
    item_id: ItemId,
    attempt: u32,
    now: Timestamp,
) {
    let lease_id = LeaseId::from_u128(core.next_id());
    let expires_at = now.saturating_add(shared.config.lease_duration(request.lease_duration));
    let origin = core.origin(&shared.config.shard, caller);
    let kind = EventKind::Leased { item_id, attempt, lease_id, owner: request.owner.clone(), expires_at };
    core.push(&origin, now, kind);
    let pending_after = core.state.pending() - 1;
    shared.push_backpressure(core, &origin, now, pending_after);
}

/// Plans `Expired` events (and requeues or dead letters) for at most
/// [`SWEEP_BATCH_MAX`](defaults::SWEEP_BATCH_MAX) lapsed leases. Returns
/// how many.
fn plan_expiries(shared: &Shared, core: &mut Core, now: Timestamp) -> usize {
    let due = core.state.due_expiries(now, defaults::SWEEP_BATCH_MAX);
    let origin = Arc::clone(&shared.system);
    let mut requeued = 0;
    for &(item_id, fencing_token) in &due {
        let Some(item) = core.state.item(item_id) else { continue };
        let attempt = item.attempt;
        let owner = item.lease.as_ref().map(|lease| lease.owner.clone()).unwrap_or_else(|| PeerId::from(""));
        core.push(&origin, now, EventKind::Expired { item_id, fencing_token, owner });
        if attempt >= shared.config.max_attempts {
            core.push(&origin, now, EventKind::DeadLettered { item_id, reason: DeadLetterReason::MaxAttempts });
        } else {
            core.push(&origin, now, EventKind::Requeued { item_id, not_before: now, reason: RequeueReason::Expired });
            requeued += 1;
        }
    }
    let pending_after = core.state.pending() + requeued;
    shared.push_backpressure(core, &origin, now, pending_after);
    due.len()
}

/// Checks a handle against the item's current lease: a stale token, an
/// expired lease and a wrong owner each get their own error.
#[inline]
fn check_handle<'a>(state: &'a QueueState, handle: &LeaseHandle, now: Timestamp) -> Result<&'a WorkItem> {
    let item_id = handle.item_id;
    let presented = handle.fencing_token;
    let stale = |reason| QueueError::StaleToken { item_id, presented, reason };
    let Some(item) = state.item(item_id) else {
        if state.completed_token(item_id).is_some() {
            return Err(stale("the item was completed"));
        }
        if state.dead_letter(item_id).is_some() {
            return Err(stale("the item was dead-lettered"));
        }
        return Err(QueueError::NotFound { what: "item", item_id });
    };
    if presented != item.last_fencing_token || presented == FencingToken::NONE {
        return Err(stale("the item has a newer lease"));
    }
    let Some(lease) = &item.lease else {
        return match item.history.last() {
            Some(record) if record.outcome == AttemptOutcome::Expired && record.fencing_token == presented => {
                Err(QueueError::LeaseExpired { item_id, expired_at: record.ended_at })
            }
            _ => Err(stale("the lease already ended")),
        };
    };
    if lease.lease_id != handle.lease_id {
        return Err(QueueError::invalid("handle.lease_id", "does not match the lease of this fencing token"));
    }
    if lease.owner != handle.owner {
        return Err(QueueError::NotOwner { item_id, presented: handle.owner.clone() });
    }
    if now >= lease.expires_at {
        return Err(QueueError::LeaseExpired { item_id, expired_at: lease.expires_at });
    }
    Ok(item)
}
