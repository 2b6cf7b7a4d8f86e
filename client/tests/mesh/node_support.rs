//! A real mesh node on 127.0.0.1:0 for the node tests, and clients that
//! call it over either transport and report outcomes in one shape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use omnirelay_client::clock::{ManualClock, Timestamp};
use omnirelay_client::middleware::{
    AuthorizationTable, ClientCertPolicy, JwtVerifier, MiddlewareConfig, PrincipalConfig, Procedure, RequestLimits,
};
use omnirelay_client::node::json::{self, JsonMessage};
use omnirelay_client::node::{Node, NodeConfig, ServeError, TlsAcceptorConfig};
use omnirelay_client::proto::resourcelease::v1 as pb;
use omnirelay_client::{ErrorCode, InMemoryReplicator, QueueConfig, ShardId};
use omnirelay_proto::Message;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) const ISSUER: &str = "https://sts.omnirelay.test";
pub(crate) const AUDIENCE: &str = "omnirelay-mesh";
/// Where every parity node's clock starts: 2026-01-01T00:00:00Z.
pub(crate) const START: Timestamp = Timestamp::from_unix_nanos(1_767_225_600_000_000_000);

/// Who may call what on a test node.
pub(crate) const AUTHORIZATION: &str = r#"{"rules": [
    {"name": "workers", "roles": ["worker"], "procedures": ["lease", "heartbeat", "complete", "fail", "stats"], "shards": ["*"]},
    {"name": "producers", "roles": ["producer"], "procedures": ["enqueue", "stats"], "shards": ["resourcelease", "resourcelease.*"]},
    {"name": "operators", "roles": ["operator"], "procedures": ["*"], "shards": ["*"]},
    {"name": "mesh workers", "principals": ["spiffe://omnirelay.test/worker/*"], "procedures": ["*"], "shards": ["*"]}
]}"#;

/// How a test node is set up.
pub(crate) struct Options {
    pub(crate) queues: Vec<QueueConfig>,
    pub(crate) health: omnirelay_client::peer_health::HealthConfig,
    pub(crate) sweep_interval: Duration,
    pub(crate) tls: Option<TlsAcceptorConfig>,
    pub(crate) client_certs: ClientCertPolicy,
    pub(crate) trust_domain: Option<String>,
    pub(crate) limits: RequestLimits,
    pub(crate) concurrency_limits: omnirelay_client::node::ConcurrencyLimits,
    pub(crate) metrics: bool,
}

impl Default for Options {
    fn default() -> Self {
        let mut users = QueueConfig::new("resourcelease.users", "test-node");
        // Small watermarks so backpressure is easy to reach.
        users.capacity = 8;
        users.high_watermark = 2;
        users.low_watermark = 1;
        let mut default = QueueConfig::new("resourcelease", "test-node");
        default.max_attempts = 2;
        Self {
            queues: vec![default, users],
            health: omnirelay_client::peer_health::HealthConfig::default(),
            // Expiry happens on lease calls only (deterministic); the
            // sweeper is proven by the eviction test.
            sweep_interval: Duration::from_secs(3600),
            tls: None,
            client_certs: ClientCertPolicy::Optional,
            trust_domain: None,
            limits: RequestLimits::default(),
            concurrency_limits: omnirelay_client::node::ConcurrencyLimits::default(),
            metrics: false,
        }
    }
}

