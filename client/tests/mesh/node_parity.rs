//! The parity suite: one table of calls, every procedure with its success
//! and error cases, run in order against a real node over gRPC, against
//! another over HTTP/JSON, and against a third over gRPC sessions (the rows
//! of the calls a session carries go over sessions, one per caller and
//! headers, kept open across rows; the others over unary gRPC); all must
//! answer identically (code, message and response content, ids aside),
//! each as the table expects.

use std::time::Duration;

use omnirelay_client::ErrorCode;
use omnirelay_client::middleware::Procedure;
use omnirelay_client::proto::resourcelease::v1 as pb;
use omnirelay_proto::Message;
use serde_json::{Value, json};

use crate::node_support::{Auth, Client, Ids, Options, Outcome, RawCall, Req, TestNode, Wire};

/// Who makes a call.
#[derive(Debug, Clone, Copy)]
enum Who {
    Producer,
    Worker1,
    Worker2,
    Operator,
    Nobody,
    Anonymous,
    ExpiredToken,
    WrongAudience,
}

impl Who {
    fn auth(self, node: &TestNode) -> Auth {
        match self {
            Who::Producer => Auth::bearer(node.token("producer", &["producer"])),
            Who::Worker1 => Auth::bearer(node.token("worker-1", &["worker"])),
            Who::Worker2 => Auth::bearer(node.token("worker-2", &["worker"])),
            Who::Operator => Auth::bearer(node.token("operator", &["operator"])),
            Who::Nobody => Auth::bearer(node.token("nobody", &[])),
            Who::Anonymous => Auth::none(),
            Who::ExpiredToken => {
                Auth::bearer(node.token_with("worker-1", &["worker"], crate::node_support::AUDIENCE, -120))
            }
            Who::WrongAudience => Auth::bearer(node.token_with("worker-1", &["worker"], "another-mesh", 600)),
        }
    }
}

/// What the table expects of a call.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Ok,
    /// The code, and text the message must contain (the field, for
    /// INVALID_ARGUMENT).
    Err(ErrorCode, &'static str),
}

type Build = Box<dyn Fn(&Memory) -> Value>;

enum Step {
    /// A typed call: the request in its JSON form, built from what earlier
    /// steps kept.
    Call {
        name: &'static str,
        who: Who,
        procedure: Procedure,
        request: Build,
        headers: Vec<(&'static str, &'static str)>,
        expect: Expect,
        keep: Option<&'static str>,
    },
    /// A call whose body cannot be typed; only the code and the field must
    /// agree (the two encodings fail differently).
    Raw { name: &'static str, who: Who, call: RawCall, expect: Expect },
    /// Moves the node's clock.
    Advance(Duration),
    /// Makes the node's next publishes fail before anything is written.
    FailPublishes(usize),
    /// Waits until every namespace serves again (its owner rebuilt it).
    AwaitServing,
}

/// Responses kept by name, in their JSON form.
#[derive(Default)]
struct Memory {
    kept: std::collections::HashMap<&'static str, Value>,
}

impl Memory {
    fn get(&self, name: &str) -> &Value {
        self.kept.get(name).unwrap_or_else(|| panic!("nothing kept as {name}"))
    }

