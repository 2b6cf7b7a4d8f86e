//! Property tests: random command sequences with time jumps and injected
//! replication faults, checking the queue's invariants after every step and
//! replay at the end.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::state::Slot;
use super::*;
use crate::clock::ManualClock;
use crate::error::ErrorCode;
use crate::replication::{InMemoryReplicator, PublishFault};

const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone)]
enum Op {
    Enqueue { resource: u8, priority: i8, delay_secs: u8, request: Option<u8> },
    Lease { owner: u8, secs: u8 },
    Heartbeat { handle: usize, secs: u8 },
    Complete { handle: usize, forge_owner: bool },
    Fail { handle: usize, dead_letter: bool, delay_secs: Option<u8> },
    Expire,
    Advance { secs: u8 },
    Drain { hand_back: bool },
    Resume,
    Redrive { pick: usize },
    Purge { pick: usize },
    RestoreLastDrain,
    Fault { after_write: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, -1i8..2, prop_oneof![3 => Just(0u8), 1 => 1u8..5], proptest::option::of(0u8..4))
            .prop_map(|(resource, priority, delay_secs, request)| Op::Enqueue { resource, priority, delay_secs, request }),
        6 => (0u8..3, 1u8..8).prop_map(|(owner, secs)| Op::Lease { owner, secs }),
        2 => (any::<usize>(), 1u8..8).prop_map(|(handle, secs)| Op::Heartbeat { handle, secs }),
        4 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(handle, forge_owner)| Op::Complete { handle, forge_owner }),
        3 => (any::<usize>(), prop::bool::weighted(0.2), proptest::option::of(0u8..3))
            .prop_map(|(handle, dead_letter, delay_secs)| Op::Fail { handle, dead_letter, delay_secs }),
        2 => Just(Op::Expire),
        3 => (0u8..12).prop_map(|secs| Op::Advance { secs }),
        1 => any::<bool>().prop_map(|hand_back| Op::Drain { hand_back }),
        1 => Just(Op::Resume),
        1 => any::<usize>().prop_map(|pick| Op::Redrive { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Purge { pick }),
        1 => Just(Op::RestoreLastDrain),
        1 => any::<bool>().prop_map(|after_write| Op::Fault { after_write }),
    ]
}

/// What the log says is leased right now, checked as events arrive.
#[derive(Default)]
struct LogModel {
    seen: Sequence,
    leases: HashMap<ItemId, (FencingToken, String)>,
    resources: HashMap<String, ItemId>,
    attempts: HashMap<ItemId, u32>,
    resource_of: HashMap<ItemId, String>,
    last_token: FencingToken,
}

impl LogModel {
    fn end(&mut self, item_id: ItemId) -> Result<(), TestCaseError> {
        let (_, resource) =
            self.leases.remove(&item_id).ok_or_else(|| TestCaseError::fail(format!("{item_id} was not leased")))?;
        self.resources.remove(&resource);
        Ok(())
    }