/// A node serving on a loopback port, with its clock and token issuer.
pub(crate) struct TestNode {
    pub(crate) node: Arc<Node>,
    pub(crate) addr: SocketAddr,
    pub(crate) clock: ManualClock,
    pub(crate) replicator: Arc<InMemoryReplicator>,
    signing: EncodingKey,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestNode {
    pub(crate) async fn start(options: Options) -> Self {
        let key = rcgen::KeyPair::generate().expect("generate a signing key");
        let verifier =
            JwtVerifier::from_public_key_pem(Algorithm::ES256, key.public_key_pem().as_bytes(), ISSUER, AUDIENCE)
                .expect("verifier");
        let mut principal = PrincipalConfig::new().jwt(verifier).client_certs(options.client_certs);
        if let Some(domain) = &options.trust_domain {
            principal = principal.trust_domain(domain.clone());
        }
        let mut config = NodeConfig::new("test-node");
        config.queues = options.queues;
        config.health = options.health;
        config.sweep_interval = options.sweep_interval;
        config.concurrency_limits = options.concurrency_limits;
        config.middleware = MiddlewareConfig {
            principal,
            authorization: AuthorizationTable::from_json(AUTHORIZATION).expect("valid table"),
            limits: options.limits,
            ..MiddlewareConfig::default()
        };
        let clock = ManualClock::new(START);
        let replicator = Arc::new(InMemoryReplicator::new());
        let mut builder =
            Node::builder(config).replicator(replicator.clone(), "in-memory").clock(Arc::new(clock.clone()));
        if options.metrics {
            builder = builder.prometheus(omnirelay_client::node::prometheus());
        }
        let node = Arc::new(builder.build().expect("valid node"));
        node.serving().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let serving = match options.tls {
            Some(tls) => tokio::spawn(node.serve_tls(listener, tls, shutdown)),
            None => tokio::spawn(node.serve(listener, shutdown)),
        };
        Self {
            node,
            addr,
            clock,
            replicator,
            signing: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("signing key"),
            stop: Some(stop),
            task: Some(serving),
        }
    }

    /// A token for `subject` with `roles`, valid for ten minutes.
    pub(crate) fn token(&self, subject: &str, roles: &[&str]) -> String {
        self.token_with(subject, roles, AUDIENCE, 600)
    }

    /// A token with a chosen audience and lifetime (negative: expired).
    pub(crate) fn token_with(&self, subject: &str, roles: &[&str], audience: &str, lifetime: i64) -> String {
        let now = i64::try_from(jsonwebtoken::get_current_timestamp()).expect("fits");
        let claims = json!({ "sub": subject, "iss": ISSUER, "aud": audience, "exp": now + lifetime, "roles": roles });
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.signing).expect("sign")
    }

    /// Stats of a namespace, straight from its queue (as decided, so they
    /// answer after the node stopped too).
    pub(crate) async fn stats(&self, namespace: &str) -> omnirelay_client::queue::QueueStats {
        self.node.queue(&ShardId::from(namespace)).expect("hosted namespace").stats_now()
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("serve task joins").expect("serve ends cleanly");
        }
        self.node.shutdown().await;
    }
}

/// The transport a call goes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    Grpc,
    Http,
    /// A message on a gRPC session (one per set of credentials and headers,
    /// kept open across calls) for the calls a session carries; the other
    /// procedures go over unary gRPC.
    Session,
}

/// How a call ended, in one shape for both transports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// The response message in its JSON form.
    Ok(Value),
    /// The error: code, message, and the backpressure signal (JSON form)
    /// when the error carried one.
    Err { code: ErrorCode, message: String, backpressure: Option<Value> },
}

impl Outcome {
    pub(crate) fn code(&self) -> Option<ErrorCode> {
        match self {
            Outcome::Ok(_) => None,
            Outcome::Err { code, .. } => Some(*code),
        }
    }

    /// The field an INVALID_ARGUMENT names (`invalid {field}: ...` or
    /// `{field}: ...`).
    pub(crate) fn field(&self) -> Option<String> {
        let Outcome::Err { message, .. } = self else { return None };
        let text = message.strip_prefix("invalid ").unwrap_or(message);
        text.split(": ").next().map(str::to_string)
    }

    pub(crate) fn value(&self) -> &Value {
        match self {
            Outcome::Ok(value) => value,
            Outcome::Err { code, message, .. } => panic!("expected success, got {code}: {message}"),
        }
    }
}

/// Extra headers and credentials of a call.
#[derive(Debug, Clone, Default)]
pub(crate) struct Auth {
    pub(crate) bearer: Option<String>,
    pub(crate) headers: Vec<(&'static str, String)>,
}

impl Auth {
    pub(crate) fn bearer(token: String) -> Self {
        Self { bearer: Some(token), headers: Vec::new() }
    }

    pub(crate) fn none() -> Self {
        Self::default()
    }

