//! Appends: durability before the ack (invariant 1), the epoch fence judged
//! by PostgreSQL (invariant 3), idempotent retries, group commit, and bad
//! input (invariant 8).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use omnirelay_hub::event::NewEvent;
use omnirelay_hub::ids::{Epoch, OwnerId, ProducerId, ProducerSeq, ShardId};
use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::store::{AppendBatch, LogStore, StoreError};

use crate::support::{self, Appender, TestHub, ack, acquire, batch, rejection};

const LONG: Duration = Duration::from_secs(60);

async fn count_events(db: &omnirelay_tests::TestDb, shard: &str) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM events e JOIN shards s USING (shard_no) WHERE s.shard_id = $1", &[&shard])
        .await
        .expect("count events")
        .get(0)
}

#[tokio::test]
async fn acknowledged_appends_are_committed_before_the_ack() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let epoch = acquire(&mut client, "resourcelease.durable", "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    for seq in 1..=20u64 {
        let acked = ack(appender.append(batch("resourcelease.durable", "p", seq, epoch, &["a", "b"])).await);
        // Read through a different connection the moment the ack arrives:
        // the rows must already be committed (visible to others).
        let visible = count_events(&db, "resourcelease.durable").await;
        assert!(
            visible >= acked.last_sequence as i64,
            "ack for {} before commit ({visible} visible)",
            acked.last_sequence
        );
    }
    hub.stop().await;
}

#[tokio::test]
async fn a_stale_epoch_is_rejected_by_postgres_naming_the_current_epoch() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.fenced";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    ack(appender.append(batch(shard, "p", 1, epoch, &["one"])).await);

    // Another owner takes over behind the hub's back, directly in the
    // database: no hub process has seen this grant, so only PostgreSQL can
    // reject the next append.
    db.client()
        .await
        .execute("UPDATE shards SET epoch = epoch + 1, owner = 'node-b' WHERE shard_id = $1", &[&shard])
        .await
        .expect("bump the epoch in SQL");

    let refused = rejection(appender.append(batch(shard, "p", 2, epoch, &["two"])).await);
    assert_eq!(refused.code, pb::AppendErrorCode::StaleEpoch as i32);
    assert_eq!(refused.current_epoch, epoch + 1);
    assert!(refused.message.contains(&format!("current epoch is {}", epoch + 1)), "{}", refused.message);
    assert_eq!(count_events(&db, shard).await, 1, "the stale batch wrote nothing");

    let renew = client
        .renew_shard(pb::RenewShardRequest { shard_id: shard.into(), owner: "node-a".into(), epoch, ttl: None })
        .await
        .expect_err("the old owner's renewal must fail");
    assert_eq!(renew.code(), tonic::Code::Aborted);
    hub.stop().await;
}

