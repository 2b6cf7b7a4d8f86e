//! The PostgreSQL projection: a table of every queue's current items,
//! kept exactly once (feature `postgres`).
//!
//! `omnirelay_projection_items` holds one row per item in a queue, pending,
//! leased or dead-lettered, with its payload, attempt, lease and last error;
//! an item leaves the table when it is completed or purged.
//! `omnirelay_projection_checkpoints` holds, per projection and shard, the
//! last sequence applied and its chain hash. Both are created when the sink
//! opens (`schema.sql`); the projection's name tells several projections in
//! one database apart.
//!
//! Exactly once: each batch is one transaction that locks the shard's
//! checkpoint row, skips the events at or below the stored sequence, applies
//! the rest and stores the batch's last sequence and hash. Its statements
//! are pipelined on the connection, in order; each run of whole-item writes
//! (a frame of enqueues) is one multi-row upsert over arrays, or a binary
//! `COPY` when it has [`defaults::PROJECTION_COPY_MIN_ROWS`] rows or more. A
//! batch the runtime hands over again after a failure of unknown outcome is
//! therefore applied once, and the projection is always the queue's state as
//! of its checkpoint. The table is the source of truth for the projection's
//! position; the hub checkpoint follows it (the runtime reads it back with
//! [`ReplicationSink::checkpoints`] before each hub commit). A batch that
//! starts past the event after the stored position (the database was
//! restored to an earlier point under a running sink) is refused, never
//! applied over the gap.
//!
//! Batches overlap. [`ReplicationSink::deliver`] starts a batch's
//! transaction on a task of its own, on a pooled connection, and returns;
//! up to [`defaults::PROJECTION_BATCHES_IN_FLIGHT`] (and the pool's size)
//! run at once, and `deliver` waits for the oldest before starting one
//! more. Batches of different shards (a pattern subscription interleaves
//! them) never wait for each other: their rows and positions are
//! disjoint, so a batch whose shard has none in flight is applied like the
//! first of a run (position locked first) beside the others. A batch that
//! follows one of its shard still in flight copies its leading runs
//! of new rows at once, while the batch before still writes and commits,
//! when none of their items is one the batch before writes: a copy only
//! inserts, so neither transaction waits for the other. The rest of the batch (updates, deletes,
//! its position) runs only once the batch before committed and the locked
//! checkpoint row holds that batch's last sequence. Otherwise (the batch
//! before failed or went unanswered, or another writer moved the position)
//! the transaction rolls back. Every batch is kept until its transaction is
//! answered; the ones that failed are applied again, in order, each alone
//! (position locked first) and committed, before anything after them. Each
//! transaction has a deadline ([`defaults::SINK_TIMEOUT`]). So the
//! exactly-once argument above is unchanged (every transaction applies
//! what lies after the position it locked), at most two batches are
//! delivered and not yet committed, and [`ReplicationSink::flush`] waits
//! for them. With a pool of one connection, each batch commits before the
//! next.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deadpool_postgres::Pool;
use omnirelay_proto::Timestamp;
use omnirelay_proto::replication::v1 as rpb;
use omnirelay_proto::replication::v1::replication_event::Event as Kind;
use omnirelay_proto::resourcelease::v1 as pb;
use tokio_postgres::types::ToSql;

use super::{Delivery, ReplicationSink, SinkBatch, SinkCheckpoint, SinkError, SinkEvent, SinkSnapshot, defaults};
use crate::ids::{Sequence, ShardId};

const SCHEMA: &str = include_str!("schema.sql");
const UPSERT_ITEM: &str = include_str!("upsert_item.sql");

pub mod lineage;

/// Keeps a table of current items per queue, exactly once. See the
/// [module docs](self).
pub struct ProjectionSink {
    pool: Pool,
    projection: String,
    /// Batches whose transactions run on tasks of their own, oldest first
    /// (at most [`defaults::PROJECTION_BATCHES_IN_FLIGHT`]; see the module
    /// docs).
    in_flight: std::collections::VecDeque<InFlight>,
    /// Batches whose transactions failed or went unanswered, oldest first:
    /// applied again, each alone and committed, before anything after them.
    unconfirmed: std::collections::VecDeque<SinkBatch>,
}

/// A batch whose transaction runs on a task of its own.
struct InFlight {
    /// The batch, kept to apply again if its transaction fails.
    batch: SinkBatch,
    /// The task: `Err` says why the transaction failed or that no answer
    /// came.
    done: tokio::task::JoinHandle<Result<(), String>>,
    /// Whether it committed, once known; the next batch's task waits on it.
    committed: tokio::sync::watch::Receiver<Option<bool>>,
}

impl std::fmt::Debug for ProjectionSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionSink").field("projection", &self.projection).finish_non_exhaustive()
    }
}

impl ProjectionSink {
    /// A projection named `projection` on `pool`'s database; creates its
    /// tables if missing.
    pub async fn open(pool: Pool, projection: impl Into<String>) -> Result<Self, SinkError> {
        let projection = projection.into();
        if projection.trim().is_empty() {
            return Err(SinkError::Config { field: "projection".into(), reason: "must not be empty".into() });
        }
        let client = pool.get().await.map_err(|err| pg("connect to the projection's database", err))?;
        client.batch_execute(SCHEMA).await.map_err(|err| pg("create the projection's tables", err))?;
        // The second connection a batch takes while the one before is in
        // flight is made now, not on the first delivery.
        if pool.status().max_size >= 2 {
            let _second = pool.get().await.map_err(|err| pg("connect to the projection's database", err))?;
        }
        drop(client);
        Ok(Self { pool, projection, in_flight: Default::default(), unconfirmed: Default::default() })
    }

