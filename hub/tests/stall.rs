//! PostgreSQL that stops answering (every process frozen, or an append
//! stuck behind a lock): appends and reads are answered UNAVAILABLE within
//! the database deadline instead of hanging with it, and a retry of a batch
//! whose answer was lost is exact, whether or not its commit landed.

use std::sync::Arc;
use std::time::Duration;

use omnirelay_hub::Config;
use omnirelay_hub::config::{PostgresConfig, StoreConfig};
use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_tests::{PgCluster, PgOptions};

use crate::support::{Appender, TestHub, ack, acquire, batch, item_of, rejection};

const LONG: Duration = Duration::from_secs(600);

/// A short deadline, so the drill is quick (the default is five seconds).
const DEADLINE: Duration = Duration::from_secs(1);

/// The items of the shard's log, in order (read after the drill).
async fn logged_items(hub: &TestHub, shard: &str) -> Vec<(u64, String)> {
    let mut client = hub.client().await;
    let read = client
        .read_range(pb::ReadRangeRequest { shard_id: shard.into(), from_sequence: 1, to_sequence: 0, limit: 0 })
        .await
        .expect("read the log")
        .into_inner();
    crate::support::decoded(&read.events).iter().map(|event| (event.sequence, item_of(event))).collect()
}

#[tokio::test]
async fn a_stalled_database_gets_unavailable_answers_and_retries_stay_exact() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| PgCluster::start(PgOptions::default()))
            .await
            .expect("start task")
            .expect("the cluster should start"),
    );
    let url = cluster.url("postgres");
    omnirelay_hub::store::postgres::migrate(&url).await.expect("migrate");
    let postgres = PostgresConfig { timeout: DEADLINE, ..PostgresConfig::new(&url).expect("valid URL") };
    let hub =
        TestHub::start_with(Config { retention_interval: None, ..Config::for_store(StoreConfig::Postgres(postgres)) })
            .await;
    let shard = "resourcelease.stall";
    let mut client = hub.client().await;
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    assert_eq!(ack(appender.append(batch(shard, "p", 1, epoch, &["one"])).await).first_sequence, 1);

    // Every PostgreSQL process frozen: connections stay open, nothing answers.
    let frozen = cluster.clone();
    tokio::task::spawn_blocking(move || frozen.pause()).await.expect("pause task").expect("pause");
    // The answers come while it is still frozen (the helpers give up after
    // 30 s; the cluster stays frozen until resumed below).
    let refused = rejection(appender.append(batch(shard, "p", 2, epoch, &["two"])).await);
    assert_eq!(refused.code, pb::AppendErrorCode::Unavailable as i32, "{refused:?}");
    assert!(refused.message.contains("did not answer in time"), "{}", refused.message);
    let read = tokio::time::timeout(
        Duration::from_secs(30),
        client.read_range(pb::ReadRangeRequest { shard_id: shard.into(), from_sequence: 1, to_sequence: 0, limit: 0 }),
    )
    .await
    .expect("a read is answered while the database is frozen")
    .expect_err("and it is refused");
    assert_eq!(read.code(), tonic::Code::Unavailable, "{read:?}");
    let thawed = cluster.clone();
    tokio::task::spawn_blocking(move || thawed.resume()).await.expect("resume task").expect("resume");

    // The same batch again: written once, whether or not the first try
    // committed after its answer was lost.
    let retried = ack(appender.append(batch(shard, "p", 2, epoch, &["two"])).await);
    assert_eq!(retried.first_sequence, 2, "{retried:?}");

    // An append stuck behind a row lock (the predicted transaction, BEGIN to
    // COMMIT, is already on the wire): its answer is lost, and its commit
    // may land once the lock goes.
    let (locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    locker.batch_execute("BEGIN").await.expect("begin");
    locker.execute("SELECT 1 FROM shards WHERE shard_id = $1 FOR UPDATE", &[&shard]).await.expect("lock the shard row");
    let refused = rejection(appender.append(batch(shard, "p", 3, epoch, &["three"])).await);
    assert_eq!(refused.code, pb::AppendErrorCode::Unavailable as i32, "{refused:?}");
    locker.batch_execute("COMMIT").await.expect("release the lock");
    let retried = ack(appender.append(batch(shard, "p", 3, epoch, &["three"])).await);
    assert_eq!(retried.first_sequence, 3, "{retried:?}");
    assert_eq!(ack(appender.append(batch(shard, "p", 4, epoch, &["four"])).await).first_sequence, 4);

    assert_eq!(
        logged_items(&hub, shard).await,
        vec![(1, "one".into()), (2, "two".into()), (3, "three".into()), (4, "four".into())],
        "every acknowledged batch exactly once"
    );
    hub.stop().await;
}
