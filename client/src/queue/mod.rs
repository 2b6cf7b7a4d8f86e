//! The lease queue: a deterministic state machine behind every
//! `resourcelease` procedure.
//!
//! A [`Queue`] validates each command against its [`QueueState`], turns it
//! into [`Event`]s, hands them to its [`Replicator`], and applies them only
//! once the replicator accepted them. Commands on one queue are linearized by
//! an async gate held from validation to the last applied event, so validate
//! -> publish -> apply is atomic with respect to other commands; long-polling
//! `lease` calls wait outside the gate and are woken when the state changes.
//!
//! Time comes from an injected [`Clock`] and is recorded in each event, so a
//! queue rebuilt from its log ([`QueueState::replay`], or a snapshot from
//! [`QueueState::encode`] plus the tail) is exactly the live one.

mod error;
mod event;
mod gate;
mod item;
#[cfg(test)]
mod proptests;
mod state;
mod sweeper;
mod table;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

pub use error::{QueueError, Result};
pub use event::{Event, EventKind, NewItem, Origin, RequeueReason, SequencedEvent};
pub use item::{
    AttemptOutcome, AttemptRecord, DeadLetter, DeadLetterReason, DrainMode, DrainSnapshot, Lease, LeaseHandle, Payload,
    WorkItem,
};
pub(crate) use state::Completion;
pub use state::{ApplyError, QueueState};
pub use sweeper::Sweeper;

use gate::{Gate, Permit};

use crate::backpressure::{BackpressureListener, BackpressureSignal};
use crate::clock::{Clock, Timestamp, TokioClock};
use crate::defaults;
use crate::ids::{FencingToken, ItemId, LeaseId, PeerId, Principal, ProducerId, Sequence, ShardId};
use crate::metrics::QueueMetrics;
use crate::replication::{Appended, Batch, PublishFuture, ReplicationError, Replicator};

/// Publishes a sealed batch ([`Command::seal`]) and settles it
/// ([`Command::land`]). `$held` is the state's lock, still held since the
/// batch was planned: a replicator that answers at once is handled under it
/// without building a future; otherwise it is released while the answer is
/// awaited. Evaluates to `(first sequence, read(state))`, or returns the
/// error from the enclosing function. A macro rather than an `async fn` so
/// the common case builds no nested future.
///
/// `$held` must be a binding that was only ever moved, never borrowed:
/// a guard that was borrowed stays in the future's state across the
/// `.await`, and a `MutexGuard` there would make every command's future
/// `!Send`. Commands therefore plan in a block with its own guard and move
/// it out with the sealed batch.
macro_rules! settle {
    ($command:expr, $held:ident, $flight:ident, $read:expr) => {{
        let (answer, mut core) = match $command.publish(&$flight) {
            Publishing::Now(appended) => (Ok(appended), $held),
            Publishing::Later(answer) => {
                drop($held);
                let answer = answer.await;
                (answer, $command.shared.core())
            }
        };
        $command.land(&mut core, $flight, answer, $read)?
    }};
}

/// Takes the shard gate: at once when it is free and nothing is in doubt,
/// otherwise through [`Queue::begin`]. Returns the error from the enclosing
/// function.
macro_rules! begin {
    ($queue:expr) => {
        match $queue.try_begin() {
            Some(command) => command,
            None => $queue.begin().await?,
        }
    };
}

/// One lease attempt under the gate: expires lapsed leases (one batch), then
/// grants the next eligible item into `$slot`. Evaluates to `Ok(())` when it
/// granted one, or to how long until a delayed item becomes eligible
/// (`None`: until something changes); returns errors from the enclosing
/// function.
macro_rules! lease_attempt {
    ($command:expr, $caller:expr, $request:expr, $started:expr, $slot:expr) => {{
        let command = $command;
        let shared = command.shared;
        let (now, expiries, held) = {
            let mut core = shared.core();
            let now = core.now(&shared.clock);
            // Lapsed leases first, so their items and resources are free for
            // this lease.
            let expiries = core.state.has_due_expiry(now).then(|| {
                command.plan_expiries(&mut core, now);
                command.seal(&mut core)
            });
            (now, expiries, core)
        };
        let held = match expiries {
            Some(flight) => {
                settle!(command, held, flight, |_| ());
                shared.core()
            }
            None => held,
        };
        let (grant, held) = {
            let mut core = held;
            if core.state.draining().is_some() {
                return Err(QueueError::Draining { shard: shared.config.shard.clone() });
            }
            match core.state.next_eligible(now) {
                Some((item_id, attempt)) => {
                    command.plan_lease(&mut core, $caller, $request, item_id, attempt + 1, now);
                    (Ok((item_id, command.seal(&mut core))), core)
                }
                None => (Err(core.state.next_not_before().map(|at| at.saturating_duration_since(now))), core),
            }
        };
        match grant {
            Ok((item_id, flight)) => {
                // Written straight into the caller's slot: a granted item is
                // a large value, and every move through the layers between
                // here and the caller would copy it.
                let slot: &mut Result<Option<LeasedItem>> = $slot;
                settle!(command, held, flight, |state| {
                    let item = state.item(item_id).expect("the lease was just applied");
                    *slot = Ok(Some(LeasedItem {
                        handle: item.handle().expect("the item was just leased"),
                        item: item.clone(),
                    }));
                });
                drop(command);
                let waited = $started.map_or(0.0, |started| started.elapsed().as_secs_f64());
                shared.metrics.lease_wait.record(waited);
                Ok(())
            }
            Err(sleep_for) => {
                drop(held);
                Err(sleep_for)
            }
        }
    }};
}

