//! The [`LogStore`] contract suite: every behaviour the trait documents, as
//! async functions any implementation can be run through.
//!
//! Instantiate it with [`log_store_contract!`](crate::log_store_contract),
//! giving an async factory that returns a fresh, empty store and a guard kept
//! alive for the test (a temporary database, say):
//!
//! ```ignore
//! async fn fresh() -> (PgStore, TestDb) { ... }
//! omnirelay_hub::log_store_contract!(fresh);
//! ```
//!
//! Each case panics with a message naming the broken rule. Lease expiry is
//! judged by the store's own clock, so the expiry case waits (a fraction of
//! a second) for a short lease to lapse.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::broadcast::error::RecvError;

use crate::log::event::{self, ChainHash, NewEvent};
use crate::log::ids::{Epoch, OwnerId, ProducerId, ProducerSeq, Sequence, ShardId, SubscriberId};
use crate::store::{AppendAck, AppendBatch, LogChange, LogStore, RetentionPolicy, StoreError};

/// Generates one `#[tokio::test]` per contract case, each calling
/// `$factory().await` for a fresh `(store, guard)` pair.
#[macro_export]
macro_rules! log_store_contract {
    ($factory:path) => {
        $crate::__log_store_contract_cases!(
            $factory;
            appends_get_gapless_sequences_from_one,
            append_requires_a_lease_and_the_current_epoch,
            a_new_grant_fences_the_previous_owner,
            retried_batches_return_the_original_sequences,
            a_producer_sequence_that_skips_ahead_is_rejected,
            a_batch_expecting_another_head_is_refused,
            appends_commit_in_call_order,
            empty_batches_are_rejected,
            reads_return_linked_events_that_verify,
            leases_renew_release_and_report_the_head,
            a_lease_is_bound_to_the_principal_that_took_it,
            checkpoints_never_move_backwards,
            checkpoint_pages_follow_byte_order,
            checkpoints_record_and_check_the_hash_of_their_event,
            snapshots_are_tied_to_the_log,
            retention_trims_below_the_older_of_snapshot_and_checkpoint,
            changes_announce_new_heads,
            sequence_at_finds_the_first_event_recorded_since,
            list_shards_filters_by_prefix
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_store_contract_cases {
    ($factory:path; $($case:ident),+) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (store, _guard) = $factory().await;
                $crate::store::contract::$case(&store).await;
            }
        )+
    };
}

/// A lease long enough that no case sees it lapse by accident.
const LONG: Duration = Duration::from_secs(60);

fn shard(name: &str) -> ShardId {
    ShardId::parse(name).expect("contract shard ids are valid")
}

fn owner(name: &str) -> OwnerId {
    OwnerId::parse(name).expect("contract owner ids are valid")
}

fn producer(name: &str) -> ProducerId {
    ProducerId::parse(name).expect("contract producer ids are valid")
}

fn subscriber(name: &str) -> SubscriberId {
    SubscriberId::parse(name).expect("contract subscriber ids are valid")
}

/// Events with distinct bodies `"{tag}-{i}"`, recorded one second apart from
/// `base` seconds after the epoch.
fn events(tag: &str, n: usize, base: u64) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent {
            recorded_at: SystemTime::UNIX_EPOCH + Duration::from_secs(base + i as u64),
            body: Bytes::from(format!("{tag}-{i}")),
        })
        .collect()
}

fn batch(shard: &ShardId, producer_name: &str, seq: u64, epoch: Epoch, events: Vec<NewEvent>) -> AppendBatch {
    AppendBatch {
        expected_first: None,
        shard: shard.clone(),
        producer: producer(producer_name),
        producer_seq: ProducerSeq(seq),
        epoch,
        events,
    }
}

async fn acquire<S: LogStore>(store: &S, shard: &ShardId, who: &str) -> Epoch {
    let grant = store.acquire_shard(shard.clone(), owner(who), LONG).await.expect("acquire should succeed");
    assert!(grant.granted, "{who} should be granted the free shard {shard}");
    grant.lease.epoch
}

async fn head<S: LogStore>(store: &S, shard: &ShardId) -> Sequence {
    store.shard_state(shard.clone()).await.expect("read state").expect("shard exists").lease.head
}

async fn read_all<S: LogStore>(store: &S, shard: &ShardId) -> Vec<event::LogEvent> {
    let page =
        store.read_range(shard.clone(), Sequence(1), None, 100_000, usize::MAX).await.expect("read should succeed");
    event::verify(shard, Sequence(1), &page.anchor, &page.events).expect("stored events should verify");
    page.events
}

