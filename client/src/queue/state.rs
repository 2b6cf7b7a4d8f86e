//! The queue's state and `apply`: a pure function of the events applied so
//! far. No clock, no randomness, no configuration: replaying a shard's log
//! from empty (or from a snapshot plus the tail) rebuilds the same state, and
//! [`QueueState::encode`] proves it byte for byte.
//!
//! Besides the state proper, a `QueueState` keeps indexes (what is ready,
//! delayed, blocked behind a leased resource, and when leases expire). They
//! are derived data: never encoded, rebuilt on decode, and allowed to lag
//! (an item whose delay has passed is promoted lazily by the next lease), so
//! leasing is O(log n) with no scans.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use crate::backpressure::BackpressureSignal;
use crate::clock::Timestamp;
use crate::defaults;
use crate::event::{Event, EventKind, NewItem, RequeueReason, SequencedEvent};
use crate::ids::{FencingToken, ItemId, LeaseId, PeerId, Sequence, ShardId};
use crate::item::{AttemptOutcome, AttemptRecord, DeadLetter, DrainMode, Lease, Payload, WorkItem};
use crate::sync::table::{IdTable, Table, TableKey};

/// An event that does not fit the state it is applied to: the log is
/// corrupt, belongs to another shard, or skipped events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {sequence} ({event}) does not apply: {reason}")]
pub struct ApplyError {
    /// Sequence of the offending event.
    pub sequence: Sequence,
    /// Its type.
    pub event: &'static str,
    /// What does not fit.
    pub reason: String,
}

/// Hashes the 128-bit ids the queue generates (a random prefix plus a
/// counter) with one multiply instead of SipHash. Ids are never chosen by
/// callers (restore only accepts ids this code generated), so hash flooding
/// is not a concern here; strings keep the standard hasher.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn write_u128(&mut self, value: u128) {
        let folded = (value as u64) ^ ((value >> 64) as u64).rotate_left(29);
        let mixed = (self.0 ^ folded).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = mixed ^ (mixed >> 29);
    }
}

pub(crate) type IdMap<V> = HashMap<ItemId, V, BuildHasherDefault<IdHasher>>;

/// The resource an item is about, compared by `(resource_type, resource_id)`.
/// Holds the payload's `Arc` so keys cost no string copies, and the hash of
/// the two strings, computed once per item (not at every index lookup) with
/// a hash keyed randomly per queue, since resource ids come from callers.
#[derive(Clone)]
pub(crate) struct ResourceKey {
    payload: Arc<Payload>,
    hash: u64,
}

impl PartialEq for ResourceKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.payload, &other.payload)
                || (self.payload.resource_id == other.payload.resource_id
                    && self.payload.resource_type == other.payload.resource_type))
    }
}

impl Eq for ResourceKey {}

impl Hash for ResourceKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl TableKey for ResourceKey {
    #[inline]
    fn table_hash(&self) -> u64 {
        self.hash
    }
}

/// Passes a precomputed hash through (see [`ResourceKey`]).
#[derive(Default, Clone, Copy)]
pub(crate) struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `ResourceKey`; fold anything else.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type ResourceMap<V> = HashMap<ResourceKey, V, BuildHasherDefault<PrehashedHasher>>;

/// Lease order among ready items: highest priority first, then the item that
/// entered the queue first.
type ReadyKey = (Reverse<i32>, u64, ItemId);

/// Which index holds an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Between the end of a lease and its `Requeued`/`DeadLettered` event
    /// (inside one batch).
    Limbo,
    /// Eligible now (or as of the last promotion), in `ready`.
    Ready,
    /// Waiting for `not_before`, in `delayed`.
    Delayed,
    /// Its resource is leased by another item, in `blocked`.
    Blocked,
    /// Leased, in `expiry`.
    Leased,
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) item: WorkItem,
    /// Keyed hash of the item's resource (see [`ResourceKey`]).
    resource_hash: u64,
    /// Position in queue order: assigned when the item entered this queue
    /// (enqueue, restore, redrive), from a counter that is part of the state.
    pub(crate) order: u64,
    pub(crate) slot: Slot,
}

impl Entry {
    #[inline]
    fn ready_key(&self) -> ReadyKey {
        (Reverse(self.item.priority), self.order, self.item.id)
    }

