//! The `omnirelay.hub.v1.Hub` gRPC service: request handling on top of the
//! store, the live tail and subscriptions. Conversions live in
//! [`crate::api::wire`], error mapping in [`crate::api::error`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::api::error::{self, HubError};
use crate::api::wire;
use crate::defaults;
use crate::fanout::subscribe::Subscriptions;
use crate::log::event::ChainHash;
use crate::log::ids::{Epoch, InvalidInput, Sequence};
use crate::log::verify;
use crate::proto::hub::v1 as pb;
use crate::replica::health::WriteHealth;
use crate::security::access::{Guard, HubProcedure};
use crate::security::quota::{AppendRate, StreamQuota};
use crate::store::LogStore;
use crate::telemetry::{self, HubCounters, ReadPurpose};

/// The Hub service of one replica.
#[derive(Clone)]
pub struct HubService {
    store: Arc<dyn LogStore>,
    counters: Arc<HubCounters>,
    writes: Arc<WriteHealth>,
    subscriptions: Subscriptions,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Who may call what (see [`crate::security::access`]); every RPC asks it before
    /// reading or writing anything.
    guard: Arc<Guard>,
    /// Open append streams per principal.
    append_streams: Arc<StreamQuota>,
    /// Open subscriptions per principal.
    subscription_streams: Arc<StreamQuota>,
    /// Appended events per second per principal.
    append_rate: Arc<AppendRate>,
}

impl HubService {
    pub(crate) fn new(
        store: Arc<dyn LogStore>,
        counters: Arc<HubCounters>,
        writes: Arc<WriteHealth>,
        subscriptions: Subscriptions,
        cancel: CancellationToken,
        tasks: TaskTracker,
        guard: Arc<Guard>,
    ) -> Self {
        let limits = guard.limits();
        Self {
            store,
            counters,
            writes,
            subscriptions,
            cancel,
            tasks,
            guard,
            append_streams: StreamQuota::new("append streams", limits.append_streams),
            subscription_streams: StreamQuota::new("subscriptions", limits.subscriptions),
            append_rate: AppendRate::new(limits.append_rate, limits.append_burst),
        }
    }
}

type AppendStream = Pin<Box<dyn Stream<Item = Result<pb::AppendResponse, Status>> + Send>>;

