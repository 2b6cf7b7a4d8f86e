//! The embedded SQLite log store: the default when no database URL is
//! configured, so `cargo run -p omnirelay-hub` needs nothing installed.
//!
//! **What is stored**: the same as in PostgreSQL (see
//! [`super::postgres`]): shards with their lease, head and low-water mark,
//! hash-chained events, producer batch records, checkpoints and snapshots,
//! in one database file (schema in `V0001__log.sql` and later beside this file,
//! versioned with `PRAGMA user_version`, applied at open).
//!
//! **Source of truth**: the file, alone. It is durable before an append is
//! acknowledged (WAL journal, `synchronous = FULL`).
//!
//! **One replica only**: the store opens the file in SQLite's exclusive
//! locking mode and takes the write lock at once, holding it until it
//! closes. A second store on the same file, in this process or another,
//! fails to open with [`SqliteOpenError::Locked`]; several replicas need
//! PostgreSQL.
//!
//! **Threading**: one dedicated thread owns the connection and runs every
//! operation, in the order the calls were made; async callers send it work
//! over a channel and await the answer, so no SQLite call ever runs on the
//! async runtime. Appends queued behind each other are group-committed: the
//! thread takes every append waiting in its queue (up to the group limits)
//! into one transaction, each batch in a savepoint so one failing batch
//! leaves the others intact, and one fsync serves them all.
//!
//! **Clock**: lease expiry and checkpoint ages are judged by this process's
//! clock, the only clock a single-replica store has.
//!
//! **Layout**: this module is the store handle; each [`LogStore`] method
//! sends a plain function on the connection to the thread (`thread`, which
//! also holds the append path). The functions are grouped by concern, each
//! module with its statements from `sql/`: `lease`, `reads` (shards, event
//! pages, sequence by time), `checkpoint`, `snapshot` and `retention`;
//! `rows` is what they share (failure mapping, the shard row, stored
//! values) and `open` the file's locking, journal and migrations.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rusqlite::Connection;
use tokio::sync::{broadcast, oneshot};

mod checkpoint;
mod lease;
mod open;
mod reads;
mod retention;
mod rows;
mod snapshot;
mod thread;

pub use self::open::SqliteOpenError;
use self::open::open_connection;
use self::rows::{read_state, sql_error};
use self::thread::{Command, Pending, StoreThread};
use crate::defaults;
use crate::log::event::ChainHash;
use crate::log::ids::{Epoch, OwnerId, Sequence, ShardId, SubscriberId};
use crate::security::principal::Principal;
use crate::store::{
    AppendAck, AppendBatch, Checkpoint, CheckpointCommit, EventPage, LeaseGrant, LogChange, LogStore, RetentionOutcome,
    RetentionPolicy, ShardLease, ShardState, Snapshot, StoreError, StoreFuture, admit, check_batch,
};
use crate::telemetry::{self, DbOperation};

// The readiness probe's statement (the operations' live beside them).
const SQL_PROBE: &str = include_str!("sql/probe.sql");