    #[inline]
    fn resource(&self) -> ResourceKey {
        ResourceKey { payload: Arc::clone(&self.item.payload), hash: self.resource_hash }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadEntry {
    pub(crate) letter: DeadLetter,
    pub(crate) order: u64,
}

/// A completed item remembered for idempotent `complete` and `request_id`
/// deduplication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Completion {
    pub(crate) item_id: ItemId,
    pub(crate) fencing_token: FencingToken,
    pub(crate) completed_at: Timestamp,
    pub(crate) request_id: String,
}

/// When a lease lapses: expiry, token, item. Tokens are unique per lease.
type ExpiryKey = (Timestamp, FencingToken, ItemId);

/// The indexes. `ready` and `expiry` are binary heaps with lazy deletion: an
/// item that leaves the ready set, or a lease that ends or is extended,
/// leaves its old entry behind unless it is on top, and readers skip entries
/// that no longer match the item (see [`QueueState::ready_is_live`] and
/// [`QueueState::expiry_is_live`]). A push is O(1) when keys arrive in order
/// (queue order, expiries a fixed duration ahead), a pop O(log n), and
/// nothing is searched on removal; stale entries are compacted away once
/// they outnumber the live ones (see
/// [`INDEX_STALE_SLACK`](defaults::INDEX_STALE_SLACK)).
#[derive(Default, Clone)]
struct Index {
    ready: BinaryHeap<Reverse<ReadyKey>>,
    /// Items in slot `Ready` (the heap may also hold stale keys).
    ready_live: usize,
    delayed: BTreeSet<(Timestamp, u64, ItemId)>,
    blocked: ResourceMap<BTreeSet<ReadyKey>>,
    /// The holder of each leased resource.
    leased: Table<ResourceKey, ItemId>,
    /// Live entries: one per leased item (`QueueState::active`).
    expiry: BinaryHeap<Reverse<ExpiryKey>>,
}

/// The state of one queue (shard), rebuilt exactly by replaying its events.
#[derive(Clone)]
pub struct QueueState {
    pub(crate) shard: ShardId,
    pub(crate) last_sequence: Sequence,
    pub(crate) items: IdMap<Entry>,
    pub(crate) pending: u64,
    pub(crate) active: u64,
    pub(crate) dead: IdMap<DeadEntry>,
    pub(crate) dead_order: BTreeMap<u64, ItemId>,
    pub(crate) requests: HashMap<String, ItemId>,
    pub(crate) completed: VecDeque<Completion>,
    pub(crate) completed_tokens: IdTable<FencingToken>,
    pub(crate) draining: Option<DrainMode>,
    pub(crate) backpressure: BackpressureSignal,
    pub(crate) next_order: u64,
    pub(crate) next_dead_order: u64,
    index: Index,
    /// Keys of the resource hashes; random per state, never encoded.
    resource_hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for QueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueState")
            .field("shard", &self.shard)
            .field("last_sequence", &self.last_sequence)
            .field("pending", &self.pending)
            .field("active", &self.active)
            .field("dead_letters", &self.dead.len())
            .field("draining", &self.draining)
            .field("backpressure", &self.backpressure.active)
            .finish()
    }
}

impl QueueState {
    /// An empty queue for `shard`, before its first event.
    pub fn new(shard: ShardId) -> Self {
        Self {
            backpressure: BackpressureSignal {
                active: false,
                pending: 0,
                high: 0,
                low: 0,
                observed_at: Timestamp::EPOCH,
                shard: shard.clone(),
            },
            shard,
            last_sequence: Sequence::ZERO,
            items: IdMap::default(),
            pending: 0,
            active: 0,
            dead: IdMap::default(),
            dead_order: BTreeMap::new(),
            requests: HashMap::new(),
            completed: VecDeque::new(),
            completed_tokens: IdTable::default(),
            draining: None,
            next_order: 0,
            next_dead_order: 0,
            index: Index::default(),
            resource_hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Rebuilds a queue by applying `events` to an empty one.
    pub fn replay<'a>(
        shard: ShardId,
        events: impl IntoIterator<Item = &'a SequencedEvent>,
    ) -> Result<Self, ApplyError> {
        let mut state = Self::new(shard);
        state.apply_all(events)?;
        Ok(state)
    }

    /// Applies `events` in order, skipping those at or below the state's
    /// sequence (a tail read after a snapshot may overlap it).
    pub fn apply_all<'a>(&mut self, events: impl IntoIterator<Item = &'a SequencedEvent>) -> Result<(), ApplyError> {
        for sequenced in events {
            if sequenced.sequence <= self.last_sequence {
                continue;
            }
            self.apply(sequenced.sequence, sequenced.event.clone())?;
        }
        Ok(())
    }

    /// The shard this state belongs to.
    pub fn shard(&self) -> &ShardId {
        &self.shard
    }

    /// Sequence of the last applied event.
    pub fn last_sequence(&self) -> Sequence {
        self.last_sequence
    }

    /// Items waiting to be leased (including delayed and blocked ones).
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Items currently leased.
    pub fn active(&self) -> u64 {
        self.active
    }

    /// Items in the dead-letter list.
    pub fn dead_letters(&self) -> u64 {
        self.dead.len() as u64
    }

    /// The drain in force, if the queue is draining.
    pub fn draining(&self) -> Option<DrainMode> {
        self.draining
    }

    /// The backpressure signal of the last `BackpressureChanged` event.
    pub fn backpressure(&self) -> &BackpressureSignal {
        &self.backpressure
    }

    /// An item in the queue (pending or leased).
    #[inline]
    pub fn item(&self, item_id: ItemId) -> Option<&WorkItem> {
        self.items.get(&item_id).map(|entry| &entry.item)
    }

    /// A dead letter.
    pub fn dead_letter(&self, item_id: ItemId) -> Option<&DeadLetter> {
        self.dead.get(&item_id).map(|entry| &entry.letter)
    }

    /// The token a completed item was completed with, while remembered.
    pub fn completed_token(&self, item_id: ItemId) -> Option<FencingToken> {
        self.completed_tokens.get(&item_id)
    }

    /// The item a `request_id` created, while it is remembered (the item is
    /// in the queue, dead-lettered, or recently completed).
    pub fn request(&self, request_id: &str) -> Option<ItemId> {
        self.requests.get(request_id).copied()
    }

    /// Pending items in queue order (for drain snapshots).
    pub fn pending_items(&self) -> Vec<&WorkItem> {
        self.items_in_order(|entry| entry.item.lease.is_none())
    }

    /// Leased items in queue order.
    pub fn leased_items(&self) -> Vec<&WorkItem> {
        self.items_in_order(|entry| entry.item.lease.is_some())
    }

    fn items_in_order(&self, keep: impl Fn(&Entry) -> bool) -> Vec<&WorkItem> {
        let mut entries: Vec<&Entry> = self.items.values().filter(|entry| keep(entry)).collect();
        entries.sort_unstable_by_key(|entry| entry.order);
        entries.into_iter().map(|entry| &entry.item).collect()
    }