/// A subscription's frames (see the `subscribe` module's outbox).
type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::hub_server::Hub for HubService {
    type AppendStream = AppendStream;
    type SubscribeStream = SubscribeStream;

    async fn append(&self, request: Request<Streaming<pb::AppendRequest>>) -> Result<Response<AppendStream>, Status> {
        // The stream names its shards batch by batch: the caller is bound
        // here, and each batch's shard is authorized as it is read.
        let caller = self.guard.authenticate(&request)?;
        let permit = self.append_streams.acquire(&caller.principal)?;
        let inbound = request.into_inner();
        let access = (self.guard.clone(), caller, self.append_rate.clone());
        let (out, responses) = mpsc::channel(defaults::APPEND_STREAM_IN_FLIGHT);
        let (store, writes, cancel) = (self.store.clone(), self.writes.clone(), self.cancel.clone());
        // The stream's task keeps the request's span (method, principal), so
        // its logs say who was appending.
        self.tasks.spawn(
            async move {
                // The stream counts against its principal until it ends.
                let _permit = permit;
                serve_appends(store, writes, inbound, out, cancel, access).await;
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }

    async fn subscribe(&self, request: Request<pb::SubscribeRequest>) -> Result<Response<SubscribeStream>, Status> {
        let caller = self.guard.authenticate(&request)?;
        let selection = wire::selection(request.into_inner()).map_err(HubError::from)?;
        for shard in &selection.shards {
            self.guard.authorize_subscriber(&caller, HubProcedure::Subscribe, &selection.subscriber, shard)?;
        }
        if let Some(pattern) = &selection.pattern {
            self.guard.authorize_pattern(&caller, &selection.subscriber, pattern)?;
        }
        let permit = self.subscription_streams.acquire(&caller.principal)?;
        let frames = self.subscriptions.start(selection).await?;
        // The subscription counts against its principal until its stream
        // is dropped (it ended, or the subscriber went away).
        Ok(Response::new(Box::pin(frames.map(move |frame| {
            let _held = &permit;
            frame
        }))))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::CommitCheckpointRequest>,
    ) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        let caller = self.guard.authenticate(&request)?;
        let request = request.into_inner();
        let subscriber = wire::subscriber(request.subscriber_id).map_err(HubError::from)?;
        let shard = wire::shard("shard_id", request.shard_id).map_err(HubError::from)?;
        self.guard.authorize_subscriber(&caller, HubProcedure::CommitCheckpoint, &subscriber, &shard)?;
        let hash = match request.hash.len() {
            0 => None,
            _ => Some(ChainHash::from_slice(&request.hash).ok_or_else(|| {
                HubError::from(InvalidInput::new(
                    "hash",
                    format!("{} bytes; a chain hash is 32 bytes (the event's `hash`), or empty", request.hash.len()),
                ))
            })?),
        };
        let commit = self
            .store
            .commit_checkpoint(subscriber, shard, Sequence(request.sequence), hash)
            .await
            .map_err(HubError::from)?;
        Ok(Response::new(pb::CommitCheckpointResponse {
            checkpoint: Some(wire::checkpoint(&commit.checkpoint)),
            moved: commit.moved,
        }))
    }

    async fn get_checkpoints(
        &self,
        request: Request<pb::GetCheckpointsRequest>,
    ) -> Result<Response<pb::GetCheckpointsResponse>, Status> {
        let caller = self.guard.authenticate(&request)?;
        let request = request.into_inner();
        let subscriber = if request.subscriber_id.is_empty() {
            None
        } else {
            Some(wire::subscriber(request.subscriber_id).map_err(HubError::from)?)
        };
        let shards = request
            .shard_ids
            .into_iter()
            .map(|id| wire::shard("shard_ids", id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(HubError::from)?;
        let limit = match request.page_size as usize {
            0 => defaults::CHECKPOINTS_PAGE,
            size => size.min(defaults::MAX_CHECKPOINTS_PAGE),
        };
        let after = wire::checkpoint_page_token(&request.page_token).map_err(HubError::from)?;
        self.guard.authorize_checkpoints(&caller, subscriber.as_ref(), &shards)?;
        // One more than the page: whether there is a next page is known
        // without another query.
        let mut checkpoints =
            self.store.checkpoint_page(subscriber, shards, after, limit + 1).await.map_err(HubError::from)?;
        let next_page_token = if checkpoints.len() > limit {
            checkpoints.truncate(limit);
            checkpoints.last().map(wire::next_checkpoint_page_token).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::GetCheckpointsResponse {
            checkpoints: checkpoints.iter().map(wire::checkpoint).collect(),
            next_page_token,
        }))
    }

    async fn acquire_shard(
        &self,
        request: Request<pb::AcquireShardRequest>,
    ) -> Result<Response<pb::AcquireShardResponse>, Status> {
        let caller = self.guard.authenticate(&request)?;
        let request = request.into_inner();
        let shard = wire::shard("shard_id", request.shard_id).map_err(HubError::from)?;
        self.guard.authorize(&caller, HubProcedure::AcquireShard, &shard)?;
        let owner = wire::owner(request.owner).map_err(HubError::from)?;
        let ttl = wire::lease_ttl(request.ttl).map_err(HubError::from)?;
        // Acquiring is what creates a shard: a new one must follow the shard-
        // name grammar; one created under the older, wider grammar is still
        // served (see `ShardId::check_new`).
        if let Err(invalid) = shard.check_new()
            && self.store.shard_state(shard.clone()).await.map_err(HubError::from)?.is_none()
        {
            return Err(HubError::from(invalid).into());
        }
        let grant = self
            .store
            .acquire_shard_as(shard, owner, Some(caller.principal.clone()), ttl)
            .await
            .map_err(HubError::from)?;
        if grant.granted {
            tracing::info!(shard = %grant.lease.shard, epoch = %grant.lease.epoch, "granted a shard lease");
        }
        Ok(Response::new(pb::AcquireShardResponse { granted: grant.granted, lease: Some(wire::lease(&grant.lease)) }))
    }

    async fn renew_shard(
        &self,
        request: Request<pb::RenewShardRequest>,
    ) -> Result<Response<pb::RenewShardResponse>, Status> {
        let caller = self.guard.authenticate(&request)?;
        let request = request.into_inner();
        let shard = wire::shard("shard_id", request.shard_id).map_err(HubError::from)?;
        self.guard.authorize(&caller, HubProcedure::RenewShard, &shard)?;
        let owner = wire::owner(request.owner).map_err(HubError::from)?;
        let ttl = wire::lease_ttl(request.ttl).map_err(HubError::from)?;
        let lease = self
            .store
            .renew_shard_as(shard, owner, Some(caller.principal.clone()), Epoch(request.epoch), ttl)
            .await
            .map_err(HubError::from)?;
        Ok(Response::new(pb::RenewShardResponse { lease: Some(wire::lease(&lease)) }))
    }

    async fn release_shard(
        &self,
        request: Request<pb::ReleaseShardRequest>,
    ) -> Result<Response<pb::ReleaseShardResponse>, Status> {
        let caller = self.guard.authenticate(&request)?;
        let request = request.into_inner();
        let shard = wire::shard("shard_id", request.shard_id).map_err(HubError::from)?;
        self.guard.authorize(&caller, HubProcedure::ReleaseShard, &shard)?;
        let owner = wire::owner(request.owner).map_err(HubError::from)?;
        let released = self
            .store
            .release_shard_as(shard, owner, Some(caller.principal.clone()), Epoch(request.epoch))
            .await
            .map_err(HubError::from)?;
        Ok(Response::new(pb::ReleaseShardResponse { released }))
    }

    async fn list_shard_leases(
        &self,
        request: Request<pb::ListShardLeasesRequest>,
    ) -> Result<Response<pb::ListShardLeasesResponse>, Status> {
        let caller = self.guard.authenticate(&request)?;
        self.guard.authorize_listing(&caller, HubProcedure::ListShardLeases)?;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => defaults::LIST_LEASES_LIMIT,
            limit => usize::try_from(limit).unwrap_or(usize::MAX).min(defaults::MAX_LIST_LEASES_LIMIT),
        };
        let now = std::time::SystemTime::now();
        let shards = self.store.list_shards(request.prefix).await.map_err(HubError::from)?;
        let mut held = shards
            .iter()
            .map(|state| &state.lease)
            .filter(|lease| request.after.is_empty() || lease.shard.as_str() > request.after.as_str())
            .filter(|lease| lease.owner.is_some() && lease.expires_at.is_some_and(|at| at > now))
            // Only the shards the caller may read.
            .filter(|lease| self.guard.may(&caller, HubProcedure::ListShardLeases, &lease.shard));
        let leases: Vec<_> = held.by_ref().take(limit).map(wire::lease).collect();
        let next_after = match (held.next(), leases.last()) {
            (Some(_), Some(last)) => last.shard_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListShardLeasesResponse { leases, next_after }))
    }

    async fn read_range(
        &self,
        request: Request<pb::ReadRangeRequest>,
    ) -> Result<Response<pb::ReadRangeResponse>, Status> {
        let caller = self.guard.authenticate(&request)?;
        let request = request.into_inner();
        let shard = wire::shard("shard_id", request.shard_id).map_err(HubError::from)?;
        self.guard.authorize(&caller, HubProcedure::ReadRange, &shard)?;
        if request.from_sequence == 0 {
            return Err(HubError::from(InvalidInput::new("from_sequence", "sequences start at 1")).into());
        }
        if request.to_sequence != 0 && request.to_sequence < request.from_sequence {
            return Err(HubError::from(InvalidInput::new(
                "to_sequence",
                format!("{} is below from_sequence {}", request.to_sequence, request.from_sequence),
            ))
            .into());
        }
        let limit = match request.limit as usize {
            0 => defaults::READ_RANGE_LIMIT,
            limit => limit.min(defaults::MAX_READ_RANGE_LIMIT),
        };
        let to = (request.to_sequence != 0).then_some(Sequence(request.to_sequence));
        self.counters.read(ReadPurpose::Range);
        let page = self
            .store
            .read_range(shard.clone(), Sequence(request.from_sequence), to, limit, defaults::READ_RANGE_BYTES)
            .await
            .map_err(HubError::from)?;
        // The same checks `omnirelay-hub verify` makes: a hole anywhere in
        // or just before the range, a broken link or hash, an undecodable
        // body all fail the read, naming the first bad sequence.
        let events = verify::decode_page(&page).map_err(HubError::from)?;
        Ok(Response::new(pb::ReadRangeResponse { events, head_sequence: page.head.0, low_sequence: page.low.0 }))
    }

    async fn put_snapshot(
        &self,
        request: Request<pb::PutSnapshotRequest>,
    ) -> Result<Response<pb::PutSnapshotResponse>, Status> {
        let caller = self.guard.authenticate(&request)?;
        let request = request.into_inner();
        let shard = wire::shard("shard_id", request.shard_id).map_err(HubError::from)?;
        self.guard.authorize(&caller, HubProcedure::PutSnapshot, &shard)?;
        if request.data.len() > defaults::MAX_SNAPSHOT_BYTES {
            return Err(HubError::from(InvalidInput::new(
                "data",
                format!("{} bytes; the limit is {}", request.data.len(), defaults::MAX_SNAPSHOT_BYTES),
            ))
            .into());
        }
        let snapshot = self
            .store
            .put_snapshot(shard, Sequence(request.sequence), Epoch(request.epoch), request.data)
            .await
            .map_err(HubError::from)?;
        Ok(Response::new(pb::PutSnapshotResponse { snapshot: Some(wire::snapshot(&snapshot, false)) }))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let caller = self.guard.authenticate(&request)?;
        let request = request.into_inner();
        let shard = wire::shard("shard_id", request.shard_id).map_err(HubError::from)?;
        self.guard.authorize(&caller, HubProcedure::GetSnapshot, &shard)?;
        let below = (request.at_or_below != 0).then_some(Sequence(request.at_or_below));
        let snapshot = self.store.snapshot(shard, below).await.map_err(HubError::from)?;
        Ok(Response::new(pb::GetSnapshotResponse { snapshot: snapshot.map(|s| wire::snapshot(&s, true)) }))
    }
}

