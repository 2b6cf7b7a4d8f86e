//! Shared setup: migrated databases and stores.

use omnirelay_hub::store::postgres::{PgStore, PgStoreConfig};
use omnirelay_tests::TestDb;

/// A fresh database with the hub schema, copied from a template migrated
/// once per server (keyed by the migrations' fingerprint).
pub(crate) async fn migrated_db() -> TestDb {
    let key = format!("hub_{}", omnirelay_hub::schema::fingerprint());
    TestDb::from_template(&key, |url| async move {
        omnirelay_hub::store::postgres::migrate(&url).await?;
        Ok(())
    })
    .await
}

/// A store on `db`.
pub(crate) async fn store(db: &TestDb) -> PgStore {
    PgStore::open(PgStoreConfig::new(db.url())).await.expect("the store should open on a migrated database")
}

/// A fresh store and the database it lives in.
pub(crate) async fn fresh_store() -> (PgStore, TestDb) {
    let db = migrated_db().await;
    (store(&db).await, db)
}

/// A fresh embedded SQLite store and the directory its file lives in.
pub(crate) async fn fresh_sqlite_store() -> (omnirelay_hub::store::sqlite::SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = omnirelay_hub::store::sqlite::SqliteStore::open(dir.path().join("hub.db"))
        .await
        .expect("the SQLite store should open in an empty directory");
    (store, dir)
}