    /// A pool of up to `size` plain (non-TLS) connections to `url`, each
    /// attempt to get or create one bounded by `timeout`.
    pub fn pool(url: &str, size: usize, timeout: Duration) -> Result<Pool, SinkError> {
        let config: tokio_postgres::Config = url.parse().map_err(|err| SinkError::Config {
            field: "database_url".into(),
            reason: format!("not a PostgreSQL URL: {err}"),
        })?;
        Self::pool_with_tls(config, tokio_postgres::NoTls, size, timeout)
    }

    /// A pool of up to `size` connections made by `config` through `tls`
    /// (for example tokio-postgres-rustls' connector, with the config's
    /// `sslmode` set to match), each attempt to get or create one bounded
    /// by `timeout`. The CLI's sinks build theirs with the hub's
    /// `--database-tls` modes.
    pub fn pool_with_tls<T>(
        config: tokio_postgres::Config,
        tls: T,
        size: usize,
        timeout: Duration,
    ) -> Result<Pool, SinkError>
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
    {
        let manager = deadpool_postgres::Manager::new(config, tls);
        Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|err| SinkError::Config { field: "database_url".into(), reason: err.to_string() })
    }
}

impl ReplicationSink for ProjectionSink {
    fn delivery(&self) -> Delivery {
        Delivery::ExactlyOnce
    }

    async fn checkpoints(&mut self) -> Result<Vec<SinkCheckpoint>, SinkError> {
        let client = self.pool.get().await.map_err(|err| pg("connect to the projection's database", err))?;
        // Read once per hub checkpoint commit: prepared once per pooled
        // connection.
        let statement = client
            .prepare_cached("SELECT shard, sequence, hash FROM omnirelay_projection_checkpoints WHERE projection = $1")
            .await
            .map_err(|err| pg("prepare a statement", err))?;
        let rows = client
            .query(&statement, &[&self.projection])
            .await
            .map_err(|err| pg("read the projection's checkpoints", err))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let hash: Vec<u8> = row.get(2);
                SinkCheckpoint {
                    shard: ShardId::from(row.get::<_, String>(0)),
                    sequence: Sequence::new(u64::try_from(row.get::<_, i64>(1)).unwrap_or(0)),
                    hash: (!hash.is_empty()).then(|| Bytes::from(hash)),
                }
            })
            .collect())
    }

    async fn deliver(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
        let depth = defaults::PROJECTION_BATCHES_IN_FLIGHT.min(self.pool.status().max_size).max(1);
        // Batches of other shards write other rows and another position:
        // they neither wait for this one nor it for them. A batch of this
        // shard still in flight is the one this batch follows (or, if it
        // does not end where this one starts, everything is settled first).
        let follows =
            self.newest_of(&batch.shard).is_none_or(|before| before.batch.last().sequence.after(1) == batch.first());
        if !follows {
            self.recover().await?;
        } else if self.in_flight.len() >= depth {
            self.settle_oldest().await;
        }
        if !self.unconfirmed.is_empty() {
            self.recover().await?;
        }
        let before = self
            .newest_of(&batch.shard)
            .map(|before| Before { committed: before.committed.clone(), batch: before.batch.clone() });
        let (report, committed) = tokio::sync::watch::channel(None);
        let done = tokio::spawn(transaction(self.pool.clone(), self.projection.clone(), batch.clone(), before, report));
        self.in_flight.push_back(InFlight { batch: batch.clone(), done, committed });
        Ok(())
    }

    /// Waits for every batch's transaction (and applies again those that
    /// failed): everything delivered is then committed.
    async fn flush(&mut self) -> Result<(), SinkError> {
        self.recover().await
    }

    async fn apply_snapshot(&mut self, snapshot: &SinkSnapshot) -> Result<(), SinkError> {
        self.recover().await?;
        let mut client = self.pool.get().await.map_err(|err| pg("connect to the projection's database", err))?;
        let tx = client.transaction().await.map_err(|err| pg("begin a transaction", err))?;
        let conn = Conn::of(&tx);
        let stored = lock_checkpoint(conn, &self.projection, &snapshot.shard).await?;
        if stored >= snapshot.sequence {
            return Ok(());
        }
        tx.execute(
            "DELETE FROM omnirelay_projection_items WHERE projection = $1 AND shard = $2",
            &[&self.projection, &snapshot.shard.as_str()],
        )
        .await
        .map_err(|err| pg("clear the shard's items", err))?;
        let upsert = tx.prepare_cached(UPSERT_ITEM).await.map_err(|err| pg("prepare a statement", err))?;
        let mut steps = Steps::new(&self.projection, &snapshot.shard, upsert);
        let sequence = snapshot.sequence.get();
        let items = snapshot.state.items.iter().filter_map(|queued| {
            let item = queued.item.as_ref()?;
            Some((item, if item.lease.is_some() { "leased" } else { "pending" }))
        });
        let dead = snapshot
            .state
            .dead_letters
            .iter()
            .filter_map(|dead| Some((dead.dead_letter.as_ref()?.item.as_ref()?, "dead_lettered")));
        for (item, state) in items.chain(dead) {
            steps.row(ItemRef { item, state, sequence })?;
        }
        steps.run(conn, "apply the snapshot").await?;
        store_checkpoint(conn, &self.projection, &snapshot.shard, snapshot.sequence, &snapshot.hash).await?;
        tx.commit().await.map_err(|err| pg("commit the snapshot", err))
    }
}

impl ProjectionSink {
    /// The newest batch in flight on `shard`.
    fn newest_of(&self, shard: &ShardId) -> Option<&InFlight> {
        self.in_flight.iter().rev().find(|in_flight| in_flight.batch.shard == *shard)
    }