    /// The first `limit` dead letters, oldest first.
    pub fn dead_letter_items(&self, limit: usize) -> Vec<&DeadLetter> {
        self.dead_letters_page(None, limit).into_iter().map(|(_, letter)| letter).collect()
    }

    /// Dead letters after `after_order` in dead-letter order, at most
    /// `limit`, with the order of each (the page token).
    pub(crate) fn dead_letters_page(&self, after_order: Option<u64>, limit: usize) -> Vec<(u64, &DeadLetter)> {
        let range = match after_order {
            Some(after) => self.dead_order.range(after.saturating_add(1)..),
            None => self.dead_order.range(..),
        };
        range.filter_map(|(&order, id)| self.dead.get(id).map(|entry| (order, &entry.letter))).take(limit).collect()
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.items.values()
    }

    pub(crate) fn dead_entries(&self) -> impl Iterator<Item = &DeadEntry> {
        self.dead.values()
    }

    // ----- planning helpers (index maintenance only, never state) -----

    /// Finds the item the next lease at `now` should grant: promotes delayed
    /// items whose time has come and parks items whose resource is leased,
    /// then returns the first ready item and its attempts so far. Touches only
    /// indexes, so a publish that fails afterwards leaves the state as it was.
    #[inline]
    pub(crate) fn next_eligible(&mut self, now: Timestamp) -> Option<(ItemId, u32)> {
        while let Some(&(not_before, order, item_id)) = self.index.delayed.first() {
            if not_before > now {
                break;
            }
            self.index.delayed.pop_first();
            let Some(entry) = self.items.get_mut(&item_id) else { continue };
            debug_assert_eq!(entry.order, order);
            entry.slot = Slot::Limbo;
            self.index.insert_pending(entry, now);
        }
        while let Some(&Reverse(key)) = self.index.ready.peek() {
            let entry = match self.items.get_mut(&key.2) {
                Some(entry) if entry.slot == Slot::Ready && entry.ready_key() == key => entry,
                // Stale: the item left the ready set since.
                _ => {
                    drop_top(&mut self.index.ready);
                    continue;
                }
            };
            if !self.index.leased.is_empty() && self.index.leased.contains_key(&entry.resource()) {
                drop_top(&mut self.index.ready);
                self.index.ready_live -= 1;
                self.index.blocked.entry(entry.resource()).or_default().insert(key);
                entry.slot = Slot::Blocked;
                continue;
            }
            return Some((key.2, entry.item.attempt));
        }
        None
    }

    /// The earliest `not_before` of a delayed item, to bound a long poll's
    /// sleep.
    pub(crate) fn next_not_before(&self) -> Option<Timestamp> {
        self.index.delayed.first().map(|&(not_before, _, _)| not_before)
    }

    /// Leases that lapsed at or before `now`, earliest first, at most `max`.
    pub(crate) fn due_expiries(&self, now: Timestamp, max: usize) -> Vec<(ItemId, FencingToken)> {
        // The heap's array is a tree whose parents are never later than
        // their children: walk the part that is due, skip stale entries.
        let heap = self.index.expiry.as_slice();
        let mut due = Vec::new();
        let mut pending = vec![0];
        while let Some(at) = pending.pop() {
            let Some(&Reverse(key)) = heap.get(at) else { continue };
            if key.0 > now {
                continue;
            }
            if self.expiry_is_live(&key) {
                due.push(key);
            }
            pending.extend([2 * at + 1, 2 * at + 2]);
        }
        due.sort_unstable();
        // A heartbeat at the same instant may leave a twin entry.
        due.dedup();
        due.into_iter().take(max).map(|(_, token, item_id)| (item_id, token)).collect()
    }

    /// Whether some lease lapsed at or before `now`. Drops stale entries from
    /// the top of the expiry heap on the way (index maintenance only).
    #[inline]
    pub(crate) fn has_due_expiry(&mut self, now: Timestamp) -> bool {
        self.next_expiry().is_some_and(|expires_at| expires_at <= now)
    }

    /// The earliest expiry of a live lease. Drops stale entries from the top
    /// of the expiry heap on the way (index maintenance only).
    #[inline]
    pub(crate) fn next_expiry(&mut self) -> Option<Timestamp> {
        while let Some(&Reverse(key)) = self.index.expiry.peek() {
            if self.expiry_is_live(&key) {
                return Some(key.0);
            }
            drop_top(&mut self.index.expiry);
        }
        None
    }

    /// Whether an expiry entry is the current expiry of a live lease.
    #[inline]
    fn expiry_is_live(&self, &(expires_at, token, item_id): &ExpiryKey) -> bool {
        is_live_expiry(&self.items, expires_at, token, item_id)
    }

    /// Whether a ready entry is an item in the ready set.
    fn ready_is_live(&self, key: &ReadyKey) -> bool {
        is_live_ready(&self.items, key)
    }

    // ----- apply -----