/// Serves one append stream: reads batches in order (so a producer's batches
/// are queued in the order sent), keeps up to
/// [`defaults::APPEND_STREAM_IN_FLIGHT`] awaiting their commit, and answers
/// each as soon as it is durable or rejected. A rejected batch is answered
/// and the stream stays open.
///
/// A frame that does not decode (or is over the message size limit) ends
/// the stream, since nothing after it can be trusted to be the producer's
/// next batch: reading stops, every batch already taken is still answered,
/// and then the stream ends with INVALID_ARGUMENT naming the frame (its
/// position on the stream and the batch before it). Ending with OK there
/// would tell the producer everything was delivered. A batch for a shard
/// the caller may not append to ends the stream the same way, with
/// PERMISSION_DENIED; nothing of it is written.
async fn serve_appends(
    store: Arc<dyn LogStore>,
    writes: Arc<WriteHealth>,
    mut inbound: Streaming<pb::AppendRequest>,
    out: mpsc::Sender<Result<pb::AppendResponse, Status>>,
    cancel: CancellationToken,
    (guard, caller, rate): (Arc<Guard>, omnirelay_identity::Caller, Arc<AppendRate>),
) {
    let mut in_flight = FuturesUnordered::new();
    let mut reading = true;
    // Frames read so far, and the batch id of the last one, to name a bad
    // frame; the status the stream ends with once what was taken is answered.
    let mut frames: u64 = 0;
    let mut last_batch: Option<u64> = None;
    let mut ending: Option<Status> = None;
    loop {
        let can_read = reading && in_flight.len() < defaults::APPEND_STREAM_IN_FLIGHT;
        tokio::select! {
            () = cancel.cancelled(), if reading => {
                // Shutting down: accept nothing more, answer what is queued.
                reading = false;
            }
            message = inbound.message(), if can_read => match message {
                Ok(Some(request)) => {
                    frames += 1;
                    last_batch = Some(request.batch_id);
                    let batch_id = request.batch_id;
                    let shard_id = request.shard_id.clone();
                    let checked = wire::append_batch(request).map(|batch| {
                        let allowed = guard
                            .authorize(&caller, HubProcedure::Append, &batch.shard)
                            .and_then(|()| rate.take(&caller.principal, batch.events.len()));
                        (batch, allowed)
                    });
                    match checked {
                        Ok((_, Err(denied))) => {
                            // Denied, or over the append rate. Like a bad
                            // frame: what was taken is answered, then the
                            // stream ends with the refusal; nothing of this
                            // batch is written.
                            reading = false;
                            ending = Some(denied);
                        }
                        Ok((batch, Ok(()))) => {
                            let received = Instant::now();
                            let pending = store.append(batch);
                            in_flight.push(pending.map(move |result| {
                                metrics::histogram!(telemetry::APPEND_LATENCY).record(received.elapsed().as_secs_f64());
                                (batch_id, shard_id, result)
                            }));
                        }
                        Err(invalid) => {
                            let response = pb::AppendResponse {
                                batch_id,
                                shard_id,
                                result: Some(pb::append_response::Result::Error(error::invalid_batch(&invalid))),
                            };
                            if out.send(Ok(response)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Ok(None) => reading = false,
                Err(status) => {
                    reading = false;
                    match bad_frame(&status, frames + 1, last_batch) {
                        Some(refusal) => {
                            tracing::warn!(error = %refusal.message(), "ending an append stream on a bad frame");
                            ending = Some(refusal);
                        }
                        None => {
                            tracing::debug!(error = %status, "append stream broke; its queued batches still commit");
                            ending = Some(status);
                        }
                    }
                }
            },
            Some((batch_id, shard_id, result)) = in_flight.next(), if !in_flight.is_empty() => {
                writes.observe(&result);
                let result = match result {
                    Ok(ack) => pb::append_response::Result::Ack(wire::append_ack(&ack)),
                    Err(err) => pb::append_response::Result::Error(error::append_error(&err)),
                };
                if out.send(Ok(pb::AppendResponse { batch_id, shard_id, result: Some(result) })).await.is_err() {
                    return;
                }
            }
            else => {
                if let Some(status) = ending {
                    let _ = out.send(Err(status)).await;
                }
                return;
            }
        }
    }
}

/// The INVALID_ARGUMENT an append stream ends with when frame number
/// `frame` (counting from 1) failed to decode or was over the size limit;
/// `None` when `status` is not about the frame (the connection broke).
/// tonic reports an undecodable frame as INTERNAL and an oversized one as
/// OUT_OF_RANGE (or RESOURCE_EXHAUSTED); neither is the hub's fault.
fn bad_frame(status: &Status, frame: u64, last_batch: Option<u64>) -> Option<Status> {
    use tonic::Code;
    if !matches!(status.code(), Code::Internal | Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument) {
        return None;
    }
    let after = match last_batch {
        Some(batch_id) => format!("the frame after batch_id {batch_id}"),
        None => "the stream's first frame".to_string(),
    };
    Some(Status::invalid_argument(format!(
        "append stream frame {frame} ({after}): {}; every batch before it was answered, nothing after it was read",
        status.message()
    )))
}