    /// Waits for the oldest batch's transaction. When it failed, so do the
    /// batches after it on its shard (each waits for the one before and
    /// rolls back): every batch in flight is waited for, and those that
    /// failed are kept, in order, to apply again.
    async fn settle_oldest(&mut self) {
        let Some(oldest) = self.in_flight.front_mut() else { return };
        // Taken only once answered: dropped (a deadline) while waiting,
        // the batch stays kept.
        let outcome = joined(&mut oldest.done).await;
        let oldest = self.in_flight.pop_front().expect("still there");
        if let Err(reason) = outcome {
            self.unconfirmed(oldest.batch, &reason);
            while !self.in_flight.is_empty() {
                Box::pin(self.settle_oldest()).await;
            }
        }
    }

    /// Waits for every batch's transaction; the batches whose transactions
    /// failed or went unanswered are applied again, in order, each alone
    /// and committed before this returns.
    async fn recover(&mut self) -> Result<(), SinkError> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await;
        }
        while let Some(batch) = self.unconfirmed.front() {
            tokio::time::timeout(defaults::SINK_TIMEOUT, alone(&self.pool, &self.projection, batch)).await.map_err(
                |_| SinkError::Transient(format!("apply a batch: no answer within {:?}", defaults::SINK_TIMEOUT)),
            )??;
            self.unconfirmed.pop_front();
        }
        Ok(())
    }

    fn unconfirmed(&mut self, batch: SinkBatch, reason: &str) {
        tracing::warn!(
            projection = %self.projection,
            shard = %batch.shard,
            first = %batch.first(),
            last = %batch.last().sequence,
            error = %reason,
            "a batch's transaction failed or went unanswered; applying it again"
        );
        self.unconfirmed.push_back(batch);
    }
}

/// The batch in flight before a batch: its outcome, and the batch.
struct Before {
    committed: tokio::sync::watch::Receiver<Option<bool>>,
    batch: SinkBatch,
}

/// The items any event of `batch` writes.
fn touched(batch: &SinkBatch) -> std::collections::HashSet<&str> {
    let mut ids = std::collections::HashSet::with_capacity(batch.events.len());
    for event in batch.events.iter() {
        match &event.event.event {
            Some(Kind::Enqueued(e)) => ids.extend(e.item.as_ref().map(|item| item.item_id.as_str())),
            Some(Kind::Restored(e)) => ids.extend(e.items.iter().map(|item| item.item_id.as_str())),
            Some(Kind::Leased(e)) => _ = ids.insert(&e.item_id),
            Some(Kind::Heartbeat(e)) => _ = ids.insert(&e.item_id),
            Some(Kind::Completed(e)) => _ = ids.insert(&e.item_id),
            Some(Kind::Failed(e)) => _ = ids.insert(&e.item_id),
            Some(Kind::Requeued(e)) => _ = ids.insert(&e.item_id),
            Some(Kind::Expired(e)) => _ = ids.insert(&e.item_id),
            Some(Kind::DeadLettered(e)) => _ = ids.insert(&e.item_id),
            Some(Kind::Redriven(e)) => _ = ids.insert(&e.item_id),
            Some(Kind::DeadLettersPurged(rpb::DeadLettersPurged { item_ids }))
            | Some(Kind::DrainedPurged(rpb::DrainedPurged { item_ids })) => {
                ids.extend(item_ids.iter().map(String::as_str));
            }
            Some(Kind::DrainStarted(_))
            | Some(Kind::Drained(_))
            | Some(Kind::Resumed(_))
            | Some(Kind::BackpressureChanged(_))
            | None => {}
        }
    }
    ids
}

/// One batch's transaction, on a task of its own, with a deadline
/// ([`defaults::SINK_TIMEOUT`]); `report` says whether it committed.
///
/// The first batch of a run (`before` is `None`) locks the checkpoint row
/// first and writes what follows the stored position. A batch that follows
/// another still in flight copies its leading runs of new rows at once when
/// none of their items is one the batch before writes (a copy only inserts
/// rows, so the two transactions never wait for each other; with an item
/// in common the copy could take that row first and the batch before would
/// wait for this one, which waits for it), then waits for that batch's
/// outcome, locks the checkpoint row and, if it holds that batch's last
/// sequence, writes the rest. Otherwise (the batch before failed, or another writer moved the
/// position) it rolls back and fails, and the sink applies it again alone.
async fn transaction(
    pool: Pool,
    projection: String,
    batch: SinkBatch,
    before: Option<Before>,
    report: tokio::sync::watch::Sender<Option<bool>>,
) -> Result<(), String> {
    let work = async {
        let Some(Before { mut committed, batch: before }) = before else {
            return alone(&pool, &projection, &batch).await;
        };
        let open = Open::begin(&pool).await?;
        let conn = open.conn();
        let upsert = conn.prepare_cached(UPSERT_ITEM).await.map_err(|err| pg("prepare a statement", err))?;
        let mut steps = Steps::new(&projection, &batch.shard, upsert);
        for event in batch.events.iter() {
            effects(&mut steps, event)?;
        }
        steps.finish()?;
        if !steps.leading_copies_write_any(&touched(&before)) {
            steps.run_leading_copies(conn).await?;
        }
        let expected = before.last().sequence;
        let went_before = committed.wait_for(Option::is_some).await.is_ok_and(|outcome| *outcome == Some(true));
        if !went_before {
            open.rollback().await?;
            return Err(SinkError::Transient("the batch before was not committed".into()));
        }
        let stored = lock_checkpoint(conn, &projection, &batch.shard).await?;
        if stored != expected {
            open.rollback().await?;
            return Err(SinkError::Transient(format!(
                "the stored position is {stored}, not the batch before's last ({expected}): another writer moved it"
            )));
        }
        steps.run(conn, "apply an event").await?;
        let last = batch.last();
        store_checkpoint(conn, &projection, &batch.shard, last.sequence, &last.hash).await?;
        open.commit().await
    };
    let outcome = match tokio::time::timeout(defaults::SINK_TIMEOUT, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {:?}", defaults::SINK_TIMEOUT)),
    };
    let _ = report.send(Some(outcome.is_ok()));
    outcome
}

