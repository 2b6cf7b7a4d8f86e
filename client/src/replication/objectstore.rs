//! The object storage replicator: a shard log as segment objects in any
//! store the `object_store` crate reaches (a local directory, S3 or an
//! S3-compatible server).
//!
//! **Layout**, under the replicator's root, one folder per shard (the shard
//! name is one path part: a `/` in it is written `%2F`, so `a` and `a/b`
//! never share a folder and resuming one never reads the other's objects):
//!
//! - `{shard}/segments/{first:020}-{last:020}.seg`: the events `first..=last`
//!   and the batches they came in (producer, producer sequence, first,
//!   count). Appends queued together are written as **one segment**, so a
//!   busy shard writes one object per group, not per batch. Segments are
//!   written with `PutMode::Create`: a second writer (another process on
//!   the same root) can never overwrite one, and its write of a taken
//!   sequence fails.
//! - `{shard}/lease.json`: the shard's epoch, holder and expiry (ms since
//!   the Unix epoch, by this process's clock).
//! - `{shard}/snapshots/{sequence:020}.snap`: the newest snapshot (older
//!   ones are deleted once a newer one is stored).
//!
//! **Source of truth**: the objects. A batch is answered once its segment
//! was stored. On first use of a shard the replicator lists its segments
//! (head and gaps), reads the newest ones' batch lists (retry recognition
//! for the 16 most recent producers), the lease and the snapshot, so a
//! restarted replicator resumes where it was. After any failed write the
//! shard is loaded again before its next operation (the write may have
//! landed). Events are never trimmed.
//!
//! **One writer at a time** per root: the replicator keeps each shard's
//! decisions (epochs, producer sequences, leases) in memory while it runs
//! and persists them before answering, like the SQLite replicator, with
//! `PutMode::Create` on segments as the backstop against a second process.
//!
//! **Ordering**: one task runs every operation in call order, so pipelined
//! batches land in publish order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::TryStreamExt as _;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use omnirelay_proto::Message as _;
use omnirelay_proto::replication::v1 as rpb;
use tokio::sync::{mpsc, oneshot};

use super::{
    Appended, Batch, LogPage, LoggedEvent, PublishFuture, ReplicationError, Replicator, ReplicatorFuture, ShardGrant,
    StoredSnapshot,
};
use crate::ids::{Epoch, Sequence, ShardId};
use crate::wire;

/// Producers remembered per shard for retry recognition (as in the other
/// replicators).
const PRODUCERS_REMEMBERED: usize = 16;

/// Most segments read back at load to find the recent producers' batches.
const PRODUCER_SCAN_SEGMENTS: usize = 64;

/// Most appends folded into one segment: a queue's whole pipeline for
/// several shards, while keeping segments small.
const GROUP_MAX: usize = 64;

/// The first bytes of every segment object.
const SEGMENT_MAGIC: &[u8] = b"OMNIRELAY-SEGMENT-1\n";

/// A [`Replicator`] on an object store. See the [module docs](self).
/// Must be created inside a tokio runtime; its task ends once it is
/// dropped and the operations already queued are done.
pub struct ObjectStoreReplicator {
    commands: mpsc::UnboundedSender<Command>,
    root: Path,
}

impl std::fmt::Debug for ObjectStoreReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreReplicator").field("root", &self.root.as_ref()).finish_non_exhaustive()
    }
}

type Reply<T> = oneshot::Sender<Result<T, ReplicationError>>;

/// Work for the log's task, run in the order it was sent.
enum Command {
    Append(Pending),
    Acquire { shard: ShardId, owner: String, ttl: Duration, reply: Reply<ShardGrant> },
    Renew { shard: ShardId, owner: String, epoch: Epoch, ttl: Duration, reply: Reply<ShardGrant> },
    Release { shard: ShardId, owner: String, epoch: Epoch, reply: Reply<bool> },
    Read { shard: ShardId, after: Sequence, limit: usize, reply: Reply<LogPage> },
    Snapshot { shard: ShardId, reply: Reply<Option<StoredSnapshot>> },
    PutSnapshot { shard: ShardId, sequence: Sequence, epoch: Epoch, data: Bytes, reply: Reply<()> },
}

