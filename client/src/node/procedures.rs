//! The ResourceLease procedures, once for every transport: each takes the
//! protobuf request and the call's context and answers the protobuf response
//! or a [`NodeError`]. This module imports no transport: the gRPC service,
//! the HTTP/JSON handler and the messages of a session
//! ([`super::transport`]) only decode, call these through
//! [`ProcedureRequest`] and encode, so they cannot drift apart.
//! [`procedures!`](procedures) is the one list of them every transport
//! expands.

use std::future::Future;
use std::time::Duration;

use omnirelay_proto::resourcelease::v1 as pb;

use super::defaults::{LEASE_POLL_SLICE, MAX_OWNER_BYTES, REPLY_MARGIN};
use super::error::{NodeError, Result};
use super::state::{Hosted, NodeInner};
use crate::ids::{PeerId, Principal};
use crate::middleware::CallDeadline;
use crate::queue::{self, Caller, EnqueueRequest, FailOutcome, LeaseRequest, Purge};
use crate::shard::parse_namespace;
use crate::wire;

/// Who is calling and by when the call must answer, read from the request
/// extensions the middleware filled in (or, for a session's message, from
/// the session and the message).
#[derive(Debug, Clone)]
pub(crate) struct CallContext {
    /// Recorded in every event the call causes: the caller's principal, and
    /// this node as the peer (the replication contract's `peer_id` is the
    /// node hosting the queue).
    caller: Caller,
    deadline: Option<CallDeadline>,
    /// The caller as the middleware bound it (principal, roles,
    /// thumbprint): what a forwarding node vouches for to the owner.
    binding: Option<crate::middleware::Caller>,
    /// The call was forwarded to this node by another: it is answered here
    /// or redirected, never forwarded again.
    forwarded_in: bool,
}

impl CallContext {
    pub(crate) fn new(caller: Caller, deadline: Option<CallDeadline>) -> Self {
        Self { caller, deadline, binding: None, forwarded_in: false }
    }

    /// The caller as the middleware bound it, kept for forwarding when
    /// `node` forwards.
    pub(crate) fn with_binding(mut self, node: &NodeInner, binding: &crate::middleware::Caller) -> Self {
        self.binding = node.forwarder.is_some().then(|| binding.clone());
        self
    }

    /// Marks a call another node forwarded here (it carries
    /// [`FORWARDED_BY_HEADER`](super::forward::FORWARDED_BY_HEADER)).
    pub(crate) fn forwarded_in(mut self, forwarded: bool) -> Self {
        self.forwarded_in = forwarded;
        self
    }

    /// Whether another node forwarded this call here.
    pub(crate) fn is_forwarded_in(&self) -> bool {
        self.forwarded_in
    }

    /// The caller as the middleware bound it, if known.
    pub(crate) fn binding(&self) -> Option<&crate::middleware::Caller> {
        self.binding.as_ref()
    }

    /// The time left before the call's deadline, less the margin the reply
    /// needs; `None` without a deadline.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|deadline| deadline.remaining().saturating_sub(REPLY_MARGIN))
    }

    /// Reads the context of a unary call from the extensions the middleware
    /// filled in; a call without a bound caller is refused. The binding is
    /// kept only when `node` forwards (nothing else reads it).
    pub(crate) fn from_extensions(extensions: &http::Extensions, node: &NodeInner) -> Result<Self> {
        let bound = extensions.get::<crate::middleware::Caller>().ok_or(NodeError::NoCaller)?;
        Ok(Self {
            caller: Caller { principal: bound.principal.clone(), peer: node.node_id.clone() },
            deadline: extensions.get::<CallDeadline>().copied(),
            binding: node.forwarder.is_some().then(|| bound.clone()),
            forwarded_in: false,
        })
    }

    fn principal(&self) -> &Principal {
        &self.caller.principal
    }

    /// `wanted`, shortened so the call still answers before its deadline.
    fn bounded(&self, wanted: Duration) -> Duration {
        match self.deadline {
            Some(deadline) => wanted.min(deadline.remaining().saturating_sub(REPLY_MARGIN)),
            None => wanted,
        }
    }
}

/// The lease owner a worker's request names, bound to the caller: owners
/// are `{principal}` or `{principal}#{worker}`. A request naming a bare
/// worker id gets it qualified; one already qualified by the caller's
/// principal keeps it. Different principals can therefore never hold, renew
/// or end each other's leases, while one principal may run many workers
/// that peer health tells apart.
fn bind_owner(principal: &Principal, requested: &str) -> Result<PeerId> {
    if requested.trim().is_empty() {
        return Err(NodeError::invalid("owner", "is required and must not be blank"));
    }
    if requested.len() > MAX_OWNER_BYTES + principal.as_str().len() + 1 {
        return Err(NodeError::invalid("owner", format!("is longer than {MAX_OWNER_BYTES} bytes")));
    }
    if belongs_to(principal, requested) {
        return Ok(PeerId::from(requested));
    }
    if requested.len() > MAX_OWNER_BYTES {
        return Err(NodeError::invalid("owner", format!("is longer than {MAX_OWNER_BYTES} bytes")));
    }
    if requested.chars().any(char::is_control) {
        return Err(NodeError::invalid("owner", "must not contain control characters"));
    }
    Ok(PeerId::new(format!("{principal}#{requested}")))
}

