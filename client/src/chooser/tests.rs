//! Choosers over a live tracker, with paused tokio time.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::advance;

use super::*;
use crate::peer_health::{HealthConfig, PeerMetadata};

fn peer(name: &str) -> PeerId {
    PeerId::new(name)
}

fn tracker() -> PeerLeaseHealthTracker {
    PeerLeaseHealthTracker::new(HealthConfig {
        heartbeat_grace: Duration::from_secs(2),
        probation_period: Duration::from_secs(10),
        ..HealthConfig::default()
    })
    .expect("test config is valid")
}

fn choosers(tracker: &PeerLeaseHealthTracker) -> Vec<Box<dyn PeerChooser>> {
    vec![
        Box::new(RoundRobinChooser::new(tracker.clone())),
        Box::new(FewestPendingChooser::new(tracker.clone())),
        Box::new(PowerOfTwoChooser::with_seed(tracker.clone(), 7)),
    ]
}

fn tally(chooser: &dyn PeerChooser, picks: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..picks {
        let chosen = chooser.choose().expect("an eligible peer");
        *counts.entry(chosen.to_string()).or_default() += 1;
    }
    counts
}

/// The eviction scenario: several workers, a short grace period, one
/// stops heartbeating; the snapshot shows it unhealthy, choosers stop picking
/// it, and fresh heartbeats bring it back through probation.
#[tokio::test(start_paused = true)]
async fn silent_worker_is_evicted_and_returns_through_probation() {
    let tracker = tracker();
    let workers: Vec<_> = ["w1", "w2", "w3"].into_iter().map(peer).collect();
    for w in &workers {
        tracker.register(w, PeerMetadata { region: Some("eu-west-1".into()), build: Some("test".into()) });
    }
    let choosers = choosers(&tracker);
    for chooser in &choosers {
        let counts = tally(chooser.as_ref(), 30);
        assert_eq!(counts.len(), 3, "{chooser:?} spreads over all three healthy workers: {counts:?}");
    }

    // w3 stops heartbeating; the others keep going once a second.
    for _ in 0..3 {
        advance(Duration::from_secs(1)).await;
        tracker.record_heartbeat(&workers[0]);
        tracker.record_heartbeat(&workers[1]);
    }
    let snapshot = tracker.snapshot();
    let w3 = snapshot.peer(&workers[2]).expect("w3 is known");
    assert!(!w3.is_healthy, "w3 is unhealthy in the snapshot");
    assert_eq!(w3.state, PeerState::Suspect);
    assert_eq!(w3.last_heartbeat_age_ms, 3000);
    assert_eq!((snapshot.summary.eligible, snapshot.summary.unhealthy), (2, 1));
    for chooser in &choosers {
        let counts = tally(chooser.as_ref(), 60);
        assert!(!counts.contains_key("w3"), "{chooser:?} must not pick the silent worker: {counts:?}");
        assert_eq!(counts.len(), 2, "{chooser:?} still uses both healthy workers: {counts:?}");
    }

    // w3 comes back: eligible at once, but in probation with a small weight.
    tracker.record_heartbeat(&workers[2]);
    assert_eq!(tracker.state(&workers[2]), Some(PeerState::Probation));
    let round_robin = RoundRobinChooser::new(tracker.clone());
    let counts = tally(&round_robin, 105);
    let share = counts.get("w3").copied().unwrap_or(0);
    assert!(share > 0, "a worker in probation still gets some traffic: {counts:?}");
    assert!(share <= 10, "slow start keeps it at about a tenth of a healthy share: {counts:?}");

    // Heartbeats through the probation period make it fully healthy again.
    for _ in 0..10 {
        advance(Duration::from_secs(1)).await;
        for w in &workers {
            tracker.record_heartbeat(w);
        }
    }
    assert_eq!(tracker.state(&workers[2]), Some(PeerState::Healthy));
    let counts = tally(&round_robin, 99);
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![33, 33, 33], "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn every_chooser_fails_clearly_when_no_peer_is_eligible() {
    let tracker = tracker();
    for chooser in choosers(&tracker) {
        let err = chooser.choose().expect_err("no peers at all");
        assert_eq!(err, ChooserError::NoEligiblePeer { considered: 0, suspect: 0, ejected: 0, unknown: 0 });
    }
    tracker.register(&peer("a"), PeerMetadata::default());
    tracker.register(&peer("b"), PeerMetadata::default());
    advance(Duration::from_secs(3)).await;
    for chooser in choosers(&tracker) {
        let err = chooser.choose().expect_err("both silent");
        assert_eq!(err.code(), ErrorCode::Unavailable);
        assert_eq!(
            err.to_string(),
            "no eligible peer: 2 considered (2 suspect, 0 ejected, 0 unknown to the health tracker)"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn choose_from_limits_the_candidates_and_treats_unknown_peers_as_ineligible() {
    let tracker = tracker();
    for name in ["a", "b", "c"] {
        tracker.register(&peer(name), PeerMetadata::default());
    }
    for chooser in choosers(&tracker) {
        for _ in 0..10 {
            let chosen = chooser.choose_from(&[peer("b"), peer("c"), peer("zz")]).expect("b and c are eligible");
            assert!(chosen == peer("b") || chosen == peer("c"), "{chosen}");
        }
        let err = chooser.choose_from(&[peer("zz"), peer("yy")]).expect_err("unknown peers only");
        assert_eq!(err, ChooserError::NoEligiblePeer { considered: 2, suspect: 0, ejected: 0, unknown: 2 });
    }
}

#[tokio::test(start_paused = true)]
async fn choosers_skip_ejected_peers() {
    let tracker = tracker();
    for name in ["a", "b"] {
        tracker.register(&peer(name), PeerMetadata::default());
    }
    for _ in 0..tracker.config().consecutive_failures_to_eject {
        tracker.record_lease_granted(&peer("a"));
        tracker.record_lease_expired(&peer("a"));
    }
    assert_eq!(tracker.state(&peer("a")), Some(PeerState::Ejected));
    for chooser in choosers(&tracker) {
        assert_eq!(tally(chooser.as_ref(), 20).keys().collect::<Vec<_>>(), vec!["b"], "{chooser:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn round_robin_rotates_in_peer_order() {
    let tracker = tracker();
    for name in ["c", "a", "b"] {
        tracker.register(&peer(name), PeerMetadata::default());
    }
    let chooser = RoundRobinChooser::new(tracker);
    let picks: Vec<_> = (0..6).map(|_| chooser.choose().expect("eligible").to_string()).collect();
    assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
}

#[tokio::test(start_paused = true)]
async fn fewest_pending_prefers_idle_peers_and_rotates_ties() {
    let tracker = tracker();
    for (name, leases) in [("a", 3), ("b", 1), ("c", 0), ("d", 0)] {
        tracker.register(&peer(name), PeerMetadata::default());
        for _ in 0..leases {
            tracker.record_lease_granted(&peer(name));
        }
    }
    let chooser = FewestPendingChooser::new(tracker.clone());
    let picks: Vec<_> = (0..4).map(|_| chooser.choose().expect("eligible").to_string()).collect();
    assert_eq!(picks, ["c", "d", "c", "d"], "the two idle peers share the picks");
    tracker.record_lease_granted(&peer("c"));
    tracker.record_lease_granted(&peer("d"));
    tracker.record_lease_granted(&peer("d"));
    assert_eq!(chooser.choose().expect("eligible"), peer("b").min(peer("c")), "b and c hold one lease each");
}

#[tokio::test(start_paused = true)]
async fn fewest_pending_weighs_slow_start() {
    let tracker = tracker();
    tracker.register(&peer("busy"), PeerMetadata::default());
    tracker.register(&peer("returning"), PeerMetadata::default());
    for _ in 0..2 {
        tracker.record_lease_granted(&peer("busy"));
    }
    advance(Duration::from_secs(2)).await;
    tracker.record_heartbeat(&peer("busy"));
    advance(Duration::from_secs(1)).await;
    tracker.record_heartbeat(&peer("busy"));
    tracker.record_heartbeat(&peer("returning"));
    assert_eq!(tracker.state(&peer("returning")), Some(PeerState::Probation));
    // busy scores (2 + 1) / 1 = 3; returning (0 + 1) / 0.1 = 10.
    let chooser = FewestPendingChooser::new(tracker);
    assert_eq!(chooser.choose().expect("eligible"), peer("busy"));
}

#[tokio::test(start_paused = true)]
async fn power_of_two_prefers_peers_that_turn_leases_around_faster() {
    let tracker = tracker();
    let turnaround = [("fast", 10), ("medium", 400), ("slow", 2000)];
    for (name, millis) in turnaround {
        tracker.record_lease_granted(&peer(name));
        tracker.record_lease_completed(&peer(name), Duration::from_millis(millis));
    }
    let chooser = PowerOfTwoChooser::with_seed(tracker.clone(), 42);
    let counts = tally(&chooser, 300);
    // Each pick compares two of three peers: fast wins whenever it is drawn
    // (about two thirds), slow never wins.
    assert!(counts.get("fast").copied().unwrap_or(0) > 150, "{counts:?}");
    assert_eq!(counts.get("slow"), None, "{counts:?}");
    assert!(counts.get("medium").copied().unwrap_or(0) > 50, "medium wins when fast is not drawn: {counts:?}");

    // Load counts too: a fast peer holding many leases loses to an idle one.
    for _ in 0..100 {
        tracker.record_lease_granted(&peer("fast"));
    }
    let two = PowerOfTwoChooser::with_seed(tracker, 1);
    let picks = two.choose_from(&[peer("fast"), peer("medium")]).expect("eligible");
    assert_eq!(picks, peer("medium"), "10 ms x 101 leases costs more than 400 ms x 1");
}

#[tokio::test(start_paused = true)]
async fn choosers_are_shareable_across_tasks() {
    let tracker = tracker();
    for name in ["a", "b"] {
        tracker.register(&peer(name), PeerMetadata::default());
    }
    let chooser: std::sync::Arc<dyn PeerChooser> = std::sync::Arc::new(RoundRobinChooser::new(tracker));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let chooser = chooser.clone();
            tokio::spawn(async move { (0..10).filter(|_| chooser.choose().is_ok()).count() })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task completes");
    }
    assert_eq!(total, 40);
}
