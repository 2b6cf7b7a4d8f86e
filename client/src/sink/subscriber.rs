//! The subscriber runtime: one hub subscription feeding one sink.
//!
//! [`Subscriber::run`] loops over sessions. A session opens a `Subscribe`
//! stream on the current hub endpoint; a reader task ([`reader`]) decodes
//! and checks its frames one ahead, and the session hands them to the sink
//! one at a time (events, progress, snapshots), committing checkpoints as
//! it goes, each commit on a task of its own beside delivery. A
//! session that ends for a reason that may pass (an endpoint down, a stream
//! cut or silent, a hub shutting down) is followed by another on the next
//! endpoint after a backoff; one that ends for good (a gap, corruption, a
//! refused request, a sink failure that is not transient) stops the run
//! once what was delivered is checkpointed.
//!
//! A new session resumes from the hub checkpoint (or, when the sink is
//! behind it, from the sink's position); the events it repeats are dropped
//! by the shard's [`ShardChain`], which also checks that the first one it
//! keeps links to the last one the sink has.
//!
//! A reconnected session reads the hub checkpoints again: a hub whose
//! database was restored to an earlier point holds older ones (or none).
//! The runtime then commits its position again, and the hub judges it: a
//! position past the restored head is refused (`OUT_OF_RANGE`), and the
//! run stops with [`SinkError::AheadOfHub`] rather than drop the new events
//! that reuse those sequences as repeats; a hash the log no longer holds is
//! refused as corruption.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use omnirelay_proto::hub::v1 as pb;
use omnirelay_proto::limits::MAX_MESSAGE_BYTES;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use self::reader::Prepared;
use super::chain::ShardChain;
use super::metrics as m;
use super::{Delivery, ReplicationSink, SinkBatch, SinkCheckpoint, SinkError, SinkEvent, SinkSnapshot, defaults};
use crate::ids::{Sequence, ShardId};
use crate::replication::{HubEndpoint, HubTls};
use crate::wire;

mod reader;

/// The shards a subscriber follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These shards.
    Shards(Vec<ShardId>),
    /// Every shard whose id matches, e.g. `resourcelease.*` (a trailing `*`
    /// matches any suffix); shards created later are followed too.
    Pattern(String),
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selection::Shards(shards) => {
                let names: Vec<&str> = shards.iter().map(ShardId::as_str).collect();
                f.write_str(&names.join(","))
            }
            Selection::Pattern(pattern) => f.write_str(pattern),
        }
    }
}

/// How a [`Subscriber`] reaches the hub and paces its work.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// The subscriber's identity: hub checkpoints are stored under it. One
    /// id per sink; two sinks sharing one would move each other's
    /// checkpoints.
    pub subscriber_id: String,
    /// Hub endpoints, tried in order; a failing one hands over to the next.
    pub endpoints: Vec<HubEndpoint>,
    /// TLS; plain HTTP/2 when `None`.
    pub tls: Option<HubTls>,
    /// What to follow.
    pub selection: Selection,
    /// See [`defaults::CHECKPOINT_EVENTS`].
    pub checkpoint_events: u64,
    /// See [`defaults::CHECKPOINT_INTERVAL`].
    pub checkpoint_interval: Duration,
    /// See [`defaults::PROGRESS_INTERVAL`].
    pub progress_interval: Duration,
    /// See [`defaults::REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// See [`defaults::SINK_TIMEOUT`].
    pub sink_timeout: Duration,
    /// See [`defaults::BACKOFF_MIN`].
    pub backoff_min: Duration,
    /// See [`defaults::BACKOFF_MAX`].
    pub backoff_max: Duration,
}

impl SubscriberConfig {
    /// Plain connections to `endpoints` with the default pacing.
    pub fn new(
        subscriber_id: impl Into<String>,
        endpoints: impl IntoIterator<Item = HubEndpoint>,
        selection: Selection,
    ) -> Self {
        Self {
            subscriber_id: subscriber_id.into(),
            endpoints: endpoints.into_iter().collect(),
            tls: None,
            selection,
            checkpoint_events: defaults::CHECKPOINT_EVENTS,
            checkpoint_interval: defaults::CHECKPOINT_INTERVAL,
            progress_interval: defaults::PROGRESS_INTERVAL,
            request_timeout: defaults::REQUEST_TIMEOUT,
            sink_timeout: defaults::SINK_TIMEOUT,
            backoff_min: defaults::BACKOFF_MIN,
            backoff_max: defaults::BACKOFF_MAX,
        }
    }
}

/// Where a subscriber is, for progress displays and diagnostics.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SubscriberProgress {
    /// True while a stream is open.
    pub connected: bool,
    /// The endpoint in use.
    pub endpoint: String,
    /// Events the sink applied in this run.
    pub delivered: u64,
    /// Streams reopened in this run.
    pub reconnects: u64,
    /// Per shard.
    pub shards: BTreeMap<String, ShardProgress>,
}

