//! Sessions: what the parity table cannot show one call at a time
//! (pipelining, the in-flight bound, per-message authorization on one
//! stream, deadlines of messages and of the stream, the end of a session
//! when the node stops).

use std::time::{Duration, Instant};

use omnirelay_client::ErrorCode;
use omnirelay_client::middleware::Procedure;
use omnirelay_client::node::defaults::{MAX_SESSION_IN_FLIGHT, REPLY_MARGIN};
use omnirelay_client::proto::resourcelease::v1 as pb;
use pb::session_request::Call;
use pb::session_response::Result as Answer;
use serde_json::json;

use crate::node_support::{Auth, Client, Options, Outcome, Req, TestNode, Wire, answer_outcome, status_outcome};

const N: &str = "resourcelease";

fn enqueue(id: &str) -> Call {
    Call::Enqueue(pb::EnqueueRequest {
        namespace: N.into(),
        payload: Some(pb::ItemPayload { resource_type: "user".into(), resource_id: id.into(), ..Default::default() }),
        ..Default::default()
    })
}

fn lease(wait: Duration) -> Call {
    Call::Lease(pb::LeaseRequest {
        namespace: N.into(),
        owner: "w".into(),
        wait: Some(omnirelay_client::wire::duration(wait)),
        ..Default::default()
    })
}

/// A lease answer's item, if any.
fn leased(answer: &Answer) -> Option<&pb::WorkItem> {
    match answer {
        Answer::Lease(response) => response.item.as_ref(),
        other => panic!("expected a lease answer, got {other:?}"),
    }
}

#[tokio::test]
async fn pipelined_messages_are_answered_in_completion_order_with_their_ids() {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let operator = Auth::bearer(node.token("operator", &["operator"]));
    let mut session = client.open_session(&operator).await.expect("opens");
    // A long-poll first, then the enqueue that satisfies it: the long-poll
    // holds only its own call, so the enqueue behind it is answered first.
    let waiting = session.send(lease(Duration::from_secs(10)), None).await;
    let enqueued = session.send(enqueue("1"), None).await;
    let first = session.answer().await.expect("open").expect("an answer");
    assert_eq!(first.id, enqueued);
    assert!(matches!(first.result, Some(Answer::Enqueue(_))), "{first:?}");
    let second = session.answer().await.expect("open").expect("an answer");
    assert_eq!(second.id, waiting);
    let item = leased(second.result.as_ref().expect("result")).expect("the long-poll got the item");
    assert_eq!(item.payload.as_ref().expect("payload").resource_id, "1");
    node.stop().await;
}

/// Takes half a second: the bound is shown by long-polls that hold every
/// slot until the first of them runs out.
#[tokio::test]
async fn a_session_runs_at_most_its_bound_of_calls_at_once() {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let operator = Auth::bearer(node.token("operator", &["operator"]));
    let mut session = client.open_session(&operator).await.expect("opens");
    let started = Instant::now();
    let short = session.send(lease(Duration::from_millis(400)), None).await;
    for _ in 1..MAX_SESSION_IN_FLIGHT {
        session.send(lease(Duration::from_secs(30)), None).await;
    }
    // Past the bound: not read until a slot frees. Were it read at once, a
    // waiting long-poll would take its item right away.
    let enqueued = session.send(enqueue("late"), None).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stats = node.stats(N).await;
    assert_eq!((stats.pending, stats.active), (0, 0), "the message past the bound ran early");
    let first = session.answer().await.expect("open").expect("an answer");
    assert_eq!(first.id, short, "the short long-poll ends first and frees a slot");
    assert_eq!(leased(first.result.as_ref().expect("result")), None);
    assert!(started.elapsed() >= Duration::from_millis(400) - REPLY_MARGIN);
    // Then the enqueue runs, and a waiting long-poll gets its item.
    let mut answered =
        [session.answer().await, session.answer().await].map(|answer| answer.expect("open").expect("an answer"));
    answered.sort_by_key(|answer| answer.id == enqueued);
    assert!(matches!(answered[1].result, Some(Answer::Enqueue(_))), "{answered:?}");
    assert!(leased(answered[0].result.as_ref().expect("result")).is_some(), "{answered:?}");
    // Hanging up cancels the long-polls still waiting, as for unary calls.
    drop(session);
    drop(client);
    node.stop().await;
}

