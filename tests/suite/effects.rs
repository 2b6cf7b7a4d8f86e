//! The deterministic state store contract against the real servers: the
//! harness's throwaway PostgreSQL and a real Redis.

use std::str::FromStr as _;
use std::sync::Arc;

use omnirelay_client::effects::postgres::PostgresStateStore;
use omnirelay_client::effects::redis::RedisStateStore;
use omnirelay_client::effects::{
    DeterministicStateStore, EffectCoordinator, EffectIdPolicy, EffectIds, EffectMode, EffectScope, contract,
};

async fn postgres_store() -> (omnirelay_tests::TestDb, PostgresStateStore) {
    let db = omnirelay_tests::TestDb::new().await;
    let config = tokio_postgres::Config::from_str(db.url()).expect("the harness URL parses");
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager).max_size(4).build().expect("pool");
    let store = PostgresStateStore::new(pool);
    store.ensure_schema().await.expect("schema");
    store.ensure_schema().await.expect("the schema step is idempotent");
    (db, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_state_store_keeps_the_contract() {
    let (_db, store) = postgres_store().await;
    contract::check(&store, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_state_store_keeps_the_contract() {
    let server = omnirelay_tests::TestRedis::new().await;
    let store = RedisStateStore::new(server.connection().await, server.prefix());
    contract::check(&store, "").await;
}

/// Two workers racing on the same effects through PostgreSQL: each effect
/// runs once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workers_on_postgres_run_each_effect_once() {
    let (_db, store) = postgres_store().await;
    let store: Arc<dyn DeterministicStateStore> = Arc::new(store);
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let ids = EffectIds::new(1, EffectIdPolicy::PerSequence);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let coordinator = EffectCoordinator::new(Arc::clone(&store), ids.clone(), EffectMode::AtMostOnce);
            let runs = Arc::clone(&runs);
            tokio::spawn(async move {
                for sequence in 1..=50 {
                    let scope = EffectScope::sequence("race", omnirelay_client::Sequence::new(sequence));
                    let runs = Arc::clone(&runs);
                    // A loser may see the winner's claim before its record:
                    // in doubt, never run twice.
                    let _ = coordinator
                        .run(&scope, || async move {
                            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            bytes_of(sequence)
                        })
                        .await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 50, "every effect ran exactly once");
}

fn bytes_of(n: u64) -> bytes::Bytes {
    bytes::Bytes::from(n.to_string())
}