/// Applies what of `batch` follows the stored position in a transaction of
/// its own that locks the position first, and commits it.
async fn alone(pool: &Pool, projection: &str, batch: &SinkBatch) -> Result<(), SinkError> {
    let open = Open::begin(pool).await?;
    let stored = lock_checkpoint(open.conn(), projection, &batch.shard).await?;
    if write(open.conn(), projection, batch, stored).await? { open.commit().await } else { open.rollback().await }
}

/// Writes the events of `batch` after `stored` (the position locked in
/// this transaction) and stores the batch's last sequence; false when none
/// is after it. A batch that starts past the event after `stored` would
/// skip events: refused.
async fn write(conn: Conn<'_>, projection: &str, batch: &SinkBatch, stored: Sequence) -> Result<bool, SinkError> {
    if batch.first() > stored.after(1) {
        return Err(SinkError::Fatal(format!(
            "shard {}: the projection's stored position is {stored} but the batch starts at {}: the events between \
             would be skipped (was the projection's database restored to an earlier point?); restart the sink to \
             resume from its stored position",
            batch.shard,
            batch.first()
        )));
    }
    let fresh: Vec<&SinkEvent> = batch.events.iter().filter(|e| e.sequence > stored).collect();
    let Some(last) = fresh.last() else { return Ok(false) };
    let upsert = conn.prepare_cached(UPSERT_ITEM).await.map_err(|err| pg("prepare a statement", err))?;
    let mut steps = Steps::new(projection, &batch.shard, upsert);
    for event in &fresh {
        effects(&mut steps, event)?;
    }
    steps.run(conn, "apply an event").await?;
    store_checkpoint(conn, projection, &batch.shard, last.sequence, &last.hash).await?;
    Ok(true)
}

/// A batch task's answer.
async fn joined(done: &mut tokio::task::JoinHandle<Result<(), String>>) -> Result<(), String> {
    done.await.map_err(|err| format!("the batch's task failed: {err}"))?
}

/// A connection with its statement cache: a pool transaction's, or a
/// pooled client's inside a transaction begun with `BEGIN` ([`Open`]).
#[derive(Clone, Copy)]
pub(crate) struct Conn<'a> {
    client: &'a tokio_postgres::Client,
    cache: &'a deadpool_postgres::StatementCache,
}

impl<'a> Conn<'a> {
    pub(crate) fn of(tx: &'a deadpool_postgres::Transaction<'_>) -> Self {
        Self { client: tx.client(), cache: &tx.statement_cache }
    }

    fn of_client(client: &'a deadpool_postgres::ClientWrapper) -> Self {
        Self { client, cache: &client.statement_cache }
    }

    async fn prepare_cached(&self, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        self.cache.prepare(self.client, sql).await
    }
}

impl std::ops::Deref for Conn<'_> {
    type Target = tokio_postgres::Client;

    fn deref(&self) -> &tokio_postgres::Client {
        self.client
    }
}

/// A pooled connection inside a transaction begun with `BEGIN`, owned (a
/// batch's task holds it), unlike a pool transaction. Dropped before
/// [`commit`](Open::commit) or [`rollback`](Open::rollback) answered (a
/// failure, a call dropped at its deadline), the connection leaves the pool
/// and closes, which rolls the transaction back: no connection goes back
/// to the pool inside a transaction.
struct Open(Option<deadpool_postgres::Client>);

impl Open {
    async fn begin(pool: &Pool) -> Result<Self, SinkError> {
        let client = pool.get().await.map_err(|err| pg("connect to the projection's database", err))?;
        let open = Open(Some(client));
        open.conn().batch_execute("BEGIN").await.map_err(|err| pg("begin a transaction", err))?;
        Ok(open)
    }

