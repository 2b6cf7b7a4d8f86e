//! Subscriptions: catch-up then live tail with no gap, reorder or repeat
//! (invariant 2), checkpoints, start positions, patterns, progress frames,
//! snapshots in place of trimmed events, slow subscribers, and the shared
//! live tail's read count.

use std::time::{Duration, SystemTime};

use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::proto::hub::v1::hub_client::HubClient;
use omnirelay_hub::proto::replication::v1 as rpb;
use tonic::transport::Channel;

use crate::support::{self, Appender, TestHub, ack, acquire, batch, item_of};

const LONG: Duration = Duration::from_secs(60);

/// A subscription stream with helpers that collect events.
struct Subscription {
    frames: tonic::Streaming<pb::SubscribeResponse>,
}

impl Subscription {
    async fn open(client: &mut HubClient<Channel>, request: pb::SubscribeRequest) -> Subscription {
        let subscribed = tokio::time::timeout(Duration::from_secs(30), client.subscribe(request))
            .await
            .expect("Subscribe should answer within 30 s");
        Subscription { frames: subscribed.expect("subscribe").into_inner() }
    }

    async fn frame(&mut self) -> pb::subscribe_response::Frame {
        tokio::time::timeout(Duration::from_secs(30), self.frames.message())
            .await
            .expect("a frame within 30 s")
            .expect("the subscription should not fail")
            .expect("the subscription should not end")
            .frame
            .expect("a frame")
    }

    /// Collects events (skipping progress) until `n` arrived; fails after
    /// 30 s even while progress frames keep coming.
    async fn events(&mut self, n: usize) -> Vec<rpb::ReplicationEvent> {
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while events.len() < n {
            assert!(tokio::time::Instant::now() < deadline, "only {} of {n} events within 30 s", events.len());
            match self.frame().await {
                pb::subscribe_response::Frame::Events(batch) => events.extend(support::decoded(&batch.events)),
                pb::subscribe_response::Frame::Progress(_) => {}
                pb::subscribe_response::Frame::Snapshot(frame) => panic!("unexpected snapshot {frame:?}"),
            }
        }
        assert_eq!(events.len(), n, "more events than expected arrived");
        events
    }
}

fn request(subscriber: &str, shards: &[&str], start: pb::start_position::Position) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        subscriber_id: subscriber.into(),
        shard_ids: shards.iter().map(|s| s.to_string()).collect(),
        shard_pattern: String::new(),
        start: Some(pb::StartPosition { position: Some(start) }),
        progress_interval: None,
    }
}

fn sequences(events: &[rpb::ReplicationEvent]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

async fn append_items(appender: &mut Appender, shard: &str, epoch: u64, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        ack(appender.append(batch(shard, "p", seq, epoch, &[&format!("item-{seq}")])).await);
    }
}

#[tokio::test]
async fn a_subscriber_gets_catch_up_then_the_live_tail_without_gaps_or_repeats() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.tail";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    append_items(&mut appender, shard, epoch, 1..=30).await;

    let mut subscription =
        Subscription::open(&mut client, request("sink", &[shard], pb::start_position::Position::AfterSequence(0)))
            .await;
    let caught_up = subscription.events(30).await;
    append_items(&mut appender, shard, epoch, 31..=60).await;
    let live = subscription.events(30).await;
    let all: Vec<_> = caught_up.into_iter().chain(live).collect();
    assert_eq!(sequences(&all), (1..=60).collect::<Vec<_>>());
    assert_eq!(item_of(&all[44]), "item-45");
    // Every event carries its chain link, so the client can verify too.
    for pair in all.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    hub.stop().await;
}

