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
use super::forward::{Forwardable, Target};
use super::procedures::CallContext;
use super::state::NodeInner;
use crate::shard::parse_namespace;

/// Answers one decoded call on `node`: the request is whole, its namespace
/// is set and the caller bound (and, for HTTP/JSON and session messages,
/// checked against the route). Every transport calls a procedure here and
/// nowhere else, so what must happen to every call between decoding and
/// the procedure (the same for gRPC, HTTP/JSON and sessions) goes here.
///
/// Here a call for a namespace another member owns is forwarded to that
/// owner, when the node forwards (see [`super::forward`]) and the call was
/// not itself forwarded here; otherwise the procedure answers (or
/// redirects).
pub(crate) async fn call<R: Forwardable>(node: &NodeInner, cx: &CallContext, mut request: R) -> Result<R::Response> {
    if let Some(forwarder) = &node.forwarder
        && !cx.is_forwarded_in()
        && let Some(binding) = cx.binding()
        && let Some(target) = node.forward_target(request.namespace_mut())
    {
        return forwarder.forward(&target, binding, cx.remaining(), request, R::send).await;
    }
    request.answer(node, cx).await
}

impl NodeInner {
    /// Where a call for `namespace` goes when this node forwards: the
    /// member that owns it, when that is another member with an advertised
    /// address. `None` for this node's own namespaces, namespaces it does
    /// not host, malformed names (the procedure answers those) and owners
    /// that advertised no address (the caller gets the redirect).
    pub(crate) fn forward_target(&self, namespace: &str) -> Option<Target> {
        let shard = parse_namespace("namespace", namespace).ok()?;
        if !self.queues.contains_key(&shard) {
            return None;
        }
        let view = self.assigned.borrow();
        let (owner, address) = view.as_ref()?.elsewhere(&shard)?;
        Some(Target { owner: owner.to_string(), address: address?.to_string(), namespace: shard })
    }
}