/// Sequences start at 1, follow each other across batches, and the stored
/// chain verifies.
pub async fn appends_get_gapless_sequences_from_one<S: LogStore>(store: &S) {
    let s = shard("contract.gapless");
    let epoch = acquire(store, &s, "node-a").await;
    let first = store.append(batch(&s, "p", 1, epoch, events("a", 3, 0))).await.expect("first batch");
    assert_eq!((first.first, first.last, first.duplicate), (Sequence(1), Sequence(3), false));
    let second = store.append(batch(&s, "p", 2, epoch, events("b", 2, 10))).await.expect("second batch");
    assert_eq!((second.first, second.last), (Sequence(4), Sequence(5)));
    let stored = read_all(store, &s).await;
    assert_eq!(stored.iter().map(|e| e.sequence.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(stored[3].body, Bytes::from("b-0"));
    assert!(stored.iter().all(|e| e.epoch == epoch));
    assert_eq!(second.last_hash, stored[4].hash, "the ack carries the last event's chain hash");
    let state = store.shard_state(s.clone()).await.expect("state").expect("exists");
    assert_eq!((state.lease.head, state.head_hash), (Sequence(5), stored[4].hash));
}

/// Without a lease, or with an epoch other than the current one, nothing is
/// written and the error names the current epoch.
pub async fn append_requires_a_lease_and_the_current_epoch<S: LogStore>(store: &S) {
    let s = shard("contract.fence");
    let err = store.append(batch(&s, "p", 1, Epoch(1), events("x", 1, 0))).await.expect_err("never acquired");
    assert!(matches!(err, StoreError::NoLease { .. }), "unexpected {err:?}");

    let epoch = acquire(store, &s, "node-a").await;
    for wrong in [Epoch(0), Epoch(epoch.0 + 1)] {
        let err = store.append(batch(&s, "p", 1, wrong, events("x", 1, 0))).await.expect_err("stale epoch");
        match err {
            StoreError::StaleEpoch { given, current, .. } => assert_eq!((given, current), (wrong, epoch)),
            other => panic!("expected a stale epoch, got {other:?}"),
        }
        assert!(err_message_names_epoch(wrong, epoch));
    }
    assert_eq!(head(store, &s).await, Sequence(0), "rejected batches write nothing");

    store.append(batch(&s, "p", 1, epoch, events("x", 1, 0))).await.expect("current epoch appends");
    assert!(store.release_shard(s.clone(), owner("node-a"), epoch).await.expect("release"));
    let err = store.append(batch(&s, "p", 2, epoch, events("y", 1, 0))).await.expect_err("released");
    assert!(matches!(err, StoreError::NoLease { .. }), "unexpected {err:?}");
    assert_eq!(head(store, &s).await, Sequence(1));
}

fn err_message_names_epoch(given: Epoch, current: Epoch) -> bool {
    let message = StoreError::StaleEpoch { shard: shard("contract.fence"), given, current }.to_string();
    message.contains(&format!("current epoch is {current}"))
}

/// A takeover after expiry bumps the epoch; the old owner's appends are then
/// rejected, the new owner's continue the same gapless log.
pub async fn a_new_grant_fences_the_previous_owner<S: LogStore>(store: &S) {
    let s = shard("contract.takeover");
    let short = Duration::from_millis(300);
    let old = store.acquire_shard(s.clone(), owner("node-a"), short).await.expect("acquire");
    assert!(old.granted && old.lease.epoch == Epoch(1));
    store.append(batch(&s, "a", 1, old.lease.epoch, events("a", 2, 0))).await.expect("owner appends");

    let refused = store.acquire_shard(s.clone(), owner("node-b"), LONG).await.expect("acquire attempt");
    assert!(!refused.granted, "a held, unexpired lease must not be granted to another owner");
    assert_eq!(refused.lease.owner, Some(owner("node-a")));
    assert_eq!(refused.lease.epoch, Epoch(1), "a refused acquire does not bump the epoch");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let new = loop {
        let grant = store.acquire_shard(s.clone(), owner("node-b"), LONG).await.expect("acquire attempt");
        if grant.granted {
            break grant;
        }
        assert!(tokio::time::Instant::now() < deadline, "the 300 ms lease never lapsed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(new.lease.epoch, Epoch(2));
    assert_eq!(new.lease.head, Sequence(2), "the grant reports the head");

    let err = store.append(batch(&s, "a", 2, old.lease.epoch, events("late", 1, 0))).await.expect_err("fenced");
    assert!(matches!(err, StoreError::StaleEpoch { current: Epoch(2), given: Epoch(1), .. }), "unexpected {err:?}");
    let ack = store.append(batch(&s, "b", 1, Epoch(2), events("b", 1, 0))).await.expect("new owner appends");
    assert_eq!(ack.first, Sequence(3));
    let stored = read_all(store, &s).await;
    assert_eq!(stored.iter().map(|e| e.epoch.0).collect::<Vec<_>>(), vec![1, 1, 2]);
}

/// A retry of a written batch returns the original acknowledgement and
/// writes nothing, even after the epoch moved on; a retry with a different
/// number of events is refused.
pub async fn retried_batches_return_the_original_sequences<S: LogStore>(store: &S) {
    let s = shard("contract.retry");
    let epoch = acquire(store, &s, "node-a").await;
    let original = store.append(batch(&s, "p", 7, epoch, events("a", 3, 0))).await.expect("original");
    store.append(batch(&s, "p", 8, epoch, events("b", 1, 0))).await.expect("next");
    let retry = store.append(batch(&s, "p", 7, epoch, events("a", 3, 0))).await.expect("retry");
    assert_eq!(retry, AppendAck { duplicate: true, ..original });
    assert_eq!(head(store, &s).await, Sequence(4), "a retry writes nothing");

    let err = store.append(batch(&s, "p", 7, epoch, events("a", 2, 0))).await.expect_err("different count");
    assert!(matches!(&err, StoreError::Invalid(input) if input.field == "producer_seq"), "unexpected {err:?}");

    store.release_shard(s.clone(), owner("node-a"), epoch).await.expect("release");
    let next = acquire(store, &s, "node-b").await;
    let late = store.append(batch(&s, "p", 8, epoch, events("b", 1, 0))).await.expect("late retry");
    assert!(late.duplicate && late.first == Sequence(4), "a committed batch stays acknowledged: {late:?}");
    assert_eq!(head(store, &s).await, Sequence(4));
    assert_ne!(next, epoch);
}

/// A batch whose producer sequence skips ahead is refused, naming the one
/// expected; nothing is written.
pub async fn a_producer_sequence_that_skips_ahead_is_rejected<S: LogStore>(store: &S) {
    let s = shard("contract.order");
    let epoch = acquire(store, &s, "node-a").await;
    store.append(batch(&s, "p", 1, epoch, events("a", 1, 0))).await.expect("first");
    let err = store.append(batch(&s, "p", 3, epoch, events("c", 1, 0))).await.expect_err("skips 2");
    match err {
        StoreError::OutOfOrder { given, expected, .. } => {
            assert_eq!((given, expected), (ProducerSeq(3), ProducerSeq(2)))
        }
        other => panic!("expected out of order, got {other:?}"),
    }
    assert_eq!(head(store, &s).await, Sequence(1));
    store.append(batch(&s, "p", 2, epoch, events("b", 1, 0))).await.expect("the expected one lands");
    store.append(batch(&s, "q", 40, epoch, events("q", 1, 0))).await.expect("another producer starts anywhere");
}

/// A batch that names the sequence it expects to start at is written only
/// there: one that would land after a lost batch is refused (nothing
/// written), and a retry of a written batch is still recognised after the
/// head moved on.
pub async fn a_batch_expecting_another_head_is_refused<S: LogStore>(store: &S) {
    let s = shard("contract.head");
    let epoch = acquire(store, &s, "node-a").await;
    let expecting = |seq, first: u64, tag| AppendBatch {
        expected_first: Some(Sequence(first)),
        ..batch(&s, "p", seq, epoch, events(tag, 2, 0))
    };
    let ack = store.append(expecting(1, 1, "a")).await.expect("starts at 1");
    assert_eq!((ack.first, ack.last), (Sequence(1), Sequence(2)));
    // Batch 2 was lost; batch 3 of another producer (say, after a restart)
    // expects to follow it.
    let err = store
        .append(AppendBatch { expected_first: Some(Sequence(5)), ..batch(&s, "q", 1, epoch, events("c", 1, 0)) })
        .await
        .expect_err("the head is 2");
    match err {
        StoreError::HeadMismatch { expected, head, .. } => assert_eq!((expected, head), (Sequence(5), Sequence(2))),
        other => panic!("expected a head mismatch, got {other:?}"),
    }
    assert_eq!(head(store, &s).await, Sequence(2), "nothing was written");
    store.append(expecting(2, 3, "b")).await.expect("the expected start");
    let retry = store.append(expecting(1, 1, "a")).await.expect("a retry is recognised first");
    assert!(retry.duplicate);
    assert_eq!(retry.first, Sequence(1));
}

/// Appends queued one after the other commit in that order even when their
/// futures are awaited together (in any order), on one shard and across
/// shards.
pub async fn appends_commit_in_call_order<S: LogStore>(store: &S) {
    let a = shard("contract.calls.a");
    let b = shard("contract.calls.b");
    let epoch_a = acquire(store, &a, "node").await;
    let epoch_b = acquire(store, &b, "node").await;
    let mut pending = Vec::new();
    for seq in 1..=20u64 {
        pending.push(store.append(batch(&a, "p", seq, epoch_a, events(&format!("a{seq}"), 2, 0))));
        pending.push(store.append(batch(&b, "p", seq, epoch_b, events(&format!("b{seq}"), 1, 0))));
    }
    pending.reverse();
    let mut acks = futures_util::future::join_all(pending).await;
    acks.reverse();
    for (i, ack) in acks.into_iter().enumerate() {
        let ack = ack.expect("every queued append should succeed");
        let seq = (i / 2) as u64;
        if i % 2 == 0 {
            assert_eq!((ack.first, ack.last), (Sequence(seq * 2 + 1), Sequence(seq * 2 + 2)));
        } else {
            assert_eq!(ack.first, Sequence(seq + 1));
        }
    }
    let stored = read_all(store, &a).await;
    assert_eq!(stored[2].body, Bytes::from("a2-0"));
    assert_eq!(read_all(store, &b).await.len(), 20);
}

/// An empty batch is invalid input naming the field.
pub async fn empty_batches_are_rejected<S: LogStore>(store: &S) {
    let s = shard("contract.empty");
    let epoch = acquire(store, &s, "node").await;
    let err = store.append(batch(&s, "p", 1, epoch, Vec::new())).await.expect_err("empty");
    assert!(matches!(&err, StoreError::Invalid(input) if input.field == "events"), "unexpected {err:?}");
    assert_eq!(head(store, &s).await, Sequence(0));
}

/// Ranges come back as stored, linked to their anchor, and verify.
pub async fn reads_return_linked_events_that_verify<S: LogStore>(store: &S) {
    let s = shard("contract.read");
    let epoch = acquire(store, &s, "node").await;
    store.append(batch(&s, "p", 1, epoch, events("e", 10, 100))).await.expect("append");
    let all = read_all(store, &s).await;

    let page = store.read_range(s.clone(), Sequence(4), Some(Sequence(6)), 100, usize::MAX).await.expect("middle");
    assert_eq!(page.events, all[3..6].to_vec());
    assert_eq!(page.anchor, all[2].hash);
    assert_eq!((page.head, page.low, page.from), (Sequence(10), Sequence(1), Sequence(4)));
    event::verify(&s, Sequence(4), &page.anchor, &page.events).expect("a middle range verifies on its own");

    let limited = store.read_range(s.clone(), Sequence(2), None, 3, usize::MAX).await.expect("limited");
    assert_eq!(limited.events.iter().map(|e| e.sequence.0).collect::<Vec<_>>(), vec![2, 3, 4]);
    let first = store.read_range(s.clone(), Sequence(1), None, 1, usize::MAX).await.expect("first");
    assert_eq!(first.anchor, ChainHash::ZERO);
    assert!(
        store.read_range(s.clone(), Sequence(11), None, 10, usize::MAX).await.expect("past head").events.is_empty()
    );

    // A byte cap stops a page early, after at least one event: an event is
    // read while the bodies before it total less than the cap.
    let body = all[0].body.len();
    let capped = store.read_range(s.clone(), Sequence(4), None, 100, body + 1).await.expect("capped");
    assert_eq!(capped.events, all[3..5].to_vec());
    assert_eq!(capped.through, Sequence(5), "a capped page promises no more than it read");
    capped.verify().expect("a capped page is whole up to where it stopped");
    let one = store.read_range(s.clone(), Sequence(4), None, 100, 1).await.expect("capped at one byte");
    assert_eq!(one.events, all[3..4].to_vec());
    let whole = store.read_range(s.clone(), Sequence(4), None, 100, usize::MAX).await.expect("uncapped");
    assert_eq!((whole.events.len(), whole.through), (7, Sequence(10)));

    let err = store.read_range(s.clone(), Sequence(0), None, 10, usize::MAX).await.expect_err("zero");
    assert!(matches!(err, StoreError::Invalid(_)), "unexpected {err:?}");
    let err =
        store.read_range(shard("contract.nowhere"), Sequence(1), None, 10, usize::MAX).await.expect_err("unknown");
    assert!(matches!(err, StoreError::UnknownShard { .. }), "unexpected {err:?}");
}

/// Renewals need the current epoch and owner; release frees the lease for
/// the next owner, whose grant bumps the epoch and reports the head.
pub async fn leases_renew_release_and_report_the_head<S: LogStore>(store: &S) {
    let s = shard("contract.lease");
    let granted = store.acquire_shard(s.clone(), owner("a"), Duration::from_secs(5)).await.expect("acquire");
    let epoch = granted.lease.epoch;
    let first_expiry = granted.lease.expires_at.expect("a held lease expires");
    store.append(batch(&s, "p", 1, epoch, events("e", 3, 0))).await.expect("append");

    let renewed = store.renew_shard(s.clone(), owner("a"), epoch, LONG).await.expect("renew");
    assert_eq!((renewed.epoch, renewed.head), (epoch, Sequence(3)));
    assert!(renewed.expires_at.expect("still held") > first_expiry, "renewal extends the lease");

    let again = store.acquire_shard(s.clone(), owner("a"), LONG).await.expect("re-acquire");
    assert!(again.granted && again.lease.epoch == Epoch(epoch.0 + 1), "a holder's re-acquire is a new grant");
    let epoch = again.lease.epoch;

    let err = store.renew_shard(s.clone(), owner("a"), Epoch(epoch.0 - 1), LONG).await.expect_err("old epoch");
    assert!(matches!(err, StoreError::StaleEpoch { current, .. } if current == epoch), "unexpected {err:?}");
    let err = store.renew_shard(s.clone(), owner("b"), epoch, LONG).await.expect_err("not the owner");
    assert!(matches!(err, StoreError::NotHolder { .. }), "unexpected {err:?}");
    let err = store.renew_shard(shard("contract.none"), owner("a"), epoch, LONG).await.expect_err("unknown");
    assert!(matches!(err, StoreError::UnknownShard { .. }), "unexpected {err:?}");

    assert!(!store.release_shard(s.clone(), owner("b"), epoch).await.expect("release"), "b does not hold it");
    assert!(!store.release_shard(s.clone(), owner("a"), Epoch(1)).await.expect("release"), "stale epoch");
    assert!(store.release_shard(s.clone(), owner("a"), epoch).await.expect("release"));
    let state = store.shard_state(s.clone()).await.expect("state").expect("exists");
    assert_eq!((state.lease.owner, state.lease.expires_at, state.lease.epoch), (None, None, epoch));
    let err = store.renew_shard(s.clone(), owner("a"), epoch, LONG).await.expect_err("released");
    assert!(matches!(err, StoreError::NoLease { .. }), "unexpected {err:?}");

    let next = store.acquire_shard(s.clone(), owner("b"), LONG).await.expect("acquire");
    assert!(next.granted);
    assert_eq!((next.lease.epoch, next.lease.head), (Epoch(epoch.0 + 1), Sequence(3)));
    assert_eq!(next.lease.owner, Some(owner("b")));
}

/// A lease taken by a principal is renewed, released and re-acquired under
/// its owner id by that principal only; nothing changes on a refusal. A
/// lease that records no principal (from before they were recorded) is
/// adopted by the first principal that renews it.
pub async fn a_lease_is_bound_to_the_principal_that_took_it<S: LogStore>(store: &S) {
    use crate::security::principal::Principal;
    let s = shard("contract.bound");
    let (alice, mallory) = (Some(Principal::new("spiffe://t/alice")), Some(Principal::new("spiffe://t/mallory")));
    let granted = store.acquire_shard_as(s.clone(), owner("node-a"), alice.clone(), LONG).await.expect("acquire");
    let epoch = granted.lease.epoch;
    let stolen = store.acquire_shard_as(s.clone(), owner("node-a"), mallory.clone(), LONG).await.expect("attempt");
    assert!(!stolen.granted, "a live lease is not granted again under its owner id to another principal");
    assert_eq!(stolen.lease.epoch, epoch, "and the epoch did not move");
    let err =
        store.renew_shard_as(s.clone(), owner("node-a"), mallory.clone(), epoch, LONG).await.expect_err("mallory");
    assert!(matches!(err, StoreError::NotHolder { .. }), "unexpected {err:?}");
    let err = store.renew_shard(s.clone(), owner("node-a"), epoch, LONG).await.expect_err("no principal");
    assert!(matches!(err, StoreError::NotHolder { .. }), "unexpected {err:?}");
    assert!(!store.release_shard_as(s.clone(), owner("node-a"), mallory.clone(), epoch).await.expect("release"));
    let state = store.shard_state(s.clone()).await.expect("state").expect("exists");
    assert_eq!((state.lease.owner, state.lease.epoch), (Some(owner("node-a")), epoch), "nothing changed");
    store.renew_shard_as(s.clone(), owner("node-a"), alice.clone(), epoch, LONG).await.expect("alice renews");
    let again = store.acquire_shard_as(s.clone(), owner("node-a"), alice.clone(), LONG).await.expect("re-acquire");
    assert!(again.granted && again.lease.epoch == Epoch(epoch.0 + 1));
    assert!(store.release_shard_as(s.clone(), owner("node-a"), alice, again.lease.epoch).await.expect("release"));
    // Free again: anyone may take it, and an unbound lease is adopted.
    let unbound = store.acquire_shard(s.clone(), owner("node-b"), LONG).await.expect("acquire");
    assert!(unbound.granted);
    let epoch = unbound.lease.epoch;
    store.renew_shard_as(s.clone(), owner("node-b"), mallory.clone(), epoch, LONG).await.expect("adopted");
    let err = store.renew_shard(s.clone(), owner("node-b"), epoch, LONG).await.expect_err("now bound");
    assert!(matches!(err, StoreError::NotHolder { .. }), "unexpected {err:?}");
}

/// Pages of checkpoints come in byte order of (subscriber, shard), so the
/// pair a page ended on is where the next one starts, whatever the
/// database's collation ("B" sorts before "a" in bytes, after it in most
/// locales); a subscriber and a shard filter apply to every page.
pub async fn checkpoint_pages_follow_byte_order<S: LogStore>(store: &S) {
    let s = shard("contract.pages");
    let other = shard("contract.pages.other");
    let epoch = acquire(store, &s, "node").await;
    acquire(store, &other, "node").await;
    store.append(batch(&s, "p", 1, epoch, events("e", 3, 0))).await.expect("append");
    for name in ["c", "a", "B"] {
        store.commit_checkpoint(subscriber(name), s.clone(), Sequence(1), None).await.expect("commit");
        store.commit_checkpoint(subscriber(name), other.clone(), Sequence(0), None).await.expect("commit");
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.checkpoint_page(None, vec![s.clone()], after.clone(), 1).await.expect("a page");
        let Some(last) = page.last() else { break };
        assert_eq!(page.len(), 1);
        seen.push(last.subscriber.to_string());
        after = Some((last.subscriber.clone(), last.shard.clone()));
    }
    assert_eq!(seen, ["B", "a", "c"], "byte order, every checkpoint once");
    let page = store.checkpoint_page(Some(subscriber("a")), Vec::new(), None, 10).await.expect("a page");
    let shards: Vec<String> = page.iter().map(|c| c.shard.to_string()).collect();
    assert_eq!(shards, ["contract.pages", "contract.pages.other"]);
    let page = store.checkpoint_page(None, Vec::new(), Some((subscriber("a"), other.clone())), 2).await.expect("page");
    let pairs: Vec<(String, String)> = page.iter().map(|c| (c.subscriber.to_string(), c.shard.to_string())).collect();
    assert_eq!(
        pairs,
        [("c".to_string(), "contract.pages".to_string()), ("c".to_string(), "contract.pages.other".to_string())]
    );
}

/// Checkpoints only move forward, never past the head, and say when they
/// did not move.
pub async fn checkpoints_never_move_backwards<S: LogStore>(store: &S) {
    let s = shard("contract.checkpoint");
    let other = shard("contract.checkpoint.other");
    let epoch = acquire(store, &s, "node").await;
    acquire(store, &other, "node").await;
    store.append(batch(&s, "p", 1, epoch, events("e", 10, 0))).await.expect("append");

    let moved = store.commit_checkpoint(subscriber("sink"), s.clone(), Sequence(5), None).await.expect("commit");
    assert!(moved.moved);
    assert_eq!(moved.checkpoint.sequence, Sequence(5));
    for sequence in [3, 5] {
        let stay =
            store.commit_checkpoint(subscriber("sink"), s.clone(), Sequence(sequence), None).await.expect("commit");
        assert!(!stay.moved, "committing {sequence} must not move a checkpoint at 5");
        assert_eq!(stay.checkpoint.sequence, Sequence(5));
    }
    let err = store.commit_checkpoint(subscriber("sink"), s.clone(), Sequence(11), None).await.expect_err("past head");
    assert!(matches!(&err, StoreError::PastHead { field: "sequence", .. }), "unexpected {err:?}");
    let err = store
        .commit_checkpoint(subscriber("sink"), shard("contract.none"), Sequence(0), None)
        .await
        .expect_err("unknown");
    assert!(matches!(err, StoreError::UnknownShard { .. }), "unexpected {err:?}");

    store.commit_checkpoint(subscriber("sink"), other.clone(), Sequence(0), None).await.expect("commit at zero");
    store.commit_checkpoint(subscriber("audit"), s.clone(), Sequence(2), None).await.expect("commit");
    let mine = store.checkpoints(Some(subscriber("sink")), Vec::new()).await.expect("read");
    assert_eq!(
        mine.iter().map(|c| (c.shard.as_str(), c.sequence.0)).collect::<Vec<_>>(),
        vec![("contract.checkpoint", 5), ("contract.checkpoint.other", 0)]
    );
    let on_shard = store.checkpoints(None, vec![s.clone()]).await.expect("read");
    assert_eq!(
        on_shard.iter().map(|c| (c.subscriber.as_str(), c.sequence.0)).collect::<Vec<_>>(),
        vec![("audit", 2), ("sink", 5)]
    );
}

/// A checkpoint records the hash of the event it stops at: the one the
/// subscriber sent, checked against the log, else the log's; a mismatch is
/// corruption and moves nothing.
pub async fn checkpoints_record_and_check_the_hash_of_their_event<S: LogStore>(store: &S) {
    let s = shard("contract.checkpoint.hash");
    let epoch = acquire(store, &s, "node").await;
    store.append(batch(&s, "p", 1, epoch, events("e", 6, 0))).await.expect("append");
    let all = read_all(store, &s).await;

    let logged = store.commit_checkpoint(subscriber("sink"), s.clone(), Sequence(2), None).await.expect("commit");
    assert_eq!(logged.checkpoint.hash, Some(all[1].hash), "without a hash, the log's is recorded");
    let given =
        store.commit_checkpoint(subscriber("sink"), s.clone(), Sequence(4), Some(all[3].hash)).await.expect("commit");
    assert_eq!((given.moved, given.checkpoint.hash), (true, Some(all[3].hash)));
    let err = store
        .commit_checkpoint(subscriber("sink"), s.clone(), Sequence(5), Some(all[3].hash))
        .await
        .expect_err("a hash the log does not hold at 5");
    assert!(matches!(&err, StoreError::Corrupt(corrupt) if corrupt.sequence == Sequence(5)), "unexpected {err:?}");
    let read = store.checkpoints(Some(subscriber("sink")), vec![s.clone()]).await.expect("read");
    assert_eq!(
        read.iter().map(|c| (c.sequence, c.hash)).collect::<Vec<_>>(),
        vec![(Sequence(4), Some(all[3].hash))],
        "the refused commit moved nothing"
    );
    let zero = store.commit_checkpoint(subscriber("new"), s.clone(), Sequence(0), None).await.expect("commit");
    assert_eq!(zero.checkpoint.hash, Some(ChainHash::ZERO), "before the first event, the zero hash");
}

/// Snapshots need the current epoch, a stored position, and record that
/// event's hash; the newest at or below a position is returned.
pub async fn snapshots_are_tied_to_the_log<S: LogStore>(store: &S) {
    let s = shard("contract.snapshot");
    let epoch = acquire(store, &s, "node").await;
    store.append(batch(&s, "p", 1, epoch, events("e", 6, 0))).await.expect("append");
    let all = read_all(store, &s).await;

    let stored = store.put_snapshot(s.clone(), Sequence(3), epoch, Bytes::from("state@3")).await.expect("put");
    assert_eq!((stored.sequence, stored.hash), (Sequence(3), all[2].hash));
    store.put_snapshot(s.clone(), Sequence(5), epoch, Bytes::from("state@5")).await.expect("put");

    let err = store.put_snapshot(s.clone(), Sequence(4), Epoch(epoch.0 + 1), Bytes::new()).await.expect_err("stale");
    assert!(matches!(err, StoreError::StaleEpoch { .. }), "unexpected {err:?}");
    for bad in [0, 7] {
        let err = store.put_snapshot(s.clone(), Sequence(bad), epoch, Bytes::new()).await.expect_err("outside");
        assert!(matches!(&err, StoreError::Invalid(input) if input.field == "sequence"), "unexpected {err:?}");
    }

    let newest = store.snapshot(s.clone(), None).await.expect("get").expect("exists");
    assert_eq!((newest.sequence, newest.data.clone()), (Sequence(5), Bytes::from("state@5")));
    let older = store.snapshot(s.clone(), Some(Sequence(4))).await.expect("get").expect("exists");
    assert_eq!(older.sequence, Sequence(3));
    assert!(store.snapshot(s.clone(), Some(Sequence(2))).await.expect("get").is_none());
}

/// Retention trims through the older of the newest snapshot and the oldest
/// required checkpoint, keeps the chain verifiable from the new low-water
/// mark, and refuses reads below it.
pub async fn retention_trims_below_the_older_of_snapshot_and_checkpoint<S: LogStore>(store: &S) {
    let s = shard("contract.retention");
    let keep = RetentionPolicy { checkpoint_max_age: Duration::from_secs(3600) };
    let epoch = acquire(store, &s, "node").await;
    for seq in 1..=10u64 {
        store.append(batch(&s, "p", seq, epoch, events(&format!("e{seq}"), 1, seq))).await.expect("append");
    }
    let all = read_all(store, &s).await;

    let nothing = store.apply_retention(s.clone(), keep).await.expect("retention");
    assert_eq!((nothing.deleted, nothing.low), (0, Sequence(1)), "no snapshot, no trim");

    store.commit_checkpoint(subscriber("slow"), s.clone(), Sequence(4), None).await.expect("checkpoint");
    store.put_snapshot(s.clone(), Sequence(2), epoch, Bytes::from("old")).await.expect("snapshot");
    store.put_snapshot(s.clone(), Sequence(7), epoch, Bytes::from("new")).await.expect("snapshot");
    let trimmed = store.apply_retention(s.clone(), keep).await.expect("retention");
    assert_eq!((trimmed.deleted, trimmed.low), (4, Sequence(5)), "the checkpoint at 4 holds the rest back");

    let err = store.read_range(s.clone(), Sequence(3), None, 10, usize::MAX).await.expect_err("trimmed");
    assert!(matches!(err, StoreError::Trimmed { low: Sequence(5), .. }), "unexpected {err:?}");
    let page = store.read_range(s.clone(), Sequence(5), None, 10, usize::MAX).await.expect("from low");
    assert_eq!(page.anchor, all[3].hash, "the trimmed event's hash anchors the chain");
    event::verify(&s, Sequence(5), &page.anchor, &page.events).expect("verifies after a trim");
    let state = store.shard_state(s.clone()).await.expect("state").expect("exists");
    assert_eq!((state.low, state.low_prev_hash), (Sequence(5), all[3].hash));
    assert!(store.snapshot(s.clone(), Some(Sequence(6))).await.expect("get").is_none(), "old snapshot deleted");

    store.commit_checkpoint(subscriber("slow"), s.clone(), Sequence(9), None).await.expect("checkpoint");
    let trimmed = store.apply_retention(s.clone(), keep).await.expect("retention");
    assert_eq!((trimmed.deleted, trimmed.low), (3, Sequence(8)), "now the snapshot at 7 bounds the trim");

    store.put_snapshot(s.clone(), Sequence(10), epoch, Bytes::from("newest")).await.expect("snapshot");
    let held = store.apply_retention(s.clone(), keep).await.expect("retention");
    assert_eq!((held.deleted, held.low), (2, Sequence(10)), "the checkpoint at 9 holds event 10 back");
    let stale = RetentionPolicy { checkpoint_max_age: Duration::ZERO };
    let all_gone = store.apply_retention(s.clone(), stale).await.expect("retention");
    assert_eq!(all_gone.low, Sequence(11), "a stale checkpoint does not hold events back");
    assert!(store.read_range(s.clone(), Sequence(11), None, 10, usize::MAX).await.expect("empty").events.is_empty());

    let err = store.append(batch(&s, "p", 5, epoch, events("e5", 1, 5))).await.expect_err("trimmed record");
    assert!(matches!(&err, StoreError::Invalid(input) if input.field == "producer_seq"), "unexpected {err:?}");
    let retry = store.append(batch(&s, "p", 10, epoch, events("e10", 1, 10))).await.expect("retry of latest");
    assert!(retry.duplicate && retry.first == Sequence(10), "the latest record survives trimming: {retry:?}");
    let next = store.append(batch(&s, "p", 11, epoch, events("e11", 1, 11))).await.expect("append after trim");
    assert_eq!(next.first, Sequence(11));
    let page = store.read_range(s.clone(), Sequence(11), None, 10, usize::MAX).await.expect("read");
    event::verify(&s, Sequence(11), &page.anchor, &page.events).expect("the chain continues across the trim");
}

/// Subscribers of `changes` hear about new heads.
pub async fn changes_announce_new_heads<S: LogStore>(store: &S) {
    let s = shard("contract.changes");
    let epoch = acquire(store, &s, "node").await;
    let mut changes = store.changes();
    store.append(batch(&s, "p", 1, epoch, events("e", 3, 0))).await.expect("append");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let change = tokio::time::timeout_at(deadline, changes.recv()).await.expect("a change within 10 s");
        match change {
            Ok(LogChange::Appended { shard, head, events }) if shard == s => {
                assert_eq!(head, Sequence(3));
                if let Some(events) = events {
                    assert_eq!(events.len(), 3);
                    assert_eq!(events[2].sequence, Sequence(3));
                }
                break;
            }
            Ok(_) | Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => panic!("the change feed closed"),
        }
    }
}

/// `sequence_at` finds the first stored event recorded at or after a time.
pub async fn sequence_at_finds_the_first_event_recorded_since<S: LogStore>(store: &S) {
    let s = shard("contract.time");
    let epoch = acquire(store, &s, "node").await;
    store.append(batch(&s, "p", 1, epoch, events("e", 5, 1000))).await.expect("append");
    let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    assert_eq!(store.sequence_at(s.clone(), at(0)).await.expect("query"), Some(Sequence(1)));
    assert_eq!(store.sequence_at(s.clone(), at(1002)).await.expect("query"), Some(Sequence(3)));
    assert_eq!(store.sequence_at(s.clone(), at(2000)).await.expect("query"), None);
}

/// Shards list in id order, filtered by prefix.
pub async fn list_shards_filters_by_prefix<S: LogStore>(store: &S) {
    for name in ["resourcelease.b", "resourcelease.a", "other.c", "resourcelease"] {
        acquire(store, &shard(name), "node").await;
    }
    let listed = store.list_shards("resourcelease.".into()).await.expect("list");
    let names: Vec<&str> = listed.iter().map(|s| s.lease.shard.as_str()).collect();
    assert_eq!(names, vec!["resourcelease.a", "resourcelease.b"]);
    assert_eq!(store.list_shards(String::new()).await.expect("list").len(), 4);
}
