//! Subscribers' checkpoints: commit (forward only, with the hash of the
//! event checkpointed) and read.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{SQL_EVENT_HASH, from_db, from_micros, micros, read_state, shard_no, sql_error, to_db};
use crate::log::event::ChainHash;
use crate::log::ids::{Sequence, ShardId, SubscriberId};
use crate::store::{
    Checkpoint, CheckpointCommit, CheckpointTarget, StoreError, checkpoint_hash, corrupt_id, stored_hash,
};

const SQL_COMMIT_CHECKPOINT: &str = include_str!("sql/commit_checkpoint.sql");
const SQL_READ_CHECKPOINT: &str = include_str!("sql/read_checkpoint.sql");
const SQL_READ_CHECKPOINTS: &str = include_str!("sql/read_checkpoints.sql");

/// Moves `subscriber`'s checkpoint on `shard` forward to `sequence` (never
/// back) and answers with the checkpoint as stored.
pub(super) fn commit(
    db: &mut Connection,
    subscriber: SubscriberId,
    shard: ShardId,
    sequence: Sequence,
    hash: Option<ChainHash>,
) -> Result<CheckpointCommit, StoreError> {
    let what = "commit a checkpoint";
    let sql = |e| sql_error(what, e);
    let sequence_value = to_db("sequence", sequence.0)?;
    let Some(state) = read_state(db, &shard)? else { return Err(StoreError::UnknownShard { shard }) };
    let number = shard_no(db, &shard)?.ok_or(StoreError::UnknownShard { shard: shard.clone() })?;
    let stored: Option<Vec<u8>> = db
        .prepare_cached(SQL_EVENT_HASH)
        .map_err(sql)?
        .query_row(params![number, sequence_value], |row| row.get(0))
        .optional()
        .map_err(sql)?;
    let target = CheckpointTarget {
        head: state.lease.head,
        low: state.low,
        low_prev_hash: state.low_prev_hash,
        stored: stored.map(|stored| stored_hash(stored, "hash")).transpose()?,
    };
    let recorded = checkpoint_hash(&subscriber, &shard, sequence, hash, &target)?;
    let moved = db
        .prepare_cached(SQL_COMMIT_CHECKPOINT)
        .map_err(sql)?
        .execute(params![
            subscriber.as_str(),
            number,
            sequence_value,
            micros(SystemTime::now()),
            recorded.as_ref().map(|hash| &hash.as_bytes()[..]),
        ])
        .map_err(sql)?
        == 1;
    let (stored, updated_at, hash): (i64, i64, Option<Vec<u8>>) = db
        .prepare_cached(SQL_READ_CHECKPOINT)
        .map_err(sql)?
        .query_row(params![subscriber.as_str(), number], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .map_err(sql)?;
    let checkpoint = Checkpoint {
        subscriber,
        shard,
        sequence: Sequence(from_db(stored)?),
        updated_at: from_micros(updated_at),
        hash: hash.map(|hash| stored_hash(hash, "hash")).transpose()?,
    };
    Ok(CheckpointCommit { checkpoint, moved })
}

/// The checkpoints of `subscriber` (or of everyone), on `shards` (or on all).
pub(super) fn read(
    db: &mut Connection,
    subscriber: Option<SubscriberId>,
    shards: Vec<ShardId>,
) -> Result<Vec<Checkpoint>, StoreError> {
    let what = "read checkpoints";
    let sql = |e| sql_error(what, e);
    let mut statement = db.prepare_cached(SQL_READ_CHECKPOINTS).map_err(sql)?;
    let mut rows = statement.query(params![subscriber.as_ref().map(SubscriberId::as_str)]).map_err(sql)?;
    let mut found = Vec::new();
    while let Some(row) = rows.next().map_err(sql)? {
        let shard = ShardId::parse(row.get::<_, String>(1).map_err(sql)?).map_err(corrupt_id)?;
        if !shards.is_empty() && !shards.contains(&shard) {
            continue;
        }
        found.push(Checkpoint {
            subscriber: SubscriberId::parse(row.get::<_, String>(0).map_err(sql)?).map_err(corrupt_id)?,
            shard,
            sequence: Sequence(from_db(row.get(2).map_err(sql)?)?),
            updated_at: from_micros(row.get(3).map_err(sql)?),
            hash: row.get::<_, Option<Vec<u8>>>(4).map_err(sql)?.map(|hash| stored_hash(hash, "hash")).transpose()?,
        });
    }
    Ok(found)
}
