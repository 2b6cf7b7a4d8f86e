//! Who may call what: every Hub RPC against every role, unauthenticated
//! callers, bad tokens and proxy headers from untrusted addresses. Each
//! refusal is UNAUTHENTICATED or PERMISSION_DENIED and changes nothing in
//! PostgreSQL (checked by reading the tables afterwards).

use std::time::Duration;

use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use omnirelay_hub::Config;
use omnirelay_hub::access::{Access, HubProcedure, HubRole};
use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::proto::hub::v1::hub_client::HubClient;
use omnirelay_tests::TestDb;
use serde_json::json;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::support::{self, TestHub, batch};

const ISSUER: &str = "https://sts.test";
const AUDIENCE: &str = "omnirelay-hub";
const SHARD: &str = "resourcelease.secure";
const LONG: Duration = Duration::from_secs(60);

/// A hub that takes bearer tokens signed by `key` or `next_key` (two keys,
/// as during a rotation), and trusts proxy headers from 10.0.0.0/8 only (so
/// never from the tests' loopback connections).
struct SecureHub {
    hub: TestHub,
    key: EncodingKey,
    next_key: EncodingKey,
    _dir: tempfile::TempDir,
}

/// A second producer, for limits that must leave other principals alone.
const OTHER_PRODUCER: &str = "spiffe://test/node-b";

fn principal(role: HubRole) -> &'static str {
    match role {
        HubRole::Producer => "spiffe://test/node",
        HubRole::Subscriber => "spiffe://test/sink",
        HubRole::Reader => "spiffe://test/reader",
        HubRole::Operator => "spiffe://test/ops",
    }
}

async fn secure_hub(db: &TestDb) -> SecureHub {
    secure_hub_with(db, json!({})).await
}

async fn secure_hub_with(db: &TestDb, limits: serde_json::Value) -> SecureHub {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pair = rcgen::KeyPair::generate().expect("an EC key");
    let next = rcgen::KeyPair::generate().expect("an EC key");
    let public = dir.path().join("jwt.pem");
    std::fs::write(&public, pair.public_key_pem()).expect("write the public key");
    let next_public = dir.path().join("jwt-next.pem");
    std::fs::write(&next_public, next.public_key_pem()).expect("write the next public key");
    let access = json!({
        "trusted_proxies": ["10.0.0.0/8"],
        "jwt": {"algorithm": "ES256", "public_key_file": [public, next_public], "issuer": ISSUER, "audience": AUDIENCE},
        "grants": [
            {"name": "nodes", "principals": [principal(HubRole::Producer), OTHER_PRODUCER], "hub_roles": ["producer"], "shards": ["resourcelease.*"]},
            {"name": "sinks", "principals": [principal(HubRole::Subscriber)], "hub_roles": ["subscriber"], "shards": ["resourcelease.*"], "subscribers": ["sink"]},
            {"name": "readers", "principals": [principal(HubRole::Reader)], "hub_roles": ["reader"], "shards": ["*"]},
            {"name": "operators", "principals": [principal(HubRole::Operator)], "hub_roles": ["operator"], "shards": ["*"]}
        ],
        "limits": limits
    });
    let access = Access::from_json(&access.to_string()).expect("a valid access file");
    let config = Config { retention_interval: None, access, ..Config::for_postgres(db.url()).expect("a valid URL") };
    let hub = TestHub::start_with(config).await;
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("an encoding key");
    let next_key = EncodingKey::from_ec_pem(next.serialize_pem().as_bytes()).expect("an encoding key");
    SecureHub { hub, key, next_key, _dir: dir }
}

fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).expect("the time fits")
}

fn token(key: &EncodingKey, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, key).expect("sign")
}

fn claims(subject: &str) -> serde_json::Value {
    json!({"sub": subject, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600})
}

/// How a call presents itself.
#[derive(Clone)]
enum Credential {
    None,
    Bearer(String),
    ProxyHeader(&'static str),
}

fn request<T>(message: T, credential: &Credential) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    match credential {
        Credential::None => {}
        Credential::Bearer(token) => {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ASCII"));
        }
        Credential::ProxyHeader(principal) => {
            request.metadata_mut().insert("x-client-principal", principal.parse().expect("ASCII"));
        }
    }
    request
}