    pub(crate) fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    fn apply<B>(&self, request: &mut Request<B>) {
        if let Some(token) = &self.bearer {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii"));
        }
        for (name, value) in &self.headers {
            request.headers_mut().insert(*name, HeaderValue::from_str(value).expect("ascii"));
        }
    }
}

/// A typed request of any procedure.
#[derive(Debug, Clone)]
pub(crate) enum Req {
    Enqueue(pb::EnqueueRequest),
    Lease(pb::LeaseRequest),
    Heartbeat(pb::HeartbeatRequest),
    Complete(pb::CompleteRequest),
    Fail(pb::FailRequest),
    Drain(pb::DrainRequest),
    Resume(pb::ResumeRequest),
    Restore(pb::RestoreRequest),
    PurgeDrained(pb::PurgeDrainedRequest),
    ListDeadLetters(pb::ListDeadLettersRequest),
    GetDeadLetter(pb::GetDeadLetterRequest),
    RedriveDeadLetter(pb::RedriveDeadLetterRequest),
    PurgeDeadLetters(pb::PurgeDeadLettersRequest),
    Stats(pb::StatsRequest),
}

macro_rules! each_request {
    ($req:expr, |$procedure:ident, $message:ident, $response:ident| $body:expr) => {
        match $req {
            Req::Enqueue($message) => {
                let $procedure = Procedure::Enqueue;
                #[allow(dead_code)]
                type $response = pb::EnqueueResponse;
                $body
            }
            Req::Lease($message) => {
                let $procedure = Procedure::Lease;
                #[allow(dead_code)]
                type $response = pb::LeaseResponse;
                $body
            }
            Req::Heartbeat($message) => {
                let $procedure = Procedure::Heartbeat;
                #[allow(dead_code)]
                type $response = pb::HeartbeatResponse;
                $body
            }
            Req::Complete($message) => {
                let $procedure = Procedure::Complete;
                #[allow(dead_code)]
                type $response = pb::CompleteResponse;
                $body
            }
            Req::Fail($message) => {
                let $procedure = Procedure::Fail;
                #[allow(dead_code)]
                type $response = pb::FailResponse;
                $body
            }
            Req::Drain($message) => {
                let $procedure = Procedure::Drain;
                #[allow(dead_code)]
                type $response = pb::DrainResponse;
                $body
            }
            Req::Resume($message) => {
                let $procedure = Procedure::Resume;
                #[allow(dead_code)]
                type $response = pb::ResumeResponse;
                $body
            }
            Req::Restore($message) => {
                let $procedure = Procedure::Restore;
                #[allow(dead_code)]
                type $response = pb::RestoreResponse;
                $body
            }
            Req::PurgeDrained($message) => {
                let $procedure = Procedure::PurgeDrained;
                #[allow(dead_code)]
                type $response = pb::PurgeDrainedResponse;
                $body
            }
            Req::ListDeadLetters($message) => {
                let $procedure = Procedure::ListDeadLetters;
                #[allow(dead_code)]
                type $response = pb::ListDeadLettersResponse;
                $body
            }
            Req::GetDeadLetter($message) => {
                let $procedure = Procedure::GetDeadLetter;
                #[allow(dead_code)]
                type $response = pb::GetDeadLetterResponse;
                $body
            }
            Req::RedriveDeadLetter($message) => {
                let $procedure = Procedure::RedriveDeadLetter;
                #[allow(dead_code)]
                type $response = pb::RedriveDeadLetterResponse;
                $body
            }
            Req::PurgeDeadLetters($message) => {
                let $procedure = Procedure::PurgeDeadLetters;
                #[allow(dead_code)]
                type $response = pb::PurgeDeadLettersResponse;
                $body
            }
            Req::Stats($message) => {
                let $procedure = Procedure::Stats;
                #[allow(dead_code)]
                type $response = pb::StatsResponse;
                $body
            }
        }
    };
}

impl Req {
    /// Builds the request of `procedure` from its JSON form (the form the
    /// HTTP/JSON transport sends verbatim).
    pub(crate) fn from_json(procedure: Procedure, value: &Value) -> Self {
        let bytes = value.to_string().into_bytes();
        match procedure {
            Procedure::Enqueue => Req::Enqueue(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}"))),
            Procedure::Lease => Req::Lease(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}"))),
            Procedure::Heartbeat => Req::Heartbeat(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}"))),
            Procedure::Complete => Req::Complete(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}"))),
            Procedure::Fail => Req::Fail(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}"))),
            Procedure::Drain => Req::Drain(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}"))),
            Procedure::Resume => Req::Resume(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}"))),
            Procedure::Restore => Req::Restore(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}"))),
            Procedure::PurgeDrained => {
                Req::PurgeDrained(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}")))
            }
            Procedure::ListDeadLetters => {
                Req::ListDeadLetters(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}")))
            }
            Procedure::GetDeadLetter => {
                Req::GetDeadLetter(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}")))
            }
            Procedure::RedriveDeadLetter => {
                Req::RedriveDeadLetter(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}")))
            }
            Procedure::PurgeDeadLetters => {
                Req::PurgeDeadLetters(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}")))
            }
            Procedure::Stats => Req::Stats(json::decode(&bytes).unwrap_or_else(|err| panic!("{err}: {value}"))),
            Procedure::Session => panic!("the session is not a call"),
        }
    }