    /// The handle of a kept lease response.
    fn handle(&self, name: &str) -> Value {
        self.get(name)["item"]["lease"].clone()
    }
}

fn call(
    name: &'static str,
    who: Who,
    procedure: Procedure,
    request: impl Fn(&Memory) -> Value + 'static,
    expect: Expect,
) -> Step {
    Step::Call { name, who, procedure, request: Box::new(request), headers: Vec::new(), expect, keep: None }
}

fn keep(step: Step, as_name: &'static str) -> Step {
    match step {
        Step::Call { name, who, procedure, request, headers, expect, .. } => {
            Step::Call { name, who, procedure, request, headers, expect, keep: Some(as_name) }
        }
        other => other,
    }
}

fn with_header(step: Step, header: &'static str, value: &'static str) -> Step {
    match step {
        Step::Call { name, who, procedure, request, mut headers, expect, keep } => {
            headers.push((header, value));
            Step::Call { name, who, procedure, request, headers, expect, keep }
        }
        other => other,
    }
}

const N: &str = "resourcelease";
const U: &str = "resourcelease.users";
const UNKNOWN_ITEM: &str = "00000000000000000000000000000001";

fn payload(id: &str, request_id: &str) -> Value {
    json!({ "resource_type": "user", "resource_id": id, "body": "cmVidWlsZA==", "request_id": request_id, "attributes": {"tier": "gold"} })
}

fn table() -> Vec<Step> {
    use ErrorCode::*;
    use Expect::{Err as E, Ok as OK};
    use Procedure::*;
    vec![
        // enqueue
        keep(
            call(
                "enqueue",
                Who::Producer,
                Enqueue,
                |_| json!({"namespace": N, "payload": payload("1", "r1"), "priority": 3}),
                OK,
            ),
            "e1",
        ),
        call(
            "enqueue with a repeated request id is deduplicated",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("1", "r1")}),
            OK,
        ),
        call(
            "enqueue with a blank resource id",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": N, "payload": {"resource_type": "user", "resource_id": " "}}),
            E(InvalidArgument, "payload.resource_id"),
        ),
        call(
            "enqueue without a payload",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": N}),
            E(InvalidArgument, "payload"),
        ),
        call(
            "enqueue with a negative delay",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("2", ""), "delay": "-1s"}),
            E(InvalidArgument, "delay"),
        ),
        call(
            "enqueue to a namespace this node does not host",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": "resourcelease.nope", "payload": payload("2", "")}),
            E(NotFound, "resourcelease.nope"),
        ),
        call(
            "enqueue to a malformed namespace",
            Who::Operator,
            Enqueue,
            |_| json!({"namespace": "resourcelease.Users", "payload": payload("2", "")}),
            E(InvalidArgument, "namespace"),
        ),
        call(
            "enqueue without credentials",
            Who::Anonymous,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("2", "")}),
            E(Unauthenticated, "no credentials"),
        ),
        call(
            "enqueue with an expired token",
            Who::ExpiredToken,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("2", "")}),
            E(Unauthenticated, "expired"),
        ),
        call(
            "enqueue with a token for another audience",
            Who::WrongAudience,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("2", "")}),
            E(Unauthenticated, "audience"),
        ),
        call(
            "enqueue by a worker, which may not",
            Who::Worker1,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("2", "")}),
            E(PermissionDenied, "enqueue"),
        ),
        with_header(
            call(
                "enqueue with a lying rpc-shard-key",
                Who::Producer,
                Enqueue,
                |_| json!({"namespace": N, "payload": payload("2", "")}),
                E(InvalidArgument, "rpc-shard-key"),
            ),
            "rpc-shard-key",
            U,
        ),
        with_header(
            call(
                "enqueue with a malformed deadline",
                Who::Producer,
                Enqueue,
                |_| json!({"namespace": N, "payload": payload("2", "")}),
                E(InvalidArgument, "x-omnirelay-timeout-ms"),
            ),
            "x-omnirelay-timeout-ms",
            "soon",
        ),
        call("stats show that refused calls changed nothing", Who::Operator, Stats, |_| json!({"namespace": N}), OK),
        // lease
        keep(
            call("lease", Who::Worker1, Lease, |_| json!({"namespace": N, "owner": "a", "lease_duration": "30s"}), OK),
            "l1",
        ),
        call(
            "lease with nothing eligible answers no item",
            Who::Worker1,
            Lease,
            |_| json!({"namespace": N, "owner": "a"}),
            OK,
        ),
        call(
            "lease with a blank owner",
            Who::Worker1,
            Lease,
            |_| json!({"namespace": N, "owner": ""}),
            E(InvalidArgument, "owner"),
        ),
        call(
            "lease by someone without the role",
            Who::Nobody,
            Lease,
            |_| json!({"namespace": N, "owner": "a"}),
            E(PermissionDenied, "lease"),
        ),
        // heartbeat
        call(
            "heartbeat",
            Who::Worker1,
            Heartbeat,
            |m| json!({"namespace": N, "handle": m.handle("l1"), "progress": {"step": "1"}}),
            OK,
        ),
        call(
            "heartbeat by another principal",
            Who::Worker2,
            Heartbeat,
            |m| json!({"namespace": N, "handle": m.handle("l1")}),
            E(PermissionDenied, "does not belong"),
        ),
        call(
            "heartbeat naming another owner of the same principal",
            Who::Worker1,
            Heartbeat,
            |m| {
                let mut h = m.handle("l1");
                h["owner"] = json!("worker-1#b");
                json!({"namespace": N, "handle": h})
            },
            E(PermissionDenied, "does not own"),
        ),
        call(
            "heartbeat without a handle",
            Who::Worker1,
            Heartbeat,
            |_| json!({"namespace": N}),
            E(InvalidArgument, "handle"),
        ),
        call(
            "heartbeat with a malformed item id",
            Who::Worker1,
            Heartbeat,
            |m| {
                let mut h = m.handle("l1");
                h["item_id"] = json!("xyz");
                json!({"namespace": N, "handle": h})
            },
            E(InvalidArgument, "handle.item_id"),
        ),
        call(
            "heartbeat for an unknown item",
            Who::Worker1,
            Heartbeat,
            |m| {
                let mut h = m.handle("l1");
                h["item_id"] = json!(UNKNOWN_ITEM);
                json!({"namespace": N, "handle": h})
            },
            E(NotFound, "not found"),
        ),
        // fail, then the old token is stale
        call(
            "fail and requeue at once",
            Who::Worker1,
            Fail,
            |m| json!({"namespace": N, "handle": m.handle("l1"), "error": "timeout", "action": "FAIL_ACTION_REQUEUE", "requeue_delay": "0s"}),
            OK,
        ),
        call(
            "complete with a stale token",
            Who::Worker1,
            Complete,
            |m| json!({"namespace": N, "handle": m.handle("l1")}),
            E(Aborted, "stale fencing token"),
        ),
        call(
            "fail with an unknown action",
            Who::Worker1,
            Fail,
            |m| json!({"namespace": N, "handle": m.handle("l1"), "action": 7}),
            E(InvalidArgument, "action"),
        ),
        // expiry
        keep(
            call(
                "lease the requeued item",
                Who::Worker1,
                Lease,
                |_| json!({"namespace": N, "owner": "a", "lease_duration": "10s"}),
                OK,
            ),
            "l2",
        ),
        Step::Advance(Duration::from_secs(11)),
        call(
            "heartbeat an expired lease",
            Who::Worker1,
            Heartbeat,
            |m| json!({"namespace": N, "handle": m.handle("l2")}),
            E(FailedPrecondition, "expired"),
        ),
        call(
            "complete an expired lease",
            Who::Worker1,
            Complete,
            |m| json!({"namespace": N, "handle": m.handle("l2")}),
            E(FailedPrecondition, "expired"),
        ),
        call(
            "lease expires the lapsed lease, which dead-letters its last attempt",
            Who::Worker1,
            Lease,
            |_| json!({"namespace": N, "owner": "a"}),
            OK,
        ),
        // dead letters
        keep(
            call("list dead letters", Who::Operator, ListDeadLetters, |_| json!({"namespace": N, "page_size": 10}), OK),
            "dl",
        ),
        call(
            "list dead letters with a foreign page token",
            Who::Operator,
            ListDeadLetters,
            |_| json!({"namespace": N, "page_token": "abc"}),
            E(InvalidArgument, "page_token"),
        ),
        call(
            "get a dead letter",
            Who::Operator,
            GetDeadLetter,
            |m| json!({"namespace": N, "item_id": m.get("dl")["dead_letters"][0]["item"]["item_id"]}),
            OK,
        ),
        call(
            "get an unknown dead letter",
            Who::Operator,
            GetDeadLetter,
            |_| json!({"namespace": N, "item_id": UNKNOWN_ITEM}),
            E(NotFound, "dead letter"),
        ),
        call(
            "get a dead letter with a malformed id",
            Who::Operator,
            GetDeadLetter,
            |_| json!({"namespace": N, "item_id": "42"}),
            E(InvalidArgument, "item_id"),
        ),
        call(
            "get a dead letter as a worker, who may not",
            Who::Worker1,
            GetDeadLetter,
            |_| json!({"namespace": N, "item_id": UNKNOWN_ITEM}),
            E(PermissionDenied, "get_dead_letter"),
        ),
        call(
            "redrive a dead letter",
            Who::Operator,
            RedriveDeadLetter,
            |m| json!({"namespace": N, "item_id": m.get("dl")["dead_letters"][0]["item"]["item_id"]}),
            OK,
        ),
        call(
            "redrive it again",
            Who::Operator,
            RedriveDeadLetter,
            |m| json!({"namespace": N, "item_id": m.get("dl")["dead_letters"][0]["item"]["item_id"]}),
            E(NotFound, "dead letter"),
        ),
        keep(call("lease the redriven item", Who::Worker1, Lease, |_| json!({"namespace": N, "owner": "a"}), OK), "l3"),
        call(
            "fail into the dead-letter list",
            Who::Worker1,
            Fail,
            |m| json!({"namespace": N, "handle": m.handle("l3"), "error": "poison", "action": "FAIL_ACTION_DEAD_LETTER"}),
            OK,
        ),
        call(
            "purge naming nothing",
            Who::Operator,
            PurgeDeadLetters,
            |_| json!({"namespace": N}),
            E(InvalidArgument, "item_ids"),
        ),
        call(
            "purge with a malformed id",
            Who::Operator,
            PurgeDeadLetters,
            |_| json!({"namespace": N, "item_ids": ["nope"]}),
            E(InvalidArgument, "item_ids[0]"),
        ),
        call("purge every dead letter", Who::Operator, PurgeDeadLetters, |_| json!({"namespace": N, "all": true}), OK),
        // complete
        call(
            "enqueue a second item",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("2", "r2")}),
            OK,
        ),
        call(
            "enqueue a third item",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("3", "r3"), "delay": "0.5s"}),
            OK,
        ),
        keep(
            call("lease as the second worker", Who::Worker2, Lease, |_| json!({"namespace": N, "owner": "z"}), OK),
            "l4",
        ),
        call("complete", Who::Worker2, Complete, |m| json!({"namespace": N, "handle": m.handle("l4")}), OK),
        call(
            "complete again is idempotent",
            Who::Worker2,
            Complete,
            |m| json!({"namespace": N, "handle": m.handle("l4")}),
            OK,
        ),
        call(
            "complete without a handle",
            Who::Worker2,
            Complete,
            |_| json!({"namespace": N}),
            E(InvalidArgument, "handle"),
        ),
        call(
            "complete by another principal",
            Who::Worker1,
            Complete,
            |m| json!({"namespace": N, "handle": m.handle("l4")}),
            E(PermissionDenied, "does not belong"),
        ),
        // drain, resume, restore
        call(
            "drain with an unknown mode",
            Who::Operator,
            Drain,
            |_| json!({"namespace": N, "mode": 9}),
            E(InvalidArgument, "mode"),
        ),
        call(
            "drain as a worker, who may not",
            Who::Worker1,
            Drain,
            |_| json!({"namespace": N}),
            E(PermissionDenied, "drain"),
        ),
        keep(
            call(
                "drain",
                Who::Operator,
                Drain,
                |_| json!({"namespace": N, "mode": "DRAIN_MODE_HAND_BACK", "wait_timeout": "0s"}),
                OK,
            ),
            "d1",
        ),
        call(
            "lease from a draining queue",
            Who::Worker1,
            Lease,
            |_| json!({"namespace": N, "owner": "a"}),
            E(FailedPrecondition, "draining"),
        ),
        call("resume", Who::Operator, Resume, |_| json!({"namespace": N}), OK),
        call("resume a queue that is not draining", Who::Operator, Resume, |_| json!({"namespace": N}), OK),
        call(
            "restore without a snapshot",
            Who::Operator,
            Restore,
            |_| json!({"namespace": U}),
            E(InvalidArgument, "snapshot"),
        ),
        call(
            "restore with a malformed item id",
            Who::Operator,
            Restore,
            |m| {
                let mut s = m.get("d1")["snapshot"].clone();
                s["items"][0]["item_id"] = json!("bad");
                json!({"namespace": U, "snapshot": s})
            },
            E(InvalidArgument, "snapshot.items[0].item_id"),
        ),
        call(
            "restore into another namespace",
            Who::Operator,
            Restore,
            |m| json!({"namespace": U, "snapshot": m.get("d1")["snapshot"]}),
            OK,
        ),
        call(
            "restore it again skips what is there",
            Who::Operator,
            Restore,
            |m| json!({"namespace": U, "snapshot": m.get("d1")["snapshot"]}),
            OK,
        ),
        // the source drops what was restored elsewhere
        call(
            "purge drained items from a queue that is not draining",
            Who::Operator,
            PurgeDrained,
            |m| json!({"namespace": N, "item_ids": [m.get("d1")["snapshot"]["items"][0]["item_id"]]}),
            E(FailedPrecondition, "not draining"),
        ),
        call(
            "purge drained items as a worker, who may not",
            Who::Worker1,
            PurgeDrained,
            |m| json!({"namespace": N, "item_ids": [m.get("d1")["snapshot"]["items"][0]["item_id"]]}),
            E(PermissionDenied, "purge_drained"),
        ),
        call(
            "drain again",
            Who::Operator,
            Drain,
            |_| json!({"namespace": N, "mode": "DRAIN_MODE_HAND_BACK", "wait_timeout": "0s"}),
            OK,
        ),
        call(
            "purge drained with a malformed id",
            Who::Operator,
            PurgeDrained,
            |_| json!({"namespace": N, "item_ids": ["bad"]}),
            E(InvalidArgument, "item_ids[0]"),
        ),
        keep(
            call(
                "purge the items restored elsewhere",
                Who::Operator,
                PurgeDrained,
                |m| {
                    let ids: Vec<Value> = m.get("d1")["snapshot"]["items"]
                        .as_array()
                        .expect("items")
                        .iter()
                        .map(|item| item["item_id"].clone())
                        .collect();
                    json!({"namespace": N, "item_ids": ids})
                },
                OK,
            ),
            "purged",
        ),
        call("resume after the purge", Who::Operator, Resume, |_| json!({"namespace": N}), OK),
        // backpressure on the small queue
        call(
            "enqueue up to the high watermark",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": U, "payload": payload("u1", "")}),
            OK,
        ),
        call(
            "enqueue under backpressure",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": U, "payload": payload("u2", "")}),
            E(ResourceExhausted, "backpressure"),
        ),
        call("stats show the backpressure", Who::Worker1, Stats, |_| json!({"namespace": U}), OK),
        call(
            "stats of an unknown namespace",
            Who::Operator,
            Stats,
            |_| json!({"namespace": "resourcelease.nope"}),
            E(NotFound, "not hosted"),
        ),
        call(
            "stats without a role for them",
            Who::Nobody,
            Stats,
            |_| json!({"namespace": N}),
            E(PermissionDenied, "stats"),
        ),
        // deadlines and an unavailable log
        with_header(
            call(
                "stats with a spent deadline",
                Who::Operator,
                Stats,
                |_| json!({"namespace": N}),
                E(DeadlineExceeded, "deadline"),
            ),
            "x-omnirelay-timeout-ms",
            "0",
        ),
        Step::FailPublishes(1),
        call(
            "enqueue while the log does not answer",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("9", "r9")}),
            E(Unavailable, "replication"),
        ),
        Step::AwaitServing,
        call(
            "the retried enqueue is written once the shard is rebuilt",
            Who::Producer,
            Enqueue,
            |_| json!({"namespace": N, "payload": payload("9", "r9")}),
            OK,
        ),
        call("final stats", Who::Operator, Stats, |_| json!({"namespace": N}), OK),
        // bodies that cannot be typed
        Step::Raw {
            name: "an oversized body",
            who: Who::Producer,
            call: oversized(),
            expect: Expect::Err(InvalidArgument, "request body"),
        },
        Step::Raw {
            name: "a body that is neither protobuf nor JSON",
            who: Who::Producer,
            call: RawCall {
                procedure: Enqueue,
                namespace: N,
                grpc_message: vec![0x0a, 0xff, 0xff],
                http_body: b"{\"namespace\": ".to_vec(),
                session_message: vec![0x0a, 0xff, 0xff],
            },
            expect: Expect::Err(InvalidArgument, "request body"),
        },
    ]
}