/// Calls Hub method `method` with a well-formed request about [`SHARD`]
/// (as subscriber `sink`, owner `node-a` at `epoch`); `Ok` when the hub
/// did not refuse the caller (the request may still fail otherwise).
/// A method this match does not know fails the test: a new RPC must be
/// added here, and to the hub's table.
async fn call(
    client: &mut HubClient<Channel>,
    method: &str,
    credential: &Credential,
    epoch: u64,
) -> Result<(), tonic::Status> {
    let refusal = |status: tonic::Status| match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Err(status),
        _ => Ok(()),
    };
    let answered = |result: Result<(), tonic::Status>| result.or_else(refusal);
    let shard = SHARD.to_string();
    match HubProcedure::from_grpc_method(method).unwrap_or_else(|| panic!("{method} is not in the hub's table")) {
        HubProcedure::Append => {
            let frames = tokio_stream::iter(vec![batch(SHARD, "p", 1_000, epoch, &["x"])]);
            let mut responses = match client.append(request(frames, credential)).await {
                Ok(responses) => responses.into_inner(),
                Err(status) => return refusal(status),
            };
            match responses.next().await {
                Some(Err(status)) => refusal(status),
                _ => Ok(()),
            }
        }
        HubProcedure::Subscribe => {
            let message = pb::SubscribeRequest {
                subscriber_id: "sink".into(),
                shard_ids: vec![shard],
                start: Some(pb::StartPosition { position: Some(pb::start_position::Position::AfterSequence(0)) }),
                ..Default::default()
            };
            answered(client.subscribe(request(message, credential)).await.map(drop))
        }
        HubProcedure::CommitCheckpoint => {
            let message = pb::CommitCheckpointRequest {
                subscriber_id: "sink".into(),
                shard_id: shard,
                sequence: 1,
                hash: Bytes::new(),
            };
            answered(client.commit_checkpoint(request(message, credential)).await.map(drop))
        }
        HubProcedure::GetCheckpoints => {
            let message = pb::GetCheckpointsRequest {
                subscriber_id: "sink".into(),
                shard_ids: vec![shard],
                ..Default::default()
            };
            answered(client.get_checkpoints(request(message, credential)).await.map(drop))
        }
        HubProcedure::AcquireShard => {
            let message = pb::AcquireShardRequest { shard_id: shard, owner: "node-a".into(), ttl: None };
            answered(client.acquire_shard(request(message, credential)).await.map(drop))
        }
        HubProcedure::RenewShard => {
            let message = pb::RenewShardRequest { shard_id: shard, owner: "node-a".into(), epoch, ttl: None };
            answered(client.renew_shard(request(message, credential)).await.map(drop))
        }
        HubProcedure::ReleaseShard => {
            // A stale epoch: an allowed release is answered `false` and
            // leaves the lease alone, so the loop can go on.
            let message = pb::ReleaseShardRequest { shard_id: shard, owner: "node-a".into(), epoch: epoch + 100 };
            answered(client.release_shard(request(message, credential)).await.map(drop))
        }
        HubProcedure::ReadRange => {
            let message = pb::ReadRangeRequest { shard_id: shard, from_sequence: 1, to_sequence: 0, limit: 0 };
            answered(client.read_range(request(message, credential)).await.map(drop))
        }
        HubProcedure::PutSnapshot => {
            let message =
                pb::PutSnapshotRequest { shard_id: shard, sequence: 1, data: Bytes::from_static(b"s"), epoch };
            answered(client.put_snapshot(request(message, credential)).await.map(drop))
        }
        HubProcedure::GetSnapshot => {
            let message = pb::GetSnapshotRequest { shard_id: shard, at_or_below: 0 };
            answered(client.get_snapshot(request(message, credential)).await.map(drop))
        }
        HubProcedure::ListShardLeases => {
            let message = pb::ListShardLeasesRequest { prefix: shard, ..Default::default() };
            answered(client.list_shard_leases(request(message, credential)).await.map(drop))
        }
    }
}