    /// Applies one event at `sequence`. An event that does not fit the state
    /// is refused with the state unchanged.
    #[inline]
    pub fn apply(&mut self, sequence: Sequence, event: Event) -> Result<(), ApplyError> {
        // Errors name the event type; each arm names its own, so the name is
        // never looked up on the way to a successful apply.
        if sequence <= self.last_sequence {
            return Err(fail_apply(
                sequence,
                event.kind.name(),
                format!("not after the last applied sequence {}", self.last_sequence),
            ));
        }
        if event.origin.shard != self.shard {
            return Err(fail_apply(sequence, event.kind.name(), format!("belongs to shard {}", event.origin.shard)));
        }
        let at = event.recorded_at;
        match event.kind {
            EventKind::Enqueued(new) => {
                self.apply_enqueued(new, at).map_err(|reason| fail_apply(sequence, "enqueued", reason))?
            }
            EventKind::Leased { item_id, attempt, lease_id, owner, expires_at } => {
                self.apply_leased(sequence, at, item_id, attempt, lease_id, owner, expires_at)?
            }
            EventKind::Completed { item_id, fencing_token } => {
                self.apply_completed(sequence, at, item_id, fencing_token)?
            }
            other => self.apply_other(sequence, at, other)?,
        }
        self.last_sequence = sequence;
        Ok(())
    }

    // The common events each in a function of its own (a small frame to set
    // up per event), the others together.

    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    fn apply_leased(
        &mut self,
        sequence: Sequence,
        at: Timestamp,
        item_id: ItemId,
        attempt: u32,
        lease_id: LeaseId,
        owner: PeerId,
        expires_at: Timestamp,
    ) -> Result<(), ApplyError> {
        let entry =
            self.items.get_mut(&item_id).ok_or_else(|| fail_apply(sequence, "leased", format!("no item {item_id}")))?;
        if entry.item.lease.is_some() || entry.slot == Slot::Limbo {
            return Err(fail_apply(sequence, "leased", format!("item {item_id} is not pending")));
        }
        // One probe checks and claims the resource; nothing after it
        // can fail.
        if let Some(holder) = self.index.leased.claim(entry.resource(), item_id)
            && holder != item_id
        {
            return Err(fail_apply(sequence, "leased", format!("the resource of item {item_id} is already leased")));
        }
        self.index.remove_from_slot(entry);
        let fencing_token = FencingToken::from(sequence);
        entry.item.attempt = attempt;
        entry.item.last_fencing_token = fencing_token;
        entry.item.lease = Some(Lease { lease_id, fencing_token, owner, leased_at: at, expires_at });
        entry.slot = Slot::Leased;
        self.pending -= 1;
        self.active += 1;
        self.push_expiry((expires_at, fencing_token, item_id));
        Ok(())
    }

    #[inline(never)]
    fn apply_completed(
        &mut self,
        sequence: Sequence,
        at: Timestamp,
        item_id: ItemId,
        fencing_token: FencingToken,
    ) -> Result<(), ApplyError> {
        // Removed first and put back if it does not fit: one lookup
        // on the common path.
        let Some(mut entry) = self.items.remove(&item_id) else {
            return Err(fail_apply(sequence, "completed", format!("no item {item_id}")));
        };
        if entry.item.lease.as_ref().is_none_or(|lease| lease.fencing_token != fencing_token) {
            self.items.insert(item_id, entry);
            return Err(fail_apply(sequence, "completed", format!("item {item_id} has no lease {fencing_token}")));
        }
        self.end_lease(&mut entry, AttemptOutcome::Completed, String::new(), at);
        let request_id = match entry.item.payload.request_id.as_str() {
            "" => String::new(),
            request_id => request_id.to_owned(),
        };
        self.completed_tokens.insert(item_id, fencing_token);
        self.completed.push_back(Completion { item_id, fencing_token, completed_at: at, request_id });
        self.evict_completions(at);
        Ok(())
    }

