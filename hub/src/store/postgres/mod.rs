//! The PostgreSQL log store: the production store, shared by any number of
//! hub replicas.
//!
//! **What is stored**: per shard a row in `shards` (lease, epoch, head and
//! its hash, low-water mark), its events in `events`, producer batch records
//! in `producer_batches`, subscriber positions in `checkpoints` and queue
//! snapshots in `snapshots` (see `migrations/`).
//!
//! **Source of truth**: the database, alone. Every epoch check, sequence
//! assignment and dedupe is judged inside a transaction on locked rows, so
//! replicas never need to agree on anything but the database. The one thing
//! remembered between requests is each group committer's *prediction* of the
//! shards it writes (head, hash, epoch, producers' latest sequences): a
//! guess that lets a group skip the locking round trip, which the head
//! update's fence checks in SQL and which a refusal simply discards.
//!
//! **Latency-sensitive paths**: appends, through the group committers
//! (the `committer` module): one transaction per group of concurrent
//! batches and one WAL flush regardless of how many producers share it; one
//! pipelined round trip when the group was predicted, two when it must lock
//! and look up first. Reads for the live tail happen once per replica per
//! commit (see the hub's `tail` module); leases and checkpoints are single
//! statements.

mod committer;
mod conn;
mod failure;
mod listener;
pub mod pool;
pub mod schema;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deadpool_postgres::Pool;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_postgres::Row;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::committer::{Committer, Pending};
pub(crate) use self::conn::Conn;
use self::conn::{col, from_db, to_db, within};
use self::failure::{pool_error, store_error};
pub use self::pool::{DatabaseTls, PgStoreConfig};
use self::schema::SchemaError;
use crate::defaults;
use crate::log::event::{self, ChainHash, StoredRow};
use crate::log::ids::{Epoch, InvalidInput, OwnerId, Sequence, ShardId, SubscriberId};
use crate::replica::health::{NotReady, Probe, ProbeFuture};
use crate::security::principal::Principal;
use crate::store::{
    AppendAck, AppendBatch, Checkpoint, CheckpointCommit, CheckpointTarget, EventPage, LeaseGrant, LogChange, LogStore,
    RetentionOutcome, RetentionPolicy, ShardLease, ShardState, Snapshot, StoreError, StoreFuture, admit, check_batch,
    checkpoint_hash, corrupt_id, lease_failure, stored_hash,
};
use crate::telemetry::{self, DbOperation};

const SQL_ACQUIRE_SHARD: &str = include_str!("sql/acquire_shard.sql");
const SQL_RENEW_SHARD: &str = include_str!("sql/renew_shard.sql");
const SQL_RELEASE_SHARD: &str = include_str!("sql/release_shard.sql");
const SQL_SHARD_STATE: &str = include_str!("sql/shard_state.sql");
const SQL_LIST_SHARDS: &str = include_str!("sql/list_shards.sql");
const SQL_READ_RANGE: &str = include_str!("sql/read_range.sql");
const SQL_SEQUENCE_AT: &str = include_str!("sql/sequence_at.sql");
const SQL_CHECKPOINT_TARGET: &str = include_str!("sql/checkpoint_target.sql");
const SQL_COMMIT_CHECKPOINT: &str = include_str!("sql/commit_checkpoint.sql");
const SQL_READ_CHECKPOINTS: &str = include_str!("sql/read_checkpoints.sql");
const SQL_READ_CHECKPOINT_PAGE: &str = include_str!("sql/read_checkpoint_page.sql");
const SQL_LOCK_SHARD_FOR_SNAPSHOT: &str = include_str!("sql/lock_shard_for_snapshot.sql");
const SQL_UPSERT_SNAPSHOT: &str = include_str!("sql/upsert_snapshot.sql");
const SQL_READ_SNAPSHOT: &str = include_str!("sql/read_snapshot.sql");
const SQL_RETENTION_PLAN: &str = include_str!("sql/retention_plan.sql");
const SQL_RETENTION_TRIM: &str = include_str!("sql/retention_trim.sql");

