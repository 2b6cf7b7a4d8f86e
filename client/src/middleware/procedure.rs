//! The ResourceLease procedures and how each transport addresses them.
//!
//! One procedure has three spellings that map one to one:
//!
//! | seed name | gRPC path | HTTP/JSON path |
//! |---|---|---|
//! | `resourcelease.users::enqueue` | `/omnirelay.resourcelease.v1.ResourceLease/Enqueue` (namespace in the body) | `POST /resourcelease/v1/resourcelease.users/enqueue` |
//! | `resourcelease::list_dead_letters` | `/omnirelay.resourcelease.v1.ResourceLease/ListDeadLetters` | `POST /resourcelease/v1/resourcelease/list_dead_letters` |

use http::HeaderMap;

use super::MiddlewareError;
use crate::ShardId;
use crate::shard::parse_namespace;

/// Full name of the gRPC service every mesh node serves.
pub const RESOURCE_LEASE_SERVICE: &str = "omnirelay.resourcelease.v1.ResourceLease";

/// First segments of every HTTP/JSON path: `/resourcelease/v1/{namespace}/{procedure}`.
pub const HTTP_PATH_PREFIX: &str = "/resourcelease/v1/";

/// A ResourceLease procedure: the vocabulary of the authorization table, the
/// `resourcelease.operation` span field and the HTTP path.
///
/// [`Session`](Procedure::Session) is the one RPC that is not a call of its
/// own: a stream carrying calls of the [`SESSION_CALLS`](Procedure::SESSION_CALLS)
/// procedures, each authorized as that procedure. It is not in the
/// authorization table's vocabulary ([`CALLS`](Procedure::CALLS)) and has
/// no HTTP/JSON path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Procedure {
    /// `Enqueue`.
    Enqueue,
    /// `Lease`.
    Lease,
    /// `Heartbeat`.
    Heartbeat,
    /// `Complete`.
    Complete,
    /// `Fail`.
    Fail,
    /// `Drain`.
    Drain,
    /// `Resume`.
    Resume,
    /// `Restore`.
    Restore,
    /// `PurgeDrained`.
    PurgeDrained,
    /// `ListDeadLetters`.
    ListDeadLetters,
    /// `GetDeadLetter`.
    GetDeadLetter,
    /// `RedriveDeadLetter`.
    RedriveDeadLetter,
    /// `PurgeDeadLetters`.
    PurgeDeadLetters,
    /// `Stats`.
    Stats,
    /// `Session`: a bidirectional stream of hot-path calls.
    Session,
}

impl Procedure {
    /// Every RPC of the service, in the order of the service definition.
    pub const ALL: [Procedure; 15] = [
        Procedure::Enqueue,
        Procedure::Lease,
        Procedure::Heartbeat,
        Procedure::Complete,
        Procedure::Fail,
        Procedure::Drain,
        Procedure::Resume,
        Procedure::Restore,
        Procedure::PurgeDrained,
        Procedure::ListDeadLetters,
        Procedure::GetDeadLetter,
        Procedure::RedriveDeadLetter,
        Procedure::PurgeDeadLetters,
        Procedure::Stats,
        Procedure::Session,
    ];

    /// The calls: every procedure but [`Session`](Procedure::Session). The
    /// authorization table's vocabulary and the HTTP/JSON paths.
    pub const CALLS: [Procedure; 14] = [
        Procedure::Enqueue,
        Procedure::Lease,
        Procedure::Heartbeat,
        Procedure::Complete,
        Procedure::Fail,
        Procedure::Drain,
        Procedure::Resume,
        Procedure::Restore,
        Procedure::PurgeDrained,
        Procedure::ListDeadLetters,
        Procedure::GetDeadLetter,
        Procedure::RedriveDeadLetter,
        Procedure::PurgeDeadLetters,
        Procedure::Stats,
    ];

