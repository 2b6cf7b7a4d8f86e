//! The SQLite replicator: a durable shard log in one local file, for a
//! single node that runs without a hub.
//!
//! **What is stored**: per shard, its head, low-water mark, epoch and lease;
//! its events, each the canonical encoding of `replication.v1.ReplicationEvent`
//! (the sequence is the row's key); the last batch of each of its 16 most
//! recent producers (retry recognition); its newest snapshot. Schema in
//! `V0001__replicator.sql` beside this file, versioned with
//! `PRAGMA user_version` and applied at open.
//!
//! **Source of truth**: the file, alone. A batch is acknowledged only after
//! its transaction is on disk (WAL journal, `synchronous = FULL`), so an
//! acknowledged batch survives the process being killed, and a restarted
//! replicator resumes the sequences, producer sequences, epochs and leases
//! where they were.
//!
//! **One process**: the file is opened in SQLite's exclusive locking mode
//! and its write lock is taken at once and held until the replicator is
//! dropped, so a second replicator on the same file (in this process or
//! another) fails to open with [`SqliteOpenError::Locked`]. The operating
//! system releases the lock when the process dies.
//!
//! **Threading**: one dedicated thread owns the connection and runs every
//! operation in the order it was called, so batches published one after
//! another (a queue pipelines them) are written in that order. Appends
//! queued behind each other are group-committed: one transaction, each
//! batch in a savepoint (a refused batch leaves the others intact), one
//! fsync for all. No SQLite call runs on the async runtime.
//!
//! **Lease clock**: shard lease expiry is judged by this process's wall
//! clock, the only clock a single-node log has.
//!
//! **Not kept**: a hash chain ([`LoggedEvent::link`] is `None`): the file is
//! protected by SQLite's own page checks, not by per-event hashes; use the
//! hub where logs must be verifiable.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use omnirelay_proto::Message as _;
use omnirelay_proto::replication::v1 as rpb;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{
    Appended, Batch, LogPage, LoggedEvent, PublishFuture, ReplicationError, Replicator, ReplicatorFuture, ShardGrant,
    StoredSnapshot,
};
use crate::ids::{Epoch, Sequence, ShardId};
use crate::wire;

/// Schema migrations, in order; `PRAGMA user_version` counts those applied.
/// Forward-only: never edit a landed entry.
const MIGRATIONS: &[&str] = &[include_str!("V0001__replicator.sql")];

/// Producers remembered per shard for retry recognition: one owner writes a
/// shard at a time, so a handful covers every incarnation still retrying
/// (the in-memory replicator keeps as many).
const PRODUCERS_REMEMBERED: i64 = 16;

/// Most appends committed in one transaction: enough to absorb a queue's
/// whole pipeline (8 batches) for several shards, small enough that one
/// slow group does not hold the others' answers long.
const GROUP_MAX: usize = 64;

/// Why a SQLite replicator could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SqliteOpenError {
    /// Another replicator (in this process or another) holds the file.
    #[error(
        "the SQLite log {} is in use by another process; a SQLite log serves one node only (stop the other \
         one, give each its own file, or use the hub)",
        path.display()
    )]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// The file could not be opened or prepared.
    #[error("cannot open the SQLite log {}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer build.
    #[error(
        "the SQLite log {} has schema version {found}, newer than this build's {supported}",
        path.display()
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The file's version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The replicator's thread could not be started.
    #[error("cannot start the SQLite replicator thread")]
    Thread(#[source] std::io::Error),
}

/// How a [`SqliteReplicator`] keeps its file.
#[derive(Debug, Clone, Default)]
pub struct SqliteReplicatorConfig {
    /// Deletes a shard's events at and below each snapshot stored (the
    /// snapshot replaces them for a rebuild), so the file stays bounded on
    /// a long-running node. Reads below the snapshot then fail with
    /// [`ReplicationError::Trimmed`]. Off: every event is kept.
    pub trim_below_snapshots: bool,
}