/// An enqueue whose body is three times the 2 MiB limit, on both transports.
fn oversized() -> RawCall {
    let body = vec![b'x'; 6 * 1024 * 1024];
    let message = pb::EnqueueRequest {
        namespace: N.into(),
        payload: Some(pb::ItemPayload {
            resource_type: "t".into(),
            resource_id: "i".into(),
            body: body.clone().into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let json = serde_json::to_vec(
        &json!({"namespace": N, "payload": {"resource_type": "t", "resource_id": "i", "body": base64_of(&body)}}),
    )
    .expect("json");
    let session =
        pb::SessionRequest { id: 1, timeout: None, call: Some(pb::session_request::Call::Enqueue(message.clone())) };
    RawCall {
        procedure: Procedure::Enqueue,
        namespace: N,
        grpc_message: message.encode_to_vec(),
        http_body: json,
        session_message: session.encode_to_vec(),
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Runs the table against a fresh node over `wire`; returns each step's name
/// and normalized outcome.
async fn run(wire: Wire) -> (Vec<(&'static str, Outcome, Expect)>, TestNode) {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let mut memory = Memory::default();
    let mut ids = Ids::new();
    let mut outcomes = Vec::new();
    for step in table() {
        match step {
            Step::Advance(by) => node.clock.advance(by),
            Step::FailPublishes(count) => node
                .replicator
                .inject(std::iter::repeat_n(omnirelay_client::replication::PublishFault::BeforeWrite, count)),
            Step::AwaitServing => node.node.serving().await,
            Step::Call { name, who, procedure, request, headers, expect, keep } => {
                let value = request(&memory);
                let mut auth = who.auth(&node);
                for (header, v) in headers {
                    auth = auth.header(header, v);
                }
                let outcome = client.call(wire, &Req::from_json(procedure, &value), &auth).await;
                if let (Some(as_name), Outcome::Ok(response)) = (keep, &outcome) {
                    memory.kept.insert(as_name, response.clone());
                }
                outcomes.push((name, ids.outcome(&outcome), expect));
            }
            Step::Raw { name, who, call, expect } => {
                let outcome = client.raw(wire, &call, &who.auth(&node)).await;
                // The encodings fail in their own words: compare the code
                // and the field only.
                let reduced = match &outcome {
                    Outcome::Err { code, .. } => {
                        Outcome::Err { code: *code, message: outcome.field().unwrap_or_default(), backpressure: None }
                    }
                    ok => ok.clone(),
                };
                outcomes.push((name, reduced, expect));
            }
        }
    }
    (outcomes, node)
}

#[tokio::test]
async fn every_transport_answers_every_procedure_identically() {
    let (grpc, grpc_node) = run(Wire::Grpc).await;
    let (http, http_node) = run(Wire::Http).await;
    let (session, session_node) = run(Wire::Session).await;
    assert_eq!(grpc.len(), http.len());
    assert_eq!(grpc.len(), session.len());
    let mut covered = std::collections::BTreeSet::new();
    for (((name, over_grpc, expect), (_, over_http, _)), (_, over_session, _)) in grpc.iter().zip(&http).zip(&session) {
        assert_eq!(over_grpc, over_http, "{name}: the transports disagree");
        assert_eq!(over_grpc, over_session, "{name}: a session answers otherwise than a unary call");
        match (expect, over_grpc) {
            (Expect::Ok, Outcome::Ok(_)) => {}
            (Expect::Err(code, text), Outcome::Err { code: got, message, .. }) => {
                assert_eq!(got, code, "{name}: {message}");
                assert!(message.contains(text), "{name}: {message:?} should mention {text:?}");
                covered.insert(code.as_str());
            }
            (expect, outcome) => panic!("{name}: expected {expect:?}, got {outcome:?}"),
        }
    }
    for code in [
        "invalid_argument",
        "not_found",
        "aborted",
        "failed_precondition",
        "permission_denied",
        "unauthenticated",
        "resource_exhausted",
    ] {
        assert!(covered.contains(code), "the table covers {code}");
    }

    // A few answers checked for content, not only for agreement.
    let find = |name: &str| &grpc.iter().find(|(n, _, _)| *n == name).unwrap_or_else(|| panic!("{name}")).1;
    assert_eq!(find("enqueue with a repeated request id is deduplicated").value()["deduplicated"], true);
    assert_eq!(find("stats show that refused calls changed nothing").value()["pending"], 1);
    assert_eq!(find("lease with nothing eligible answers no item").value()["item"], Value::Null);
    let leased = find("lease").value();
    assert_eq!(leased["item"]["lease"]["owner"], "worker-1#a", "the owner is bound to the principal");
    assert_eq!(leased["item"]["payload"]["body"], "cmVidWlsZA==");
    assert_eq!(leased["item"]["enqueued_at"], "2026-01-01T00:00:00Z");
    assert_eq!(find("complete again is idempotent").value()["already_completed"], true);
    assert_eq!(find("fail into the dead-letter list").value()["outcome"], "FAIL_OUTCOME_DEAD_LETTERED");
    assert_eq!(find("restore into another namespace").value()["restored"], 1);
    assert_eq!(find("restore it again skips what is there").value()["skipped"], 1);
    assert_eq!(find("purge the items restored elsewhere").value()["purged"], 1, "the restored item left its source");
    assert_eq!(find("resume a queue that is not draining").value()["resumed"], false);
    let Outcome::Err { backpressure: Some(signal), .. } = find("enqueue under backpressure") else {
        panic!("backpressure carries its signal");
    };
    assert_eq!(
        (signal["active"].clone(), signal["namespace"].clone(), signal["high"].clone()),
        (json!(true), json!(U), json!(2))
    );
    assert_eq!(find("stats show the backpressure").value()["backpressure"]["active"], true);
    assert_eq!(
        find("the retried enqueue is written once the shard is rebuilt").value()["deduplicated"],
        false,
        "the failed batch was not written, so the retry wrote it"
    );

    // The session run carried every hot-path row the table has over
    // sessions: count them, so a table without them cannot pass silently.
    let carried = table()
        .iter()
        .filter(|step| matches!(step, Step::Call { procedure, .. } if Procedure::SESSION_CALLS.contains(procedure)))
        .count();
    assert!(carried >= 30, "only {carried} rows went over sessions");

    for node in [&grpc_node, &http_node, &session_node] {
        // Every event names its shard, the principal that caused it and
        // this node as its peer.
        for namespace in [N, U] {
            let events = node.replicator.events(&omnirelay_client::ShardId::from(namespace));
            assert!(!events.is_empty());
            for event in &events {
                let wire = omnirelay_client::wire::event(event.sequence, &event.event);
                assert_eq!(wire.shard_id, namespace);
                assert_eq!(wire.peer_id, "test-node");
                assert!(
                    ["producer", "worker-1", "worker-2", "operator", "omnirelay:queue"]
                        .contains(&wire.principal.as_str()),
                    "{}",
                    wire.principal
                );
            }
        }
        let first = &node.replicator.events(&omnirelay_client::ShardId::from(N))[0];
        assert_eq!(first.event.origin.principal.as_str(), "producer");
    }
    grpc_node.stop().await;
    http_node.stop().await;
    session_node.stop().await;
}

/// Refused calls, on either transport, leave the queue exactly as it was.
#[tokio::test]
async fn refused_calls_change_nothing_on_either_transport() {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let producer = Auth::bearer(node.token("producer", &["producer"]));
    let enqueue = Req::from_json(Procedure::Enqueue, &json!({"namespace": N, "payload": payload("1", "")}));
    assert!(matches!(client.call(Wire::Grpc, &enqueue, &producer).await, Outcome::Ok(_)));
    let before = node.stats(N).await;
    let refused = [
        (Auth::none(), ErrorCode::Unauthenticated),
        (Auth::bearer(node.token_with("producer", &["producer"], "elsewhere", 600)), ErrorCode::Unauthenticated),
        (
            Auth::bearer(node.token_with("producer", &["producer"], crate::node_support::AUDIENCE, -300)),
            ErrorCode::Unauthenticated,
        ),
        (Auth::bearer(node.token("worker-1", &["worker"])), ErrorCode::PermissionDenied),
        (Auth::none().header("x-client-principal", "producer"), ErrorCode::Unauthenticated),
    ];
    for wire in [Wire::Grpc, Wire::Http, Wire::Session] {
        for (auth, code) in &refused {
            assert_eq!(client.call(wire, &enqueue, auth).await.code(), Some(*code), "{wire:?} {auth:?}");
            let drain = Req::from_json(Procedure::Drain, &json!({"namespace": N, "mode": "DRAIN_MODE_HAND_BACK"}));
            assert!(client.call(wire, &drain, auth).await.code().is_some(), "{wire:?} drain refused");
        }
    }
    let after = node.stats(N).await;
    assert_eq!(after, before, "refused calls changed the queue");
    node.stop().await;
}

/// HTTP/JSON-only checks: the body may not contradict the path, must be
/// JSON, and type errors name the field's path.
#[tokio::test]
async fn json_bodies_are_checked_against_the_path_and_name_bad_fields() {
    let node = TestNode::start(Options::default()).await;
    let mut client = Client::new(node.addr);
    let producer = Auth::bearer(node.token("producer", &["producer"]));
    let cases: [(&[u8], &str, &str); 4] = [
        (
            br#"{"namespace": "resourcelease.users", "payload": {"resource_type": "t", "resource_id": "1"}}"#,
            "application/json",
            "namespace",
        ),
        (br#"{"payload": {"resource_type": "t", "resource_id": 1}}"#, "application/json", "payload.resource_id"),
        (
            br#"{"payload": {"resource_type": "t", "resource_id": "1", "colour": "red"}}"#,
            "application/json",
            "payload.colour",
        ),
        (br#"{"payload": {"resource_type": "t", "resource_id": "1"}}"#, "text/plain", "content-type"),
    ];
    for (body, content_type, field) in cases {
        let outcome = client.http_raw(Procedure::Enqueue, N, body.to_vec(), content_type, &producer).await;
        assert_eq!(outcome.code(), Some(ErrorCode::InvalidArgument), "{outcome:?}");
        assert_eq!(outcome.field().as_deref(), Some(field), "{outcome:?}");
    }
    // An empty body is the default message: stats of the path's namespace.
    let stats = client.http_raw(Procedure::Stats, U, Vec::new(), "application/json", &producer).await;
    assert_eq!(stats.value()["backpressure"]["namespace"], U);
    assert_eq!(node.stats(N).await.pending, 0, "nothing was enqueued");
    node.stop().await;
}
