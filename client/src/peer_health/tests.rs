//! Peer health under paused tokio time: every transition happens at a known
//! instant without sleeping.

use std::time::Duration;

use tokio::time::advance;

use super::*;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Short thresholds so tests read in seconds.
fn config() -> HealthConfig {
    HealthConfig {
        heartbeat_grace: secs(2),
        consecutive_failures_to_eject: 3,
        base_ejection_time: secs(10),
        max_ejection_time: secs(25),
        max_ejection_percent: 50,
        probation_period: secs(10),
        ejection_level_decay: secs(60),
        ..HealthConfig::default()
    }
}

fn tracker() -> PeerLeaseHealthTracker {
    PeerLeaseHealthTracker::new(config()).expect("test config is valid")
}

fn peer(name: &str) -> PeerId {
    PeerId::new(name)
}

fn expire(tracker: &PeerLeaseHealthTracker, peer: &PeerId, times: u32) {
    for _ in 0..times {
        tracker.record_lease_granted(peer);
        tracker.record_lease_expired(peer);
    }
}

#[tokio::test(start_paused = true)]
async fn idle_but_heartbeating_worker_stays_healthy() {
    let tracker = tracker();
    let idle = peer("idle");
    tracker.register(&idle, PeerMetadata::default());
    for _ in 0..120 {
        advance(Duration::from_millis(1500)).await;
        tracker.record_heartbeat(&idle);
        assert_eq!(tracker.state(&idle), Some(PeerState::Healthy));
    }
    let snapshot = tracker.snapshot();
    assert_eq!(snapshot.summary.eligible, 1);
    assert_eq!(snapshot.peer(&idle).expect("known").leases_granted, 0);
}

#[tokio::test(start_paused = true)]
async fn silent_peer_becomes_suspect_after_the_grace_period() {
    let tracker = tracker();
    let quiet = peer("quiet");
    tracker.register(&quiet, PeerMetadata::default());
    advance(secs(2)).await;
    assert_eq!(tracker.state(&quiet), Some(PeerState::Healthy), "exactly at the grace period it is still alive");
    advance(Duration::from_millis(1)).await;
    assert_eq!(tracker.state(&quiet), Some(PeerState::Suspect));
    assert!(!tracker.is_eligible(&quiet));
    let snapshot = tracker.snapshot();
    let view = snapshot.peer(&quiet).expect("known");
    assert!(!view.is_healthy);
    assert_eq!(view.state_age_ms, 1, "the transition is dated when the grace period ran out");
}

#[tokio::test(start_paused = true)]
async fn fresh_heartbeat_brings_a_suspect_back_through_probation() {
    let tracker = tracker();
    let quiet = peer("quiet");
    tracker.register(&quiet, PeerMetadata::default());
    advance(secs(5)).await;
    assert_eq!(tracker.state(&quiet), Some(PeerState::Suspect));
    tracker.record_heartbeat(&quiet);
    assert_eq!(tracker.state(&quiet), Some(PeerState::Probation));
    assert!(tracker.is_eligible(&quiet));
    // Keep heartbeating through the probation period.
    for _ in 0..10 {
        advance(secs(1)).await;
        tracker.record_heartbeat(&quiet);
    }
    assert_eq!(tracker.state(&quiet), Some(PeerState::Healthy));
}

#[tokio::test(start_paused = true)]
async fn slow_start_weight_ramps_up_during_probation() {
    let tracker = tracker();
    let p = peer("p");
    tracker.register(&p, PeerMetadata::default());
    advance(secs(3)).await;
    tracker.record_heartbeat(&p);
    let weight = |tracker: &PeerLeaseHealthTracker| tracker.candidates()[0].weight;
    assert!((weight(&tracker) - config().slow_start_min_weight).abs() < 1e-9, "starts at the minimum weight");
    advance(secs(1)).await;
    tracker.record_heartbeat(&p);
    advance(secs(1)).await;
    tracker.record_heartbeat(&p);
    assert!((weight(&tracker) - 0.2).abs() < 1e-9, "two of ten seconds: 0.2, got {}", weight(&tracker));
    for _ in 0..3 {
        advance(secs(1)).await;
        tracker.record_heartbeat(&p);
    }
    assert!((weight(&tracker) - 0.5).abs() < 1e-9, "halfway: 0.5, got {}", weight(&tracker));
    for _ in 0..5 {
        advance(secs(1)).await;
        tracker.record_heartbeat(&p);
    }
    assert_eq!(tracker.state(&p), Some(PeerState::Healthy));
    assert_eq!(weight(&tracker), 1.0);
}

