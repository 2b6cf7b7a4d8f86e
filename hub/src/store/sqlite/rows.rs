//! What every operation of the SQLite store shares: the mapping of SQLite
//! failures, the shard row, and the conversions of stored values.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use crate::log::ids::{Epoch, InvalidInput, OwnerId, Sequence, ShardId};
use crate::store::{ShardLease, ShardState, StoreError, corrupt_id, stored_hash};

const SQL_SHARD_NO: &str = include_str!("sql/shard_no.sql");
const SQL_SHARD_STATE: &str = include_str!("sql/shard_state.sql");
/// The hash of one event, which a checkpoint or a snapshot at it records.
pub(super) const SQL_EVENT_HASH: &str = include_str!("sql/event_hash.sql");

/// Maps a SQLite failure: a full disk, a file turned read-only, I/O errors
/// and a busy file are outages the caller may retry (and that heal without a
/// restart once the operator fixed them); anything else is a bug or
/// corruption.
pub(super) fn sql_error(what: &'static str, err: rusqlite::Error) -> StoreError {
    let outage = matches!(
        err.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::ReadOnly
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::OutOfMemory
        )
    );
    if outage {
        StoreError::Unavailable { what, source: Box::new(err) }
    } else {
        StoreError::Internal { what, source: Box::new(err) }
    }
}

/// A shard row as read by `shard_state.sql` and `list_shards.sql`.
pub(super) fn shard_state(row: &rusqlite::Row<'_>) -> Result<ShardState, StoreError> {
    let what = "decode a shard";
    let get = |e| sql_error(what, e);
    let lease = ShardLease {
        shard: ShardId::parse(row.get::<_, String>(0).map_err(get)?).map_err(corrupt_id)?,
        owner: row.get::<_, Option<String>>(1).map_err(get)?.map(OwnerId::parse).transpose().map_err(corrupt_id)?,
        epoch: Epoch(from_db(row.get(2).map_err(get)?)?),
        head: Sequence(from_db(row.get(3).map_err(get)?)?),
        expires_at: row.get::<_, Option<i64>>(4).map_err(get)?.map(from_micros),
    };
    Ok(ShardState {
        lease,
        head_hash: stored_hash(row.get(5).map_err(get)?, "head_hash")?,
        low: Sequence(from_db(row.get(6).map_err(get)?)?),
        low_prev_hash: stored_hash(row.get(7).map_err(get)?, "low_prev_hash")?,
    })
}

pub(super) fn read_state(db: &Connection, shard: &ShardId) -> Result<Option<ShardState>, StoreError> {
    let what = "read a shard";
    let mut statement = db.prepare_cached(SQL_SHARD_STATE).map_err(|e| sql_error(what, e))?;
    let mut rows = statement.query(params![shard.as_str()]).map_err(|e| sql_error(what, e))?;
    match rows.next().map_err(|e| sql_error(what, e))? {
        Some(row) => Ok(Some(shard_state(row)?)),
        None => Ok(None),
    }
}

pub(super) fn shard_no(db: &Connection, shard: &ShardId) -> Result<Option<i64>, StoreError> {
    db.prepare_cached(SQL_SHARD_NO)
        .and_then(|mut s| s.query_row(params![shard.as_str()], |row| row.get(0)).optional())
        .map_err(|e| sql_error("look up a shard", e))
}

/// A counter as stored; values beyond `i64::MAX` cannot be stored.
pub(super) fn to_db(field: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| InvalidInput::new(field, format!("{value} is out of range")).into())
}

/// A stored counter; the schema's checks keep them non-negative.
pub(super) fn from_db(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Internal {
        what: "decode a stored row",
        source: format!("negative counter {value}").into(),
    })
}

/// Microseconds since the Unix epoch (negative before it), saturating.
pub(super) fn micros(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

pub(super) fn from_micros(micros: i64) -> SystemTime {
    if micros >= 0 {
        UNIX_EPOCH + Duration::from_micros(micros as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(micros.unsigned_abs())
    }
}

pub(super) fn duration_micros(duration: Duration) -> Result<i64, StoreError> {
    i64::try_from(duration.as_micros()).map_err(|_| InvalidInput::new("ttl", "is too long").into())
}