/// A subscriber's position on one shard.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ShardProgress {
    /// Last sequence the sink applied.
    pub position: u64,
    /// Last sequence committed as the hub checkpoint.
    pub committed: u64,
    /// The shard's head, as last reported by the hub (progress frames come
    /// while the stream is idle) or seen in an event.
    pub head: u64,
    /// `head - committed`.
    pub lag_events: u64,
    /// See `omnirelay_sink_checkpoint_lag_seconds` in
    /// [`metrics`](super::metrics).
    pub lag_seconds: f64,
}

/// Runs a sink on a hub subscription. See the [module docs](super).
pub struct Subscriber<S> {
    config: SubscriberConfig,
    channels: Vec<Channel>,
    current: usize,
    sink: S,
    progress: watch::Sender<SubscriberProgress>,
    tracks: HashMap<ShardId, Track>,
    /// True until the first session: [`Subscriber::start`] has just read
    /// the hub checkpoints, so that session need not read them again.
    checkpoints_fresh: bool,
    /// The hub checkpoint commit under way, if any (see
    /// [`Subscriber::start_commit`]).
    committing: Option<tokio::task::JoinHandle<Vec<Committed>>>,
}

/// Aborts a task when dropped: the session's reader ends with the session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The answer to one shard's checkpoint commit.
struct Committed {
    shard: ShardId,
    sequence: Sequence,
    /// `None` when the hub did not answer within the request timeout.
    answer: Option<Result<(), tonic::Status>>,
}

impl<S> std::fmt::Debug for Subscriber<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("subscriber_id", &self.config.subscriber_id)
            .field("selection", &self.config.selection)
            .finish_non_exhaustive()
    }
}

/// One shard's state in the runtime.
struct Track {
    /// The sink's position and the checks of what follows it.
    chain: ShardChain,
    /// The hub checkpoint.
    committed: Sequence,
    /// The shard's head as last known.
    head: Sequence,
    /// `recorded_at` of the oldest applied event not yet checkpointed (nor
    /// in the commit under way).
    oldest_uncommitted: Option<SystemTime>,
    /// `recorded_at` of the oldest event the commit under way covers.
    oldest_committing: Option<SystemTime>,
    /// When the checkpoint last moved (or the run started).
    committed_at: SystemTime,
}

impl Track {
    fn new(shard: ShardId, position: Sequence, hash: Option<Bytes>, committed: Sequence) -> Self {
        Self {
            chain: ShardChain::new(shard, position, hash),
            committed,
            head: position.max(committed),
            oldest_uncommitted: None,
            oldest_committing: None,
            committed_at: SystemTime::now(),
        }
    }

    fn lag_seconds(&self) -> f64 {
        if self.committed >= self.head {
            return 0.0;
        }
        let since = self.oldest_committing.or(self.oldest_uncommitted).unwrap_or(self.committed_at);
        SystemTime::now().duration_since(since).unwrap_or_default().as_secs_f64()
    }
}