    /// The request as a session's call, for the procedures a session
    /// carries.
    pub(crate) fn session_call(&self) -> Option<pb::session_request::Call> {
        use pb::session_request::Call;
        Some(match self {
            Req::Enqueue(message) => Call::Enqueue(message.clone()),
            Req::Lease(message) => Call::Lease(message.clone()),
            Req::Heartbeat(message) => Call::Heartbeat(message.clone()),
            Req::Complete(message) => Call::Complete(message.clone()),
            Req::Fail(message) => Call::Fail(message.clone()),
            _ => return None,
        })
    }

    fn namespace(&self) -> String {
        each_request!(self, |_procedure, message, _R| message.namespace.clone())
    }
}

/// Raw bodies for the calls that cannot be typed (malformed, oversized).
#[derive(Debug, Clone)]
pub(crate) struct RawCall {
    pub(crate) procedure: Procedure,
    pub(crate) namespace: &'static str,
    /// The protobuf message bytes (framed by the client).
    pub(crate) grpc_message: Vec<u8>,
    /// The JSON body.
    pub(crate) http_body: Vec<u8>,
    /// The `SessionRequest` bytes a session sends for it (framed by the
    /// client).
    pub(crate) session_message: Vec<u8>,
}

/// An open session: requests go in through `send`, answers come out of
/// `answers`.
pub(crate) struct Session {
    send: tokio::sync::mpsc::Sender<pb::SessionRequest>,
    answers: tonic::Streaming<pb::SessionResponse>,
    next_id: u64,
}

impl Session {
    /// Opens a session on `grpc` with `auth`; a refused stream answers its
    /// status.
    pub(crate) async fn open(
        grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
        auth: &Auth,
    ) -> Result<Self, tonic::Status> {
        grpc.ready().await.map_err(|err| tonic::Status::unavailable(err.to_string()))?;
        let (send, mut receive) = tokio::sync::mpsc::channel::<pb::SessionRequest>(256);
        let outbound = futures_util::stream::poll_fn(move |cx| receive.poll_recv(cx));
        let mut request = tonic::Request::new(outbound);
        if let Some(token) = &auth.bearer {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
        }
        for (name, value) in &auth.headers {
            request.metadata_mut().insert(*name, value.parse().expect("ascii"));
        }
        let path = http::uri::PathAndQuery::try_from(Procedure::Session.grpc_path()).expect("path");
        let codec = tonic_prost::ProstCodec::<pb::SessionRequest, pb::SessionResponse>::default();
        let answers = grpc.streaming(request, path, codec).await?.into_inner();
        Ok(Self { send, answers, next_id: 1 })
    }

    /// Sends one call without waiting; answers its id.
    pub(crate) async fn send(&mut self, call: pb::session_request::Call, timeout: Option<Duration>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let timeout = timeout.map(omnirelay_client::wire::duration);
        self.send.send(pb::SessionRequest { id, timeout, call: Some(call) }).await.expect("the session is open");
        id
    }

    /// Sends a prepared message as is.
    pub(crate) async fn send_message(&mut self, message: pb::SessionRequest) {
        self.send.send(message).await.expect("the session is open");
    }

    /// The next answer, or how the stream ended (`Ok(None)`: cleanly).
    pub(crate) async fn answer(&mut self) -> Result<Option<pb::SessionResponse>, tonic::Status> {
        self.answers.message().await
    }

