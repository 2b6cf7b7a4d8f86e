//! Group commit: one task per committer connection drains the batches queued
//! since its last transaction and writes them all in one transaction, so many
//! producers share one WAL flush.
//!
//! Per batch the decision (write, duplicate, reject) is made before anything
//! is written, on shard rows locked `FOR UPDATE`: a stale or out-of-order
//! batch is simply left out, so it never fails the batches grouped with it.
//! The head update re-checks every epoch and the head the writes were
//! chained to in SQL (the fence), and a group whose transaction fails for any
//! other reason than an outage is retried one batch per transaction, so one
//! bad batch cannot take its neighbours down with it.
//!
//! Two ways to run the transaction:
//! - **locking** (two round trips): lock the shards and look up the
//!   producers' records, decide, then write, move the heads and commit.
//! - **predicted** (one round trip): when the committer wrote the group's
//!   shards and producers last, it already knows what the lookup would say,
//!   decides from that, and sends locks, fenced head update, writes and
//!   COMMIT at once. Shards go to one committer by hash, so on a replica
//!   that owns its shards the prediction is nearly always right; when it is
//!   not (another replica wrote, a lease moved, a retry) the fence aborts
//!   the transaction before anything is committed, and the group runs again
//!   with locks. A prediction can cost a wasted round trip, never a wrong
//!   write.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, col, from_db, to_db};
use super::failure::{Failure, classify};
use crate::defaults;
use crate::log::event::{self, ChainHash, LogEvent};
use crate::log::ids::{Epoch, ProducerId, ProducerSeq, Sequence, ShardId};
use crate::store::decision::{ShardView, Verdict, decide};
use crate::store::{
    AppendAck, AppendBatch, Elapsed, Fault, LogChange, StoreError, copy_error, count_mismatch, stored_hash,
};
use crate::telemetry;

const SQL_LOCK_SHARDS: &str = include_str!("sql/lock_shards.sql");
const SQL_PRODUCER_BATCHES: &str = include_str!("sql/producer_batches.sql");
const SQL_INSERT_EVENTS: &str = include_str!("sql/insert_events.sql");
const SQL_COPY_EVENTS: &str = include_str!("sql/copy_events.sql");
const SQL_INSERT_PRODUCER_BATCHES: &str = include_str!("sql/insert_producer_batches.sql");
const SQL_ADVANCE_HEADS: &str = include_str!("sql/advance_heads.sql");

/// A batch waiting for its group commit.
pub(crate) struct Pending {
    pub(crate) batch: AppendBatch,
    pub(crate) reply: oneshot::Sender<Result<AppendAck, StoreError>>,
}

/// One committer: its queue and what it shares with the store.
pub(crate) struct Committer {
    pub(crate) pool: Pool,
    /// Deadline of one group's transaction (see [`defaults::DATABASE_TIMEOUT`]).
    pub(crate) timeout: Duration,
    /// What the next group is expected to find (starts empty).
    pub(crate) prediction: Prediction,
    pub(crate) changes: broadcast::Sender<LogChange>,
    pub(crate) pending_events: Arc<AtomicUsize>,
}

/// What a transaction decided for one batch of the group.
enum Decision {
    /// Written by this transaction.
    Write { shard_no: i32, epoch: Epoch, events: Vec<LogEvent> },
    /// Written before; answered with the original acknowledgement.
    Duplicate(AppendAck),
    /// Same batch as the earlier group member at this index.
    SameAs(usize),
    /// Not written.
    Reject(StoreError),
}

/// A shard row as locked by the transaction, updated as batches are planned.
#[derive(Clone)]
struct LockedShard {
    shard_no: i32,
    epoch: Epoch,
    held: bool,
    head: Sequence,
    head_hash: ChainHash,
}

impl LockedShard {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, StoreError> {
        Ok(LockedShard {
            shard_no: col(row, "shard_no")?,
            epoch: Epoch(from_db(col(row, "epoch")?)?),
            held: col::<Option<String>>(row, "owner")?.is_some(),
            head: Sequence(from_db(col(row, "head_sequence")?)?),
            head_hash: hash_col(row, "head_hash")?,
        })
    }
}

