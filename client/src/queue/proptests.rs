//! Property tests: random command sequences with time jumps, bursts of
//! concurrent commands, and a replicator that answers late and out of order,
//! loses answers after writing, fails before writing, or refuses a stale
//! epoch. After every step the queue's invariants hold; every acknowledged
//! command is in the log; and replaying the log (or a snapshot plus its
//! tail) rebuilds the live state byte for byte.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::state::Slot;
use super::*;
use crate::clock::ManualClock;
use crate::error::ErrorCode;
use crate::replication::scripted::{Answer, ScriptedReplicator};

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
    Fault { after_write: bool, delay_ms: u8 },
    Steal,
    Burst { enqueues: u8, leases: u8, completes: u8, delays: Vec<u8> },
    Snapshot,
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
        1 => (any::<bool>(), 0u8..20).prop_map(|(after_write, delay_ms)| Op::Fault { after_write, delay_ms }),
        1 => Just(Op::Steal),
        2 => (0u8..5, 0u8..4, 0u8..4, prop::collection::vec(0u8..20, 0..12))
            .prop_map(|(enqueues, leases, completes, delays)| Op::Burst { enqueues, leases, completes, delays }),
        1 => Just(Op::Snapshot),
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

/// What an acknowledged command promised is in the log.
#[derive(Debug)]
enum Acked {
    Enqueued { sequence: Sequence, item_id: ItemId },
    Leased { token: FencingToken, item_id: ItemId },
    Completed { token: FencingToken, item_id: ItemId },
    Failed { token: FencingToken, item_id: ItemId },
}

