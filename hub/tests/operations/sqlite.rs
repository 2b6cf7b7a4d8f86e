//! The embedded SQLite store's operational rules: one writer per file,
//! durable across restarts, refusing files from newer builds.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use omnirelay_hub::event::NewEvent;
use omnirelay_hub::ids::{OwnerId, ProducerId, ProducerSeq, Sequence, ShardId};
use omnirelay_hub::store::sqlite::{SqliteOpenError, SqliteStore};
use omnirelay_hub::store::{AppendBatch, LogStore};

fn shard() -> ShardId {
    ShardId::parse("resourcelease.users").expect("valid shard id")
}

#[tokio::test]
async fn a_second_store_on_the_same_file_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hub.db");
    let first = SqliteStore::open(&path).await.expect("the first store opens");

    let err = SqliteStore::open(&path).await.expect_err("a second writer must be refused");
    assert!(matches!(&err, SqliteOpenError::Locked { path: locked } if locked == &path), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("one replica") && message.contains("--database-url"), "{message}");

    first.close().await.expect("close");
    let second = SqliteStore::open(&path).await.expect("the file is free once the first store closed");
    second.close().await.expect("close");
}

#[tokio::test]
async fn acknowledged_appends_survive_a_restart() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hub.db");
    let store = SqliteStore::open(&path).await.expect("open");
    let grant = store
        .acquire_shard(shard(), OwnerId::parse("node-a").expect("valid"), Duration::from_secs(60))
        .await
        .expect("acquire");
    let events = (0..3)
        .map(|i| NewEvent { recorded_at: SystemTime::UNIX_EPOCH, body: Bytes::from(format!("event {i}")) })
        .collect();
    let batch = AppendBatch {
        expected_first: None,
        shard: shard(),
        producer: ProducerId::parse("p").expect("valid"),
        producer_seq: ProducerSeq(1),
        epoch: grant.lease.epoch,
        events,
    };
    let ack = store.append(batch.clone()).await.expect("append");
    store.close().await.expect("close");

    let reopened = SqliteStore::open(&path).await.expect("reopen");
    let page = reopened.read_range(shard(), Sequence(1), None, 10, usize::MAX).await.expect("read");
    assert_eq!(page.events.len(), 3);
    assert_eq!(page.events[2].hash, ack.last_hash);
    let retry = reopened.append(batch).await.expect("a retry after the restart");
    assert!(retry.duplicate && retry.first == ack.first, "the producer record survived: {retry:?}");
    reopened.close().await.expect("close");
}

#[tokio::test]
async fn operations_after_close_fail_as_closed() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(dir.path().join("hub.db")).await.expect("open");
    store.close().await.expect("close");
    let err = store.shard_state(shard()).await.expect_err("closed");
    assert!(matches!(err, omnirelay_hub::store::StoreError::Closed), "{err:?}");
}

#[tokio::test]
async fn a_file_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hub.db");
    SqliteStore::open(&path).await.expect("open").close().await.expect("close");
    let bump = path.clone();
    tokio::task::spawn_blocking(move || {
        let connection = rusqlite::Connection::open(bump).expect("open directly");
        connection.pragma_update(None, "user_version", 99).expect("bump the version");
    })
    .await
    .expect("no panic");
    let err = SqliteStore::open(&path).await.expect_err("a newer schema must be refused");
    assert!(matches!(err, SqliteOpenError::NewerSchema { found: 99, .. }), "{err:?}");
}

#[tokio::test]
async fn an_unwritable_location_names_the_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("missing-dir").join("hub.db");
    let err = SqliteStore::open(&path).await.expect_err("a missing directory cannot hold the file");
    assert!(matches!(err, SqliteOpenError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("missing-dir"), "{err}");
}