/// Settings of one queue. Every default is a named constant in
/// [`crate::defaults`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue's namespace, e.g. `resourcelease.users`.
    pub shard: ShardId,
    /// The peer hosting the queue (recorded in events the queue causes
    /// itself, such as expiries).
    pub node: PeerId,
    /// Most items held (pending + leased).
    pub capacity: u64,
    /// Pending depth at which backpressure turns on.
    pub high_watermark: u64,
    /// Pending depth at which backpressure turns off again.
    pub low_watermark: u64,
    /// Leases per item before a failure or expiry dead-letters it.
    pub max_attempts: u32,
    /// Lease duration when a worker does not ask for one.
    pub lease_duration: Duration,
    /// Longest lease (and heartbeat extension) granted.
    pub max_lease_duration: Duration,
    /// First delay of the exponential backoff after a failure.
    pub backoff_base: Duration,
    /// Longest backoff delay.
    pub backoff_max: Duration,
}

impl QueueConfig {
    /// The defaults for `shard`, hosted by `node`.
    pub fn new(shard: impl Into<ShardId>, node: impl Into<PeerId>) -> Self {
        Self {
            shard: shard.into(),
            node: node.into(),
            capacity: defaults::CAPACITY,
            high_watermark: defaults::HIGH_WATERMARK,
            low_watermark: defaults::LOW_WATERMARK,
            max_attempts: defaults::MAX_ATTEMPTS,
            lease_duration: defaults::LEASE_DURATION,
            max_lease_duration: defaults::LEASE_DURATION_MAX,
            backoff_base: defaults::BACKOFF_BASE,
            backoff_max: defaults::BACKOFF_MAX,
        }
    }

    /// Checks the settings against each other; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: &str| Err(QueueError::invalid(format!("config.{field}"), reason));
        if self.shard.as_str().trim().is_empty() {
            return invalid("shard", "must not be blank");
        }
        if self.capacity == 0 {
            return invalid("capacity", "must be at least 1");
        }
        if self.high_watermark == 0 || self.high_watermark > self.capacity {
            return invalid("high_watermark", "must be between 1 and capacity");
        }
        if self.low_watermark >= self.high_watermark {
            return invalid("low_watermark", "must be below high_watermark");
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts", "must be at least 1");
        }
        if self.max_lease_duration < defaults::LEASE_DURATION_MIN {
            return invalid("max_lease_duration", "must be at least LEASE_DURATION_MIN");
        }
        if self.lease_duration < defaults::LEASE_DURATION_MIN || self.lease_duration > self.max_lease_duration {
            return invalid("lease_duration", "must be between LEASE_DURATION_MIN and max_lease_duration");
        }
        if self.backoff_base.is_zero() || self.backoff_base > self.backoff_max {
            return invalid("backoff_base", "must be positive and at most backoff_max");
        }
        Ok(())
    }

    #[inline]
    fn lease_duration(&self, requested: Option<Duration>) -> Duration {
        // `clamp` would first assert that the bounds are ordered, which
        // `validate` already made sure of.
        requested.unwrap_or(self.lease_duration).max(defaults::LEASE_DURATION_MIN).min(self.max_lease_duration)
    }
}

/// Who is calling: the normalized principal and the peer the request came
/// from. Recorded in every event the call causes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    /// Normalized identity (`rpc.principal`).
    pub principal: Principal,
    /// Calling peer (`rpc.peer`).
    pub peer: PeerId,
}

impl Caller {
    /// A caller.
    pub fn new(principal: impl Into<Principal>, peer: impl Into<PeerId>) -> Self {
        Self { principal: principal.into(), peer: peer.into() }
    }
}

/// Learns who holds, renews and gives up leases, in log order; the peer
/// health tracker implements it so expiries and failures count against the
/// owning peer.
///
/// Called while the shard is locked, right after the event was applied:
/// implementations must return at once. Every method defaults to doing
/// nothing.
pub trait LeaseObserver: Send + Sync + 'static {
    /// `owner` was granted a lease.
    fn lease_granted(&self, owner: &PeerId) {
        let _ = owner;
    }

    /// `owner` heartbeated a lease.
    fn heartbeat(&self, owner: &PeerId) {
        let _ = owner;
    }

    /// `owner` completed a lease `turnaround` after it was granted.
    fn lease_completed(&self, owner: &PeerId, turnaround: Duration) {
        let _ = (owner, turnaround);
    }

    /// `owner` reported a failure.
    fn lease_failed(&self, owner: &PeerId) {
        let _ = owner;
    }

    /// `owner`'s lease lapsed without a heartbeat.
    fn lease_expired(&self, owner: &PeerId) {
        let _ = owner;
    }

    /// A drain handed `owner`'s lease back (not the peer's fault).
    fn lease_released(&self, owner: &PeerId) {
        let _ = owner;
    }
}