/// Why a group transaction failed.
enum GroupError {
    /// The driver failed; classified by SQLSTATE.
    Db(&'static str, tokio_postgres::Error),
    /// Anything else (pool, decoding, the fence refusing a planned write).
    Store(StoreError),
}

impl Committer {
    /// Runs until cancelled, then commits what is still queued and returns.
    pub(crate) async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Pending>, cancel: CancellationToken) {
        loop {
            let first = tokio::select! {
                biased;
                next = queue.recv() => next,
                () = cancel.cancelled() => {
                    // Refuse new batches; the ones already queued still commit.
                    queue.close();
                    queue.recv().await
                }
            };
            let Some(first) = first else { return };
            let mut events = first.batch.events.len();
            let mut group = vec![first];
            while group.len() < defaults::MAX_GROUP_BATCHES && events < defaults::MAX_GROUP_EVENTS {
                match queue.try_recv() {
                    Ok(next) => {
                        events += next.batch.events.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            if let Some(stalled) = self.commit(group).await {
                // The database did not answer that group: the batches that
                // queued meanwhile would each wait out a deadline of their
                // own behind it. Answer them now; retrying is safe.
                let waiting: Vec<Pending> = std::iter::from_fn(|| queue.try_recv().ok()).collect();
                if !waiting.is_empty() {
                    self.fail(waiting, &stalled);
                }
            }
        }
    }

    /// Commits a group and answers every batch in it; returns the error when
    /// the database did not answer within the deadline.
    async fn commit(&mut self, group: Vec<Pending>) -> Option<StoreError> {
        let started = Instant::now();
        let batches: Vec<&AppendBatch> = group.iter().map(|p| &p.batch).collect();
        let outcome = self.commit_with_retries(&batches).await;
        let event_count: usize = batches.iter().map(|b| b.events.len()).sum();
        telemetry::group_committed(group.len(), event_count, started.elapsed());
        let failed = matches!(outcome, Err(StoreError::Unavailable { .. } | StoreError::Internal { .. }));
        telemetry::record_db_operation(telemetry::DbOperation::Append, started.elapsed(), !failed);
        let stalled = match &outcome {
            Err(err) if err.fault() == Some(Fault::Timeout) => Some(copy_error(err)),
            _ => None,
        };
        match outcome {
            Ok(decisions) => self.answer(group, decisions),
            Err(err) if group.len() > 1 && !matches!(err, StoreError::Unavailable { .. }) => {
                tracing::warn!(batches = group.len(), error = %err, "group commit failed; committing its batches one by one");
                for pending in group {
                    let outcome = self.commit_with_retries(&[&pending.batch]).await;
                    match outcome {
                        Ok(decisions) => self.answer(vec![pending], decisions),
                        Err(err) => self.fail(vec![pending], &err),
                    }
                }
            }
            Err(err) => self.fail(group, &err),
        }
        stalled
    }

    async fn commit_with_retries(&mut self, batches: &[&AppendBatch]) -> Result<Vec<Decision>, StoreError> {
        let mut attempt = 1;
        loop {
            let Ok(outcome) = tokio::time::timeout(self.timeout, self.transaction(batches)).await else {
                // The transaction's connection was closed mid-flight (see
                // `Conn`), so its outcome is unknown: the prediction is
                // dropped, and a retry of these batches takes the locking
                // path, which waits for the shard rows and then finds the
                // producer records if the commit landed after all.
                self.prediction.forget(batches);
                return Err(StoreError::Unavailable {
                    what: "commit an append group",
                    source: Box::new(Elapsed { after: self.timeout }),
                });
            };
            match outcome {
                Ok(decisions) => return Ok(decisions),
                Err(GroupError::Db(what, err)) => match classify(&err) {
                    // PostgreSQL picked this transaction as a conflict victim;
                    // nothing was written, and a rerun normally succeeds.
                    Failure::Retry if attempt < defaults::TRANSACTION_ATTEMPTS => {
                        tracing::debug!(attempt, error = %err, "append transaction conflicted; retrying");
                        attempt += 1;
                    }
                    Failure::Retry | Failure::Unavailable => {
                        return Err(StoreError::Unavailable { what, source: Box::new(err) });
                    }
                    Failure::Fatal => return Err(StoreError::Internal { what, source: Box::new(err) }),
                },
                Err(GroupError::Store(err)) => return Err(err),
            }
        }
    }

    /// Runs one append transaction for `batches`: the predicted one when
    /// this committer can predict the group, else (or when PostgreSQL's fence
    /// refuses the prediction) the locking one. On failure the transaction is
    /// ended (or the connection dropped) so no connection returns to the pool
    /// inside a transaction.
    async fn transaction(&mut self, batches: &[&AppendBatch]) -> Result<Vec<Decision>, GroupError> {
        let client = Conn::get(&self.pool).await.map_err(GroupError::Store)?;
        if let Some(predicted) = self.prediction.plan(batches) {
            match write_predicted(&client, batches, &predicted.decisions).await {
                Ok(()) => {
                    client.release();
                    telemetry::append_predicted(true);
                    self.prediction.learn(predicted.shards, predicted.latest);
                    return Ok(predicted.decisions);
                }
                Err(err) => {
                    self.prediction.forget(batches);
                    let refused = matches!(&err, GroupError::Db(_, db) if classify(db) != Failure::Unavailable);
                    // A connection that cannot roll back leaves the pool; a
                    // refused guess committed nothing, so the locking path
                    // decides the group, on a fresh connection if need be.
                    end_transaction(client).await;
                    if !refused {
                        return Err(err);
                    }
                    telemetry::append_predicted(false);
                    if let GroupError::Db(_, db) = &err {
                        tracing::debug!(error = %db, "predicted append refused; taking the locking path");
                    }
                }
            }
            let client = Conn::get(&self.pool).await.map_err(GroupError::Store)?;
            return self.locking_transaction(client, batches).await;
        }
        self.locking_transaction(client, batches).await
    }

    async fn locking_transaction(
        &mut self,
        client: Conn,
        batches: &[&AppendBatch],
    ) -> Result<Vec<Decision>, GroupError> {
        match locking_statements(&client, batches).await {
            Ok(locked) => {
                client.release();
                self.prediction.learn(locked.shards, locked.latest);
                Ok(locked.decisions)
            }
            Err(err) => {
                self.prediction.forget(batches);
                end_transaction(client).await;
                Err(err)
            }
        }
    }

    /// Answers a committed group and announces its events to the live tail.
    fn answer(&self, group: Vec<Pending>, decisions: Vec<Decision>) {
        let mut acks: Vec<Option<AppendAck>> = Vec::with_capacity(group.len());
        let mut appended: Vec<(ShardId, Vec<LogEvent>)> = Vec::new();
        for decision in &decisions {
            let ack = match decision {
                Decision::Write { events, .. } => {
                    let (first, last) = (&events[0], &events[events.len() - 1]);
                    Some(AppendAck {
                        first: first.sequence,
                        last: last.sequence,
                        duplicate: false,
                        last_hash: last.hash,
                    })
                }
                Decision::Duplicate(ack) => Some(*ack),
                Decision::SameAs(earlier) => acks[*earlier].map(|ack| AppendAck { duplicate: true, ..ack }),
                Decision::Reject(_) => None,
            };
            acks.push(ack);
        }
        for ((pending, decision), ack) in group.into_iter().zip(decisions).zip(acks) {
            self.pending_events.fetch_sub(pending.batch.events.len(), Ordering::Relaxed);
            let result = match (decision, ack) {
                (Decision::Reject(err), _) => Err(err),
                (Decision::Write { events, .. }, Some(ack)) => {
                    match appended.iter_mut().find(|(shard, _)| *shard == pending.batch.shard) {
                        Some((_, run)) => run.extend(events),
                        None => appended.push((pending.batch.shard.clone(), events)),
                    }
                    Ok(ack)
                }
                (_, Some(ack)) => Ok(ack),
                (_, None) => Err(StoreError::Internal {
                    what: "answer a duplicate batch",
                    source: "its original was rejected in the same group".into(),
                }),
            };
            telemetry::batch_answered(telemetry::AppendOutcome::of(&result), pending.batch.events.len());
            // The caller may have gone away; its batch is committed regardless.
            let _ = pending.reply.send(result);
        }
        for (shard, events) in appended {
            let head = events[events.len() - 1].sequence;
            // No receivers just means no live subscribers on this replica.
            let _ = self.changes.send(LogChange::Appended { shard, head, events: Some(Arc::from(events)) });
        }
    }

    fn fail(&self, group: Vec<Pending>, err: &StoreError) {
        if !matches!(err, StoreError::Unavailable { .. }) {
            tracing::error!(batches = group.len(), error = %err, "append failed unexpectedly");
        }
        for pending in group {
            self.pending_events.fetch_sub(pending.batch.events.len(), Ordering::Relaxed);
            let result = Err(copy_error(err));
            telemetry::batch_answered(telemetry::AppendOutcome::of(&result), pending.batch.events.len());
            let _ = pending.reply.send(result);
        }
    }
}

/// Ends a failed transaction with ROLLBACK; a connection that cannot is
/// broken and is kept out of the pool. Returns whether the connection is
/// still usable.
async fn end_transaction(client: Conn) -> bool {
    if client.batch_execute("ROLLBACK").await.is_ok() {
        client.release();
        return true;
    }
    client.discard();
    false
}

/// The locking append transaction, in two round trips once its statements
/// are prepared: BEGIN, lock and lookup pipelined; then the writes, the
/// fenced head update and COMMIT pipelined. A failing statement aborts the
/// transaction, which turns the pipelined COMMIT into a rollback, and its
/// error is what the pipeline returns.
async fn locking_statements<'b>(
    client: &deadpool_postgres::Client,
    batches: &[&'b AppendBatch],
) -> Result<Planned<'b>, GroupError> {
    let db = |what: &'static str| move |err| GroupError::Db(what, err);
    let mut shard_ids: Vec<&str> = batches.iter().map(|b| b.shard.as_str()).collect();
    shard_ids.sort_unstable();
    shard_ids.dedup();
    let producer_ids: Vec<&str> = batches.iter().map(|b| b.producer.as_str()).collect();
    let producer_seqs = batches
        .iter()
        .map(|b| to_db("producer_seq", b.producer_seq.0))
        .collect::<Result<Vec<i64>, _>>()
        .map_err(GroupError::Store)?;
    let batch_shards: Vec<&str> = batches.iter().map(|b| b.shard.as_str()).collect();

    let lock = client.prepare_cached(SQL_LOCK_SHARDS).await.map_err(db("prepare the shard lock"))?;
    let records = client.prepare_cached(SQL_PRODUCER_BATCHES).await.map_err(db("prepare the producer lookup"))?;
    // Pipelined: the server runs a session's statements in order, so the
    // lookup runs after the locks are granted, on a fresh snapshot.
    let lock_params: [&(dyn ToSql + Sync); 1] = [&shard_ids];
    let record_params: [&(dyn ToSql + Sync); 3] = [&batch_shards, &producer_ids, &producer_seqs];
    let (_, locked, known) = tokio::try_join!(
        client.batch_execute("BEGIN"),
        client.query(&lock, &lock_params),
        client.query(&records, &record_params)
    )
    .map_err(db("lock shards and look up producer records"))?;

    let mut shards = HashMap::new();
    for row in &locked {
        let id: String = col(row, "shard_id").map_err(GroupError::Store)?;
        let id = ShardId::parse(id).map_err(|err| GroupError::Store(err.into()))?;
        shards.insert(id, LockedShard::from_row(row).map_err(GroupError::Store)?);
    }
    let mut records_by_batch = HashMap::new();
    for row in &known {
        let ord: i64 = col(row, "ord").map_err(GroupError::Store)?;
        records_by_batch.insert(ord as usize - 1, row);
    }

    let mut decisions = Vec::with_capacity(batches.len());
    let mut latest: HashMap<(&ShardId, &ProducerId), ProducerSeq> = HashMap::new();
    let mut planned: HashMap<(&ShardId, &ProducerId, ProducerSeq), usize> = HashMap::new();
    for (index, &batch) in batches.iter().enumerate() {
        let record = records_by_batch.get(&index);
        let key = (&batch.shard, &batch.producer);
        if let Some(row) = record {
            let stored_latest: Option<i64> = col(row, "latest_seq").map_err(GroupError::Store)?;
            if let Some(seq) = stored_latest {
                let seq = ProducerSeq(from_db(seq).map_err(GroupError::Store)?);
                latest.entry(key).or_insert(seq);
            }
        }
        let recorded = record_ack(record.copied()).map_err(GroupError::Store)?;
        let earlier = planned.get(&(&batch.shard, &batch.producer, batch.producer_seq)).copied();
        let decision = match (recorded, earlier) {
            // The same batch twice in one group: the later copy is answered
            // like the first (a retry racing its original).
            (None, Some(earlier)) if batches[earlier].events.len() == batch.events.len() => Decision::SameAs(earlier),
            (None, Some(earlier)) => Decision::Reject(count_mismatch(batch, batches[earlier].events.len())),
            (recorded, _) => plan(batch, shards.get_mut(&batch.shard), recorded, latest.get(&key).copied()),
        };
        if let Decision::Write { .. } = decision {
            latest.insert(key, batch.producer_seq);
            planned.insert((&batch.shard, &batch.producer, batch.producer_seq), index);
        }
        decisions.push(decision);
    }
    let planned = Planned { decisions, shards, latest };

    if !planned.decisions.iter().any(|d| matches!(d, Decision::Write { .. })) {
        // Nothing to write: end the transaction without a WAL flush.
        client.batch_execute("ROLLBACK").await.map_err(db("end the append transaction"))?;
        return Ok(planned);
    }

    let writes = Writes::of(batches, &planned.decisions).map_err(GroupError::Store)?;
    let insert_records =
        client.prepare_cached(SQL_INSERT_PRODUCER_BATCHES).await.map_err(db("prepare the record insert"))?;
    let advance = client.prepare_cached(SQL_ADVANCE_HEADS).await.map_err(db("prepare the head update"))?;
    let (event_params, record_params, head_params) =
        (writes.event_params(), writes.record_params(), writes.head_params());
    if writes.events.shard_no.len() >= defaults::COPY_MIN_EVENTS {
        copy_events(client, &writes.events).await?;
        tokio::try_join!(
            client.execute(&insert_records, &record_params),
            client.query_one(&advance, &head_params),
            client.batch_execute("COMMIT"),
        )
        .map_err(db("write and commit the append group"))?;
    } else {
        let insert_events = client.prepare_cached(SQL_INSERT_EVENTS).await.map_err(db("prepare the event insert"))?;
        tokio::try_join!(
            client.execute(&insert_events, &event_params),
            client.execute(&insert_records, &record_params),
            client.query_one(&advance, &head_params),
            client.batch_execute("COMMIT"),
        )
        .map_err(db("write and commit the append group"))?;
    }
    Ok(planned)
}

/// The predicted append transaction, in one round trip once its statements
/// are prepared: BEGIN, the shard locks (taken in shard order, as the
/// locking path takes them, so the two paths cannot deadlock), the fenced
/// head update, the writes and COMMIT, all pipelined. The head update's
/// fence checks epoch, lease and the head the prediction chained to, so a
/// wrong prediction aborts the transaction and writes nothing; a retry of a
/// written batch collides with its producer record and aborts it too.
async fn write_predicted(
    client: &deadpool_postgres::Client,
    batches: &[&AppendBatch],
    decisions: &[Decision],
) -> Result<(), GroupError> {
    let db = |what: &'static str| move |err| GroupError::Db(what, err);
    let writes = Writes::of(batches, decisions).map_err(GroupError::Store)?;
    let mut shard_ids: Vec<&str> = batches.iter().map(|b| b.shard.as_str()).collect();
    shard_ids.sort_unstable();
    shard_ids.dedup();
    let lock = client.prepare_cached(SQL_LOCK_SHARDS).await.map_err(db("prepare the shard lock"))?;
    let advance = client.prepare_cached(SQL_ADVANCE_HEADS).await.map_err(db("prepare the head update"))?;
    let insert_events = client.prepare_cached(SQL_INSERT_EVENTS).await.map_err(db("prepare the event insert"))?;
    let insert_records =
        client.prepare_cached(SQL_INSERT_PRODUCER_BATCHES).await.map_err(db("prepare the record insert"))?;
    let lock_params: [&(dyn ToSql + Sync); 1] = [&shard_ids];
    let (event_params, record_params, head_params) =
        (writes.event_params(), writes.record_params(), writes.head_params());
    tokio::try_join!(
        client.batch_execute("BEGIN"),
        client.query(&lock, &lock_params),
        client.query_one(&advance, &head_params),
        client.execute(&insert_events, &event_params),
        client.execute(&insert_records, &record_params),
        client.batch_execute("COMMIT"),
    )
    .map_err(db("write and commit a predicted append group"))?;
    Ok(())
}

/// A group decided before it is written, with the state it leaves behind.
struct Planned<'b> {
    decisions: Vec<Decision>,
    /// Every shard the group touches, as it is after the group's writes.
    shards: HashMap<ShardId, LockedShard>,
    /// Each producer's latest sequence after the group.
    latest: HashMap<(&'b ShardId, &'b ProducerId), ProducerSeq>,
}

/// What this committer last saw of the shards it writes: its prediction of
/// the next group. Only ever a guess that saves the locking round trip;
/// PostgreSQL's fence (advance_heads.sql) judges every predicted write, and
/// anything the guess cannot decide (an unknown shard or producer, a retry,
/// a gap, a stale epoch, a COPY-sized group) takes the locking path.
#[derive(Default)]
pub(crate) struct Prediction {
    shards: HashMap<ShardId, LockedShard>,
    /// Latest sequence by shard, then producer (nested, so a lookup
    /// borrows the batch's ids instead of cloning them).
    producers: HashMap<ShardId, HashMap<ProducerId, ProducerSeq>>,
    /// Producers remembered over all shards.
    producer_count: usize,
}

impl Prediction {
    /// Decides the group as the locking path would, if every batch is the
    /// next one of a known producer on a known, held shard at the batch's
    /// epoch.
    fn plan<'b>(&self, batches: &[&'b AppendBatch]) -> Option<Planned<'b>> {
        let events: usize = batches.iter().map(|b| b.events.len()).sum();
        if events >= defaults::COPY_MIN_EVENTS {
            return None;
        }
        let mut shards: HashMap<ShardId, LockedShard> = HashMap::new();
        let mut latest: HashMap<(&ShardId, &ProducerId), ProducerSeq> = HashMap::new();
        let mut decisions = Vec::with_capacity(batches.len());
        for &batch in batches {
            if !shards.contains_key(&batch.shard) {
                shards.insert(batch.shard.clone(), self.shards.get(&batch.shard)?.clone());
            }
            let key = (&batch.shard, &batch.producer);
            let last = match latest.get(&key) {
                Some(seq) => *seq,
                None => *self.producers.get(&batch.shard)?.get(&batch.producer)?,
            };
            if batch.producer_seq.0 != last.0.checked_add(1)? {
                return None;
            }
            let decision = plan(batch, shards.get_mut(&batch.shard), None, Some(last));
            if !matches!(decision, Decision::Write { .. }) {
                return None;
            }
            latest.insert(key, batch.producer_seq);
            decisions.push(decision);
        }
        Some(Planned { decisions, shards, latest })
    }

    /// Remembers the state a committed (or locked and read) group left.
    fn learn(&mut self, shards: HashMap<ShardId, LockedShard>, latest: HashMap<(&ShardId, &ProducerId), ProducerSeq>) {
        if self.shards.len() + shards.len() > defaults::PREDICTED_SHARDS
            || self.producer_count + latest.len() > defaults::PREDICTED_PRODUCERS
        {
            self.shards.clear();
            self.producers.clear();
            self.producer_count = 0;
        }
        for (id, shard) in shards {
            if shard.held {
                self.shards.insert(id, shard);
            } else {
                self.shards.remove(&id);
            }
        }
        for ((shard, producer), seq) in latest {
            let known = match self.producers.get_mut(shard) {
                Some(known) => known,
                None => self.producers.entry(shard.clone()).or_default(),
            };
            match known.get_mut(producer) {
                Some(latest) => *latest = seq,
                None => {
                    known.insert(producer.clone(), seq);
                    self.producer_count += 1;
                }
            }
        }
    }

    /// Drops what a failed group touched: its outcome is unknown.
    fn forget(&mut self, batches: &[&AppendBatch]) {
        for batch in batches {
            self.shards.remove(&batch.shard);
        }
    }
}