#[tokio::test]
async fn two_producers_racing_on_one_shard_only_the_current_epoch_lands() {
    let db = support::migrated_db().await;
    let first = TestHub::start(db.url()).await;
    let second = TestHub::start(db.url()).await;
    let shard = "resourcelease.race";
    let mut client_a = first.client().await;
    let mut client_b = second.client().await;
    let epoch_a = acquire(&mut client_a, shard, "node-a", Duration::from_millis(500)).await;

    // Producer A appends as fast as it can through replica 1 until fenced.
    let producer_a = tokio::spawn(async move {
        let mut appender = Appender::open(&mut client_a).await;
        let mut acked = Vec::new();
        for seq in 1..=100_000u64 {
            match appender.append(batch(shard, "a", seq, epoch_a, &["a"])).await {
                pb::append_response::Result::Ack(ack) => acked.push(ack.first_sequence),
                pb::append_response::Result::Error(err) => return (acked, err),
            }
        }
        panic!("producer A was never fenced");
    });

    // Producer B takes the shard over through replica 2 once A's lease
    // lapses, then appends.
    let epoch_b = loop {
        let grant = client_b
            .acquire_shard(pb::AcquireShardRequest {
                shard_id: shard.into(),
                owner: "node-b".into(),
                ttl: Some(LONG.try_into().expect("duration")),
            })
            .await
            .expect("acquire")
            .into_inner();
        if grant.granted {
            break grant.lease.expect("lease").epoch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(epoch_b, epoch_a + 1);
    let mut appender_b = Appender::open(&mut client_b).await;
    let mut acked_b = Vec::new();
    for seq in 1..=20u64 {
        acked_b.push(ack(appender_b.append(batch(shard, "b", seq, epoch_b, &["b"])).await).first_sequence);
    }

    let (acked_a, fenced) = producer_a.await.expect("producer A should not panic");
    assert_eq!(fenced.code, pb::AppendErrorCode::StaleEpoch as i32, "{fenced:?}");
    assert_eq!(fenced.current_epoch, epoch_b);
    assert!(!acked_a.is_empty(), "producer A should have appended before the takeover");
    let last_a = *acked_a.last().expect("non-empty");
    assert!(last_a < acked_b[0], "every acknowledged append of A precedes B's first ({last_a} vs {})", acked_b[0]);

    // The stored log: A's epoch, then B's, gapless, nothing of A after B began.
    let rows = db
        .client()
        .await
        .query(
            "SELECT e.sequence, e.epoch FROM events e JOIN shards s USING (shard_no) WHERE s.shard_id = $1 ORDER BY 1",
            &[&shard],
        )
        .await
        .expect("read the log");
    let epochs: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
    let sequences: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(sequences, (1..=rows.len() as i64).collect::<Vec<_>>(), "gapless");
    let switch = epochs.iter().position(|&e| e == epoch_b as i64).expect("B's events are stored");
    assert!(epochs[..switch].iter().all(|&e| e == epoch_a as i64));
    assert!(epochs[switch..].iter().all(|&e| e == epoch_b as i64), "no stale append landed after the takeover");
    assert_eq!(switch, acked_a.len(), "exactly A's acknowledged appends are stored under A's epoch");
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn an_append_retried_after_its_connection_dropped_is_not_written_twice() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.retry";
    let epoch = {
        let mut client = hub.client().await;
        acquire(&mut client, shard, "node-a", LONG).await
    };
    {
        // Send, wait until PostgreSQL committed it, then drop the connection
        // without ever reading the acknowledgement.
        let mut client = hub.client().await;
        let appender = Appender::open(&mut client).await;
        appender.send(batch(shard, "p", 1, epoch, &["x", "y", "z"])).await;
        omnirelay_tests::eventually("the batch is committed", Duration::from_secs(30), || async {
            match count_events(&db, shard).await {
                3 => Ok(()),
                n => Err(format!("{n} events stored")),
            }
        })
        .await;
        drop(appender);
        drop(client);
    }
    let mut client = hub.client().await;
    let mut appender = Appender::open(&mut client).await;
    let retried = ack(appender.append(batch(shard, "p", 1, epoch, &["x", "y", "z"])).await);
    assert!(retried.duplicate, "the retry must be recognised");
    assert_eq!((retried.first_sequence, retried.last_sequence), (1, 3));
    assert_eq!(count_events(&db, shard).await, 3, "nothing written twice");
    let next = ack(appender.append(batch(shard, "p", 2, epoch, &["w"])).await);
    assert_eq!(next.first_sequence, 4);
    hub.stop().await;
}

#[tokio::test]
async fn bad_input_is_answered_naming_the_field_and_changes_nothing() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.input";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;

    let mut no_time = batch(shard, "p", 1, epoch, &["a"]);
    support::reshape(&mut no_time.events[0], |event| event.recorded_at = None);
    let cases = vec![
        (pb::AppendRequest { shard_id: String::new(), ..batch(shard, "p", 1, epoch, &["a"]) }, "shard_id"),
        (batch(shard, "p", 1, epoch, &[]), "events"),
        (no_time, "events.recorded_at"),
        (pb::AppendRequest { producer_id: "has space".into(), ..batch(shard, "p", 1, epoch, &["a"]) }, "producer_id"),
    ];
    for (request, field) in cases {
        let refused = rejection(appender.append(request).await);
        assert_eq!(refused.code, pb::AppendErrorCode::Invalid as i32);
        assert!(refused.message.starts_with(&format!("{field}:")), "{field}: {}", refused.message);
    }
    // The stream survived every rejection, and nothing was written.
    assert_eq!(count_events(&db, shard).await, 0);
    assert_eq!(ack(appender.append(batch(shard, "p", 1, epoch, &["a"])).await).first_sequence, 1);

    let err = client
        .acquire_shard(pb::AcquireShardRequest { shard_id: shard.into(), owner: String::new(), ttl: None })
        .await
        .expect_err("an empty owner");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("owner:"), "{}", err.message());
    let err = client
        .acquire_shard(pb::AcquireShardRequest {
            shard_id: shard.into(),
            owner: "node-b".into(),
            ttl: Some(prost_types::Duration { seconds: 0, nanos: 1 }),
        })
        .await
        .expect_err("a tiny ttl");
    assert!(err.message().starts_with("ttl:"), "{}", err.message());
    let err = client
        .read_range(pb::ReadRangeRequest { shard_id: shard.into(), from_sequence: 0, to_sequence: 0, limit: 0 })
        .await
        .expect_err("sequence zero");
    assert!(err.message().starts_with("from_sequence:"), "{}", err.message());
    let err = client
        .commit_checkpoint(pb::CommitCheckpointRequest {
            subscriber_id: "sink".into(),
            shard_id: shard.into(),
            sequence: 99,
            hash: Default::default(),
        })
        .await
        .expect_err("past the head");
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    assert!(err.message().starts_with("sequence:"), "{}", err.message());
    let err = client
        .put_snapshot(pb::PutSnapshotRequest { shard_id: shard.into(), sequence: 5, data: Bytes::new(), epoch })
        .await
        .expect_err("past the head");
    assert!(err.message().starts_with("sequence:"), "{}", err.message());
    let lease = client
        .renew_shard(pb::RenewShardRequest { shard_id: shard.into(), owner: "node-a".into(), epoch, ttl: None })
        .await
        .expect("the lease is untouched by the rejected requests")
        .into_inner()
        .lease
        .expect("lease");
    assert_eq!((lease.epoch, lease.head_sequence), (epoch, 1));
    hub.stop().await;
}