#[tokio::test]
async fn after_a_checkpoint_commit_a_resumed_subscriber_never_sees_an_event_again() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.resume";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    append_items(&mut appender, shard, epoch, 1..=10).await;

    let from_checkpoint = pb::start_position::Position::FromCheckpoint(true);
    let mut first = Subscription::open(&mut client, request("sink", &[shard], from_checkpoint)).await;
    let events = first.events(10).await;
    assert_eq!(sequences(&events), (1..=10).collect::<Vec<_>>(), "no checkpoint: from the first event");
    let committed = client
        .commit_checkpoint(pb::CommitCheckpointRequest {
            subscriber_id: "sink".into(),
            shard_id: shard.into(),
            sequence: 7,
            hash: Default::default(),
        })
        .await
        .expect("commit")
        .into_inner();
    assert!(committed.moved);
    let backwards = client
        .commit_checkpoint(pb::CommitCheckpointRequest {
            subscriber_id: "sink".into(),
            shard_id: shard.into(),
            sequence: 3,
            hash: Default::default(),
        })
        .await
        .expect("commit")
        .into_inner();
    assert!(!backwards.moved, "the reply says the checkpoint did not move");
    assert_eq!(backwards.checkpoint.expect("checkpoint").sequence, 7);
    drop(first);

    append_items(&mut appender, shard, epoch, 11..=12).await;
    let mut resumed = Subscription::open(&mut client, request("sink", &[shard], from_checkpoint)).await;
    assert_eq!(sequences(&resumed.events(5).await), vec![8, 9, 10, 11, 12]);
    let stored = client
        .get_checkpoints(pb::GetCheckpointsRequest { subscriber_id: "sink".into(), ..Default::default() })
        .await
        .expect("read checkpoints")
        .into_inner();
    assert_eq!(stored.checkpoints.len(), 1);
    assert_eq!(stored.checkpoints[0].sequence, 7);
    hub.stop().await;
}

#[tokio::test]
async fn subscriptions_start_from_a_time_or_from_the_latest_event() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.starts";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    let mut old = batch(shard, "p", 1, epoch, &["old-1", "old-2"]);
    for event in &mut old.events {
        support::reshape(event, |event| {
            event.recorded_at =
                Some(omnirelay_hub::wire::to_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1000)));
        });
    }
    ack(appender.append(old).await);
    append_items(&mut appender, shard, epoch, 2..=3).await;

    let since = pb::start_position::Position::Since(prost_types::Timestamp { seconds: 2000, nanos: 0 });
    let mut from_time = Subscription::open(&mut client, request("a", &[shard], since)).await;
    assert_eq!(sequences(&from_time.events(2).await), vec![3, 4]);

    let latest = pb::start_position::Position::Latest(true);
    // The position is fixed when Subscribe returns: what is appended after
    // it is delivered, nothing before.
    let mut from_now = Subscription::open(&mut client, request("b", &[shard], latest)).await;
    append_items(&mut appender, shard, epoch, 4..=4).await;
    assert_eq!(sequences(&from_now.events(1).await), vec![5]);
    hub.stop().await;
}

#[tokio::test]
async fn a_pattern_follows_matching_shards_including_new_ones_and_idle_streams_get_progress() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let epoch_a = acquire(&mut client, "resourcelease.a", "node", LONG).await;
    let epoch_other = acquire(&mut client, "other.x", "node", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    ack(appender.append(batch("resourcelease.a", "p", 1, epoch_a, &["a1"])).await);
    ack(appender.append(batch("other.x", "p", 1, epoch_other, &["x1"])).await);

    let mut subscription = Subscription::open(
        &mut client,
        pb::SubscribeRequest {
            subscriber_id: "sink".into(),
            shard_ids: vec![],
            shard_pattern: "resourcelease.*".into(),
            start: None,
            progress_interval: Some(prost_types::Duration { seconds: 0, nanos: 200_000_000 }),
        },
    )
    .await;
    let first = subscription.events(1).await;
    assert_eq!((first[0].shard_id.as_str(), item_of(&first[0]).as_str()), ("resourcelease.a", "a1"));

    let epoch_b = acquire(&mut client, "resourcelease.b", "node", LONG).await;
    ack(appender.append(batch("resourcelease.b", "p", 1, epoch_b, &["b1"])).await);
    ack(appender.append(batch("other.x", "p", 2, epoch_other, &["x2"])).await);
    let second = subscription.events(1).await;
    assert_eq!((second[0].shard_id.as_str(), item_of(&second[0]).as_str()), ("resourcelease.b", "b1"));

    // Idle now: progress frames report the followed shards' heads.
    let progress = loop {
        if let pb::subscribe_response::Frame::Progress(progress) = subscription.frame().await {
            break progress;
        }
    };
    assert_eq!(progress.heads.get("resourcelease.a"), Some(&1));
    assert_eq!(progress.heads.get("resourcelease.b"), Some(&1));
    assert!(!progress.heads.contains_key("other.x"), "unmatched shards are not followed");
    hub.stop().await;
}

