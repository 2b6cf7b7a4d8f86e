//! The [`Replicator`] contract suite: one set of checks every implementation
//! passes, so a queue cannot tell one log from another.
//!
//! [`check`] runs every case against replicators produced by a factory; each
//! case writes its own shards (named `contract.<case>`), so one replicator
//! can serve all of them. A durable implementation also passes the
//! restart case: the factory is called again after the first replicator was
//! dropped, over the same storage, and must find everything that was
//! acknowledged (events, producer sequences, epochs, snapshots).
//!
//! The checks panic with a message naming the broken rule; call them from a
//! test:
//!
//! ```
//! # async fn demo() {
//! use std::sync::Arc;
//! use omnirelay_client::replication::contract::{self, Durability};
//! use omnirelay_client::{InMemoryReplicator, Replicator};
//!
//! let log = Arc::new(InMemoryReplicator::new());
//! contract::check(|| { let log = Arc::clone(&log); async move { log as Arc<dyn Replicator> } }, Durability::Volatile).await;
//! # }
//! ```
//!
//! Every case writes as its shard's lease holder, as a queue does (the hub
//! refuses writes to a shard nobody holds).
//!
//! What is checked, per shard:
//! - sequences are gapless from 1, in publish order, also for batches
//!   published before the previous ones were answered (a queue pipelines
//!   them), and the events read back are the events published;
//! - a repeated `(producer, producer_seq)` answers the original sequences
//!   (`deduplicated`) and writes nothing; a skipped producer sequence and a
//!   batch expecting another first sequence are refused without writing;
//! - every grant bumps the epoch; a batch, renewal or snapshot with another
//!   epoch is refused ([`ReplicationError::StaleEpoch`]) and writes nothing;
//!   a live lease is not granted to someone else, a released or expired one
//!   is;
//! - snapshots: the newest is returned, one past the head is refused;
//! - reads honour `after` and `limit` and report the head; an unknown shard
//!   reads as empty; shards do not see each other's events.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Batch, ReplicationError, Replicator};
use crate::clock::Timestamp;
use crate::event::{Event, EventKind, NewItem, Origin};
use crate::ids::{Epoch, ItemId, PeerId, Principal, ProducerId, Sequence, ShardId};
use crate::item::Payload;

/// Whether a replicator's log outlives the replicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Gone with the replicator (in memory): the restart case is skipped.
    Volatile,
    /// Survives it: the factory, called again after the previous replicator
    /// was dropped, reopens the same log.
    Durable,
}

/// Runs every case of the contract (see the [module docs](self)) against
/// replicators made by `open`.
pub async fn check<F, Fut>(mut open: F, durability: Durability)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn Replicator>>,
{
    let log = open().await;
    check_one(log.as_ref()).await;
    drop(log);
    if durability == Durability::Durable {
        restart(&mut open).await;
    }
}

/// Runs every case that needs a single replicator (all but the restart).
pub async fn check_one(log: &dyn Replicator) {
    gapless_and_ordered(log).await;
    pipelined_batches_keep_their_order(log).await;
    retries_are_recognised(log).await;
    producer_sequences_do_not_skip(log).await;
    expected_first_sequence_is_enforced(log).await;
    epochs_fence_writers(log).await;
    released_and_expired_leases_are_granted_again(log).await;
    snapshots(log).await;
    reads(log).await;
}

/// An event whose content identifies `n` (an enqueue of item `n`), so a read
/// can be compared with what was published.
pub fn event(shard: &ShardId, n: u64) -> Event {
    let origin = Arc::new(Origin {
        shard: shard.clone(),
        principal: Principal::from("spiffe://contract/producer"),
        peer: PeerId::from("contract-node"),
    });
    let mut payload = Payload::new("contract", format!("resource-{n}"), Bytes::from(format!("body {n}")));
    payload.request_id = format!("request-{n}");
    payload.attributes.insert("n".into(), n.to_string());
    let at = Timestamp::from_unix_nanos(1_700_000_000_000_000_000 + n * 1_000_123);
    Event {
        origin,
        recorded_at: at,
        kind: EventKind::Enqueued(NewItem {
            id: ItemId::from_u128(u128::from(n) << 64 | 0xc0ffee),
            payload: Arc::new(payload),
            priority: (n % 3) as i32,
            enqueued_at: at,
            not_before: at,
        }),
    }
}