#[tokio::test]
async fn each_message_is_authorized_for_its_own_procedure_and_namespace() {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let producer = Auth::bearer(node.token("producer", &["producer"]));
    let worker = Auth::bearer(node.token("worker-1", &["worker"]));
    let mut producing = client.open_session(&producer).await.expect("any authenticated caller opens a session");
    let mut working = client.open_session(&worker).await.expect("opens");
    assert!(matches!(producing.call(enqueue("1")).await, Outcome::Ok(_)));
    let denied = producing.call(lease(Duration::ZERO)).await;
    assert_eq!(denied.code(), Some(ErrorCode::PermissionDenied), "{denied:?}");
    let denied = working.call(enqueue("2")).await;
    assert_eq!(denied.code(), Some(ErrorCode::PermissionDenied), "{denied:?}");
    let Outcome::Ok(granted) = working.call(lease(Duration::ZERO)).await else { panic!("workers lease") };
    assert_eq!(granted["item"]["lease"]["owner"], "worker-1#w");
    // The refusals changed nothing and left both sessions usable.
    assert!(matches!(producing.call(enqueue("3")).await, Outcome::Ok(_)));
    let stats = node.stats(N).await;
    assert_eq!((stats.pending, stats.active), (1, 1));

    // No credentials: refused when the stream opens, before any message.
    let refused = client.open_session(&Auth::none()).await.err().expect("refused");
    assert_eq!(refused.code(), Some(ErrorCode::Unauthenticated));
    // HTTP/JSON has no session.
    let over_http = client.http_raw(Procedure::Session, N, b"{}".to_vec(), "application/json", &producer).await;
    assert_eq!(over_http.code(), Some(ErrorCode::NotFound), "{over_http:?}");
    node.stop().await;
}

#[tokio::test]
async fn a_message_without_a_call_is_refused_and_the_session_goes_on() {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let operator = Auth::bearer(node.token("operator", &["operator"]));
    let mut session = client.open_session(&operator).await.expect("opens");
    session.send_message(pb::SessionRequest { id: 77, timeout: None, call: None }).await;
    let answer = session.answer().await.expect("open").expect("an answer");
    assert_eq!(answer.id, 77);
    let outcome = answer_outcome(answer.result.expect("result"));
    assert_eq!((outcome.code(), outcome.field().as_deref()), (Some(ErrorCode::InvalidArgument), Some("call")));
    assert!(matches!(session.call(enqueue("1")).await, Outcome::Ok(_)));
    node.stop().await;
}

#[tokio::test]
async fn each_message_has_a_deadline_like_a_unary_call() {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let operator = Auth::bearer(node.token("operator", &["operator"]));
    let mut session = client.open_session(&operator).await.expect("opens");

    // A spent deadline answers as a unary call with a spent deadline does.
    let id = session.send(enqueue("1"), Some(Duration::ZERO)).await;
    let answer = session.answer().await.expect("open").expect("an answer");
    assert_eq!(answer.id, id);
    let unary = client
        .call(
            Wire::Grpc,
            &Req::from_json(
                Procedure::Enqueue,
                &json!({"namespace": N, "payload": {"resource_type": "user", "resource_id": "1"}}),
            ),
            &operator.clone().header("x-omnirelay-timeout-ms", "0"),
        )
        .await;
    assert_eq!(answer_outcome(answer.result.expect("result")), unary);
    assert_eq!(unary.code(), Some(ErrorCode::DeadlineExceeded));
    assert_eq!(node.stats(N).await.pending, 0, "nothing was enqueued");

    // A malformed one names the field.
    session
        .send_message(pb::SessionRequest {
            id: 9,
            timeout: Some(omnirelay_client::proto::Duration { seconds: -1, nanos: 0 }),
            call: Some(enqueue("1")),
        })
        .await;
    let outcome = answer_outcome(session.answer().await.expect("open").expect("answer").result.expect("result"));
    assert_eq!((outcome.code(), outcome.field().as_deref()), (Some(ErrorCode::InvalidArgument), Some("timeout")));

    // A long-poll answers (empty) before its message's deadline, keeping
    // the reply margin.
    let started = Instant::now();
    session.send(lease(Duration::from_secs(10)), Some(Duration::from_millis(600))).await;
    let answer = session.answer().await.expect("open").expect("an answer");
    assert_eq!(leased(answer.result.as_ref().expect("result")), None);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(600) - REPLY_MARGIN && took < Duration::from_secs(5), "{took:?}");
    node.stop().await;
}