    #[inline(never)]
    fn apply_other(&mut self, sequence: Sequence, at: Timestamp, kind: EventKind) -> Result<(), ApplyError> {
        match kind {
            EventKind::Heartbeat { item_id, fencing_token, expires_at, progress: _ } => {
                let lease = self
                    .items
                    .get_mut(&item_id)
                    .and_then(|entry| entry.item.lease.as_mut())
                    .filter(|lease| lease.fencing_token == fencing_token)
                    .ok_or_else(|| {
                        fail_apply(sequence, "heartbeat", format!("item {item_id} has no lease {fencing_token}"))
                    })?;
                let old = (lease.expires_at, fencing_token, item_id);
                lease.expires_at = expires_at;
                self.index.drop_expiry_if_top(&old);
                self.push_expiry((expires_at, fencing_token, item_id));
            }
            EventKind::Failed { item_id, fencing_token, error } => {
                self.check_leased(item_id, fencing_token).map_err(|reason| fail_apply(sequence, "failed", reason))?;
                let mut entry = self.items.remove(&item_id).expect("check_leased found the item");
                entry.item.last_error.clone_from(&error);
                self.end_lease(&mut entry, AttemptOutcome::Failed, error, at);
                self.items.insert(item_id, entry);
            }
            EventKind::Expired { item_id, fencing_token, owner: _ } => {
                self.check_leased(item_id, fencing_token).map_err(|reason| fail_apply(sequence, "expired", reason))?;
                let mut entry = self.items.remove(&item_id).expect("check_leased found the item");
                entry.item.last_error = EXPIRED_ERROR.to_string();
                self.end_lease(&mut entry, AttemptOutcome::Expired, EXPIRED_ERROR.to_string(), at);
                self.items.insert(item_id, entry);
            }
            EventKind::Requeued { item_id, not_before, reason } => {
                let entry = self
                    .items
                    .get(&item_id)
                    .ok_or_else(|| fail_apply(sequence, "requeued", format!("no item {item_id}")))?;
                match (reason, entry.slot) {
                    (RequeueReason::HandedBack, Slot::Leased)
                    | (RequeueReason::Failed | RequeueReason::Expired, Slot::Limbo) => {}
                    (_, slot) => {
                        return Err(fail_apply(
                            sequence,
                            "requeued",
                            format!("item {item_id} cannot be requeued from {slot:?}"),
                        ));
                    }
                }
                let mut entry = self.items.remove(&item_id).expect("looked up above");
                if reason == RequeueReason::HandedBack {
                    self.end_lease(&mut entry, AttemptOutcome::HandedBack, HANDED_BACK_ERROR.to_string(), at);
                }
                entry.item.not_before = not_before;
                self.pending += 1;
                self.index.insert_pending(&mut entry, at);
                self.items.insert(item_id, entry);
                self.compact_ready();
            }
            EventKind::DeadLettered { item_id, reason } => {
                match self.items.get(&item_id) {
                    Some(entry) if entry.slot == Slot::Limbo => {}
                    Some(_) => {
                        return Err(fail_apply(
                            sequence,
                            "dead_lettered",
                            format!("item {item_id} is not between attempts"),
                        ));
                    }
                    None => return Err(fail_apply(sequence, "dead_lettered", format!("no item {item_id}"))),
                }
                let entry = self.items.remove(&item_id).expect("looked up above");
                let order = self.next_dead_order;
                self.next_dead_order += 1;
                self.dead_order.insert(order, item_id);
                let letter = DeadLetter { item: entry.item, dead_lettered_at: at, reason };
                self.dead.insert(item_id, DeadEntry { letter, order });
            }
            EventKind::Redriven { item_id, not_before } => {
                let dead = self
                    .dead
                    .remove(&item_id)
                    .ok_or_else(|| fail_apply(sequence, "redriven", format!("no dead letter {item_id}")))?;
                self.dead_order.remove(&dead.order);
                let mut item = dead.letter.item;
                item.attempt = 0;
                item.not_before = not_before;
                self.admit(item, at);
            }
            EventKind::DeadLettersPurged { item_ids } => {
                if let Some(missing) = item_ids.iter().find(|id| !self.dead.contains_key(id)) {
                    return Err(fail_apply(sequence, "dead_letters_purged", format!("no dead letter {missing}")));
                }
                for item_id in item_ids {
                    let dead = self.dead.remove(&item_id).expect("checked above");
                    self.dead_order.remove(&dead.order);
                    self.forget_request(&dead.letter.item.payload.request_id, item_id);
                }
            }
            EventKind::DrainedPurged { item_ids } => {
                if self.draining.is_none() {
                    return Err(fail_apply(sequence, "drained_purged", "the queue is not draining".to_string()));
                }
                let mut seen = std::collections::HashSet::with_capacity(item_ids.len());
                let not_pending = item_ids.iter().find(|id| {
                    !self.items.get(id).is_some_and(|entry| !matches!(entry.slot, Slot::Leased | Slot::Limbo))
                        || !seen.insert(**id)
                });
                if let Some(id) = not_pending {
                    return Err(fail_apply(sequence, "drained_purged", format!("item {id} is not pending once")));
                }
                for item_id in item_ids {
                    let mut entry = self.items.remove(&item_id).expect("checked above");
                    self.index.remove_from_slot(&mut entry);
                    self.pending -= 1;
                    self.forget_request(&entry.item.payload.request_id, item_id);
                }
            }
            EventKind::DrainStarted { mode } => self.draining = Some(mode),
            EventKind::Drained { .. } => {}
            EventKind::Resumed => self.draining = None,
            EventKind::Restored { items, skipped: _ } => {
                if let Some(present) = items.iter().find(|item| self.contains(item.id)) {
                    return Err(fail_apply(sequence, "restored", format!("item {} is already present", present.id)));
                }
                for mut item in items {
                    item.lease = None;
                    if !item.payload.request_id.is_empty() {
                        self.requests.entry(item.payload.request_id.clone()).or_insert(item.id);
                    }
                    self.admit(item, at);
                }
            }
            EventKind::BackpressureChanged { signal } => self.backpressure = signal,
            EventKind::Enqueued(_) | EventKind::Leased { .. } | EventKind::Completed { .. } => {
                unreachable!("applied by their own functions")
            }
        }
        Ok(())
    }

    #[inline]
    fn resource_hash(&self, payload: &Payload) -> u64 {
        resource_hash(&self.resource_hasher, payload)
    }

    /// Whether `item_id` is in the queue or the dead-letter list.
    #[inline]
    pub(crate) fn contains(&self, item_id: ItemId) -> bool {
        self.items.contains_key(&item_id) || (!self.dead.is_empty() && self.dead.contains_key(&item_id))
    }

    #[inline(never)]
    fn apply_enqueued(&mut self, new: NewItem, at: Timestamp) -> Result<(), String> {
        if !self.dead.is_empty() && self.dead.contains_key(&new.id) {
            return Err(format!("item {} is already present", new.id));
        }
        // One lookup both checks that the id is new and places the item.
        let slot = match self.items.entry(new.id) {
            std::collections::hash_map::Entry::Occupied(_) => {
                return Err(format!("item {} is already present", new.id));
            }
            std::collections::hash_map::Entry::Vacant(slot) => slot,
        };
        if !new.payload.request_id.is_empty() {
            match self.requests.get(&new.payload.request_id) {
                Some(existing) => return Err(format!("request id already created item {existing}")),
                None => {
                    self.requests.insert(new.payload.request_id.clone(), new.id);
                }
            }
        }
        let order = self.next_order;
        self.next_order += 1;
        let resource_hash = resource_hash(&self.resource_hasher, &new.payload);
        let mut entry = Entry {
            item: WorkItem {
                id: new.id,
                payload: new.payload,
                priority: new.priority,
                enqueued_at: new.enqueued_at,
                not_before: new.not_before,
                attempt: 0,
                last_error: String::new(),
                last_fencing_token: FencingToken::NONE,
                history: Vec::new(),
                lease: None,
            },
            resource_hash,
            order,
            slot: Slot::Limbo,
        };
        self.index.insert_pending(&mut entry, at);
        slot.insert(entry);
        self.pending += 1;
        self.compact_ready();
        Ok(())
    }