fn check_acknowledged(acked: &[Acked], events: &[SequencedEvent]) -> Result<(), TestCaseError> {
    let at = |sequence: Sequence| events.iter().find(|e| e.sequence == sequence).map(|e| &e.event.kind);
    for fact in acked {
        let found = match fact {
            Acked::Enqueued { sequence, item_id } => {
                matches!(at(*sequence), Some(EventKind::Enqueued(new)) if new.id == *item_id)
            }
            Acked::Leased { token, item_id } => {
                matches!(at(Sequence::new(token.get())), Some(EventKind::Leased { item_id: id, .. }) if id == item_id)
            }
            Acked::Completed { token, item_id } => events.iter().any(|e| {
                matches!(&e.event.kind, EventKind::Completed { item_id: id, fencing_token } if id == item_id && fencing_token == token)
            }),
            Acked::Failed { token, item_id } => events.iter().any(|e| {
                matches!(&e.event.kind, EventKind::Failed { item_id: id, fencing_token, .. } if id == item_id && fencing_token == token)
            }),
        };
        prop_assert!(found, "acknowledged {:?} is not in the log", fact);
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime should build");
    runtime.block_on(async move {
        let clock = ManualClock::new(Timestamp::from_unix_nanos(1_700_000_000_000_000_000));
        let replicator = Arc::new(ScriptedReplicator::new(Duration::ZERO));
        let log = Arc::clone(&replicator.log);
        let mut config = QueueConfig::new("resourcelease.prop", "node-a");
        config.capacity = 12;
        config.high_watermark = 8;
        config.low_watermark = 4;
        config.max_attempts = MAX_ATTEMPTS;
        config.lease_duration = Duration::from_secs(5);
        config.backoff_base = Duration::from_secs(1);
        config.backoff_max = Duration::from_secs(8);
        let shard = ShardId::from("resourcelease.prop");
        let epoch = log.steal(&shard, "node-a");
        let queue =
            Queue::builder(config, replicator.clone()).clock(clock.clone()).epoch(epoch).build().expect("valid config");
        let caller = Caller::new("spiffe://prop/caller", "node-b");
        let mut model = LogModel::default();
        let mut handles: Vec<LeaseHandle> = Vec::new();
        let mut last_drain: Option<DrainSnapshot> = None;
        let mut acked: Vec<Acked> = Vec::new();
        let mut checkpoints: Vec<(Sequence, Vec<u8>)> = Vec::new();

        for op in ops {
            if matches!(op, Op::Lease { .. }) {
                // Expire first so the lease's own expiry pass has nothing to do
                // and the expected grant can be computed from the state.
                let _ = queue.expire_due().await;
            }
            // Commands run one at a time here (bursts excepted), so before
            // each one everything decided is durable.
            let before = queue.encode_state().await;
            let head_before = log.head(&shard);
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
                    queue.enqueue(&caller, request).await.map(|enqueued| {
                        if !enqueued.deduplicated {
                            acked.push(Acked::Enqueued { sequence: enqueued.sequence, item_id: enqueued.item_id });
                        }
                    })
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
                            prop_assert!(!draining, "a draining queue granted a lease");
                            prop_assert_eq!(granted.as_ref().map(|g| g.handle.item_id), expected, "lease order");
                            if let Some(granted) = granted {
                                acked.push(Acked::Leased {
                                    token: granted.handle.fencing_token,
                                    item_id: granted.handle.item_id,
                                });
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
                    queue.complete(&caller, &handle).await.map(|again| {
                        if !again {
                            acked.push(Acked::Completed { token: handle.fencing_token, item_id: handle.item_id });
                        }
                    })
                }
                Op::Fail { handle, dead_letter, delay_secs } if !handles.is_empty() => {
                    let handle = handles[handle % handles.len()].clone();
                    let request = FailRequest {
                        error: "boom".into(),
                        action: if dead_letter { FailAction::DeadLetter } else { FailAction::Requeue },
                        requeue_delay: delay_secs.map(|s| Duration::from_secs(s.into())),
                    };
                    queue.fail(&caller, &handle, request).await.map(|_| {
                        acked.push(Acked::Failed { token: handle.fencing_token, item_id: handle.item_id });
                    })
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
                Op::Fault { after_write, delay_ms } => {
                    let answer = if after_write { Answer::LostAfterWrite } else { Answer::FailedBeforeWrite };
                    replicator.script([(Duration::from_millis(delay_ms.into()), answer)]);
                    Ok(())
                }
                Op::Steal => {
                    log.steal(&shard, "node-z");
                    Ok(())
                }
                Op::Snapshot => match queue.write_snapshot().await {
                    Ok(_) | Err(QueueError::Fenced { .. }) | Err(QueueError::Replication(_)) => Ok(()),
                    Err(error) => Err(error),
                },
                Op::Burst { enqueues, leases, completes, delays } => {
                    replicator.script(delays.iter().map(|ms| (Duration::from_millis((*ms).into()), Answer::Ack)));
                    let mut calls: Vec<Pin<Box<dyn Future<Output = Option<Acked>> + '_>>> = Vec::new();
                    for n in 0..enqueues {
                        let queue = &queue;
                        let caller = &caller;
                        calls.push(Box::pin(async move {
                            let payload = Payload::new("res", format!("b{n}"), vec![n]);
                            let enqueued = queue.enqueue(caller, EnqueueRequest::new(payload)).await.ok()?;
                            Some(Acked::Enqueued { sequence: enqueued.sequence, item_id: enqueued.item_id })
                        }));
                    }
                    for n in 0..leases {
                        let queue = &queue;
                        let caller = &caller;
                        calls.push(Box::pin(async move {
                            let leased = queue.lease(caller, LeaseRequest::new(format!("b{n}"))).await.ok()??;
                            Some(Acked::Leased { token: leased.handle.fencing_token, item_id: leased.handle.item_id })
                        }));
                    }
                    for handle in handles.iter().rev().take(completes.into()) {
                        let queue = &queue;
                        let caller = &caller;
                        calls.push(Box::pin(async move {
                            match queue.complete(caller, handle).await {
                                Ok(false) => {
                                    Some(Acked::Completed { token: handle.fencing_token, item_id: handle.item_id })
                                }
                                _ => None,
                            }
                        }));
                    }
                    let answers = futures_util::future::join_all(calls).await;
                    acked.extend(answers.into_iter().flatten());
                    Ok(())
                }
                Op::Heartbeat { .. } | Op::Complete { .. } | Op::Fail { .. } => Ok(()),
            };
            if let Err(error) = &result {
                if error.code() != ErrorCode::Unavailable {
                    // A refusal changes nothing and writes nothing.
                    prop_assert_eq!(
                        &queue.encode_state().await,
                        &before,
                        "a refused {:?} ({}) changed the state",
                        op,
                        error
                    );
                    prop_assert_eq!(log.head(&shard), head_before, "a refused {:?} wrote to the log", op);
                }
                if matches!(error, QueueError::StaleToken { .. }) {
                    prop_assert_eq!(error.code(), ErrorCode::Aborted);
                }
            }
            // A fenced shard is rebuilt from its log under a new epoch, as its
            // owner would.
            if queue.replication().fence.is_some() {
                let epoch = log.steal(&shard, "node-a");
                queue.recover(epoch).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                let replayed = QueueState::replay(shard.clone(), &log.events(&shard))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(replayed.encode() == queue.encode_state().await, "a rebuild is the log's state");
            }
            queue.settled().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
            queue.inspect(QueueState::check_invariants).await.map_err(TestCaseError::fail)?;
            model.observe(&log.read(&shard, model.seen))?;
            if checkpoints.len() < 4 && !matches!(op, Op::Fault { .. } | Op::Steal) {
                let (sequence, bytes) = queue.inspect(|s| (s.last_sequence(), s.encode())).await;
                checkpoints.push((sequence, bytes));
            }
        }

        // Settle any trailing fault or theft, then replay.
        let _ = queue.expire_due().await;
        if queue.replication().fence.is_some() {
            let epoch = log.steal(&shard, "node-a");
            queue.recover(epoch).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        queue.settled().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let live = queue.encode_state().await;
        let events = log.events(&shard);
        check_acknowledged(&acked, &events)?;
        let replayed = QueueState::replay(shard.clone(), &events).map_err(|e| TestCaseError::fail(e.to_string()))?;
        replayed.check_invariants().map_err(TestCaseError::fail)?;
        prop_assert!(replayed.encode() == live, "replaying the log rebuilds the live state byte for byte");
        for (sequence, snapshot) in checkpoints {
            let mut rebuilt = QueueState::decode(&snapshot).map_err(|e| TestCaseError::fail(e.to_string()))?;
            rebuilt.apply_all(&log.read(&shard, sequence)).map_err(|e| TestCaseError::fail(e.to_string()))?;
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
