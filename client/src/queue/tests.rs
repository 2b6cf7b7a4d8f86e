//! Behaviour of the queue's procedures, with paused tokio time where time
//! matters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::backpressure::BackpressureDiagnostics;
use crate::error::ErrorCode;
use crate::replication::scripted::{Answer, ScriptedReplicator};
use crate::replication::{InMemoryReplicator, PublishFault, Replicator};

struct Fixture {
    queue: Queue,
    replicator: Arc<InMemoryReplicator>,
    producer: Caller,
    worker: Caller,
}

fn fixture(configure: impl FnOnce(&mut QueueConfig)) -> Fixture {
    fixture_with(configure, |builder| builder)
}

fn fixture_with(configure: impl FnOnce(&mut QueueConfig), build: impl FnOnce(QueueBuilder) -> QueueBuilder) -> Fixture {
    let mut config = QueueConfig::new("resourcelease.test", "node-a");
    configure(&mut config);
    let replicator = Arc::new(InMemoryReplicator::new());
    let queue = build(Queue::builder(config, replicator.clone())).build().expect("valid config");
    Fixture {
        queue,
        replicator,
        producer: Caller::new("spiffe://test/producer", "node-a"),
        worker: Caller::new("spiffe://test/worker", "worker-1"),
    }
}

impl Fixture {
    async fn enqueue(&self, resource_id: &str) -> ItemId {
        self.enqueue_request(EnqueueRequest::new(Payload::new("user", resource_id, "body"))).await
    }

    async fn enqueue_request(&self, request: EnqueueRequest) -> ItemId {
        self.queue.enqueue(&self.producer, request).await.expect("enqueue").item_id
    }

    async fn lease(&self) -> Option<LeasedItem> {
        self.queue.lease(&self.worker, LeaseRequest::new("worker-1")).await.expect("lease")
    }

    async fn assert_replay_matches(&self) {
        let events = self.replicator.events(self.queue.shard());
        let replayed = QueueState::replay(self.queue.shard().clone(), &events).expect("replay");
        replayed.check_invariants().expect("replayed invariants");
        assert_eq!(replayed.encode(), self.queue.encode_state().await, "replay must rebuild the live state");
        self.queue.inspect(|state| state.check_invariants()).await.expect("live invariants");
    }
}

fn requeue_now(error: &str) -> FailRequest {
    FailRequest { error: error.into(), action: FailAction::Requeue, requeue_delay: Some(Duration::ZERO) }
}

