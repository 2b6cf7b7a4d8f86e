//! Queue snapshots: stored by the shard's owner at a sequence with the hash
//! of the event there, and read back for recovery.

use std::time::SystemTime;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::rows::{SQL_EVENT_HASH, from_db, from_micros, micros, read_state, shard_no, sql_error, to_db};
use crate::log::event::CorruptEvent;
use crate::log::ids::{Epoch, InvalidInput, Sequence, ShardId};
use crate::store::{Snapshot, StoreError, stored_hash};

const SQL_UPSERT_SNAPSHOT: &str = include_str!("sql/upsert_snapshot.sql");
const SQL_READ_SNAPSHOT: &str = include_str!("sql/read_snapshot.sql");

/// Stores the owner's snapshot at `sequence`, with the hash of the event
/// there.
pub(super) fn put(
    db: &mut Connection,
    shard: ShardId,
    sequence: Sequence,
    epoch: Epoch,
    data: Bytes,
) -> Result<Snapshot, StoreError> {
    let what = "store a snapshot";
    let sql = |e| sql_error(what, e);
    let sequence_value = to_db("sequence", sequence.0)?;
    let epoch_value = to_db("epoch", epoch.0)?;
    let txn = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
    let Some(state) = read_state(&txn, &shard)? else { return Err(StoreError::UnknownShard { shard }) };
    if state.lease.owner.is_none() {
        return Err(StoreError::NoLease { shard });
    }
    if state.lease.epoch != epoch {
        return Err(StoreError::StaleEpoch { shard, given: epoch, current: state.lease.epoch });
    }
    let head = state.lease.head;
    if sequence.0 == 0 || sequence > head {
        return Err(InvalidInput::new(
            "sequence",
            format!("{sequence} is outside the log of shard {shard} (1 through the head {head})"),
        )
        .into());
    }
    let number = shard_no(&txn, &shard)?.ok_or(StoreError::UnknownShard { shard: shard.clone() })?;
    let hash = if sequence.next() == state.low {
        state.low_prev_hash
    } else if sequence < state.low {
        return Err(StoreError::Trimmed { shard, low: state.low });
    } else {
        let stored: Option<Vec<u8>> = txn
            .prepare_cached(SQL_EVENT_HASH)
            .map_err(sql)?
            .query_row(params![number, sequence_value], |row| row.get(0))
            .optional()
            .map_err(sql)?;
        match stored {
            Some(hash) => stored_hash(hash, "hash")?,
            None => {
                return Err(CorruptEvent { shard, sequence, reason: "missing from the stored log".into() }.into());
            }
        }
    };
    let created_at = SystemTime::now();
    txn.prepare_cached(SQL_UPSERT_SNAPSHOT)
        .map_err(sql)?
        .execute(params![number, sequence_value, epoch_value, &data[..], &hash.as_bytes()[..], micros(created_at)])
        .map_err(sql)?;
    txn.commit().map_err(sql)?;
    Ok(Snapshot { shard, sequence, data, hash, created_at: from_micros(micros(created_at)) })
}

/// The newest snapshot at or below `at_or_below` (or the newest).
pub(super) fn read(
    db: &mut Connection,
    shard: ShardId,
    at_or_below: Option<Sequence>,
) -> Result<Option<Snapshot>, StoreError> {
    let what = "read a snapshot";
    let below = match at_or_below {
        Some(sequence) => to_db("at_or_below", sequence.0)?,
        None => i64::MAX,
    };
    let row = db
        .prepare_cached(SQL_READ_SNAPSHOT)
        .map_err(|e| sql_error(what, e))?
        .query_row(params![shard.as_str(), below], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?, row.get::<_, Vec<u8>>(2)?, row.get::<_, i64>(3)?))
        })
        .optional()
        .map_err(|e| sql_error(what, e))?;
    row.map(|(sequence, data, hash, created_at)| {
        Ok(Snapshot {
            shard,
            sequence: Sequence(from_db(sequence)?),
            data: Bytes::from(data),
            hash: stored_hash(hash, "hash")?,
            created_at: from_micros(created_at),
        })
    })
    .transpose()
}
