//! The transports that carry ResourceLease calls to the
//! [procedures](super::procedures): the tonic service ([`grpc`]), the
//! HTTP/JSON handler ([`http`]) and the `Session` stream's messages
//! ([`session`]). Each decodes a request, binds its [`CallContext`] and hands
//! both to [`call`], the one place every call passes between a transport and
//! its procedure; then it encodes the answer.

pub(crate) mod grpc;
pub(crate) mod http;
pub(crate) mod session;

pub use grpc::LeaseService;
pub use session::SessionStream;

use super::error::Result;
use super::procedures::{CallContext, ProcedureRequest};
use super::state::NodeInner;

/// Answers one decoded call on `node`: the request is whole, its namespace
/// is set and the caller bound (and, for HTTP/JSON and session messages,
/// checked against the route). Every transport calls a procedure here and
/// nowhere else, so what must happen to every call between decoding and
/// the procedure (the same for gRPC, HTTP/JSON and sessions) goes here.
pub(crate) async fn call<R: ProcedureRequest>(node: &NodeInner, cx: &CallContext, request: R) -> Result<R::Response> {
    request.answer(node, cx).await
}