#[tokio::test(start_paused = true)]
async fn enqueue_then_lease_then_complete_empties_the_queue() {
    let f = fixture(|_| {});
    let id = f.enqueue("42").await;
    let leased = f.lease().await.expect("an item");
    assert_eq!(leased.handle.item_id, id);
    assert_eq!(leased.handle.attempt, 1);
    assert_eq!(leased.handle.owner, PeerId::from("worker-1"));
    assert_eq!(f.queue.complete(&f.worker, &leased.handle).await, Ok(false));
    let stats = f.queue.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.active), (0, 0));
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn repeated_request_id_returns_the_same_item_and_writes_nothing() {
    let f = fixture(|_| {});
    let payload = Payload::new("user", "42", "body").with_request_id("req-1");
    let first = f.queue.enqueue(&f.producer, EnqueueRequest::new(payload.clone())).await.expect("enqueue");
    let head = f.replicator.head(f.queue.shard());
    let again = f.queue.enqueue(&f.producer, EnqueueRequest::new(payload.clone())).await.expect("dedupe");
    assert_eq!((again.item_id, again.deduplicated), (first.item_id, true));
    assert_eq!(f.replicator.head(f.queue.shard()), head, "a deduplicated enqueue writes no event");

    // Still deduplicated after the item completed (within the retention window).
    let leased = f.lease().await.expect("an item");
    f.queue.complete(&f.worker, &leased.handle).await.expect("complete");
    let after = f.queue.enqueue(&f.producer, EnqueueRequest::new(payload)).await.expect("dedupe");
    assert_eq!((after.item_id, after.deduplicated), (first.item_id, true));
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn bad_input_names_the_field_and_changes_nothing() {
    let f = fixture(|_| {});
    let before = f.queue.encode_state().await;
    let error = f
        .queue
        .enqueue(&f.producer, EnqueueRequest::new(Payload::new("user", " ", "x")))
        .await
        .expect_err("should be refused");
    assert_eq!(error.code(), ErrorCode::InvalidArgument);
    assert!(error.to_string().contains("payload.resource_id"), "{error}");
    let error = f.queue.lease(&f.worker, LeaseRequest::new("")).await.expect_err("should be refused");
    assert!(error.to_string().contains("owner"), "{error}");
    assert_eq!(f.queue.encode_state().await, before);
    assert_eq!(f.replicator.head(f.queue.shard()), Sequence::ZERO);
}

#[tokio::test(start_paused = true)]
async fn higher_priority_leases_first_then_oldest() {
    let f = fixture(|_| {});
    let low = f.enqueue("1").await;
    let high =
        f.enqueue_request(EnqueueRequest { priority: 5, ..EnqueueRequest::new(Payload::new("user", "2", "")) }).await;
    let low2 = f.enqueue("3").await;
    let order: Vec<ItemId> = [f.lease().await, f.lease().await, f.lease().await]
        .into_iter()
        .map(|leased| leased.expect("an item").handle.item_id)
        .collect();
    assert_eq!(order, vec![high, low, low2]);
}

#[tokio::test(start_paused = true)]
async fn one_resource_is_never_leased_twice_at_once() {
    let f = fixture(|_| {});
    let first = f.enqueue("same").await;
    let second = f.enqueue("same").await;
    let other = f.enqueue("other").await;
    let a = f.lease().await.expect("first");
    assert_eq!(a.handle.item_id, first);
    let b = f.lease().await.expect("other resource");
    assert_eq!(b.handle.item_id, other, "the second item of a leased resource is skipped");
    assert!(f.lease().await.is_none(), "nothing else is eligible while `same` is leased");
    f.queue.complete(&f.worker, &a.handle).await.expect("complete");
    assert_eq!(f.lease().await.expect("unblocked").handle.item_id, second);
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn delayed_items_wait_for_not_before() {
    let f = fixture(|_| {});
    let request =
        EnqueueRequest { delay: Duration::from_secs(10), ..EnqueueRequest::new(Payload::new("user", "1", "")) };
    let id = f.enqueue_request(request).await;
    assert!(f.lease().await.is_none());
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(f.lease().await.expect("due now").handle.item_id, id);
}

#[tokio::test(start_paused = true)]
async fn long_poll_wakes_when_an_item_arrives() {
    let f = fixture(|_| {});
    let queue = f.queue.clone();
    let worker = f.worker.clone();
    let waiter =
        tokio::spawn(
            async move { queue.lease(&worker, LeaseRequest::new("worker-1").wait(Duration::from_secs(30))).await },
        );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let id = f.enqueue("1").await;
    let leased = waiter.await.expect("join").expect("lease").expect("woken by the enqueue");
    assert_eq!(leased.handle.item_id, id);
}

#[tokio::test(start_paused = true)]
async fn long_poll_wakes_when_a_delay_passes_and_gives_up_at_its_deadline() {
    let f = fixture(|_| {});
    let started = tokio::time::Instant::now();
    assert!(
        f.queue.lease(&f.worker, LeaseRequest::new("w").wait(Duration::from_secs(3))).await.expect("lease").is_none()
    );
    assert_eq!(started.elapsed(), Duration::from_secs(3), "an empty long poll returns at its deadline");

    let request =
        EnqueueRequest { delay: Duration::from_secs(7), ..EnqueueRequest::new(Payload::new("user", "1", "")) };
    let id = f.enqueue_request(request).await;
    let started = tokio::time::Instant::now();
    let leased = f.queue.lease(&f.worker, LeaseRequest::new("w").wait(Duration::from_secs(30))).await.expect("lease");
    assert_eq!(leased.expect("due during the wait").handle.item_id, id);
    assert_eq!(started.elapsed(), Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn stale_expired_and_foreign_handles_get_distinct_errors_and_change_nothing() {
    let f = fixture(|config| config.lease_duration = Duration::from_secs(10));
    f.enqueue("1").await;
    let first = f.lease().await.expect("lease");

    let mut foreign = first.handle.clone();
    foreign.owner = PeerId::from("intruder");
    let before = f.queue.encode_state().await;
    let error = f.queue.complete(&f.worker, &foreign).await.expect_err("should be refused");
    assert_eq!(error.code(), ErrorCode::PermissionDenied);
    assert_eq!(f.queue.encode_state().await, before);

    // Expired but not yet swept: FAILED_PRECONDITION.
    tokio::time::advance(Duration::from_secs(10)).await;
    let error =
        f.queue.heartbeat(&f.worker, &first.handle, None, BTreeMap::new()).await.expect_err("should be refused");
    assert_eq!(error.code(), ErrorCode::FailedPrecondition, "{error}");
    assert_eq!(f.queue.encode_state().await, before, "a rejected heartbeat changes nothing");

    // Swept: still FAILED_PRECONDITION for that token.
    assert_eq!(f.queue.expire_due().await, Ok(1));
    let error = f.queue.complete(&f.worker, &first.handle).await.expect_err("should be refused");
    assert_eq!(error.code(), ErrorCode::FailedPrecondition, "{error}");

    // Leased again: the old token is stale (ABORTED).
    let second = f.lease().await.expect("requeued");
    assert!(second.handle.fencing_token > first.handle.fencing_token);
    assert_eq!(second.handle.attempt, 2);
    let before = f.queue.encode_state().await;
    for error in [
        f.queue.complete(&f.worker, &first.handle).await.expect_err("should be refused"),
        f.queue.fail(&f.worker, &first.handle, requeue_now("late")).await.expect_err("should be refused"),
        f.queue.heartbeat(&f.worker, &first.handle, None, BTreeMap::new()).await.expect_err("should be refused"),
    ] {
        assert_eq!(error.code(), ErrorCode::Aborted, "{error}");
    }
    assert_eq!(f.queue.encode_state().await, before, "stale tokens change nothing");
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn complete_is_idempotent_for_the_same_token() {
    let f = fixture(|_| {});
    f.enqueue("1").await;
    let leased = f.lease().await.expect("lease");
    assert_eq!(f.queue.complete(&f.worker, &leased.handle).await, Ok(false));
    let head = f.replicator.head(f.queue.shard());
    assert_eq!(f.queue.complete(&f.worker, &leased.handle).await, Ok(true));
    assert_eq!(f.replicator.head(f.queue.shard()), head, "a repeated complete writes nothing");
    let error =
        f.queue.heartbeat(&f.worker, &leased.handle, None, BTreeMap::new()).await.expect_err("should be refused");
    assert_eq!(error.code(), ErrorCode::Aborted);
}

#[tokio::test(start_paused = true)]
async fn heartbeat_extends_the_lease_past_its_original_expiry() {
    let f = fixture(|config| config.lease_duration = Duration::from_secs(10));
    f.enqueue("1").await;
    let leased = f.lease().await.expect("lease");
    tokio::time::advance(Duration::from_secs(8)).await;
    let progress = BTreeMap::from([("step".to_string(), "3/5".to_string())]);
    let expires_at = f.queue.heartbeat(&f.worker, &leased.handle, Some(Duration::from_secs(10)), progress).await;
    assert!(expires_at.expect("heartbeat") > leased.handle.expires_at);
    tokio::time::advance(Duration::from_secs(8)).await;
    assert_eq!(f.queue.expire_due().await, Ok(0), "the heartbeat kept the lease alive");
    assert_eq!(f.queue.complete(&f.worker, &leased.handle).await, Ok(false));
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn sweeper_expires_lapsed_leases_and_requeues_with_the_next_attempt() {
    let f = fixture(|config| config.lease_duration = Duration::from_secs(5));
    let sweeper = Sweeper::spawn(f.queue.clone(), Duration::from_secs(1));
    let id = f.enqueue("1").await;
    let first = f.lease().await.expect("lease");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let stats = f.queue.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.active), (1, 0), "the sweeper requeued the item");
    let item = f.queue.inspect(|state| state.item(id).cloned()).await.expect("item");
    assert_eq!(item.history.len(), 1);
    assert_eq!(item.history[0].outcome, AttemptOutcome::Expired);
    assert_eq!(item.history[0].fencing_token, first.handle.fencing_token);
    assert_eq!(f.lease().await.expect("requeued").handle.attempt, 2);
    sweeper.shutdown().await;
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially() {
    let f = fixture(|config| {
        config.backoff_base = Duration::from_secs(4);
        config.backoff_max = Duration::from_secs(60);
        config.max_attempts = 10;
    });
    f.enqueue("1").await;
    let mut delays = Vec::new();
    for _ in 0..3 {
        let leased = f.lease().await.expect("eligible");
        let failed = FailRequest { error: "boom".into(), ..FailRequest::default() };
        let FailOutcome::Requeued { not_before } = f.queue.fail(&f.worker, &leased.handle, failed).await.expect("fail")
        else {
            panic!("expected a requeue");
        };
        let now = f
            .queue
            .inspect(|state| state.item(leased.handle.item_id).map(|i| i.history.last().map(|r| r.ended_at)))
            .await
            .flatten()
            .expect("history");
        let delay = not_before.saturating_duration_since(now);
        delays.push(delay);
        assert!(f.lease().await.is_none(), "not eligible during backoff");
        tokio::time::advance(delay).await;
    }
    // Base 4 s doubling, each with up to 25% jitter below the nominal delay.
    for (delay, nominal) in delays.iter().zip([4u64, 8, 16]) {
        let nominal = Duration::from_secs(nominal);
        assert!(*delay <= nominal && *delay >= nominal * 3 / 4, "{delay:?} vs {nominal:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn items_dead_letter_after_max_attempts_with_their_whole_history() {
    let f = fixture(|config| config.max_attempts = 2);
    let id = f.enqueue("1").await;
    let first = f.lease().await.expect("attempt 1");
    assert!(matches!(
        f.queue.fail(&f.worker, &first.handle, requeue_now("e1")).await,
        Ok(FailOutcome::Requeued { .. })
    ));
    let second = f.lease().await.expect("attempt 2");
    let outcome = f.queue.fail(&f.worker, &second.handle, requeue_now("e2")).await.expect("fail");
    assert_eq!(outcome, FailOutcome::DeadLettered { reason: DeadLetterReason::MaxAttempts });
    let letter = f.queue.dead_letter(id).await.expect("dead letter");
    let errors: Vec<_> = letter.item.history.iter().map(|r| (r.attempt, r.error.as_str(), r.fencing_token)).collect();
    assert_eq!(errors, vec![(1, "e1", first.handle.fencing_token), (2, "e2", second.handle.fencing_token)]);
    assert_eq!(letter.item.last_error, "e2");
    assert_eq!(f.queue.stats().await.expect("stats").dead_letters, 1);
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn dead_letters_can_be_listed_inspected_redriven_and_purged() {
    let f = fixture(|_| {});
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(f.enqueue(&n.to_string()).await);
        let leased = f.lease().await.expect("lease");
        let request = FailRequest { error: "poison".into(), action: FailAction::DeadLetter, requeue_delay: None };
        f.queue.fail(&f.worker, &leased.handle, request).await.expect("dead-letter");
    }
    let first_page = f.queue.dead_letters(2, None).await.expect("page");
    assert_eq!(first_page.dead_letters.iter().map(|d| d.item.id).collect::<Vec<_>>(), ids[..2]);
    assert_eq!(first_page.dead_letters[0].reason, DeadLetterReason::Requested);
    let token = first_page.next_page_token.expect("more pages");
    let rest = f.queue.dead_letters(10, Some(&token)).await.expect("page");
    assert_eq!(rest.dead_letters.iter().map(|d| d.item.id).collect::<Vec<_>>(), ids[2..]);
    assert_eq!(rest.next_page_token, None);
    assert_eq!(
        f.queue.dead_letters(10, Some("bogus")).await.expect_err("should be refused").code(),
        ErrorCode::InvalidArgument
    );

    assert_eq!(f.queue.redrive(&f.producer, ids[0]).await, Ok(ids[0]));
    let redriven = f.lease().await.expect("redriven item is pending");
    assert_eq!((redriven.handle.item_id, redriven.handle.attempt), (ids[0], 1), "attempts reset");
    assert_eq!(redriven.item.history.len(), 1, "history kept");
    assert_eq!(f.queue.redrive(&f.producer, ids[0]).await.expect_err("should be refused").code(), ErrorCode::NotFound);

    assert_eq!(f.queue.purge_dead_letters(&f.producer, Purge::Items(vec![ids[1], ids[1]])).await, Ok(1));
    assert_eq!(
        f.queue.purge_dead_letters(&f.producer, Purge::Items(vec![])).await.expect_err("should be refused").code(),
        ErrorCode::InvalidArgument
    );
    assert_eq!(f.queue.purge_dead_letters(&f.producer, Purge::All).await, Ok(3));
    assert_eq!(f.queue.stats().await.expect("stats").dead_letters, 0);
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn backpressure_rejects_above_the_high_watermark_until_the_low_watermark() {
    let diagnostics = Arc::new(BackpressureDiagnostics::new());
    let f = fixture_with(
        |config| {
            config.capacity = 10;
            config.high_watermark = 4;
            config.low_watermark = 2;
        },
        |builder| builder.listener(diagnostics.clone()),
    );
    for n in 0..4 {
        f.enqueue(&n.to_string()).await;
    }
    assert!(diagnostics.latest().expect("a transition").active);
    let error = f
        .queue
        .enqueue(&f.producer, EnqueueRequest::new(Payload::new("user", "x", "")))
        .await
        .expect_err("should be refused");
    assert_eq!(error.code(), ErrorCode::ResourceExhausted);
    let signal = error.backpressure().expect("signal in the error");
    assert_eq!((signal.active, signal.pending, signal.high, signal.low), (true, 4, 4, 2));

    // Hysteresis: at 3 pending it is still on; at 2 it turns off.
    let a = f.lease().await.expect("lease");
    assert!(f.queue.enqueue(&f.producer, EnqueueRequest::new(Payload::new("user", "x", ""))).await.is_err());
    let _b = f.lease().await.expect("lease");
    assert!(!diagnostics.latest().expect("transition").active);
    f.enqueue("x").await;
    assert_eq!(diagnostics.recent().len(), 2);
    f.queue.complete(&f.worker, &a.handle).await.expect("complete");
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn capacity_counts_leased_items_and_fails_fast() {
    let f = fixture(|config| {
        config.capacity = 2;
        config.high_watermark = 2;
        config.low_watermark = 1;
    });
    f.enqueue("1").await;
    let _leased = f.lease().await.expect("lease");
    f.enqueue("2").await;
    let error = f
        .queue
        .enqueue(&f.producer, EnqueueRequest::new(Payload::new("user", "3", "")))
        .await
        .expect_err("should be refused");
    assert!(matches!(error, QueueError::AtCapacity { capacity: 2, .. }), "{error}");
}

#[tokio::test(start_paused = true)]
async fn hand_back_drain_returns_every_item_and_stops_leasing_until_resumed() {
    let f = fixture(|_| {});
    let a = f.enqueue("a").await;
    let b = f.enqueue("b").await;
    let leased = f.lease().await.expect("lease");
    let snapshot = f.queue.drain(&f.producer, DrainMode::HandBack, None).await.expect("drain");
    assert_eq!(snapshot.items.iter().map(|i| i.id).collect::<Vec<_>>(), vec![a, b]);
    assert!(snapshot.in_flight.is_empty());
    let handed_back = &snapshot.items[0];
    assert_eq!((handed_back.attempt, handed_back.last_fencing_token), (1, leased.handle.fencing_token));
    assert_eq!(handed_back.history[0].outcome, AttemptOutcome::HandedBack);
    assert_eq!(
        f.queue.lease(&f.worker, LeaseRequest::new("w")).await.expect_err("should be refused").code(),
        ErrorCode::FailedPrecondition
    );
    assert_eq!(
        f.queue.complete(&f.worker, &leased.handle).await.expect_err("should be refused").code(),
        ErrorCode::Aborted
    );
    assert_eq!(f.queue.stats().await.expect("stats").pending, 2, "a drain is non-destructive");
    assert_eq!(f.queue.resume(&f.producer).await, Ok(true));
    assert_eq!(f.queue.resume(&f.producer).await, Ok(false));
    assert!(f.lease().await.is_some());
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn waiting_drain_waits_for_in_flight_leases_then_reports_stragglers() {
    let f = fixture(|_| {});
    f.enqueue("a").await;
    f.enqueue("b").await;
    let a = f.lease().await.expect("a");
    let b = f.lease().await.expect("b");
    let queue = f.queue.clone();
    let worker = f.worker.clone();
    let finisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        queue.complete(&worker, &a.handle).await
    });
    let started = tokio::time::Instant::now();
    let snapshot = f.queue.drain(&f.producer, DrainMode::Wait, Some(Duration::from_secs(5))).await.expect("drain");
    assert_eq!(finisher.await.expect("join"), Ok(false));
    assert_eq!(started.elapsed(), Duration::from_secs(5), "b never finished, so the drain waited its whole timeout");
    assert!(snapshot.items.is_empty());
    assert_eq!(snapshot.in_flight.iter().map(|i| i.id).collect::<Vec<_>>(), vec![b.handle.item_id]);
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn restore_keeps_ids_attempts_and_errors_and_skips_present_items() {
    let source = fixture(|_| {});
    let kept = source.enqueue("a").await;
    let leased = source.lease().await.expect("lease");
    source.queue.fail(&source.worker, &leased.handle, requeue_now("flaky")).await.expect("fail");
    source.enqueue("b").await;
    let snapshot = source.queue.drain(&source.producer, DrainMode::HandBack, None).await.expect("drain");

    let target = fixture(|config| config.shard = ShardId::from("resourcelease.other"));
    let restored = target.queue.restore(&target.producer, &snapshot).await.expect("restore");
    assert_eq!(restored, Restored { restored: 2, skipped: 0 });
    let item = target.queue.inspect(|state| state.item(kept).cloned()).await.expect("same id");
    assert_eq!((item.attempt, item.last_error.as_str()), (1, "flaky"));
    assert_eq!(item.last_fencing_token, leased.handle.fencing_token);
    assert_eq!(target.queue.restore(&target.producer, &snapshot).await, Ok(Restored { restored: 0, skipped: 2 }));
    let again = target.lease().await.expect("restored items lease");
    assert_eq!((again.handle.item_id, again.handle.attempt), (kept, 2));
    target.assert_replay_matches().await;

    let mut bad = snapshot.clone();
    Arc::make_mut(&mut bad.items[1].payload).resource_type.clear();
    let error = target.queue.restore(&target.producer, &bad).await.expect_err("should be refused");
    assert!(error.to_string().contains("snapshot.items[1].payload.resource_type"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_publish_fences_the_shard_until_it_is_rebuilt_from_the_log() {
    let f = fixture(|_| {});
    f.enqueue("1").await;
    let before = f.queue.encode_state().await;

    // Refused before the write: the caller hears UNAVAILABLE, the shard
    // fences itself and refuses everything until it is rebuilt.
    f.replicator.inject([PublishFault::BeforeWrite]);
    let error = f
        .queue
        .enqueue(&f.producer, EnqueueRequest::new(Payload::new("user", "2", "")))
        .await
        .expect_err("should be refused");
    assert_eq!(error.code(), ErrorCode::Unavailable);
    assert!(matches!(error, QueueError::Fenced { reason: FenceReason::Unavailable, .. }), "{error}");
    let refused = f.queue.lease(&f.worker, LeaseRequest::new("worker-1")).await.expect_err("fenced");
    assert_eq!(refused.code(), ErrorCode::Unavailable);
    assert!(matches!(*f.queue.status().borrow(), ShardStatus::Fenced(_)));
    f.queue.recover(Epoch::ZERO).await.expect("rebuild");
    assert_eq!(f.queue.encode_state().await, before, "the batch that was not written is gone");

    // Written, then the answer lost: after the rebuild the batch is there,
    // once.
    f.replicator.inject([PublishFault::AfterWrite]);
    let error = f
        .queue
        .enqueue(&f.producer, EnqueueRequest::new(Payload::new("user", "3", "")))
        .await
        .expect_err("should be refused");
    assert_eq!(error.code(), ErrorCode::Unavailable);
    let head = f.replicator.head(f.queue.shard());
    let recovered = f.queue.recover(Epoch::ZERO).await.expect("rebuild");
    assert_eq!(recovered.sequence, head);
    assert_eq!(f.queue.stats().await.expect("stats").pending, 2, "the written enqueue is in the rebuilt state");
    f.enqueue("4").await;
    assert_eq!(f.replicator.head(f.queue.shard()), head.after(1), "nothing was written twice");
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn a_stale_epoch_fences_the_shard_and_a_new_epoch_serves_it_again() {
    let log = Arc::new(InMemoryReplicator::new());
    let shard = ShardId::from("resourcelease.test");
    let grant = log.acquire_shard(&shard, "node-a", Duration::from_secs(10)).await.expect("acquire");
    let queue = Queue::builder(QueueConfig::new(shard.clone(), "node-a"), log.clone())
        .epoch(grant.epoch)
        .build()
        .expect("valid config");
    let producer = Caller::new("spiffe://test/producer", "node-a");
    let worker = Caller::new("spiffe://test/worker", "worker-1");
    queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", "1", ""))).await.expect("enqueue");
    let leased = queue.lease(&worker, LeaseRequest::new("worker-1")).await.expect("lease").expect("an item");

    // Another owner takes the shard: this one's next batch is refused by the
    // log, not by a check in memory, and nothing of it is written.
    let head = log.head(&shard);
    let stolen = log.steal(&shard, "node-b");
    let error = queue
        .enqueue(&producer, EnqueueRequest::new(Payload::new("user", "2", "")))
        .await
        .expect_err("fenced by the log");
    assert!(matches!(error, QueueError::Fenced { reason: FenceReason::StaleEpoch, .. }), "{error}");
    assert_eq!(log.head(&shard), head, "the stale batch was not written");

    // Rebuilt under a newer epoch, the lease granted before keeps its token.
    let epoch = log.steal(&shard, "node-a");
    assert!(epoch > stolen);
    queue.recover(epoch).await.expect("rebuild");
    assert_eq!(queue.complete(&worker, &leased.handle).await, Ok(false), "the old token still completes");
    let events = log.events(&shard);
    let replayed = QueueState::replay(shard.clone(), &events).expect("replay");
    assert_eq!(replayed.encode(), queue.encode_state().await);
}

#[tokio::test(start_paused = true)]
async fn commands_are_pipelined_and_coalesce_while_the_window_is_full() {
    let replicator = Arc::new(ScriptedReplicator::new(Duration::from_millis(10)));
    let queue = Queue::builder(QueueConfig::new("resourcelease.test", "node-a"), replicator.clone())
        .build()
        .expect("valid config");
    let producer = Caller::new("spiffe://test/producer", "node-a");
    let enqueue = |n: usize| {
        let queue = queue.clone();
        let producer = producer.clone();
        async move { queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", n.to_string(), ""))).await }
    };
    let commands = 4 * defaults::REPLICATION_WINDOW;
    let answers = futures_util::future::join_all((0..commands).map(enqueue)).await;
    let mut sequences: Vec<u64> = answers.into_iter().map(|a| a.expect("enqueue").sequence.get()).collect();
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=commands as u64).collect::<Vec<_>>(), "each answer names its own, durable event");
    let shard = queue.shard().clone();
    assert_eq!(replicator.log.head(&shard).get(), commands as u64);
    // The first commands took a batch each, filling the window; the others
    // shared one open batch, so fewer batches than commands were written.
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.pending, commands as u64);
    let batches = replicator.log.batches(&shard);
    assert_eq!(batches, defaults::REPLICATION_WINDOW as u64 + 1, "window batches plus one coalesced batch");
    let replayed = QueueState::replay(shard, &replicator.log.events(queue.shard())).expect("replay");
    assert_eq!(replayed.encode(), queue.encode_state().await);
}

#[tokio::test(start_paused = true)]
async fn answers_that_arrive_out_of_order_are_settled_in_order() {
    let replicator = Arc::new(ScriptedReplicator::new(Duration::ZERO));
    // The first batch answers last.
    replicator.script([(Duration::from_millis(50), Answer::Ack), (Duration::from_millis(1), Answer::Ack)]);
    let queue = Queue::builder(QueueConfig::new("resourcelease.test", "node-a"), replicator.clone())
        .build()
        .expect("valid config");
    let producer = Caller::new("spiffe://test/producer", "node-a");
    let first = queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", "1", "")));
    let second = queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", "2", "")));
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.expect("first").sequence, Sequence::new(1));
    assert_eq!(second.expect("second").sequence, Sequence::new(2));
    assert_eq!(queue.replication().durable, Sequence::new(2));
}

#[tokio::test(start_paused = true)]
async fn a_lost_batch_fails_every_command_after_it_and_nothing_unacknowledged_is_served() {
    let replicator = Arc::new(ScriptedReplicator::new(Duration::from_millis(5)));
    replicator
        .script([(Duration::from_millis(5), Answer::Ack), (Duration::from_millis(20), Answer::FailedBeforeWrite)]);
    let queue = Queue::builder(QueueConfig::new("resourcelease.test", "node-a"), replicator.clone())
        .build()
        .expect("valid config");
    let producer = Caller::new("spiffe://test/producer", "node-a");
    let worker = Caller::new("spiffe://test/worker", "worker-1");
    let enqueue = |n: &str| queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", n, "")));
    // The second enqueue's batch is lost; the lease decided after it (of
    // that very item, maybe) must not be answered as granted.
    let (first, second, leased) =
        tokio::join!(enqueue("1"), enqueue("2"), queue.lease(&worker, LeaseRequest::new("worker-1")));
    assert!(first.is_ok());
    assert_eq!(second.expect_err("lost").code(), ErrorCode::Unavailable);
    let refused = leased.expect_err("the lease was decided after the lost batch");
    assert_eq!(refused.code(), ErrorCode::Unavailable);
    let shard = queue.shard().clone();
    queue.recover(replicator.log.steal(&shard, "node-a")).await.expect("rebuild");
    let stats = queue.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.active), (1, 0), "only the acknowledged enqueue survived");
}

#[tokio::test(start_paused = true)]
async fn a_full_backlog_refuses_new_work_and_lets_other_commands_wait() {
    let replicator = Arc::new(ScriptedReplicator::new(Duration::from_secs(1)));
    let queue = Queue::builder(QueueConfig::new("resourcelease.test", "node-a"), replicator.clone())
        .build()
        .expect("valid config");
    let producer = Caller::new("spiffe://test/producer", "node-a");
    // Fill the window, then the open batch, without waiting for answers.
    let mut pending = Vec::new();
    for n in 0..(defaults::REPLICATION_WINDOW + defaults::OPEN_BATCH_MAX_EVENTS) {
        let queue = queue.clone();
        let producer = producer.clone();
        pending.push(tokio::spawn(async move {
            queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", n.to_string(), ""))).await
        }));
    }
    let accepted = (defaults::REPLICATION_WINDOW + defaults::OPEN_BATCH_MAX_EVENTS) as u64;
    while queue.stats_now().pending < accepted {
        tokio::task::yield_now().await;
    }
    let error = queue
        .enqueue(&producer, EnqueueRequest::new(Payload::new("user", "x", "")))
        .await
        .expect_err("the backlog is full");
    assert_eq!(error.code(), ErrorCode::ResourceExhausted);
    assert!(matches!(error, QueueError::ReplicationBacklog { .. }), "{error}");
    assert!(error.backpressure().is_some(), "the refusal carries the signal");
    for task in pending {
        task.await.expect("task").expect("every accepted enqueue lands");
    }
    queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", "x", ""))).await.expect("room again");
}

#[tokio::test(start_paused = true)]
async fn a_command_abandoned_mid_publish_still_lands_once() {
    let replicator = Arc::new(ScriptedReplicator::new(Duration::from_secs(1)));
    let queue = Queue::builder(QueueConfig::new("resourcelease.test", "node-a"), replicator.clone())
        .build()
        .expect("valid config");
    let producer = Caller::new("spiffe://test/producer", "node-a");
    let abandoned = queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", "1", "")));
    assert!(tokio::time::timeout(Duration::from_millis(10), abandoned).await.is_err(), "the caller gave up");
    queue.enqueue(&producer, EnqueueRequest::new(Payload::new("user", "2", ""))).await.expect("enqueue");
    queue.settled().await.expect("settled");
    assert_eq!(queue.stats().await.expect("stats").pending, 2, "the abandoned enqueue landed");
    let events = replicator.log.events(queue.shard());
    assert_eq!(events.len(), 2, "each batch is in the log once");
    let replayed = QueueState::replay(queue.shard().clone(), &events).expect("replay");
    assert_eq!(replayed.encode(), queue.encode_state().await);
}

#[tokio::test(start_paused = true)]
async fn snapshots_bound_the_replay_and_remembered_request_ids_survive_a_rebuild() {
    let f = fixture(|_| {});
    let payload = Payload::new("user", "1", "body").with_request_id("req-1");
    let first = f.queue.enqueue(&f.producer, EnqueueRequest::new(payload.clone())).await.expect("enqueue");
    let leased = f.lease().await.expect("lease");
    f.queue.complete(&f.worker, &leased.handle).await.expect("complete");
    f.enqueue("2").await;
    let at = f.queue.write_snapshot().await.expect("snapshot").expect("written");
    assert_eq!(f.queue.write_snapshot().await, Ok(None), "nothing changed since");
    f.enqueue("3").await;
    let live = f.queue.encode_state().await;

    let recovered = f.queue.recover(Epoch::ZERO).await.expect("rebuild");
    assert_eq!((recovered.snapshot, recovered.replayed), (at, 1), "only the tail after the snapshot is replayed");
    assert_eq!(f.queue.encode_state().await, live);
    let again = f.queue.enqueue(&f.producer, EnqueueRequest::new(payload)).await.expect("dedupe");
    assert_eq!((again.item_id, again.deduplicated), (first.item_id, true), "the completed request id is remembered");
}

#[tokio::test(start_paused = true)]
async fn a_drained_queue_drops_what_was_restored_elsewhere() {
    let source = fixture(|_| {});
    let kept = source.enqueue("1").await;
    let leased_elsewhere = source.enqueue("2").await;
    let held = source.lease().await.expect("lease");
    assert_eq!(held.handle.item_id, kept);
    let error = source.queue.purge_drained(&source.producer, &[kept]).await.expect_err("not draining");
    assert_eq!(error.code(), ErrorCode::FailedPrecondition);
    let snapshot = source.queue.drain(&source.producer, DrainMode::HandBack, None).await.expect("drain");
    assert_eq!(snapshot.items.len(), 2);
    let target = fixture(|_| {});
    target.queue.restore(&target.producer, &snapshot).await.expect("restore");
    let ids: Vec<ItemId> = snapshot.items.iter().map(|item| item.id).collect();
    let purged = source.queue.purge_drained(&source.producer, &ids).await.expect("purge");
    assert_eq!(purged, PurgedDrained { purged: 2, skipped: 0 });
    source.queue.resume(&source.producer).await.expect("resume");
    assert!(source.lease().await.is_none(), "nothing is served twice after a resume");
    let again = source.queue.drain(&source.producer, DrainMode::HandBack, None).await.expect("drain");
    assert_eq!(
        source.queue.purge_drained(&source.producer, &[leased_elsewhere]).await,
        Ok(PurgedDrained { purged: 0, skipped: 1 })
    );
    assert!(again.items.is_empty());
    source.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn a_large_restore_is_split_into_events_within_the_log_limit() {
    let source = fixture(|_| {});
    let body = vec![7u8; omnirelay_proto::limits::MAX_ITEM_BODY_BYTES / 2];
    for n in 0..6 {
        source.enqueue_request(EnqueueRequest::new(Payload::new("user", n.to_string(), body.clone()))).await;
    }
    let snapshot = source.queue.drain(&source.producer, DrainMode::HandBack, None).await.expect("drain");
    let target = fixture(|_| {});
    let restored = target.queue.restore(&target.producer, &snapshot).await.expect("restore");
    assert_eq!(restored.restored, 6);
    let events = target.replicator.events(target.queue.shard());
    assert!(events.len() >= 3, "half-limit bodies: at most two per event, got {} events", events.len());
    for event in &events {
        let bytes = prost::Message::encoded_len(&crate::wire::event(event.sequence, &event.event));
        assert!(bytes <= omnirelay_proto::limits::MAX_EVENT_BYTES, "an event of {bytes} bytes");
    }
    target.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_plus_the_tail_rebuilds_the_live_state() {
    let f = fixture(|config| config.lease_duration = Duration::from_secs(5));
    for n in 0..4 {
        f.enqueue(&n.to_string()).await;
    }
    let leased = f.lease().await.expect("lease");
    let snapshot = f.queue.encode_state().await;
    let at = f.queue.stats().await.expect("stats").last_sequence;
    f.queue.fail(&f.worker, &leased.handle, requeue_now("x")).await.expect("fail");
    let _held = f.lease().await.expect("lease");
    tokio::time::advance(Duration::from_secs(6)).await;
    f.queue.expire_due().await.expect("expire");
    f.enqueue("late").await;

    let mut rebuilt = QueueState::decode(&snapshot).expect("decode");
    assert_eq!(rebuilt.encode(), snapshot, "decode then encode is the identity");
    rebuilt.apply_all(&f.replicator.read(f.queue.shard(), at)).expect("tail");
    rebuilt.check_invariants().expect("invariants");
    assert_eq!(rebuilt.encode(), f.queue.encode_state().await);

    // A queue restarted from the rebuilt state carries on where the old left.
    let restarted =
        Queue::builder(f.queue.config().clone(), f.replicator.clone()).state(rebuilt).build().expect("build");
    assert_eq!(restarted.stats().await.expect("stats").pending, 5);
}

#[tokio::test(start_paused = true)]
async fn events_round_trip_through_the_wire_format() {
    let f = fixture(|config| config.max_attempts = 1);
    f.enqueue("1").await;
    let leased = f.lease().await.expect("lease");
    f.queue.heartbeat(&f.worker, &leased.handle, None, BTreeMap::from([("k".into(), "v".into())])).await.expect("hb");
    f.queue.fail(&f.worker, &leased.handle, requeue_now("e")).await.expect("fail");
    let events = f.replicator.events(f.queue.shard());
    for sequenced in &events {
        let decoded =
            crate::wire::event_from_pb(crate::wire::event(sequenced.sequence, &sequenced.event)).expect("decode");
        assert_eq!(&decoded, sequenced);
    }
}

#[test]
fn configurations_that_contradict_themselves_are_rejected_by_field() {
    let mut config = QueueConfig::new("q", "n");
    config.low_watermark = config.high_watermark;
    assert!(config.validate().expect_err("should be refused").to_string().contains("config.low_watermark"));
    let mut config = QueueConfig::new("q", "n");
    config.high_watermark = config.capacity + 1;
    assert!(config.validate().expect_err("should be refused").to_string().contains("config.high_watermark"));
}

mod observed {
    //! Metrics and lease observers see what the queue does.

    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::*;

    /// Keeps the last value of every metric, keyed `name{shard}`.
    #[derive(Default)]
    struct Values(Mutex<BTreeMap<String, Arc<Value>>>);

    #[derive(Default)]
    struct Value(AtomicU64);

    impl metrics::CounterFn for Value {
        fn increment(&self, value: u64) {
            self.0.fetch_add(value, Ordering::SeqCst);
        }
        fn absolute(&self, value: u64) {
            self.0.store(value, Ordering::SeqCst);
        }
    }

    impl metrics::GaugeFn for Value {
        fn increment(&self, _: f64) {}
        fn decrement(&self, _: f64) {}
        fn set(&self, value: f64) {
            self.0.store(value as u64, Ordering::SeqCst);
        }
    }

    impl metrics::HistogramFn for Value {
        fn record(&self, _: f64) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Values {
        fn value(&self, key: &Key) -> Arc<Value> {
            let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            Arc::clone(self.0.lock().expect("test lock").entry(name).or_default())
        }

        fn get(&self, name: &str) -> u64 {
            self.0.lock().expect("test lock").get(name).map_or(u64::MAX, |v| v.0.load(Ordering::SeqCst))
        }
    }

    struct TestRecorder(Arc<Values>);

    impl Recorder for TestRecorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.0.value(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.0.value(key))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(self.0.value(key))
        }
    }

    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl LeaseObserver for Seen {
        fn lease_granted(&self, owner: &PeerId) {
            self.0.lock().expect("test lock").push(format!("granted {owner}"));
        }
        fn heartbeat(&self, owner: &PeerId) {
            self.0.lock().expect("test lock").push(format!("heartbeat {owner}"));
        }
        fn lease_completed(&self, owner: &PeerId, turnaround: Duration) {
            self.0.lock().expect("test lock").push(format!("completed {owner} {}s", turnaround.as_secs()));
        }
        fn lease_failed(&self, owner: &PeerId) {
            self.0.lock().expect("test lock").push(format!("failed {owner}"));
        }
        fn lease_expired(&self, owner: &PeerId) {
            self.0.lock().expect("test lock").push(format!("expired {owner}"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_and_observers_follow_the_lease_lifecycle() {
        let values = Arc::new(Values::default());
        let recorder = TestRecorder(Arc::clone(&values));
        let seen = Arc::new(Seen::default());
        let f = metrics::with_local_recorder(&recorder, || {
            fixture_with(
                |config| {
                    config.max_attempts = 2;
                    config.lease_duration = Duration::from_secs(5);
                    config.capacity = 10;
                    config.high_watermark = 2;
                    config.low_watermark = 1;
                },
                |builder| builder.observer(seen.clone()),
            )
        });
        f.enqueue("a").await;
        f.enqueue("b").await;
        let a = f.lease().await.expect("a");
        tokio::time::advance(Duration::from_secs(3)).await;
        f.queue.heartbeat(&f.worker, &a.handle, None, BTreeMap::new()).await.expect("heartbeat");
        f.queue.complete(&f.worker, &a.handle).await.expect("complete");
        let b = f.lease().await.expect("b");
        f.queue.fail(&f.worker, &b.handle, requeue_now("boom")).await.expect("fail");
        let _b_again = f.lease().await.expect("b again");
        tokio::time::advance(Duration::from_secs(6)).await;
        f.queue.expire_due().await.expect("expire");

        let metric = |name: &str| values.get(&format!("{name}{{shard=resourcelease.test}}"));
        assert_eq!(metric(crate::metrics::PENDING), 0);
        assert_eq!(metric(crate::metrics::ACTIVE), 0);
        assert_eq!(metric(crate::metrics::DEAD_LETTERS), 1);
        assert_eq!(metric(crate::metrics::EXPIRED), 1);
        assert_eq!(metric(crate::metrics::DEAD_LETTERED), 1);
        assert_eq!(metric(crate::metrics::BACKPRESSURE_TRANSITIONS), 2, "on at 2 pending, off at 1");
        assert_eq!(metric(crate::metrics::LEASE_WAIT), 3, "one wait sample per granted lease");

        let seen = seen.0.lock().expect("test lock").clone();
        assert_eq!(
            seen,
            vec![
                "granted worker-1",
                "heartbeat worker-1",
                "completed worker-1 3s",
                "granted worker-1",
                "failed worker-1",
                "granted worker-1",
                "expired worker-1",
            ]
        );
    }
}

#[test]
fn command_futures_can_move_between_threads() {
    // The node serves commands from a multi-threaded runtime: every future
    // must be `Send`, which holding the state's synchronous lock across an
    // `.await` would break.
    fn assert_send<T: Send>(_: T) {}
    let f = fixture(|_| {});
    let handle = LeaseHandle {
        item_id: ItemId::from_u128(1),
        attempt: 1,
        lease_id: LeaseId::from_u128(1),
        fencing_token: FencingToken::new(1),
        owner: PeerId::from("worker-1"),
        expires_at: Timestamp::EPOCH,
    };
    assert_send(f.queue.enqueue(&f.producer, EnqueueRequest::new(Payload::new("user", "1", ""))));
    assert_send(f.queue.lease(&f.worker, LeaseRequest::new("worker-1")));
    assert_send(f.queue.heartbeat(&f.worker, &handle, None, BTreeMap::new()));
    assert_send(f.queue.complete(&f.worker, &handle));
    assert_send(f.queue.fail(&f.worker, &handle, FailRequest::default()));
    assert_send(f.queue.expire_due());
    assert_send(f.queue.drain(&f.producer, DrainMode::HandBack, None));
    assert_send(f.queue.stats());
}

#[tokio::test(start_paused = true)]
async fn stale_index_entries_are_skipped_and_compacted() {
    // Enough leases ended out of order, and heartbeats, to leave more stale
    // heap entries than the compaction slack; the queue must still lease in
    // order, expire exactly the live leases, and replay to the same state.
    let f = fixture(|config| config.lease_duration = Duration::from_secs(10));
    let count = 3 * defaults::INDEX_STALE_SLACK;
    for n in 0..count {
        f.enqueue(&n.to_string()).await;
    }
    let mut leased = Vec::new();
    while let Some(item) = f.lease().await {
        leased.push(item);
    }
    assert_eq!(leased.len(), count, "every item leased, in queue order");
    for pair in leased.windows(2) {
        assert!(pair[0].handle.fencing_token < pair[1].handle.fencing_token);
        let order = |item: &LeasedItem| item.item.payload.resource_id.parse::<usize>().expect("numeric id");
        assert!(order(&pair[0]) < order(&pair[1]));
    }
    // Complete every other lease, newest first (never the heap's top), and
    // heartbeat the rest twice (each leaves a stale expiry behind).
    let mut kept = Vec::new();
    for (n, item) in leased.into_iter().enumerate().rev() {
        if n % 2 == 0 {
            f.queue.complete(&f.worker, &item.handle).await.expect("complete");
        } else {
            kept.push(item);
        }
    }
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(1)).await;
        for item in &kept {
            f.queue.heartbeat(&f.worker, &item.handle, None, BTreeMap::new()).await.expect("heartbeat");
        }
    }
    f.queue.inspect(|state| state.check_invariants()).await.expect("invariants with stale entries");
    // Fail some back into the ready set out of order, then lease them again.
    for item in kept.iter().take(10) {
        f.queue.fail(&f.worker, &item.handle, requeue_now("retry")).await.expect("fail");
    }
    let mut releases = 0;
    while f.lease().await.is_some() {
        releases += 1;
    }
    assert_eq!(releases, 10);
    let live = f.queue.stats().await.expect("stats").active;
    assert_eq!(f.queue.next_expiry().await.is_some(), live > 0);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(f.queue.expire_due().await.expect("expire") as u64, live, "exactly the live leases expire");
    assert_eq!(f.queue.stats().await.expect("stats").active, 0);
    assert_eq!(f.queue.next_expiry().await, None);
    f.assert_replay_matches().await;
}

#[tokio::test(start_paused = true)]
async fn a_replay_stops_at_a_sequence_or_a_time_from_a_snapshot_or_the_start() {
    let start = Timestamp::from_unix_nanos(1_000_000_000_000);
    let clock = crate::clock::ManualClock::new(start);
    let f = fixture_with(|_| {}, |builder| builder.clock(clock.clone()));
    let shard = f.queue.shard().clone();
    let first = f.enqueue("1").await;
    let after_first = f.queue.stats().await.expect("stats").last_sequence;
    clock.advance(Duration::from_secs(10));
    let second = f.enqueue("2").await;
    let snapshot_at = f.queue.write_snapshot().await.expect("snapshot").expect("written");
    clock.advance(Duration::from_secs(10));
    let third = f.enqueue("3").await;
    let pending = |state: &QueueState| state.pending_items().iter().map(|item| item.id).collect::<Vec<_>>();

    let at_first =
        replay(&*f.replicator, &shard, None, Until::Sequence(after_first), &mut |_| {}).await.expect("replay");
    assert_eq!((pending(&at_first.state), at_first.state.last_sequence()), (vec![first], after_first));
    let between = start.saturating_add(Duration::from_secs(5));
    let by_time = replay(&*f.replicator, &shard, None, Until::Time(between), &mut |_| {}).await.expect("replay");
    assert_eq!(by_time.state.encode(), at_first.state.encode(), "the event recorded later is left out");

    let snapshot = f.replicator.latest_snapshot(&shard).await.expect("read").expect("a snapshot");
    assert_eq!(snapshot.sequence, snapshot_at);
    let mut reports = Vec::new();
    let head = replay(&*f.replicator, &shard, Some(snapshot), Until::Head, &mut |step| reports.push(step))
        .await
        .expect("replay");
    assert_eq!(pending(&head.state), vec![first, second, third]);
    assert_eq!((head.snapshot, head.replayed), (snapshot_at, 1), "only the event after the snapshot is replayed");
    assert_eq!(head.state.encode(), f.queue.encode_state().await, "up to the head is the live state");
    assert_eq!(reports.last().map(|step| step.at), Some(head.state.last_sequence()), "progress reaches the end");
}
