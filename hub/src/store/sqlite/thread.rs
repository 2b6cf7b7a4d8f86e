//! The thread that owns the connection: it runs every operation in call
//! order and group-commits the appends queued behind each other, deciding
//! each batch with the shared append decision.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{broadcast, oneshot};

use super::rows::{from_db, micros, sql_error, to_db};
use crate::defaults;
use crate::log::event::{self, LogEvent};
use crate::log::ids::{Epoch, ProducerSeq, Sequence, ShardId};
use crate::store::decision::{ShardView, Verdict, decide};
use crate::store::{AppendAck, AppendBatch, LogChange, StoreError, copy_error, stored_hash};
use crate::telemetry::{self, DbOperation};

const SQL_APPEND_SHARD: &str = include_str!("sql/append_shard.sql");
const SQL_APPEND_RECORD: &str = include_str!("sql/append_record.sql");
const SQL_APPEND_LATEST: &str = include_str!("sql/append_latest.sql");
const SQL_APPEND_EVENT: &str = include_str!("sql/append_event.sql");
const SQL_APPEND_RECORD_INSERT: &str = include_str!("sql/append_record_insert.sql");
const SQL_APPEND_HEAD: &str = include_str!("sql/append_head.sql");

/// Work for the store thread.
pub(super) enum Command {
    /// An append, group-committed with the appends queued right behind it.
    Append(Pending),
    /// Any other operation.
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
}

pub(super) struct Pending {
    pub(super) batch: AppendBatch,
    pub(super) reply: oneshot::Sender<Result<AppendAck, StoreError>>,
}

/// The thread owning the connection.
pub(super) struct StoreThread {
    pub(super) connection: Connection,
    pub(super) changes: broadcast::Sender<LogChange>,
    pub(super) pending_events: Arc<AtomicUsize>,
}