    /// The calls a [`Session`](Procedure::Session) carries: the hot path of
    /// producers and workers.
    pub const SESSION_CALLS: [Procedure; 5] =
        [Procedure::Enqueue, Procedure::Lease, Procedure::Heartbeat, Procedure::Complete, Procedure::Fail];

    /// True for [`Session`](Procedure::Session), the stream of calls.
    pub fn is_session(self) -> bool {
        self == Procedure::Session
    }

    /// The gRPC method name (`ListDeadLetters`).
    pub fn grpc_method(self) -> &'static str {
        match self {
            Procedure::Enqueue => "Enqueue",
            Procedure::Lease => "Lease",
            Procedure::Heartbeat => "Heartbeat",
            Procedure::Complete => "Complete",
            Procedure::Fail => "Fail",
            Procedure::Drain => "Drain",
            Procedure::Resume => "Resume",
            Procedure::Restore => "Restore",
            Procedure::PurgeDrained => "PurgeDrained",
            Procedure::ListDeadLetters => "ListDeadLetters",
            Procedure::GetDeadLetter => "GetDeadLetter",
            Procedure::RedriveDeadLetter => "RedriveDeadLetter",
            Procedure::PurgeDeadLetters => "PurgeDeadLetters",
            Procedure::Stats => "Stats",
            Procedure::Session => "Session",
        }
    }

    /// The seed's snake-case name (`list_dead_letters`): the HTTP path
    /// segment, the authorization table's vocabulary and the
    /// `resourcelease.operation` span field.
    pub fn as_str(self) -> &'static str {
        match self {
            Procedure::Enqueue => "enqueue",
            Procedure::Lease => "lease",
            Procedure::Heartbeat => "heartbeat",
            Procedure::Complete => "complete",
            Procedure::Fail => "fail",
            Procedure::Drain => "drain",
            Procedure::Resume => "resume",
            Procedure::Restore => "restore",
            Procedure::PurgeDrained => "purge_drained",
            Procedure::ListDeadLetters => "list_dead_letters",
            Procedure::GetDeadLetter => "get_dead_letter",
            Procedure::RedriveDeadLetter => "redrive_dead_letter",
            Procedure::PurgeDeadLetters => "purge_dead_letters",
            Procedure::Stats => "stats",
            Procedure::Session => "session",
        }
    }

    /// The procedure with this gRPC method name.
    pub fn from_grpc_method(method: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.grpc_method() == method)
    }

    /// The call with this snake-case name (never
    /// [`Session`](Procedure::Session), which is not a call).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::CALLS.into_iter().find(|p| p.as_str() == name)
    }

    /// The gRPC path (`/omnirelay.resourcelease.v1.ResourceLease/Enqueue`).
    pub fn grpc_path(self) -> String {
        format!("/{RESOURCE_LEASE_SERVICE}/{}", self.grpc_method())
    }

    /// The HTTP/JSON path for a namespace
    /// (`/resourcelease/v1/resourcelease.users/enqueue`). The session has
    /// none: this path answers NOT_FOUND.
    pub fn http_path(self, namespace: &ShardId) -> String {
        format!("{HTTP_PATH_PREFIX}{namespace}/{}", self.as_str())
    }
}

/// How a call reached the node; decides how errors are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// gRPC (`content-type: application/grpc...`): errors are trailers-only
    /// responses with `grpc-status`.
    Grpc,
    /// HTTP/JSON: errors are an HTTP status with a JSON body.
    Http,
}

impl Transport {
    /// Tells the transport from the request headers.
    pub fn of(headers: &HeaderMap) -> Self {
        let grpc = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if grpc { Transport::Grpc } else { Transport::Http }
    }

    /// `grpc` or `http`, for span fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Http => "http",
        }
    }
}

/// Which procedure a call addresses and on which namespace. Inserted into the
/// request extensions by [`RouteLayer`](super::RouteLayer); the namespace of
/// a gRPC call is filled in from its body by
/// [`NamespaceLayer`](super::NamespaceLayer). A session has no namespace of
/// its own: each of its messages names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcRoute {
    /// The transport the call came in on.
    pub transport: Transport,
    /// The procedure.
    pub procedure: Procedure,
    /// The namespace, once known (from the HTTP path, or the gRPC body).
    pub namespace: Option<ShardId>,
}