#[tokio::test]
async fn the_stream_deadline_bounds_every_message_and_ends_the_session() {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let operator = Auth::bearer(node.token("operator", &["operator"])).header("grpc-timeout", "800m");
    // The stream's deadline runs from when the node accepted the stream,
    // so the clock starts before it opens.
    let started = Instant::now();
    let mut session = client.open_session(&operator).await.expect("opens");
    session.send(lease(Duration::from_secs(10)), None).await;
    let answer = session.answer().await.expect("open").expect("the long-poll answers within the stream's deadline");
    assert_eq!(leased(answer.result.as_ref().expect("result")), None);
    let ended = session.answer().await.expect_err("the stream's deadline ends it");
    assert_eq!(status_outcome(&ended).code(), Some(ErrorCode::DeadlineExceeded), "{ended:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(5), "{took:?}");
    node.stop().await;
}

#[tokio::test]
async fn a_stopping_node_answers_the_calls_in_flight_then_ends_its_sessions() {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let operator = Auth::bearer(node.token("operator", &["operator"]));
    let mut session = client.open_session(&operator).await.expect("opens");
    let id = session.send(lease(Duration::from_millis(800)), None).await;
    // Let the node read the message before it stops.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let stopping = tokio::spawn(node.stop());
    let answer = session.answer().await.expect("open").expect("the call in flight is answered");
    assert_eq!(answer.id, id);
    let ended = session.answer().await.expect_err("then the session ends");
    assert_eq!(status_outcome(&ended).code(), Some(ErrorCode::Unavailable), "{ended:?}");
    stopping.await.expect("the node stops");
    assert!(started.elapsed() < Duration::from_secs(10), "the session did not hold the shutdown");
}

#[tokio::test]
async fn each_message_takes_a_permit_of_its_namespace_limiter() {
    const U: &str = "resourcelease.users";
    let mut users = omnirelay_client::QueueConfig::new(U, "test-node");
    users.capacity = 8;
    users.high_watermark = 2;
    users.low_watermark = 0;
    let options = Options {
        queues: vec![omnirelay_client::QueueConfig::new(N, "test-node"), users],
        concurrency_limits: omnirelay_client::node::ConcurrencyLimits { normal: 64, backpressure: 1 },
        ..Options::default()
    };
    let node = TestNode::start(options).await;
    let operator = Auth::bearer(node.token("operator", &["operator"]));
    let mut client = Client::new(node.addr);
    let mut session = client.open_session(&operator).await.expect("opens");
    let enqueue_to = |namespace: &str, id: &str| {
        Call::Enqueue(pb::EnqueueRequest {
            namespace: namespace.into(),
            payload: Some(pb::ItemPayload { resource_type: "t".into(), resource_id: id.into(), ..Default::default() }),
            ..Default::default()
        })
    };
    for id in ["1", "2"] {
        assert!(matches!(session.call(enqueue_to(U, id)).await, Outcome::Ok(_)));
    }
    let lease_users = || Call::Lease(pb::LeaseRequest { namespace: U.into(), owner: "w".into(), ..Default::default() });
    let Outcome::Ok(leased) = session.call(lease_users()).await else { panic!("leases") };
    assert!(leased["item"].is_object(), "{leased}");
    assert!(node.stats(U).await.backpressure.active);
    // A drain waiting for that lease holds the namespace's only permit under
    // backpressure.
    let draining = {
        let (addr, operator) = (node.addr, operator.clone());
        tokio::spawn(async move {
            let drain = Req::from_json(
                Procedure::Drain,
                &json!({"namespace": U, "mode": "DRAIN_MODE_WAIT", "wait_timeout": "1.5s"}),
            );
            Client::new(addr).call(Wire::Http, &drain, &operator).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Would answer FAILED_PRECONDITION (draining) if it ran: it waits for a
    // permit until its deadline instead, like a unary call.
    let held = session.send(lease_users(), Some(Duration::from_millis(300))).await;
    let answer = session.answer().await.expect("open").expect("an answer");
    assert_eq!(answer.id, held);
    let outcome = answer_outcome(answer.result.expect("result"));
    assert_eq!(outcome.code(), Some(ErrorCode::DeadlineExceeded), "{outcome:?}");
    // Another namespace on the same session is not held back.
    assert!(matches!(session.call(enqueue_to(N, "3")).await, Outcome::Ok(_)));
    let drained = draining.await.expect("joins");
    assert!(matches!(drained, Outcome::Ok(_)), "{drained:?}");
    // The permit is free again: the call runs (and meets the backpressure).
    let ran = session.call(enqueue_to(U, "4")).await;
    assert_eq!(ran.code(), Some(ErrorCode::ResourceExhausted), "{ran:?}");
    node.stop().await;
}

/// Every span opened while it is the default subscriber: name, fields and
/// parent.
#[derive(Clone, Default)]
struct Spans(std::sync::Arc<std::sync::Mutex<Vec<Captured>>>);

#[derive(Debug, Clone)]
struct Captured {
    id: u64,
    parent: Option<u64>,
    name: &'static str,
    fields: std::collections::HashMap<String, String>,
}

impl tracing::field::Visit for Captured {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.fields.insert(field.name().to_string(), format!("{value:?}").trim_matches('"').to_string());
    }
}

impl<S> tracing_subscriber::Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let parent = match attrs.parent() {
            Some(parent) => Some(parent.into_u64()),
            None if attrs.is_contextual() => ctx.lookup_current().map(|span| span.id().into_u64()),
            None => None,
        };
        let mut captured =
            Captured { id: id.into_u64(), parent, name: attrs.metadata().name(), fields: Default::default() };
        attrs.record(&mut captured);
        self.0.lock().expect("test mutex").push(captured);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        // Span ids are reused once closed: the latest span with the id.
        if let Some(span) = self.0.lock().expect("test mutex").iter_mut().rev().find(|s| s.id == id.into_u64()) {
            values.record(span);
        }
    }
}

/// Runs on the test's one thread, so the node's tasks see the subscriber.
#[tokio::test]
async fn each_message_gets_an_rpc_span_inside_the_sessions_span() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = Spans::default();
    let _default = tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let producer = Auth::bearer(node.token("producer", &["producer"]));
    let mut session = client.open_session(&producer).await.expect("opens");
    assert!(matches!(session.call(enqueue("1")).await, Outcome::Ok(_)));
    let denied = session.call(lease(Duration::ZERO)).await;
    assert_eq!(denied.code(), Some(ErrorCode::PermissionDenied));
    node.stop().await;

    let captured = spans.0.lock().expect("test mutex").clone();
    let rpc = |procedure: &str| {
        captured
            .iter()
            .filter(|s| s.name == "rpc" && s.fields.get("rpc.procedure").map(String::as_str) == Some(procedure))
            .cloned()
            .collect::<Vec<_>>()
    };
    let sessions = rpc("Session");
    assert_eq!(sessions.len(), 1, "one span for the stream");
    let session_span = &sessions[0];
    assert_eq!(session_span.fields.get("rpc.principal").map(String::as_str), Some("producer"));
    for (procedure, operation, message_id, error) in
        [("Enqueue", "enqueue", "1", None), ("Lease", "lease", "2", Some("permission_denied"))]
    {
        let spans = rpc(procedure);
        assert_eq!(spans.len(), 1, "{procedure}: {captured:#?}");
        let span = &spans[0];
        assert_eq!(span.parent, Some(session_span.id), "{procedure} is inside the session's span");
        let field = |name: &str| span.fields.get(name).map(String::as_str);
        assert_eq!(field("rpc.service"), Some("omnirelay.resourcelease.v1.ResourceLease"));
        assert_eq!(field("resourcelease.operation"), Some(operation));
        assert_eq!(field("rpc.principal"), Some("producer"));
        assert_eq!(field("rpc.shard_key"), Some(N));
        assert_eq!(field("rpc.session.message_id"), Some(message_id));
        assert_eq!(field("error.code"), error, "{procedure}");
    }
}