impl StoreThread {
    pub(super) fn run(mut self, queue: mpsc::Receiver<Command>) {
        let mut next = None;
        loop {
            let command = match next.take() {
                Some(command) => command,
                // Ends once every sender is gone (the store closed) and the
                // queue is drained: queued appends still commit.
                None => match queue.recv() {
                    Ok(command) => command,
                    Err(_) => break,
                },
            };
            match command {
                Command::Run(op) => op(&mut self.connection),
                Command::Append(first) => {
                    let mut events = first.batch.events.len();
                    let mut group = vec![first];
                    while group.len() < defaults::MAX_GROUP_BATCHES && events < defaults::MAX_GROUP_EVENTS {
                        match queue.try_recv() {
                            Ok(Command::Append(pending)) => {
                                events += pending.batch.events.len();
                                group.push(pending);
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit(group);
                }
            }
        }
        // Dropping the connection releases the file's lock.
        if let Err((_, err)) = self.connection.close() {
            tracing::warn!(error = %err, "closing the embedded SQLite store failed");
        }
    }

    /// Commits a group of appends in one transaction and answers each.
    pub(super) fn commit(&mut self, group: Vec<Pending>) {
        let started = Instant::now();
        let event_count: usize = group.iter().map(|p| p.batch.events.len()).sum();
        let outcome = commit_group(&mut self.connection, &group);
        telemetry::record_db_operation(DbOperation::Append, started.elapsed(), outcome.is_ok());
        telemetry::group_committed(group.len(), event_count, started.elapsed());
        let results = match outcome {
            Ok(results) => results,
            Err(err) => {
                tracing::error!(batches = group.len(), error = %crate::store::causes(&err), "embedded store append failed");
                group.iter().map(|_| Err(copy_error(&err))).collect()
            }
        };
        let mut appended: Vec<(ShardId, Vec<LogEvent>)> = Vec::new();
        for (pending, result) in group.into_iter().zip(results) {
            self.pending_events.fetch_sub(pending.batch.events.len(), Ordering::Relaxed);
            let answer = result.map(|outcome| match outcome {
                BatchOutcome::Written { ack, events } => {
                    match appended.iter_mut().find(|(shard, _)| *shard == pending.batch.shard) {
                        Some((_, run)) => run.extend(events),
                        None => appended.push((pending.batch.shard.clone(), events)),
                    }
                    ack
                }
                BatchOutcome::Duplicate(ack) => ack,
            });
            telemetry::batch_answered(telemetry::AppendOutcome::of(&answer), pending.batch.events.len());
            let _ = pending.reply.send(answer);
        }
        for (shard, events) in appended {
            let head = events[events.len() - 1].sequence;
            // No receivers just means nobody follows the live tail.
            let _ = self.changes.send(LogChange::Appended { shard, head, events: Some(Arc::from(events)) });
        }
    }
}

/// What happened to one batch of a group.
pub(super) enum BatchOutcome {
    Written { ack: AppendAck, events: Vec<LogEvent> },
    Duplicate(AppendAck),
}

/// Runs a group's transaction; the outer error means nothing was committed.
pub(super) fn commit_group(
    connection: &mut Connection,
    group: &[Pending],
) -> Result<Vec<Result<BatchOutcome, StoreError>>, StoreError> {
    let what = "commit an append group";
    let mut txn =
        connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| sql_error(what, e))?;
    let mut results = Vec::with_capacity(group.len());
    for pending in group {
        let savepoint = txn.savepoint().map_err(|e| sql_error(what, e))?;
        let result = apply_batch(&savepoint, &pending.batch);
        // A full disk or an I/O error may make SQLite roll the whole
        // transaction back by itself: then the group failed, with that
        // batch's cause (not the "no transaction is active" of what follows).
        if let Err(err @ StoreError::Unavailable { .. }) = &result
            && savepoint.is_autocommit()
        {
            return Err(copy_error(err));
        }
        match &result {
            Ok(BatchOutcome::Written { .. }) => savepoint.commit().map_err(|e| sql_error(what, e))?,
            // Rejected or failed batches roll back to the savepoint when it
            // drops; the rest of the group is unaffected.
            _ => drop(savepoint),
        }
        results.push(result);
    }
    if results.iter().any(|r| matches!(r, Ok(BatchOutcome::Written { .. }))) {
        txn.commit().map_err(|e| sql_error(what, e))?;
    } else {
        // Nothing to write: no fsync.
        txn.rollback().map_err(|e| sql_error(what, e))?;
    }
    Ok(results)
}

/// Decides and, when valid, writes one batch, in the order the PostgreSQL
/// store decides: a known batch is a duplicate (whatever the epoch now),
/// then the lease and epoch fence, then producer-sequence order.
pub(super) fn apply_batch(db: &Connection, batch: &AppendBatch) -> Result<BatchOutcome, StoreError> {
    let what = "append a batch";
    let sql = |e| sql_error(what, e);
    let producer_seq = to_db("producer_seq", batch.producer_seq.0)?;
    let shard = db
        .prepare_cached(SQL_APPEND_SHARD)
        .map_err(sql)?
        .query_row(params![batch.shard.as_str()], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, Vec<u8>>(4)?,
            ))
        })
        .optional()
        .map_err(sql)?;
    let mut view = None;
    let mut recorded = None;
    let mut latest = None;
    if let Some((shard_no, epoch, owner, head, _)) = &shard {
        view =
            Some(ShardView { held: owner.is_some(), epoch: Epoch(from_db(*epoch)?), head: Sequence(from_db(*head)?) });
        recorded = db
            .prepare_cached(SQL_APPEND_RECORD)
            .map_err(sql)?
            .query_row(params![shard_no, batch.producer.as_str(), producer_seq], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, Vec<u8>>(2)?))
            })
            .optional()
            .map_err(sql)?
            .map(|(first, last, hash)| {
                Ok::<_, StoreError>(AppendAck {
                    first: Sequence(from_db(first)?),
                    last: Sequence(from_db(last)?),
                    duplicate: true,
                    last_hash: stored_hash(hash, "last_hash")?,
                })
            })
            .transpose()?;
        if recorded.is_none() {
            let max: Option<i64> = db
                .prepare_cached(SQL_APPEND_LATEST)
                .map_err(sql)?
                .query_row(params![shard_no, batch.producer.as_str()], |row| row.get(0))
                .map_err(sql)?;
            latest = max.map(|latest| from_db(latest).map(ProducerSeq)).transpose()?;
        }
    }
    if let Verdict::Duplicate(ack) = decide(batch, view, recorded, latest)? {
        return Ok(BatchOutcome::Duplicate(ack));
    }
    let (shard_no, epoch, _, head, head_hash) = shard.expect("decide writes only to a shard that exists");

    let head = Sequence(from_db(head)?);
    let events = event::chain(stored_hash(head_hash, "head_hash")?, head.next(), batch.epoch, &batch.events);
    let mut insert = db.prepare_cached(SQL_APPEND_EVENT).map_err(sql)?;
    for event in &events {
        insert
            .execute(params![
                shard_no,
                to_db("sequence", event.sequence.0)?,
                epoch,
                micros(event.recorded_at),
                &event.body[..],
                &event.hash.as_bytes()[..],
            ])
            .map_err(sql)?;
    }
    let (first, last) = (&events[0], &events[events.len() - 1]);
    db.prepare_cached(SQL_APPEND_RECORD_INSERT)
        .map_err(sql)?
        .execute(params![
            shard_no,
            batch.producer.as_str(),
            producer_seq,
            to_db("sequence", first.sequence.0)?,
            to_db("sequence", last.sequence.0)?,
            &last.hash.as_bytes()[..],
        ])
        .map_err(sql)?;
    // The fence again, in the statement that moves the head: with one
    // connection nothing can have changed, but the write states its rule.
    let moved = db
        .prepare_cached(SQL_APPEND_HEAD)
        .map_err(sql)?
        .execute(params![shard_no, to_db("sequence", last.sequence.0)?, &last.hash.as_bytes()[..], epoch])
        .map_err(sql)?;
    if moved != 1 {
        return Err(StoreError::Internal { what, source: "the epoch fence refused the head update".into() });
    }
    let ack = AppendAck { first: first.sequence, last: last.sequence, duplicate: false, last_hash: last.hash };
    Ok(BatchOutcome::Written { ack, events })
}
