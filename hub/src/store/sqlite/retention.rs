//! Retention: trims a shard's log below what its newest snapshot and the
//! counted checkpoints still need, keeping the hash that anchors the rest.

use std::time::SystemTime;

use rusqlite::{Connection, TransactionBehavior, params};

use super::rows::{duration_micros, from_db, micros, read_state, shard_no, sql_error};
use crate::log::ids::{Sequence, ShardId};
use crate::store::{RetentionOutcome, RetentionPolicy, StoreError};

const SQL_RETENTION_PLAN: &str = include_str!("sql/retention_plan.sql");
const SQL_RETENTION_LOW: &str = include_str!("sql/retention_low.sql");
const SQL_RETENTION_SNAPSHOTS: &str = include_str!("sql/retention_snapshots.sql");
const SQL_RETENTION_RECORDS: &str = include_str!("sql/retention_records.sql");
const SQL_RETENTION_EVENTS: &str = include_str!("sql/retention_events.sql");

/// Trims the log below the oldest of the newest snapshot and the
/// checkpoints `policy` counts.
pub(super) fn apply(
    db: &mut Connection,
    shard: ShardId,
    policy: RetentionPolicy,
) -> Result<RetentionOutcome, StoreError> {
    let what = "apply retention";
    let sql = |e| sql_error(what, e);
    let oldest_counted = micros(SystemTime::now()).saturating_sub(duration_micros(policy.checkpoint_max_age)?);
    let txn = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
    let Some(state) = read_state(&txn, &shard)? else { return Err(StoreError::UnknownShard { shard }) };
    let low = state.low;
    let number = shard_no(&txn, &shard)?.ok_or(StoreError::UnknownShard { shard: shard.clone() })?;
    let (snapshot, checkpoint): (Option<i64>, Option<i64>) = txn
        .prepare_cached(SQL_RETENTION_PLAN)
        .map_err(sql)?
        .query_row(params![number, oldest_counted], |row| Ok((row.get(0)?, row.get(1)?)))
        .map_err(sql)?;
    let Some(snapshot) = snapshot else { return Ok(RetentionOutcome { deleted: 0, low }) };
    let through = checkpoint.map_or(snapshot, |checkpoint| snapshot.min(checkpoint));
    if from_db(through)? < low.0 {
        return Ok(RetentionOutcome { deleted: 0, low });
    }
    // The anchor hash is read before event `through` is deleted.
    txn.prepare_cached(SQL_RETENTION_LOW).map_err(sql)?.execute(params![number, through]).map_err(sql)?;
    txn.prepare_cached(SQL_RETENTION_SNAPSHOTS).map_err(sql)?.execute(params![number, through]).map_err(sql)?;
    // Each producer's latest record survives, so its retries are
    // still recognised after the events are gone.
    txn.prepare_cached(SQL_RETENTION_RECORDS).map_err(sql)?.execute(params![number, through]).map_err(sql)?;
    let deleted =
        txn.prepare_cached(SQL_RETENTION_EVENTS).map_err(sql)?.execute(params![number, through]).map_err(sql)?;
    txn.commit().map_err(sql)?;
    Ok(RetentionOutcome { deleted: deleted as u64, low: Sequence(from_db(through)? + 1) })
}