/// The PostgreSQL [`LogStore`]. Cheap to clone; clones share the pool,
/// committers and listener.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Deadline of each operation once it holds a connection.
    timeout: Duration,
    committers: Vec<mpsc::UnboundedSender<Pending>>,
    pending_events: Arc<AtomicUsize>,
    changes: broadcast::Sender<LogChange>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("pool", &self.inner.pool.status()).finish_non_exhaustive()
    }
}

/// Prepares the connection settings and the TLS connector for `tls`.
async fn tls_setup(
    mut config: tokio_postgres::Config,
    tls: &DatabaseTls,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), StoreError> {
    pool::apply_tls_mode(&mut config, tls);
    let connector = pool::tls_connector(tls)
        .await
        .map_err(|err| StoreError::Internal { what: "configure TLS to PostgreSQL", source: Box::new(err) })?;
    Ok((config, connector))
}

/// Connects one client outside the pool (for `migrate` and checks), with
/// TLS when the server offers it.
pub async fn connect_client(url: &str) -> Result<tokio_postgres::Client, StoreError> {
    connect_client_with(url, &DatabaseTls::Prefer).await
}

/// Connects one client outside the pool with the given TLS mode.
pub async fn connect_client_with(url: &str, tls: &DatabaseTls) -> Result<tokio_postgres::Client, StoreError> {
    let (config, connector) = tls_setup(pool::connection_config(url)?, tls).await?;
    let (client, connection) =
        config.connect(connector).await.map_err(|err| store_error("connect to PostgreSQL", err))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "database connection closed");
        }
    });
    Ok(client)
}

/// Applies the migrations to the database at `url` (see [`schema::migrate`]).
pub async fn migrate(url: &str) -> Result<schema::MigrationReport, StoreError> {
    let mut client = connect_client(url).await?;
    Ok(schema::migrate(&mut client).await?)
}

/// Applies the migrations to the database `config` names, with its TLS
/// settings (what `omnirelay-hub migrate` runs).
pub async fn migrate_with(config: &PgStoreConfig) -> Result<schema::MigrationReport, StoreError> {
    let mut client = connect_client_with(&config.url, &config.tls).await?;
    Ok(schema::migrate(&mut client).await?)
}

impl PgStore {
    /// Connects, checks the schema version (refusing a database that needs
    /// `omnirelay-hub migrate`), and starts the committers and the
    /// notification listener.
    pub async fn open(config: PgStoreConfig) -> Result<PgStore, StoreError> {
        let (connection, connector) = tls_setup(pool::connection_config(&config.url)?, &config.tls).await?;
        let pool = pool::build_pool(connection.clone(), connector.clone(), config.pool_size)
            .map_err(|err| StoreError::Internal { what: "build the connection pool", source: Box::new(err) })?;
        {
            let client = pool.get().await.map_err(pool_error)?;
            schema::check(&client).await?;
        }
        let (changes, _) = broadcast::channel(defaults::CHANGES_BUFFER);
        let pending_events = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut committers = Vec::new();
        for _ in 0..config.committers.max(1) {
            let (queue, receiver) = mpsc::unbounded_channel();
            let committer = Committer {
                pool: pool.clone(),
                timeout: config.timeout,
                prediction: Default::default(),
                changes: changes.clone(),
                pending_events: pending_events.clone(),
            };
            tasks.spawn(committer.run(receiver, cancel.clone()));
            committers.push(queue);
        }
        tasks.spawn(listener::run(connection, connector, changes.clone(), cancel.clone()));
        tasks.close();
        let timeout = config.timeout;
        Ok(PgStore { inner: Arc::new(Inner { pool, timeout, committers, pending_events, changes, cancel, tasks }) })
    }