/// True when `owner` is `principal` or `principal#...`.
fn belongs_to(principal: &Principal, owner: &str) -> bool {
    owner.strip_prefix(principal.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('#'))
}

/// Decodes a request's handle and checks that its owner belongs to the
/// caller.
fn owned_handle(cx: &CallContext, handle: Option<&pb::OwnershipHandle>) -> Result<queue::LeaseHandle> {
    let handle = wire::handle_from_pb("handle", handle)?;
    if !belongs_to(cx.principal(), handle.owner.as_str()) {
        return Err(NodeError::OwnerNotBound { owner: handle.owner, principal: cx.principal().clone() });
    }
    Ok(handle)
}

impl NodeInner {
    /// The queue of a request's namespace: malformed is INVALID_ARGUMENT
    /// naming `namespace`, valid but not hosted here NOT_FOUND, assigned to
    /// another node of the mesh [`NodeError::NotOwner`].
    fn hosted(&self, namespace: &str) -> Result<&Hosted> {
        let shard = parse_namespace("namespace", namespace)
            .map_err(|err| NodeError::invalid("namespace", err.to_string().trim_start_matches("namespace: ")))?;
        let hosted = self.queues.get(&shard).ok_or_else(|| NodeError::UnknownNamespace(shard.clone()))?;
        if let Some(view) = &*self.assigned.borrow()
            && let Some((owner, address)) = view.elsewhere(&shard)
        {
            return Err(NodeError::NotOwner {
                namespace: shard,
                owner: owner.to_string(),
                address: address.map(str::to_string),
            });
        }
        Ok(hosted)
    }