    fn conn(&self) -> Conn<'_> {
        Conn::of_client(self.0.as_ref().expect("open until it ends"))
    }

    async fn rollback(mut self) -> Result<(), SinkError> {
        self.conn().batch_execute("ROLLBACK").await.map_err(|err| pg("roll back", err))?;
        self.0.take();
        Ok(())
    }

    async fn commit(mut self) -> Result<(), SinkError> {
        self.conn().batch_execute("COMMIT").await.map_err(|err| pg("commit a batch", err))?;
        self.0.take();
        Ok(())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Locks the shard's checkpoint row (creating it at 0) and returns its
/// sequence.
pub(crate) async fn lock_checkpoint(conn: Conn<'_>, projection: &str, shard: &ShardId) -> Result<Sequence, SinkError> {
    let create = conn
        .prepare_cached(
            "INSERT INTO omnirelay_projection_checkpoints (projection, shard, sequence, hash) VALUES ($1, $2, 0, '') \
             ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(|err| pg("prepare a statement", err))?;
    let lock = conn
        .prepare_cached(
            "SELECT sequence FROM omnirelay_projection_checkpoints WHERE projection = $1 AND shard = $2 FOR UPDATE",
        )
        .await
        .map_err(|err| pg("prepare a statement", err))?;
    let key: [&(dyn ToSql + Sync); 2] = [&projection, &shard.as_str()];
    // Both sent at once (the connection pipelines them, in order).
    let (created, locked) = futures_util::future::join(conn.execute(&create, &key), conn.query_one(&lock, &key)).await;
    created.map_err(|err| pg("create the checkpoint row", err))?;
    let row = locked.map_err(|err| pg("lock the checkpoint row", err))?;
    Ok(Sequence::new(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)))
}

pub(crate) async fn store_checkpoint(
    conn: Conn<'_>,
    projection: &str,
    shard: &ShardId,
    sequence: Sequence,
    hash: &Bytes,
) -> Result<(), SinkError> {
    let store = conn
        .prepare_cached(
            "UPDATE omnirelay_projection_checkpoints SET sequence = $3, hash = $4, updated_at = now() \
             WHERE projection = $1 AND shard = $2",
        )
        .await
        .map_err(|err| pg("prepare a statement", err))?;
    conn.execute(&store, &[&projection, &shard.as_str(), &sequence_param(sequence), &hash.as_ref()])
        .await
        .map_err(|err| pg("store the checkpoint", err))?;
    Ok(())
}

/// One statement of a batch, with its parameters owned.
pub(crate) struct Statement {
    pub(crate) sql: StatementSql,
    pub(crate) params: Vec<Box<dyn ToSql + Sync + Send>>,
}

pub(crate) enum StatementSql {
    Prepared(tokio_postgres::Statement),
    Text(&'static str),
}

impl Statement {
    /// Runs the statement (prepared first by [`pipeline`]).
    async fn run(&self, conn: Conn<'_>) -> Result<u64, tokio_postgres::Error> {
        let params: Vec<&(dyn ToSql + Sync)> = self.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        match &self.sql {
            StatementSql::Prepared(statement) => conn.execute(statement, &params).await,
            StatementSql::Text(sql) => conn.execute(*sql, &params).await,
        }
    }
}

/// Runs `statements` in order, pipelined on the transaction's connection.
/// Every statement is prepared first (from the connection's cache after the
/// first batch): an unprepared one takes a round trip to prepare before it
/// is sent, and the statements after it would overtake it.
pub(crate) async fn pipeline(conn: Conn<'_>, mut statements: Vec<Statement>, what: &str) -> Result<(), SinkError> {
    for statement in &mut statements {
        if let StatementSql::Text(sql) = statement.sql {
            let prepared = conn.prepare_cached(sql).await.map_err(|err| pg("prepare a statement", err))?;
            statement.sql = StatementSql::Prepared(prepared);
        }
    }
    for result in futures_util::future::join_all(statements.iter().map(|s| s.run(conn))).await {
        result.map_err(|err| pg(what, err))?;
    }
    Ok(())
}

/// Adds the effects of one event on the items table to `steps`, in order:
/// whole rows written (collected into runs, see [`Steps`]) or statements
/// of their own.
fn effects<'a>(steps: &mut Steps<'a>, event: &'a SinkEvent) -> Result<(), SinkError> {
    let (projection, shard) = (steps.projection, steps.shard);
    let seq = event.sequence.get();
    let key = |id: &str| -> Vec<Box<dyn ToSql + Sync + Send>> {
        vec![Box::new(projection.to_string()), Box::new(shard.to_string()), Box::new(id.to_string())]
    };
    let update = |sql: &'static str, id: &str, mut rest: Vec<Box<dyn ToSql + Sync + Send>>| {
        let mut params = key(id);
        params.append(&mut rest);
        Statement { sql: StatementSql::Text(sql), params }
    };
    let seq_param = || -> Box<dyn ToSql + Sync + Send> { Box::new(sequence_param(Sequence::new(seq))) };
    let statements = match &event.event.event {
        Some(Kind::Enqueued(e)) => {
            if let Some(item) = &e.item {
                steps.row(ItemRef { item, state: "pending", sequence: seq })?;
            }
            return Ok(());
        }
        Some(Kind::Restored(e)) => {
            for item in &e.items {
                steps.row(ItemRef { item, state: "pending", sequence: seq })?;
            }
            return Ok(());
        }
        Some(Kind::Leased(e)) => vec![update(
            "UPDATE omnirelay_projection_items SET state = 'leased', attempt = $4, lease_id = $5, owner = $6, \
             fencing_token = $7, lease_expires_at = $8, updated_sequence = $7 \
             WHERE projection = $1 AND shard = $2 AND item_id = $3",
            &e.item_id,
            vec![
                Box::new(i32::try_from(e.attempt).unwrap_or(i32::MAX)),
                Box::new(e.lease_id.clone()),
                Box::new(e.owner.clone()),
                seq_param(),
                Box::new(time(e.expires_at.as_ref())),
            ],
        )],
        Some(Kind::Heartbeat(e)) => vec![update(
            "UPDATE omnirelay_projection_items SET lease_expires_at = $4, updated_sequence = $5 \
             WHERE projection = $1 AND shard = $2 AND item_id = $3",
            &e.item_id,
            vec![Box::new(time(e.expires_at.as_ref())), seq_param()],
        )],
        Some(Kind::Completed(e)) => vec![update(
            "DELETE FROM omnirelay_projection_items WHERE projection = $1 AND shard = $2 AND item_id = $3",
            &e.item_id,
            Vec::new(),
        )],
        Some(Kind::Failed(e)) => vec![update(
            "UPDATE omnirelay_projection_items SET last_error = $4, updated_sequence = $5 \
             WHERE projection = $1 AND shard = $2 AND item_id = $3",
            &e.item_id,
            vec![Box::new(e.error.clone()), seq_param()],
        )],
        Some(Kind::Requeued(e)) => vec![update(
            "UPDATE omnirelay_projection_items SET state = 'pending', not_before = $4, owner = NULL, lease_id = NULL, \
             lease_expires_at = NULL, updated_sequence = $5 WHERE projection = $1 AND shard = $2 AND item_id = $3",
            &e.item_id,
            vec![Box::new(time(e.not_before.as_ref())), seq_param()],
        )],
        Some(Kind::DeadLettered(e)) => vec![update(
            "UPDATE omnirelay_projection_items SET state = 'dead_lettered', owner = NULL, lease_id = NULL, \
             lease_expires_at = NULL, updated_sequence = $4 WHERE projection = $1 AND shard = $2 AND item_id = $3",
            &e.item_id,
            vec![seq_param()],
        )],
        Some(Kind::Redriven(e)) => vec![update(
            "UPDATE omnirelay_projection_items SET state = 'pending', attempt = 0, not_before = $4, \
             last_error = '', updated_sequence = $5 WHERE projection = $1 AND shard = $2 AND item_id = $3",
            &e.item_id,
            vec![Box::new(time(e.not_before.as_ref())), seq_param()],
        )],
        Some(Kind::DeadLettersPurged(rpb::DeadLettersPurged { item_ids }))
        | Some(Kind::DrainedPurged(rpb::DrainedPurged { item_ids })) => vec![Statement {
            sql: StatementSql::Text(
                "DELETE FROM omnirelay_projection_items WHERE projection = $1 AND shard = $2 AND item_id = ANY($3)",
            ),
            params: vec![Box::new(projection.to_string()), Box::new(shard.to_string()), Box::new(item_ids.clone())],
        }],
        // The lease's end is recorded by the Requeued or DeadLettered event
        // that follows; the rest change no item.
        Some(Kind::Expired(_))
        | Some(Kind::DrainStarted(_))
        | Some(Kind::Drained(_))
        | Some(Kind::Resumed(_))
        | Some(Kind::BackpressureChanged(_))
        | None => Vec::new(),
    };
    for statement in statements {
        steps.statement(statement)?;
    }
    Ok(())
}