    /// The connection pool (for statistics).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    async fn client(&self) -> Result<Conn, StoreError> {
        Conn::get(&self.inner.pool).await
    }

    /// Runs `operation` within the store's deadline.
    fn within<'a, T: Send + 'a>(
        &self,
        what: &'static str,
        operation: impl Future<Output = Result<T, StoreError>> + Send + 'a,
    ) -> StoreFuture<'a, T> {
        Box::pin(within(what, self.inner.timeout, operation))
    }

    async fn query(
        &self,
        what: &'static str,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let rows = async {
            let statement = client.prepare_cached(sql).await?;
            client.query(&statement, params).await
        }
        .await
        .map_err(|err| store_error(what, err));
        client.release();
        rows
    }

    async fn query_opt(
        &self,
        what: &'static str,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.query(what, sql, params).await?.into_iter().next())
    }

    async fn state(&self, shard: &ShardId) -> Result<Option<ShardState>, StoreError> {
        self.query_opt("read a shard", SQL_SHARD_STATE, &[&shard.as_str()]).await?.as_ref().map(shard_state).transpose()
    }
}

impl LogStore for PgStore {
    fn append(&self, batch: AppendBatch) -> StoreFuture<'static, AppendAck> {
        let queued = (|| {
            check_batch(&batch)?;
            let events = batch.events.len();
            admit(&self.inner.pending_events, events)?;
            // One committer per shard, so a shard's batches commit in the
            // order they were appended.
            let index = committer_index(&batch.shard, self.inner.committers.len());
            let (reply, answer) = oneshot::channel();
            if self.inner.committers[index].send(Pending { batch, reply }).is_err() {
                self.inner.pending_events.fetch_sub(events, Ordering::Relaxed);
                return Err(StoreError::Closed);
            }
            Ok(answer)
        })();
        Box::pin(async move {
            // A dropped reply means the committer stopped before answering.
            queued?.await.unwrap_or(Err(StoreError::Closed))
        })
    }

    fn acquire_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        ttl: Duration,
    ) -> StoreFuture<'_, LeaseGrant> {
        self.within("acquire a shard", async move {
            let ttl = millis(ttl)?;
            let principal = principal.as_ref().map(Principal::as_str);
            let granted = self
                .query_opt("acquire a shard", SQL_ACQUIRE_SHARD, &[&shard.as_str(), &owner.as_str(), &ttl, &principal])
                .await?;
            match granted {
                Some(row) => Ok(LeaseGrant { granted: true, lease: lease(&row)? }),
                None => {
                    let state = self.state(&shard).await?.ok_or_else(|| StoreError::Internal {
                        what: "acquire a shard",
                        source: "the shard vanished after its row was created".into(),
                    })?;
                    Ok(LeaseGrant { granted: false, lease: state.lease })
                }
            }
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
        self.within("renew a shard", async move {
            let ttl = millis(ttl)?;
            let epoch_db = to_db("epoch", epoch.0)?;
            let principal = principal.as_ref().map(Principal::as_str);
            let renewed = self
                .query_opt(
                    "renew a shard",
                    SQL_RENEW_SHARD,
                    &[&shard.as_str(), &owner.as_str(), &epoch_db, &ttl, &principal],
                )
                .await?;
            match renewed {
                Some(row) => lease(&row),
                None => Err(lease_failure(self.state(&shard).await, shard, epoch)),
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
        self.within("release a shard", async move {
            let epoch = to_db("epoch", epoch.0)?;
            let principal = principal.as_ref().map(Principal::as_str);
            let client = self.client().await?;
            let released = async {
                let statement = client.prepare_cached(SQL_RELEASE_SHARD).await?;
                client.execute(&statement, &[&shard.as_str(), &owner.as_str(), &epoch, &principal]).await
            }
            .await
            .map_err(|err| store_error("release a shard", err));
            client.release();
            Ok(released? == 1)
        })
    }

    fn shard_state(&self, shard: ShardId) -> StoreFuture<'_, Option<ShardState>> {
        self.within("read a shard", async move { self.state(&shard).await })
    }

    fn list_shards(&self, prefix: String) -> StoreFuture<'_, Vec<ShardState>> {
        self.within("list shards", async move {
            self.query("list shards", SQL_LIST_SHARDS, &[&prefix]).await?.iter().map(shard_state).collect()
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
        self.within("read events", async move {
            if from.0 == 0 {
                return Err(InvalidInput::new("from_sequence", "sequences start at 1").into());
            }
            let from_db_value = to_db("from_sequence", from.0)?;
            let to_db_value = match to {
                Some(to) => to_db("to_sequence", to.0)?,
                None => i64::MAX,
            };
            let limit_db = i64::try_from(limit).unwrap_or(i64::MAX - 1).min(i64::MAX - 1);
            let bytes_db = i64::try_from(max_bytes).unwrap_or(i64::MAX);
            let rows = self
                .query(
                    "read events",
                    SQL_READ_RANGE,
                    &[&shard.as_str(), &from_db_value, &to_db_value, &limit_db, &bytes_db],
                )
                .await?;
            let Some(first) = rows.first() else { return Err(StoreError::UnknownShard { shard }) };
            let head = Sequence(from_db(col(first, "head_sequence")?)?);
            let low = Sequence(from_db(col(first, "low_sequence")?)?);
            if from < low {
                return Err(StoreError::Trimmed { shard, low });
            }
            let mut anchor = None;
            let mut stored = Vec::with_capacity(rows.len());
            for row in &rows {
                let Some(sequence) = col::<Option<i64>>(row, "sequence")? else { continue };
                let sequence = Sequence(from_db(sequence)?);
                let hash: Vec<u8> = col(row, "hash")?;
                if sequence < from {
                    anchor = Some(ChainHash::from_slice(&hash).unwrap_or(ChainHash::ZERO));
                    continue;
                }
                if stored.len() == limit {
                    break;
                }
                stored.push(StoredRow {
                    sequence,
                    epoch: Epoch(from_db(col(row, "epoch")?)?),
                    recorded_at: col(row, "recorded_at")?,
                    body: Bytes::from(col::<Vec<u8>>(row, "body")?),
                    hash: Bytes::from(hash),
                });
            }
            let low_prev_hash = stored_hash(col(first, "low_prev_hash")?, "low_prev_hash")?;
            let cut = stored.iter().map(|row| row.body.len()).sum::<usize>() >= max_bytes.max(1);
            Ok(EventPage::assemble(shard, from, to, limit, anchor, stored, (head, low, low_prev_hash), cut))
        })
    }

    fn sequence_at(&self, shard: ShardId, since: SystemTime) -> StoreFuture<'_, Option<Sequence>> {
        self.within("find a sequence by time", async move {
            let row = self.query_opt("find a sequence by time", SQL_SEQUENCE_AT, &[&shard.as_str(), &since]).await?;
            row.map(|row| Ok(Sequence(from_db(col(&row, "sequence")?)?))).transpose()
        })
    }

    fn commit_checkpoint(
        &self,
        subscriber: SubscriberId,
        shard: ShardId,
        sequence: Sequence,
        hash: Option<ChainHash>,
    ) -> StoreFuture<'_, CheckpointCommit> {
        self.within("commit a checkpoint", async move {
            let what = "commit a checkpoint";
            let sequence_db = to_db("sequence", sequence.0)?;
            let target = self.query_opt(what, SQL_CHECKPOINT_TARGET, &[&shard.as_str(), &sequence_db]).await?;
            let Some(target) = target else { return Err(StoreError::UnknownShard { shard }) };
            let shard_no: i32 = col(&target, "shard_no")?;
            let recorded = checkpoint_hash(
                &subscriber,
                &shard,
                sequence,
                hash,
                &CheckpointTarget {
                    head: Sequence(from_db(col(&target, "head_sequence")?)?),
                    low: Sequence(from_db(col(&target, "low_sequence")?)?),
                    low_prev_hash: stored_hash(col(&target, "low_prev_hash")?, "low_prev_hash")?,
                    stored: col::<Option<Vec<u8>>>(&target, "hash")?
                        .map(|stored| stored_hash(stored, "hash"))
                        .transpose()?,
                },
            )?;
            let recorded_db = recorded.as_ref().map(|hash| hash.as_bytes().as_slice());
            let moved = self
                .query_opt(what, SQL_COMMIT_CHECKPOINT, &[&subscriber.as_str(), &shard_no, &sequence_db, &recorded_db])
                .await?;
            if let Some(row) = moved {
                let checkpoint = Checkpoint {
                    subscriber,
                    shard,
                    sequence: Sequence(from_db(col(&row, "sequence")?)?),
                    updated_at: col(&row, "updated_at")?,
                    hash: col::<Option<Vec<u8>>>(&row, "hash")?.map(|hash| stored_hash(hash, "hash")).transpose()?,
                };
                return Ok(CheckpointCommit { checkpoint, moved: true });
            }
            let current =
                self.checkpoints(Some(subscriber), vec![shard]).await?.into_iter().next().ok_or_else(|| {
                    StoreError::Internal { what, source: "a checkpoint that refused to move is missing".into() }
                })?;
            Ok(CheckpointCommit { checkpoint: current, moved: false })
        })
    }

    fn checkpoints(&self, subscriber: Option<SubscriberId>, shards: Vec<ShardId>) -> StoreFuture<'_, Vec<Checkpoint>> {
        self.within("read checkpoints", async move {
            let subscriber_name = subscriber.as_ref().map(SubscriberId::as_str);
            let shard_names: Vec<&str> = shards.iter().map(ShardId::as_str).collect();
            let rows = self.query("read checkpoints", SQL_READ_CHECKPOINTS, &[&subscriber_name, &shard_names]).await?;
            rows.iter().map(checkpoint_row).collect()
        })
    }

    fn checkpoint_page(
        &self,
        subscriber: Option<SubscriberId>,
        shards: Vec<ShardId>,
        after: Option<(SubscriberId, ShardId)>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Checkpoint>> {
        self.within("read checkpoints", async move {
            let subscriber_name = subscriber.as_ref().map(SubscriberId::as_str);
            let shard_names: Vec<&str> = shards.iter().map(ShardId::as_str).collect();
            let after_subscriber = after.as_ref().map(|(subscriber, _)| subscriber.as_str());
            let after_shard = after.as_ref().map(|(_, shard)| shard.as_str());
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = self
                .query(
                    "read checkpoints",
                    SQL_READ_CHECKPOINT_PAGE,
                    &[&subscriber_name, &shard_names, &after_subscriber, &after_shard, &limit],
                )
                .await?;
            rows.iter().map(checkpoint_row).collect()
        })
    }

    fn put_snapshot(&self, shard: ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> StoreFuture<'_, Snapshot> {
        self.within("store a snapshot", async move {
            let what = "store a snapshot";
            let sequence_db = to_db("sequence", sequence.0)?;
            let epoch_db = to_db("epoch", epoch.0)?;
            let mut client = self.client().await?;
            let outcome = async {
                let txn = client.transaction().await.map_err(|err| store_error(what, err))?;
                let lock =
                    txn.prepare_cached(SQL_LOCK_SHARD_FOR_SNAPSHOT).await.map_err(|err| store_error(what, err))?;
                let row = txn
                    .query_opt(&lock, &[&shard.as_str(), &sequence_db])
                    .await
                    .map_err(|err| store_error(what, err))?;
                let Some(row) = row else { return Err(StoreError::UnknownShard { shard }) };
                let current = Epoch(from_db(col(&row, "epoch")?)?);
                if col::<Option<String>>(&row, "owner")?.is_none() {
                    return Err(StoreError::NoLease { shard });
                }
                if current != epoch {
                    return Err(StoreError::StaleEpoch { shard, given: epoch, current });
                }
                let head = Sequence(from_db(col(&row, "head_sequence")?)?);
                let low = Sequence(from_db(col(&row, "low_sequence")?)?);
                if sequence.0 == 0 || sequence > head {
                    return Err(InvalidInput::new(
                        "sequence",
                        format!("{sequence} is outside the log of shard {shard} (1 through the head {head})"),
                    )
                    .into());
                }
                let hash = if sequence.next() == low {
                    stored_hash(col(&row, "low_prev_hash")?, "low_prev_hash")?
                } else if sequence < low {
                    return Err(StoreError::Trimmed { shard, low });
                } else {
                    match col::<Option<Vec<u8>>>(&row, "event_hash")? {
                        Some(hash) => stored_hash(hash, "hash")?,
                        None => {
                            return Err(event::CorruptEvent {
                                shard,
                                sequence,
                                reason: "missing from the stored log".into(),
                            }
                            .into());
                        }
                    }
                };
                let shard_no: i32 = col(&row, "shard_no")?;
                let upsert = txn.prepare_cached(SQL_UPSERT_SNAPSHOT).await.map_err(|err| store_error(what, err))?;
                let stored = txn
                    .query_one(
                        &upsert,
                        &[&shard_no, &sequence_db, &epoch_db, &data.as_ref(), &hash.as_bytes().as_slice()],
                    )
                    .await
                    .map_err(|err| store_error(what, err))?;
                let created_at = col(&stored, "created_at")?;
                txn.commit().await.map_err(|err| store_error(what, err))?;
                Ok(Snapshot { shard, sequence, data, hash, created_at })
            }
            .await;
            // Whatever the outcome, the transaction ended (a refusal rolls
            // it back as it drops): the connection may serve others.
            client.release();
            outcome
        })
    }

    fn snapshot(&self, shard: ShardId, at_or_below: Option<Sequence>) -> StoreFuture<'_, Option<Snapshot>> {
        self.within("read a snapshot", async move {
            let below = match at_or_below {
                Some(sequence) => to_db("at_or_below", sequence.0)?,
                None => i64::MAX,
            };
            let row = self.query_opt("read a snapshot", SQL_READ_SNAPSHOT, &[&shard.as_str(), &below]).await?;
            row.map(|row| {
                Ok(Snapshot {
                    shard,
                    sequence: Sequence(from_db(col(&row, "sequence")?)?),
                    data: Bytes::from(col::<Vec<u8>>(&row, "data")?),
                    hash: stored_hash(col(&row, "hash")?, "hash")?,
                    created_at: col(&row, "created_at")?,
                })
            })
            .transpose()
        })
    }

    fn apply_retention(&self, shard: ShardId, policy: RetentionPolicy) -> StoreFuture<'_, RetentionOutcome> {
        Box::pin(within("apply retention", defaults::RETENTION_TIMEOUT, async move {
            let what = "apply retention";
            let max_age = millis(policy.checkpoint_max_age)?;
            let mut client = self.client().await?;
            let outcome = async {
                let txn = client.transaction().await.map_err(|err| store_error(what, err))?;
                let plan = txn.prepare_cached(SQL_RETENTION_PLAN).await.map_err(|err| store_error(what, err))?;
                let row =
                    txn.query_opt(&plan, &[&shard.as_str(), &max_age]).await.map_err(|err| store_error(what, err))?;
                let Some(row) = row else { return Err(StoreError::UnknownShard { shard }) };
                let low = Sequence(from_db(col(&row, "low_sequence")?)?);
                let snapshot: Option<i64> = col(&row, "newest_snapshot")?;
                let checkpoint: Option<i64> = col(&row, "oldest_checkpoint")?;
                let Some(snapshot) = snapshot else { return Ok(RetentionOutcome { deleted: 0, low }) };
                let through = match checkpoint {
                    Some(checkpoint) => snapshot.min(checkpoint),
                    None => snapshot,
                };
                if from_db(through)? < low.0 {
                    return Ok(RetentionOutcome { deleted: 0, low });
                }
                let shard_no: i32 = col(&row, "shard_no")?;
                let trim = txn.prepare_cached(SQL_RETENTION_TRIM).await.map_err(|err| store_error(what, err))?;
                let trimmed =
                    txn.query_one(&trim, &[&shard_no, &through]).await.map_err(|err| store_error(what, err))?;
                let deleted: i64 = col(&trimmed, "deleted")?;
                txn.commit().await.map_err(|err| store_error(what, err))?;
                Ok(RetentionOutcome { deleted: from_db(deleted)?, low: Sequence(from_db(through)? + 1) })
            }
            .await;
            // Whatever the outcome, the transaction ended (a refusal rolls
            // it back as it drops): the connection may serve others.
            client.release();
            outcome
        }))
    }

    fn changes(&self) -> broadcast::Receiver<LogChange> {
        self.inner.changes.subscribe()
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.inner.cancel.cancel();
            self.inner.tasks.wait().await;
            self.inner.pool.close();
            Ok(())
        })
    }
}