/// The column arrays and head updates of a group's writes.
struct Writes<'a> {
    events: EventRows<'a>,
    records: RecordRows<'a>,
    head_shards: Vec<i32>,
    head_epochs: Vec<i64>,
    head_prevs: Vec<i64>,
    head_sequences: Vec<i64>,
    head_hashes: Vec<&'a [u8]>,
    expected_heads: i64,
}

impl<'a> Writes<'a> {
    fn of(batches: &[&'a AppendBatch], decisions: &'a [Decision]) -> Result<Self, StoreError> {
        let mut events = EventRows::default();
        let mut records = RecordRows::default();
        // Per shard: epoch, the head the first write chained to, the last head.
        let mut heads: Vec<(i32, Epoch, Sequence, &LogEvent)> = Vec::new();
        // Where each shard's entry is in `heads` (a group spans up to
        // MAX_GROUP_BATCHES shards).
        let mut head_index: HashMap<i32, usize> = HashMap::new();
        for (batch, decision) in batches.iter().zip(decisions) {
            let Decision::Write { shard_no, epoch, events: written } = decision else { continue };
            for event in written {
                events.push(*shard_no, event)?;
            }
            let (first, last) = (&written[0], &written[written.len() - 1]);
            records.shard_no.push(*shard_no);
            records.producer_id.push(batch.producer.as_str());
            records.producer_seq.push(to_db("producer_seq", batch.producer_seq.0)?);
            records.first.push(to_db("sequence", first.sequence.0)?);
            records.last.push(to_db("sequence", last.sequence.0)?);
            records.last_hash.push(last.hash.as_bytes());
            match head_index.get(shard_no) {
                Some(&at) => heads[at].3 = last,
                None => {
                    head_index.insert(*shard_no, heads.len());
                    heads.push((*shard_no, *epoch, Sequence(first.sequence.0 - 1), last));
                }
            }
        }
        let mut writes = Writes {
            events,
            records,
            head_shards: Vec::with_capacity(heads.len()),
            head_epochs: Vec::with_capacity(heads.len()),
            head_prevs: Vec::with_capacity(heads.len()),
            head_sequences: Vec::with_capacity(heads.len()),
            head_hashes: Vec::with_capacity(heads.len()),
            expected_heads: heads.len() as i64,
        };
        for (shard_no, epoch, prev, last) in heads {
            writes.head_shards.push(shard_no);
            writes.head_epochs.push(to_db("epoch", epoch.0)?);
            writes.head_prevs.push(to_db("sequence", prev.0)?);
            writes.head_sequences.push(to_db("sequence", last.sequence.0)?);
            writes.head_hashes.push(&last.hash.as_bytes()[..]);
        }
        Ok(writes)
    }

    fn event_params(&self) -> [&(dyn ToSql + Sync); 6] {
        let rows = &self.events;
        [&rows.shard_no, &rows.sequence, &rows.epoch, &rows.recorded_at, &rows.body, &rows.hash]
    }

    fn record_params(&self) -> [&(dyn ToSql + Sync); 6] {
        let records = &self.records;
        [
            &records.shard_no,
            &records.producer_id,
            &records.producer_seq,
            &records.first,
            &records.last,
            &records.last_hash,
        ]
    }

    fn head_params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.head_shards,
            &self.head_epochs,
            &self.head_prevs,
            &self.head_sequences,
            &self.head_hashes,
            &defaults::NOTIFY_CHANNEL,
            &self.expected_heads,
        ]
    }
}