/// The principal recorded for events the queue causes by itself (expiry).
pub const SYSTEM_PRINCIPAL: &str = "omnirelay:queue";

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

/// Builds a [`Queue`].
pub struct QueueBuilder {
    config: QueueConfig,
    replicator: Arc<dyn Replicator>,
    clock: QueueClock,
    listeners: Vec<Arc<dyn BackpressureListener>>,
    observers: Vec<Arc<dyn LeaseObserver>>,
    state: Option<QueueState>,
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

    /// Calls `listener` on every backpressure transition.
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

    /// Builds the queue after checking the configuration.
    pub fn build(self) -> Result<Queue> {
        self.config.validate()?;
        let state = self.state.unwrap_or_else(|| QueueState::new(self.config.shard.clone()));
        if state.shard() != &self.config.shard {
            return Err(QueueError::invalid("state", format!("belongs to shard {}", state.shard())));
        }
        let nonce = random_u64();
        let producer = ProducerId::new(format!("{}/{}/{nonce:016x}", self.config.node, self.config.shard));
        let system = Arc::new(Origin {
            shard: self.config.shard.clone(),
            principal: Principal::from(SYSTEM_PRINCIPAL),
            peer: self.config.node.clone(),
        });
        let metrics = QueueMetrics::new(&self.config.shard);
        // The gauges start at the state's values; afterwards each applied
        // batch updates them (the dead-letter gauge when its count changed).
        metrics.pending.set(state.pending() as f64);
        metrics.active.set(state.active() as f64);
        metrics.dead_letters.set(state.dead_letters() as f64);
        let core = Core {
            state,
            nonce,
            counter: 0,
            producer_seq: 0,
            batch: Some(Box::new(Batch {
                shard: self.config.shard.clone(),
                producer,
                producer_seq: 0,
                events: Vec::new(),
            })),
            origin: Arc::clone(&system),
            last_now: Timestamp::EPOCH,
        };
        let queue = Queue {
            shared: Arc::new(Shared {
                config: self.config,
                replicator: self.replicator,
                clock: self.clock,
                listeners: self.listeners,
                observers: self.observers,
                metrics,
                system,
                gate: Gate::new(),
                core: StdMutex::new(core),
                in_doubt: AtomicBool::new(false),
                changed: Notify::new(),
                waiting: AtomicUsize::new(0),
            }),
        };
        Ok(queue)
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
/// assert_eq!(queue.stats().await.pending, 0);
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

struct Shared {
    config: QueueConfig,
    replicator: Arc<dyn Replicator>,
    clock: QueueClock,
    listeners: Vec<Arc<dyn BackpressureListener>>,
    observers: Vec<Arc<dyn LeaseObserver>>,
    metrics: QueueMetrics,
    /// Origin of events the queue causes itself.
    system: Arc<Origin>,
    /// Held by one command at a time from validation to the last applied
    /// event, across the publish: commands on the shard are linearized.
    gate: Gate,
    /// The state. Locked only by the holder of `gate`, for short synchronous
    /// sections that never span an `.await`, so it is never contended.
    core: StdMutex<Core>,
    /// The core's batch was sent but not acknowledged: it must be re-sent
    /// (same producer sequence) and applied before any new command. Changed
    /// only by the gate holder; an atomic so that starting a command does
    /// not need the state's lock.
    in_doubt: AtomicBool,
    /// Woken after every applied batch while someone waits (long polls,
    /// waiting drains).
    changed: Notify,
    /// How many callers wait on `changed`; zero keeps the hot path free of
    /// notifications.
    waiting: AtomicUsize,
}

impl Shared {
    /// Locks the state. Only the gate holder calls this, so it never waits.
    /// A panic under this lock (a listener or observer that panicked) leaves
    /// the state as the events applied so far made it, which is what the
    /// tokio mutex this replaced gave too: poisoning is not a reason to stop.
    #[inline]
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Everything behind the shard lock.
struct Core {
    state: QueueState,
    /// Random per queue instance: ids from different nodes or restarts never
    /// collide, and a counter keeps them cheap.
    nonce: u64,
    counter: u64,
    producer_seq: u64,
    /// The batch being built; its buffer is reused. `None` only while the
    /// replicator has it (see [`InFlight`]). Boxed, so handing it back and
    /// forth moves a pointer.
    batch: Option<Box<Batch>>,
    /// Origin of the last caller, reused while the caller does not change.
    origin: Arc<Origin>,
    /// Recorded times never go backwards, even if the clock does.
    last_now: Timestamp,
}

impl Core {
    #[inline]
    fn next_id(&mut self) -> u128 {
        self.counter += 1;
        (u128::from(self.nonce) << 64) | u128::from(self.counter)
    }

    #[inline]
    fn next_item_id(&mut self) -> ItemId {
        loop {
            let id = ItemId::from_u128(self.next_id());
            if !self.state.contains(id) {
                return id;
            }
        }
    }

    #[inline]
    fn now(&mut self, clock: &QueueClock) -> Timestamp {
        self.last_now = clock.now().max(self.last_now);
        self.last_now
    }

    #[inline]
    fn origin(&mut self, shard: &ShardId, caller: &Caller) -> Arc<Origin> {
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

    #[inline]
    fn batch(&mut self) -> &mut Batch {
        self.batch.as_mut().expect("the batch is in the core whenever the gate holder plans")
    }

    #[inline]
    fn push(&mut self, origin: &Arc<Origin>, at: Timestamp, kind: EventKind) {
        self.batch().events.push(Event { origin: Arc::clone(origin), recorded_at: at, kind });
    }

    fn has_events(&self) -> bool {
        self.batch.as_ref().is_some_and(|batch| !batch.events.is_empty())
    }
}

/// The queue's clock: the default [`TokioClock`] is called directly (every
/// command reads the clock once, and a call through `dyn Clock` cannot be
/// inlined); any other clock through its trait object.
enum QueueClock {
    Tokio(TokioClock),
    Other(Arc<dyn Clock>),
}

impl QueueClock {
    fn new(clock: impl Clock) -> Self {
        match (&clock as &dyn std::any::Any).downcast_ref::<TokioClock>() {
            Some(tokio) => QueueClock::Tokio(tokio.clone()),
            None => QueueClock::Other(Arc::new(clock)),
        }
    }

    #[inline]
    fn now(&self) -> Timestamp {
        match self {
            QueueClock::Tokio(clock) => clock.now(),
            QueueClock::Other(clock) => clock.now(),
        }
    }
}

/// A command in progress. It holds the shard gate, so its validate ->
/// publish -> apply cannot interleave with another command's; the state is
/// locked only for the synchronous parts.
struct Command<'a> {
    shared: &'a Shared,
    _permit: Permit<'a>,
}

/// A batch taken out of the core while the replicator has it. If the command
/// is dropped before the answer (its caller gave up mid-publish), the batch
/// goes back into the core in doubt: maybe written, so the next command
/// re-sends it with the same producer sequence and applies it, as after an
/// ambiguous failure. The gate is still held while this runs, because the
/// permit was taken before and is dropped after.
struct InFlight<'a> {
    shared: &'a Shared,
    batch: Option<Box<Batch>>,
}

impl InFlight<'_> {
    #[inline]
    fn batch(&self) -> &Batch {
        self.batch.as_ref().expect("in flight until landed")
    }

    #[inline]
    fn land(&mut self) -> Box<Batch> {
        self.batch.take().expect("landed once")
    }
}

impl Drop for InFlight<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.batch.is_some() {
            self.abandon();
        }
    }
}