/// The embedded SQLite [`LogStore`]. Cheap to clone; clones share the
/// connection thread.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` once closed: the thread finishes its queue and exits.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    changes: broadcast::Sender<LogChange>,
    pending_events: Arc<AtomicUsize>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `path`, takes its exclusive
    /// lock, brings its schema up to date and starts its thread.
    pub async fn open(path: impl Into<PathBuf>) -> Result<SqliteStore, SqliteOpenError> {
        Self::open_with(path.into(), true).await
    }

    /// Opens the store in `path` like [`SqliteStore::open`], but refuses a
    /// file that does not exist ([`SqliteOpenError::Missing`]) instead of
    /// creating an empty store: for commands that inspect a store, such as
    /// `omnirelay-hub verify`.
    pub async fn open_existing(path: impl Into<PathBuf>) -> Result<SqliteStore, SqliteOpenError> {
        Self::open_with(path.into(), false).await
    }

    async fn open_with(path: PathBuf, create: bool) -> Result<SqliteStore, SqliteOpenError> {
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open_connection(&path, create))
                .await
                .map_err(|err| SqliteOpenError::Thread(std::io::Error::other(err)))??
        };
        let (commands, queue) = mpsc::channel();
        let (changes, _) = broadcast::channel(defaults::CHANGES_BUFFER);
        let pending_events = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("omnirelay-sqlite".into())
            .spawn({
                let (changes, pending_events) = (changes.clone(), pending_events.clone());
                move || StoreThread { connection: opened, changes, pending_events }.run(queue)
            })
            .map_err(SqliteOpenError::Thread)?;
        tracing::info!(path = %path.display(), "embedded SQLite store open (single replica)");
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                commands: Mutex::new(Some(commands)),
                thread: Mutex::new(Some(thread)),
                changes,
                pending_events,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Caps the file at `pages` pages (SQLite's `max_page_count`; never
    /// below its current size, so 1 means "as it is now") and returns the
    /// cap: writes that would grow it past the cap fail exactly as on a full
    /// disk ("database or disk is full"). For failure drills and tests; a
    /// large `pages` lifts the cap.
    #[doc(hidden)]
    pub async fn cap_pages(&self, pages: u64) -> Result<u64, StoreError> {
        // SQLite reads 0 as "no change".
        let pages = pages.max(1);
        self.run(move |db| {
            db.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |row| row.get::<_, i64>(0))
                .map(|cap| cap as u64)
                .map_err(|e| sql_error("cap the store's size", e))
        })
        .await
    }

    fn send(&self, command: Command) -> Result<(), StoreError> {
        let commands = self.inner.commands.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match commands.as_ref() {
            Some(sender) => sender.send(command).map_err(|_| StoreError::Closed),
            None => Err(StoreError::Closed),
        }
    }

    /// Runs `op` on the store thread. (The hub times operations around the
    /// store, see [`crate::store::metered`].)
    fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        self.run_within(defaults::DATABASE_TIMEOUT, op)
    }

    /// [`SqliteStore::run`] with a deadline on the answer: a thread stuck in
    /// the file system (a hung volume) leaves callers UNAVAILABLE instead of
    /// waiting with it. The operation itself still runs, in order, when the
    /// thread gets to it, so a retried append after it is recognised.
    fn run_within<T: Send + 'static>(
        &self,
        after: Duration,
        op: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Command::Run(Box::new(move |connection| {
            // The caller may have gone away; nothing to undo.
            let _ = reply.send(op(connection));
        })));
        Box::pin(async move {
            sent?;
            answer_within(after, answer).await
        })
    }
}

/// Waits for the store thread's answer, at most `after`.
async fn answer_within<T>(after: Duration, answer: oneshot::Receiver<Result<T, StoreError>>) -> Result<T, StoreError> {
    match tokio::time::timeout(after, answer).await {
        Ok(answer) => answer.unwrap_or(Err(StoreError::Closed)),
        Err(_) => Err(StoreError::Unavailable {
            what: "wait for the embedded store",
            source: Box::new(crate::store::Elapsed { after }),
        }),
    }
}