/// Everything the hub keeps, as text, to compare before and after.
async fn tables(db: &TestDb) -> String {
    let client = db.client().await;
    let mut dump = String::new();
    for query in [
        "SELECT shard_id, epoch::text, coalesce(owner, ''), head_sequence::text, coalesce(lease_expires_at::text, '') FROM shards ORDER BY shard_id",
        "SELECT shard_no::text, sequence::text, encode(hash, 'hex'), '', '' FROM events ORDER BY shard_no, sequence",
        "SELECT subscriber_id, shard_no::text, sequence::text, '', '' FROM checkpoints ORDER BY subscriber_id, shard_no",
        "SELECT shard_no::text, sequence::text, encode(hash, 'hex'), '', '' FROM snapshots ORDER BY shard_no, sequence",
        "SELECT shard_no::text, producer_id, producer_seq::text, '', '' FROM producer_batches ORDER BY 1, 2, 3",
    ] {
        for row in client.query(query, &[]).await.expect("read a table") {
            let cells: Vec<String> = (0..5).map(|i| row.get::<_, String>(i)).collect();
            dump.push_str(&cells.join("|"));
            dump.push('\n');
        }
    }
    dump
}

fn hub_methods() -> Vec<String> {
    omnirelay_hub::proto::procedures()
        .into_iter()
        .filter(|(service, _)| service == "omnirelay.hub.v1.Hub")
        .map(|(_, method)| method)
        .collect()
}

/// The procedures `role` may call, as the table in `access` says; for
/// `GetCheckpoints` of its own subscriber id (`sink`), subscribers and
/// operators.
fn allowed(role: HubRole, procedure: HubProcedure) -> bool {
    procedure.roles().contains(&role)
}

#[tokio::test]
async fn every_role_against_every_rpc_and_refusals_change_nothing() {
    let db = support::migrated_db().await;
    let secure = secure_hub(&db).await;
    let mut client = secure.hub.client().await;
    let bearer = |subject: &str| Credential::Bearer(token(&secure.key, claims(subject)));
    // The producer sets the scene: a lease, two events, a snapshot.
    let producer = bearer(principal(HubRole::Producer));
    let acquired = client
        .acquire_shard(request(
            pb::AcquireShardRequest { shard_id: SHARD.into(), owner: "node-a".into(), ttl: None },
            &producer,
        ))
        .await
        .expect("the producer acquires")
        .into_inner();
    let epoch = acquired.lease.expect("a lease").epoch;
    let mut frames = client
        .append(request(tokio_stream::iter(vec![batch(SHARD, "p", 1, epoch, &["a", "b"])]), &producer))
        .await
        .expect("the producer appends")
        .into_inner();
    assert!(matches!(frames.next().await, Some(Ok(_))), "the producer's batch is answered");

    let before = tables(&db).await;
    let methods = hub_methods();
    assert_eq!(methods.len(), HubProcedure::ALL.len());
    // Refused: nobody, a stranger, bad tokens, a proxy header from an
    // untrusted address, and every role on every procedure it lacks.
    let mut refusals = vec![
        (Credential::None, tonic::Code::Unauthenticated),
        (bearer("spiffe://test/stranger"), tonic::Code::PermissionDenied),
        (Credential::ProxyHeader("spiffe://test/node"), tonic::Code::Unauthenticated),
    ];
    let mut wrong_audience = claims(principal(HubRole::Producer));
    wrong_audience["aud"] = json!("someone-else");
    let mut expired = claims(principal(HubRole::Producer));
    expired["exp"] = json!(now() - 3600);
    for bad in [wrong_audience, expired] {
        refusals.push((Credential::Bearer(token(&secure.key, bad)), tonic::Code::Unauthenticated));
    }
    // `alg: none`, and HS256 keyed with something public.
    let none = {
        use base64::Engine as _;
        let encode = |value: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string().as_bytes())
        };
        format!("{}.{}.", encode(json!({"alg": "none", "typ": "JWT"})), encode(claims(principal(HubRole::Producer))))
    };
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(principal(HubRole::Producer)),
        &EncodingKey::from_secret(b"the public key text"),
    )
    .expect("sign");
    refusals.push((Credential::Bearer(none), tonic::Code::Unauthenticated));
    refusals.push((Credential::Bearer(hs256), tonic::Code::Unauthenticated));
    for (credential, code) in &refusals {
        for method in &methods {
            let status = call(&mut client, method, credential, epoch).await.expect_err(method);
            assert_eq!(status.code(), *code, "{method}: {status:?}");
        }
    }
    for role in HubRole::ALL {
        let credential = bearer(principal(role));
        for method in &methods {
            let procedure = HubProcedure::from_grpc_method(method).expect("in the table");
            if !allowed(role, procedure) {
                let status = call(&mut client, method, &credential, epoch).await.expect_err(method);
                assert_eq!(status.code(), tonic::Code::PermissionDenied, "{role:?} {method}: {status:?}");
                assert!(status.message().contains(principal(role)), "{}", status.message());
            }
        }
    }
    assert_eq!(tables(&db).await, before, "a refused call changed the database");
    // Allowed: every role on every procedure it has.
    for role in HubRole::ALL {
        let credential = bearer(principal(role));
        for method in &methods {
            let procedure = HubProcedure::from_grpc_method(method).expect("in the table");
            if allowed(role, procedure) {
                call(&mut client, method, &credential, epoch)
                    .await
                    .unwrap_or_else(|status| panic!("{role:?} {method} was refused: {status:?}"));
            }
        }
    }
    secure.hub.stop().await;
}