#[tokio::test(start_paused = true)]
async fn consecutive_expiries_eject_a_peer_and_a_completion_resets_the_count() {
    let tracker = tracker();
    let flaky = peer("flaky");
    let steady = peer("steady");
    tracker.register(&flaky, PeerMetadata::default());
    tracker.register(&steady, PeerMetadata::default());

    expire(&tracker, &flaky, 2);
    tracker.record_lease_granted(&flaky);
    tracker.record_lease_completed(&flaky, Duration::from_millis(50));
    expire(&tracker, &flaky, 2);
    assert_eq!(tracker.state(&flaky), Some(PeerState::Healthy), "the completion broke the streak");

    expire(&tracker, &flaky, 1);
    assert_eq!(tracker.state(&flaky), Some(PeerState::Ejected));
    assert!(!tracker.is_eligible(&flaky));
    let snapshot = tracker.snapshot();
    let view = snapshot.peer(&flaky).expect("known");
    assert_eq!(view.ejections, 1);
    assert_eq!(view.lease_expiries, 5);
    assert_eq!(view.ejection_remaining_ms, Some(10_000));
}

#[tokio::test(start_paused = true)]
async fn reported_failures_count_towards_ejection_too() {
    let tracker = tracker();
    let bad = peer("bad");
    let good = peer("good");
    tracker.register(&good, PeerMetadata::default());
    for _ in 0..3 {
        tracker.record_lease_granted(&bad);
        tracker.record_lease_failed(&bad);
    }
    assert_eq!(tracker.state(&bad), Some(PeerState::Ejected));
}

#[tokio::test(start_paused = true)]
async fn ejection_time_grows_with_each_ejection_up_to_the_cap() {
    let tracker = tracker();
    let flaky = peer("flaky");
    tracker.register(&flaky, PeerMetadata::default());
    tracker.register(&peer("other"), PeerMetadata::default());
    let mut lengths = Vec::new();
    for round in 0..3 {
        if round == 0 {
            expire(&tracker, &flaky, 3);
        } else {
            // In probation a single expiry ejects again.
            expire(&tracker, &flaky, 1);
        }
        assert_eq!(tracker.state(&flaky), Some(PeerState::Ejected), "round {round}");
        let mut elapsed = 0;
        while tracker.state(&flaky) == Some(PeerState::Ejected) {
            advance(secs(1)).await;
            tracker.record_heartbeat(&flaky);
            tracker.record_heartbeat(&peer("other"));
            elapsed += 1;
        }
        assert_eq!(tracker.state(&flaky), Some(PeerState::Probation), "an ejected peer that kept heartbeating");
        lengths.push(elapsed);
    }
    assert_eq!(lengths, vec![10, 20, 25], "base, twice the base, then capped");
}

#[tokio::test(start_paused = true)]
async fn heartbeats_do_not_cut_an_ejection_short() {
    let tracker = tracker();
    let flaky = peer("flaky");
    tracker.register(&flaky, PeerMetadata::default());
    expire(&tracker, &flaky, 3);
    for _ in 0..9 {
        advance(secs(1)).await;
        tracker.record_heartbeat(&flaky);
        assert_eq!(tracker.state(&flaky), Some(PeerState::Ejected));
    }
}

#[tokio::test(start_paused = true)]
async fn a_peer_silent_when_its_ejection_ends_is_suspect() {
    let tracker = tracker();
    let gone = peer("gone");
    tracker.register(&gone, PeerMetadata::default());
    expire(&tracker, &gone, 3);
    advance(secs(11)).await;
    assert_eq!(tracker.state(&gone), Some(PeerState::Suspect));
    tracker.record_heartbeat(&gone);
    assert_eq!(tracker.state(&gone), Some(PeerState::Probation));
}