impl RpcRoute {
    /// Classifies a request path: a gRPC ResourceLease path, or an HTTP/JSON
    /// path `/resourcelease/v1/{namespace}/{procedure}`.
    pub fn from_path(transport: Transport, path: &str) -> Result<Self, MiddlewareError> {
        let unknown = || MiddlewareError::UnknownProcedure { path: path.chars().take(256).collect() };
        match transport {
            Transport::Grpc => {
                let method = path
                    .strip_prefix('/')
                    .and_then(|p| p.strip_prefix(RESOURCE_LEASE_SERVICE))
                    .and_then(|p| p.strip_prefix('/'))
                    .ok_or_else(unknown)?;
                let procedure = Procedure::from_grpc_method(method).ok_or_else(unknown)?;
                Ok(Self { transport, procedure, namespace: None })
            }
            Transport::Http => {
                let rest = path.strip_prefix(HTTP_PATH_PREFIX).ok_or_else(unknown)?;
                let (namespace, name) = rest.split_once('/').ok_or_else(unknown)?;
                let procedure = Procedure::from_name(name).ok_or_else(unknown)?;
                let namespace = parse_namespace("namespace", namespace)?;
                Ok(Self { transport, procedure, namespace: Some(namespace) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated over the contract: every RPC of the ResourceLease service in
    /// the compiled descriptors must be in the vocabulary, and nothing else.
    /// A new RPC added to the proto without a `Procedure` fails here.
    #[test]
    fn vocabulary_covers_every_resource_lease_rpc() {
        let rpcs: Vec<String> = crate::proto::procedures()
            .into_iter()
            .filter(|(service, _)| service == RESOURCE_LEASE_SERVICE)
            .map(|(_, method)| method)
            .collect();
        assert!(!rpcs.is_empty(), "the descriptors list the ResourceLease service");
        for method in &rpcs {
            let procedure = Procedure::from_grpc_method(method)
                .unwrap_or_else(|| panic!("ResourceLease/{method} is missing from Procedure"));
            let route = RpcRoute::from_path(Transport::Grpc, &procedure.grpc_path()).expect("grpc path");
            assert_eq!(route.procedure, procedure);
            let http = procedure.http_path(&ShardId::new("resourcelease.users"));
            if procedure.is_session() {
                assert_eq!(Procedure::from_name(procedure.as_str()), None, "the session is not a call");
                let err = RpcRoute::from_path(Transport::Http, &http).expect_err("HTTP/JSON has no session");
                assert_eq!(err.code(), crate::ErrorCode::NotFound);
                continue;
            }
            assert_eq!(Procedure::from_name(procedure.as_str()), Some(procedure));
            let route = RpcRoute::from_path(Transport::Http, &http).expect("http path");
            assert_eq!((route.procedure, route.namespace), (procedure, Some(ShardId::new("resourcelease.users"))));
        }
        assert_eq!(rpcs.len(), Procedure::ALL.len(), "Procedure lists an RPC the contract does not have");
        assert_eq!(Procedure::CALLS.len() + 1, Procedure::ALL.len(), "every RPC but the session is a call");
    }

    /// Generated over the contract: every call a `SessionRequest` can carry
    /// is a call of the vocabulary with the same request message, and the
    /// `SessionResponse` answers it with that call's response message. A
    /// call added to the session without its procedure fails here.
    #[test]
    fn session_calls_are_the_hot_path_procedures_with_their_messages() {
        let set = <prost_types::FileDescriptorSet as prost::Message>::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptors decode");
        let file = set.file.iter().find(|f| f.package() == "omnirelay.resourcelease.v1").expect("package");
        let service = file.service.iter().find(|s| s.name() == "ResourceLease").expect("service");
        let message = |name: &str| file.message_type.iter().find(|m| m.name() == name).expect("message");
        let oneof_fields = |name: &str, oneof: &str| {
            let m = message(name);
            let index = m.oneof_decl.iter().position(|o| o.name() == oneof).expect("oneof") as i32;
            m.field
                .iter()
                .filter(|f| f.oneof_index == Some(index))
                .map(|f| (f.name().to_string(), f.type_name().rsplit('.').next().expect("type").to_string()))
                .collect::<Vec<_>>()
        };
        let calls = oneof_fields("SessionRequest", "call");
        let results = oneof_fields("SessionResponse", "result");
        let mut carried = Vec::new();
        for (field, request) in &calls {
            let procedure = Procedure::from_name(field).unwrap_or_else(|| panic!("SessionRequest.{field} is no call"));
            let rpc = service.method.iter().find(|m| m.name() == procedure.grpc_method()).expect("rpc");
            assert_eq!(rpc.input_type().rsplit('.').next(), Some(request.as_str()), "{field}");
            let response = results.iter().find(|(name, _)| name == field).expect("a response for every call");
            assert_eq!(rpc.output_type().rsplit('.').next(), Some(response.1.as_str()), "{field}");
            carried.push(procedure);
        }
        assert_eq!(carried, Procedure::SESSION_CALLS);
        assert!(results.iter().any(|(name, message)| name == "error" && message == "CallError"));
        let session = service.method.iter().find(|m| m.name() == "Session").expect("Session rpc");
        assert!(session.client_streaming() && session.server_streaming());
    }

    /// The gRPC namespace probe reads field 1 of every request message; this
    /// checks that assumption against the compiled descriptors.
    #[test]
    fn every_request_message_carries_the_namespace_as_field_one() {
        let set = <prost_types::FileDescriptorSet as prost::Message>::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptors decode");
        let file = set.file.iter().find(|f| f.package() == "omnirelay.resourcelease.v1").expect("package");
        let service = file.service.iter().find(|s| s.name() == "ResourceLease").expect("service");
        // The session's messages carry calls, each with its namespace.
        for method in service.method.iter().filter(|m| !m.client_streaming()) {
            let input = method.input_type().rsplit('.').next().expect("type name");
            let message = file.message_type.iter().find(|m| m.name() == input).expect("input message");
            let field = message.field.iter().find(|f| f.number() == 1).expect("field 1");
            assert_eq!(field.name(), "namespace", "{input}");
            assert_eq!(field.r#type(), prost_types::field_descriptor_proto::Type::String, "{input}");
        }
    }

    #[test]
    fn paths_outside_the_surface_are_unknown_procedures() {
        for (transport, path) in [
            (Transport::Grpc, "/grpc.health.v1.Health/Check"),
            (Transport::Grpc, "/omnirelay.resourcelease.v1.ResourceLease/Nope"),
            (Transport::Grpc, "/omnirelay.resourcelease.v1.ResourceLeaseX/Enqueue"),
            (Transport::Http, "/healthz"),
            (Transport::Http, "/resourcelease/v1/resourcelease/nope"),
            (Transport::Http, "/resourcelease/v1/enqueue"),
            (Transport::Http, "/resourcelease/v1/resourcelease/session"),
        ] {
            let err = RpcRoute::from_path(transport, path).expect_err(path);
            assert_eq!(err.code(), crate::ErrorCode::NotFound, "{path}");
        }
        let err = RpcRoute::from_path(Transport::Http, "/resourcelease/v1/Users/enqueue").expect_err("bad namespace");
        assert_eq!(err.code(), crate::ErrorCode::InvalidArgument);
        assert!(err.to_string().starts_with("namespace: "), "{err}");
    }

    #[test]
    fn content_type_tells_the_transport() {
        let mut headers = HeaderMap::new();
        assert_eq!(Transport::of(&headers), Transport::Http);
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc+proto"));
        assert_eq!(Transport::of(&headers), Transport::Grpc);
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        assert_eq!(Transport::of(&headers), Transport::Http);
    }
}
