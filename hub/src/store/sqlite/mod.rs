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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{broadcast, oneshot};

mod open;
mod rows;
mod thread;

pub use self::open::SqliteOpenError;
use self::open::open_connection;
use self::rows::{duration_micros, from_db, from_micros, micros, read_state, shard_no, shard_state, sql_error, to_db};
use self::thread::{Command, Pending, StoreThread};
use crate::defaults;
use crate::log::event::{ChainHash, CorruptEvent, StoredRow};
use crate::log::ids::{Epoch, InvalidInput, OwnerId, Sequence, ShardId, SubscriberId};
use crate::security::principal::Principal;
use crate::store::{
    AppendAck, AppendBatch, Checkpoint, CheckpointCommit, CheckpointTarget, EventPage, LeaseGrant, LogChange, LogStore,
    RetentionOutcome, RetentionPolicy, ShardLease, ShardState, Snapshot, StoreError, StoreFuture, admit, check_batch,
    checkpoint_hash, corrupt_id, lease_failure, stored_hash,
};
use crate::telemetry::{self, DbOperation};

// The store's statements, each file opening with its concurrency contract.
const SQL_ACQUIRE_NEW: &str = include_str!("sql/acquire_new.sql");
const SQL_ACQUIRE_PRINCIPAL: &str = include_str!("sql/acquire_principal.sql");
const SQL_ACQUIRE_TAKE: &str = include_str!("sql/acquire_take.sql");
const SQL_RENEW_SHARD: &str = include_str!("sql/renew_shard.sql");
const SQL_RELEASE_SHARD: &str = include_str!("sql/release_shard.sql");
const SQL_READ_RANGE: &str = include_str!("sql/read_range.sql");
const SQL_SEQUENCE_AT: &str = include_str!("sql/sequence_at.sql");
const SQL_EVENT_HASH: &str = include_str!("sql/event_hash.sql");
const SQL_COMMIT_CHECKPOINT: &str = include_str!("sql/commit_checkpoint.sql");
const SQL_READ_CHECKPOINT: &str = include_str!("sql/read_checkpoint.sql");
const SQL_READ_CHECKPOINTS: &str = include_str!("sql/read_checkpoints.sql");
const SQL_UPSERT_SNAPSHOT: &str = include_str!("sql/upsert_snapshot.sql");
const SQL_READ_SNAPSHOT: &str = include_str!("sql/read_snapshot.sql");
const SQL_RETENTION_PLAN: &str = include_str!("sql/retention_plan.sql");
const SQL_RETENTION_LOW: &str = include_str!("sql/retention_low.sql");
const SQL_RETENTION_SNAPSHOTS: &str = include_str!("sql/retention_snapshots.sql");
const SQL_RETENTION_RECORDS: &str = include_str!("sql/retention_records.sql");
const SQL_RETENTION_EVENTS: &str = include_str!("sql/retention_events.sql");
const SQL_PROBE: &str = include_str!("sql/probe.sql");
const SQL_LIST_SHARDS: &str = include_str!("sql/list_shards.sql");

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
        self.run(move |db| {
            let principal = principal.as_ref().map(Principal::as_str);
            let what = "acquire a shard";
            let sql = |e| sql_error(what, e);
            let now = micros(SystemTime::now());
            let expires = now.saturating_add(duration_micros(ttl)?);
            let txn = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
            let granted = match read_state(&txn, &shard)? {
                None => {
                    txn.prepare_cached(SQL_ACQUIRE_NEW)
                        .map_err(sql)?
                        .execute(params![
                            shard.as_str(),
                            owner.as_str(),
                            expires,
                            &ChainHash::ZERO.as_bytes()[..],
                            now,
                            principal
                        ])
                        .map_err(sql)?;
                    true
                }
                Some(state) => {
                    // The same rule as acquire_shard.sql: a live lease goes
                    // again to its owner id only under the principal that
                    // took it (or when it records none).
                    let taken_by: Option<String> = txn
                        .prepare_cached(SQL_ACQUIRE_PRINCIPAL)
                        .and_then(|mut s| s.query_row(params![shard.as_str()], |row| row.get(0)))
                        .map_err(sql)?;
                    let same_principal = taken_by.is_none() || taken_by.as_deref() == principal;
                    let free = match (&state.lease.owner, state.lease.expires_at) {
                        (None, _) | (_, None) => true,
                        (Some(holder), Some(expires_at)) => {
                            (holder == &owner && same_principal) || micros(expires_at) <= now
                        }
                    };
                    if free {
                        txn.prepare_cached(SQL_ACQUIRE_TAKE)
                            .map_err(sql)?
                            .execute(params![shard.as_str(), owner.as_str(), expires, principal])
                            .map_err(sql)?;
                    }
                    free
                }
            };
            let state = read_state(&txn, &shard)?.ok_or_else(|| StoreError::Internal {
                what,
                source: "the shard vanished after its row was written".into(),
            })?;
            txn.commit().map_err(sql)?;
            Ok(LeaseGrant { granted, lease: state.lease })
        })
    }

    fn renew_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        epoch: Epoch,
        ttl: Duration,
    ) -> StoreFuture<'_, ShardLease> {
        self.run(move |db| {
            let what = "renew a shard";
            let principal = principal.as_ref().map(Principal::as_str);
            let expires = micros(SystemTime::now()).saturating_add(duration_micros(ttl)?);
            let renewed = db
                .prepare_cached(SQL_RENEW_SHARD)
                .map_err(|e| sql_error(what, e))?
                .execute(params![shard.as_str(), owner.as_str(), to_db("epoch", epoch.0)?, expires, principal])
                .map_err(|e| sql_error(what, e))?;
            if renewed == 1 {
                read_state(db, &shard)?
                    .map(|state| state.lease)
                    .ok_or_else(|| StoreError::Internal { what, source: "the renewed shard vanished".into() })
            } else {
                Err(lease_failure(read_state(db, &shard), shard, epoch))
            }
        })
    }

    fn release_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        epoch: Epoch,
    ) -> StoreFuture<'_, bool> {
        self.run(move |db| {
            let principal = principal.as_ref().map(Principal::as_str);
            let released = db
                .prepare_cached(SQL_RELEASE_SHARD)
                .map_err(|e| sql_error("release a shard", e))?
                .execute(params![shard.as_str(), owner.as_str(), to_db("epoch", epoch.0)?, principal])
                .map_err(|e| sql_error("release a shard", e))?;
            Ok(released == 1)
        })
    }

    fn shard_state(&self, shard: ShardId) -> StoreFuture<'_, Option<ShardState>> {
        self.run(move |db| read_state(db, &shard))
    }

    fn list_shards(&self, prefix: String) -> StoreFuture<'_, Vec<ShardState>> {
        self.run(move |db| {
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
        })
    }

    fn read_range(
        &self,
        shard: ShardId,
        from: Sequence,
        to: Option<Sequence>,
        limit: usize,
        max_bytes: usize,
    ) -> StoreFuture<'_, EventPage> {
        self.run(move |db| {
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
        })
    }

    fn sequence_at(&self, shard: ShardId, since: SystemTime) -> StoreFuture<'_, Option<Sequence>> {
        self.run(move |db| {
            let what = "find a sequence by time";
            let found: Option<i64> = db
                .prepare_cached(SQL_SEQUENCE_AT)
                .map_err(|e| sql_error(what, e))?
                .query_row(params![shard.as_str(), micros(since)], |row| row.get(0))
                .optional()
                .map_err(|e| sql_error(what, e))?;
            found.map(|sequence| Ok(Sequence(from_db(sequence)?))).transpose()
        })
    }

    fn commit_checkpoint(
        &self,
        subscriber: SubscriberId,
        shard: ShardId,
        sequence: Sequence,
        hash: Option<ChainHash>,
    ) -> StoreFuture<'_, CheckpointCommit> {
        self.run(move |db| {
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
        })
    }

    fn checkpoints(&self, subscriber: Option<SubscriberId>, shards: Vec<ShardId>) -> StoreFuture<'_, Vec<Checkpoint>> {
        self.run(move |db| {
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
                    hash: row
                        .get::<_, Option<Vec<u8>>>(4)
                        .map_err(sql)?
                        .map(|hash| stored_hash(hash, "hash"))
                        .transpose()?,
                });
            }
            Ok(found)
        })
    }

    fn put_snapshot(&self, shard: ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> StoreFuture<'_, Snapshot> {
        self.run(move |db| {
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
                        return Err(
                            CorruptEvent { shard, sequence, reason: "missing from the stored log".into() }.into()
                        );
                    }
                }
            };
            let created_at = SystemTime::now();
            txn.prepare_cached(SQL_UPSERT_SNAPSHOT)
                .map_err(sql)?
                .execute(params![
                    number,
                    sequence_value,
                    epoch_value,
                    &data[..],
                    &hash.as_bytes()[..],
                    micros(created_at)
                ])
                .map_err(sql)?;
            txn.commit().map_err(sql)?;
            Ok(Snapshot { shard, sequence, data, hash, created_at: from_micros(micros(created_at)) })
        })
    }

    fn snapshot(&self, shard: ShardId, at_or_below: Option<Sequence>) -> StoreFuture<'_, Option<Snapshot>> {
        self.run(move |db| {
            let what = "read a snapshot";
            let below = match at_or_below {
                Some(sequence) => to_db("at_or_below", sequence.0)?,
                None => i64::MAX,
            };
            let row = db
                .prepare_cached(SQL_READ_SNAPSHOT)
                .map_err(|e| sql_error(what, e))?
                .query_row(params![shard.as_str(), below], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, i64>(3)?,
                    ))
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
        })
    }

    fn apply_retention(&self, shard: ShardId, policy: RetentionPolicy) -> StoreFuture<'_, RetentionOutcome> {
        self.run_within(defaults::RETENTION_TIMEOUT, move |db| {
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
            let deleted = txn
                .prepare_cached(SQL_RETENTION_EVENTS)
                .map_err(sql)?
                .execute(params![number, through])
                .map_err(sql)?;
            txn.commit().map_err(sql)?;
            Ok(RetentionOutcome { deleted: deleted as u64, low: Sequence(from_db(through)? + 1) })
        })
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