/// An item's whole row, as [`UPSERT_ITEM`] writes it.
struct ItemRow {
    item_id: String,
    state: &'static str,
    resource_type: String,
    resource_id: String,
    partition_key: String,
    request_id: String,
    attributes: String,
    body: Vec<u8>,
    priority: i32,
    attempt: i32,
    enqueued_at: Option<SystemTime>,
    not_before: Option<SystemTime>,
    owner: Option<String>,
    lease_id: Option<String>,
    fencing_token: Option<i64>,
    lease_expires_at: Option<SystemTime>,
    last_error: String,
    updated_sequence: i64,
}

/// The row of `item` in `state`, written by the event at `sequence`.
fn item_row(item: &pb::WorkItem, state: &'static str, sequence: u64) -> Result<ItemRow, SinkError> {
    let payload = item.payload.clone().unwrap_or_default();
    let attributes = serde_json::to_string(&payload.attributes)
        .map_err(|err| SinkError::Fatal(format!("render the attributes of item {}: {err}", item.item_id)))?;
    let lease = item.lease.as_ref();
    Ok(ItemRow {
        item_id: item.item_id.clone(),
        state,
        resource_type: payload.resource_type,
        resource_id: payload.resource_id,
        partition_key: payload.partition_key,
        request_id: payload.request_id,
        attributes,
        body: payload.body.to_vec(),
        priority: item.priority,
        attempt: i32::try_from(item.attempt).unwrap_or(i32::MAX),
        enqueued_at: time(item.enqueued_at.as_ref()),
        not_before: time(item.not_before.as_ref()),
        owner: lease.map(|l| l.owner.clone()),
        lease_id: lease.map(|l| l.lease_id.clone()),
        fencing_token: lease.map(|l| i64::try_from(l.fencing_token).unwrap_or(i64::MAX)),
        lease_expires_at: lease.and_then(|l| time(l.expires_at.as_ref())),
        last_error: item.last_error.clone(),
        updated_sequence: sequence_param(Sequence::new(sequence)),
    })
}

/// Item rows collected column by column for one [`UPSERT_ITEM`] statement:
/// a run of enqueues is one statement, not one per event. Each item at
/// most once ([`Steps`] starts a new run for a second write).
#[derive(Default)]
struct ItemRows {
    projection: String,
    shard: String,
    item_id: Vec<String>,
    state: Vec<&'static str>,
    resource_type: Vec<String>,
    resource_id: Vec<String>,
    partition_key: Vec<String>,
    request_id: Vec<String>,
    attributes: Vec<String>,
    body: Vec<Vec<u8>>,
    priority: Vec<i32>,
    attempt: Vec<i32>,
    enqueued_at: Vec<Option<SystemTime>>,
    not_before: Vec<Option<SystemTime>>,
    owner: Vec<Option<String>>,
    lease_id: Vec<Option<String>>,
    fencing_token: Vec<Option<i64>>,
    lease_expires_at: Vec<Option<SystemTime>>,
    last_error: Vec<String>,
    updated_sequence: Vec<i64>,
}

impl ItemRows {
    fn new(projection: &str, shard: &ShardId) -> Self {
        Self { projection: projection.to_string(), shard: shard.to_string(), ..Self::default() }
    }

    fn push(&mut self, row: ItemRow) {
        self.item_id.push(row.item_id);
        self.state.push(row.state);
        self.resource_type.push(row.resource_type);
        self.resource_id.push(row.resource_id);
        self.partition_key.push(row.partition_key);
        self.request_id.push(row.request_id);
        self.attributes.push(row.attributes);
        self.body.push(row.body);
        self.priority.push(row.priority);
        self.attempt.push(row.attempt);
        self.enqueued_at.push(row.enqueued_at);
        self.not_before.push(row.not_before);
        self.owner.push(row.owner);
        self.lease_id.push(row.lease_id);
        self.fencing_token.push(row.fencing_token);
        self.lease_expires_at.push(row.lease_expires_at);
        self.last_error.push(row.last_error);
        self.updated_sequence.push(row.updated_sequence);
    }

    /// The statement writing the rows so far; leaves this empty.
    fn take(&mut self, upsert: &tokio_postgres::Statement) -> Statement {
        let rows = std::mem::replace(
            self,
            Self { projection: self.projection.clone(), shard: self.shard.clone(), ..Self::default() },
        );
        let params: Vec<Box<dyn ToSql + Sync + Send>> = vec![
            Box::new(rows.projection),
            Box::new(rows.shard),
            Box::new(rows.item_id),
            Box::new(rows.state),
            Box::new(rows.resource_type),
            Box::new(rows.resource_id),
            Box::new(rows.partition_key),
            Box::new(rows.request_id),
            Box::new(rows.attributes),
            Box::new(rows.body),
            Box::new(rows.priority),
            Box::new(rows.attempt),
            Box::new(rows.enqueued_at),
            Box::new(rows.not_before),
            Box::new(rows.owner),
            Box::new(rows.lease_id),
            Box::new(rows.fencing_token),
            Box::new(rows.lease_expires_at),
            Box::new(rows.last_error),
            Box::new(rows.updated_sequence),
        ];
        Statement { sql: StatementSql::Prepared(upsert.clone()), params }
    }
}

