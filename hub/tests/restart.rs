//! PostgreSQL restarted under load: appends fail cleanly (UNAVAILABLE, the
//! stream stays open) while it is down, resume after, and nothing
//! acknowledged is lost or written twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_tests::{PgCluster, PgOptions};
use tokio::sync::watch;

use crate::support::{Appender, TestHub, acquire, batch};

const LONG: Duration = Duration::from_secs(600);

// About fifteen seconds: a durable cluster crashes and restarts while a
// producer keeps appending.
#[tokio::test]
async fn appends_fail_cleanly_while_postgres_is_down_and_nothing_acknowledged_is_lost() {
    let cluster = tokio::task::spawn_blocking(|| PgCluster::start(PgOptions { durable: true, ..Default::default() }))
        .await
        .expect("start task")
        .expect("the cluster should start");
    let url = cluster.url("postgres");
    omnirelay_hub::store::postgres::migrate(&url).await.expect("migrate");
    let hub = TestHub::start(&url).await;
    let shard = "resourcelease.restart";
    let mut client = hub.client().await;
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;

    let acked_count = Arc::new(AtomicU64::new(0));
    let (stop, stopping) = watch::channel(false);
    let producer = tokio::spawn({
        let acked_count = acked_count.clone();
        async move {
            let mut appender = Appender::open(&mut client).await;
            let mut acked: Vec<(u64, u64)> = Vec::new();
            let mut failures = 0u32;
            let mut seq = 1u64;
            while !*stopping.borrow() {
                let started = Instant::now();
                match appender.append(batch(shard, "p", seq, epoch, &["a", "b", "c"])).await {
                    pb::append_response::Result::Ack(ack) => {
                        acked.push((ack.first_sequence, ack.last_sequence));
                        acked_count.fetch_add(1, Ordering::SeqCst);
                        seq += 1;
                    }
                    pb::append_response::Result::Error(err) => {
                        assert_eq!(err.code, pb::AppendErrorCode::Unavailable as i32, "only outages expected: {err:?}");
                        assert!(started.elapsed() < Duration::from_secs(10), "a failed append must fail fast");
                        failures += 1;
                        // Retry the same batch: idempotent by (producer, seq).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            (acked, failures)
        }
    });

    omnirelay_tests::eventually("appends flow before the crash", Duration::from_secs(30), || async {
        match acked_count.load(Ordering::SeqCst) {
            n if n >= 20 => Ok(()),
            n => Err(format!("{n} acknowledged")),
        }
    })
    .await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.crash().expect("crash PostgreSQL");
        std::thread::sleep(Duration::from_secs(2));
        cluster.start_again().expect("restart PostgreSQL");
        cluster
    })
    .await
    .expect("restart task");
    let at_restart = acked_count.load(Ordering::SeqCst);
    omnirelay_tests::eventually("appends resume after the restart", Duration::from_secs(30), || async {
        match acked_count.load(Ordering::SeqCst) {
            n if n >= at_restart + 20 => Ok(()),
            n => Err(format!("{n} acknowledged, {at_restart} at the restart")),
        }
    })
    .await;
    stop.send(true).expect("stop the producer");
    let (acked, failures) = producer.await.expect("the producer should not panic");
    assert!(failures > 0, "appends should have failed while PostgreSQL was down");

    let (sql, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let rows = sql
        .query(
            "SELECT e.sequence FROM events e JOIN shards s USING (shard_no) WHERE s.shard_id = $1 ORDER BY 1",
            &[&shard],
        )
        .await
        .expect("read the log");
    let stored: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    // Every acknowledged batch is stored where its ack said, and nothing else:
    // no batch was lost in the crash, none written twice by the retries.
    let expected: Vec<i64> = acked.iter().flat_map(|(first, last)| *first as i64..=*last as i64).collect();
    assert_eq!(stored, expected, "the log is exactly the acknowledged batches");
    assert_eq!(stored, (1..=stored.len() as i64).collect::<Vec<_>>(), "gapless");
    hub.stop().await;
    drop(cluster);
}