#[tokio::test]
async fn subscribers_use_their_own_ids_and_only_operators_list_everyone() {
    let db = support::migrated_db().await;
    let secure = secure_hub(&db).await;
    let mut client = secure.hub.client().await;
    let sink = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Subscriber))));
    let producer = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Producer))));
    let epoch = client
        .acquire_shard(request(
            pb::AcquireShardRequest { shard_id: SHARD.into(), owner: "node-a".into(), ttl: None },
            &producer,
        ))
        .await
        .expect("acquire")
        .into_inner()
        .lease
        .expect("a lease")
        .epoch;
    let other = pb::CommitCheckpointRequest {
        subscriber_id: "audit".into(),
        shard_id: SHARD.into(),
        sequence: 0,
        hash: Bytes::new(),
    };
    let status = client.commit_checkpoint(request(other, &sink)).await.expect_err("another subscriber's id");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let everyone = pb::GetCheckpointsRequest::default();
    let status = client.get_checkpoints(request(everyone.clone(), &sink)).await.expect_err("every subscriber");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let ops = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Operator))));
    client.get_checkpoints(request(everyone, &ops)).await.expect("operators list every checkpoint");
    let pattern =
        pb::SubscribeRequest { subscriber_id: "sink".into(), shard_pattern: "*".into(), ..Default::default() };
    let status = client.subscribe(request(pattern, &sink)).await.map(drop).expect_err("beyond its grant");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let pattern = pb::SubscribeRequest {
        subscriber_id: "sink".into(),
        shard_pattern: "resourcelease.*".into(),
        ..Default::default()
    };
    client.subscribe(request(pattern, &sink)).await.expect("within its grant");
    // An append stream ends PERMISSION_DENIED at a batch for a shard the
    // producer has no grant on, after answering the batch before it.
    let frames = tokio_stream::iter(vec![batch(SHARD, "p", 1, epoch, &["a"]), batch("other.shard", "p", 1, 1, &["b"])]);
    let mut answers = client.append(request(frames, &producer)).await.expect("the stream opens").into_inner();
    assert!(matches!(answers.next().await, Some(Ok(_))), "the first batch is answered");
    let status = answers.next().await.expect("the stream ends with a status").expect_err("denied");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    secure.hub.stop().await;
}

#[tokio::test]
async fn protected_mode_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hub = omnirelay_hub::Hub::open(Config::for_sqlite(dir.path().join("hub.db"))).await.expect("open");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("bind every address");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let err = hub.serve_on(listener, admin, std::future::pending()).await.expect_err("protected mode");
    assert!(format!("{err:#}").contains("protected mode"), "{err:#}");
    // On loopback it serves a local caller with every role.
    let hub = TestHub::start_with(Config::for_sqlite(dir.path().join("hub.db"))).await;
    let mut client = hub.client().await;
    let epoch = support::acquire(&mut client, SHARD, "node-a", LONG).await;
    let mut appender = support::Appender::open(&mut client).await;
    support::ack(appender.append(batch(SHARD, "p", 1, epoch, &["a"])).await);
    client.get_checkpoints(pb::GetCheckpointsRequest::default()).await.expect("a local caller is an operator too");
    hub.stop().await;
}