#[tokio::test(start_paused = true)]
async fn ejection_level_decays_while_the_peer_stays_healthy() {
    let tracker = tracker();
    let p = peer("p");
    tracker.register(&p, PeerMetadata::default());
    expire(&tracker, &p, 3);
    // Ejected 10 s, probation 10 s, then healthy: keep it alive throughout.
    for _ in 0..20 {
        advance(secs(1)).await;
        tracker.record_heartbeat(&p);
    }
    assert_eq!(tracker.state(&p), Some(PeerState::Healthy));
    assert_eq!(tracker.snapshot().peer(&p).expect("known").ejection_level, 1);
    for _ in 0..60 {
        advance(secs(1)).await;
        tracker.record_heartbeat(&p);
    }
    assert_eq!(tracker.snapshot().peer(&p).expect("known").ejection_level, 0, "a healthy minute sheds a level");
    // So the next ejection is a first ejection again.
    expire(&tracker, &p, 3);
    assert_eq!(tracker.snapshot().peer(&p).expect("known").ejection_remaining_ms, Some(10_000));
}

#[tokio::test(start_paused = true)]
async fn at_most_the_configured_share_of_peers_is_ejected() {
    let tracker = tracker();
    let peers: Vec<_> = (0..4).map(|i| peer(&format!("p{i}"))).collect();
    for p in &peers {
        tracker.register(p, PeerMetadata::default());
    }
    for p in &peers {
        expire(&tracker, p, 3);
    }
    let summary = tracker.snapshot().summary;
    assert_eq!(summary.ejected, 2, "50 % of four peers");
    assert_eq!(summary.eligible, 2);
}

#[tokio::test(start_paused = true)]
async fn one_ejection_is_allowed_even_when_the_share_rounds_to_zero() {
    let tracker = PeerLeaseHealthTracker::new(HealthConfig { max_ejection_percent: 10, ..config() }).expect("valid");
    let peers: Vec<_> = (0..3).map(|i| peer(&format!("p{i}"))).collect();
    for p in &peers {
        tracker.register(p, PeerMetadata::default());
    }
    for p in &peers {
        expire(&tracker, p, 3);
    }
    assert_eq!(tracker.snapshot().summary.ejected, 1);
}

#[tokio::test(start_paused = true)]
async fn leases_held_by_unhealthy_peers_are_pending_reassignments() {
    let tracker = tracker();
    let busy = peer("busy");
    let other = peer("other");
    tracker.register(&other, PeerMetadata::default());
    tracker.record_lease_granted(&busy);
    tracker.record_lease_granted(&busy);
    let snapshot = tracker.snapshot();
    assert_eq!(snapshot.summary.pending_reassignments, 0, "a healthy holder keeps its leases");
    advance(secs(3)).await;
    let snapshot = tracker.snapshot();
    assert_eq!(snapshot.summary.pending_reassignments, 2);
    assert_eq!(snapshot.peer(&busy).expect("known").pending_reassignments, 2);
    assert_eq!(snapshot.summary.unhealthy, 2, "both went silent");
    // The leases expire: the work has moved back to the queue.
    tracker.record_lease_expired(&busy);
    tracker.record_lease_expired(&busy);
    assert_eq!(tracker.snapshot().summary.pending_reassignments, 0);
}

#[tokio::test(start_paused = true)]
async fn turnaround_average_follows_completions_but_not_failures() {
    let tracker = tracker();
    let p = peer("p");
    tracker.record_lease_granted(&p);
    tracker.record_lease_completed(&p, Duration::from_millis(100));
    assert_eq!(tracker.candidates()[0].turnaround, Duration::from_millis(100));
    tracker.record_lease_granted(&p);
    tracker.record_lease_completed(&p, Duration::from_millis(200));
    let expected = 100.0 + config().turnaround_ewma_alpha * 100.0;
    let got = tracker.snapshot().peer(&p).expect("known").turnaround_ewma_ms.expect("known average");
    assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    tracker.record_lease_granted(&p);
    tracker.record_lease_failed(&p);
    let after = tracker.snapshot().peer(&p).expect("known").turnaround_ewma_ms.expect("known average");
    assert!((after - expected).abs() < 1e-6, "failures do not move the average");
    let fresh = peer("fresh");
    tracker.register(&fresh, PeerMetadata::default());
    let candidate = tracker.candidates().into_iter().find(|c| c.peer == fresh).expect("known");
    assert_eq!(candidate.turnaround, config().default_turnaround);
}

