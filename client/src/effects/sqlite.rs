//! The SQLite state store: records in a local database file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};

use super::{DeterministicRecord, DeterministicStateStore, RecordKind, StateFuture, StateStoreError, check_key};
use crate::clock::Timestamp;

/// How long a write waits for another process's write lock on the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`DeterministicStateStore`] in a SQLite file (WAL journal,
/// `synchronous = FULL`: a record is on disk before the call returns).
/// Several processes on one machine may share the file: `try_add` is an
/// `INSERT .. ON CONFLICT DO NOTHING` under SQLite's write lock, atomic
/// across them. Calls run on the blocking pool, never on the runtime.
#[derive(Clone)]
pub struct SqliteStateStore {
    path: PathBuf,
    connection: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStateStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn unavailable(what: &str, err: &rusqlite::Error) -> StateStoreError {
    StateStoreError::Unavailable(format!("sqlite state store: {what}: {err}"))
}

impl SqliteStateStore {
    /// Opens (creating if needed) the store in `path`.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, StateStoreError> {
        let path = path.into();
        let connection = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open(&path))
                .await
                .map_err(|e| StateStoreError::Unavailable(format!("sqlite state store thread: {e}")))??
        };
        Ok(Self { path, connection: Arc::new(Mutex::new(connection)) })
    }

    fn call<T: Send + 'static>(
        &self,
        key: &str,
        op: impl FnOnce(&Connection, &str) -> Result<T, StateStoreError> + Send + 'static,
    ) -> StateFuture<'static, T> {
        let (checked, connection, key) = (check_key(key), Arc::clone(&self.connection), key.to_string());
        Box::pin(async move {
            checked?;
            tokio::task::spawn_blocking(move || {
                let connection = connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                op(&connection, &key)
            })
            .await
            .map_err(|e| StateStoreError::Unavailable(format!("sqlite state store thread: {e}")))?
        })
    }
}

fn open(path: &Path) -> Result<Connection, StateStoreError> {
    let connection = Connection::open(path).map_err(|e| unavailable("open", &e))?;
    connection.busy_timeout(BUSY_TIMEOUT).map_err(|e| unavailable("open", &e))?;
    connection.pragma_update(None, "journal_mode", "WAL").map_err(|e| unavailable("open", &e))?;
    connection.pragma_update(None, "synchronous", "FULL").map_err(|e| unavailable("open", &e))?;
    connection.execute_batch(include_str!("sqlite.sql")).map_err(|e| unavailable("create the schema", &e))?;
    Ok(connection)
}

impl DeterministicStateStore for SqliteStateStore {
    fn get(&self, key: &str) -> StateFuture<'_, Option<DeterministicRecord>> {
        self.call(key, |db, key| {
            let row = db
                .query_row(
                    "SELECT kind, version, payload, recorded_at FROM effects WHERE key = ?1",
                    params![key],
                    |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, i64>(1)?,
                            row.get::<_, Vec<u8>>(2)?,
                            row.get::<_, i64>(3)?,
                        ))
                    },
                )
                .optional()
                .map_err(|e| unavailable("read", &e))?;
            row.map(|(kind, version, payload, at)| {
                Ok(DeterministicRecord {
                    kind: RecordKind::parse(&kind)?,
                    version: u32::try_from(version)
                        .map_err(|_| StateStoreError::Corrupt(format!("version {version}")))?,
                    payload: Bytes::from(payload),
                    recorded_at: Timestamp::from_unix_nanos(u64::try_from(at).unwrap_or(0)),
                })
            })
            .transpose()
        })
    }

    fn set(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, ()> {
        let record = record.clone();
        self.call(key, move |db, key| {
            db.execute(
                "INSERT INTO effects (key, kind, version, payload, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO UPDATE SET kind = ?2, version = ?3, payload = ?4, recorded_at = ?5",
                params![key, record.kind.as_str(), record.version, record.payload.as_ref(), nanos(&record)],
            )
            .map(|_| ())
            .map_err(|e| unavailable("write", &e))
        })
    }

    fn try_add(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, bool> {
        let record = record.clone();
        self.call(key, move |db, key| {
            db.execute(
                "INSERT INTO effects (key, kind, version, payload, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO NOTHING",
                params![key, record.kind.as_str(), record.version, record.payload.as_ref(), nanos(&record)],
            )
            .map(|inserted| inserted == 1)
            .map_err(|e| unavailable("write", &e))
        })
    }
}

fn nanos(record: &DeterministicRecord) -> i64 {
    i64::try_from(record.recorded_at.as_unix_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_state_store_contract_and_keeps_records_across_a_reopen() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("effects.sqlite");
        let store = SqliteStateStore::open(&path).await.expect("open");
        crate::effects::contract::check(&store, "").await;
        let second = SqliteStateStore::open(&path).await.expect("a second handle on the same file");
        let record = DeterministicRecord::completed(1, Bytes::from_static(b"x"), Timestamp::EPOCH);
        assert_eq!(second.try_add("shared", &record).await, Ok(true));
        assert_eq!(store.try_add("shared", &record).await, Ok(false), "try_add is atomic across handles");
        drop((store, second));
        let reopened = SqliteStateStore::open(&path).await.expect("reopen");
        assert_eq!(reopened.get("shared").await, Ok(Some(record)));
    }
}