    pub(crate) async fn enqueue(&self, cx: &CallContext, request: pb::EnqueueRequest) -> Result<pb::EnqueueResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let payload = request.payload.ok_or_else(|| NodeError::invalid("payload", "is required"))?;
        let delay = wire::duration_from_pb("delay", request.delay.as_ref())?.unwrap_or_default();
        let enqueue = EnqueueRequest { payload: wire::payload_from_pb(payload), priority: request.priority, delay };
        let enqueued = hosted.queue.enqueue(&cx.caller, enqueue).await?;
        Ok(pb::EnqueueResponse {
            item_id: enqueued.item_id.to_string(),
            deduplicated: enqueued.deduplicated,
            sequence: enqueued.sequence.get(),
        })
    }

    pub(crate) async fn lease(&self, cx: &CallContext, request: pb::LeaseRequest) -> Result<pb::LeaseResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let owner = bind_owner(cx.principal(), &request.owner)?;
        let wait = wire::duration_from_pb("wait", request.wait.as_ref())?.unwrap_or_default();
        let lease_duration = wire::duration_from_pb("lease_duration", request.lease_duration.as_ref())?;
        let wait = cx.bounded(wait.min(crate::defaults::LEASE_WAIT_MAX));
        // A worker waiting in a long-poll is alive: mark it now and between
        // slices of the wait, so peer health never takes a patient worker
        // for a silent one.
        let slice = LEASE_POLL_SLICE.min(self.tracker.config().heartbeat_grace / 3).max(Duration::from_millis(1));
        let until = tokio::time::Instant::now() + wait;
        loop {
            self.tracker.record_heartbeat(&owner);
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let lease = LeaseRequest { owner: owner.clone(), wait: left.min(slice), lease_duration };
            if let Some(leased) = hosted.queue.lease(&cx.caller, lease).await? {
                return Ok(pb::LeaseResponse { item: Some(wire::work_item(&leased.item)) });
            }
            if left <= slice {
                return Ok(pb::LeaseResponse { item: None });
            }
        }
    }

    pub(crate) async fn heartbeat(
        &self,
        cx: &CallContext,
        request: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let handle = owned_handle(cx, request.handle.as_ref())?;
        let extend_by = wire::duration_from_pb("extend_by", request.extend_by.as_ref())?;
        let expires_at = hosted.queue.heartbeat(&cx.caller, &handle, extend_by, request.progress).await?;
        Ok(pb::HeartbeatResponse { expires_at: Some(wire::timestamp(expires_at)) })
    }

    pub(crate) async fn complete(
        &self,
        cx: &CallContext,
        request: pb::CompleteRequest,
    ) -> Result<pb::CompleteResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let handle = owned_handle(cx, request.handle.as_ref())?;
        let already_completed = hosted.queue.complete(&cx.caller, &handle).await?;
        Ok(pb::CompleteResponse { already_completed })
    }

    pub(crate) async fn fail(&self, cx: &CallContext, request: pb::FailRequest) -> Result<pb::FailResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let handle = owned_handle(cx, request.handle.as_ref())?;
        let fail = wire::fail_request_from_pb(&request)?;
        Ok(match hosted.queue.fail(&cx.caller, &handle, fail).await? {
            FailOutcome::Requeued { not_before } => pb::FailResponse {
                outcome: pb::FailOutcome::Requeued as i32,
                not_before: Some(wire::timestamp(not_before)),
            },
            FailOutcome::DeadLettered { .. } => {
                pb::FailResponse { outcome: pb::FailOutcome::DeadLettered as i32, not_before: None }
            }
        })
    }

    async fn drain(&self, cx: &CallContext, request: pb::DrainRequest) -> Result<pb::DrainResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let mode = wire::drain_mode_from_pb("mode", request.mode)?;
        let wait = wire::duration_from_pb("wait_timeout", request.wait_timeout.as_ref())?
            .unwrap_or(crate::defaults::DRAIN_WAIT)
            .min(crate::defaults::DRAIN_WAIT_MAX);
        let snapshot = hosted.queue.drain(&cx.caller, mode, Some(cx.bounded(wait))).await?;
        Ok(pb::DrainResponse { snapshot: Some(wire::drain_snapshot(&snapshot)) })
    }

    async fn resume(&self, cx: &CallContext, request: pb::ResumeRequest) -> Result<pb::ResumeResponse> {
        let hosted = self.hosted(&request.namespace)?;
        Ok(pb::ResumeResponse { resumed: hosted.queue.resume(&cx.caller).await? })
    }

    async fn restore(&self, cx: &CallContext, request: pb::RestoreRequest) -> Result<pb::RestoreResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let snapshot = wire::drain_snapshot_from_pb("snapshot", request.snapshot)?;
        let restored = hosted.queue.restore(&cx.caller, &snapshot).await?;
        Ok(pb::RestoreResponse { restored: restored.restored, skipped: restored.skipped })
    }

    async fn list_dead_letters(
        &self,
        _cx: &CallContext,
        request: pb::ListDeadLettersRequest,
    ) -> Result<pb::ListDeadLettersResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let page = hosted.queue.dead_letters(request.page_size, Some(&request.page_token)).await?;
        Ok(pb::ListDeadLettersResponse {
            dead_letters: page.dead_letters.iter().map(wire::dead_letter).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }

    async fn get_dead_letter(
        &self,
        _cx: &CallContext,
        request: pb::GetDeadLetterRequest,
    ) -> Result<pb::GetDeadLetterResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let item_id = wire::item_id_from_pb("item_id", &request.item_id)?;
        let letter = hosted.queue.dead_letter(item_id).await?;
        Ok(pb::GetDeadLetterResponse { dead_letter: Some(wire::dead_letter(&letter)) })
    }

    async fn redrive_dead_letter(
        &self,
        cx: &CallContext,
        request: pb::RedriveDeadLetterRequest,
    ) -> Result<pb::RedriveDeadLetterResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let item_id = wire::item_id_from_pb("item_id", &request.item_id)?;
        let item_id = hosted.queue.redrive(&cx.caller, item_id).await?;
        Ok(pb::RedriveDeadLetterResponse { item_id: item_id.to_string() })
    }

    async fn purge_dead_letters(
        &self,
        cx: &CallContext,
        request: pb::PurgeDeadLettersRequest,
    ) -> Result<pb::PurgeDeadLettersResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let which = if request.all {
            Purge::All
        } else {
            let ids = request
                .item_ids
                .iter()
                .enumerate()
                .map(|(index, id)| wire::item_id_from_pb(&format!("item_ids[{index}]"), id))
                .collect::<Result<Vec<_>, _>>()?;
            Purge::Items(ids)
        };
        Ok(pb::PurgeDeadLettersResponse { purged: hosted.queue.purge_dead_letters(&cx.caller, which).await? })
    }

    async fn purge_drained(
        &self,
        cx: &CallContext,
        request: pb::PurgeDrainedRequest,
    ) -> Result<pb::PurgeDrainedResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let ids = request
            .item_ids
            .iter()
            .enumerate()
            .map(|(index, id)| wire::item_id_from_pb(&format!("item_ids[{index}]"), id))
            .collect::<Result<Vec<_>, _>>()?;
        let done = hosted.queue.purge_drained(&cx.caller, &ids).await?;
        Ok(pb::PurgeDrainedResponse { purged: done.purged, skipped: done.skipped })
    }

    async fn stats(&self, _cx: &CallContext, request: pb::StatsRequest) -> Result<pb::StatsResponse> {
        let hosted = self.hosted(&request.namespace)?;
        let stats = hosted.queue.stats().await?;
        Ok(pb::StatsResponse {
            pending: stats.pending,
            active: stats.active,
            dead_letters: stats.dead_letters,
            draining: stats.draining,
            capacity: stats.capacity,
            backpressure: Some(wire::signal(&stats.backpressure)),
            last_sequence: stats.last_sequence.get(),
        })
    }
}