#[tokio::test]
async fn a_subscriber_whose_checkpoint_was_trimmed_gets_the_snapshot_then_the_tail() {
    let (store, db) = support::fresh_store().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.trimmed";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    append_items(&mut appender, shard, epoch, 1..=10).await;
    client
        .commit_checkpoint(pb::CommitCheckpointRequest {
            subscriber_id: "gone".into(),
            shard_id: shard.into(),
            sequence: 2,
            hash: Default::default(),
        })
        .await
        .expect("commit");
    client
        .put_snapshot(pb::PutSnapshotRequest { shard_id: shard.into(), sequence: 6, data: "state@6".into(), epoch })
        .await
        .expect("snapshot");
    // The "gone" subscriber's checkpoint is too old to hold events back.
    use omnirelay_hub::store::LogStore;
    let outcome = store
        .apply_retention(
            omnirelay_hub::ids::ShardId::parse(shard).expect("valid"),
            omnirelay_hub::store::RetentionPolicy { checkpoint_max_age: Duration::ZERO },
        )
        .await
        .expect("retention");
    assert_eq!(outcome.low.0, 7);

    let mut subscription =
        Subscription::open(&mut client, request("gone", &[shard], pb::start_position::Position::FromCheckpoint(true)))
            .await;
    let snapshot = match subscription.frame().await {
        pb::subscribe_response::Frame::Snapshot(frame) => frame.snapshot.expect("snapshot"),
        other => panic!("expected the snapshot first, got {other:?}"),
    };
    assert_eq!((snapshot.sequence, snapshot.data.as_ref()), (6, b"state@6".as_ref()));
    let tail = subscription.events(4).await;
    assert_eq!(sequences(&tail), vec![7, 8, 9, 10]);
    assert_eq!(tail[0].prev_hash, snapshot.hash, "the tail continues from the snapshot's event");
    append_items(&mut appender, shard, epoch, 11..=11).await;
    assert_eq!(sequences(&subscription.events(1).await), vec![11]);

    let range = client
        .read_range(pb::ReadRangeRequest { shard_id: shard.into(), from_sequence: 3, to_sequence: 0, limit: 0 })
        .await
        .expect_err("trimmed range");
    assert_eq!(range.code(), tonic::Code::FailedPrecondition);
    let replay = client
        .read_range(pb::ReadRangeRequest { shard_id: shard.into(), from_sequence: 7, to_sequence: 9, limit: 0 })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(
        (sequences(&support::decoded(&replay.events)), replay.low_sequence, replay.head_sequence),
        (vec![7, 8, 9], 7, 11)
    );
    hub.stop().await;
    store.close().await.expect("close");
}

// About ten seconds: it needs more separate commits than the live tail
// buffers, each acknowledged before the next.
#[tokio::test]
async fn a_slow_subscriber_slows_neither_appends_nor_other_subscribers_and_still_gets_everything() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.slow";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let latest = pb::start_position::Position::AfterSequence(0);
    let mut slow = Subscription::open(&mut client, request("slow", &[shard], latest)).await;
    let mut fast = Subscription::open(&mut client, request("fast", &[shard], latest)).await;

    // Far more commits (one live-tail chunk each) than the tail buffers,
    // while `slow` reads nothing: its HTTP/2 window (2 MiB) and buffers fill
    // with these 8 KiB events, it falls behind the tail and must fall back
    // to reading on its own.
    let total = omnirelay_hub::defaults::TAIL_BUFFER_CHUNKS + 500;
    let padding = "x".repeat(8 * 1024);
    let mut appender = Appender::open(&mut client).await;
    for seq in 1..=total as u64 {
        let mut request = batch(shard, "p", seq, epoch, &[&format!("item-{seq}")]);
        support::reshape(&mut request.events[0], |event| {
            event.metadata.insert("padding".into(), padding.clone());
        });
        ack(appender.append(request).await);
    }
    let fast_seen = fast.events(total).await;
    assert_eq!(sequences(&fast_seen), (1..=total as u64).collect::<Vec<_>>());
    let before = hub.counters.snapshot().catch_up_reads;

    let caught_up = slow.events(total).await;
    assert_eq!(sequences(&caught_up), (1..=total as u64).collect::<Vec<_>>(), "the slow subscriber lost nothing");
    let fallbacks = hub.counters.snapshot().catch_up_reads - before;
    assert!(fallbacks >= 1, "the slow subscriber should have lagged and read on its own");
    hub.stop().await;
}

