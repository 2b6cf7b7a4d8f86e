//! The Redis state store: records in Redis strings, JSON encoded.

use redis::aio::ConnectionManager;

use super::{DeterministicRecord, DeterministicStateStore, StateFuture, StateStoreError, check_key};

/// A [`DeterministicStateStore`] in Redis: each record is a string at
/// `{prefix}{key}` holding the record's JSON. `try_add` is `SET .. NX`,
/// atomic in Redis for every client. Durability is the server's
/// (configure AOF with `appendfsync always` if a record must survive a
/// Redis crash; with the default `everysec`, a crash can lose the last
/// second of records, and a lost record means an effect can run again).
#[derive(Clone)]
pub struct RedisStateStore {
    connection: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStateStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn unavailable(err: &redis::RedisError) -> StateStoreError {
    StateStoreError::Unavailable(format!("redis state store: {err}"))
}

impl RedisStateStore {
    /// A store on `connection`, its keys under `prefix` (for example
    /// `omnirelay:effects:`).
    pub fn new(connection: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self { connection, prefix: prefix.into() }
    }

    fn key(&self, key: &str) -> Result<String, StateStoreError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }
}

impl DeterministicStateStore for RedisStateStore {
    fn get(&self, key: &str) -> StateFuture<'_, Option<DeterministicRecord>> {
        let (key, mut connection) = (self.key(key), self.connection.clone());
        Box::pin(async move {
            let value: Option<Vec<u8>> =
                redis::cmd("GET").arg(key?).query_async(&mut connection).await.map_err(|e| unavailable(&e))?;
            value.map(|bytes| DeterministicRecord::from_json(&bytes)).transpose()
        })
    }

    fn set(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, ()> {
        let (key, mut connection, value) = (self.key(key), self.connection.clone(), record.to_json());
        Box::pin(async move {
            redis::cmd("SET").arg(key?).arg(value).query_async::<()>(&mut connection).await.map_err(|e| unavailable(&e))
        })
    }

    fn try_add(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, bool> {
        let (key, mut connection, value) = (self.key(key), self.connection.clone(), record.to_json());
        Box::pin(async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(key?)
                .arg(value)
                .arg("NX")
                .query_async(&mut connection)
                .await
                .map_err(|e| unavailable(&e))?;
            Ok(set.is_some())
        })
    }
}
