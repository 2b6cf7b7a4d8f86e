//! Deterministic effect capture: side effects recorded under an effect id,
//! so a replayed workflow gets the recorded result instead of running the
//! effect again.
//!
//! A [`DeterministicStateStore`] keeps [`DeterministicRecord`]s by key with
//! three operations: [`get`](DeterministicStateStore::get),
//! [`set`](DeterministicStateStore::set) and
//! [`try_add`](DeterministicStateStore::try_add) (atomic insert-if-absent,
//! the operation everything else rests on). Implementations:
//! [`InMemoryStateStore`] (tests), [`FileSystemStateStore`] (one JSON file
//! per key), `SqliteStateStore` (feature `sqlite`), `PostgresStateStore`
//! (feature `postgres`) and `RedisStateStore` (feature `redis`). Every one
//! passes the [contract suite](contract).
//!
//! The [`EffectCoordinator`] gates an effect by its id, derived from an
//! [`EffectIdPolicy`] (per log sequence, or per resource) and a version
//! (with a dual-write window for changing the policy), and states exactly
//! what a crash between an effect and its record costs: see
//! [`coordinator`] and `docs/deterministic-effects.md`.

pub mod contract;
pub mod coordinator;
mod fs;
mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

pub use coordinator::{
    EffectCoordinator, EffectError, EffectIdPolicy, EffectIds, EffectMode, EffectOutcome, EffectScope, VersionedPolicy,
};
pub use fs::FileSystemStateStore;
pub use memory::InMemoryStateStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStateStore;
#[cfg(feature = "redis")]
pub use redis::RedisStateStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStateStore;

use crate::clock::Timestamp;

/// The longest key a store accepts, in bytes: an effect id is a change id
/// plus a sequence or a resource, far below this.
pub const MAX_KEY_BYTES: usize = 1024;

/// What a store keeps under a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeterministicRecord {
    /// What kind of record: [`RecordKind::Pending`] while an effect is
    /// claimed but its result not yet recorded.
    pub kind: RecordKind,
    /// The version of the effect-id policy the record was written under.
    pub version: u32,
    /// The effect's result, as the effect encoded it.
    pub payload: Bytes,
    /// When it was written (by the writer's clock; informational).
    pub recorded_at: Timestamp,
}

/// The state of an effect's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The effect was claimed (it is running, or its runner died before
    /// recording a result).
    Pending,
    /// The effect ran; `payload` is its result.
    Completed,
}

impl RecordKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Pending => "pending",
            RecordKind::Completed => "completed",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Result<Self, StateStoreError> {
        match text {
            "pending" => Ok(RecordKind::Pending),
            "completed" => Ok(RecordKind::Completed),
            other => Err(StateStoreError::Corrupt(format!("unknown record kind {other:?}"))),
        }
    }
}

/// Why a store did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateStoreError {
    /// The key is empty, too long, or holds a NUL byte.
    #[error("invalid effect key: {0}")]
    InvalidKey(String),
    /// The store could not be reached or failed to write; the operation
    /// may or may not have taken effect.
    #[error("deterministic state store unavailable: {0}")]
    Unavailable(String),
    /// What the store holds does not decode.
    #[error("deterministic state store is corrupt: {0}")]
    Corrupt(String),
}

/// The future of a store operation.
pub type StateFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StateStoreError>> + Send + 'a>>;

/// Records by key, durable as the implementation promises.
///
/// Implementations must make [`try_add`](Self::try_add) atomic: of any
/// number of concurrent calls for one key (from any process sharing the
/// store), exactly one returns `true`, and a record once added is never
/// replaced by `try_add`. [`set`](Self::set) writes unconditionally. A
/// value read back equals the value written, byte for byte.
pub trait DeterministicStateStore: Send + Sync + 'static {
    /// The record under `key`, if any.
    fn get(&self, key: &str) -> StateFuture<'_, Option<DeterministicRecord>>;

    /// Stores `record` under `key`, replacing what was there.
    fn set(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, ()>;

    /// Stores `record` under `key` only if nothing is there; true when it
    /// was stored.
    fn try_add(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, bool>;
}

/// Checks a key against the rules every store shares.
pub fn check_key(key: &str) -> Result<(), StateStoreError> {
    if key.is_empty() {
        return Err(StateStoreError::InvalidKey("is empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StateStoreError::InvalidKey(format!("is {} bytes, at most {MAX_KEY_BYTES}", key.len())));
    }
    if key.contains('\0') {
        return Err(StateStoreError::InvalidKey("holds a NUL byte".into()));
    }
    Ok(())
}

/// The JSON form of a record (the file system store's files, Redis values):
/// human-readable, the payload in base64.
#[derive(serde::Serialize, serde::Deserialize)]
struct RecordJson {
    kind: String,
    version: u32,
    payload: String,
    recorded_at_unix_nanos: u64,
}

impl DeterministicRecord {
    /// A completed record of `payload`.
    pub fn completed(version: u32, payload: impl Into<Bytes>, recorded_at: Timestamp) -> Self {
        Self { kind: RecordKind::Completed, version, payload: payload.into(), recorded_at }
    }

    /// A pending claim.
    pub fn pending(version: u32, recorded_at: Timestamp) -> Self {
        Self { kind: RecordKind::Pending, version, payload: Bytes::new(), recorded_at }
    }

    /// The record as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        use base64::Engine as _;
        let json = RecordJson {
            kind: self.kind.as_str().to_string(),
            version: self.version,
            payload: base64::engine::general_purpose::STANDARD.encode(&self.payload),
            recorded_at_unix_nanos: self.recorded_at.as_unix_nanos(),
        };
        serde_json::to_vec_pretty(&json).expect("a record should always serialize")
    }

    /// A record from its JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, StateStoreError> {
        use base64::Engine as _;
        let json: RecordJson =
            serde_json::from_slice(bytes).map_err(|e| StateStoreError::Corrupt(format!("record JSON: {e}")))?;
        let payload = base64::engine::general_purpose::STANDARD
            .decode(json.payload.as_bytes())
            .map_err(|e| StateStoreError::Corrupt(format!("record payload: {e}")))?;
        Ok(Self {
            kind: RecordKind::parse(&json.kind)?,
            version: json.version,
            payload: Bytes::from(payload),
            recorded_at: Timestamp::from_unix_nanos(json.recorded_at_unix_nanos),
        })
    }
}
