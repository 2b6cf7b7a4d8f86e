//! The PostgreSQL state store: records shared by every node of a region.

use bytes::Bytes;
use deadpool_postgres::Pool;

use super::{DeterministicRecord, DeterministicStateStore, RecordKind, StateFuture, StateStoreError, check_key};
use crate::clock::Timestamp;

/// A [`DeterministicStateStore`] in PostgreSQL (table `omnirelay_effects`,
/// created by [`PostgresStateStore::ensure_schema`]): every node sharing the
/// database shares the records, and `try_add` is atomic across all of them
/// (an `INSERT .. ON CONFLICT DO NOTHING` on the primary key). A record is
/// committed before the call returns. The pool is the caller's (its TLS
/// and sizing are the application's choice).
#[derive(Clone)]
pub struct PostgresStateStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStateStore").finish_non_exhaustive()
    }
}

/// A failure, without SQL text: the SQLSTATE when the server gave one.
fn unavailable(
    what: &str,
    err: &dyn std::fmt::Display,
    code: Option<&tokio_postgres::error::SqlState>,
) -> StateStoreError {
    match code {
        Some(code) => StateStoreError::Unavailable(format!("postgres state store: {what}: SQLSTATE {}", code.code())),
        None => StateStoreError::Unavailable(format!("postgres state store: {what}: {err}")),
    }
}

fn pg(what: &'static str) -> impl Fn(tokio_postgres::Error) -> StateStoreError {
    move |err| unavailable(what, &err, err.code())
}

fn pool(what: &'static str) -> impl Fn(deadpool_postgres::PoolError) -> StateStoreError {
    move |err| unavailable(what, &err, None)
}

impl PostgresStateStore {
    /// A store on `pool`'s database.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Creates the table if it does not exist.
    pub async fn ensure_schema(&self) -> Result<(), StateStoreError> {
        let client = self.pool.get().await.map_err(pool("connect"))?;
        client.batch_execute(include_str!("postgres.sql")).await.map_err(pg("create the schema"))
    }

    async fn write(&self, sql: &str, key: &str, record: &DeterministicRecord) -> Result<u64, StateStoreError> {
        check_key(key)?;
        let client = self.pool.get().await.map_err(pool("connect"))?;
        let version = i64::from(record.version);
        let at = i64::try_from(record.recorded_at.as_unix_nanos()).unwrap_or(i64::MAX);
        client
            .execute(sql, &[&key, &record.kind.as_str(), &version, &record.payload.as_ref(), &at])
            .await
            .map_err(pg("write a record"))
    }
}

impl DeterministicStateStore for PostgresStateStore {
    fn get(&self, key: &str) -> StateFuture<'_, Option<DeterministicRecord>> {
        let key = key.to_string();
        Box::pin(async move {
            check_key(&key)?;
            let client = self.pool.get().await.map_err(pool("connect"))?;
            let row = client
                .query_opt("SELECT kind, version, payload, recorded_at FROM omnirelay_effects WHERE key = $1", &[&key])
                .await
                .map_err(pg("read a record"))?;
            row.map(|row| {
                let version: i64 = row.get(1);
                Ok(DeterministicRecord {
                    kind: RecordKind::parse(row.get(0))?,
                    version: u32::try_from(version)
                        .map_err(|_| StateStoreError::Corrupt(format!("version {version}")))?,
                    payload: Bytes::from(row.get::<_, Vec<u8>>(2)),
                    recorded_at: Timestamp::from_unix_nanos(u64::try_from(row.get::<_, i64>(3)).unwrap_or(0)),
                })
            })
            .transpose()
        })
    }

    fn set(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, ()> {
        let (key, record) = (key.to_string(), record.clone());
        Box::pin(async move {
            self.write(
                "INSERT INTO omnirelay_effects (key, kind, version, payload, recorded_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (key) DO UPDATE SET kind = $2, version = $3, payload = $4, recorded_at = $5",
                &key,
                &record,
            )
            .await
            .map(|_| ())
        })
    }

    fn try_add(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, bool> {
        let (key, record) = (key.to_string(), record.clone());
        Box::pin(async move {
            self.write(
                "INSERT INTO omnirelay_effects (key, kind, version, payload, recorded_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (key) DO NOTHING",
                &key,
                &record,
            )
            .await
            .map(|inserted| inserted == 1)
        })
    }
}
