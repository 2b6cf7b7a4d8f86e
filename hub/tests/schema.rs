//! Schema: migrations apply once under concurrency, and a replica refuses a
//! database whose schema is behind, saying what to run.

use omnirelay_hub::store::StoreError;
use omnirelay_hub::store::postgres::{self, PgStore, PgStoreConfig};
use omnirelay_tests::TestDb;

#[tokio::test]
async fn a_replica_refuses_an_unmigrated_database_and_says_what_to_run() {
    let db = TestDb::new().await;
    let err = PgStore::open(PgStoreConfig::new(db.url())).await.expect_err("an empty database has no schema");
    assert!(matches!(err, StoreError::Schema(_)), "{err:?}");
    assert!(err.to_string().contains("run `omnirelay-hub migrate`"), "{err}");

    let served = tokio::process::Command::new(env!("CARGO_BIN_EXE_omnirelay-hub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", db.url()])
        .output()
        .await
        .expect("run the hub");
    assert!(!served.status.success(), "the hub must not serve an unmigrated database");
    let log = String::from_utf8_lossy(&served.stderr);
    assert!(log.contains("omnirelay-hub migrate"), "{log}");
}

#[tokio::test]
async fn concurrent_migrations_apply_each_migration_once() {
    let db = TestDb::new().await;
    let runs: Vec<_> = (0..3).map(|_| postgres::migrate(db.url())).collect();
    let reports = futures_util::future::join_all(runs).await;
    let mut applied = 0;
    for report in reports {
        let report = report.expect("every concurrent run succeeds");
        assert_eq!(report.version, omnirelay_hub::schema::needed_version());
        applied += report.applied.len();
    }
    assert_eq!(applied, omnirelay_hub::schema::needed_version() as usize, "each migration applied exactly once");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_omnirelay-hub"))
        .args(["migrate", "--database-url", db.url()])
        .status()
        .await
        .expect("run migrate");
    assert!(status.success(), "migrate is idempotent");
    PgStore::open(PgStoreConfig::new(db.url())).await.expect("a migrated database opens");
}