    /// One call, waiting for its answer, as an outcome.
    pub(crate) async fn call(&mut self, call: pb::session_request::Call) -> Outcome {
        let id = self.send(call, None).await;
        match self.answer().await {
            Ok(Some(answer)) => {
                assert_eq!(answer.id, id, "one call in flight: its answer comes next");
                answer_outcome(answer.result.expect("an answer carries a result"))
            }
            Ok(None) => panic!("the session ended without answering {id}"),
            Err(status) => status_outcome(&status),
        }
    }
}

/// A session answer in the shape of the other transports' outcomes.
pub(crate) fn answer_outcome(result: pb::session_response::Result) -> Outcome {
    use pb::session_response::Result as Answer;
    match result {
        Answer::Error(error) => {
            let status = tonic::Status::with_details(tonic::Code::from(error.code), error.message, error.details);
            status_outcome(&status)
        }
        Answer::Enqueue(response) => Outcome::Ok(response.to_json()),
        Answer::Lease(response) => Outcome::Ok(response.to_json()),
        Answer::Heartbeat(response) => Outcome::Ok(response.to_json()),
        Answer::Complete(response) => Outcome::Ok(response.to_json()),
        Answer::Fail(response) => Outcome::Ok(response.to_json()),
    }
}

/// Client TLS settings: the CA that signs the node's certificate, and an
/// optional client certificate (PEM) for mutual TLS.
#[derive(Debug, Clone)]
pub(crate) struct ClientTls {
    pub(crate) ca_pem: String,
    pub(crate) identity: Option<(String, String)>,
}

/// Calls one node over either transport.
pub(crate) struct Client {
    addr: SocketAddr,
    tls: Option<ClientTls>,
    grpc: Option<tonic::client::Grpc<tonic::transport::Channel>>,
    http: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    /// Open sessions by credentials and headers.
    sessions: std::collections::HashMap<String, Session>,
}

/// A connection that could not be made (refused, or a failed handshake).
fn refused(err: impl std::fmt::Display) -> Outcome {
    Outcome::Err { code: ErrorCode::Unavailable, message: format!("connection failed: {err}"), backpressure: None }
}

impl Client {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr, tls: None, grpc: None, http: None, sessions: std::collections::HashMap::new() }
    }

    /// A client that speaks TLS to the node (server name `localhost`).
    pub(crate) fn with_tls(addr: SocketAddr, tls: ClientTls) -> Self {
        Self { addr, tls: Some(tls), grpc: None, http: None, sessions: std::collections::HashMap::new() }
    }

    async fn grpc(&mut self) -> Result<&mut tonic::client::Grpc<tonic::transport::Channel>, Outcome> {
        if self.grpc.is_none() {
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            let mut endpoint =
                tonic::transport::Channel::from_shared(format!("{scheme}://{}", self.addr)).expect("uri");
            if let Some(tls) = &self.tls {
                let mut config = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem))
                    .domain_name("localhost");
                if let Some((cert, key)) = &tls.identity {
                    config = config.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                endpoint = endpoint.tls_config(config).map_err(refused)?;
            }
            let channel = endpoint.connect().await.map_err(refused)?;
            self.grpc = Some(tonic::client::Grpc::new(channel));
        }
        Ok(self.grpc.as_mut().expect("just connected"))
    }

    async fn http(&mut self) -> Result<&mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, Outcome> {
        let stale = self.http.as_ref().is_none_or(|sender| sender.is_closed());
        if stale {
            let stream = tokio::net::TcpStream::connect(self.addr).await.map_err(refused)?;
            let sender = match &self.tls {
                None => {
                    let (sender, connection) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(refused)?;
                    tokio::spawn(connection);
                    sender
                }
                Some(tls) => {
                    let connector = tokio_rustls::TlsConnector::from(Arc::new(rustls_client_config(tls)));
                    let server = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
                    let stream = connector.connect(server, stream).await.map_err(refused)?;
                    let (sender, connection) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(refused)?;
                    tokio::spawn(connection);
                    sender
                }
            };
            self.http = Some(sender);
        }
        Ok(self.http.as_mut().expect("just connected"))
    }

    /// Opens a session with `auth` on this client's gRPC connection.
    pub(crate) async fn open_session(&mut self, auth: &Auth) -> Result<Session, Outcome> {
        let grpc = self.grpc().await?;
        Session::open(grpc, auth).await.map_err(|status| status_outcome(&status))
    }

    /// Sends a call on the session of `auth`, opening it on first use; a
    /// session refused at opening answers with its refusal, and one that
    /// ended is dropped after reporting how.
    async fn session_call(&mut self, call: pb::session_request::Call, auth: &Auth) -> Outcome {
        let key = format!("{:?}", (&auth.bearer, &auth.headers));
        if !self.sessions.contains_key(&key) {
            match self.open_session(auth).await {
                Ok(session) => {
                    self.sessions.insert(key.clone(), session);
                }
                Err(outcome) => return outcome,
            }
        }
        let session = self.sessions.get_mut(&key).expect("just opened");
        let outcome = session.call(call).await;
        if matches!(outcome, Outcome::Err { .. }) && session.send.is_closed() {
            self.sessions.remove(&key);
        }
        outcome
    }

    /// Sends a typed request over `wire`.
    pub(crate) async fn call(&mut self, wire: Wire, request: &Req, auth: &Auth) -> Outcome {
        match wire {
            Wire::Session => match request.session_call() {
                Some(call) => self.session_call(call, auth).await,
                None => Box::pin(self.call(Wire::Grpc, request, auth)).await,
            },
            Wire::Grpc => each_request!(request.clone(), |procedure, message, R| {
                self.grpc_typed::<_, R>(procedure, message, auth).await
            }),
            Wire::Http => {
                let namespace = request.namespace();
                let body = each_request!(request, |_procedure, message, _R| message.to_json().to_string());
                let procedure = each_request!(request, |procedure, _message, _R| procedure);
                self.http_raw(procedure, &namespace, body.into_bytes(), "application/json", auth).await
            }
        }
    }

    async fn grpc_typed<M, R>(&mut self, procedure: Procedure, message: M, auth: &Auth) -> Outcome
    where
        M: Message + Send + Sync + 'static,
        R: Message + Default + JsonMessage + Send + Sync + 'static,
    {
        let grpc = match self.grpc().await {
            Ok(grpc) => grpc,
            Err(outcome) => return outcome,
        };
        if let Err(err) = grpc.ready().await {
            return refused(err);
        }
        let mut request = tonic::Request::new(message);
        if let Some(token) = &auth.bearer {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
        }
        for (name, value) in &auth.headers {
            request.metadata_mut().insert(*name, value.parse().expect("ascii"));
        }
        let path = http::uri::PathAndQuery::try_from(procedure.grpc_path()).expect("path");
        let codec = tonic_prost::ProstCodec::<M, R>::default();
        match grpc.unary(request, path, codec).await {
            Ok(response) => Outcome::Ok(response.into_inner().to_json()),
            // A handshake refused mid-call surfaces as UNAVAILABLE, as a
            // connection failure does.
            Err(status) => status_outcome(&status),
        }
    }

    /// Sends an HTTP/JSON call with a raw body.
    pub(crate) async fn http_raw(
        &mut self,
        procedure: Procedure,
        namespace: &str,
        body: Vec<u8>,
        content_type: &str,
        auth: &Auth,
    ) -> Outcome {
        let path = procedure.http_path(&ShardId::from(namespace));
        let mut request = Request::post(path)
            .header(http::header::HOST, self.addr.to_string())
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        auth.apply(&mut request);
        let sender = match self.http().await {
            Ok(sender) => sender,
            Err(outcome) => return outcome,
        };
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(err) => return refused(err),
        };
        let status = response.status();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        let value: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|err| panic!("HTTP body is not JSON ({err}): {}", String::from_utf8_lossy(&body)));
        if status.is_success() {
            return Outcome::Ok(value);
        }
        let code = ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == value["error"]["code"])
            .unwrap_or_else(|| panic!("unknown error code in {value}"));
        assert_eq!(status, code.http_status(), "HTTP status agrees with the error code");
        Outcome::Err {
            code,
            message: value["error"]["message"].as_str().expect("message").to_string(),
            backpressure: value["error"]["details"].get("backpressure").cloned(),
        }
    }

    /// Sends a raw call (malformed or oversized body) over `wire`.
    pub(crate) async fn raw(&mut self, wire: Wire, call: &RawCall, auth: &Auth) -> Outcome {
        match wire {
            Wire::Http => {
                self.http_raw(call.procedure, call.namespace, call.http_body.clone(), "application/json", auth).await
            }
            Wire::Grpc => self.grpc_raw(call.procedure, &call.grpc_message, auth).await,
            Wire::Session => self.grpc_raw(Procedure::Session, &call.session_message, auth).await,
        }
    }

    /// A gRPC call (or a session of one message) over a plain HTTP/2
    /// connection with a hand-made frame.
    async fn grpc_raw(&mut self, procedure: Procedure, message: &[u8], auth: &Auth) -> Outcome {
        let stream = tokio::net::TcpStream::connect(self.addr).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2");
        tokio::spawn(connection);
        let mut frame = vec![0u8];
        frame.extend_from_slice(&u32::try_from(message.len()).expect("fits").to_be_bytes());
        frame.extend_from_slice(message);
        let mut request = Request::post(format!("http://{}{}", self.addr, procedure.grpc_path()))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(frame)))
            .expect("request");
        auth.apply(&mut request);
        let response = sender.send_request(request).await.expect("response");
        let headers = response.headers().clone();
        let collected = response.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status = tonic::Status::from_header_map(&headers)
            .or_else(|| tonic::Status::from_header_map(&trailers))
            .expect("a grpc-status");
        status_outcome(&status)
    }
}