/// A stored body that decodes like one the hub wrote (readers and `verify`
/// refuse anything else), distinct per `item`.
fn body(item: &str) -> Bytes {
    let event = omnirelay_hub::proto::replication::v1::ReplicationEvent {
        event: Some(omnirelay_hub::proto::replication::v1::replication_event::Event::Completed(
            omnirelay_hub::proto::replication::v1::Completed { item_id: item.to_string(), fencing_token: 1 },
        )),
        ..Default::default()
    };
    Bytes::from(prost::Message::encode_to_vec(&event))
}

fn store_batch(shard: &ShardId, producer: &str, seq: u64, epoch: Epoch, n: usize) -> AppendBatch {
    AppendBatch {
        expected_first: None,
        shard: shard.clone(),
        producer: ProducerId::parse(producer).expect("valid"),
        producer_seq: ProducerSeq(seq),
        epoch,
        events: (0..n)
            .map(|i| NewEvent { recorded_at: SystemTime::now(), body: body(&format!("{producer}-{seq}-{i}")) })
            .collect(),
    }
}

#[tokio::test]
async fn concurrent_batches_share_one_transaction() {
    let (store, db) = support::fresh_store().await;
    let owner = OwnerId::parse("node").expect("valid");
    let mut shards = Vec::new();
    for i in 0..64 {
        let shard = ShardId::parse(format!("resourcelease.group{i}")).expect("valid");
        let epoch = store.acquire_shard(shard.clone(), owner.clone(), LONG).await.expect("acquire").lease.epoch;
        shards.push((shard, epoch));
    }
    // Queue 64 producers' batches at once, as 64 concurrent streams would.
    let pending: Vec<_> =
        shards.iter().map(|(shard, epoch)| store.append(store_batch(shard, "p", 1, *epoch, 10))).collect();
    for result in futures_util::future::join_all(pending).await {
        result.expect("every batch commits");
    }
    // Rows written by one transaction share its id (xmin): 64 batches went
    // through far fewer transactions than 64.
    let transactions: i64 = db
        .client()
        .await
        .query_one("SELECT count(DISTINCT xmin::text) FROM events", &[])
        .await
        .expect("count transactions")
        .get(0);
    assert!(transactions <= 8, "64 batches took {transactions} transactions");
    store.close().await.expect("close");
}