/// A batch of `count` events numbered from `from`.
pub fn batch(shard: &ShardId, producer: &str, producer_seq: u64, from: u64, count: u64) -> Batch {
    Batch {
        shard: shard.clone(),
        producer: ProducerId::from(producer),
        producer_seq,
        epoch: Epoch::ZERO,
        first: Sequence::ZERO,
        events: (from..from + count).map(|n| event(shard, n)).collect(),
    }
}

/// Every event of `shard` after `after`, read in pages of `page`, checked
/// to be consecutive; returns the event numbers (see [`event`]).
pub async fn numbers(log: &dyn Replicator, shard: &ShardId, after: u64, page: usize) -> Vec<u64> {
    let mut next = Sequence::new(after);
    let mut numbers = Vec::new();
    loop {
        let read = log.read_log(shard, next, page).await.unwrap_or_else(|e| panic!("read {shard} after {next}: {e}"));
        assert!(read.events.len() <= page, "{shard}: a read returned more than its limit");
        if read.events.is_empty() {
            assert_eq!(read.head, next, "{shard}: the read stopped before the head");
            return numbers;
        }
        for logged in read.events {
            next = next.after(1);
            assert_eq!(logged.event.sequence, next, "{shard}: the log skipped or reordered a sequence");
            let EventKind::Enqueued(item) = &logged.event.event.kind else {
                panic!("{shard}: event {next} is not the contract's enqueue")
            };
            let n = (item.id.as_u128() >> 64) as u64;
            assert_eq!(logged.event.event, event(shard, n), "{shard}: event {next} did not read back as published");
            numbers.push(n);
        }
    }
}

fn shard(case: &str) -> ShardId {
    ShardId::from(format!("contract.{case}"))
}

/// Takes `shard`'s lease for the suite's writer and returns its epoch:
/// every case writes as the shard's owner, as a queue does (some logs, the
/// hub among them, refuse writes to a shard nobody holds).
async fn own(log: &dyn Replicator, shard: &ShardId) -> Epoch {
    let grant = log.acquire_shard(shard, "contract-writer", Duration::from_secs(60)).await.expect("acquire the shard");
    assert!(grant.granted, "{shard}: a free shard is granted");
    grant.epoch
}

/// `batch` stamped with `epoch`.
fn at(epoch: Epoch, mut batch: Batch) -> Batch {
    batch.epoch = epoch;
    batch
}

async fn head(log: &dyn Replicator, shard: &ShardId) -> Sequence {
    log.read_log(shard, Sequence::ZERO, 1).await.expect("read the head").head
}

async fn gapless_and_ordered(log: &dyn Replicator) {
    let shard = shard("gapless");
    let epoch = own(log, &shard).await;
    let mut from = 1;
    for (producer_seq, count) in [(1, 1), (2, 3), (3, 2), (4, 5)] {
        let appended = log.publish(&at(epoch, batch(&shard, "p", producer_seq, from, count))).await.expect("publish");
        assert_eq!(appended.first, Sequence::new(from), "sequences must be gapless from 1");
        assert_eq!((appended.count, appended.deduplicated), (count, false));
        assert_eq!(appended.last(), Sequence::new(from + count - 1));
        from += count;
    }
    assert_eq!(numbers(log, &shard, 0, 100).await, (1..from).collect::<Vec<_>>());
    // Another producer continues the same sequence.
    let other = log.publish(&at(epoch, batch(&shard, "q", 7, from, 2))).await.expect("another producer");
    assert_eq!(other.first, Sequence::new(from));
    assert_eq!(head(log, &shard).await, Sequence::new(from + 1));
}

async fn pipelined_batches_keep_their_order(log: &dyn Replicator) {
    let shard = shard("pipelined");
    let epoch = own(log, &shard).await;
    // Published one after another before any answer is awaited, each
    // expecting its place: the log must take them in publish order.
    let futures: Vec<_> = (0..8u64)
        .map(|i| {
            let mut b = at(epoch, batch(&shard, "p", i + 1, i * 3 + 1, 3));
            b.first = Sequence::new(i * 3 + 1);
            log.publish(&b)
        })
        .collect();
    for (i, future) in futures.into_iter().enumerate() {
        let appended = future.await.expect("a pipelined batch is accepted");
        assert_eq!(appended.first, Sequence::new(i as u64 * 3 + 1), "pipelined batches were reordered");
    }
    assert_eq!(numbers(log, &shard, 0, 7).await, (1..=24).collect::<Vec<_>>());
}

