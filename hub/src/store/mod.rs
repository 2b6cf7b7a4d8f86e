//! The storage boundary of the hub: the [`LogStore`] trait, the values it
//! takes and returns, and its error type.
//!
//! A log store keeps, per shard: the ordered, hash-chained event log; the
//! shard lease (owner, epoch, expiry); producers' batch records (so retries
//! are recognised); subscribers' checkpoints; snapshots; and the retention
//! low-water mark. The store is the only source of truth: nothing the hub
//! decides (epochs, heads, dedupe) is cached in memory across requests.
//!
//! Implementations: [`postgres::PgStore`] (the production store, any number of
//! hub replicas on one database) and the embedded SQLite store (one replica).
//! Both pass the same contract suite, `store::contract` (feature
//! `contract-tests`), which pins every behaviour documented here.
//!
//! The trait returns boxed futures so the hub can hold an
//! `Arc<dyn LogStore>` chosen at start-up; the allocation is negligible next
//! to a database round trip.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::broadcast;

use crate::log::event::{ChainHash, CorruptEvent, LogEvent, NewEvent};
use crate::log::ids::{Epoch, InvalidInput, OwnerId, ProducerId, ProducerSeq, Sequence, ShardId, SubscriberId};
use crate::security::principal::Principal;
use crate::telemetry::AppendOutcome;
pub use crate::telemetry::Fault;

#[cfg(feature = "contract-tests")]
pub mod contract;
pub(crate) mod decision;
pub mod metered;
pub mod postgres;
pub mod sqlite;

/// A store operation in flight.
pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// Result type of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A boxed error source (driver, pool, I/O).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One producer batch for one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendBatch {
    /// Shard to append to.
    pub shard: ShardId,
    /// Producer sending the batch.
    pub producer: ProducerId,
    /// The producer's batch counter on this shard.
    pub producer_seq: ProducerSeq,
    /// Lease epoch the producer holds; must be the shard's current epoch.
    pub epoch: Epoch,
    /// The sequence the producer expects the first event to get; when set,
    /// a new batch is written only if it is the shard's next sequence.
    pub expected_first: Option<Sequence>,
    /// Events in order; at least one.
    pub events: Vec<NewEvent>,
}

/// Sequences assigned to an accepted batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendAck {
    /// Sequence of the batch's first event.
    pub first: Sequence,
    /// Sequence of the batch's last event.
    pub last: Sequence,
    /// True when the batch had been written before (a retry); nothing was
    /// written this time.
    pub duplicate: bool,
    /// Chain hash of the batch's last event.
    pub last_hash: ChainHash,
}

/// A shard's lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLease {
    /// Shard.
    pub shard: ShardId,
    /// Current holder; `None` when free (never granted or released).
    pub owner: Option<OwnerId>,
    /// Epoch of the latest grant (0 if never granted).
    pub epoch: Epoch,
    /// Last sequence of the shard's log.
    pub head: Sequence,
    /// When the lease lapses, by the store's clock; `None` when free.
    pub expires_at: Option<SystemTime>,
}

/// Outcome of an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    /// True when the caller now holds the lease, under a new epoch.
    pub granted: bool,
    /// The lease after the call: the caller's when granted, else the holder's.
    pub lease: ShardLease,
}

/// Everything the store knows about a shard apart from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardState {
    /// Lease and head.
    pub lease: ShardLease,
    /// Chain hash of the head event ([`ChainHash::ZERO`] when empty).
    pub head_hash: ChainHash,
    /// Lowest sequence still stored; events below were trimmed. Equals
    /// `head + 1` when every event was trimmed, 1 when none ever was.
    pub low: Sequence,
    /// Chain hash of the event just below `low` (the last trimmed one), so
    /// the first stored event can still be verified.
    pub low_prev_hash: ChainHash,
}