/// What the serving hub's PostgreSQL role is granted, as `docs/security.md`
/// gives it (`{role}` stands for the role's name): data on the hub's tables,
/// the identity sequence, the schema history to read; nothing else.
const LEAST_PRIVILEGE: &str = "
    GRANT USAGE ON SCHEMA public TO {role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON shards, events, producer_batches, checkpoints, snapshots TO {role};
    GRANT USAGE ON SEQUENCE shards_shard_no_seq TO {role};
    GRANT SELECT ON refinery_schema_history TO {role};
    GRANT EXECUTE ON FUNCTION omnirelay_fence_refused(bigint, bigint) TO {role};
";

#[tokio::test]
async fn the_hub_serves_with_the_least_privilege_role_and_cannot_change_the_schema() {
    let db = support::migrated_db().await;
    let role = format!("{}_hub", db.name());
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'hub' NOSUPERUSER NOCREATEDB NOCREATEROLE;
             REVOKE ALL ON DATABASE {db} FROM PUBLIC;
             GRANT CONNECT ON DATABASE {db} TO {role};
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             {grants}",
            db = db.name(),
            grants = LEAST_PRIVILEGE.replace("{role}", &role),
        ))
        .await
        .expect("create the hub's role");
    let url = db.url().replacen("://postgres@", &format!("://{role}:hub@"), 1);
    assert_ne!(url, db.url(), "the harness URL names the superuser: {}", db.url());

    // As that role, DDL fails: the schema changes only through `migrate`.
    let (as_hub, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect as the role");
    tokio::spawn(connection);
    let superuser: bool = as_hub
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[])
        .await
        .expect("read the role")
        .get(0);
    assert!(!superuser);
    for ddl in ["CREATE TABLE intruder (x int)", "ALTER TABLE shards ADD COLUMN x int", "DROP TABLE events"] {
        as_hub.batch_execute(ddl).await.expect_err(ddl);
    }

    // Everything a replica does works: serve, append, subscribe, checkpoint,
    // snapshot, read, retention.
    let config = Config { retention_interval: None, ..Config::for_postgres(&url).expect("a valid URL") };
    let hub = TestHub::start_with(config).await;
    let mut client = hub.client().await;
    let epoch = support::acquire(&mut client, SHARD, "node-a", LONG).await;
    let mut appender = support::Appender::open(&mut client).await;
    support::ack(appender.append(batch(SHARD, "p", 1, epoch, &["a", "b", "c"])).await);
    let mut subscription = client
        .subscribe(pb::SubscribeRequest {
            subscriber_id: "sink".into(),
            shard_ids: vec![SHARD.into()],
            start: Some(pb::StartPosition { position: Some(pb::start_position::Position::AfterSequence(0)) }),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    tokio::time::timeout(LONG, subscription.message()).await.expect("a frame in time").expect("a frame");
    client
        .commit_checkpoint(pb::CommitCheckpointRequest {
            subscriber_id: "sink".into(),
            shard_id: SHARD.into(),
            sequence: 3,
            hash: Bytes::new(),
        })
        .await
        .expect("commit a checkpoint");
    client
        .put_snapshot(pb::PutSnapshotRequest {
            shard_id: SHARD.into(),
            sequence: 2,
            data: Bytes::from_static(b"s"),
            epoch,
        })
        .await
        .expect("store a snapshot");
    let page = client
        .read_range(pb::ReadRangeRequest { shard_id: SHARD.into(), from_sequence: 1, to_sequence: 0, limit: 0 })
        .await
        .expect("read")
        .into_inner();
    assert_eq!(page.events.len(), 3);
    let store =
        omnirelay_hub::store::postgres::PgStore::open(omnirelay_hub::store::postgres::PgStoreConfig::new(url.clone()))
            .await
            .expect("the store opens as the role");
    use omnirelay_hub::store::LogStore as _;
    let shard = omnirelay_hub::ids::ShardId::parse(SHARD).expect("valid");
    let trimmed = store
        .apply_retention(shard.clone(), omnirelay_hub::store::RetentionPolicy { checkpoint_max_age: LONG })
        .await
        .expect("retention runs as the role");
    assert!(trimmed.deleted > 0, "events below the snapshot trimmed: {trimmed:?}");
    client
        .release_shard(pb::ReleaseShardRequest { shard_id: SHARD.into(), owner: "node-a".into(), epoch })
        .await
        .expect("release");
    store.close().await.expect("close");
    hub.stop().await;
}

#[tokio::test]
async fn a_principal_at_its_stream_limits_is_refused_and_others_are_served() {
    let db = support::migrated_db().await;
    let secure = secure_hub_with(&db, json!({"append_streams": 2, "subscriptions": 2})).await;
    let mut client = secure.hub.client().await;
    let sink = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Subscriber))));
    let producer = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Producer))));
    let subscribe = |credential: &Credential| {
        request(
            pb::SubscribeRequest {
                subscriber_id: "sink".into(),
                shard_ids: vec![SHARD.into()],
                start: Some(pb::StartPosition { position: Some(pb::start_position::Position::AfterSequence(0)) }),
                ..Default::default()
            },
            credential,
        )
    };
    let first = client.subscribe(subscribe(&sink)).await.expect("one");
    let _second = client.subscribe(subscribe(&sink)).await.expect("two");
    let refused = client.subscribe(subscribe(&sink)).await.map(drop).expect_err("three");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("2 open subscriptions"), "{}", refused.message());
    // Closing one frees its place (once the hub notices the stream is gone).
    drop(first);
    let mut reopened = None;
    for _ in 0..100 {
        match client.subscribe(subscribe(&sink)).await {
            Ok(stream) => {
                reopened = Some(stream);
                break;
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
    assert!(reopened.is_some(), "a closed subscription frees its place");

    let open_append = |credential: &Credential| {
        let (frames, outbound) = tokio::sync::mpsc::channel::<pb::AppendRequest>(1);
        (frames, request(tokio_stream::wrappers::ReceiverStream::new(outbound), credential))
    };
    let (_a, first) = open_append(&producer);
    let _one = client.append(first).await.expect("one append stream");
    let (_b, second) = open_append(&producer);
    let _two = client.append(second).await.expect("two append streams");
    let (_c, third) = open_append(&producer);
    let refused = client.append(third).await.map(drop).expect_err("three append streams");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("2 open append streams"), "{}", refused.message());
    // Another principal is served meanwhile.
    let reader = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Reader))));
    client
        .get_snapshot(request(pb::GetSnapshotRequest { shard_id: SHARD.into(), at_or_below: 0 }, &reader))
        .await
        .map(drop)
        .or_else(|status| if status.code() == tonic::Code::NotFound { Ok(()) } else { Err(status) })
        .expect("another principal is served");
    secure.hub.stop().await;
}