/// A [`Replicator`] on a local SQLite file. See the [module docs](self).
///
/// Dropping it finishes the operations already queued, closes the file and
/// joins its thread (so the file can be opened again at once).
pub struct SqliteReplicator {
    path: PathBuf,
    /// `None` once dropped: the thread finishes its queue and exits.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for SqliteReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReplicator").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Drop for SqliteReplicator {
    fn drop(&mut self) {
        self.commands.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let thread = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(thread) = thread {
            // The thread exits once its queue is empty; joining here makes
            // "dropped" mean "closed", so a restart can reopen the file.
            let _ = thread.join();
        }
    }
}

/// Work for the replicator's thread.
enum Command {
    /// An append, group-committed with the appends queued right behind it.
    Append(Pending),
    /// Any other operation.
    Run(Box<dyn FnOnce(&mut Store) + Send>),
}

/// A batch encoded for the thread, with where to send its answer.
struct Pending {
    shard: String,
    producer: String,
    producer_seq: u64,
    epoch: u64,
    first: u64,
    events: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<Appended, ReplicationError>>,
}

impl SqliteReplicator {
    /// Opens (creating if needed) the log in `path` with the default
    /// configuration (every event kept).
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, SqliteOpenError> {
        Self::open_with(path, SqliteReplicatorConfig::default()).await
    }

    /// Opens (creating if needed) the log in `path`, takes its exclusive
    /// lock, brings its schema up to date and starts its thread.
    pub async fn open_with(path: impl Into<PathBuf>, config: SqliteReplicatorConfig) -> Result<Self, SqliteOpenError> {
        let path = path.into();
        let connection = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open_connection(&path))
                .await
                .map_err(|err| SqliteOpenError::Thread(std::io::Error::other(err)))??
        };
        let (commands, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("omnirelay-sqlite-log".into())
            .spawn(move || Store { connection, config }.run(&queue))
            .map_err(SqliteOpenError::Thread)?;
        tracing::info!(path = %path.display(), "sqlite replication log open");
        Ok(Self { path, commands: Mutex::new(Some(commands)), thread: Mutex::new(Some(thread)) })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a consistent copy of the whole log to `to` while the log
    /// keeps serving (SQLite's `VACUUM INTO`: a compacted, self-contained
    /// database that [`SqliteReplicator::open`] opens as it is). Appends
    /// queued meanwhile wait for the copy. `to` must not exist.
    pub async fn backup(&self, to: impl Into<PathBuf>) -> Result<(), ReplicationError> {
        let to = to.into();
        self.run(move |store| {
            let target = to.to_string_lossy().into_owned();
            store
                .connection
                .execute("VACUUM INTO ?1", params![target])
                .map(|_| ())
                .map_err(|e| sql_error("back up the log", &e))
        })
        .await
    }

    fn send(&self, command: Command) -> Result<(), ReplicationError> {
        let commands = self.commands.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match commands.as_ref().map(|sender| sender.send(command)) {
            Some(Ok(())) => Ok(()),
            _ => Err(ReplicationError::Unavailable("the sqlite log is closed".into())),
        }
    }

    /// Runs `op` on the thread, after everything queued before it.
    fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Store) -> Result<T, ReplicationError> + Send + 'static,
    ) -> ReplicatorFuture<'static, T> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Command::Run(Box::new(move |store| {
            // The caller may have gone away; nothing to undo.
            let _ = reply.send(op(store));
        })));
        Box::pin(async move {
            sent?;
            answer.await.unwrap_or_else(|_| Err(ReplicationError::Unavailable("the sqlite log stopped".into())))
        })
    }
}

