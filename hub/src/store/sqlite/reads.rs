//! Reads of the log: the shard list, a page of events, the sequence at a
//! time. Each reads one consistent state of the file.

use std::time::SystemTime;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::rows::{from_db, from_micros, micros, read_state, shard_no, shard_state, sql_error, to_db};
use crate::log::event::{ChainHash, StoredRow};
use crate::log::ids::{Epoch, InvalidInput, Sequence, ShardId};
use crate::store::{EventPage, ShardState, StoreError};

const SQL_READ_RANGE: &str = include_str!("sql/read_range.sql");
const SQL_SEQUENCE_AT: &str = include_str!("sql/sequence_at.sql");
const SQL_LIST_SHARDS: &str = include_str!("sql/list_shards.sql");

/// Every shard whose id starts with `prefix`.
pub(super) fn list_shards(db: &mut Connection, prefix: String) -> Result<Vec<ShardState>, StoreError> {
    let what = "list shards";
    // substr compares bytes, like PostgreSQL's starts_with; LIKE would
    // treat '%' and '_' in ids as wildcards.
    let mut statement = db.prepare_cached(SQL_LIST_SHARDS).map_err(|e| sql_error(what, e))?;
    let mut rows = statement.query(params![prefix]).map_err(|e| sql_error(what, e))?;
    let mut shards = Vec::new();
    while let Some(row) = rows.next().map_err(|e| sql_error(what, e))? {
        shards.push(shard_state(row)?);
    }
    Ok(shards)
}

/// One page of events from `from`, with the anchor hash before it.
pub(super) fn read_range(
    db: &mut Connection,
    shard: ShardId,
    from: Sequence,
    to: Option<Sequence>,
    limit: usize,
    max_bytes: usize,
) -> Result<EventPage, StoreError> {
    let what = "read events";
    let sql = |e| sql_error(what, e);
    if from.0 == 0 {
        return Err(InvalidInput::new("from_sequence", "sequences start at 1").into());
    }
    let from_value = to_db("from_sequence", from.0)?;
    let to_value = match to {
        Some(to) => to_db("to_sequence", to.0)?,
        None => i64::MAX,
    };
    // A read transaction: the shard row and the events come from one
    // snapshot, as in PostgreSQL's single statement.
    let txn = db.transaction_with_behavior(TransactionBehavior::Deferred).map_err(sql)?;
    let Some(state) = read_state(&txn, &shard)? else { return Err(StoreError::UnknownShard { shard }) };
    if from < state.low {
        return Err(StoreError::Trimmed { shard, low: state.low });
    }
    let number = shard_no(&txn, &shard)?.ok_or(StoreError::UnknownShard { shard: shard.clone() })?;
    let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1).min(i64::MAX - 1) + 1;
    let mut statement = txn.prepare_cached(SQL_READ_RANGE).map_err(sql)?;
    let mut rows = statement.query(params![number, from_value, to_value, fetch]).map_err(sql)?;
    let mut anchor = None;
    let mut stored = Vec::new();
    // Bodies read so far; rows are fetched lazily, so stopping here
    // reads no more.
    let mut bytes = 0usize;
    while let Some(row) = rows.next().map_err(sql)? {
        let sequence = Sequence(from_db(row.get(0).map_err(sql)?)?);
        let hash: Vec<u8> = row.get(4).map_err(sql)?;
        if sequence < from {
            anchor = Some(ChainHash::from_slice(&hash).unwrap_or(ChainHash::ZERO));
            continue;
        }
        if stored.len() == limit || bytes >= max_bytes.max(1) {
            break;
        }
        stored.push(StoredRow {
            sequence,
            epoch: Epoch(from_db(row.get(1).map_err(sql)?)?),
            recorded_at: from_micros(row.get(2).map_err(sql)?),
            body: Bytes::from(row.get::<_, Vec<u8>>(3).map_err(sql)?),
            hash: Bytes::from(hash),
        });
        bytes = bytes.saturating_add(stored.last().map_or(0, |row: &StoredRow| row.body.len()));
    }
    let cut = bytes >= max_bytes.max(1);
    Ok(EventPage::assemble(
        shard,
        from,
        to,
        limit,
        anchor,
        stored,
        (state.lease.head, state.low, state.low_prev_hash),
        cut,
    ))
}

/// The first sequence recorded at or after `since`.
pub(super) fn sequence_at(
    db: &mut Connection,
    shard: ShardId,
    since: SystemTime,
) -> Result<Option<Sequence>, StoreError> {
    let what = "find a sequence by time";
    let found: Option<i64> = db
        .prepare_cached(SQL_SEQUENCE_AT)
        .map_err(|e| sql_error(what, e))?
        .query_row(params![shard.as_str(), micros(since)], |row| row.get(0))
        .optional()
        .map_err(|e| sql_error(what, e))?;
    found.map(|sequence| Ok(Sequence(from_db(sequence)?))).transpose()
}