struct Pending {
    batch: Batch,
    events: Vec<Bytes>,
    reply: oneshot::Sender<Result<Appended, ReplicationError>>,
}

/// A segment's batch list entry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct BatchEntry {
    producer: String,
    producer_seq: u64,
    first: u64,
    count: u64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SegmentHeader {
    first: u64,
    last: u64,
    batches: Vec<BatchEntry>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct LeaseFile {
    epoch: u64,
    owner: Option<String>,
    expires_ms: Option<i64>,
}

/// What the task knows of a loaded shard.
#[derive(Debug, Default)]
struct ShardLog {
    head: u64,
    /// `(first, last)` of every segment, in order.
    segments: Vec<(u64, u64)>,
    /// The last batch of recent producers, the latest writer last.
    producers: Vec<(String, u64, Appended)>,
    lease: LeaseFile,
    snapshot: Option<u64>,
}

/// The task's state: the store and the loaded shards.
struct Log {
    store: Arc<dyn ObjectStore>,
    root: Path,
    shards: HashMap<ShardId, ShardLog>,
}

fn unavailable(what: &str, err: &object_store::Error) -> ReplicationError {
    ReplicationError::Unavailable(format!("object store: {what}: {err}"))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

impl ObjectStoreReplicator {
    /// A replicator keeping its logs in `store` under `root` (for example
    /// `Path::from("omnirelay/logs")`).
    pub fn new(store: Arc<dyn ObjectStore>, root: Path) -> Self {
        let (commands, queue) = mpsc::unbounded_channel();
        let log = Log { store, root: root.clone(), shards: HashMap::new() };
        // Owned through the channel: it ends when the replicator is dropped.
        tokio::spawn(log.run(queue));
        Self { commands, root }
    }

    /// A replicator on a local directory (created if missing).
    pub fn local(dir: impl AsRef<std::path::Path>) -> Result<Self, ReplicationError> {
        std::fs::create_dir_all(dir.as_ref())
            .map_err(|e| ReplicationError::Unavailable(format!("create {}: {e}", dir.as_ref().display())))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir.as_ref())
            .map_err(|e| unavailable("open the directory", &e))?;
        Ok(Self::new(Arc::new(store), Path::from("logs")))
    }

    /// Sends a command built around a reply channel and awaits the answer.
    fn ask<T: Send + 'static>(&self, command: impl FnOnce(Reply<T>) -> Command) -> ReplicatorFuture<'static, T> {
        let (reply, answer) = oneshot::channel();
        let sent = self.commands.send(command(reply)).is_ok();
        Box::pin(async move {
            if !sent {
                return Err(ReplicationError::Unavailable("the object store replicator stopped".into()));
            }
            answer
                .await
                .unwrap_or_else(|_| Err(ReplicationError::Unavailable("the object store replicator stopped".into())))
        })
    }
}

impl Log {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Command>) {
        let mut deferred = None;
        loop {
            let command = match deferred.take() {
                Some(command) => command,
                None => match queue.recv().await {
                    Some(command) => command,
                    None => return,
                },
            };
            match command {
                Command::Acquire { shard, owner, ttl, reply } => {
                    let _ = reply.send(self.acquire(shard, owner, ttl).await);
                }
                Command::Renew { shard, owner, epoch, ttl, reply } => {
                    let _ = reply.send(self.renew(shard, owner, epoch, ttl).await);
                }
                Command::Release { shard, owner, epoch, reply } => {
                    let _ = reply.send(self.release(shard, owner, epoch).await);
                }
                Command::Read { shard, after, limit, reply } => {
                    let _ = reply.send(self.read(shard, after, limit).await);
                }
                Command::Snapshot { shard, reply } => {
                    let _ = reply.send(self.latest_snapshot(shard).await);
                }
                Command::PutSnapshot { shard, sequence, epoch, data, reply } => {
                    let _ = reply.send(self.put_snapshot(shard, sequence, epoch, data).await);
                }
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
                    self.append_group(group).await;
                }
            }
        }
    }

    fn dir(&self, shard: &ShardId) -> Path {
        self.root.clone().join(shard.as_str())
    }

    fn segment_path(&self, shard: &ShardId, first: u64, last: u64) -> Path {
        self.dir(shard).join("segments").join(format!("{first:020}-{last:020}.seg"))
    }

    /// The shard, loaded from the store on first use (and after a failure).
    async fn shard(&mut self, shard: &ShardId) -> Result<&mut ShardLog, ReplicationError> {
        if !self.shards.contains_key(shard) {
            let loaded = self.load(shard).await?;
            self.shards.insert(shard.clone(), loaded);
        }
        Ok(self.shards.get_mut(shard).expect("the shard was just loaded"))
    }

    async fn load(&self, shard: &ShardId) -> Result<ShardLog, ReplicationError> {
        let dir = self.dir(shard);
        let listed: Vec<_> = self
            .store
            .list(Some(&dir.clone().join("segments")))
            .try_collect()
            .await
            .map_err(|e| unavailable("list the segments", &e))?;
        let mut segments = Vec::with_capacity(listed.len());
        for meta in &listed {
            let name = meta.location.filename().unwrap_or_default();
            let parsed = name
                .strip_suffix(".seg")
                .and_then(|range| range.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
            match parsed {
                Some(range) => segments.push(range),
                None => tracing::warn!(object = %meta.location, "ignoring an object that is not a segment"),
            }
        }
        segments.sort_unstable();
        let mut head = 0;
        for &(first, last) in &segments {
            if first != head + 1 || last < first {
                return Err(ReplicationError::Corrupt(format!(
                    "shard {shard}: the segments jump from {head} to {first}..{last}"
                )));
            }
            head = last;
        }
        let mut producers: Vec<(String, u64, Appended)> = Vec::new();
        for &(first, last) in segments.iter().rev().take(PRODUCER_SCAN_SEGMENTS) {
            if producers.len() >= PRODUCERS_REMEMBERED {
                break;
            }
            let (header, _) = self.read_segment(shard, first, last).await?;
            for entry in header.batches.iter().rev() {
                if producers.len() < PRODUCERS_REMEMBERED && !producers.iter().any(|(p, _, _)| *p == entry.producer) {
                    let appended =
                        Appended { first: Sequence::new(entry.first), count: entry.count, deduplicated: false };
                    producers.insert(0, (entry.producer.clone(), entry.producer_seq, appended));
                }
            }
        }
        let lease = match self.store.get(&dir.clone().join("lease.json")).await {
            Ok(found) => {
                let bytes = found.bytes().await.map_err(|e| unavailable("read the lease", &e))?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| ReplicationError::Corrupt(format!("shard {shard}: lease.json: {e}")))?
            }
            Err(object_store::Error::NotFound { .. }) => LeaseFile::default(),
            Err(err) => return Err(unavailable("read the lease", &err)),
        };
        let snapshots: Vec<_> = self
            .store
            .list(Some(&dir.clone().join("snapshots")))
            .try_collect()
            .await
            .map_err(|e| unavailable("list the snapshots", &e))?;
        let snapshot = snapshots
            .iter()
            .filter_map(|meta| meta.location.filename()?.strip_suffix(".snap")?.parse::<u64>().ok())
            .max();
        Ok(ShardLog { head, segments, producers, lease, snapshot })
    }

    async fn read_segment(
        &self,
        shard: &ShardId,
        first: u64,
        last: u64,
    ) -> Result<(SegmentHeader, Vec<Bytes>), ReplicationError> {
        let path = self.segment_path(shard, first, last);
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(|e| unavailable("read a segment", &e))?
            .bytes()
            .await
            .map_err(|e| unavailable("read a segment", &e))?;
        decode_segment(&bytes)
            .ok_or_else(|| ReplicationError::Corrupt(format!("shard {shard}: segment {first}-{last} does not decode")))
    }

    /// Decides every batch of the group against its shard and writes the
    /// accepted ones of each shard as one segment.
    async fn append_group(&mut self, group: Vec<Pending>) {
        let mut by_shard: Vec<(ShardId, Vec<Pending>)> = Vec::new();
        for pending in group {
            match by_shard.iter_mut().find(|(shard, _)| *shard == pending.batch.shard) {
                Some((_, list)) => list.push(pending),
                None => by_shard.push((pending.batch.shard.clone(), vec![pending])),
            }
        }
        for (shard, list) in by_shard {
            self.append_shard(&shard, list).await;
        }
    }

    async fn append_shard(&mut self, shard_id: &ShardId, list: Vec<Pending>) {
        let shard = match self.shard(shard_id).await {
            Ok(shard) => shard,
            Err(err) => {
                for pending in list {
                    let _ = pending.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        // Decide against a scratch copy of the head and producers; commit
        // them only once the segment is stored.
        let mut head = shard.head;
        let mut producers = shard.producers.clone();
        let mut accepted: Vec<(Pending, Appended)> = Vec::new();
        let mut refused = Vec::new();
        for pending in list {
            match decide(shard_id, &shard.lease, head, &producers, &pending.batch) {
                Ok(Some(repeat)) => refused.push((pending, Ok(repeat))),
                Ok(None) => {
                    let count = pending.batch.events.len() as u64;
                    let appended = Appended { first: Sequence::new(head + 1), count, deduplicated: false };
                    head += count;
                    remember(&mut producers, pending.batch.producer.as_str(), pending.batch.producer_seq, appended);
                    accepted.push((pending, appended));
                }
                Err(err) => refused.push((pending, Err(err))),
            }
        }
        for (pending, answer) in refused {
            let _ = pending.reply.send(answer);
        }
        if accepted.is_empty() {
            return;
        }
        let first = accepted[0].1.first.get();
        let header = SegmentHeader {
            first,
            last: head,
            batches: accepted
                .iter()
                .map(|(p, a)| BatchEntry {
                    producer: p.batch.producer.to_string(),
                    producer_seq: p.batch.producer_seq,
                    first: a.first.get(),
                    count: a.count,
                })
                .collect(),
        };
        let events: Vec<&Bytes> = accepted.iter().flat_map(|(p, _)| p.events.iter()).collect();
        let segment = encode_segment(&header, &events);
        let path = self.segment_path(shard_id, first, head);
        let stored = self
            .store
            .put_opts(&path, PutPayload::from(segment), PutOptions { mode: PutMode::Create, ..PutOptions::default() })
            .await;
        match stored {
            Ok(_) => {
                let shard = self.shards.get_mut(shard_id).expect("the shard is loaded");
                shard.head = head;
                shard.segments.push((first, head));
                shard.producers = producers;
                for (pending, appended) in accepted {
                    let _ = pending.reply.send(Ok(appended));
                }
            }
            Err(err) => {
                // It may have landed (or another writer took the name):
                // load the shard again before its next operation.
                self.shards.remove(shard_id);
                let error = match err {
                    object_store::Error::AlreadyExists { .. } => ReplicationError::Rejected(format!(
                        "shard {shard_id}: segment {first}-{head} already exists: another writer appended to the log"
                    )),
                    other => unavailable("store a segment", &other),
                };
                for (pending, _) in accepted {
                    let _ = pending.reply.send(Err(error.clone()));
                }
            }
        }
    }

    async fn save_lease(&mut self, shard: &ShardId, lease: LeaseFile) -> Result<(), ReplicationError> {
        let path = self.dir(shard).join("lease.json");
        let json = serde_json::to_vec(&lease).expect("a lease should always serialize");
        match self.store.put(&path, PutPayload::from(json)).await {
            Ok(_) => {
                self.shards.get_mut(shard).expect("the shard is loaded").lease = lease;
                Ok(())
            }
            Err(err) => {
                self.shards.remove(shard);
                Err(unavailable("store the lease", &err))
            }
        }
    }
}

/// `Ok(Some(answer))` for a recognised retry, `Ok(None)` to write, `Err` to
/// refuse (the same rules as the other replicators).
fn decide(
    shard: &ShardId,
    lease: &LeaseFile,
    head: u64,
    producers: &[(String, u64, Appended)],
    batch: &Batch,
) -> Result<Option<Appended>, ReplicationError> {
    if batch.epoch.get() != lease.epoch {
        return Err(ReplicationError::StaleEpoch {
            shard: shard.clone(),
            given: batch.epoch,
            current: Epoch::new(lease.epoch),
        });
    }
    if batch.events.is_empty() {
        return Err(ReplicationError::Rejected("a batch needs at least one event".into()));
    }
    if let Some((_, seq, appended)) = producers.iter().find(|(p, _, _)| p == batch.producer.as_str()) {
        if *seq == batch.producer_seq {
            return Ok(Some(Appended { deduplicated: true, ..*appended }));
        }
        if *seq > batch.producer_seq || batch.producer_seq != seq + 1 {
            return Err(ReplicationError::Rejected(format!(
                "producer {} sent batch {}; the next expected is {} (nothing was written)",
                batch.producer,
                batch.producer_seq,
                seq + 1
            )));
        }
    }
    if batch.first != Sequence::ZERO && batch.first.get() != head + 1 {
        return Err(ReplicationError::Rejected(format!(
            "shard {shard}: the batch expects to start at {} but the log's next sequence is {} (nothing was written)",
            batch.first,
            head + 1
        )));
    }
    Ok(None)
}

fn remember(producers: &mut Vec<(String, u64, Appended)>, producer: &str, seq: u64, appended: Appended) {
    producers.retain(|(p, _, _)| p != producer);
    if producers.len() == PRODUCERS_REMEMBERED {
        producers.remove(0);
    }
    producers.push((producer.to_string(), seq, appended));
}

fn encode_segment(header: &SegmentHeader, events: &[&Bytes]) -> Bytes {
    let header = serde_json::to_vec(header).expect("a segment header should always serialize");
    let size = SEGMENT_MAGIC.len() + 4 + header.len() + events.iter().map(|e| 4 + e.len()).sum::<usize>();
    let mut out = BytesMut::with_capacity(size);
    out.put_slice(SEGMENT_MAGIC);
    out.put_u32(u32::try_from(header.len()).expect("a segment header is far below 4 GiB"));
    out.put_slice(&header);
    for event in events {
        out.put_u32(u32::try_from(event.len()).expect("an event is far below 4 GiB"));
        out.put_slice(event);
    }
    out.freeze()
}

fn decode_segment(bytes: &Bytes) -> Option<(SegmentHeader, Vec<Bytes>)> {
    let mut rest = bytes.clone();
    if !rest.starts_with(SEGMENT_MAGIC) {
        return None;
    }
    rest.advance(SEGMENT_MAGIC.len());
    let take = |rest: &mut Bytes| -> Option<Bytes> {
        if rest.remaining() < 4 {
            return None;
        }
        let len = rest.get_u32() as usize;
        (rest.remaining() >= len).then(|| rest.split_to(len))
    };
    let header: SegmentHeader = serde_json::from_slice(&take(&mut rest)?).ok()?;
    let mut events = Vec::new();
    while rest.has_remaining() {
        events.push(take(&mut rest)?);
    }
    (events.len() as u64 == header.last + 1 - header.first).then_some((header, events))
}

impl Log {
    async fn acquire(&mut self, shard: ShardId, owner: String, ttl: Duration) -> Result<ShardGrant, ReplicationError> {
        let now = now_ms();
        let current = self.shard(&shard).await?;
        let head = Sequence::new(current.head);
        let lease = &current.lease;
        let live = lease.owner.as_deref().filter(|_| lease.expires_ms.is_none_or(|at| now < at));
        if let Some(holder) = live.filter(|holder| *holder != owner) {
            return Ok(ShardGrant {
                granted: false,
                owner: holder.to_string(),
                epoch: Epoch::new(lease.epoch),
                head,
                ttl: lease.expires_ms.map(|at| Duration::from_millis(u64::try_from(at - now).unwrap_or(0))),
            });
        }
        let epoch = lease.epoch + 1;
        self.save_lease(
            &shard,
            LeaseFile { epoch, owner: Some(owner.clone()), expires_ms: Some(now.saturating_add(ms(ttl))) },
        )
        .await?;
        Ok(ShardGrant { granted: true, owner, epoch: Epoch::new(epoch), head, ttl: Some(ttl) })
    }

    async fn renew(
        &mut self,
        shard: ShardId,
        owner: String,
        epoch: Epoch,
        ttl: Duration,
    ) -> Result<ShardGrant, ReplicationError> {
        let current = self.shard(&shard).await?;
        let head = Sequence::new(current.head);
        if current.lease.epoch != epoch.get() {
            let current = Epoch::new(current.lease.epoch);
            return Err(ReplicationError::StaleEpoch { shard, given: epoch, current });
        }
        if current.lease.owner.as_deref() != Some(owner.as_str()) {
            return Err(ReplicationError::Rejected(format!("shard {shard}: {owner} does not hold the lease")));
        }
        let expires_ms = Some(now_ms().saturating_add(ms(ttl)));
        self.save_lease(&shard, LeaseFile { epoch: epoch.get(), owner: Some(owner.clone()), expires_ms }).await?;
        Ok(ShardGrant { granted: true, owner, epoch, head, ttl: Some(ttl) })
    }

    async fn release(&mut self, shard: ShardId, owner: String, epoch: Epoch) -> Result<bool, ReplicationError> {
        let current = self.shard(&shard).await?;
        if current.lease.epoch != epoch.get() || current.lease.owner.as_deref() != Some(owner.as_str()) {
            return Ok(false);
        }
        self.save_lease(&shard, LeaseFile { epoch: epoch.get(), owner: None, expires_ms: None }).await?;
        Ok(true)
    }

    async fn read(&mut self, shard: ShardId, after: Sequence, limit: usize) -> Result<LogPage, ReplicationError> {
        let current = self.shard(&shard).await?;
        let (head, segments) = (current.head, current.segments.clone());
        let mut events = Vec::new();
        let start = segments.partition_point(|&(_, last)| last <= after.get());
        for &(first, last) in &segments[start..] {
            if events.len() >= limit {
                break;
            }
            let (_, encoded) = self.read_segment(&shard, first, last).await?;
            for (offset, data) in encoded.iter().enumerate() {
                let sequence = first + offset as u64;
                if sequence <= after.get() || events.len() >= limit {
                    continue;
                }
                let corrupt = |e: String| {
                    ReplicationError::Corrupt(format!("shard {shard}: event {sequence} does not decode: {e}"))
                };
                let mut entry = rpb::ReplicationEvent::decode(data.as_ref()).map_err(|e| corrupt(e.to_string()))?;
                entry.sequence = sequence;
                let event = wire::event_from_pb(entry).map_err(|e| corrupt(e.to_string()))?;
                events.push(LoggedEvent { event, link: None });
            }
        }
        Ok(LogPage { events, head: Sequence::new(head), low: Sequence::new(1) })
    }

    async fn latest_snapshot(&mut self, shard: ShardId) -> Result<Option<StoredSnapshot>, ReplicationError> {
        let Some(sequence) = self.shard(&shard).await?.snapshot else { return Ok(None) };
        let path = self.dir(&shard).join("snapshots").join(format!("{sequence:020}.snap"));
        let found = self.store.get(&path).await.map_err(|e| unavailable("read the snapshot", &e))?;
        let data = found.bytes().await.map_err(|e| unavailable("read the snapshot", &e))?;
        Ok(Some(StoredSnapshot { sequence: Sequence::new(sequence), data, hash: None }))
    }

    async fn put_snapshot(
        &mut self,
        shard: ShardId,
        sequence: Sequence,
        epoch: Epoch,
        data: Bytes,
    ) -> Result<(), ReplicationError> {
        let current = self.shard(&shard).await?;
        if current.lease.epoch != epoch.get() {
            let current = Epoch::new(current.lease.epoch);
            return Err(ReplicationError::StaleEpoch { shard, given: epoch, current });
        }
        if sequence.get() > current.head {
            return Err(ReplicationError::Rejected(format!(
                "shard {shard}: snapshot at {sequence} is past the head {}",
                current.head
            )));
        }
        let older = current.snapshot;
        if older.is_some_and(|older| older >= sequence.get()) {
            return Ok(());
        }
        let dir = self.dir(&shard).join("snapshots");
        let path = dir.clone().join(format!("{:020}.snap", sequence.get()));
        self.store.put(&path, PutPayload::from(data)).await.map_err(|e| unavailable("store the snapshot", &e))?;
        self.shards.get_mut(&shard).expect("the shard is loaded").snapshot = Some(sequence.get());
        if let Some(older) = older {
            // Best effort: a leftover older snapshot is never read.
            let _ = self.store.delete(&dir.clone().join(format!("{older:020}.snap"))).await;
        }
        Ok(())
    }
}

impl Replicator for ObjectStoreReplicator {
    fn publish(&self, batch: &Batch) -> PublishFuture {
        let events =
            batch.events.iter().map(|event| Bytes::from(wire::event(Sequence::ZERO, event).encode_to_vec())).collect();
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Append(Pending { batch: batch.clone(), events, reply })).is_err() {
            return PublishFuture::ready(Err(ReplicationError::Unavailable(
                "the object store replicator stopped".into(),
            )));
        }
        PublishFuture::new(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(ReplicationError::Unavailable("the object store replicator stopped".into())))
        })
    }

    fn acquire_shard(&self, shard: &ShardId, owner: &str, ttl: Duration) -> ReplicatorFuture<'_, ShardGrant> {
        let (shard, owner) = (shard.clone(), owner.to_string());
        self.ask(move |reply| Command::Acquire { shard, owner, ttl, reply })
    }

    fn renew_shard(
        &self,
        shard: &ShardId,
        owner: &str,
        epoch: Epoch,
        ttl: Duration,
    ) -> ReplicatorFuture<'_, ShardGrant> {
        let (shard, owner) = (shard.clone(), owner.to_string());
        self.ask(move |reply| Command::Renew { shard, owner, epoch, ttl, reply })
    }

    fn release_shard(&self, shard: &ShardId, owner: &str, epoch: Epoch) -> ReplicatorFuture<'_, bool> {
        let (shard, owner) = (shard.clone(), owner.to_string());
        self.ask(move |reply| Command::Release { shard, owner, epoch, reply })
    }

    fn read_log(&self, shard: &ShardId, after: Sequence, limit: usize) -> ReplicatorFuture<'_, LogPage> {
        let shard = shard.clone();
        self.ask(move |reply| Command::Read { shard, after, limit, reply })
    }

    fn latest_snapshot(&self, shard: &ShardId) -> ReplicatorFuture<'_, Option<StoredSnapshot>> {
        let shard = shard.clone();
        self.ask(move |reply| Command::Snapshot { shard, reply })
    }

    fn put_snapshot(&self, shard: &ShardId, sequence: Sequence, epoch: Epoch, data: Bytes) -> ReplicatorFuture<'_, ()> {
        let shard = shard.clone();
        self.ask(move |reply| Command::PutSnapshot { shard, sequence, epoch, data, reply })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::contract::{self, Durability, batch, numbers};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_replicator_contract_on_a_local_directory() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().to_path_buf();
        contract::check(
            || {
                let path = path.clone();
                async move {
                    Arc::new(ObjectStoreReplicator::local(&path).expect("open the directory")) as Arc<dyn Replicator>
                }
            },
            Durability::Durable,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shards_whose_names_nest_resume_their_own_logs() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (outer, inner) = (ShardId::from("tenant"), ShardId::from("tenant/orders"));
        {
            let log = ObjectStoreReplicator::local(dir.path()).expect("open");
            log.publish(&batch(&outer, "p", 1, 1, 2)).await.expect("publish");
            log.publish(&batch(&inner, "p", 1, 10, 3)).await.expect("publish");
            log.publish(&batch(&outer, "p", 2, 3, 1)).await.expect("publish");
        }
        let log = ObjectStoreReplicator::local(dir.path()).expect("reopen");
        assert_eq!(numbers(&log, &outer, 0, 100).await, vec![1, 2, 3]);
        assert_eq!(numbers(&log, &inner, 0, 100).await, vec![10, 11, 12]);
        let next = log.publish(&batch(&inner, "q", 1, 13, 1)).await.expect("publish after the restart");
        assert_eq!(next.first, Sequence::new(4), "the nested shard resumed its own sequence");
    }

    // One thread: the six batches are all queued before the log's task runs.
    #[tokio::test]
    async fn batches_queued_together_share_one_segment() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = ObjectStoreReplicator::local(dir.path()).expect("open");
        let shard = ShardId::from("grouped");
        let answers: Vec<_> = (1..=6u64).map(|n| log.publish(&batch(&shard, "p", n, n * 2 - 1, 2))).collect();
        for answer in answers {
            answer.await.expect("publish");
        }
        let segments = std::fs::read_dir(dir.path().join("logs").join("grouped").join("segments"))
            .expect("the segments folder")
            .count();
        assert_eq!(segments, 1, "six batches queued together are one segment");
        assert_eq!(numbers(&log, &shard, 0, 5).await, (1..=12).collect::<Vec<_>>());
    }
}