/// Opens the file, takes the exclusive lock and migrates.
fn open_connection(path: &Path) -> Result<Connection, SqliteOpenError> {
    let open_error = |source: rusqlite::Error| {
        if matches!(source.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)) {
            SqliteOpenError::Locked { path: path.to_path_buf() }
        } else {
            SqliteOpenError::Open { path: path.to_path_buf(), source }
        }
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut connection = Connection::open_with_flags(path, flags).map_err(open_error)?;
    // Fail at once when another process holds the file, instead of waiting.
    connection.busy_timeout(Duration::ZERO).map_err(open_error)?;
    // Exclusive locking mode keeps the lock taken below until the
    // connection closes: one node per file. Set before WAL mode so the WAL
    // index lives in this process's memory, not a shared file.
    connection.pragma_update(None, "locking_mode", "EXCLUSIVE").map_err(open_error)?;
    connection.pragma_update(None, "journal_mode", "WAL").map_err(open_error)?;
    // A batch is acknowledged only after its transaction is on disk.
    connection.pragma_update(None, "synchronous", "FULL").map_err(open_error)?;
    let txn = connection.transaction_with_behavior(TransactionBehavior::Exclusive).map_err(open_error)?;
    let version: i64 = txn.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(open_error)?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(SqliteOpenError::NewerSchema { path: path.to_path_buf(), found: version, supported });
    }
    for migration in MIGRATIONS.iter().skip(usize::try_from(version).unwrap_or(0)) {
        txn.execute_batch(migration).map_err(open_error)?;
    }
    txn.pragma_update(None, "user_version", supported).map_err(open_error)?;
    txn.commit().map_err(open_error)?;
    Ok(connection)
}

/// A SQLite failure as the replicator reports it. Every one is an outage of
/// the log (a full disk, an I/O error, a file turned read-only): the
/// operation may be retried once the operator fixed it.
fn sql_error(what: &str, err: &rusqlite::Error) -> ReplicationError {
    ReplicationError::Unavailable(format!("sqlite log: {what}: {err}"))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A shard's row, or its defaults before its first write.
#[derive(Debug, Default)]
struct ShardRow {
    head: u64,
    low: u64,
    epoch: u64,
    owner: Option<String>,
    expires_ms: Option<i64>,
}

impl ShardRow {
    fn live_holder(&self, now: i64) -> Option<&str> {
        let live = self.expires_ms.is_none_or(|at| now < at);
        self.owner.as_deref().filter(|_| live)
    }

    fn grant(&self, granted: bool, now: i64) -> ShardGrant {
        ShardGrant {
            granted,
            owner: self.owner.clone().unwrap_or_default(),
            epoch: Epoch::new(self.epoch),
            head: Sequence::new(self.head),
            ttl: self.expires_ms.map(|at| Duration::from_millis(to_u64(at.saturating_sub(now)))),
        }
    }
}

/// The connection and what the thread does with it.
struct Store {
    connection: Connection,
    config: SqliteReplicatorConfig,
}

fn shard_row(connection: &Connection, shard: &str) -> rusqlite::Result<Option<ShardRow>> {
    connection
        .query_row(
            "SELECT head, low, epoch, owner, lease_expires_ms FROM shards WHERE shard = ?1",
            params![shard],
            |row| {
                Ok(ShardRow {
                    head: to_u64(row.get(0)?),
                    low: to_u64(row.get(1)?),
                    epoch: to_u64(row.get(2)?),
                    owner: row.get(3)?,
                    expires_ms: row.get(4)?,
                })
            },
        )
        .optional()
}

/// Writes a shard's row (created on first use).
fn save_shard(connection: &Connection, shard: &str, row: &ShardRow) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT INTO shards (shard, head, low, epoch, owner, lease_expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (shard) DO UPDATE SET head = ?2, low = ?3, epoch = ?4, owner = ?5, lease_expires_ms = ?6",
        params![shard, to_i64(row.head), to_i64(row.low.max(1)), to_i64(row.epoch), row.owner, row.expires_ms],
    )?;
    Ok(())
}

/// The outcome of one batch inside a group: an answer, or an SQL failure
/// that rolled the batch back.
type Outcome = Result<Result<Appended, ReplicationError>, rusqlite::Error>;