/// Consecutive events read from a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPage {
    /// Shard.
    pub shard: ShardId,
    /// The requested first sequence; `events` start there unless empty.
    pub from: Sequence,
    /// Stored hash of the event before `from` (the chain anchor).
    pub anchor: ChainHash,
    /// Events as stored, linked (`prev_hash` is the stored hash of the row
    /// before), not yet verified; see [`EventPage::verify`].
    pub events: Vec<LogEvent>,
    /// Head of the shard when read.
    pub head: Sequence,
    /// Lowest stored sequence when read.
    pub low: Sequence,
    /// The last sequence this page must reach if the log is intact: the
    /// requested end, capped by the head and the read's limit, or the last
    /// event read when the byte cap stopped the read (`from - 1` when
    /// nothing is due). Fewer events means stored rows are missing.
    pub through: Sequence,
    /// True when the event just before `from` should be stored (it is at or
    /// above the low-water mark and at or below the head) but is not: a
    /// hole right before the page, which no event of the page can be
    /// checked against.
    pub anchor_missing: bool,
}

impl EventPage {
    /// Builds a page from what a store read in one snapshot: the anchor row
    /// (the stored hash of `from - 1`, if that row came back), the rows from
    /// `from` on (at most `limit`), and the shard's head, low-water mark and
    /// its anchor hash. Both stores build pages here, so they judge a hole
    /// alike.
    #[allow(clippy::too_many_arguments)] // One call per store; a struct would only rename them.
    pub(crate) fn assemble(
        shard: ShardId,
        from: Sequence,
        to: Option<Sequence>,
        limit: usize,
        anchor: Option<ChainHash>,
        rows: Vec<crate::log::event::StoredRow>,
        state: (Sequence, Sequence, ChainHash),
        cut: bool,
    ) -> EventPage {
        let (head, low, low_prev_hash) = state;
        let (anchor, anchor_missing) = match anchor {
            Some(hash) => (hash, false),
            // Not stored because it was trimmed: the low-water anchor.
            None if from == low => (low_prev_hash, false),
            // Below 1 (the zero hash), or past the head (nothing to link).
            None if from <= low || from.prev() > head => (ChainHash::ZERO, false),
            // Should be stored and is not: a hole. The zero anchor makes the
            // first event fail too, should a reader skip this flag.
            None => (ChainHash::ZERO, true),
        };
        let end = to.map_or(head, |to| to.min(head));
        let by_limit = Sequence(from.0.saturating_add(limit as u64).saturating_sub(1));
        let through = match rows.last() {
            // Stopped by the byte cap: nothing is promised past what came.
            Some(last) if cut => last.sequence,
            _ if limit == 0 => from.prev(),
            _ => end.min(by_limit),
        };
        EventPage {
            events: crate::log::event::link(anchor, rows),
            shard,
            from,
            anchor,
            head,
            low,
            through: through.max(from.prev()),
            anchor_missing,
        }
    }

    /// Checks the page as every reader must before serving any of it: the
    /// event before it is stored, each event is where it belongs, links to
    /// the one before and matches its hash, and no event the page should
    /// hold is missing, at its start, middle or end. Returns the first
    /// corrupt (or missing) sequence; every event before it is valid.
    ///
    /// A body that does not decode is the one check left to the readers
    /// that decode it (see [`crate::log::verify::decode_page`]).
    pub fn verify(&self) -> Result<(), CorruptEvent> {
        if self.anchor_missing {
            return Err(CorruptEvent {
                shard: self.shard.clone(),
                sequence: self.from.prev(),
                reason: format!("missing from the stored log (the head is {})", self.head),
            });
        }
        crate::log::event::verify(&self.shard, self.from, &self.anchor, &self.events)?;
        let held = self.events.len() as u64;
        if self.through >= self.from && held < self.through.0 - self.from.0 + 1 {
            return Err(CorruptEvent {
                shard: self.shard.clone(),
                sequence: Sequence(self.from.0 + held),
                reason: format!("missing from the stored log (the head is {})", self.head),
            });
        }
        Ok(())
    }
}

/// A subscriber's position on one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Subscriber.
    pub subscriber: SubscriberId,
    /// Shard.
    pub shard: ShardId,
    /// Last sequence the subscriber fully processed.
    pub sequence: Sequence,
    /// When it last moved, by the store's clock.
    pub updated_at: SystemTime,
    /// Chain hash of the event at `sequence` (see
    /// [`LogStore::commit_checkpoint`]); `None` for checkpoints stored
    /// without one.
    pub hash: Option<ChainHash>,
}

/// Outcome of a checkpoint commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointCommit {
    /// The stored checkpoint after the commit.
    pub checkpoint: Checkpoint,
    /// False when it was already at or past the requested sequence.
    pub moved: bool,
}