/// Spreads shards over committers by a stable hash of the id.
fn committer_index(shard: &ShardId, committers: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    shard.hash(&mut hasher);
    (hasher.finish() % committers.max(1) as u64) as usize
}

fn millis(duration: Duration) -> Result<i64, StoreError> {
    i64::try_from(duration.as_millis()).map_err(|_| InvalidInput::new("ttl", "is too long").into())
}

/// A checkpoint as `read_checkpoints.sql` and `read_checkpoint_page.sql`
/// return it.
fn checkpoint_row(row: &tokio_postgres::Row) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        subscriber: SubscriberId::parse(col::<String>(row, "subscriber_id")?).map_err(corrupt_id)?,
        shard: ShardId::parse(col::<String>(row, "shard_id")?).map_err(corrupt_id)?,
        sequence: Sequence(from_db(col(row, "sequence")?)?),
        updated_at: col(row, "updated_at")?,
        hash: col::<Option<Vec<u8>>>(row, "hash")?.map(|hash| stored_hash(hash, "hash")).transpose()?,
    })
}

fn lease(row: &Row) -> Result<ShardLease, StoreError> {
    Ok(ShardLease {
        shard: ShardId::parse(col::<String>(row, "shard_id")?).map_err(corrupt_id)?,
        owner: col::<Option<String>>(row, "owner")?.map(OwnerId::parse).transpose().map_err(corrupt_id)?,
        epoch: Epoch(from_db(col(row, "epoch")?)?),
        head: Sequence(from_db(col(row, "head_sequence")?)?),
        expires_at: col(row, "lease_expires_at")?,
    })
}

