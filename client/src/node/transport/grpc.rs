//! The ResourceLease service as tonic serves it: one method per procedure
//! of [`procedures!`](super::super::procedures::procedures), each reading
//! the call's context from the request extensions the middleware filled in
//! and answering through [`call`](super::call), plus the `Session` stream
//! ([`super::session`]).

use std::sync::Arc;

use omnirelay_proto::resourcelease::v1 as pb;

use super::call;
use super::session::{SessionContext, SessionStream};
use crate::middleware::Procedure;
use crate::node::forward::FORWARDED_BY_HEADER;
use crate::node::procedures::{CallContext, procedures};
use crate::node::state::NodeInner;

/// The node's ResourceLease service: tonic's generated server wraps it for
/// gRPC, and the node's HTTP/JSON handler serves the same procedures. Cheap to
/// clone.
#[derive(Clone)]
pub struct LeaseService {
    pub(crate) node: Arc<NodeInner>,
}

impl std::fmt::Debug for LeaseService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseService").field("node", &self.node.node_id).finish_non_exhaustive()
    }
}

/// Implements tonic's `ResourceLease` with one method per procedure of the
/// list, and the `Session` stream.
macro_rules! grpc_methods {
    ($($variant:ident => $method:ident($request:ident) -> $response:ident),* $(,)?) => {
        #[tonic::async_trait]
        impl pb::resource_lease_server::ResourceLease for LeaseService {
            type SessionStream = SessionStream;

            /// Opens a session: the caller was bound by the middleware when
            /// the stream opened; each message is then answered by the
            /// procedures below (see [`SessionStream`]).
            async fn session(
                &self,
                request: tonic::Request<tonic::Streaming<pb::SessionRequest>>,
            ) -> std::result::Result<tonic::Response<SessionStream>, tonic::Status> {
                let session = SessionContext::from_extensions(request.extensions(), &self.node.node_id)
                    .map_err(|err| err.status())?;
                let limit = self.node.limits.limit_for(Procedure::Enqueue);
                let stream = SessionStream::new(Arc::clone(&self.node), session, request.into_inner(), limit);
                Ok(tonic::Response::new(stream))
            }

            $(
                async fn $method(
                    &self,
                    request: tonic::Request<pb::$request>,
                ) -> std::result::Result<tonic::Response<pb::$response>, tonic::Status> {
                    let cx = CallContext::from_extensions(request.extensions(), &self.node)
                        .map_err(|err| err.status())?
                        .forwarded_in(request.metadata().contains_key(FORWARDED_BY_HEADER));
                    call(&self.node, &cx, request.into_inner()).await.map(tonic::Response::new).map_err(|err| err.status())
                }
            )*
        }
    };
}

procedures!(grpc_methods);