/// A caller opens a thousand subscriptions over several connections and
/// never reads one: the replica keeps at most its per-principal limit open,
/// refuses the rest naming the limit, stays within its subscription memory,
/// and serves other callers meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unread_subscriptions_stay_bounded_and_others_are_served() {
    let db = support::migrated_db().await;
    let secure = secure_hub(&db).await;
    let sink = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Subscriber))));
    let mut opened = Vec::new();
    let mut refused = 0;
    for _connection in 0..8 {
        let mut client = support::client(secure.hub.address).await;
        for _ in 0..125 {
            let message = pb::SubscribeRequest {
                subscriber_id: "sink".into(),
                shard_ids: vec![SHARD.into()],
                start: Some(pb::StartPosition { position: Some(pb::start_position::Position::AfterSequence(0)) }),
                ..Default::default()
            };
            match client.subscribe(request(message, &sink)).await {
                Ok(stream) => opened.push(stream),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    assert!(status.message().contains("subscriptions"), "{}", status.message());
                    refused += 1;
                }
            }
        }
    }
    let limit = omnirelay_hub::defaults::MAX_SUBSCRIPTIONS_PER_PRINCIPAL;
    assert_eq!((opened.len(), refused), (limit, 1_000 - limit));
    let memory = &secure.hub.memory;
    assert!(memory.peak() <= memory.limit(), "{} of {}", memory.peak(), memory.limit());
    // Others are served while those streams sit unread.
    let mut client = secure.hub.client().await;
    let producer = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Producer))));
    let granted = client
        .acquire_shard(request(
            pb::AcquireShardRequest { shard_id: SHARD.into(), owner: "node-a".into(), ttl: None },
            &producer,
        ))
        .await
        .expect("the producer is served")
        .into_inner();
    assert!(granted.granted);
    let reader = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Reader))));
    client
        .read_range(request(
            pb::ReadRangeRequest { shard_id: SHARD.into(), from_sequence: 1, to_sequence: 0, limit: 0 },
            &reader,
        ))
        .await
        .expect("the reader is served");
    drop(opened);
    secure.hub.stop().await;
}