/// A queue snapshot tied to a position of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Shard.
    pub shard: ShardId,
    /// The snapshot reflects every event up to and including this one.
    pub sequence: Sequence,
    /// Opaque snapshot bytes.
    pub data: Bytes,
    /// Chain hash of the event at `sequence`.
    pub hash: ChainHash,
    /// When it was stored, by the store's clock.
    pub created_at: SystemTime,
}

/// What retention may trim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Checkpoints updated within this age hold events back; older ones
    /// belong to subscribers presumed gone, which get the snapshot and then
    /// the tail when they return.
    pub checkpoint_max_age: Duration,
}

/// What retention did on one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Events deleted by this run.
    pub deleted: u64,
    /// Lowest stored sequence afterwards.
    pub low: Sequence,
}

/// A change to the logs, announced to the hub's live tail.
#[derive(Debug, Clone)]
pub enum LogChange {
    /// A shard's head moved. `events`, when present, are the newly committed
    /// events ending at `head` (verified by construction: this process
    /// chained them), so the tail need not read them back.
    Appended {
        /// Shard.
        shard: ShardId,
        /// New head.
        head: Sequence,
        /// The events up to `head`, when this process appended them.
        events: Option<Arc<[LogEvent]>>,
    },
    /// Changes may have been missed (a notification connection was lost):
    /// listeners must re-read the heads they care about.
    Resync,
}