#[tokio::test(start_paused = true)]
async fn events_for_unknown_peers_do_not_invent_them_and_removal_forgets() {
    let tracker = tracker();
    let ghost = peer("ghost");
    tracker.record_lease_expired(&ghost);
    tracker.record_lease_released(&ghost);
    assert_eq!(tracker.state(&ghost), None);
    assert!(!tracker.is_eligible(&ghost));
    tracker.register(&ghost, PeerMetadata { region: Some("eu-west-1".into()), build: Some("abc123".into()) });
    let snapshot = tracker.snapshot();
    assert_eq!(snapshot.peer(&ghost).expect("known").metadata.region.as_deref(), Some("eu-west-1"));
    assert!(tracker.remove(&ghost));
    assert!(!tracker.remove(&ghost));
    assert_eq!(tracker.snapshot().summary.peers, 0);
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_view() {
    let tracker = tracker();
    let clone = tracker.clone();
    clone.record_heartbeat(&peer("a"));
    assert_eq!(tracker.state(&peer("a")), Some(PeerState::Healthy));
}

#[tokio::test(start_paused = true)]
async fn snapshot_serializes_with_stable_snake_case_names() {
    let tracker = tracker();
    tracker.register(&peer("a"), PeerMetadata { region: Some("eu".into()), build: None });
    advance(secs(3)).await;
    let json = serde_json::to_value(tracker.snapshot()).expect("serialize");
    assert_eq!(json["summary"]["eligible"], 0);
    assert_eq!(json["summary"]["unhealthy"], 1);
    assert_eq!(json["summary"]["pending_reassignments"], 0);
    assert_eq!(json["peers"][0]["peer_id"], "a");
    assert_eq!(json["peers"][0]["state"], "suspect");
    assert_eq!(json["peers"][0]["is_healthy"], false);
    assert_eq!(json["peers"][0]["metadata"]["region"], "eu");
    assert!(json["peers"][0]["metadata"].get("build").is_none());
    let back: LeaseHealthSnapshot = serde_json::from_value(json).expect("deserialize");
    assert_eq!(back.summary.suspect, 1);
}

#[tokio::test(start_paused = true)]
async fn peer_gauges_are_published() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let tracker = tracker();
    metrics::with_local_recorder(&recorder, || {
        tracker.register(&peer("a"), PeerMetadata::default());
        tracker.record_lease_granted(&peer("b"));
        tracker.record_lease_granted(&peer("b"));
        tracker.record_heartbeat(&peer("c"));
    });
    advance(secs(1)).await;
    metrics::with_local_recorder(&recorder, || {
        tracker.record_heartbeat(&peer("a"));
        tracker.record_heartbeat(&peer("c"));
    });
    advance(Duration::from_millis(2500)).await;
    metrics::with_local_recorder(&recorder, || {
        expire(&tracker, &peer("c"), 3);
        tracker.snapshot();
    });
    let text = handle.render();
    // a: suspect (silent 2.5 s); b: suspect holding 2 leases; c: ejected.
    assert!(text.contains("omnirelay_peer_lease_healthy 0"), "{text}");
    assert!(text.contains("omnirelay_peer_lease_unhealthy 3"), "{text}");
    assert!(text.contains("omnirelay_peer_lease_pending_reassignments 2"), "{text}");
    assert!(text.contains("omnirelay_peer_ejections_total{peer=\"c\"} 1"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_forgotten_unless_it_still_holds_leases() {
    let tracker = tracker();
    let (gone, holding, alive) = (peer("gone"), peer("holding"), peer("alive"));
    for p in [&gone, &holding, &alive] {
        tracker.register(p, PeerMetadata::default());
    }
    tracker.record_lease_granted(&holding);
    let forget_after = tracker.config().forget_after;
    advance(forget_after / 2).await;
    tracker.record_heartbeat(&alive);
    advance(forget_after / 2).await;

    let names: Vec<String> = tracker.candidates().iter().map(|c| c.peer.to_string()).collect();
    assert_eq!(names, ["alive", "holding"], "the silent peer without leases is forgotten");
    assert_eq!(tracker.state(&gone), None);
    // Its lease ending releases the other one too, after its silence.
    tracker.record_lease_expired(&holding);
    assert_eq!(tracker.snapshot().peers.len(), 1);
    // A forgotten peer that comes back starts afresh.
    tracker.record_heartbeat(&gone);
    assert_eq!(tracker.state(&gone), Some(PeerState::Healthy));
}

#[test]
fn forget_after_must_outlast_silence_and_ejection() {
    let config = HealthConfig { forget_after: secs(300), ..HealthConfig::default() };
    match PeerLeaseHealthTracker::new(config) {
        Err(HealthError::InvalidConfig { field, .. }) => assert_eq!(field, "forget_after"),
        other => panic!("expected forget_after to be refused, got {:?}", other.map(|_| ())),
    }
}