/// A call of the sink, for [`Subscriber::call_sink`].
#[derive(Clone, Copy)]
enum SinkCall<'a> {
    Checkpoints,
    Flush,
    Deliver(&'a SinkBatch),
    Snapshot(&'a SinkSnapshot),
}

/// One call of `sink` (its checkpoints, when asked for).
async fn sink_call<S: ReplicationSink>(sink: &mut S, call: SinkCall<'_>) -> Result<Vec<SinkCheckpoint>, SinkError> {
    match call {
        SinkCall::Checkpoints => sink.checkpoints().await,
        SinkCall::Flush => sink.flush().await.map(|()| Vec::new()),
        SinkCall::Deliver(batch) => sink.deliver(batch).await.map(|()| Vec::new()),
        SinkCall::Snapshot(snapshot) => sink.apply_snapshot(snapshot).await.map(|()| Vec::new()),
    }
}

/// A sink call's outcome within its deadline `limit`: its value, or
/// `Err(reason)` for a transient failure or no answer in time; any other
/// failure is the error.
fn transient<T>(
    outcome: Result<Result<T, SinkError>, tokio::time::error::Elapsed>,
    limit: Duration,
) -> Result<Result<T, String>, SinkError> {
    match outcome {
        Ok(Ok(value)) => Ok(Ok(value)),
        Ok(Err(SinkError::Transient(reason))) => Ok(Err(reason)),
        Ok(Err(err)) => Err(err),
        Err(_) => Ok(Err(format!("no answer within {limit:?}"))),
    }
}

/// Why a session ended.
enum Ended {
    /// Cancelled: stop cleanly.
    Stopped,
    /// May pass: reconnect after a backoff. True when the session received
    /// frames (the backoff starts over).
    Broken(String, bool),
    /// For good.
    Failed(SinkError),
}

impl<S: ReplicationSink> Subscriber<S> {
    /// Prepares a subscriber (connections are opened lazily, by [`run`](Self::run)).
    /// Must be called inside a tokio runtime.
    pub fn new(config: SubscriberConfig, sink: S) -> Result<Self, SinkError> {
        let invalid = |field: &str, reason: String| SinkError::Config { field: field.into(), reason };
        if config.subscriber_id.trim().is_empty() {
            return Err(invalid("subscriber_id", "must not be empty".into()));
        }
        match &config.selection {
            Selection::Shards(shards) if shards.is_empty() => {
                return Err(invalid("selection", "name at least one shard or a pattern".into()));
            }
            Selection::Pattern(pattern) if pattern.trim().is_empty() => {
                return Err(invalid("selection", "the shard pattern must not be empty".into()));
            }
            _ => {}
        }
        if config.endpoints.is_empty() {
            return Err(invalid("endpoints", "name at least one hub endpoint".into()));
        }
        if config.checkpoint_events == 0 {
            return Err(invalid("checkpoint_events", "must be at least 1".into()));
        }
        let mut channels = Vec::with_capacity(config.endpoints.len());
        for (index, endpoint) in config.endpoints.iter().enumerate() {
            channels.push(
                channel(endpoint, config.tls.as_ref())
                    .map_err(|reason| SinkError::Config { field: format!("endpoints[{index}]"), reason })?,
            );
        }
        let progress = SubscriberProgress { endpoint: config.endpoints[0].url.clone(), ..Default::default() };
        Ok(Self {
            config,
            channels,
            current: 0,
            sink,
            progress: watch::channel(progress).0,
            tracks: HashMap::new(),
            checkpoints_fresh: true,
            committing: None,
        })
    }

    /// Watches the subscriber's progress while it runs.
    pub fn progress(&self) -> watch::Receiver<SubscriberProgress> {
        self.progress.subscribe()
    }

    /// Runs until `stop` is cancelled (then flushes, commits the checkpoint
    /// and returns the sink) or a failure that retrying cannot cure (then
    /// checkpoints what was delivered and returns the error).
    pub async fn run(mut self, stop: CancellationToken) -> Result<S, SinkError> {
        let started = self.start(&stop).await;
        let result = match started {
            Ok(true) => self.follow(&stop).await,
            Ok(false) => Ok(()),
            Err(err) => Err(err),
        };
        if let Err(err) = &result {
            self.count_error(err.kind());
        }
        // What was delivered is checkpointed, even when stopping on an error.
        let committed = self.commit().await;
        match (result, committed) {
            (Err(err), _) => Err(err),
            (Ok(()), Err(err)) => Err(err),
            (Ok(()), Ok(())) => Ok(self.sink),
        }
    }

    /// Loads the sink's and the hub's checkpoints; false when stopped first.
    async fn start(&mut self, stop: &CancellationToken) -> Result<bool, SinkError> {
        let delivery = self.sink.delivery();
        let own = match self.call_sink(stop, "read the sink's checkpoints", SinkCall::Checkpoints).await? {
            Some(own) => own,
            None => return Ok(false),
        };
        let mut backoff = self.config.backoff_min;
        let stored = loop {
            match self.hub_checkpoints().await {
                Ok(stored) => break stored,
                Err(Ended::Failed(err)) => return Err(err),
                Err(Ended::Broken(reason, _)) => {
                    tracing::warn!(subscriber = %self.config.subscriber_id, reason = %reason, "failed to read the hub checkpoints; retrying");
                    self.rotate();
                    if !self.pause(stop, &mut backoff).await {
                        return Ok(false);
                    }
                }
                Err(Ended::Stopped) => return Ok(false),
            }
        };
        let mut hub: HashMap<ShardId, (Sequence, Option<Bytes>)> = stored;
        for checkpoint in own {
            let committed = hub.remove(&checkpoint.shard).map_or(Sequence::ZERO, |(sequence, _)| sequence);
            let track = Track::new(checkpoint.shard.clone(), checkpoint.sequence, checkpoint.hash, committed);
            self.tracks.insert(checkpoint.shard, track);
        }
        for (shard, (sequence, hash)) in hub {
            // An exactly-once sink that has nothing for a shard starts it
            // from the beginning, whatever the hub holds.
            let track = match delivery {
                Delivery::AtLeastOnce => Track::new(shard.clone(), sequence, hash, sequence),
                Delivery::ExactlyOnce => Track::new(shard.clone(), Sequence::ZERO, None, sequence),
            };
            self.tracks.insert(shard, track);
        }
        if let Selection::Shards(shards) = &self.config.selection {
            for shard in shards {
                self.tracks
                    .entry(shard.clone())
                    .or_insert_with(|| Track::new(shard.clone(), Sequence::ZERO, None, Sequence::ZERO));
            }
        }
        for shard in self.tracks.keys().cloned().collect::<Vec<_>>() {
            self.report(&shard);
        }
        Ok(true)
    }

    /// Sessions until stopped or failed.
    async fn follow(&mut self, stop: &CancellationToken) -> Result<(), SinkError> {
        let mut backoff = self.config.backoff_min;
        loop {
            match self.session(stop).await {
                Ended::Stopped => return Ok(()),
                Ended::Failed(err) => return Err(err),
                Ended::Broken(reason, received) => {
                    self.progress.send_modify(|p| {
                        p.connected = false;
                        p.reconnects += 1;
                    });
                    self.count_error("stream");
                    metrics::counter!(m::RECONNECTS, m::SUBSCRIBER_LABEL => self.config.subscriber_id.clone())
                        .increment(1);
                    tracing::warn!(
                        subscriber = %self.config.subscriber_id,
                        endpoint = %self.config.endpoints[self.current].url,
                        reason = %reason,
                        "hub subscription ended; reconnecting"
                    );
                    // Save the hub from resending what is delivered (best
                    // effort: the hub may be the thing that is down).
                    self.commit().await?;
                    self.rotate();
                    if received {
                        backoff = self.config.backoff_min;
                    }
                    if !self.pause(stop, &mut backoff).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One `Subscribe` stream.
    async fn session(&mut self, stop: &CancellationToken) -> Ended {
        let request = self.subscribe_request();
        let mut client = self.client();
        let opening = tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            opened = tokio::time::timeout(defaults::CONNECT_TIMEOUT + self.config.request_timeout, client.subscribe(request)) => opened,
        };
        let stream = match opening {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return self.status_ended("open the subscription", &status, false),
            Err(_) => return Ended::Broken("opening the subscription timed out".into(), false),
        };
        if !std::mem::take(&mut self.checkpoints_fresh)
            && let Err(ended) = self.reread_checkpoints().await
        {
            return ended;
        }
        self.progress.send_modify(|p| {
            p.connected = true;
            p.endpoint = self.config.endpoints[self.current].url.clone();
        });
        tracing::info!(
            subscriber = %self.config.subscriber_id,
            selection = %self.config.selection,
            endpoint = %self.config.endpoints[self.current].url,
            "subscribed"
        );
        let silence = self.config.progress_interval * defaults::SILENCE_FACTOR;
        let chains = self.tracks.iter().map(|(shard, track)| (shard.clone(), track.chain.clone())).collect();
        let (ahead, mut prepared) = tokio::sync::mpsc::channel(reader::AHEAD_FRAMES);
        // Aborted when the session ends, however it ends.
        let _reader = AbortOnDrop(tokio::spawn(reader::read(stream, chains, silence, ahead)));
        let mut ticks = tokio::time::interval(self.config.checkpoint_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.reset();
        let mut received = false;
        loop {
            let frame = tokio::select! {
                biased;
                () = stop.cancelled() => return Ended::Stopped,
                _ = ticks.tick() => {
                    if let Err(err) = self.start_commit(false).await {
                        return Ended::Failed(err);
                    }
                    continue;
                }
                answers = async { self.committing.as_mut().expect("guarded by the condition").await },
                    if self.committing.is_some() => {
                    self.committing = None;
                    if let Err(err) = self.committed(answers) {
                        return Ended::Failed(err);
                    }
                    continue;
                }
                frame = prepared.recv() => frame,
            };
            let handled = match frame {
                None => return Ended::Broken("the stream reader stopped".into(), received),
                Some(Prepared::Broken(reason)) => return Ended::Broken(reason, received),
                Some(Prepared::Status(status)) => {
                    return self.status_ended("follow the subscription", &status, received);
                }
                Some(Prepared::Failed(err)) => return Ended::Failed(err),
                Some(Prepared::Events { shard, events, chain, recorded }) => {
                    received = true;
                    self.events(stop, shard, events, chain, recorded).await
                }
                Some(Prepared::Progress(progress)) => {
                    received = true;
                    for (shard, head) in progress.heads {
                        let shard = ShardId::from(shard);
                        if let Some(track) = self.tracks.get_mut(&shard) {
                            track.head = track.head.max(Sequence::new(head));
                            self.report(&shard);
                        }
                    }
                    Ok(true)
                }
                Some(Prepared::Snapshot(snapshot)) => {
                    received = true;
                    self.snapshot(stop, snapshot).await
                }
            };
            match handled {
                Ok(true) => {}
                Ok(false) => return Ended::Stopped,
                Err(err) => return Ended::Failed(err),
            }
            let pending: u64 =
                self.tracks.values().map(|t| t.chain.position().get().saturating_sub(t.committed.get())).sum();
            if pending >= self.config.checkpoint_events
                && let Err(err) = self.start_commit(false).await
            {
                return Ended::Failed(err);
            }
        }
    }

    /// Hands a frame's new events (checked by the reader) to the sink, and
    /// moves the shard's position to `chain` once the sink applied them;
    /// false when stopped before the sink took them.
    async fn events(
        &mut self,
        stop: &CancellationToken,
        shard: ShardId,
        events: Vec<SinkEvent>,
        chain: ShardChain,
        recorded: SystemTime,
    ) -> Result<bool, SinkError> {
        self.tracks
            .entry(shard.clone())
            .or_insert_with(|| Track::new(shard.clone(), Sequence::ZERO, None, Sequence::ZERO));
        let count = events.len() as u64;
        let batch = SinkBatch { shard: shard.clone(), events: events.into() };
        if self.call_sink(stop, "deliver events", SinkCall::Deliver(&batch)).await?.is_none() {
            return Ok(false);
        }
        let track = self.tracks.get_mut(&shard).expect("the track was inserted above");
        track.chain = chain;
        track.head = track.head.max(track.chain.position());
        track.oldest_uncommitted.get_or_insert(recorded);
        metrics::counter!(
            m::EVENTS,
            m::SUBSCRIBER_LABEL => self.config.subscriber_id.clone(),
            m::SHARD_LABEL => shard.to_string()
        )
        .increment(count);
        self.progress.send_modify(|p| p.delivered += count);
        self.report(&shard);
        Ok(true)
    }

    /// Hands a snapshot that replaces trimmed events (decoded and checked
    /// by the reader) to the sink.
    async fn snapshot(&mut self, stop: &CancellationToken, snapshot: SinkSnapshot) -> Result<bool, SinkError> {
        let shard = snapshot.shard.clone();
        let track = self
            .tracks
            .entry(shard.clone())
            .or_insert_with(|| Track::new(shard.clone(), Sequence::ZERO, None, Sequence::ZERO));
        let mut chain = track.chain.clone();
        let sequence = snapshot.sequence;
        if !chain.admit_snapshot(sequence, snapshot.hash.clone())? {
            return Ok(true);
        }
        tracing::info!(subscriber = %self.config.subscriber_id, shard = %shard, sequence = %sequence, "starting from a snapshot: the events before it were trimmed");
        if self.call_sink(stop, "apply a snapshot", SinkCall::Snapshot(&snapshot)).await?.is_none() {
            return Ok(false);
        }
        let track = self.tracks.get_mut(&shard).expect("the track was inserted above");
        track.chain = chain;
        track.head = track.head.max(sequence);
        track.oldest_uncommitted.get_or_insert_with(SystemTime::now);
        self.report(&shard);
        Ok(true)
    }

    /// Runs a sink call with its deadline, retrying transient failures
    /// after a backoff; `None` when stopped first.
    async fn call_sink(
        &mut self,
        stop: &CancellationToken,
        what: &str,
        call: SinkCall<'_>,
    ) -> Result<Option<Vec<SinkCheckpoint>>, SinkError> {
        let mut backoff = self.config.backoff_min;
        loop {
            let future = sink_call(&mut self.sink, call);
            let outcome = tokio::select! {
                () = stop.cancelled() => return Ok(None),
                outcome = tokio::time::timeout(self.config.sink_timeout, future) => outcome,
            };
            let err = match transient(outcome, self.config.sink_timeout)? {
                Ok(value) => return Ok(Some(value)),
                Err(reason) => reason,
            };
            self.count_error("transient");
            tracing::warn!(subscriber = %self.config.subscriber_id, error = %err, "failed to {what}; retrying");
            if !self.pause(stop, &mut backoff).await {
                return Ok(None);
            }
        }
    }

    /// Runs a sink call once, with its deadline, before a checkpoint
    /// commit; `None` when it failed transiently or ran out of time (the
    /// checkpoint waits for the next commit).
    async fn sink_ready(&mut self, what: &str, call: SinkCall<'_>) -> Result<Option<Vec<SinkCheckpoint>>, SinkError> {
        let outcome = tokio::time::timeout(self.config.sink_timeout, sink_call(&mut self.sink, call)).await;
        let reason = match transient(outcome, self.config.sink_timeout)? {
            Ok(value) => return Ok(Some(value)),
            Err(reason) => reason,
        };
        self.count_error("transient");
        tracing::warn!(subscriber = %self.config.subscriber_id, error = %reason, "failed to {what}; the checkpoint waits");
        Ok(None)
    }

    /// Flushes the sink and commits every shard's position that moved, and
    /// waits for the hub's answers. Unreachable hubs and transient sink
    /// failures are retried at the next commit; a checkpoint the hub refuses
    /// as not matching its log is an error.
    async fn commit(&mut self) -> Result<(), SinkError> {
        self.finish_commit().await?;
        self.start_commit(true).await?;
        self.finish_commit().await
    }

    /// Waits for the commit under way, if any, and takes its answers.
    async fn finish_commit(&mut self) -> Result<(), SinkError> {
        let Some(committing) = self.committing.take() else { return Ok(()) };
        let answers = committing.await;
        self.committed(answers)
    }

    /// Starts committing every shard's position that moved, on a task of
    /// its own: each commit is a PostgreSQL transaction on the hub, a disk
    /// sync away, and delivery goes on meanwhile (the session takes the
    /// answers as they come). At most one commit is under way; while it is,
    /// this does nothing, and the next tick or batch commits what moved
    /// since. A checkpoint never covers effects that are not durable: an
    /// at-least-once sink is flushed first; an exactly-once sink's positions
    /// are read back from it ([`ReplicationSink::checkpoints`]), what its
    /// committed transactions hold, and it is flushed first only when
    /// `settle` (the runtime stops or reconnects), so a sink that commits
    /// in the background is not made to wait for each commit.
    async fn start_commit(&mut self, settle: bool) -> Result<(), SinkError> {
        if self.committing.is_some() {
            return Ok(());
        }
        // When stopping or reconnecting the sink is flushed even if no
        // position moved: an exactly-once sink may still be committing
        // batches the hub checkpoint already covers (a rebuilt sink, whose
        // positions are below the hub's).
        if settle && self.sink_ready("flush the sink", SinkCall::Flush).await?.is_none() {
            return Ok(());
        }
        let moved: Vec<ShardId> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.chain.position() > t.committed)
            .map(|(shard, _)| shard.clone())
            .collect();
        if moved.is_empty() {
            return Ok(());
        }
        let exactly_once = self.sink.delivery() == Delivery::ExactlyOnce;
        if !settle && !exactly_once && self.sink_ready("flush the sink", SinkCall::Flush).await?.is_none() {
            return Ok(());
        }
        let stored: Option<HashMap<ShardId, SinkCheckpoint>> = if exactly_once {
            match self.sink_ready("read the sink's checkpoints", SinkCall::Checkpoints).await? {
                Some(own) => Some(own.into_iter().map(|c| (c.shard.clone(), c)).collect()),
                None => return Ok(()),
            }
        } else {
            None
        };
        let subscriber_id = self.config.subscriber_id.clone();
        let requests: Vec<(ShardId, Sequence, pb::CommitCheckpointRequest)> = moved
            .into_iter()
            .filter_map(|shard| {
                let track = self.tracks.get_mut(&shard).expect("a listed track");
                let delivered = track.chain.position();
                let (sequence, hash) = match stored.as_ref().map(|stored| stored.get(&shard)) {
                    None => (delivered, track.chain.hash().cloned()),
                    // The sink's own position, where its transactions are
                    // committed: never past what it was handed.
                    Some(Some(own)) if own.sequence > track.committed && own.sequence <= delivered => {
                        let hash =
                            if own.sequence == delivered { track.chain.hash().cloned() } else { own.hash.clone() };
                        (own.sequence, hash)
                    }
                    Some(_) => return None,
                };
                // The lag's clock restarts only when the whole of it is sent.
                track.oldest_committing = if sequence == delivered { track.oldest_uncommitted.take() } else { None };
                let request = pb::CommitCheckpointRequest {
                    subscriber_id: subscriber_id.clone(),
                    shard_id: shard.to_string(),
                    sequence: sequence.get(),
                    hash: hash.unwrap_or_default(),
                };
                Some((shard, sequence, request))
            })
            .collect();
        if requests.is_empty() {
            return Ok(());
        }
        let mut client = self.client();
        let timeout = self.config.request_timeout;
        self.committing = Some(tokio::spawn(async move {
            let mut answers = Vec::with_capacity(requests.len());
            for (shard, sequence, request) in requests {
                let answer =
                    tokio::time::timeout(timeout, client.commit_checkpoint(request)).await.ok().map(|r| r.map(drop));
                let failed = !matches!(answer, Some(Ok(())));
                answers.push(Committed { shard, sequence, answer });
                // The rest waits for the next commit.
                if failed {
                    break;
                }
            }
            answers
        }));
        Ok(())
    }

    /// Takes the hub's answers to a commit: moves the committed positions,
    /// or fails on a checkpoint the hub refuses as not matching its log.
    fn committed(&mut self, answers: Result<Vec<Committed>, tokio::task::JoinError>) -> Result<(), SinkError> {
        let answers = answers.map_err(|err| SinkError::Fatal(format!("the checkpoint commit failed: {err}")))?;
        for Committed { shard, sequence, answer } in answers {
            match answer {
                Some(Ok(())) => {
                    let Some(track) = self.tracks.get_mut(&shard) else { continue };
                    track.committed = track.committed.max(sequence);
                    track.oldest_committing = None;
                    track.committed_at = SystemTime::now();
                    self.report(&shard);
                }
                Some(Err(status)) if matches!(status.code(), tonic::Code::Internal | tonic::Code::DataLoss) => {
                    return Err(SinkError::Corrupt {
                        shard,
                        reason: format!("the hub refused checkpoint {sequence}: {}", status.message()),
                    });
                }
                Some(Err(status)) if status.code() == tonic::Code::OutOfRange => {
                    return Err(SinkError::AheadOfHub {
                        shard,
                        position: sequence,
                        reason: status.message().to_string(),
                    });
                }
                Some(Err(status)) => {
                    self.uncommitted(&shard);
                    self.count_error("checkpoint");
                    tracing::warn!(subscriber = %self.config.subscriber_id, shard = %shard, error = %status.message(), code = ?status.code(), "failed to commit the checkpoint; retrying later");
                }
                None => {
                    self.uncommitted(&shard);
                    self.count_error("checkpoint");
                    tracing::warn!(subscriber = %self.config.subscriber_id, shard = %shard, "the checkpoint commit timed out; retrying later");
                }
            }
        }
        // Shards left unsent after a failure wait for the next commit too.
        let unanswered: Vec<ShardId> =
            self.tracks.iter().filter(|(_, t)| t.oldest_committing.is_some()).map(|(s, _)| s.clone()).collect();
        for shard in unanswered {
            self.uncommitted(&shard);
        }
        Ok(())
    }

    /// A shard's commit failed: its events wait for the next one.
    fn uncommitted(&mut self, shard: &ShardId) {
        if let Some(track) = self.tracks.get_mut(shard) {
            track.oldest_uncommitted = track.oldest_committing.take().or(track.oldest_uncommitted);
        }
    }

    /// Reads the hub checkpoints again after a reconnection and lowers each
    /// shard's `committed` to the hub's where the hub holds less (its
    /// database was restored to an earlier point), so the next commit sends
    /// the position again and the hub judges it against its log.
    async fn reread_checkpoints(&mut self) -> Result<(), Ended> {
        let stored = self.hub_checkpoints().await?;
        for (shard, track) in &mut self.tracks {
            let hub = stored.get(shard).map_or(Sequence::ZERO, |(sequence, _)| *sequence);
            if hub < track.committed {
                tracing::warn!(
                    subscriber = %self.config.subscriber_id,
                    shard = %shard,
                    committed = %track.committed,
                    hub = %hub,
                    "the hub holds an older checkpoint than this subscriber committed (was its database restored?); committing the position again"
                );
                track.committed = hub;
            }
        }
        Ok(())
    }

    /// The hub's checkpoints of this subscriber.
    async fn hub_checkpoints(&mut self) -> Result<HashMap<ShardId, (Sequence, Option<Bytes>)>, Ended> {
        let pattern = match &self.config.selection {
            Selection::Pattern(pattern) => Some(pattern.clone()),
            Selection::Shards(_) => None,
        };
        let mut checkpoints = HashMap::new();
        let mut page_token = String::new();
        loop {
            let request = pb::GetCheckpointsRequest {
                subscriber_id: self.config.subscriber_id.clone(),
                shard_ids: match &self.config.selection {
                    Selection::Shards(shards) => shards.iter().map(ToString::to_string).collect(),
                    Selection::Pattern(_) => Vec::new(),
                },
                page_size: 0,
                page_token,
            };
            let mut client = self.client();
            let response =
                match tokio::time::timeout(self.config.request_timeout, client.get_checkpoints(request)).await {
                    Ok(Ok(response)) => response.into_inner(),
                    Ok(Err(status)) => return Err(self.status_ended("read the hub checkpoints", &status, false)),
                    Err(_) => return Err(Ended::Broken("reading the hub checkpoints timed out".into(), false)),
                };
            checkpoints.extend(
                response
                    .checkpoints
                    .into_iter()
                    .filter(|c| pattern.as_deref().is_none_or(|p| matches(p, &c.shard_id)))
                    .map(|c| {
                        (ShardId::from(c.shard_id), (Sequence::new(c.sequence), (!c.hash.is_empty()).then_some(c.hash)))
                    }),
            );
            // One page per call of the hub's; a subscriber's checkpoints are
            // one per shard, so this ends.
            if response.next_page_token.is_empty() {
                return Ok(checkpoints);
            }
            page_token = response.next_page_token;
        }
    }

    fn subscribe_request(&self) -> pb::SubscribeRequest {
        // The hub resumes from its checkpoints unless the sink is behind
        // one of them (an exactly-once sink whose store is older): then from
        // the lowest position, and the chains drop what is repeated.
        let behind =
            self.tracks.values().filter(|t| t.chain.position() < t.committed).map(|t| t.chain.position()).min();
        let position = match behind {
            Some(after) => {
                let low = self.tracks.values().map(|t| t.chain.position()).min().unwrap_or(after);
                pb::start_position::Position::AfterSequence(low.min(after).get())
            }
            None => pb::start_position::Position::FromCheckpoint(true),
        };
        let (shard_ids, shard_pattern) = match &self.config.selection {
            Selection::Shards(shards) => (shards.iter().map(ToString::to_string).collect(), String::new()),
            Selection::Pattern(pattern) => (Vec::new(), pattern.clone()),
        };
        pb::SubscribeRequest {
            subscriber_id: self.config.subscriber_id.clone(),
            shard_ids,
            shard_pattern,
            start: Some(pb::StartPosition { position: Some(position) }),
            progress_interval: Some(wire::duration(self.config.progress_interval)),
        }
    }

    fn status_ended(&self, what: &str, status: &tonic::Status, received: bool) -> Ended {
        let message = format!("{what}: {} ({:?})", status.message(), status.code());
        match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted => Ended::Broken(message, received),
            tonic::Code::Internal | tonic::Code::DataLoss => Ended::Failed(SinkError::Corrupt {
                shard: ShardId::from(self.config.selection.to_string()),
                reason: format!("the hub reported corruption: {message}"),
            }),
            _ => Ended::Failed(SinkError::Fatal(message)),
        }
    }

    fn client(&self) -> pb::hub_client::HubClient<Channel> {
        pb::hub_client::HubClient::new(self.channels[self.current].clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn rotate(&mut self) {
        self.current = (self.current + 1) % self.channels.len();
    }

    /// Sleeps for the backoff (with jitter) and doubles it; false when
    /// stopped first.
    async fn pause(&self, stop: &CancellationToken, backoff: &mut Duration) -> bool {
        let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
        let wait = *backoff + jitter;
        *backoff = (*backoff * 2).min(self.config.backoff_max);
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }

    fn count_error(&self, kind: &'static str) {
        metrics::counter!(m::ERRORS, m::SUBSCRIBER_LABEL => self.config.subscriber_id.clone(), m::KIND_LABEL => kind)
            .increment(1);
    }

    /// Publishes a shard's position to the progress watch and the gauges.
    fn report(&self, shard: &ShardId) {
        let Some(track) = self.tracks.get(shard) else { return };
        let head = track.head.max(track.chain.position());
        let lag_events = head.get().saturating_sub(track.committed.get());
        let lag_seconds = track.lag_seconds();
        let labels = [(m::SUBSCRIBER_LABEL, self.config.subscriber_id.clone()), (m::SHARD_LABEL, shard.to_string())];
        metrics::gauge!(m::CHECKPOINT_LAG_EVENTS, &labels).set(lag_events as f64);
        metrics::gauge!(m::CHECKPOINT_LAG_SECONDS, &labels).set(lag_seconds);
        let progress = ShardProgress {
            position: track.chain.position().get(),
            committed: track.committed.get(),
            head: head.get(),
            lag_events,
            lag_seconds,
        };
        self.progress.send_modify(|p| {
            p.shards.insert(shard.to_string(), progress);
        });
    }
}

/// True when `shard` matches a hub shard pattern (a trailing `*` matches
/// any suffix; otherwise the whole id).
fn matches(pattern: &str, shard: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => shard.starts_with(prefix),
        None => pattern == shard,
    }
}

/// A lazily connected channel to one hub endpoint, with keepalive and TLS.
fn channel(endpoint: &HubEndpoint, tls: Option<&HubTls>) -> Result<Channel, String> {
    let secure = endpoint.url.starts_with("https://");
    if !secure && !endpoint.url.starts_with("http://") {
        return Err(format!("{:?} must start with http:// or https://", endpoint.url));
    }
    if secure != tls.is_some() {
        return Err(if secure {
            "an https:// endpoint needs the hub's CA (tls)".into()
        } else {
            "an http:// endpoint cannot be used with tls; use https://".into()
        });
    }
    let mut built = Endpoint::from_shared(endpoint.url.clone())
        .map_err(|err| format!("{:?} is not a valid URL: {err}", endpoint.url))?
        .connect_timeout(defaults::CONNECT_TIMEOUT)
        .http2_keep_alive_interval(defaults::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(defaults::KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        let mut client = ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            client = client.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(domain) = &tls.domain {
            client = client.domain_name(domain.clone());
        }
        built = built.tls_config(client).map_err(|err| format!("the CA, certificate or key was refused: {err}"))?;
    }
    Ok(built.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_the_hub_does() {
        assert!(matches("resourcelease.*", "resourcelease.users"));
        assert!(!matches("resourcelease.*", "other.users"));
        assert!(matches("resourcelease.users", "resourcelease.users"));
        assert!(!matches("resourcelease.users", "resourcelease.users2"));
    }
}