pub(crate) fn status_outcome(status: &tonic::Status) -> Outcome {
    let backpressure = (!status.details().is_empty()).then(|| {
        let signal = pb::BackpressureSignal::decode(status.details()).expect("details are a BackpressureSignal");
        json::signal(&signal)
    });
    if status.code() == tonic::Code::Ok {
        return Outcome::Ok(Value::Null);
    }
    Outcome::Err { code: ErrorCode::from_grpc(status.code()), message: status.message().to_string(), backpressure }
}

/// Replaces every 32-hex-digit id (item and lease ids, which carry a random
/// per-queue prefix) by `<id N>` in order of first appearance, so outcomes of
/// two nodes compare equal.
pub(crate) struct Ids {
    seen: Vec<String>,
}

impl Ids {
    pub(crate) fn new() -> Self {
        Self { seen: Vec::new() }
    }

    pub(crate) fn outcome(&mut self, outcome: &Outcome) -> Outcome {
        match outcome {
            Outcome::Ok(value) => Outcome::Ok(self.value(value)),
            Outcome::Err { code, message, backpressure } => Outcome::Err {
                code: *code,
                message: self.text(message),
                backpressure: backpressure.as_ref().map(|v| self.value(v)),
            },
        }
    }

    fn value(&mut self, value: &Value) -> Value {
        match value {
            Value::String(text) => Value::String(self.text(text)),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.value(v)).collect()),
            Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), self.value(v))).collect()),
            other => other.clone(),
        }
    }

    fn text(&mut self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while !rest.is_empty() {
            let run = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
            if run == 32 {
                let id = &rest[..32];
                let index = match self.seen.iter().position(|s| s == id) {
                    Some(index) => index,
                    None => {
                        self.seen.push(id.to_string());
                        self.seen.len() - 1
                    }
                };
                out.push_str(&format!("<id {index}>"));
                rest = &rest[32..];
            } else {
                let take = run.max(1);
                let take = rest.char_indices().nth(take).map_or(rest.len(), |(i, _)| i);
                out.push_str(&rest[..take]);
                rest = &rest[take..];
            }
        }
        out
    }
}

/// A GET over HTTP/1.1; answers the status and the body as text.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> (http::StatusCode, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(connection);
    let request =
        Request::get(path).header(http::header::HOST, addr.to_string()).body(Full::new(Bytes::new())).expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A GET answering JSON.
pub(crate) async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = get(addr, path).await;
    assert_eq!(status, http::StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|err| panic!("{path} is not JSON ({err}): {body}"))
}

/// A rustls client configuration for `tls` (ALPN http/1.1).
fn rustls_client_config(tls: &ClientTls) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("client chain");
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("client key");
            builder.with_client_auth_cert(chain, key).expect("client identity")
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}