fn shard_state(row: &Row) -> Result<ShardState, StoreError> {
    Ok(ShardState {
        lease: lease(row)?,
        head_hash: stored_hash(col(row, "head_hash")?, "head_hash")?,
        low: Sequence(from_db(col(row, "low_sequence")?)?),
        low_prev_hash: stored_hash(col(row, "low_prev_hash")?, "low_prev_hash")?,
    })
}

impl From<SchemaError> for StoreError {
    fn from(err: SchemaError) -> Self {
        match err {
            SchemaError::Database { what, source } => store_error(what, source),
            other => StoreError::Schema(Box::new(other)),
        }
    }
}

/// The PostgreSQL store is ready when a pooled connection answers and the
/// database carries the schema this build needs.
impl Probe for PgStore {
    fn check(&self) -> ProbeFuture<'_> {
        Box::pin(probe(self.pool()))
    }

    fn record_gauges(&self) {
        pool::record_pool_gauges(self.pool());
    }
}

async fn probe(pool: &Pool) -> Result<(), NotReady> {
    let started = std::time::Instant::now();
    let result = async {
        // The whole chain: the pool's "error creating a new object: db
        // error" says nothing without PostgreSQL's own message after it.
        let client = pool.get().await.map_err(|err| NotReady::Unreachable(crate::store::causes(&err)))?;
        // A probe cut short by its timeout closes its connection rather
        // than pool it with a query in flight.
        let client = Conn::lend(client);
        schema::check(&client).await.map_err(|err| match err {
            SchemaError::Database { source, .. } => NotReady::Unreachable(crate::store::causes(&source)),
            other => NotReady::Schema(other.to_string()),
        })?;
        client.release();
        Ok(())
    }
    .await;
    telemetry::record_db_operation(DbOperation::Probe, started.elapsed(), result.is_ok());
    result
}
