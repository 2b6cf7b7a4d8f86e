//! The `Session` RPC: a long-lived bidirectional stream carrying the hot-path
//! calls (enqueue, lease, heartbeat, complete, fail) of one producer or
//! worker process, the way NATS, Kafka or Pulsar clients keep one session
//! instead of paying for a request per operation.
//!
//! A unary call pays for HTTP/2 stream setup, HPACK headers and trailers,
//! the whole tower stack and a task per call; a session message is one
//! HTTP/2 DATA frame each way. What a call is promised does not change:
//!
//! | guarantee | unary call | session message |
//! |---|---|---|
//! | caller | bound per call | bound once, when the stream opens (UNAUTHENTICATED ends the stream before any message is read) |
//! | authorization | per call | per message, same [`AuthorizationTable`](crate::middleware::AuthorizationTable), for the message's procedure and namespace |
//! | namespace, `rpc-shard-key` | per call | per message, same checks and messages |
//! | concurrency limit | the namespace's limiter | the same limiter, one permit per message |
//! | size | the request limit | the same limit per message (a larger one ends the stream with INVALID_ARGUMENT) |
//! | deadline | `grpc-timeout` or the default | the message's `timeout` or the default, never past the stream's `grpc-timeout` |
//! | trace | an `rpc` span | an `rpc` span per message with the same fields, inside the session's span |
//! | procedure | [`call`](super::call), then the procedure | the same |
//! | errors | a status | a [`pb::CallError`] with the same code, message and details |
//!
//! Messages may be pipelined: the node runs up to [`MAX_SESSION_IN_FLIGHT`]
//! of one session at once and answers in completion order, each with its
//! request's id. It reads no further message until one of those is answered,
//! so HTTP/2 flow control pushes back on the client.
//!
//! The session ends when the client closes its side (after the calls in
//! flight are answered), when the stream's own deadline passes
//! (DEADLINE_EXCEEDED, calls in flight are cancelled as a unary call's
//! would be), after a message that cannot be decoded (INVALID_ARGUMENT
//! naming `request body`, once the calls before it are answered), or when
//! the node stops (UNAVAILABLE once the calls in flight are answered, so the
//! client reconnects elsewhere).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use omnirelay_proto::resourcelease::v1 as pb;
use pb::session_request::Call;
use pb::session_response::Result as Answer;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower::ServiceExt;
use tracing::Span;
use tracing::field::Empty;

use crate::backpressure::BackpressureAwareConcurrencyLimit;
use crate::ids::PeerId;
use crate::middleware::{CallDeadline, ConnectionInfo, MiddlewareError, Procedure, RESOURCE_LEASE_SERVICE};
use crate::node::defaults::MAX_SESSION_IN_FLIGHT;
use crate::node::error::NodeError;
use crate::node::procedures::CallContext;
use crate::node::state::NodeInner;
use crate::queue;
use crate::shard::{SHARD_KEY_HEADER, ShardKey, parse_namespace};
use crate::wire;

/// The field errors about a session message's framing name.
const BODY_FIELD: &str = "request body";

/// What every message of one session shares, fixed when the stream opened.
pub(crate) struct SessionContext {
    /// The bound caller, for authorization (principal and roles).
    binding: crate::middleware::Caller,
    /// The caller as the queue records it (principal, and this node).
    caller: queue::Caller,
    /// The `rpc-shard-key` of the stream: every message must address it.
    shard_key: Option<ShardKey>,
    /// The stream's own deadline, when the caller sent one.
    deadline: Option<CallDeadline>,
    /// The session's `rpc` span; each message's span is its child.
    span: Span,
    /// The client's address, for each message's `rpc.peer`.
    peer: Option<SocketAddr>,
}