    fn observe(&mut self, events: &[SequencedEvent]) -> Result<(), TestCaseError> {
        for sequenced in events {
            prop_assert!(sequenced.sequence > self.seen, "the log is ordered");
            self.seen = sequenced.sequence;
            match &sequenced.event.kind {
                EventKind::Enqueued(new) => {
                    self.resource_of.insert(new.id, new.payload.resource_id.clone());
                }
                EventKind::Restored { items, .. } => {
                    for item in items {
                        self.resource_of.insert(item.id, item.payload.resource_id.clone());
                        self.attempts.insert(item.id, item.attempt);
                    }
                }
                EventKind::Redriven { item_id, .. } => {
                    self.attempts.insert(*item_id, 0);
                }
                EventKind::Leased { item_id, attempt, .. } => {
                    let token = FencingToken::from(sequenced.sequence);
                    prop_assert!(token > self.last_token, "fencing tokens strictly increase");
                    self.last_token = token;
                    let resource = self.resource_of[item_id].clone();
                    prop_assert!(!self.leases.contains_key(item_id), "item {item_id} leased twice at once");
                    prop_assert!(!self.resources.contains_key(&resource), "two live leases on resource {resource}");
                    self.leases.insert(*item_id, (token, resource.clone()));
                    self.resources.insert(resource, *item_id);
                    prop_assert_eq!(*attempt, self.attempts.get(item_id).copied().unwrap_or(0) + 1);
                    self.attempts.insert(*item_id, *attempt);
                }
                EventKind::Completed { item_id, fencing_token }
                | EventKind::Failed { item_id, fencing_token, .. }
                | EventKind::Expired { item_id, fencing_token, .. } => {
                    prop_assert_eq!(self.leases.get(item_id).map(|l| l.0), Some(*fencing_token), "ends the live lease");
                    self.end(*item_id)?;
                }
                EventKind::Requeued { item_id, reason: RequeueReason::HandedBack, .. } => self.end(*item_id)?,
                EventKind::DeadLettered { item_id, reason: DeadLetterReason::MaxAttempts } => {
                    let attempts = self.attempts.get(item_id).copied().unwrap_or(0);
                    prop_assert!(attempts >= MAX_ATTEMPTS, "dead-lettered after {attempts} attempts");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The item a lease at `now` must grant, found by a plain scan.
fn expected_grant(state: &QueueState, now: Timestamp) -> Option<ItemId> {
    let leased: Vec<(String, String)> = state
        .entries()
        .filter(|e| e.item.lease.is_some())
        .map(|e| (e.item.payload.resource_type.clone(), e.item.payload.resource_id.clone()))
        .collect();
    state
        .entries()
        .filter(|e| e.item.lease.is_none() && e.slot != Slot::Limbo && e.item.not_before <= now)
        .filter(|e| !leased.contains(&(e.item.payload.resource_type.clone(), e.item.payload.resource_id.clone())))
        .min_by_key(|e| (Reverse(e.item.priority), e.order))
        .map(|e| e.item.id)
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime should build");
    runtime.block_on(async move {
        let clock = ManualClock::new(Timestamp::from_unix_nanos(1_700_000_000_000_000_000));
        let replicator = Arc::new(InMemoryReplicator::new());
        let mut config = QueueConfig::new("resourcelease.prop", "node-a");
        config.capacity = 12;
        config.high_watermark = 8;
        config.low_watermark = 4;
        config.max_attempts = MAX_ATTEMPTS;
        config.lease_duration = Duration::from_secs(5);
        config.backoff_base = Duration::from_secs(1);
        config.backoff_max = Duration::from_secs(8);
        let queue = Queue::builder(config, replicator.clone()).clock(clock.clone()).build().expect("valid config");
        let shard = queue.shard().clone();
        let caller = Caller::new("spiffe://prop/caller", "node-b");
        let mut model = LogModel::default();
        let mut handles: Vec<LeaseHandle> = Vec::new();
        let mut last_drain: Option<DrainSnapshot> = None;
        let mut checkpoints: Vec<(Sequence, Vec<u8>)> = Vec::new();

        for op in ops {
            if matches!(op, Op::Lease { .. }) {
                // Expire first so the lease's own expiry pass has nothing to do
                // and the expected grant can be computed from the state.
                let _ = queue.expire_due().await;
            }
            // While a batch is in doubt (after an UNAVAILABLE), the next
            // command first settles it, which legitimately changes the state.
            let in_doubt = queue.in_doubt().await;
            let before = queue.encode_state().await;
            let head_before = replicator.head(&shard);
            let result: std::result::Result<(), QueueError> = match op.clone() {
                Op::Enqueue { resource, priority, delay_secs, request } => {
                    let mut payload = Payload::new("res", resource.to_string(), vec![resource; 3]);
                    if let Some(request) = request {
                        payload.request_id = format!("req-{request}");
                    }
                    let request = EnqueueRequest {
                        payload,
                        priority: priority.into(),
                        delay: Duration::from_secs(delay_secs.into()),
                    };
                    queue.enqueue(&caller, request).await.map(drop)
                }
                Op::Lease { owner, secs } => {
                    let now = clock.now();
                    let (draining, expected) =
                        queue.inspect(|s| (s.draining().is_some(), expected_grant(s, now))).await;
                    let request = LeaseRequest {
                        owner: PeerId::new(format!("w{owner}")),
                        wait: Duration::ZERO,
                        lease_duration: Some(Duration::from_secs(secs.into())),
                    };
                    match queue.lease(&caller, request).await {
                        Ok(granted) => {
                            if !in_doubt {
                                prop_assert!(!draining, "a draining queue granted a lease");
                                prop_assert_eq!(granted.as_ref().map(|g| g.handle.item_id), expected, "lease order");
                            }
                            if let Some(granted) = granted {
                                handles.push(granted.handle);
                            }
                            Ok(())
                        }
                        Err(error) => Err(error),
                    }
                }
                Op::Heartbeat { handle, secs } if !handles.is_empty() => {
                    let handle = handles[handle % handles.len()].clone();
                    queue
                        .heartbeat(&caller, &handle, Some(Duration::from_secs(secs.into())), BTreeMap::new())
                        .await
                        .map(drop)
                }
                Op::Complete { handle, forge_owner } if !handles.is_empty() => {
                    let mut handle = handles[handle % handles.len()].clone();
                    if forge_owner {
                        handle.owner = PeerId::from("forger");
                    }
                    queue.complete(&caller, &handle).await.map(drop)
                }
                Op::Fail { handle, dead_letter, delay_secs } if !handles.is_empty() => {
                    let handle = handles[handle % handles.len()].clone();
                    let request = FailRequest {
                        error: "boom".into(),
                        action: if dead_letter { FailAction::DeadLetter } else { FailAction::Requeue },
                        requeue_delay: delay_secs.map(|s| Duration::from_secs(s.into())),
                    };
                    queue.fail(&caller, &handle, request).await.map(drop)
                }
                Op::Expire => queue.expire_due().await.map(drop),
                Op::Advance { secs } => {
                    clock.advance(Duration::from_secs(secs.into()));
                    Ok(())
                }
                Op::Drain { hand_back } => {
                    let mode = if hand_back { DrainMode::HandBack } else { DrainMode::Wait };
                    queue.drain(&caller, mode, Some(Duration::ZERO)).await.map(|snapshot| last_drain = Some(snapshot))
                }
                Op::Resume => queue.resume(&caller).await.map(drop),
                Op::Redrive { pick } => {
                    let page = queue.dead_letters(0, None).await.expect("listing never fails");
                    match page.dead_letters.get(pick % page.dead_letters.len().max(1)) {
                        Some(letter) => queue.redrive(&caller, letter.item.id).await.map(drop),
                        None => Ok(()),
                    }
                }
                Op::Purge { pick } => {
                    let page = queue.dead_letters(0, None).await.expect("listing never fails");
                    match page.dead_letters.get(pick % page.dead_letters.len().max(1)) {
                        Some(letter) => {
                            queue.purge_dead_letters(&caller, Purge::Items(vec![letter.item.id])).await.map(drop)
                        }
                        None => Ok(()),
                    }
                }
                Op::RestoreLastDrain => match &last_drain {
                    Some(snapshot) => queue.restore(&caller, snapshot).await.map(drop),
                    None => Ok(()),
                },
                Op::Fault { after_write } => {
                    let fault = if after_write { PublishFault::AfterWrite } else { PublishFault::BeforeWrite };
                    replicator.inject([fault; defaults::PUBLISH_ATTEMPTS as usize]);
                    Ok(())
                }
                Op::Heartbeat { .. } | Op::Complete { .. } | Op::Fail { .. } => Ok(()),
            };
            if let Err(error) = &result {
                // A drain commits twice (start, then the snapshot event), so
                // only its first half may have happened when it fails.
                let multi_commit = matches!(op, Op::Drain { .. }) && error.code() == ErrorCode::Unavailable;
                if !in_doubt && !multi_commit {
                    prop_assert_eq!(
                        &queue.encode_state().await,
                        &before,
                        "a refused {:?} ({}) changed the state",
                        op,
                        error
                    );
                }
                if !in_doubt && error.code() != ErrorCode::Unavailable {
                    prop_assert_eq!(replicator.head(&shard), head_before, "a refused {:?} wrote to the log", op);
                }
                if matches!(error, QueueError::StaleToken { .. }) {
                    prop_assert_eq!(error.code(), ErrorCode::Aborted);
                }
            }
            queue.inspect(QueueState::check_invariants).await.map_err(TestCaseError::fail)?;
            model.observe(&replicator.read(&shard, model.seen))?;
            if checkpoints.len() < 4 && !matches!(op, Op::Fault { .. }) {
                let (sequence, bytes) = queue.inspect(|s| (s.last_sequence(), s.encode())).await;
                checkpoints.push((sequence, bytes));
            }
        }

        // Settle a batch left in doubt by a trailing fault, then replay.
        while queue.expire_due().await.is_err() {}
        let live = queue.encode_state().await;
        let events = replicator.events(&shard);
        let replayed = QueueState::replay(shard.clone(), &events).map_err(|e| TestCaseError::fail(e.to_string()))?;
        replayed.check_invariants().map_err(TestCaseError::fail)?;
        prop_assert!(replayed.encode() == live, "replaying the log rebuilds the live state byte for byte");
        for (sequence, snapshot) in checkpoints {
            let mut rebuilt = QueueState::decode(&snapshot).map_err(|e| TestCaseError::fail(e.to_string()))?;
            rebuilt.apply_all(&replicator.read(&shard, sequence)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(rebuilt.encode() == live, "snapshot at {} plus the tail rebuilds the live state", sequence);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn random_command_sequences_keep_every_queue_invariant(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