impl InFlight<'_> {
    #[cold]
    fn abandon(&mut self) {
        if let Some(batch) = self.batch.take() {
            self.shared.core().batch = Some(batch);
            self.shared.in_doubt.store(true, Ordering::Release);
        }
    }
}

fn random_u64() -> u64 {
    // std's RandomState is seeded from the OS per process and perturbed per
    // instance: enough to keep id prefixes of queue instances apart without
    // another dependency.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(u64::from(std::process::id()));
    hasher.finish()
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

    /// Adds an item. A repeated `request_id` returns the item it created and
    /// writes nothing. Fails fast with RESOURCE_EXHAUSTED at capacity or under
    /// backpressure; never waits for room.
    pub async fn enqueue(&self, caller: &Caller, request: EnqueueRequest) -> Result<Enqueued> {
        validate::payload("payload", &request.payload)?;
        validate::delay("delay", request.delay, defaults::ENQUEUE_DELAY_MAX)?;
        let command = begin!(self);
        let shared = command.shared;
        let (item_id, flight, held) = {
            let mut core = shared.core();
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
                    signal: shared.signal(&core, now),
                });
            }
            if core.state.backpressure().active || pending >= shared.config.high_watermark {
                return Err(QueueError::Backpressure { signal: shared.signal(&core, now) });
            }
            let item_id = core.next_item_id();
            let origin = core.origin(&shared.config.shard, caller);
            let new = NewItem {
                id: item_id,
                payload: Arc::new(request.payload),
                priority: request.priority,
                enqueued_at: now,
                not_before: now.saturating_add(request.delay),
            };
            core.push(&origin, now, EventKind::Enqueued(new));
            shared.push_backpressure(&mut core, &origin, now, pending + 1);
            let flight = command.seal(&mut core);
            (item_id, flight, core)
        };
        let (first, ()) = settle!(command, held, flight, |_| ());
        Ok(Enqueued { item_id, deduplicated: false, sequence: first })
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
        let command = begin!(self);
        // The answer itself is the slot the item is written into: returned
        // as it is, it is not copied again on the way out.
        let mut leased = Ok(None);
        let _ = lease_attempt!(command, caller, &request, None::<tokio::time::Instant>, &mut leased);
        leased
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
            let mut leased = Ok(None);
            let sleep_for = match self.lease_once(caller, request, started, &mut leased).await? {
                Ok(()) => return leased,
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

    /// One attempt of a waiting lease (a function of its own: the state's
    /// lock must not live in the waiting loop's future).
    async fn lease_once(
        &self,
        caller: &Caller,
        request: &LeaseRequest,
        started: tokio::time::Instant,
        leased: &mut Result<Option<LeasedItem>>,
    ) -> Result<std::result::Result<(), Option<Duration>>> {
        let command = begin!(self);
        Ok(lease_attempt!(command, caller, request, Some(started), leased))
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
        let command = begin!(self);
        let shared = command.shared;
        let (expires_at, flight, held) = {
            let mut core = shared.core();
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
            let flight = command.seal(&mut core);
            (expires_at, flight, core)
        };
        settle!(command, held, flight, |_| ());
        Ok(expires_at)
    }

    /// Completes a leased item and removes it. Repeating it with the same
    /// handle answers `Ok(true)` ("already completed") and writes nothing.
    pub async fn complete(&self, caller: &Caller, handle: &LeaseHandle) -> Result<bool> {
        let command = begin!(self);
        let shared = command.shared;
        let (flight, held) = {
            let mut core = shared.core();
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
            (command.seal(&mut core), core)
        };
        settle!(command, held, flight, |_| ());
        Ok(false)
    }

    /// Reports a failed attempt: the item is requeued (after the requested
    /// delay, or exponential backoff), or dead-lettered when asked or when
    /// this was its last allowed attempt.
    pub async fn fail(&self, caller: &Caller, handle: &LeaseHandle, request: FailRequest) -> Result<FailOutcome> {
        validate::error_text(&request.error)?;
        if let Some(delay) = request.requeue_delay {
            validate::delay("requeue_delay", delay, defaults::REQUEUE_DELAY_MAX)?;
        }
        let command = begin!(self);
        let shared = command.shared;
        let config = &shared.config;
        let (outcome, flight, held) = {
            let mut core = shared.core();
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
                    shared.push_backpressure(&mut core, &origin, now, pending_after);
                }
                FailOutcome::DeadLettered { reason } => {
                    core.push(&origin, now, EventKind::DeadLettered { item_id, reason });
                }
            }
            let flight = command.seal(&mut core);
            (outcome, flight, core)
        };
        settle!(command, held, flight, |_| ());
        Ok(outcome)
    }

    /// Expires every lease that lapsed by now (what the [`Sweeper`] calls):
    /// each gets an `Expired` event and is requeued, or dead-lettered if it
    /// was its last attempt. Returns how many leases expired.
    pub async fn expire_due(&self) -> Result<usize> {
        let command = begin!(self);
        let now = command.shared.core().now(&command.shared.clock);
        let mut expired = 0;
        loop {
            match command.expire_batch(now).await? {
                0 => return Ok(expired),
                batch => expired += batch,
            }
        }
    }

    /// Stops granting leases and returns a snapshot of the pending items.
    ///
    /// With [`DrainMode::Wait`] the drain waits up to `wait` (clamped to
    /// [`DRAIN_WAIT_MAX`](defaults::DRAIN_WAIT_MAX)) for leases in flight to
    /// end; leases still running then are listed in `in_flight`. With
    /// [`DrainMode::HandBack`] leases are handed back at once and their items
    /// are pending (and in the snapshot). Non-destructive: the queue keeps
    /// every item until [`resume`](Self::resume) or a purge elsewhere.
    pub async fn drain(&self, caller: &Caller, mode: DrainMode, wait: Option<Duration>) -> Result<DrainSnapshot> {
        let shared = &*self.shared;
        let waiting = Waiting::new(&shared.waiting);
        {
            let command = begin!(self);
            let (flight, held) = {
                let mut core = shared.core();
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
                    shared.push_backpressure(&mut core, &origin, now, pending_after);
                }
                (core.has_events().then(|| command.seal(&mut core)), core)
            };
            if let Some(flight) = flight {
                settle!(command, held, flight, |_| ());
            }
        }
        if mode == DrainMode::Wait {
            let deadline =
                tokio::time::Instant::now() + wait.unwrap_or(defaults::DRAIN_WAIT).min(defaults::DRAIN_WAIT_MAX);
            loop {
                let changed = shared.changed.notified();
                let active = {
                    let _command = begin!(self);
                    shared.core().state.active()
                };
                if active == 0 {
                    break;
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    break;
                }
            }
        }
        drop(waiting);
        let command = begin!(self);
        let (now, items, in_flight, flight, held) = {
            let mut core = shared.core();
            let now = core.now(&shared.clock);
            let origin = core.origin(&shared.config.shard, caller);
            let items: Vec<WorkItem> = core.state.pending_items().into_iter().cloned().collect();
            let in_flight: Vec<WorkItem> = core.state.leased_items().into_iter().cloned().collect();
            let kind = EventKind::Drained {
                pending: u32::try_from(items.len()).unwrap_or(u32::MAX),
                in_flight: u32::try_from(in_flight.len()).unwrap_or(u32::MAX),
            };
            core.push(&origin, now, kind);
            let flight = command.seal(&mut core);
            (now, items, in_flight, flight, core)
        };
        let (sequence, ()) = settle!(command, held, flight, |_| ());
        Ok(DrainSnapshot { shard: shared.config.shard.clone(), sequence, taken_at: now, items, in_flight })
    }

    /// Grants leases again after a drain. `Ok(false)` if it was not draining.
    pub async fn resume(&self, caller: &Caller) -> Result<bool> {
        let command = begin!(self);
        let shared = command.shared;
        let (flight, held) = {
            let mut core = shared.core();
            if core.state.draining().is_none() {
                return Ok(false);
            }
            let now = core.now(&shared.clock);
            let origin = core.origin(&shared.config.shard, caller);
            core.push(&origin, now, EventKind::Resumed);
            (command.seal(&mut core), core)
        };
        settle!(command, held, flight, |_| ());
        Ok(true)
    }

    /// Loads a drain snapshot's pending items, keeping ids, attempts, errors,
    /// tokens and histories; items already present (same id, or same
    /// `request_id` as a remembered item) are skipped. All or nothing: at
    /// capacity nothing is restored.
    pub async fn restore(&self, caller: &Caller, snapshot: &DrainSnapshot) -> Result<Restored> {
        for (index, item) in snapshot.items.iter().enumerate() {
            validate::payload(&format!("snapshot.items[{index}].payload"), &item.payload)?;
        }
        let command = begin!(self);
        let shared = command.shared;
        let (restored, skipped, flight, held) = {
            let mut core = shared.core();
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
                    signal: shared.signal(&core, now),
                });
            }
            let origin = core.origin(&shared.config.shard, caller);
            core.push(&origin, now, EventKind::Restored { items, skipped });
            shared.push_backpressure(&mut core, &origin, now, pending + restored);
            let flight = command.seal(&mut core);
            (restored, skipped, flight, core)
        };
        settle!(command, held, flight, |_| ());
        Ok(Restored { restored: u32::try_from(restored).unwrap_or(u32::MAX), skipped })
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
        let _permit = self.shared.gate.acquire().await;
        let core = self.shared.core();
        let mut page = core.state.dead_letters_page(after, size + 1);
        let next_page_token = (page.len() > size).then(|| {
            page.truncate(size);
            page.last().map(|(order, _)| order.to_string()).unwrap_or_default()
        });
        Ok(DeadLetterPage {
            dead_letters: page.into_iter().map(|(_, letter)| letter.clone()).collect(),
            next_page_token,
        })
    }

    /// One dead letter with its whole history.
    pub async fn dead_letter(&self, item_id: ItemId) -> Result<DeadLetter> {
        let _permit = self.shared.gate.acquire().await;
        let core = self.shared.core();
        core.state.dead_letter(item_id).cloned().ok_or(QueueError::NotFound { what: "dead letter", item_id })
    }

    /// Re-enqueues a dead letter as a pending item (same id and history,
    /// attempt count reset), at the back of the queue.
    pub async fn redrive(&self, caller: &Caller, item_id: ItemId) -> Result<ItemId> {
        let command = begin!(self);
        let shared = command.shared;
        let (flight, held) = {
            let mut core = shared.core();
            if core.state.dead_letter(item_id).is_none() {
                return Err(QueueError::NotFound { what: "dead letter", item_id });
            }
            let now = core.now(&shared.clock);
            let (pending, active) = (core.state.pending(), core.state.active());
            if pending + active >= shared.config.capacity {
                return Err(QueueError::AtCapacity {
                    capacity: shared.config.capacity,
                    signal: shared.signal(&core, now),
                });
            }
            let origin = core.origin(&shared.config.shard, caller);
            core.push(&origin, now, EventKind::Redriven { item_id, not_before: now });
            shared.push_backpressure(&mut core, &origin, now, pending + 1);
            (command.seal(&mut core), core)
        };
        settle!(command, held, flight, |_| ());
        Ok(item_id)
    }

    /// Deletes dead letters for good. Returns how many were deleted.
    pub async fn purge_dead_letters(&self, caller: &Caller, which: Purge) -> Result<u32> {
        if which == Purge::Items(Vec::new()) {
            return Err(QueueError::invalid("item_ids", "must name at least one item unless purging all"));
        }
        let command = begin!(self);
        let shared = command.shared;
        let (purged, flight, held) = {
            let mut core = shared.core();
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
            let flight = command.seal(&mut core);
            (purged, flight, core)
        };
        settle!(command, held, flight, |_| ());
        Ok(purged)
    }

    /// Depth, leases, dead letters and the backpressure state.
    pub async fn stats(&self) -> QueueStats {
        let shared = &*self.shared;
        let _permit = shared.gate.acquire().await;
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

    /// Runs `f` on the current state (for inspection, snapshots and tests).
    pub async fn inspect<R>(&self, f: impl FnOnce(&QueueState) -> R) -> R {
        let _permit = self.shared.gate.acquire().await;
        f(&self.shared.core().state)
    }

    /// The current state in its canonical encoding: what a snapshot stores,
    /// and what replaying the log must reproduce byte for byte.
    pub async fn encode_state(&self) -> Vec<u8> {
        self.inspect(QueueState::encode).await
    }

    /// The earliest lease expiry, for sweepers that sleep until it.
    pub async fn next_expiry(&self) -> Option<Timestamp> {
        let _permit = self.shared.gate.acquire().await;
        self.shared.core().state.next_expiry()
    }

    /// Whether a batch is in doubt (sent, not acknowledged) and will be
    /// settled by the next command (shown by the node's replication
    /// diagnostics).
    pub async fn in_doubt(&self) -> bool {
        let _permit = self.shared.gate.acquire().await;
        self.shared.in_doubt.load(Ordering::Acquire)
    }

    // ----- the commit path -----

    /// Takes the shard gate at once if it is free and nothing is in doubt:
    /// the common case, with no future to build or poll.
    #[inline]
    fn try_begin(&self) -> Option<Command<'_>> {
        let shared = &*self.shared;
        let permit = shared.gate.try_permit()?;
        if shared.in_doubt.load(Ordering::Acquire) {
            return None;
        }
        Some(Command { shared, _permit: permit })
    }

    /// Takes the shard gate and first settles a batch left in doubt by a
    /// failed publish, so every command starts from a state that matches the
    /// log. See [`try_begin`](Self::try_begin) for the fast path.
    async fn begin(&self) -> Result<Command<'_>> {
        let shared = &*self.shared;
        let command = Command { shared, _permit: shared.gate.acquire().await };
        if shared.in_doubt.load(Ordering::Acquire) {
            let (flight, held) = {
                let mut core = shared.core();
                (InFlight { shared, batch: core.batch.take() }, core)
            };
            settle!(command, held, flight, |_| ());
        }
        Ok(command)
    }
}