    /// Adds a pending item at the back of queue order.
    #[inline]
    fn admit(&mut self, item: WorkItem, at: Timestamp) {
        let order = self.next_order;
        self.next_order += 1;
        let item_id = item.id;
        let resource_hash = self.resource_hash(&item.payload);
        let mut entry = Entry { item, resource_hash, order, slot: Slot::Limbo };
        self.index.insert_pending(&mut entry, at);
        self.items.insert(item_id, entry);
        self.pending += 1;
        self.compact_ready();
    }

    /// Adds a lease's expiry; compacts the heap first if stale entries
    /// outnumber live ones.
    #[inline]
    fn push_expiry(&mut self, key: ExpiryKey) {
        let live = self.active as usize;
        if self.index.expiry.len() > 2 * live + defaults::INDEX_STALE_SLACK {
            let items = &self.items;
            self.index
                .expiry
                .retain(|Reverse((expires_at, token, item_id))| is_live_expiry(items, *expires_at, *token, *item_id));
        }
        self.index.expiry.push(Reverse(key));
    }

    /// Drops stale ready keys once they outnumber live ones.
    #[inline]
    fn compact_ready(&mut self) {
        if self.index.ready.len() > 2 * self.index.ready_live + defaults::INDEX_STALE_SLACK {
            let items = &self.items;
            self.index.ready.retain(|Reverse(key)| is_live_ready(items, key));
        }
    }

    fn check_leased(&self, item_id: ItemId, fencing_token: FencingToken) -> Result<(), String> {
        match self.items.get(&item_id).map(|entry| entry.item.lease.as_ref()) {
            Some(Some(lease)) if lease.fencing_token == fencing_token => Ok(()),
            Some(_) => Err(format!("item {item_id} has no lease {fencing_token}")),
            None => Err(format!("no item {item_id}")),
        }
    }

    /// Ends the current lease of `entry` (removed from `items` by the
    /// caller), records the attempt, and unblocks the resource's other items.
    #[inline]
    fn end_lease(&mut self, entry: &mut Entry, outcome: AttemptOutcome, error: String, at: Timestamp) {
        let lease = entry.item.lease.take().expect("callers check that the item is leased");
        self.index.drop_expiry_if_top(&(lease.expires_at, lease.fencing_token, entry.item.id));
        let resource = entry.resource();
        self.index.leased.remove(&resource);
        if outcome != AttemptOutcome::Completed {
            entry.item.history.push(AttemptRecord {
                attempt: entry.item.attempt,
                owner: lease.owner,
                fencing_token: lease.fencing_token,
                lease_id: lease.lease_id,
                leased_at: lease.leased_at,
                ended_at: at,
                outcome,
                error,
            });
        }
        entry.slot = Slot::Limbo;
        self.active -= 1;
        if !self.index.blocked.is_empty()
            && let Some(blocked) = self.index.blocked.remove(&resource)
        {
            for (_, _, blocked_id) in blocked {
                if let Some(waiting) = self.items.get_mut(&blocked_id) {
                    waiting.slot = Slot::Limbo;
                    self.index.insert_pending(waiting, at);
                }
            }
        }
    }

    fn forget_request(&mut self, request_id: &str, item_id: ItemId) {
        if !request_id.is_empty() && self.requests.get(request_id) == Some(&item_id) {
            self.requests.remove(request_id);
        }
    }

    /// Drops completions older than the retention window or beyond the cap.
    /// Driven by event times, so replay evicts exactly the same ones.
    #[inline]
    fn evict_completions(&mut self, now: Timestamp) {
        let due = self.completed.len() > defaults::COMPLETED_RETAINED_MAX
            || self.completed.front().is_some_and(|oldest| completion_lapsed(oldest, now));
        if due {
            self.evict_completions_due(now);
        }
    }

    fn evict_completions_due(&mut self, now: Timestamp) {
        while let Some(oldest) = self.completed.front() {
            let too_many = self.completed.len() > defaults::COMPLETED_RETAINED_MAX;
            if !too_many && !completion_lapsed(oldest, now) {
                break;
            }
            let oldest = self.completed.pop_front().expect("front exists");
            if self.completed_tokens.get(&oldest.item_id) == Some(oldest.fencing_token) {
                self.completed_tokens.remove(&oldest.item_id);
            }
            if !oldest.request_id.is_empty() && self.requests.get(&oldest.request_id) == Some(&oldest.item_id) {
                self.requests.remove(&oldest.request_id);
            }
        }
    }

    // ----- snapshots -----

