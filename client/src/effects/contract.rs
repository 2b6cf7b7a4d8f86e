//! The [`DeterministicStateStore`] contract suite: one set of checks every
//! store passes (the in-memory one, the file system, SQLite, PostgreSQL and
//! Redis), so the coordinator cannot tell one store from another.
//!
//! [`check`] panics with a message naming the broken rule. `prefix` is put
//! before every key it writes, so runs on a shared server keep apart.

use bytes::Bytes;

use super::{DeterministicRecord, DeterministicStateStore, RecordKind, StateStoreError};
use crate::clock::Timestamp;

/// Runs every case of the contract against `store`.
pub async fn check(store: &dyn DeterministicStateStore, prefix: &str) {
    let key = |name: &str| format!("{prefix}{name}");
    let at = Timestamp::from_unix_nanos(1_700_000_000_123_456_789);
    let first = DeterministicRecord::completed(1, Bytes::from((0..=255u8).collect::<Vec<_>>()), at);
    let second = DeterministicRecord::completed(2, Bytes::from_static(b"{\"charged\": 42}"), at);
    let pending = DeterministicRecord::pending(1, at);

    let k = key("change-1/seq/7");
    assert_eq!(store.get(&k).await, Ok(None), "an absent key reads as nothing");
    assert_eq!(store.try_add(&k, &first).await, Ok(true), "try_add stores when nothing is there");
    assert_eq!(store.get(&k).await, Ok(Some(first.clone())), "a record reads back byte for byte");
    assert_eq!(store.try_add(&k, &second).await, Ok(false), "try_add never replaces");
    assert_eq!(store.get(&k).await, Ok(Some(first.clone())), "a refused try_add changed the record");
    store.set(&k, &second).await.expect("set");
    assert_eq!(store.get(&k).await, Ok(Some(second.clone())), "set replaces");
    assert_eq!(store.try_add(&k, &first).await, Ok(false));

    // A pending claim completed later with `set`.
    let claim = key("change-1/resource/invoice/42");
    assert_eq!(store.try_add(&claim, &pending).await, Ok(true));
    assert_eq!(store.get(&claim).await.map(|r| r.map(|r| r.kind)), Ok(Some(RecordKind::Pending)));
    let empty = DeterministicRecord::completed(3, Bytes::new(), at);
    store.set(&claim, &empty).await.expect("set");
    assert_eq!(store.get(&claim).await, Ok(Some(empty)), "an empty payload reads back");

    // Keys that differ only in characters a store might escape are distinct.
    let (a, b, c) = (key("a/b"), key("a%2Fb"), key("a b ünïcode"));
    for (n, k) in [&a, &b, &c].into_iter().enumerate() {
        let record = DeterministicRecord::completed(n as u32, Bytes::from(k.clone()), at);
        assert_eq!(store.try_add(k, &record).await, Ok(true), "{k} collided with another key");
    }
    for (n, k) in [&a, &b, &c].into_iter().enumerate() {
        assert_eq!(store.get(k).await.map(|r| r.map(|r| r.version)), Ok(Some(n as u32)), "{k}");
    }

    // Of concurrent try_adds for one key, exactly one wins.
    let race = key("race");
    let racers: Vec<_> = (0..16u32)
        .map(|n| {
            let record = DeterministicRecord::completed(n, Bytes::from(n.to_string()), at);
            let race = race.clone();
            async move { store.try_add(&race, &record).await }
        })
        .collect();
    let won: Vec<u32> = futures_util::future::join_all(racers)
        .await
        .into_iter()
        .enumerate()
        .filter_map(|(n, added)| added.expect("try_add").then_some(n as u32))
        .collect();
    assert_eq!(won.len(), 1, "exactly one concurrent try_add wins: {won:?}");
    assert_eq!(store.get(&race).await.map(|r| r.map(|r| r.version)), Ok(Some(won[0])), "the winner's record is kept");

    // Bad keys are refused, naming why.
    assert!(matches!(store.get("").await, Err(StateStoreError::InvalidKey(_))));
    assert!(matches!(store.try_add(&"k".repeat(2000), &first).await, Err(StateStoreError::InvalidKey(_))));
}