impl SessionContext {
    /// Reads the stream's context from the extensions the middleware filled
    /// in; a stream without a bound caller is refused, since the node runs
    /// no message for an unknown caller.
    pub(crate) fn from_extensions(extensions: &http::Extensions, node: &PeerId) -> Result<Self, NodeError> {
        let binding = extensions.get::<crate::middleware::Caller>().ok_or(NodeError::NoCaller)?.clone();
        Ok(Self {
            caller: queue::Caller { principal: binding.principal.clone(), peer: node.clone() },
            binding,
            shard_key: extensions.get::<ShardKey>().cloned(),
            deadline: extensions.get::<CallDeadline>().copied(),
            span: Span::current(),
            peer: ConnectionInfo::from_extensions(extensions).remote_addr,
        })
    }
}

/// The answers of a session, as tonic sends them: one [`pb::SessionResponse`]
/// per message, then the stream's end (OK, or the status that ended it).
///
/// Each message is answered by the same procedure functions as a unary
/// call, after the same checks the middleware makes of a call (deadline,
/// namespace, `rpc-shard-key`, authorization against the node's table, the
/// namespace's concurrency limiter), and fails with the same code, message and
/// details. Up to
/// [`MAX_SESSION_IN_FLIGHT`](crate::node::defaults::MAX_SESSION_IN_FLIGHT) calls
/// run at once; answers come in completion order with their request's id.
/// The stream ends OK once the client closed its side and every call is
/// answered; with INVALID_ARGUMENT (`request body`) after a message it
/// cannot decode or larger than the request limit; with DEADLINE_EXCEEDED
/// at the stream's own deadline (calls in flight are cancelled); with
/// UNAVAILABLE when the node stops (after the calls in flight are
/// answered). See `docs/mesh-node.md`.
pub struct SessionStream {
    node: Arc<NodeInner>,
    session: Arc<SessionContext>,
    /// The client's messages; `None` once they ended or the node stopped
    /// reading them.
    inbound: Option<tonic::Streaming<pb::SessionRequest>>,
    in_flight: FuturesUnordered<BoxFuture<'static, pb::SessionResponse>>,
    /// The status the stream ends with once the calls in flight are
    /// answered.
    end: Option<tonic::Status>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The largest message the decoder accepts, for the error naming it.
    message_limit: usize,
    done: bool,
}

impl std::fmt::Debug for SessionStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStream")
            .field("principal", &self.session.caller.principal)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl SessionStream {
    pub(crate) fn new(
        node: Arc<NodeInner>,
        session: SessionContext,
        inbound: tonic::Streaming<pb::SessionRequest>,
        message_limit: usize,
    ) -> Self {
        let deadline = session.deadline.map(|deadline| Box::pin(tokio::time::sleep_until(deadline.at())));
        let stopping = Box::pin(node.stopping.clone().cancelled_owned());
        Self {
            node,
            session: Arc::new(session),
            inbound: Some(inbound),
            in_flight: FuturesUnordered::new(),
            end: None,
            deadline,
            stopping,
            message_limit,
            done: false,
        }
    }

    /// Stops reading after a failed read: decoding errors end the session
    /// with INVALID_ARGUMENT naming the body, as a unary call's body would;
    /// anything else (the client reset the stream, the connection broke)
    /// ends it with what tonic reported.
    fn inbound_failed(&mut self, status: tonic::Status) {
        self.inbound = None;
        let limit = self.message_limit;
        let refusal = match status.code() {
            tonic::Code::OutOfRange => {
                MiddlewareError::invalid(BODY_FIELD, format!("a message is larger than the limit of {limit} bytes"))
            }
            tonic::Code::ResourceExhausted => MiddlewareError::invalid(
                BODY_FIELD,
                format!("a decompressed message is larger than the limit of {limit} bytes"),
            ),
            tonic::Code::Internal if status.message().starts_with("failed to decode") => {
                MiddlewareError::invalid(BODY_FIELD, "not a valid protobuf message")
            }
            tonic::Code::Internal => MiddlewareError::invalid(BODY_FIELD, status.message().to_string()),
            _ => {
                tracing::debug!(parent: &self.session.span, status = %status, "session stream broke");
                self.end = Some(status);
                return;
            }
        };
        self.end = Some(refusal.status());
    }

    fn start(&mut self, request: pb::SessionRequest) {
        let node = Arc::clone(&self.node);
        let session = Arc::clone(&self.session);
        self.in_flight.push(NodeInner::session_call(node, session, request).boxed());
    }
}