async fn retries_are_recognised(log: &dyn Replicator) {
    let shard = shard("retries");
    let epoch = own(log, &shard).await;
    let first = log.publish(&at(epoch, batch(&shard, "p", 1, 1, 2))).await.expect("publish");
    let retry = log.publish(&at(epoch, batch(&shard, "p", 1, 1, 2))).await.expect("a retry is answered");
    assert_eq!((retry.first, retry.count, retry.deduplicated), (first.first, 2, true), "a retry repeats the answer");
    // Still recognised after another producer wrote.
    log.publish(&at(epoch, batch(&shard, "q", 1, 3, 1))).await.expect("another producer");
    let late = log.publish(&at(epoch, batch(&shard, "p", 1, 1, 2))).await.expect("a late retry is answered");
    assert_eq!((late.first, late.deduplicated), (Sequence::new(1), true));
    // A retry with an expectation that no longer holds is still a retry.
    let mut expecting = at(epoch, batch(&shard, "p", 1, 1, 2));
    expecting.first = Sequence::new(1);
    assert_eq!(log.publish(&expecting).await.map(|a| a.deduplicated), Ok(true));
    assert_eq!(numbers(log, &shard, 0, 100).await, vec![1, 2, 3], "a retry wrote something");
}

async fn producer_sequences_do_not_skip(log: &dyn Replicator) {
    let shard = shard("producer-seq");
    let epoch = own(log, &shard).await;
    // A producer's first batch may carry any number.
    log.publish(&at(epoch, batch(&shard, "p", 41, 1, 1))).await.expect("first batch");
    let skipped = log.publish(&at(epoch, batch(&shard, "p", 43, 2, 1))).await;
    assert!(matches!(skipped, Err(ReplicationError::Rejected(_))), "a skipped producer sequence: {skipped:?}");
    let older = log.publish(&at(epoch, batch(&shard, "p", 40, 2, 1))).await;
    assert!(matches!(older, Err(ReplicationError::Rejected(_))), "an older producer sequence: {older:?}");
    // The refused number was not consumed.
    let next = log.publish(&at(epoch, batch(&shard, "p", 42, 2, 1))).await.expect("the next number");
    assert_eq!(next.first, Sequence::new(2));
    assert_eq!(numbers(log, &shard, 0, 100).await, vec![1, 2]);
}

async fn expected_first_sequence_is_enforced(log: &dyn Replicator) {
    let shard = shard("expected-first");
    let epoch = own(log, &shard).await;
    let mut b = at(epoch, batch(&shard, "p", 1, 1, 2));
    b.first = Sequence::new(1);
    log.publish(&b).await.expect("the expected first sequence");
    let mut ahead = at(epoch, batch(&shard, "p", 2, 3, 1));
    ahead.first = Sequence::new(4);
    let refused = log.publish(&ahead).await;
    assert!(matches!(refused, Err(ReplicationError::Rejected(_))), "a batch after a gap: {refused:?}");
    let mut behind = at(epoch, batch(&shard, "p", 2, 3, 1));
    behind.first = Sequence::new(2);
    assert!(matches!(log.publish(&behind).await, Err(ReplicationError::Rejected(_))), "a batch over written events");
    let mut right = at(epoch, batch(&shard, "p", 2, 3, 1));
    right.first = Sequence::new(3);
    assert_eq!(log.publish(&right).await.map(|a| a.first), Ok(Sequence::new(3)));
    assert_eq!(numbers(log, &shard, 0, 100).await, vec![1, 2, 3], "a refused batch wrote something");
}