#[tokio::test]
async fn live_tail_reads_grow_with_events_not_with_subscribers() {
    let db = support::migrated_db().await;
    // Appends through one replica, subscribers on another: the second
    // replica learns of commits by NOTIFY and must read them.
    let writer = TestHub::start(db.url()).await;
    let reader = TestHub::start(db.url()).await;
    let mut write_client = writer.client().await;
    let mut read_client = reader.client().await;
    let shard = "resourcelease.fanout";
    let epoch = acquire(&mut write_client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut write_client).await;

    let commits = 40u64;
    let mut measured = Vec::new();
    for (round, subscribers) in [1usize, 8].into_iter().enumerate() {
        let base = round as u64 * commits;
        let mut streams = Vec::new();
        for i in 0..subscribers {
            let start = pb::start_position::Position::AfterSequence(base);
            streams
                .push(Subscription::open(&mut read_client, request(&format!("s{round}-{i}"), &[shard], start)).await);
        }
        // Let every subscriber finish its (empty) catch-up and reach the tail.
        omnirelay_tests::eventually("subscribers reach the live tail", Duration::from_secs(10), || async {
            let reads = reader.counters.snapshot().catch_up_reads;
            let expected: u64 = [1u64, 8].iter().take(round + 1).sum();
            if reads >= expected { Ok(()) } else { Err(format!("{reads} catch-up reads")) }
        })
        .await;
        let before = reader.counters.snapshot();
        for seq in 1..=commits {
            ack(appender.append(batch(shard, "p", base + seq, epoch, &["x"])).await);
        }
        for stream in &mut streams {
            let events = stream.events(commits as usize).await;
            assert_eq!(sequences(&events), (base + 1..=base + commits).collect::<Vec<_>>());
        }
        let after = reader.counters.snapshot();
        let tail_reads = after.tail_reads - before.tail_reads;
        assert!(tail_reads <= commits, "{tail_reads} tail reads for {commits} commits");
        assert_eq!(after.catch_up_reads, before.catch_up_reads, "no subscriber fell back to its own reads");
        assert_eq!(after.events_delivered - before.events_delivered, commits * subscribers as u64);
        measured.push(tail_reads);
    }
    assert!(measured[0] > 0, "the reader replica read the commits it was notified of");
    // With 8 times the subscribers, the reads are those of one: they grow with
    // events only (allowing for commits coalesced differently per round).
    assert!(measured[1] <= commits && measured[1] <= measured[0] * 2 + 2, "reads by round: {measured:?}");
    writer.stop().await;
    reader.stop().await;
}

#[tokio::test]
async fn a_subscription_over_the_shard_limit_is_refused_naming_the_limit() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let limit = omnirelay_hub::defaults::MAX_FOLLOWED_SHARDS;
    let names: Vec<String> = (0..=limit).map(|i| format!("resourcelease.many{i}")).collect();
    let shards: Vec<&str> = names.iter().map(String::as_str).collect();
    let refused = client
        .subscribe(request("too-many", &shards, pb::start_position::Position::Latest(true)))
        .await
        .expect_err("one shard past the limit is refused");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains(&format!("{} shards", limit + 1)), "{}", refused.message());
    assert!(refused.message().contains(&limit.to_string()), "{}", refused.message());

    // A repeated id counts once: exactly the limit is accepted.
    let mut at_limit = shards[..limit].to_vec();
    at_limit.push(shards[0]);
    let accepted = client.subscribe(request("at-limit", &at_limit, pb::start_position::Position::Latest(true))).await;
    assert!(accepted.is_ok(), "{:?}", accepted.err());
    hub.stop().await;
}