/// An item's whole row, borrowed from the event (or snapshot) that writes
/// it.
#[derive(Clone, Copy)]
struct ItemRef<'a> {
    item: &'a pb::WorkItem,
    state: &'static str,
    sequence: u64,
}

/// A batch's writes in order: statements, pipelined, and runs of whole-item
/// rows between them. A run holds each item at most once (a second write of
/// an item starts a new run). A run of
/// [`defaults::PROJECTION_COPY_MIN_ROWS`] rows or more is
/// written with binary `COPY` (see [`copy_rows`]), a shorter one by one
/// [`UPSERT_ITEM`] over arrays, pipelined with the statements around it.
struct Steps<'a> {
    projection: &'a str,
    shard: &'a ShardId,
    upsert: tokio_postgres::Statement,
    steps: Vec<Step<'a>>,
    /// Statements since the last `COPY` run.
    statements: Vec<Statement>,
    /// The run being collected, and its items.
    run: Vec<ItemRef<'a>>,
    ids: std::collections::HashSet<&'a str>,
}

enum Step<'a> {
    Pipelined(Vec<Statement>),
    Copy(Vec<ItemRef<'a>>),
}

impl<'a> Steps<'a> {
    fn new(projection: &'a str, shard: &'a ShardId, upsert: tokio_postgres::Statement) -> Self {
        Self {
            projection,
            shard,
            upsert,
            steps: Vec::new(),
            statements: Vec::new(),
            run: Vec::new(),
            ids: std::collections::HashSet::new(),
        }
    }

    /// Writes `row`'s item whole.
    fn row(&mut self, row: ItemRef<'a>) -> Result<(), SinkError> {
        if self.ids.contains(row.item.item_id.as_str()) {
            self.end_run()?;
        }
        self.ids.insert(&row.item.item_id);
        self.run.push(row);
        Ok(())
    }

    /// Runs `statement` after what came before it.
    fn statement(&mut self, statement: Statement) -> Result<(), SinkError> {
        self.end_run()?;
        self.statements.push(statement);
        Ok(())
    }

    fn end_run(&mut self) -> Result<(), SinkError> {
        self.ids.clear();
        let run = std::mem::take(&mut self.run);
        if run.is_empty() {
            return Ok(());
        }
        if run.len() >= defaults::PROJECTION_COPY_MIN_ROWS {
            let statements = std::mem::take(&mut self.statements);
            if !statements.is_empty() {
                self.steps.push(Step::Pipelined(statements));
            }
            self.steps.push(Step::Copy(run));
        } else {
            let upsert = upsert_rows(self.projection, self.shard, &run, &self.upsert)?;
            self.statements.push(upsert);
        }
        Ok(())
    }

    /// Ends the batch: what is collected becomes the last steps.
    fn finish(&mut self) -> Result<(), SinkError> {
        self.end_run()?;
        let statements = std::mem::take(&mut self.statements);
        if !statements.is_empty() {
            self.steps.push(Step::Pipelined(statements));
        }
        Ok(())
    }

    /// Whether a whole-row `COPY` run before the first statement writes one
    /// of `items`.
    fn leading_copies_write_any(&self, items: &std::collections::HashSet<&str>) -> bool {
        self.steps[..self.leading_copies()]
            .iter()
            .flat_map(|step| match step {
                Step::Copy(rows) => rows.as_slice(),
                Step::Pipelined(_) => &[],
            })
            .any(|row| items.contains(row.item.item_id.as_str()))
    }

    /// How many steps before the first statement are `COPY` runs.
    fn leading_copies(&self) -> usize {
        self.steps.iter().take_while(|step| matches!(step, Step::Copy(_))).count()
    }

    /// Runs the steps before the first statement: whole-row `COPY` runs
    /// only, which insert new rows (see [`transaction`]).
    async fn run_leading_copies(&mut self, conn: Conn<'_>) -> Result<(), SinkError> {
        self.finish()?;
        let leading = self.leading_copies();
        for step in self.steps.drain(..leading) {
            if let Step::Copy(rows) = step {
                copy_rows(conn, self.projection, self.shard, &rows, &self.upsert).await?;
            }
        }
        Ok(())
    }

    /// Runs every step (left) in order on `conn`.
    async fn run(mut self, conn: Conn<'_>, what: &str) -> Result<(), SinkError> {
        self.finish()?;
        for step in self.steps {
            match step {
                Step::Pipelined(statements) => pipeline(conn, statements, what).await?,
                Step::Copy(rows) => copy_rows(conn, self.projection, self.shard, &rows, &self.upsert).await?,
            }
        }
        Ok(())
    }
}