/// Failures of a store operation; each variant is a case callers handle
/// differently.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The batch or request carried an epoch that is not the shard's current
    /// one: another owner took over (or the caller never held this epoch).
    #[error("shard {shard}: epoch {given} is stale; the current epoch is {current}")]
    StaleEpoch {
        /// Shard.
        shard: ShardId,
        /// Epoch the caller sent.
        given: Epoch,
        /// The shard's current epoch.
        current: Epoch,
    },
    /// The shard has no lease holder (never acquired, or released).
    #[error("shard {shard} has no lease holder; acquire the shard first")]
    NoLease {
        /// Shard.
        shard: ShardId,
    },
    /// The shard's lease is held by another owner than the caller's (or,
    /// with principals, under another principal): a renew or release by a
    /// non-holder. Nothing changed.
    #[error("shard {shard}: the lease at epoch {epoch} is held by another owner; acquire the shard first")]
    NotHolder {
        /// Shard.
        shard: ShardId,
        /// The shard's current epoch.
        epoch: Epoch,
    },
    /// A position past the shard's head (a checkpoint, or where a
    /// subscription starts): nothing there was delivered yet.
    #[error("{field}: {sequence} is past the head {head} of shard {shard}; only delivered events can be named")]
    PastHead {
        /// The request field at fault.
        field: &'static str,
        /// Shard.
        shard: ShardId,
        /// The sequence named.
        sequence: Sequence,
        /// The shard's head.
        head: Sequence,
    },
    /// The shard does not exist (no lease was ever acquired on it).
    #[error("shard {shard} does not exist")]
    UnknownShard {
        /// Shard.
        shard: ShardId,
    },
    /// The batch's producer sequence skips ahead: an earlier batch of this
    /// producer was not written, so this one must wait for it.
    #[error("shard {shard}: producer {producer} sent producer_seq {given}; the next expected is {expected}")]
    OutOfOrder {
        /// Shard.
        shard: ShardId,
        /// Producer.
        producer: ProducerId,
        /// Producer sequence received.
        given: ProducerSeq,
        /// Producer sequence the store expects next.
        expected: ProducerSeq,
    },
    /// The batch expects to start at another sequence than the shard's next:
    /// a batch was written before it, or one its producer sent earlier was
    /// not. Nothing of it was written.
    #[error(
        "shard {shard}: the batch expects its first event at {expected}, but the log's head is {head}; nothing was written"
    )]
    HeadMismatch {
        /// Shard.
        shard: ShardId,
        /// The sequence the batch expected to start at.
        expected: Sequence,
        /// The shard's head.
        head: Sequence,
    },
    /// The requested events were trimmed by retention.
    #[error("shard {shard}: events below {low} were trimmed; start from the newest snapshot")]
    Trimmed {
        /// Shard.
        shard: ShardId,
        /// Lowest stored sequence.
        low: Sequence,
    },
    /// A stored event failed verification.
    #[error(transparent)]
    Corrupt(#[from] CorruptEvent),
    /// The request is invalid; the error names the field. Nothing changed.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// Too many appends are waiting; retry later.
    #[error("too many appends are waiting ({pending} events); retry later")]
    Overloaded {
        /// Events waiting when the batch was refused.
        pending: usize,
    },
    /// The store could not be reached; nothing was written unless a retry
    /// says otherwise (retries are idempotent).
    #[error("the log store is unavailable: {what}")]
    Unavailable {
        /// What was attempted.
        what: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The database does not carry the schema this build needs (at start-up).
    #[error(transparent)]
    Schema(Box<crate::store::postgres::schema::SchemaError>),
    /// The store is shutting down and accepts no more work.
    #[error("the log store is shutting down")]
    Closed,
    /// An unexpected failure (a bug, or a schema that does not match).
    #[error("internal store failure: {what}")]
    Internal {
        /// What was attempted.
        what: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
}

impl Fault {
    /// Classifies an error by walking its source chain for a driver error
    /// it knows (SQLite, PostgreSQL, the pool, a deadline).
    pub fn of(err: &(dyn std::error::Error + 'static)) -> Fault {
        let mut next = Some(err);
        while let Some(err) = next {
            if let Some(fault) = Fault::known(err) {
                return fault;
            }
            next = err.source();
        }
        Fault::Other
    }

    fn known(err: &(dyn std::error::Error + 'static)) -> Option<Fault> {
        use rusqlite::ErrorCode;
        use tokio_postgres::error::SqlState;
        if err.is::<Elapsed>() {
            return Some(Fault::Timeout);
        }
        if let Some(copied) = err.downcast_ref::<CopiedCause>() {
            return Some(copied.fault);
        }
        if let Some(err) = err.downcast_ref::<rusqlite::Error>() {
            return Some(match err.sqlite_error_code()? {
                ErrorCode::DiskFull => Fault::DiskFull,
                ErrorCode::ReadOnly => Fault::ReadOnly,
                ErrorCode::SystemIoFailure | ErrorCode::CannotOpen => Fault::Io,
                ErrorCode::OutOfMemory => Fault::Exhausted,
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => Fault::Unreachable,
                _ => Fault::Other,
            });
        }
        if let Some(err) = err.downcast_ref::<deadpool_postgres::PoolError>() {
            return match err {
                deadpool_postgres::PoolError::Timeout(_) => Some(Fault::Timeout),
                deadpool_postgres::PoolError::Closed => Some(Fault::Unreachable),
                // The backend error is the source: classified next.
                _ => None,
            };
        }
        if let Some(err) = err.downcast_ref::<tokio_postgres::Error>() {
            let Some(code) = err.code() else {
                if err.to_string().starts_with("timeout") {
                    return Some(Fault::Timeout);
                }
                // Closed connections, I/O and connect failures; the driver
                // has no other kind of outage without a SQLSTATE.
                return Some(Fault::Unreachable);
            };
            return Some(if *code == SqlState::DISK_FULL {
                Fault::DiskFull
            } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
                Fault::ReadOnly
            } else {
                match &code.code()[..2] {
                    "58" => Fault::Io,
                    "53" => Fault::Exhausted,
                    "08" | "57" => Fault::Unreachable,
                    _ => Fault::Other,
                }
            });
        }
        if let Some(err) = err.downcast_ref::<std::io::Error>() {
            return Some(match err.kind() {
                std::io::ErrorKind::StorageFull => Fault::DiskFull,
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied => Fault::ReadOnly,
                std::io::ErrorKind::TimedOut => Fault::Timeout,
                _ => Fault::Io,
            });
        }
        None
    }
}

/// A store operation got no answer within its deadline. The operation's
/// outcome is unknown to the hub: an append may still commit, and its
/// retry (same producer sequence) is then answered with the original
/// sequences.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no answer from the database within {after:?}")]
pub struct Elapsed {
    /// The deadline that passed.
    pub after: Duration,
}

/// How an append ended, classified for the metric label and the producer's
/// error code (the vocabulary is [`AppendOutcome`], in telemetry).
impl AppendOutcome {
    /// The outcome of an answered batch.
    pub fn of(result: &Result<AppendAck, StoreError>) -> Self {
        match result {
            Ok(ack) if ack.duplicate => AppendOutcome::Duplicate,
            Ok(_) => AppendOutcome::Appended,
            Err(err) => AppendOutcome::of_error(err),
        }
    }

    /// How a refused or failed batch ended: the one classification of
    /// append failures, shared by the metric label and the error code the
    /// producer is answered with (`error::append_error`).
    pub fn of_error(err: &StoreError) -> Self {
        match err {
            StoreError::StaleEpoch { .. } => AppendOutcome::StaleEpoch,
            // A shard nobody ever acquired has no lease holder either: the
            // producer's remedy (acquire the shard) is the same.
            StoreError::NoLease { .. } | StoreError::NotHolder { .. } | StoreError::UnknownShard { .. } => {
                AppendOutcome::NoLease
            }
            StoreError::OutOfOrder { .. } => AppendOutcome::OutOfOrder,
            StoreError::HeadMismatch { .. } => AppendOutcome::HeadMismatch,
            // Appending below the retention floor is a request that can never
            // succeed as sent.
            StoreError::Invalid(_) | StoreError::Trimmed { .. } | StoreError::PastHead { .. } => AppendOutcome::Invalid,
            StoreError::Unavailable { .. } | StoreError::Overloaded { .. } | StoreError::Closed => {
                AppendOutcome::Unavailable
            }
            StoreError::Corrupt(_) | StoreError::Schema(_) | StoreError::Internal { .. } => AppendOutcome::Failed,
        }
    }
}

/// An error and its sources as one line, `outer: inner: innermost`, for
/// logs and operators (never for clients: driver text may name tables or
/// files). A source whose text the previous one already ends with is
/// skipped, so wrappers that repeat their cause do not print it twice.
pub fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}

impl StoreError {
    /// The kind of outage, for a [`StoreError::Unavailable`]; `None` for
    /// any other error.
    pub fn fault(&self) -> Option<Fault> {
        match self {
            StoreError::Unavailable { source, .. } => Some(Fault::of(source.as_ref())),
            _ => None,
        }
    }
}

/// The hub's durable state. See the module documentation.
///
/// Every method's future is `Send` and may be awaited from any task. Methods
/// validate what only the store can judge (epochs, heads, existence); the
/// wire layer has already validated shapes (non-empty batches, id syntax).
pub trait LogStore: Send + Sync + 'static {
    /// Appends one batch and resolves once it is durable.
    ///
    /// - Sequences are gapless per shard, starting at 1, assigned atomically
    ///   with the write; the first event follows the shard's head.
    /// - The batch's epoch is compared with the shard's current epoch in the
    ///   same atomic step: a mismatch fails with [`StoreError::StaleEpoch`]
    ///   naming the current epoch; a shard with no holder fails with
    ///   [`StoreError::NoLease`]. Nothing of a failed batch is written.
    /// - Producer sequences are consecutive per `(shard, producer)`: a
    ///   producer's first batch may carry any number, each later one the
    ///   previous plus one. A batch at or below the last one is a retry: it
    ///   resolves to the original acknowledgement with `duplicate = true` and
    ///   writes nothing (no time window). A retry with another number of
    ///   events than the original fails with [`StoreError::Invalid`] on
    ///   `producer_seq`. Retention may drop the records of a producer's
    ///   older batches (never its latest); a retry of such a batch fails with
    ///   [`StoreError::Invalid`] and still writes nothing. A batch that skips
    ///   ahead fails with [`StoreError::OutOfOrder`]. The epoch and lease are
    ///   checked before the producer sequence, and a retry of a written batch
    ///   is acknowledged even after the epoch moved on (it is committed).
    /// - A new batch with `expected_first` set is written only if that is the
    ///   shard's next sequence; otherwise it fails with
    ///   [`StoreError::HeadMismatch`]. The checks run in the order of
    ///   the shared decision function (`store::decision::decide`).
    /// - Ordering: the batch is queued when `append` is called, not when the
    ///   future is first polled, so batches appended by one caller one after
    ///   the other are committed in that order even when their futures are
    ///   awaited together.
    fn append(&self, batch: AppendBatch) -> StoreFuture<'static, AppendAck>;

    /// Grants the shard's lease to `owner` for `ttl` when it is free, expired
    /// (by the store's clock) or already held by `owner`; every grant bumps
    /// the epoch. Creates the shard on first use. The lease is unbound: see
    /// [`LogStore::acquire_shard_as`].
    fn acquire_shard(&self, shard: ShardId, owner: OwnerId, ttl: Duration) -> StoreFuture<'_, LeaseGrant> {
        self.acquire_shard_as(shard, owner, None, ttl)
    }

    /// [`LogStore::acquire_shard`] bound to `principal`: the lease records
    /// the principal that took it, and a live lease already held by `owner`
    /// is granted again only to the same principal (or when it records none:
    /// a lease from before principals were recorded). Only that principal
    /// may then renew or release it.
    fn acquire_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        ttl: Duration,
    ) -> StoreFuture<'_, LeaseGrant>;

    /// Extends the lease held by `owner` at `epoch` to `ttl` from now. Fails
    /// with [`StoreError::StaleEpoch`] when the epoch moved on, with
    /// [`StoreError::NotHolder`] when someone else holds it and with
    /// [`StoreError::NoLease`] when the lease was released. A lease that lapsed but was not taken over can still be
    /// renewed: the epoch, not the expiry, fences writers.
    fn renew_shard(&self, shard: ShardId, owner: OwnerId, epoch: Epoch, ttl: Duration) -> StoreFuture<'_, ShardLease> {
        self.renew_shard_as(shard, owner, None, epoch, ttl)
    }

    /// [`LogStore::renew_shard`] by `principal`: a lease taken by another
    /// principal fails with [`StoreError::NotHolder`] and is not extended.
    fn renew_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        epoch: Epoch,
        ttl: Duration,
    ) -> StoreFuture<'_, ShardLease>;

    /// Frees the lease held by `owner` at `epoch`; false (and no change)
    /// when the caller did not hold it.
    fn release_shard(&self, shard: ShardId, owner: OwnerId, epoch: Epoch) -> StoreFuture<'_, bool> {
        self.release_shard_as(shard, owner, None, epoch)
    }

    /// [`LogStore::release_shard`] by `principal`: false (and no change)
    /// for a lease taken by another principal.
    fn release_shard_as(
        &self,
        shard: ShardId,
        owner: OwnerId,
        principal: Option<Principal>,
        epoch: Epoch,
    ) -> StoreFuture<'_, bool>;

    /// Reads one shard's state; `None` when the shard does not exist.
    fn shard_state(&self, shard: ShardId) -> StoreFuture<'_, Option<ShardState>>;

    /// Lists every shard whose id starts with `prefix` (all when empty), in
    /// id order.
    fn list_shards(&self, prefix: String) -> StoreFuture<'_, Vec<ShardState>>;

    /// Reads up to `limit` consecutive events from `from` (at least 1) to
    /// `to` inclusive (the head when `None`), as stored, and stops early once
    /// the bodies read reach `max_bytes`: an event is included while the
    /// bodies before it in the page total less than `max_bytes`, so a page
    /// holds at least one event and at most `max_bytes` plus one body. The
    /// page's `through` says where it should end. An empty page means
    /// nothing is stored in that range yet. Fails with
    /// [`StoreError::Trimmed`] when `from` is below the lowest stored
    /// sequence and [`StoreError::UnknownShard`] for a shard that does not
    /// exist.
    fn read_range(
        &self,
        shard: ShardId,
        from: Sequence,
        to: Option<Sequence>,
        limit: usize,
        max_bytes: usize,
    ) -> StoreFuture<'_, EventPage>;

    /// Returns the first stored sequence whose event was recorded at or after
    /// `since`, if any.
    fn sequence_at(&self, shard: ShardId, since: SystemTime) -> StoreFuture<'_, Option<Sequence>>;

    /// Moves a subscriber's checkpoint forward to `sequence`; never backwards
    /// (the answer says whether it moved). Fails with
    /// [`StoreError::PastHead`] when `sequence` is past the shard's head.
    ///
    /// The checkpoint records the chain hash of the event at `sequence`:
    /// `hash` when the subscriber sent one, else the log's. A given `hash`
    /// is checked against the log first (when the event is still stored, or
    /// is the last trimmed one): a mismatch fails with
    /// [`StoreError::Corrupt`] at `sequence` and nothing moves, because the
    /// log no longer holds what the subscriber received.
    fn commit_checkpoint(
        &self,
        subscriber: SubscriberId,
        shard: ShardId,
        sequence: Sequence,
        hash: Option<ChainHash>,
    ) -> StoreFuture<'_, CheckpointCommit>;

    /// Reads checkpoints: of one subscriber or all (`None`), on the listed
    /// shards or all (empty), ordered by subscriber then shard.
    fn checkpoints(&self, subscriber: Option<SubscriberId>, shards: Vec<ShardId>) -> StoreFuture<'_, Vec<Checkpoint>>;

    /// One page of [`LogStore::checkpoints`]: at most `limit` of them, after
    /// the `(subscriber, shard)` pair `after` when given, ordered by
    /// subscriber then shard in byte order. The provided implementation
    /// filters the whole list, which is right for a store that orders by
    /// bytes (SQLite); PostgreSQL orders by collation unless told, and reads
    /// one page with a keyset query instead.
    fn checkpoint_page(
        &self,
        subscriber: Option<SubscriberId>,
        shards: Vec<ShardId>,
        after: Option<(SubscriberId, ShardId)>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Checkpoint>> {
        let all = self.checkpoints(subscriber, shards);
        Box::pin(async move {
            let mut all = all.await?;
            all.sort_by(|a, b| {
                (a.subscriber.as_str(), a.shard.as_str()).cmp(&(b.subscriber.as_str(), b.shard.as_str()))
            });
            Ok(all
                .into_iter()
                .filter(|c| {
                    after.as_ref().is_none_or(|(subscriber, shard)| {
                        (c.subscriber.as_str(), c.shard.as_str()) > (subscriber.as_str(), shard.as_str())
                    })
                })
                .take(limit)
                .collect())
        })
    }

    /// Stores a snapshot taken at `sequence` by the owner at `epoch` (stale
    /// epochs are rejected like appends). `sequence` must be stored or be the
    /// last trimmed one (at least `low - 1`), at least 1 and at most the
    /// head; the snapshot records that event's hash. Storing the same
    /// sequence again replaces the data.
    fn put_snapshot(&self, shard: ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> StoreFuture<'_, Snapshot>;

    /// Returns the newest snapshot at or below `at_or_below` (the newest of
    /// all when `None`).
    fn snapshot(&self, shard: ShardId, at_or_below: Option<Sequence>) -> StoreFuture<'_, Option<Snapshot>>;

    /// Trims a shard's events up to the older of its newest snapshot and the
    /// oldest checkpoint that `policy` counts as required, atomically with
    /// moving the shard's low-water mark. Nothing is trimmed without a
    /// snapshot; snapshots older than the new low-water mark are deleted
    /// with the events.
    fn apply_retention(&self, shard: ShardId, policy: RetentionPolicy) -> StoreFuture<'_, RetentionOutcome>;

    /// Subscribes to changes: every commit's new heads (with the events when
    /// this process appended them) and resync signals. A receiver that lags
    /// must treat the lag as [`LogChange::Resync`].
    fn changes(&self) -> broadcast::Receiver<LogChange>;

    /// Stops accepting appends, finishes those already queued, and stops
    /// background tasks.
    fn close(&self) -> StoreFuture<'_, ()>;
}

/// Rejects an empty batch; shared by stores so they fail alike.
pub fn check_batch(batch: &AppendBatch) -> Result<()> {
    if batch.events.is_empty() {
        return Err(InvalidInput::new("events", "a batch needs at least one event").into());
    }
    Ok(())
}

/// Counts `events` into a store's commit queue, or refuses them with
/// [`StoreError::Overloaded`] past [`crate::defaults::MAX_PENDING_EVENTS`]
/// (a batch is always admitted while nothing waits, however large). The
/// caller subtracts them again once the batch is answered or not queued.
pub(crate) fn admit(pending: &AtomicUsize, events: usize) -> Result<()> {
    let before = pending.fetch_add(events, Ordering::Relaxed);
    if before + events > crate::defaults::MAX_PENDING_EVENTS && before > 0 {
        pending.fetch_sub(events, Ordering::Relaxed);
        return Err(StoreError::Overloaded { pending: before });
    }
    Ok(())
}

/// Why a renew or release found no lease to act on, judged from the shard's
/// state read after the refusal.
pub(crate) fn lease_failure(state: Result<Option<ShardState>>, shard: ShardId, epoch: Epoch) -> StoreError {
    match state {
        Ok(None) => StoreError::UnknownShard { shard },
        Ok(Some(state)) if state.lease.epoch != epoch => {
            StoreError::StaleEpoch { shard, given: epoch, current: state.lease.epoch }
        }
        Ok(Some(state)) if state.lease.owner.is_some() => StoreError::NotHolder { shard, epoch: state.lease.epoch },
        Ok(Some(_)) => StoreError::NoLease { shard },
        Err(err) => err,
    }
}

/// Refuses a retry whose event count differs from the batch written under
/// its producer sequence.
pub(crate) fn count_mismatch(batch: &AppendBatch, written: usize) -> StoreError {
    InvalidInput::new(
        "producer_seq",
        format!(
            "{} of producer {} was already written with {written} events, but this retry has {}; \
             a retry must resend the same batch",
            batch.producer_seq,
            batch.producer,
            batch.events.len()
        ),
    )
    .into()
}

/// The text and the [`Fault`] of an error copied for several receivers
/// (driver errors are not clonable).
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
struct CopiedCause {
    text: String,
    fault: Fault,
}

/// Copies an error for every batch of a failed group (sources are not
/// clonable, so the copy keeps their whole text and their [`Fault`]).
pub(crate) fn copy_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Unavailable { what, source } => StoreError::Unavailable {
            what,
            source: Box::new(CopiedCause { text: causes(source.as_ref()), fault: Fault::of(source.as_ref()) }),
        },
        StoreError::Internal { what, source } => StoreError::Internal { what, source: source.to_string().into() },
        StoreError::Closed => StoreError::Closed,
        other => StoreError::Internal { what: "append", source: other.to_string().into() },
    }
}