impl Stream for SessionStream {
    type Item = Result<pb::SessionResponse, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            // The stream's deadline bounds every call on it: what is still
            // running is cancelled, as a unary call past its deadline is.
            this.done = true;
            this.in_flight.clear();
            let budget = this.session.deadline.map(|d| d.budget()).unwrap_or_default();
            let status = MiddlewareError::deadline(budget).status();
            this.session.span.record("error.code", crate::ErrorCode::DeadlineExceeded.as_str());
            return Poll::Ready(Some(Err(status)));
        }
        if this.inbound.is_some() && this.stopping.as_mut().poll(cx).is_ready() {
            this.inbound = None;
            this.end = Some(tonic::Status::unavailable("the node is stopping: open a new session"));
        }
        while this.in_flight.len() < MAX_SESSION_IN_FLIGHT {
            let Some(inbound) = &mut this.inbound else { break };
            match inbound.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(request))) => this.start(request),
                Poll::Ready(Some(Err(status))) => this.inbound_failed(status),
                Poll::Ready(None) => this.inbound = None,
                Poll::Pending => break,
            }
        }
        if let Poll::Ready(Some(response)) = this.in_flight.poll_next_unpin(cx) {
            return Poll::Ready(Some(Ok(response)));
        }
        if this.inbound.is_none() && this.in_flight.is_empty() {
            this.done = true;
            let end = this.end.take();
            if let Some(status) = &end {
                this.session.span.record("error.code", crate::ErrorCode::from_grpc(status.code()).as_str());
            }
            return Poll::Ready(end.map(Err));
        }
        Poll::Pending
    }
}

/// The service the limiter wraps around a message: its call is the request.
fn itself<F>(call: F) -> F {
    call
}

/// The procedure a session message carries and the namespace it names.
fn addressed(call: &Call) -> (Procedure, &str) {
    match call {
        Call::Enqueue(request) => (Procedure::Enqueue, &request.namespace),
        Call::Lease(request) => (Procedure::Lease, &request.namespace),
        Call::Heartbeat(request) => (Procedure::Heartbeat, &request.namespace),
        Call::Complete(request) => (Procedure::Complete, &request.namespace),
        Call::Fail(request) => (Procedure::Fail, &request.namespace),
    }
}

/// A failed call as the session answers it: the status the unary call would
/// have answered, field for field.
fn call_error(status: &tonic::Status) -> pb::CallError {
    pb::CallError {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: bytes::Bytes::copy_from_slice(status.details()),
    }
}

impl NodeInner {
    /// Answers one session message: the same checks, in the same order, as
    /// the middleware makes for a unary call once its caller is bound
    /// (deadline, namespace, `rpc-shard-key`, authorization, concurrency limit),
    /// then the procedure itself.
    async fn session_call(
        self: Arc<Self>,
        session: Arc<SessionContext>,
        request: pb::SessionRequest,
    ) -> pb::SessionResponse {
        let id = request.id;
        let procedure = request.call.as_ref().map(|call| addressed(call).0);
        let span = tracing::info_span!(
            parent: &session.span,
            "rpc",
            otel.name = procedure.map(|p| format!("{RESOURCE_LEASE_SERVICE}/{}", p.grpc_method())),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = RESOURCE_LEASE_SERVICE,
            rpc.procedure = procedure.map(Procedure::grpc_method),
            rpc.peer = session.peer.map(tracing::field::display),
            rpc.shard_key = Empty,
            rpc.principal = session.caller.principal.as_str(),
            rpc.session.message_id = id,
            resourcelease.operation = procedure.map(Procedure::as_str),
            rpc.grpc.status_code = Empty,
            error.code = Empty,
        );
        let result = self.session_answer(&session, request, &span).await;
        let result = match result {
            Ok(answer) => {
                span.record("rpc.grpc.status_code", 0);
                answer
            }
            Err(status) => {
                span.record("rpc.grpc.status_code", status.code() as i32);
                span.record("error.code", crate::ErrorCode::from_grpc(status.code()).as_str());
                span.record("otel.status_code", "ERROR");
                Answer::Error(call_error(&status))
            }
        };
        pb::SessionResponse { id, result: Some(result) }
    }