/// During a key rotation the hub lists the old and the new public key:
/// tokens signed by either are served, a token signed by any other key is
/// UNAUTHENTICATED and changes nothing.
#[tokio::test]
async fn tokens_signed_by_either_rotation_key_are_served() {
    let db = support::migrated_db().await;
    let secure = secure_hub(&db).await;
    let mut client = secure.hub.client().await;
    let acquire = |owner: &str, credential: &Credential| {
        request(pb::AcquireShardRequest { shard_id: SHARD.into(), owner: owner.into(), ttl: None }, credential)
    };
    let stranger = EncodingKey::from_ec_pem(rcgen::KeyPair::generate().expect("an EC key").serialize_pem().as_bytes())
        .expect("an encoding key");
    let before = tables(&db).await;
    let forged = Credential::Bearer(token(&stranger, claims(principal(HubRole::Producer))));
    let refused = client.acquire_shard(acquire("node-a", &forged)).await.expect_err("another key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert_eq!(tables(&db).await, before, "a forged token changed the database");
    for key in [&secure.key, &secure.next_key] {
        let credential = Credential::Bearer(token(key, claims(principal(HubRole::Producer))));
        let granted = client
            .acquire_shard(acquire("node-a", &credential))
            .await
            .expect("a token signed by a listed key is served")
            .into_inner();
        assert!(granted.granted, "the same principal re-acquires its own lease");
    }
    secure.hub.stop().await;
}

/// A producer over its append rate has its batch refused with
/// RESOURCE_EXHAUSTED naming the limit, after the batch before it was
/// answered; nothing of the refused batch is written, and another producer
/// is served meanwhile.
#[tokio::test]
async fn a_producer_over_its_append_rate_is_refused_and_others_are_served() {
    let db = support::migrated_db().await;
    // One event per thousand seconds after a burst of three: the second
    // batch below cannot be refilled in time, however slow the machine.
    let secure = secure_hub_with(&db, json!({"append_rate": 0.001, "append_burst": 3})).await;
    let mut client = secure.hub.client().await;
    let acquire = |shard: &str, credential: &Credential| {
        request(pb::AcquireShardRequest { shard_id: shard.into(), owner: "owner".into(), ttl: None }, credential)
    };
    let fast = Credential::Bearer(token(&secure.key, claims(principal(HubRole::Producer))));
    let other = Credential::Bearer(token(&secure.key, claims(OTHER_PRODUCER)));
    let other_shard = "resourcelease.other";
    let epoch =
        client.acquire_shard(acquire(SHARD, &fast)).await.expect("acquire").into_inner().lease.expect("a lease").epoch;
    let other_epoch = client
        .acquire_shard(acquire(other_shard, &other))
        .await
        .expect("acquire")
        .into_inner()
        .lease
        .expect("a lease")
        .epoch;

    let frames = vec![batch(SHARD, "p", 1, epoch, &["a", "b", "c"]), batch(SHARD, "p", 2, epoch, &["d"])];
    let mut responses =
        client.append(request(tokio_stream::iter(frames), &fast)).await.expect("the stream opens").into_inner();
    let first = responses.next().await.expect("an answer").expect("the first batch is answered");
    support::ack(first.result.expect("a result"));
    let refused = responses.next().await.expect("an end").expect_err("the second batch is over the rate");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().starts_with("append rate:"), "{}", refused.message());
    assert!(refused.message().contains("0.001 events/s with bursts of 3"), "{}", refused.message());
    assert!(responses.next().await.is_none(), "the stream ended");

    // Another principal has its own bucket.
    let mut responses = client
        .append(request(tokio_stream::iter(vec![batch(other_shard, "q", 1, other_epoch, &["x", "y", "z"])]), &other))
        .await
        .expect("the stream opens")
        .into_inner();
    let answer = responses.next().await.expect("an answer").expect("the other producer is served");
    support::ack(answer.result.expect("a result"));

    let client_db = db.client().await;
    let written: Vec<(String, i64)> = client_db
        .query("SELECT shard_id, head_sequence FROM shards ORDER BY shard_id", &[])
        .await
        .expect("read the shards")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(written, vec![(other_shard.to_string(), 3), (SHARD.to_string(), 3)], "the refused batch was written");
    let events: i64 = client_db.query_one("SELECT count(*) FROM events", &[]).await.expect("count the events").get(0);
    assert_eq!(events, 6, "only the answered batches are in the log");
    secure.hub.stop().await;
}