impl Shared {
    /// The live signal: the state's flag with the current depth and the
    /// configured watermarks.
    fn signal(&self, core: &Core, now: Timestamp) -> BackpressureSignal {
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
    fn push_backpressure(&self, core: &mut Core, origin: &Arc<Origin>, now: Timestamp, pending_after: u64) {
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
}

impl<'a> Command<'a> {
    /// Plans the lease of `item_id` (the next eligible item) at `now`, as
    /// its `attempt`.
    #[inline]
    fn plan_lease(
        &self,
        core: &mut Core,
        caller: &Caller,
        request: &LeaseRequest,
        item_id: ItemId,
        attempt: u32,
        now: Timestamp,
    ) {
        let shared = self.shared;
        let lease_id = LeaseId::from_u128(core.next_id());
        let expires_at = now.saturating_add(shared.config.lease_duration(request.lease_duration));
        let origin = core.origin(&shared.config.shard, caller);
        let kind = EventKind::Leased { item_id, attempt, lease_id, owner: request.owner.clone(), expires_at };
        core.push(&origin, now, kind);
        let pending_after = core.state.pending() - 1;
        shared.push_backpressure(core, &origin, now, pending_after);
    }

    /// Expires one batch of lapsed leases; zero when none was due. (A function
    /// of its own: the state's lock must not live in a loop's future.)
    async fn expire_batch(&self, now: Timestamp) -> Result<usize> {
        let (expired, flight, held) = {
            let mut core = self.shared.core();
            if !core.state.has_due_expiry(now) {
                return Ok(0);
            }
            let expired = self.plan_expiries(&mut core, now);
            (expired, self.seal(&mut core), core)
        };
        settle!(self, held, flight, |_| ());
        Ok(expired)
    }

    /// Plans `Expired` events (and requeues or dead letters) for at most
    /// [`SWEEP_BATCH_MAX`](defaults::SWEEP_BATCH_MAX) lapsed leases.
    fn plan_expiries(&self, core: &mut Core, now: Timestamp) -> usize {
        let shared = self.shared;
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
                core.push(
                    &origin,
                    now,
                    EventKind::Requeued { item_id, not_before: now, reason: RequeueReason::Expired },
                );
                requeued += 1;
            }
        }
        let pending_after = core.state.pending() + requeued;
        shared.push_backpressure(core, &origin, now, pending_after);
        due.len()
    }