/// A subscription nobody reads after it opened: its client's HTTP/2
/// windows fill, then everything the hub sends it stays with the hub.
async fn stalled(
    client: &mut HubClient<Channel>,
    subscriber: &str,
    shard: &str,
) -> tonic::Streaming<pb::SubscribeResponse> {
    let start = pb::start_position::Position::AfterSequence(0);
    client.subscribe(request(subscriber, &[shard], start)).await.expect("subscribe").into_inner()
}

// About twenty seconds: 48 MiB of events go to sixteen subscribers, a dozen
// of which never read.
#[tokio::test]
async fn stalled_and_slow_subscribers_stay_within_the_memory_budget_while_others_keep_going() {
    const BUDGET: usize = 24 * 1024 * 1024;
    const BATCHES: u64 = 192;
    const PER_BATCH: usize = 8;
    let db = support::migrated_db().await;
    let config = omnirelay_hub::Config {
        retention_interval: None,
        subscription_memory: BUDGET,
        ..omnirelay_hub::Config::for_postgres(db.url()).expect("valid URL")
    };
    let hub = TestHub::start_with(config).await;
    let shard = "resourcelease.memory";
    let mut producer = hub.client().await;
    let epoch = acquire(&mut producer, shard, "node-a", LONG).await;

    // Twelve subscriptions on one connection that stop reading at once (as
    // in the drill that took a replica to 2 GiB), on another connection
    // four that read a frame every 300 ms, and three that keep up.
    let mut stalled_client = hub.client().await;
    let mut stalled_streams = Vec::new();
    for i in 0..12 {
        stalled_streams.push(stalled(&mut stalled_client, &format!("stalled-{i}"), shard).await);
    }
    let mut slow_client = hub.client().await;
    let mut slow = Vec::new();
    for i in 0..4 {
        let mut frames = stalled(&mut slow_client, &format!("slow-{i}"), shard).await;
        slow.push(tokio::spawn(async move {
            // Reads until the stream ends (the hub may end it) or the test
            // is over; what it got is not the point.
            while let Ok(Some(_)) = frames.message().await {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    let total = BATCHES * PER_BATCH as u64;
    let mut fast = Vec::new();
    for i in 0..3 {
        let mut client = hub.client().await;
        let latest = pb::start_position::Position::AfterSequence(0);
        let mut subscription = Subscription::open(&mut client, request(&format!("fast-{i}"), &[shard], latest)).await;
        fast.push(tokio::spawn(async move { sequences(&subscription.events(total as usize).await) }));
    }

    // 32 KiB events, 256 KiB a batch, 48 MiB in all: twice the budget.
    let padding = "x".repeat(32 * 1024);
    let mut appender = Appender::open(&mut producer).await;
    for seq in 1..=BATCHES {
        let items: Vec<String> = (0..PER_BATCH).map(|i| format!("item-{seq}-{i}")).collect();
        let items: Vec<&str> = items.iter().map(String::as_str).collect();
        let mut request = batch(shard, "p", seq, epoch, &items);
        for event in &mut request.events {
            support::reshape(event, |event| {
                event.metadata.insert("padding".into(), padding.clone());
            });
        }
        ack(appender.append(request).await);
    }

    // Every fast subscriber got every event, in order, once.
    for reader in fast {
        assert_eq!(reader.await.expect("reader"), (1..=total).collect::<Vec<_>>());
    }
    assert!(
        hub.memory.peak() <= hub.memory.limit(),
        "held {} bytes at the peak, over the {} budget",
        hub.memory.peak(),
        hub.memory.limit()
    );
    // The budget was under pressure, and subscribers furthest behind were
    // ended with a status that tells them to resume.
    let mut ended = 0;
    for mut frames in stalled_streams {
        let status = loop {
            match tokio::time::timeout(Duration::from_secs(1), frames.message()).await {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => break None,
                Ok(Err(status)) => break Some(status),
                // Quiet: it caught up and kept its place.
                Err(_) => break None,
            }
        };
        if let Some(status) = status {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains("resubscribe from your checkpoint"), "{}", status.message());
            ended += 1;
        }
    }
    assert!(ended > 0, "with a dozen stalled subscribers over the budget, some must have been ended");
    for reader in slow {
        reader.abort();
    }
    hub.stop().await;
}