impl LogStore for SqliteStore {
    fn append(&self, batch: AppendBatch) -> StoreFuture<'static, AppendAck> {
        // Queued now, not when the future is first polled: appends commit in
        // call order.
        let queued = (|| {
            check_batch(&batch)?;
            let events = batch.events.len();
            admit(&self.inner.pending_events, events)?;
            let (reply, answer) = oneshot::channel();
            if let Err(err) = self.send(Command::Append(Pending { batch, reply })) {
                self.inner.pending_events.fetch_sub(events, Ordering::Relaxed);
                return Err(err);
            }
            Ok(answer)
        })();
        Box::pin(async move { answer_within(defaults::DATABASE_TIMEOUT, queued?).await })
    }

    fn acquire_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        ttl: Duration,
    ) -> StoreFuture<'_, LeaseGrant> {
        self.run(move |db| lease::acquire(db, shard, owner, principal, ttl))
    }

    fn renew_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        epoch: Epoch,
        ttl: Duration,
    ) -> StoreFuture<'_, ShardLease> {
        self.run(move |db| lease::renew(db, shard, owner, principal, epoch, ttl))
    }

    fn release_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        epoch: Epoch,
    ) -> StoreFuture<'_, bool> {
        self.run(move |db| lease::release(db, shard, owner, principal, epoch))
    }

    fn shard_state(&self, shard: ShardId) -> StoreFuture<'_, Option<ShardState>> {
        self.run(move |db| read_state(db, &shard))
    }

    fn list_shards(&self, prefix: String) -> StoreFuture<'_, Vec<ShardState>> {
        self.run(move |db| reads::list_shards(db, prefix))
    }

    fn read_range(
        &self,
        shard: ShardId,
        from: Sequence,
        to: Option<Sequence>,
        limit: usize,
        max_bytes: usize,
    ) -> StoreFuture<'_, EventPage> {
        self.run(move |db| reads::read_range(db, shard, from, to, limit, max_bytes))
    }

    fn sequence_at(&self, shard: ShardId, since: SystemTime) -> StoreFuture<'_, Option<Sequence>> {
        self.run(move |db| reads::sequence_at(db, shard, since))
    }

    fn commit_checkpoint(
        &self,
        subscriber: SubscriberId,
        shard: ShardId,
        sequence: Sequence,
        hash: Option<ChainHash>,
    ) -> StoreFuture<'_, CheckpointCommit> {
        self.run(move |db| checkpoint::commit(db, subscriber, shard, sequence, hash))
    }

    fn checkpoints(&self, subscriber: Option<SubscriberId>, shards: Vec<ShardId>) -> StoreFuture<'_, Vec<Checkpoint>> {
        self.run(move |db| checkpoint::read(db, subscriber, shards))
    }

    fn put_snapshot(&self, shard: ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> StoreFuture<'_, Snapshot> {
        self.run(move |db| snapshot::put(db, shard, sequence, epoch, data))
    }

    fn snapshot(&self, shard: ShardId, at_or_below: Option<Sequence>) -> StoreFuture<'_, Option<Snapshot>> {
        self.run(move |db| snapshot::read(db, shard, at_or_below))
    }

    fn apply_retention(&self, shard: ShardId, policy: RetentionPolicy) -> StoreFuture<'_, RetentionOutcome> {
        self.run_within(defaults::RETENTION_TIMEOUT, move |db| retention::apply(db, shard, policy))
    }

    fn changes(&self) -> broadcast::Receiver<LogChange> {
        self.inner.changes.subscribe()
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            // Dropping the sender lets the thread finish its queue and exit,
            // closing the connection and releasing the file.
            drop(self.inner.commands.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take());
            let thread = self.inner.thread.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
            if let Some(thread) = thread {
                let joined = tokio::task::spawn_blocking(move || thread.join()).await;
                if !matches!(joined, Ok(Ok(()))) {
                    return Err(StoreError::Internal {
                        what: "close the embedded store",
                        source: "the store thread panicked".into(),
                    });
                }
            }
            Ok(())
        })
    }
}

impl crate::replica::health::Probe for SqliteStore {
    fn check(&self) -> crate::replica::health::ProbeFuture<'_> {
        let started = Instant::now();
        let answer = self.run(|db| {
            db.query_row(SQL_PROBE, [], |row| row.get::<_, i64>(0))
                .map_err(|e| sql_error("probe the embedded store", e))
        });
        Box::pin(async move {
            let result = answer.await.map(drop);
            telemetry::record_db_operation(DbOperation::Probe, started.elapsed(), result.is_ok());
            result.map_err(|err| crate::replica::health::NotReady::Unreachable(crate::store::causes(&err)))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::open::MIGRATIONS;
    use super::rows::{from_micros, micros};
    use super::*;

    #[test]
    fn times_round_trip_through_microseconds() {
        for time in
            [UNIX_EPOCH, UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456), UNIX_EPOCH - Duration::from_secs(5)]
        {
            assert_eq!(from_micros(micros(time)), time);
        }
    }

    #[test]
    fn the_schema_has_one_migration_per_version() {
        assert_eq!(MIGRATIONS.len(), 3);
        let connection = Connection::open_in_memory().expect("in-memory database");
        for migration in MIGRATIONS {
            connection.execute_batch(migration).expect("each migration should apply after the ones before it");
        }
    }
}