    async fn session_answer(
        self: &Arc<Self>,
        session: &SessionContext,
        request: pb::SessionRequest,
        span: &Span,
    ) -> Result<Answer, tonic::Status> {
        let call = request
            .call
            .ok_or_else(|| MiddlewareError::invalid("call", "a session message carries exactly one call").status())?;
        // The message's deadline, as `grpc-timeout` is a unary call's:
        // malformed is INVALID_ARGUMENT, zero DEADLINE_EXCEEDED, absent the
        // default; never past the stream's own deadline.
        let requested = wire::duration_from_pb("timeout", request.timeout.as_ref())
            .map_err(|err| NodeError::from(err).status())?
            .map(|timeout| timeout.min(self.deadlines.max));
        let mut budget = requested.unwrap_or(self.deadlines.default);
        if let Some(stream) = session.deadline {
            budget = budget.min(stream.remaining());
        }
        if budget.is_zero() {
            return Err(MiddlewareError::deadline(budget).status());
        }
        let deadline = CallDeadline::after(budget);
        let (procedure, namespace) = addressed(&call);
        let namespace = parse_namespace("namespace", namespace).map_err(|err| MiddlewareError::from(err).status())?;
        span.record("rpc.shard_key", namespace.as_str());
        if let Some(key) = &session.shard_key
            && key.shard() != &namespace
        {
            return Err(MiddlewareError::invalid(
                SHARD_KEY_HEADER,
                format!("names {} but the request addresses {namespace}", key.shard()),
            )
            .status());
        }
        self.authorization.check(&session.binding, procedure, &namespace).map_err(|err| {
            tracing::info!(parent: span, error = %err, "denying call");
            err.status()
        })?;
        let cx = CallContext::new(session.caller.clone(), Some(deadline)).with_binding(self, &session.binding);
        // Owns what it uses, so the limiter's service can take it as its
        // request.
        let node = Arc::clone(self);
        let run = async move {
            match call {
                Call::Enqueue(request) => super::call(&node, &cx, request).await.map(Answer::Enqueue),
                Call::Lease(request) => super::call(&node, &cx, request).await.map(Answer::Lease),
                Call::Heartbeat(request) => super::call(&node, &cx, request).await.map(Answer::Heartbeat),
                Call::Complete(request) => super::call(&node, &cx, request).await.map(Answer::Complete),
                Call::Fail(request) => super::call(&node, &cx, request).await.map(Answer::Fail),
            }
            .map_err(|err| err.status())
        };
        // The namespace's limiter, as the middleware's concurrency-limiter slot
        // applies it to a unary call (namespaces not hosted here pass, and
        // the procedure answers NOT_FOUND).
        let limited = match self.limiters.limiter(&namespace) {
            Some(limiter) => BackpressureAwareConcurrencyLimit::new(tower::service_fn(itself), Arc::clone(limiter))
                .oneshot(run)
                .left_future(),
            None => run.right_future(),
        };
        match tokio::time::timeout_at(deadline.at(), tracing::Instrument::instrument(limited, span.clone())).await {
            Ok(answer) => answer,
            Err(_elapsed) => Err(MiddlewareError::deadline(budget).status()),
        }
    }
}
