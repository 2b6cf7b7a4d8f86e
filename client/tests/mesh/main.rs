//! Mesh-node integration tests that need real sockets: mutual TLS through a
//! real tonic server, OTLP export to a fake collector, and a real node on
//! 127.0.0.1:0 (parity of the transports, peer eviction, TLS, diagnostics).

mod membership;
mod node_diagnostics;
mod node_eviction;
mod node_lifecycle;
mod node_parity;
mod node_session;
mod node_support;
mod node_tls;
mod node_waiting;
mod otlp;
#[path = "../../src/middleware/test_pki.rs"]
mod test_pki;
mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use omnirelay_client::middleware::Caller;
use omnirelay_client::proto::resourcelease::v1 as pb;
use tonic::{Request, Response, Status};

/// A ResourceLease service that answers every call with an empty response,
/// counting calls and remembering the last caller the middleware bound.
#[derive(Clone, Default)]
pub(crate) struct CountingLease {
    pub(crate) calls: Arc<AtomicUsize>,
    pub(crate) last_caller: Arc<std::sync::Mutex<Option<Caller>>>,
}

impl CountingLease {
    fn seen<T>(&self, request: &Request<T>) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        *self.last_caller.lock().expect("test mutex") = request.extensions().get::<Caller>().cloned();
    }

    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

macro_rules! answer_empty {
    ($($method:ident: $req:ident => $resp:ident),* $(,)?) => {
        #[tonic::async_trait]
        impl pb::resource_lease_server::ResourceLease for CountingLease {
            type SessionStream = futures_util::stream::BoxStream<'static, Result<pb::SessionResponse, Status>>;

            /// Counts the stream and answers nothing (ends it at once).
            async fn session(
                &self,
                request: Request<tonic::Streaming<pb::SessionRequest>>,
            ) -> Result<Response<Self::SessionStream>, Status> {
                self.seen(&request);
                Ok(Response::new(Box::pin(futures_util::stream::empty())))
            }

            $(
                async fn $method(&self, request: Request<pb::$req>) -> Result<Response<pb::$resp>, Status> {
                    self.seen(&request);
                    Ok(Response::new(pb::$resp::default()))
                }
            )*
        }
    };
}

answer_empty! {
    enqueue: EnqueueRequest => EnqueueResponse,
    lease: LeaseRequest => LeaseResponse,
    heartbeat: HeartbeatRequest => HeartbeatResponse,
    complete: CompleteRequest => CompleteResponse,
    fail: FailRequest => FailResponse,
    drain: DrainRequest => DrainResponse,
    resume: ResumeRequest => ResumeResponse,
    restore: RestoreRequest => RestoreResponse,
    purge_drained: PurgeDrainedRequest => PurgeDrainedResponse,
    list_dead_letters: ListDeadLettersRequest => ListDeadLettersResponse,
    get_dead_letter: GetDeadLetterRequest => GetDeadLetterResponse,
    redrive_dead_letter: RedriveDeadLetterRequest => RedriveDeadLetterResponse,
    purge_dead_letters: PurgeDeadLettersRequest => PurgeDeadLettersResponse,
    stats: StatsRequest => StatsResponse,
}