/// Writes a group's events with binary COPY (see copy_events.sql).
async fn copy_events(client: &deadpool_postgres::Client, rows: &EventRows<'_>) -> Result<(), GroupError> {
    let db = |what: &'static str| move |err| GroupError::Db(what, err);
    let sink = client.copy_in(SQL_COPY_EVENTS).await.map_err(db("start copying events"))?;
    let types = [Type::INT4, Type::INT8, Type::INT8, Type::TIMESTAMPTZ, Type::BYTEA, Type::BYTEA];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for i in 0..rows.shard_no.len() {
        let row: [&(dyn ToSql + Sync); 6] =
            [&rows.shard_no[i], &rows.sequence[i], &rows.epoch[i], &rows.recorded_at[i], &rows.body[i], &rows.hash[i]];
        writer.as_mut().write(&row).await.map_err(db("copy events"))?;
    }
    writer.finish().await.map_err(db("finish copying events"))?;
    Ok(())
}

/// Decides a batch that is not an in-group retry (see [`decide`]) and, when
/// it is written, chains its events and moves the locked shard's head.
fn plan(
    batch: &AppendBatch,
    shard: Option<&mut LockedShard>,
    recorded: Option<AppendAck>,
    latest: Option<ProducerSeq>,
) -> Decision {
    let view = shard.as_ref().map(|shard| ShardView { held: shard.held, epoch: shard.epoch, head: shard.head });
    match decide(batch, view, recorded, latest) {
        Err(refused) => Decision::Reject(refused),
        Ok(Verdict::Duplicate(ack)) => Decision::Duplicate(ack),
        Ok(Verdict::Write) => {
            let shard = shard.expect("decide writes only to a shard that exists");
            let events = event::chain(shard.head_hash, shard.head.next(), batch.epoch, &batch.events);
            let last = &events[events.len() - 1];
            shard.head = last.sequence;
            shard.head_hash = last.hash;
            Decision::Write { shard_no: shard.shard_no, epoch: batch.epoch, events }
        }
    }
}