    /// Rebuilds a state from its parts (decoded from a snapshot), then its
    /// indexes and derived maps.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        shard: ShardId,
        last_sequence: Sequence,
        items: Vec<(WorkItem, u64)>,
        dead: Vec<(DeadLetter, u64)>,
        completed: Vec<Completion>,
        draining: Option<DrainMode>,
        backpressure: BackpressureSignal,
        next_order: u64,
        next_dead_order: u64,
    ) -> Self {
        let mut state = Self::new(shard);
        state.last_sequence = last_sequence;
        state.draining = draining;
        state.backpressure = backpressure;
        state.next_order = next_order;
        state.next_dead_order = next_dead_order;
        for completion in completed {
            state.completed_tokens.insert(completion.item_id, completion.fencing_token);
            if !completion.request_id.is_empty() {
                state.requests.insert(completion.request_id.clone(), completion.item_id);
            }
            state.completed.push_back(completion);
        }
        for (letter, order) in dead {
            if !letter.item.payload.request_id.is_empty() {
                state.requests.insert(letter.item.payload.request_id.clone(), letter.item.id);
            }
            state.dead_order.insert(order, letter.item.id);
            state.dead.insert(letter.item.id, DeadEntry { letter, order });
        }
        // Leases first, so pending items of leased resources go to `blocked`.
        let (leased, pending): (Vec<_>, Vec<_>) = items.into_iter().partition(|(item, _)| item.lease.is_some());
        for (item, order) in leased.into_iter().chain(pending) {
            if !item.payload.request_id.is_empty() {
                state.requests.insert(item.payload.request_id.clone(), item.id);
            }
            let item_id = item.id;
            let resource_hash = state.resource_hash(&item.payload);
            let mut entry = Entry { item, resource_hash, order, slot: Slot::Limbo };
            if let Some(lease) = &entry.item.lease {
                state.index.leased.insert(entry.resource(), item_id);
                state.index.expiry.push(Reverse((lease.expires_at, lease.fencing_token, item_id)));
                entry.slot = Slot::Leased;
                state.active += 1;
            } else {
                state.index.insert_pending(&mut entry, Timestamp::EPOCH);
                state.pending += 1;
            }
            state.items.insert(item_id, entry);
        }
        state
    }

    pub(crate) fn completions(&self) -> impl Iterator<Item = &Completion> {
        self.completed.iter()
    }

    /// Checks every index and derived map against the state proper; used by
    /// tests after each step. Returns what is inconsistent.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut pending = 0;
        let mut active = 0;
        let mut leased_resources = HashMap::new();
        let ready: BTreeSet<ReadyKey> =
            self.index.ready.iter().map(|Reverse(key)| *key).filter(|key| self.ready_is_live(key)).collect();
        let expiries: BTreeSet<ExpiryKey> =
            self.index.expiry.iter().map(|Reverse(key)| *key).filter(|key| self.expiry_is_live(key)).collect();
        let ready_items = self.items.values().filter(|entry| entry.slot == Slot::Ready).count();
        if ready.len() != ready_items || self.index.ready_live != ready_items {
            return Err(format!(
                "the ready index holds {} live items and counts {}; {ready_items} items are ready",
                ready.len(),
                self.index.ready_live
            ));
        }
        for (id, entry) in &self.items {
            if *id != entry.item.id {
                return Err(format!("item {id} stored under another id"));
            }
            match (&entry.item.lease, entry.slot) {
                (Some(lease), Slot::Leased) => {
                    active += 1;
                    if leased_resources.insert(entry.resource(), *id).is_some() {
                        return Err(format!("two leases on the resource of item {id}"));
                    }
                    if !expiries.contains(&(lease.expires_at, lease.fencing_token, *id)) {
                        return Err(format!("lease of item {id} missing from the expiry index"));
                    }
                }
                (None, Slot::Ready) if ready.contains(&entry.ready_key()) => pending += 1,
                (None, Slot::Delayed) if self.index.delayed.contains(&(entry.item.not_before, entry.order, *id)) => {
                    pending += 1
                }
                (None, Slot::Blocked)
                    if self
                        .index
                        .blocked
                        .get(&entry.resource())
                        .is_some_and(|set| set.contains(&entry.ready_key())) =>
                {
                    pending += 1
                }
                (lease, slot) => return Err(format!("item {id} has lease {lease:?} but slot {slot:?}")),
            }
        }
        let indexed =
            ready.len() + self.index.delayed.len() + self.index.blocked.values().map(BTreeSet::len).sum::<usize>();
        if indexed as u64 != pending || expiries.len() as u64 != active {
            return Err(format!("indexes hold {indexed} pending and {} leases", expiries.len()));
        }
        if leased_resources.len() != self.index.leased.len()
            || leased_resources.iter().any(|(resource, id)| self.index.leased.get(resource) != Some(*id))
        {
            return Err("the leased-resource index disagrees with the leases".into());
        }
        if pending != self.pending || active != self.active {
            return Err(format!(
                "counters say {} pending, {} active; items say {pending}, {active}",
                self.pending, self.active
            ));
        }
        if self.dead_order.len() != self.dead.len()
            || self.dead_order.iter().any(|(order, id)| self.dead.get(id).map(|d| d.order) != Some(*order))
        {
            return Err("dead-letter order disagrees with dead letters".into());
        }
        let mut requests = HashMap::new();
        for completion in &self.completed {
            if !completion.request_id.is_empty() {
                requests.insert(completion.request_id.clone(), completion.item_id);
            }
        }
        for payload_and_id in self
            .items
            .values()
            .map(|e| (&e.item.payload, e.item.id))
            .chain(self.dead.values().map(|d| (&d.letter.item.payload, d.letter.item.id)))
        {
            if !payload_and_id.0.request_id.is_empty() {
                requests.insert(payload_and_id.0.request_id.clone(), payload_and_id.1);
            }
        }
        if requests != self.requests {
            return Err("the request-id index disagrees with items and completions".into());
        }
        let remembered =
            self.completed.iter().filter(|c| self.completed_tokens.get(&c.item_id) == Some(c.fencing_token));
        let remembered: std::collections::HashSet<ItemId> = remembered.map(|c| c.item_id).collect();
        if remembered.len() != self.completed_tokens.len() {
            return Err("the completed-token index disagrees with the completions".into());
        }
        Ok(())
    }
}