async fn epochs_fence_writers(log: &dyn Replicator) {
    let shard = shard("epochs");
    let ttl = Duration::from_secs(30);
    let first = log.acquire_shard(&shard, "node-z", ttl).await.expect("acquire");
    log.publish(&at(first.epoch, batch(&shard, "p", 1, 1, 1))).await.expect("the holder's epoch is accepted");
    assert!(log.release_shard(&shard, "node-z", first.epoch).await.expect("release"));
    let grant = log.acquire_shard(&shard, "node-a", ttl).await.expect("acquire");
    assert!(grant.granted, "a free shard is granted");
    assert_eq!((grant.owner.as_str(), grant.head), ("node-a", Sequence::new(1)));
    assert!(grant.epoch > first.epoch, "a grant bumps the epoch");
    assert!(grant.epoch > Epoch::ZERO, "a grant bumps the epoch");
    let old = log.publish(&at(first.epoch, batch(&shard, "p", 2, 2, 1))).await;
    assert!(matches!(old, Err(ReplicationError::StaleEpoch { .. })), "the previous grant's epoch: {old:?}");
    let mut held = batch(&shard, "a", 1, 2, 2);
    held.epoch = grant.epoch;
    log.publish(&held).await.expect("the holder's epoch is accepted");

    let other = log.acquire_shard(&shard, "node-b", ttl).await.expect("acquire");
    assert!(!other.granted, "a live lease is not granted to someone else");
    assert_eq!((other.owner.as_str(), other.epoch), ("node-a", grant.epoch));
    let renewed = log.renew_shard(&shard, "node-a", grant.epoch, ttl).await.expect("renew");
    assert!(renewed.granted && renewed.epoch == grant.epoch, "a renewal keeps the epoch");
    let by_other = log.renew_shard(&shard, "node-b", grant.epoch, ttl).await;
    assert!(by_other.is_err(), "someone who does not hold the lease cannot renew it");

    // The same owner acquiring again (a restarted incarnation) gets a new
    // epoch, which fences its previous incarnation.
    let again = log.acquire_shard(&shard, "node-a", ttl).await.expect("acquire again");
    assert!(again.granted && again.epoch > grant.epoch, "every grant bumps the epoch");
    assert_eq!(again.head, Sequence::new(3));
    held.producer_seq = 2;
    held.events = vec![event(&shard, 4)];
    match log.publish(&held).await {
        Err(ReplicationError::StaleEpoch { given, current, .. }) => {
            assert_eq!(given, grant.epoch);
            assert!(current == again.epoch || current == Epoch::ZERO, "the stale answer names the current epoch");
        }
        other => panic!("a stale epoch must be refused, got {other:?}"),
    }
    let stale_renew = log.renew_shard(&shard, "node-a", grant.epoch, ttl).await;
    assert!(matches!(stale_renew, Err(ReplicationError::StaleEpoch { .. })), "a stale renewal: {stale_renew:?}");
    let stale_snapshot = log.put_snapshot(&shard, Sequence::new(1), grant.epoch, Bytes::from_static(b"s")).await;
    assert!(matches!(stale_snapshot, Err(ReplicationError::StaleEpoch { .. })), "a stale snapshot: {stale_snapshot:?}");
    assert!(
        !log.release_shard(&shard, "node-a", grant.epoch).await.expect("release"),
        "a stale epoch cannot release the lease"
    );
    assert_eq!(numbers(log, &shard, 0, 100).await, vec![1, 2, 3], "a fenced writer wrote something");
}

async fn released_and_expired_leases_are_granted_again(log: &dyn Replicator) {
    let shard = shard("release");
    let a = log.acquire_shard(&shard, "node-a", Duration::from_secs(30)).await.expect("acquire");
    assert!(log.release_shard(&shard, "node-a", a.epoch).await.expect("release"), "the holder releases");
    let b = log.acquire_shard(&shard, "node-b", Duration::from_millis(200)).await.expect("acquire");
    assert!(b.granted && b.epoch > a.epoch, "a released lease is granted at once, under a new epoch");
    assert!(!log.acquire_shard(&shard, "node-c", Duration::from_secs(30)).await.expect("acquire").granted);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = log.acquire_shard(&shard, "node-c", Duration::from_secs(30)).await.expect("acquire");
    assert!(c.granted && c.epoch > b.epoch, "an expired lease is granted to someone else");
    let renew = log.renew_shard(&shard, "node-b", b.epoch, Duration::from_secs(30)).await;
    assert!(renew.is_err(), "the expired holder cannot renew: {renew:?}");
}

async fn snapshots(log: &dyn Replicator) {
    let shard = shard("snapshots");
    assert_eq!(log.latest_snapshot(&shard).await, Ok(None), "no snapshot yet");
    let grant = log.acquire_shard(&shard, "node-a", Duration::from_secs(30)).await.expect("acquire");
    let mut b = batch(&shard, "p", 1, 1, 4);
    b.epoch = grant.epoch;
    log.publish(&b).await.expect("publish");
    let past = log.put_snapshot(&shard, Sequence::new(5), grant.epoch, Bytes::from_static(b"past")).await;
    assert!(matches!(past, Err(ReplicationError::Rejected(_))), "a snapshot past the head: {past:?}");
    log.put_snapshot(&shard, Sequence::new(2), grant.epoch, Bytes::from_static(b"at 2")).await.expect("snapshot");
    log.put_snapshot(&shard, Sequence::new(4), grant.epoch, Bytes::from_static(b"at 4")).await.expect("snapshot");
    let latest = log.latest_snapshot(&shard).await.expect("read").expect("a snapshot");
    assert_eq!((latest.sequence, latest.data.as_ref()), (Sequence::new(4), b"at 4".as_slice()));
    // An older snapshot stored late does not replace a newer one.
    log.put_snapshot(&shard, Sequence::new(3), grant.epoch, Bytes::from_static(b"at 3")).await.expect("snapshot");
    let latest = log.latest_snapshot(&shard).await.expect("read").expect("a snapshot");
    assert_eq!(latest.sequence, Sequence::new(4), "an older snapshot replaced a newer one");
    // The events after the snapshot are still there to replay.
    assert!(
        numbers(log, &shard, 4, 10).await.is_empty(),
        "nothing after the snapshot's sequence, and reading there works"
    );
}