#[tokio::test]
async fn one_bad_batch_does_not_fail_the_batches_grouped_with_it() {
    let (store, _db) = support::fresh_store().await;
    let owner = OwnerId::parse("node").expect("valid");
    let shard = ShardId::parse("resourcelease.mixed").expect("valid");
    let epoch = store.acquire_shard(shard.clone(), owner, LONG).await.expect("acquire").lease.epoch;

    let mut unrepresentable = store_batch(&shard, "bad", 1, epoch, 1);
    // Beyond anything PostgreSQL's timestamptz holds: the statement fails.
    unrepresentable.events[0].recorded_at = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000_000_000_000);
    let queued = vec![
        store.append(store_batch(&shard, "p", 1, epoch, 2)),
        store.append(store_batch(&shard, "stale", 1, Epoch(epoch.0 + 7), 2)),
        store.append(store_batch(&shard, "p", 3, epoch, 1)),
        store.append(unrepresentable),
        store.append(store_batch(&shard, "p", 2, epoch, 2)),
    ];
    let results = futures_util::future::join_all(queued).await;
    let first = results[0].as_ref().expect("the good batch commits");
    assert!(matches!(results[1], Err(StoreError::StaleEpoch { .. })), "{:?}", results[1]);
    assert!(matches!(results[2], Err(StoreError::OutOfOrder { .. })), "{:?}", results[2]);
    assert!(matches!(results[3], Err(StoreError::Internal { .. })), "{:?}", results[3]);
    let last = results[4].as_ref().expect("the good batch after them commits");
    assert_eq!((first.first.0, first.last.0, last.first.0, last.last.0), (1, 2, 3, 4));
    let state = store.shard_state(shard).await.expect("state").expect("exists");
    assert_eq!(state.lease.head.0, 4);
    store.close().await.expect("close");
}

#[tokio::test]
async fn large_groups_are_copied_and_read_back_verified() {
    let (store, _db) = support::fresh_store().await;
    let shard = ShardId::parse("resourcelease.large").expect("valid");
    let owner = OwnerId::parse("node").expect("valid");
    let epoch = store.acquire_shard(shard.clone(), owner, LONG).await.expect("acquire").lease.epoch;
    let size = omnirelay_hub::defaults::COPY_MIN_EVENTS + 100;
    let first = store.append(store_batch(&shard, "p", 1, epoch, size)).await.expect("a COPY-sized batch");
    let second = store.append(store_batch(&shard, "p", 2, epoch, 3)).await.expect("a small batch after it");
    assert_eq!((first.first.0, first.last.0, second.first.0), (1, size as u64, size as u64 + 1));
    let page = store
        .read_range(shard.clone(), omnirelay_hub::ids::Sequence(1), None, 10_000, usize::MAX)
        .await
        .expect("read back");
    assert_eq!(page.events.len(), size + 3);
    omnirelay_hub::event::verify(&shard, page.from, &page.anchor, &page.events).expect("the copied rows verify");
    assert_eq!(page.events[size - 1].body, body(&format!("p-1-{}", size - 1)));
    store.close().await.expect("close");
}

/// The count of predicted append groups with `outcome` in this process's
/// metrics (the hub's recorder, installed by the first call).
fn predictions(outcome: &str) -> u64 {
    let rendered = omnirelay_hub::telemetry::prometheus().render();
    let series = format!("{}{{{}=\"{outcome}\"}} ", omnirelay_hub::telemetry::APPEND_PREDICTIONS, "outcome");
    rendered
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map(|value| value.trim().parse().expect("a counter value"))
        .unwrap_or(0)
}