    /// Closes the batch under construction: gives it the next producer
    /// sequence and takes it out of the core for [`send`](Self::send).
    #[inline]
    fn seal(&self, core: &mut Core) -> InFlight<'a> {
        core.producer_seq += 1;
        let producer_seq = core.producer_seq;
        core.batch().producer_seq = producer_seq;
        InFlight { shared: self.shared, batch: core.batch.take() }
    }

    /// Hands a sealed batch to the replicator. A synchronous replicator has
    /// answered when this returns; otherwise (or to retry a transient
    /// failure) the answer is a boxed future, kept out of every command's
    /// own future because it is the rare path here.
    #[inline]
    fn publish<'f>(&self, flight: &'f InFlight<'a>) -> Publishing<'f> {
        let mut answer = (*self.shared.replicator).publish(flight.batch());
        match answer.take_ready() {
            Some(Ok(appended)) => Publishing::Now(appended),
            Some(Err(error)) => Publishing::Later(Box::pin(publish_retrying(
                self.shared,
                flight.batch(),
                PublishFuture::ready(Err(error)),
            ))),
            None => Publishing::Later(Box::pin(publish_retrying(self.shared, flight.batch(), answer))),
        }
    }

    /// Settles a batch with the replicator's final answer: applies it when
    /// accepted, and returns `read` of the state right after; drops it when
    /// refused for good; keeps it in doubt (re-sent before the next command)
    /// when it may have been written.
    #[inline]
    fn land<R>(
        &self,
        core: &mut Core,
        mut flight: InFlight<'a>,
        answer: std::result::Result<Appended, ReplicationError>,
        read: impl FnOnce(&QueueState) -> R,
    ) -> Result<(Sequence, R)> {
        let shared = self.shared;
        let mut batch = flight.land();
        let appended = match answer {
            Ok(appended) => appended,
            Err(error @ ReplicationError::Rejected(_)) => {
                // Refused for good, so not written: drop the batch.
                batch.events.clear();
                core.batch = Some(batch);
                shared.in_doubt.store(false, Ordering::Release);
                tracing::warn!(shard = %shared.config.shard, error = %error, "replicator rejected a batch");
                return Err(QueueError::Replication(error));
            }
            Err(error) => {
                // Maybe written, maybe not: keep it and settle it, same
                // producer sequence, before the next command.
                core.batch = Some(batch);
                shared.in_doubt.store(true, Ordering::Release);
                tracing::warn!(shard = %shared.config.shard, error = %error, "publish failed; batch kept for retry");
                return Err(QueueError::Replication(error));
            }
        };
        shared.in_doubt.store(false, Ordering::Release);
        if appended.count != batch.events.len() as u64 {
            let error = ReplicationError::Rejected(format!(
                "replicator acknowledged {} events of a batch of {}",
                appended.count,
                batch.events.len()
            ));
            batch.events.clear();
            core.batch = Some(batch);
            tracing::error!(shard = %shared.config.shard, error = %error, "replicator broke its contract");
            return Err(QueueError::Replication(error));
        }
        let metrics = &shared.metrics;
        let state = &mut core.state;
        let dead_letters_before = state.dead_letters();
        if batch.events.len() == 1 {
            // Most commands write one event: no iterator to set up and drop.
            let event = batch.events.pop().expect("one event");
            apply_accepted(shared, state, appended.first, event);
        } else {
            let mut sequence = appended.first;
            for event in batch.events.drain(..) {
                apply_accepted(shared, state, sequence, event);
                sequence = sequence.after(1);
            }
        }
        metrics.pending.set(state.pending() as f64);
        metrics.active.set(state.active() as f64);
        if state.dead_letters() != dead_letters_before {
            metrics.dead_letters.set(state.dead_letters() as f64);
        }
        let read = read(state);
        core.batch = Some(batch);
        if shared.waiting.load(Ordering::SeqCst) > 0 {
            shared.changed.notify_waiters();
        }
        Ok((appended.first, read))
    }
}