/// A ResourceLease request message and the procedure that answers it. Every
/// transport answers a decoded request through this trait (see
/// [`super::transport::call`]); [`procedures!`](procedures) implements it for
/// each request from the one list.
pub(crate) trait ProcedureRequest: Send + Sized + 'static {
    /// The procedure's response message.
    type Response: Send + 'static;

    /// The request's `namespace` (field 1 of every ResourceLease request).
    fn namespace_mut(&mut self) -> &mut String;

    /// Runs the procedure on `node` for the caller of `cx`.
    fn answer(self, node: &NodeInner, cx: &CallContext) -> impl Future<Output = Result<Self::Response>> + Send;
}

/// The one list of ResourceLease procedures (all but `Session`, which
/// carries some of them as messages): `procedures!(then)` expands to
/// `then! { Variant => method(Request) -> Response, ... }`, with the
/// [`Procedure`](crate::middleware::Procedure) variant, the `NodeInner`
/// method (and tonic method) and the `pb` message names. The transports
/// expand it for tonic's methods and the JSON dispatch, so no transport can
/// leave a procedure out or route it elsewhere.
macro_rules! procedures {
    ($then:ident) => {
        $then! {
            Enqueue => enqueue(EnqueueRequest) -> EnqueueResponse,
            Lease => lease(LeaseRequest) -> LeaseResponse,
            Heartbeat => heartbeat(HeartbeatRequest) -> HeartbeatResponse,
            Complete => complete(CompleteRequest) -> CompleteResponse,
            Fail => fail(FailRequest) -> FailResponse,
            Drain => drain(DrainRequest) -> DrainResponse,
            Resume => resume(ResumeRequest) -> ResumeResponse,
            Restore => restore(RestoreRequest) -> RestoreResponse,
            ListDeadLetters => list_dead_letters(ListDeadLettersRequest) -> ListDeadLettersResponse,
            GetDeadLetter => get_dead_letter(GetDeadLetterRequest) -> GetDeadLetterResponse,
            RedriveDeadLetter => redrive_dead_letter(RedriveDeadLetterRequest) -> RedriveDeadLetterResponse,
            PurgeDrained => purge_drained(PurgeDrainedRequest) -> PurgeDrainedResponse,
            PurgeDeadLetters => purge_dead_letters(PurgeDeadLettersRequest) -> PurgeDeadLettersResponse,
            Stats => stats(StatsRequest) -> StatsResponse,
        }
    };
}
pub(crate) use procedures;

/// Implements [`ProcedureRequest`] for every request of the list.
macro_rules! answered_by_node {
    ($($variant:ident => $method:ident($request:ident) -> $response:ident),* $(,)?) => {
        $(impl ProcedureRequest for pb::$request {
            type Response = pb::$response;

            fn namespace_mut(&mut self) -> &mut String {
                &mut self.namespace
            }

            fn answer(self, node: &NodeInner, cx: &CallContext) -> impl Future<Output = Result<pb::$response>> + Send {
                node.$method(cx, self)
            }
        })*
    };
}

procedures!(answered_by_node);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_bound_to_the_principal() {
        let principal = Principal::from("spiffe://mesh/worker");
        assert_eq!(bind_owner(&principal, "w-1").expect("valid").as_str(), "spiffe://mesh/worker#w-1");
        assert_eq!(
            bind_owner(&principal, "spiffe://mesh/worker#w-1").expect("valid").as_str(),
            "spiffe://mesh/worker#w-1"
        );
        assert_eq!(bind_owner(&principal, "spiffe://mesh/worker").expect("valid").as_str(), "spiffe://mesh/worker");
        // A prefix of another principal is not a qualification of this one.
        assert_eq!(
            bind_owner(&principal, "spiffe://mesh/workerX").expect("valid").as_str(),
            "spiffe://mesh/worker#spiffe://mesh/workerX"
        );
        for bad in ["", "  ", &"x".repeat(MAX_OWNER_BYTES + 1), "a\nb"] {
            let err = bind_owner(&principal, bad).expect_err(bad);
            assert!(err.to_string().starts_with("invalid owner: "), "{err}");
        }
        assert!(belongs_to(&principal, "spiffe://mesh/worker#7"));
        assert!(!belongs_to(&principal, "spiffe://mesh/worker7"));
        assert!(!belongs_to(&principal, "spiffe://mesh/other#7"));
    }
}