#[tokio::test]
async fn a_prediction_made_stale_by_another_replica_is_refused_by_the_fence_and_nothing_is_lost() {
    let _ = omnirelay_hub::telemetry::prometheus();
    let (a, db) = support::fresh_store().await;
    let b = support::store(&db).await;
    let shard = ShardId::parse("resourcelease.predicted").expect("valid");
    let owner = OwnerId::parse("node-a").expect("valid");
    let epoch = a.acquire_shard(shard.clone(), owner.clone(), LONG).await.expect("acquire").lease.epoch;

    // Replica A learns the shard and producer p (locking path), then
    // appends p's next batches in one round trip each (predicted path).
    let hits = predictions("hit");
    let written = a.append(store_batch(&shard, "p", 1, epoch, 2)).await.expect("first batch");
    assert_eq!((written.first.0, written.last.0), (1, 2));
    let written = a.append(store_batch(&shard, "p", 2, epoch, 2)).await.expect("second batch");
    assert_eq!((written.first.0, written.last.0, written.duplicate), (3, 4, false));
    assert!(predictions("hit") > hits, "the second batch should have been written as predicted");

    // Replica B writes to the shard behind A's back: A still predicts head 4.
    let other = b.append(store_batch(&shard, "q", 1, epoch, 3)).await.expect("another replica's batch");
    assert_eq!((other.first.0, other.last.0), (5, 7));
    let refused = predictions("refused");
    let written = a.append(store_batch(&shard, "p", 3, epoch, 1)).await.expect("A's batch after B's");
    assert!(predictions("refused") > refused, "the fence should have refused the stale prediction");
    assert_eq!(
        (written.first.0, written.last.0, written.duplicate),
        (8, 8, false),
        "chained to B's head, not A's guess"
    );

    // A retry of a written batch is answered with its original sequences.
    let retried = a.append(store_batch(&shard, "p", 3, epoch, 1)).await.expect("retry");
    assert_eq!((retried.first.0, retried.last.0, retried.duplicate), (8, 8, true));
    // The next batch is predicted again from what the locking path learned.
    let hits = predictions("hit");
    let written = a.append(store_batch(&shard, "p", 4, epoch, 1)).await.expect("predicted again");
    assert_eq!((written.first.0, written.last.0), (9, 9));
    assert!(predictions("hit") > hits);

    // The lease moves on through B: A's prediction holds the old epoch, and
    // PostgreSQL rejects A's next batch naming the new one.
    assert!(b.release_shard(shard.clone(), owner, epoch).await.expect("release"));
    let next_owner = OwnerId::parse("node-b").expect("valid");
    let new_epoch = b.acquire_shard(shard.clone(), next_owner, LONG).await.expect("re-acquire").lease.epoch;
    match a.append(store_batch(&shard, "p", 5, epoch, 1)).await {
        Err(StoreError::StaleEpoch { current, .. }) => assert_eq!(current, new_epoch),
        other => panic!("expected a stale epoch, got {other:?}"),
    }
    let written = a.append(store_batch(&shard, "p", 5, new_epoch, 1)).await.expect("at the new epoch");
    assert_eq!((written.first.0, written.last.0), (10, 10));

    // Gapless, every event once, and the chain verifies end to end.
    assert_eq!(count_events(&db, shard.as_str()).await, 10);
    let report = omnirelay_hub::verify::verify_shard(&a, shard.clone()).await.expect("verify");
    assert_eq!((report.checked, report.corrupt.map(|c| c.sequence.0)), (10, None));
    a.close().await.expect("close");
    b.close().await.expect("close");
}

#[tokio::test]
async fn held_shard_leases_are_listed_by_prefix_in_pages() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    for node in ["a", "b", "c"] {
        acquire(&mut client, &format!("omnirelay.members.{node}"), node, LONG).await;
    }
    let released = acquire(&mut client, "omnirelay.members.gone", "gone", LONG).await;
    client
        .release_shard(pb::ReleaseShardRequest {
            shard_id: "omnirelay.members.gone".into(),
            owner: "gone".into(),
            epoch: released,
        })
        .await
        .expect("release");
    acquire(&mut client, "resourcelease.other", "a", LONG).await;
    // A lease that lapses: listed while held, gone once expired.
    acquire(&mut client, "omnirelay.members.brief", "brief", Duration::from_secs(1)).await;

    let list = |after: &str, limit: u32| pb::ListShardLeasesRequest {
        prefix: "omnirelay.members.".into(),
        after: after.into(),
        limit,
    };
    let all = client.list_shard_leases(list("", 0)).await.expect("list").into_inner();
    let ids: Vec<_> = all.leases.iter().map(|lease| lease.shard_id.as_str()).collect();
    assert_eq!(ids, ["omnirelay.members.a", "omnirelay.members.b", "omnirelay.members.brief", "omnirelay.members.c"]);
    assert_eq!(all.leases[1].owner, "b");
    assert!(all.next_after.is_empty());

    let first = client.list_shard_leases(list("", 2)).await.expect("page 1").into_inner();
    assert_eq!(first.leases.len(), 2);
    assert_eq!(first.next_after, "omnirelay.members.b");
    let second = client.list_shard_leases(list(&first.next_after, 2)).await.expect("page 2").into_inner();
    let ids: Vec<_> = second.leases.iter().map(|lease| lease.shard_id.as_str()).collect();
    assert_eq!(ids, ["omnirelay.members.brief", "omnirelay.members.c"]);

    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let later = client.list_shard_leases(list("", 0)).await.expect("list").into_inner();
    let ids: Vec<_> = later.leases.iter().map(|lease| lease.shard_id.as_str()).collect();
    assert_eq!(ids, ["omnirelay.members.a", "omnirelay.members.b", "omnirelay.members.c"]);
    hub.stop().await;
}