/// One [`UPSERT_ITEM`] statement writing `rows`.
fn upsert_rows(
    projection: &str,
    shard: &ShardId,
    rows: &[ItemRef<'_>],
    upsert: &tokio_postgres::Statement,
) -> Result<Statement, SinkError> {
    let mut collected = ItemRows::new(projection, shard);
    for row in rows {
        collected.push(item_row(row.item, row.state, row.sequence)?);
    }
    Ok(collected.take(upsert))
}

const COPY_ITEMS: &str = include_str!("copy_items.sql");

/// Writes a run of rows (each item once) with binary `COPY` under a
/// savepoint. When an item of the run is already in the table, the copy
/// fails on the primary key; the savepoint is rolled back and the run
/// written by one upsert instead, in the same transaction, so the batch
/// still applies once and in order.
async fn copy_rows(
    conn: Conn<'_>,
    projection: &str,
    shard: &ShardId,
    rows: &[ItemRef<'_>],
    upsert: &tokio_postgres::Statement,
) -> Result<(), SinkError> {
    // The savepoint and the copy are sent at once (a failed savepoint
    // fails the copy too).
    let (saved, copied) = futures_util::future::join(
        conn.batch_execute("SAVEPOINT omnirelay_copy_items"),
        copy(conn, projection, shard, rows),
    )
    .await;
    saved.map_err(|err| pg("set a savepoint", err))?;
    match copied {
        Ok(()) => {
            conn.batch_execute("RELEASE SAVEPOINT omnirelay_copy_items")
                .await
                .map_err(|err| pg("release a savepoint", err))?;
            Ok(())
        }
        Err(err) if err.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            conn.batch_execute("ROLLBACK TO SAVEPOINT omnirelay_copy_items")
                .await
                .map_err(|err| pg("roll back to a savepoint", err))?;
            let statement = upsert_rows(projection, shard, rows, upsert)?;
            pipeline(conn, vec![statement], "write items").await
        }
        Err(err) => Err(pg("copy items", err)),
    }
}

async fn copy(
    conn: Conn<'_>,
    projection: &str,
    shard: &ShardId,
    rows: &[ItemRef<'_>],
) -> Result<(), tokio_postgres::Error> {
    use tokio_postgres::types::Type;
    let statement = conn.prepare_cached(COPY_ITEMS).await?;
    let sink = conn.copy_in(&statement).await?;
    let types = [
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::JSONB,
        Type::BYTEA,
        Type::INT4,
        Type::INT4,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::INT8,
    ];
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    let shard = shard.as_str();
    for row in rows {
        let item = row.item;
        let payload = item.payload.as_ref();
        let text = |field: fn(&pb::ItemPayload) -> &str| payload.map_or("", field);
        let attributes = match payload {
            Some(payload) if !payload.attributes.is_empty() => Jsonb::Owned(
                serde_json::to_string(&payload.attributes).expect("a map of strings should render as JSON"),
            ),
            _ => Jsonb::Borrowed("{}"),
        };
        let lease = item.lease.as_ref();
        let values: [&(dyn ToSql + Sync); 20] = [
            &projection,
            &shard,
            &item.item_id.as_str(),
            &row.state,
            &text(|p| &p.resource_type),
            &text(|p| &p.resource_id),
            &text(|p| &p.partition_key),
            &text(|p| &p.request_id),
            &attributes,
            &payload.map_or(&[][..], |p| p.body.as_ref()),
            &item.priority,
            &i32::try_from(item.attempt).unwrap_or(i32::MAX),
            &time(item.enqueued_at.as_ref()),
            &time(item.not_before.as_ref()),
            &lease.map(|l| l.owner.as_str()),
            &lease.map(|l| l.lease_id.as_str()),
            &lease.map(|l| i64::try_from(l.fencing_token).unwrap_or(i64::MAX)),
            &lease.and_then(|l| time(l.expires_at.as_ref())),
            &item.last_error.as_str(),
            &sequence_param(Sequence::new(row.sequence)),
        ];
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// A JSON text sent as `jsonb` (its binary form: a version byte, then the
/// text).
#[derive(Debug)]
enum Jsonb<'a> {
    Borrowed(&'a str),
    Owned(String),
}

impl ToSql for Jsonb<'_> {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut as _;
        let text = match self {
            Jsonb::Borrowed(text) => text,
            Jsonb::Owned(text) => text.as_str(),
        };
        // jsonb's binary format, version 1.
        out.put_u8(1);
        out.put_slice(text.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::JSONB
    }

    tokio_postgres::types::to_sql_checked!();
}

pub(crate) fn time(at: Option<&Timestamp>) -> Option<SystemTime> {
    let at = at?;
    let seconds = u64::try_from(at.seconds).ok()?;
    let nanos = u32::try_from(at.nanos).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

pub(crate) fn sequence_param(sequence: Sequence) -> i64 {
    i64::try_from(sequence.get()).unwrap_or(i64::MAX)
}

/// PostgreSQL failures, classified once by SQLSTATE: a connection that is
/// gone or a serialization failure or deadlock may pass on retry (the
/// batch is retried whole; the checkpoint row makes that safe); a refused
/// statement (a constraint, a missing table, a permission) will not.
pub(crate) fn pg(what: &str, err: impl Into<PgFailure>) -> SinkError {
    match err.into() {
        PgFailure::Pool(message) => SinkError::Transient(format!("{what}: {message}")),
        PgFailure::Db(err) => {
            let state = err.code().map(|c| c.code().to_string());
            let transient = match state.as_deref() {
                None => true, // no SQLSTATE: the connection failed
                Some(code) => {
                    code.starts_with("08") // connection exception
                        || code.starts_with("53") // insufficient resources
                        || code.starts_with("57") // operator intervention (shutdown, cancel)
                        || code == "40001" // serialization failure
                        || code == "40P01" // deadlock
                }
            };
            let message = match err.as_db_error() {
                Some(db) => format!("{what}: {} ({})", db.message(), db.code().code()),
                None => format!("{what}: {err}"),
            };
            if transient { SinkError::Transient(message) } else { SinkError::Fatal(message) }
        }
    }
}

/// A failure of the pool or of the database.
pub(crate) enum PgFailure {
    Pool(String),
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for PgFailure {
    fn from(err: tokio_postgres::Error) -> Self {
        PgFailure::Db(err)
    }
}

impl From<deadpool_postgres::PoolError> for PgFailure {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(err) => PgFailure::Db(err),
            other => PgFailure::Pool(other.to_string()),
        }
    }
}