/// Whether a completion is older than the retention window at `now`
/// (compared in nanoseconds: a `Duration` would be built by division).
#[inline]
fn completion_lapsed(completion: &Completion, now: Timestamp) -> bool {
    const RETENTION_NANOS: u64 = defaults::COMPLETED_RETENTION.as_nanos() as u64;
    now.as_unix_nanos().saturating_sub(completion.completed_at.as_unix_nanos()) > RETENTION_NANOS
}

/// The keyed hash of a payload's resource (see [`ResourceKey`]).
#[inline]
fn resource_hash(hasher: &foldhash::fast::RandomState, payload: &Payload) -> u64 {
    use std::hash::BuildHasher;
    // The two strings with a separator (equal keys also compare the
    // strings, so a collision between, say, "a\0" + "b" and "a" + "\0b"
    // costs a comparison, never a wrong answer).
    let mut hasher = hasher.build_hasher();
    hasher.write(payload.resource_type.as_bytes());
    hasher.write_u8(0);
    hasher.write(payload.resource_id.as_bytes());
    hasher.finish()
}

/// Drops a heap's top entry. A heap of one is common (a queue that keeps up
/// holds a lease or two), and clearing it skips the pop's sift.
#[inline]
fn drop_top<T: Ord>(heap: &mut BinaryHeap<T>) {
    if heap.len() == 1 {
        heap.clear();
    } else {
        heap.pop();
    }
}

#[cold]
fn fail_apply(sequence: Sequence, event: &'static str, reason: String) -> ApplyError {
    ApplyError { sequence, event, reason }
}

/// Whether `key` is the ready key of an item in the ready set.
fn is_live_ready(items: &IdMap<Entry>, key: &ReadyKey) -> bool {
    // The key is compared too: a redriven or restored item comes back with
    // a new queue order, and its old key must not put it back in line.
    items.get(&key.2).is_some_and(|entry| entry.slot == Slot::Ready && entry.ready_key() == *key)
}

/// Whether `(expires_at, token)` is the current expiry of `item_id`'s lease.
#[inline]
fn is_live_expiry(items: &IdMap<Entry>, expires_at: Timestamp, token: FencingToken, item_id: ItemId) -> bool {
    items
        .get(&item_id)
        .and_then(|entry| entry.item.lease.as_ref())
        .is_some_and(|lease| lease.fencing_token == token && lease.expires_at == expires_at)
}

/// Error text recorded for an attempt whose lease lapsed.
pub(crate) const EXPIRED_ERROR: &str = "lease expired";

/// Error text recorded for an attempt a drain handed back.
pub(crate) const HANDED_BACK_ERROR: &str = "handed back by drain";

impl Index {
    /// Files a pending item (slot `Limbo`) under the index its state calls
    /// for, judging delays against `at`.
    #[inline(always)]
    fn insert_pending(&mut self, entry: &mut Entry, at: Timestamp) {
        debug_assert_eq!(entry.slot, Slot::Limbo);
        if !self.leased.is_empty() && self.leased.contains_key(&entry.resource()) {
            self.blocked.entry(entry.resource()).or_default().insert(entry.ready_key());
            entry.slot = Slot::Blocked;
        } else if entry.item.not_before > at {
            self.delayed.insert((entry.item.not_before, entry.order, entry.item.id));
            entry.slot = Slot::Delayed;
        } else {
            self.ready.push(Reverse(entry.ready_key()));
            self.ready_live += 1;
            entry.slot = Slot::Ready;
        }
    }

    /// Drops `key` from the expiry heap if it is on top; otherwise it stays,
    /// stale, until it surfaces or the heap is compacted.
    #[inline]
    fn drop_expiry_if_top(&mut self, key: &ExpiryKey) {
        if self.expiry.peek().is_some_and(|Reverse(top)| top == key) {
            drop_top(&mut self.expiry);
        }
    }

    #[inline]
    fn remove_from_slot(&mut self, entry: &mut Entry) {
        match entry.slot {
            Slot::Ready => {
                // Usually the top (leases take the first ready item); any
                // other key stays, stale, until it surfaces or is compacted.
                let key = entry.ready_key();
                if self.ready.peek().is_some_and(|Reverse(top)| *top == key) {
                    drop_top(&mut self.ready);
                }
                self.ready_live -= 1;
            }
            Slot::Delayed => {
                self.delayed.remove(&(entry.item.not_before, entry.order, entry.item.id));
            }
            Slot::Blocked => {
                let resource = entry.resource();
                if let Some(set) = self.blocked.get_mut(&resource) {
                    set.remove(&entry.ready_key());
                    if set.is_empty() {
                        self.blocked.remove(&resource);
                    }
                }
            }
            Slot::Leased | Slot::Limbo => {}
        }
        entry.slot = Slot::Limbo;
    }
}

/// Exponential backoff before retry `attempt + 1`, with a deterministic
/// jitter of up to a quarter of the delay (derived from the item id and
/// attempt, so retries of many items failing together spread out).
pub(crate) fn backoff(item_id: ItemId, attempt: u32, base: Duration, max: Duration) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let delay = base.saturating_mul(1 << exponent).min(max);
    let mut hasher = IdHasher::default();
    hasher.write_u128(item_id.as_u128() ^ u128::from(attempt));
    let quarter = delay.as_nanos() as u64 / 4;
    let jitter = if quarter == 0 { 0 } else { hasher.finish() % quarter };
    (delay - Duration::from_nanos(quarter)) + Duration::from_nanos(jitter)
}