async fn reads(log: &dyn Replicator) {
    let shard = shard("reads");
    let epoch = own(log, &shard).await;
    let unknown = log.read_log(&ShardId::from("contract.never-written"), Sequence::ZERO, 10).await.expect("read");
    assert!(unknown.events.is_empty() && unknown.head == Sequence::ZERO, "an unknown shard reads as empty");
    log.publish(&at(epoch, batch(&shard, "p", 1, 1, 10))).await.expect("publish");
    let page = log.read_log(&shard, Sequence::new(3), 4).await.expect("read");
    let sequences: Vec<u64> = page.events.iter().map(|e| e.event.sequence.get()).collect();
    assert_eq!(sequences, vec![4, 5, 6, 7], "a read starts after `after` and stops at `limit`");
    assert_eq!(page.head, Sequence::new(10));
    assert!(page.low <= Sequence::new(4), "nothing was trimmed");
    assert!(log.read_log(&shard, Sequence::new(10), 4).await.expect("read").events.is_empty());
    // Paging in ones reads the same as all at once.
    assert_eq!(numbers(log, &shard, 0, 1).await, numbers(log, &shard, 0, 1000).await);
    // Shards are independent logs.
    let neighbour = ShardId::from("contract.reads.neighbour");
    let neighbour_epoch = own(log, &neighbour).await;
    let other = log.publish(&at(neighbour_epoch, batch(&neighbour, "p", 1, 100, 1))).await.expect("publish");
    assert_eq!(other.first, Sequence::new(1), "each shard has its own sequence");
    assert_eq!(numbers(log, &neighbour, 0, 10).await, vec![100]);
    assert_eq!(head(log, &shard).await, Sequence::new(10));
}

async fn restart<F, Fut>(open: &mut F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn Replicator>>,
{
    let shard = shard("restart");
    let ttl = Duration::from_secs(30);
    let log = open().await;
    let grant = log.acquire_shard(&shard, "node-a", ttl).await.expect("acquire");
    let mut b = batch(&shard, "p", 1, 1, 3);
    b.epoch = grant.epoch;
    log.publish(&b).await.expect("publish");
    log.put_snapshot(&shard, Sequence::new(2), grant.epoch, Bytes::from_static(b"at 2")).await.expect("snapshot");
    drop(log);

    let log = open().await;
    assert_eq!(numbers(log.as_ref(), &shard, 0, 100).await, vec![1, 2, 3], "acknowledged events survive a restart");
    let snapshot = log.latest_snapshot(&shard).await.expect("read").expect("the snapshot survives a restart");
    assert_eq!(snapshot.sequence, Sequence::new(2));
    // The producer's batch is still recognised, and its next one follows.
    assert_eq!(log.publish(&b).await.map(|a| (a.first, a.deduplicated)), Ok((Sequence::new(1), true)));
    let other = log.acquire_shard(&shard, "node-b", ttl).await.expect("acquire");
    assert!(!other.granted, "the lease survives a restart");
    let again = log.acquire_shard(&shard, "node-a", ttl).await.expect("acquire");
    assert!(again.epoch > grant.epoch, "epochs keep increasing across a restart");
    assert_eq!(again.head, Sequence::new(3), "the head survives a restart");
    let stale = {
        let mut stale = batch(&shard, "p", 2, 4, 1);
        stale.epoch = grant.epoch;
        log.publish(&stale).await
    };
    assert!(matches!(stale, Err(ReplicationError::StaleEpoch { .. })), "the old epoch stays fenced: {stale:?}");
    let mut next = batch(&shard, "p", 2, 4, 1);
    next.epoch = again.epoch;
    next.first = Sequence::new(4);
    assert_eq!(log.publish(&next).await.map(|a| a.first), Ok(Sequence::new(4)), "sequences resume after a restart");
    drop(log);
    let log = open().await;
    assert_eq!(numbers(log.as_ref(), &shard, 0, 100).await, vec![1, 2, 3, 4]);
}