/// The acknowledgement recorded for a batch, if the lookup found one.
fn record_ack(row: Option<&tokio_postgres::Row>) -> Result<Option<AppendAck>, StoreError> {
    let Some(row) = row else { return Ok(None) };
    let Some(first) = col::<Option<i64>>(row, "first_sequence")? else { return Ok(None) };
    let last: i64 = col(row, "last_sequence")?;
    Ok(Some(AppendAck {
        first: Sequence(from_db(first)?),
        last: Sequence(from_db(last)?),
        duplicate: true,
        last_hash: hash_col(row, "last_hash")?,
    }))
}

fn hash_col(row: &tokio_postgres::Row, name: &'static str) -> Result<ChainHash, StoreError> {
    stored_hash(col(row, name)?, name)
}

/// Column arrays of the events a group writes.
#[derive(Default)]
struct EventRows<'a> {
    shard_no: Vec<i32>,
    sequence: Vec<i64>,
    epoch: Vec<i64>,
    recorded_at: Vec<SystemTime>,
    body: Vec<&'a [u8]>,
    hash: Vec<&'a [u8]>,
}

impl<'a> EventRows<'a> {
    fn push(&mut self, shard_no: i32, event: &'a LogEvent) -> Result<(), StoreError> {
        self.shard_no.push(shard_no);
        self.sequence.push(to_db("sequence", event.sequence.0)?);
        self.epoch.push(to_db("epoch", event.epoch.0)?);
        self.recorded_at.push(event.recorded_at);
        self.body.push(&event.body);
        self.hash.push(event.hash.as_bytes());
        Ok(())
    }
}

/// Column arrays of the producer records a group writes.
#[derive(Default)]
struct RecordRows<'a> {
    shard_no: Vec<i32>,
    producer_id: Vec<&'a str>,
    producer_seq: Vec<i64>,
    first: Vec<i64>,
    last: Vec<i64>,
    last_hash: Vec<&'a [u8]>,
}