/// A chain hash as stored in `column`; anything but 32 bytes is a store bug.
pub(crate) fn stored_hash(bytes: Vec<u8>, column: &'static str) -> Result<ChainHash> {
    ChainHash::from_slice(&bytes).ok_or_else(|| StoreError::Internal {
        what: "decode a chain hash",
        source: format!("column {column} holds {} bytes, not 32", bytes.len()).into(),
    })
}

/// A stored id that no longer parses: the database was changed behind the
/// hub's back.
pub(crate) fn corrupt_id(err: InvalidInput) -> StoreError {
    StoreError::Internal { what: "decode a stored id", source: Box::new(err) }
}

/// What a store knows, in one snapshot, about the event a checkpoint commit
/// names: see [`checkpoint_hash`].
pub(crate) struct CheckpointTarget {
    /// The shard's head.
    pub(crate) head: Sequence,
    /// The shard's low-water mark.
    pub(crate) low: Sequence,
    /// Hash of the event just below the low-water mark.
    pub(crate) low_prev_hash: ChainHash,
    /// Stored hash of the event at the checkpoint's sequence, if stored.
    pub(crate) stored: Option<ChainHash>,
}

/// Decides the hash a checkpoint at `sequence` records (both stores decide
/// here): the log's hash of that event, checked against the subscriber's
/// `given` one. `None` when neither is known (the event was trimmed and the
/// subscriber sent none).
pub(crate) fn checkpoint_hash(
    subscriber: &SubscriberId,
    shard: &ShardId,
    sequence: Sequence,
    given: Option<ChainHash>,
    target: &CheckpointTarget,
) -> Result<Option<ChainHash>> {
    if sequence > target.head {
        return Err(StoreError::PastHead { field: "sequence", shard: shard.clone(), sequence, head: target.head });
    }
    let logged = if sequence.0 == 0 {
        Some(ChainHash::ZERO)
    } else if let Some(stored) = target.stored {
        Some(stored)
    } else if sequence.next() == target.low {
        Some(target.low_prev_hash)
    } else if sequence >= target.low {
        return Err(StoreError::Corrupt(CorruptEvent {
            shard: shard.clone(),
            sequence,
            reason: format!("missing from the stored log (the head is {})", target.head),
        }));
    } else {
        // Trimmed: the subscriber's word is all there is.
        None
    };
    match (given, logged) {
        (Some(given), Some(logged)) if given != logged => Err(StoreError::Corrupt(CorruptEvent {
            shard: shard.clone(),
            sequence,
            reason: format!(
                "its stored hash {logged} differs from the hash {given} subscriber {subscriber} received for it"
            ),
        })),
        (given, logged) => Ok(given.or(logged)),
    }
}