impl Store {
    fn run(mut self, queue: &mpsc::Receiver<Command>) {
        let mut deferred = None;
        loop {
            let command = match deferred.take() {
                Some(command) => command,
                None => match queue.recv() {
                    Ok(command) => command,
                    Err(_) => return,
                },
            };
            match command {
                Command::Run(op) => op(&mut self),
                Command::Append(pending) => {
                    let mut group = vec![pending];
                    while group.len() < GROUP_MAX {
                        match queue.try_recv() {
                            Ok(Command::Append(pending)) => group.push(pending),
                            Ok(other) => {
                                deferred = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.append_group(group);
                }
            }
        }
    }

    /// Appends a group of batches in one transaction, each in a savepoint
    /// (a refused or failed batch is rolled back alone), and answers each
    /// once the transaction committed.
    fn append_group(&mut self, group: Vec<Pending>) {
        let mut answers = Vec::with_capacity(group.len());
        let committed = (|| -> rusqlite::Result<()> {
            let mut txn = self.connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for pending in &group {
                let savepoint = txn.savepoint()?;
                match append(&savepoint, pending) {
                    Ok(Ok(appended)) => {
                        savepoint.commit()?;
                        answers.push(Ok(appended));
                    }
                    // Dropping the savepoint rolls it back.
                    Ok(Err(refusal)) => answers.push(Err(refusal)),
                    Err(err) => answers.push(Err(sql_error("append a batch", &err))),
                }
            }
            txn.commit()
        })();
        match committed {
            Ok(()) => {
                for (pending, answer) in group.into_iter().zip(answers) {
                    let _ = pending.reply.send(answer);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "sqlite log: a group of appends failed to commit");
                for pending in group {
                    let _ = pending.reply.send(Err(sql_error("commit appends", &err)));
                }
            }
        }
    }
}

/// Decides and writes one batch (inside the caller's savepoint).
fn append(connection: &Connection, batch: &Pending) -> Outcome {
    let shard_id = ShardId::from(batch.shard.as_str());
    let mut shard = shard_row(connection, &batch.shard)?.unwrap_or(ShardRow { low: 1, ..ShardRow::default() });
    if batch.epoch != shard.epoch {
        return Ok(Err(ReplicationError::StaleEpoch {
            shard: shard_id,
            given: Epoch::new(batch.epoch),
            current: Epoch::new(shard.epoch),
        }));
    }
    if batch.events.is_empty() {
        return Ok(Err(ReplicationError::Rejected("a batch needs at least one event".into())));
    }
    let last: Option<(u64, u64, u64)> = connection
        .query_row(
            "SELECT producer_seq, first, count FROM producers WHERE shard = ?1 AND producer = ?2",
            params![batch.shard, batch.producer],
            |row| Ok((to_u64(row.get(0)?), to_u64(row.get(1)?), to_u64(row.get(2)?))),
        )
        .optional()?;
    if let Some((seq, first, count)) = last {
        if seq == batch.producer_seq {
            return Ok(Ok(Appended { first: Sequence::new(first), count, deduplicated: true }));
        }
        if seq > batch.producer_seq {
            return Ok(Err(ReplicationError::Rejected(format!(
                "producer {} sent batch {} after batch {seq}; only its latest batch is remembered",
                batch.producer, batch.producer_seq
            ))));
        }
        if batch.producer_seq != seq + 1 {
            return Ok(Err(ReplicationError::Rejected(format!(
                "producer {} sent batch {}; the next expected is {} (nothing was written)",
                batch.producer,
                batch.producer_seq,
                seq + 1
            ))));
        }
    }
    let next = shard.head + 1;
    if batch.first != 0 && batch.first != next {
        return Ok(Err(ReplicationError::Rejected(format!(
            "shard {}: the batch expects to start at {} but the log's next sequence is {next} (nothing was written)",
            batch.shard, batch.first
        ))));
    }
    {
        let mut insert = connection.prepare_cached("INSERT INTO events (shard, sequence, data) VALUES (?1, ?2, ?3)")?;
        for (offset, data) in batch.events.iter().enumerate() {
            insert.execute(params![batch.shard, to_i64(next + offset as u64), data])?;
        }
    }
    let count = batch.events.len() as u64;
    shard.head += count;
    save_shard(connection, &batch.shard, &shard)?;
    connection.execute(
        "INSERT INTO producers (shard, producer, producer_seq, first, count, stamp) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (shard, producer) DO UPDATE SET producer_seq = ?3, first = ?4, count = ?5, stamp = ?6",
        params![
            batch.shard,
            batch.producer,
            to_i64(batch.producer_seq),
            to_i64(next),
            to_i64(count),
            to_i64(shard.head)
        ],
    )?;
    if last.is_none() {
        connection.execute(
            "DELETE FROM producers WHERE shard = ?1 AND producer NOT IN
               (SELECT producer FROM producers WHERE shard = ?1 ORDER BY stamp DESC LIMIT ?2)",
            params![batch.shard, PRODUCERS_REMEMBERED],
        )?;
    }
    Ok(Ok(Appended { first: Sequence::new(next), count, deduplicated: false }))
}

/// Decodes a stored event at `sequence`.
fn decode_event(shard: &str, sequence: u64, data: &[u8]) -> Result<LoggedEvent, ReplicationError> {
    let corrupt = |error: String| {
        ReplicationError::Corrupt(format!("shard {shard}: event {sequence} of the sqlite log does not decode: {error}"))
    };
    let mut entry = rpb::ReplicationEvent::decode(data).map_err(|e| corrupt(e.to_string()))?;
    entry.sequence = sequence;
    let event = wire::event_from_pb(entry).map_err(|e| corrupt(e.to_string()))?;
    Ok(LoggedEvent { event, link: None })
}

impl Replicator for SqliteReplicator {
    fn publish(&self, batch: &Batch) -> PublishFuture {
        // Encoded here, on the caller's thread, so the batch is copied before
        // `publish` returns; the store thread only writes bytes.
        let events = batch.events.iter().map(|event| wire::event(Sequence::ZERO, event).encode_to_vec()).collect();
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            shard: batch.shard.to_string(),
            producer: batch.producer.to_string(),
            producer_seq: batch.producer_seq,
            epoch: batch.epoch.get(),
            first: batch.first.get(),
            events,
            reply,
        };
        if let Err(err) = self.send(Command::Append(pending)) {
            return PublishFuture::ready(Err(err));
        }
        PublishFuture::new(async move {
            answer.await.unwrap_or_else(|_| Err(ReplicationError::Unavailable("the sqlite log stopped".into())))
        })
    }

    fn acquire_shard(&self, shard: &ShardId, owner: &str, ttl: Duration) -> ReplicatorFuture<'_, ShardGrant> {
        let (shard, owner) = (shard.to_string(), owner.to_string());
        self.run(move |store| {
            let db = &store.connection;
            let sql = |e: rusqlite::Error| sql_error("acquire the shard", &e);
            let now = now_ms();
            let mut row = shard_row(db, &shard).map_err(sql)?.unwrap_or(ShardRow { low: 1, ..ShardRow::default() });
            if row.live_holder(now).is_some_and(|holder| holder != owner) {
                return Ok(row.grant(false, now));
            }
            row.epoch += 1;
            row.owner = Some(owner);
            row.expires_ms = Some(now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)));
            save_shard(db, &shard, &row).map_err(sql)?;
            Ok(row.grant(true, now))
        })
    }

    fn renew_shard(
        &self,
        shard: &ShardId,
        owner: &str,
        epoch: Epoch,
        ttl: Duration,
    ) -> ReplicatorFuture<'_, ShardGrant> {
        let (shard_id, owner) = (shard.clone(), owner.to_string());
        self.run(move |store| {
            let db = &store.connection;
            let sql = |e: rusqlite::Error| sql_error("renew the shard", &e);
            let now = now_ms();
            let shard = shard_id.to_string();
            let mut row = shard_row(db, &shard).map_err(sql)?.unwrap_or(ShardRow { low: 1, ..ShardRow::default() });
            if row.epoch != epoch.get() {
                return Err(ReplicationError::StaleEpoch {
                    shard: shard_id,
                    given: epoch,
                    current: Epoch::new(row.epoch),
                });
            }
            if row.owner.as_deref() != Some(owner.as_str()) {
                return Err(ReplicationError::Rejected(format!("shard {shard}: {owner} does not hold the lease")));
            }
            row.expires_ms = Some(now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)));
            save_shard(db, &shard, &row).map_err(sql)?;
            Ok(row.grant(true, now))
        })
    }

    fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool> {
        let (shard, owner) = (shard.to_string(), owner.to_string());
        self.run(move |store| {
            let db = &store.connection;
            let sql = |e: rusqlite::Error| sql_error("release the shard", &e);
            let Some(mut row) = shard_row(db, &shard).map_err(sql)? else { return Ok(false) };
            if row.epoch != epoch.get() || row.owner.as_deref() != Some(owner.as_str()) {
                return Ok(false);
            }
            row.owner = None;
            row.expires_ms = None;
            save_shard(db, &shard, &row).map_err(sql)?;
            Ok(true)
        })
    }

    fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage> {
        let shard_id = shard.clone();
        self.run(move |store| {
            let db = &store.connection;
            let sql = |e: rusqlite::Error| sql_error("read the log", &e);
            let shard = shard_id.to_string();
            let Some(row) = shard_row(db, &shard).map_err(sql)? else { return Ok(LogPage::default()) };
            let low = Sequence::new(row.low);
            if after.after(1) < low && after.get() < row.head {
                return Err(ReplicationError::Trimmed { shard: shard_id, low });
            }
            let mut select = db
                .prepare_cached(
                    "SELECT sequence, data FROM events WHERE shard = ?1 AND sequence > ?2 ORDER BY sequence LIMIT ?3",
                )
                .map_err(sql)?;
            let rows = select
                .query_map(params![shard, to_i64(after.get()), i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
                    Ok((to_u64(row.get(0)?), row.get::<_, Vec<u8>>(1)?))
                })
                .map_err(sql)?;
            let mut events = Vec::new();
            for row in rows {
                let (sequence, data) = row.map_err(sql)?;
                events.push(decode_event(&shard, sequence, &data)?);
            }
            Ok(LogPage { events, head: Sequence::new(row.head), low })
        })
    }

    fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>> {
        let shard = shard.to_string();
        self.run(move |store| {
            store
                .connection
                .query_row("SELECT sequence, data FROM snapshots WHERE shard = ?1", params![shard], |row| {
                    Ok(StoredSnapshot {
                        sequence: Sequence::new(to_u64(row.get(0)?)),
                        data: Bytes::from(row.get::<_, Vec<u8>>(1)?),
                        hash: None,
                    })
                })
                .optional()
                .map_err(|e| sql_error("read the snapshot", &e))
        })
    }

    fn put_snapshot(&self, shard: &ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> ReplicatorFuture<'_, ()> {
        let shard_id = shard.clone();
        self.run(move |store| {
            let trim = store.config.trim_below_snapshots;
            let sql = |e: rusqlite::Error| sql_error("store the snapshot", &e);
            let txn = store.connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
            let shard = shard_id.to_string();
            let mut row = shard_row(&txn, &shard).map_err(sql)?.unwrap_or(ShardRow { low: 1, ..ShardRow::default() });
            if row.epoch != epoch.get() {
                return Err(ReplicationError::StaleEpoch {
                    shard: shard_id,
                    given: epoch,
                    current: Epoch::new(row.epoch),
                });
            }
            if sequence.get() > row.head {
                return Err(ReplicationError::Rejected(format!(
                    "shard {shard}: snapshot at {sequence} is past the head {}",
                    row.head
                )));
            }
            // An older snapshot stored late never replaces a newer one.
            txn.execute(
                "INSERT INTO snapshots (shard, sequence, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (shard) DO UPDATE SET sequence = ?2, data = ?3 WHERE snapshots.sequence <= ?2",
                params![shard, to_i64(sequence.get()), data.as_ref()],
            )
            .map_err(sql)?;
            if trim && sequence.get() + 1 > row.low {
                txn.execute(
                    "DELETE FROM events WHERE shard = ?1 AND sequence <= ?2",
                    params![shard, to_i64(sequence.get())],
                )
                .map_err(sql)?;
                row.low = sequence.get() + 1;
                save_shard(&txn, &shard, &row).map_err(sql)?;
            }
            txn.commit().map_err(sql)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::replication::contract::{self, Durability};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_replicator_contract() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("log.sqlite");
        contract::check(
            || {
                let path = path.clone();
                async move {
                    Arc::new(SqliteReplicator::open(path).await.expect("open the sqlite log")) as Arc<dyn Replicator>
                }
            },
            Durability::Durable,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_replicator_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("log.sqlite");
        let _first = SqliteReplicator::open(&path).await.expect("open");
        let second = SqliteReplicator::open(&path).await;
        assert!(matches!(second, Err(SqliteOpenError::Locked { .. })), "{second:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_taken_while_serving_opens_with_every_event() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = SqliteReplicator::open(dir.path().join("log.sqlite")).await.expect("open");
        let shard = ShardId::from("backup/with/slashes");
        log.publish(&contract::batch(&shard, "p", 1, 1, 5)).await.expect("publish");
        let copy = dir.path().join("copy.sqlite");
        log.backup(&copy).await.expect("back up");
        // The original keeps serving; the copy has what was acknowledged.
        log.publish(&contract::batch(&shard, "p", 2, 6, 1)).await.expect("publish after the backup");
        let restored = SqliteReplicator::open(&copy).await.expect("open the copy");
        assert_eq!(contract::numbers(&restored, &shard, 0, 100).await, vec![1, 2, 3, 4, 5]);
        assert_eq!(contract::numbers(&log, &shard, 0, 100).await, vec![1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trimming_below_snapshots_bounds_the_file_and_reads_say_so() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = SqliteReplicatorConfig { trim_below_snapshots: true };
        let log = SqliteReplicator::open_with(dir.path().join("log.sqlite"), config).await.expect("open");
        let shard = ShardId::from("trim");
        log.publish(&contract::batch(&shard, "p", 1, 1, 6)).await.expect("publish");
        log.put_snapshot(&shard, Sequence::new(4), Epoch::ZERO, Bytes::from_static(b"at 4")).await.expect("snapshot");
        let trimmed = log.read_log(&shard, Sequence::new(2), 10).await;
        assert_eq!(trimmed, Err(ReplicationError::Trimmed { shard: shard.clone(), low: Sequence::new(5) }));
        assert_eq!(contract::numbers(&log, &shard, 4, 10).await, vec![5, 6]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_refused_in_a_group_leaves_the_others_written() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = SqliteReplicator::open(dir.path().join("log.sqlite")).await.expect("open");
        let shard = ShardId::from("group");
        // Queued together: the middle one expects the wrong head.
        let a = log.publish(&contract::batch(&shard, "p", 1, 1, 2));
        let mut bad = contract::batch(&shard, "q", 1, 50, 1);
        bad.first = Sequence::new(9);
        let b = log.publish(&bad);
        let c = log.publish(&contract::batch(&shard, "p", 2, 3, 1));
        assert_eq!(a.await.map(|a| a.first), Ok(Sequence::new(1)));
        assert!(matches!(b.await, Err(ReplicationError::Rejected(_))));
        assert_eq!(c.await.map(|a| a.first), Ok(Sequence::new(3)));
        assert_eq!(contract::numbers(&log, &shard, 0, 100).await, vec![1, 2, 3]);
    }
}