/// A replicator's answer to a batch: known at once, or still to come.
enum Publishing<'f> {
    Now(Appended),
    Later(Pin<Box<dyn Future<Output = std::result::Result<Appended, ReplicationError>> + Send + 'f>>),
}

/// Awaits the first answer, and retries a transient failure (same producer
/// sequence, so a batch written despite the failure is not written twice)
/// up to [`PUBLISH_ATTEMPTS`](defaults::PUBLISH_ATTEMPTS) times. A refusal
/// for good ends it at once.
async fn publish_retrying<'f>(
    shared: &'f Shared,
    batch: &'f Batch,
    first: PublishFuture<'f>,
) -> std::result::Result<Appended, ReplicationError> {
    let mut answer = first.await;
    let mut attempt = 1;
    loop {
        match answer {
            Err(ReplicationError::Unavailable(_)) if attempt < defaults::PUBLISH_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(defaults::PUBLISH_RETRY_DELAY).await;
                answer = shared.replicator.publish(batch).await;
            }
            answer => return answer,
        }
    }
}

/// Applies one event the replicator accepted at `sequence`, with its
/// metrics, listeners and observers.
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

/// The events were planned against this very state, so an accepted event
/// that does not apply is a bug; the log is the truth and a replay repairs
/// the state.
#[cold]
fn failed_to_apply(shared: &Shared, error: &ApplyError) {
    tracing::error!(shard = %shared.config.shard, error = %error, "an accepted event did not apply");
    debug_assert!(false, "an accepted event did not apply: {error}");
}

fn notify_observers(observers: &[Arc<dyn LeaseObserver>], kind: &EventKind, ended: Option<(PeerId, Duration)>) {
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
