//! Bad input from an outside client written from the protos alone: frames
//! that do not decode, positions past the head, renewals by a non-holder.
//! Each is refused with the code the contracts promise, naming what was
//! wrong, and changes nothing.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use omnirelay_hub::Config;
use omnirelay_hub::proto::hub::v1 as pb;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::support::{self, Appender, TestHub, ack, acquire, batch};

const LONG: Duration = Duration::from_secs(60);

/// Sends frames as given bytes, decodes answers as `T`: a client that can
/// send what no generated client would.
struct RawCodec<T>(std::marker::PhantomData<T>);

impl<T> Default for RawCodec<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

struct RawEncoder;
struct TypedDecoder<T>(std::marker::PhantomData<T>);

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl<T: Message + Default + Send + 'static> Decoder for TypedDecoder<T> {
    type Item = T;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<T>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        T::decode(bytes).map(Some).map_err(|err| tonic::Status::internal(err.to_string()))
    }
}

impl<T: Message + Default + Send + 'static> Codec for RawCodec<T> {
    type Encode = Bytes;
    type Decode = T;
    type Encoder = RawEncoder;
    type Decoder = TypedDecoder<T>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> TypedDecoder<T> {
        TypedDecoder(std::marker::PhantomData)
    }
}

/// A frame that is no `AppendRequest` (nor any message): field 2, length
/// delimited, claiming 127 bytes that never come.
const GARBAGE: &[u8] = &[0x12, 0x7f, 0x01];

async fn raw_grpc(address: std::net::SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("a valid endpoint")
        .connect()
        .await
        .expect("connect to the hub");
    tonic::client::Grpc::new(channel)
}

/// A valid batch, then a frame that does not decode: the batch is answered,
/// then the stream ends with INVALID_ARGUMENT naming the frame (never OK).
async fn bad_frame_ends_the_stream(hub: &TestHub) {
    let mut client = hub.client().await;
    let shard = "resourcelease.hostile";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut grpc = raw_grpc(hub.address).await;
    grpc.ready().await.expect("the channel should be ready");
    let (frames, outbound) = mpsc::channel::<Bytes>(4);
    frames.send(Bytes::from(batch(shard, "p", 1, epoch, &["a"]).encode_to_vec())).await.expect("queued");
    frames.send(Bytes::from_static(GARBAGE)).await.expect("queued");
    let path = http::uri::PathAndQuery::from_static("/omnirelay.hub.v1.Hub/Append");
    let mut answers = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(outbound)), path, RawCodec::<pb::AppendResponse>::default())
        .await
        .expect("the stream opens")
        .into_inner();
    let first = tokio::time::timeout(LONG, answers.message())
        .await
        .expect("an answer in time")
        .expect("the valid batch is answered before the stream ends")
        .expect("an answer, not the end");
    let acked = ack(first.result.expect("a result"));
    assert_eq!((first.batch_id, acked.first_sequence), (1, 1));
    let end = tokio::time::timeout(LONG, answers.message()).await.expect("the stream ends in time");
    let status = end.expect_err("the stream must not end OK after an undecodable frame");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("frame 2") && status.message().contains("batch_id 1"), "{}", status.message());
    drop(frames);
    // The stream's end changed nothing: the batch is stored once, and the
    // next stream appends after it.
    let mut appender = Appender::open(&mut client).await;
    assert_eq!(ack(appender.append(batch(shard, "p", 2, epoch, &["b"])).await).first_sequence, 2);
}

#[tokio::test]
async fn an_undecodable_append_frame_ends_the_stream_with_invalid_argument() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    bad_frame_ends_the_stream(&hub).await;
    hub.stop().await;
}

#[tokio::test]
async fn an_undecodable_append_frame_ends_the_stream_on_the_embedded_store_too() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = Config { retention_interval: None, ..Config::for_sqlite(dir.path().join("hub.db")) };
    let hub = TestHub::start_with(config).await;
    bad_frame_ends_the_stream(&hub).await;
    hub.stop().await;
}

#[tokio::test]
async fn a_frame_over_the_size_limit_ends_the_stream_with_invalid_argument_after_the_batches_before_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = Config { retention_interval: None, ..Config::for_sqlite(dir.path().join("hub.db")) };
    let hub = TestHub::start_with(config).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.oversized";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut grpc = raw_grpc(hub.address).await.max_encoding_message_size(usize::MAX);
    grpc.ready().await.expect("the channel should be ready");
    let (frames, outbound) = mpsc::channel::<Bytes>(4);
    frames.send(Bytes::from(batch(shard, "p", 1, epoch, &["a"]).encode_to_vec())).await.expect("queued");
    frames.send(Bytes::from(vec![0u8; omnirelay_hub::defaults::MAX_MESSAGE_BYTES + 1])).await.expect("queued");
    let path = http::uri::PathAndQuery::from_static("/omnirelay.hub.v1.Hub/Append");
    let mut answers = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(outbound)), path, RawCodec::<pb::AppendResponse>::default())
        .await
        .expect("the stream opens")
        .into_inner();
    let first =
        tokio::time::timeout(LONG, answers.message()).await.expect("in time").expect("answered").expect("a frame");
    assert_eq!(ack(first.result.expect("a result")).first_sequence, 1);
    let status = tokio::time::timeout(LONG, answers.message()).await.expect("in time").expect_err("not an OK end");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("frame 2"), "{}", status.message());
    drop(frames);
    hub.stop().await;
}

#[tokio::test]
async fn an_undecodable_unary_request_is_invalid_argument_not_internal() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut grpc = raw_grpc(hub.address).await;
    grpc.ready().await.expect("the channel should be ready");
    let path = http::uri::PathAndQuery::from_static("/omnirelay.hub.v1.Hub/AcquireShard");
    let status = grpc
        .unary(tonic::Request::new(Bytes::from_static(GARBAGE)), path, RawCodec::<pb::AcquireShardResponse>::default())
        .await
        .expect_err("garbage is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("request: failed to decode"), "{}", status.message());
    let shards: i64 =
        db.client().await.query_one("SELECT count(*) FROM shards", &[]).await.expect("count shards").get(0);
    assert_eq!(shards, 0, "nothing changed");
    hub.stop().await;
}

#[tokio::test]
async fn positions_past_the_head_are_out_of_range_for_subscriptions_and_checkpoints() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.ahead";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    ack(appender.append(batch(shard, "p", 1, epoch, &["a", "b"])).await);
    let subscribe = |after: u64| pb::SubscribeRequest {
        subscriber_id: "sink".into(),
        shard_ids: vec![shard.into()],
        start: Some(pb::StartPosition { position: Some(pb::start_position::Position::AfterSequence(after)) }),
        ..Default::default()
    };
    let status = client.subscribe(subscribe(1000)).await.map(|_| ()).expect_err("far past the head");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().starts_with("start.after_sequence: 1000 is past the head 2"), "{}", status.message());
    let status = client
        .commit_checkpoint(pb::CommitCheckpointRequest {
            subscriber_id: "sink".into(),
            shard_id: shard.into(),
            sequence: 1000,
            hash: Bytes::new(),
        })
        .await
        .expect_err("far past the head");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().starts_with("sequence: 1000 is past the head 2"), "{}", status.message());
    // At the head is fine: the subscription waits for the next event.
    client.subscribe(subscribe(2)).await.expect("at the head");
    let checkpoints = client
        .get_checkpoints(pb::GetCheckpointsRequest { subscriber_id: "sink".into(), ..Default::default() })
        .await
        .expect("read checkpoints")
        .into_inner();
    assert!(checkpoints.checkpoints.is_empty(), "the refused commit stored nothing");
    hub.stop().await;
}

#[tokio::test]
async fn renewing_or_releasing_another_holders_lease_is_aborted_and_changes_nothing() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.held";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let status = client
        .renew_shard(pb::RenewShardRequest { shard_id: shard.into(), owner: "node-b".into(), epoch, ttl: None })
        .await
        .expect_err("node-b does not hold it");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(!status.message().contains("no lease holder"), "{}", status.message());
    let released = client
        .release_shard(pb::ReleaseShardRequest { shard_id: shard.into(), owner: "node-b".into(), epoch })
        .await
        .expect("a release by a non-holder answers false")
        .into_inner();
    assert!(!released.released);
    let row = db
        .client()
        .await
        .query_one("SELECT owner, epoch FROM shards WHERE shard_id = $1", &[&shard])
        .await
        .expect("read the shard");
    assert_eq!((row.get::<_, Option<String>>(0).as_deref(), row.get::<_, i64>(1)), (Some("node-a"), epoch as i64));
    hub.stop().await;
}

#[tokio::test]
async fn get_checkpoints_answers_in_pages_and_refuses_a_forged_token() {
    let db = support::migrated_db().await;
    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let shard = "resourcelease.paged";
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    ack(appender.append(batch(shard, "p", 1, epoch, &["a"])).await);
    for sink in ["s1", "s2", "s3", "s4", "s5"] {
        client
            .commit_checkpoint(pb::CommitCheckpointRequest {
                subscriber_id: sink.into(),
                shard_id: shard.into(),
                sequence: 1,
                hash: Bytes::new(),
            })
            .await
            .expect("commit");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .get_checkpoints(pb::GetCheckpointsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("a page")
            .into_inner();
        pages += 1;
        assert!(page.checkpoints.len() <= 2);
        seen.extend(page.checkpoints.iter().map(|c| c.subscriber_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        (pages, seen),
        (3, vec!["s1", "s2", "s3", "s4", "s5"].into_iter().map(String::from).collect::<Vec<_>>())
    );
    let status = client
        .get_checkpoints(pb::GetCheckpointsRequest { page_token: "no-comma".into(), ..Default::default() })
        .await
        .expect_err("a forged token");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("page_token:"), "{}", status.message());
    hub.stop().await;
}

/// New shards follow the shard-name grammar the nodes share
/// (`omnirelay_proto::names`); a shard created under the hub's older, wider
/// grammar (printable ASCII up to 200 bytes) is still served: acquired,
/// appended to and read.
#[tokio::test]
async fn new_shards_follow_the_shared_grammar_and_older_names_are_still_served() {
    use omnirelay_hub::ids::{OwnerId, ShardId};
    use omnirelay_hub::store::LogStore as _;
    let db = support::migrated_db().await;
    // A shard the older grammar allowed, created as the hub used to.
    let legacy = "Tenant:42/Jobs";
    let store = support::store(&db).await;
    let grant = store
        .acquire_shard(ShardId::parse(legacy).expect("old grammar"), OwnerId::parse("old").expect("owner"), LONG)
        .await
        .expect("the store creates it");
    assert!(
        store
            .release_shard(grant.lease.shard.clone(), OwnerId::parse("old").expect("owner"), grant.lease.epoch)
            .await
            .expect("release")
    );
    store.close().await.expect("close");

    let hub = TestHub::start(db.url()).await;
    let mut client = hub.client().await;
    let sql = db.client().await;
    let shards = || async {
        let rows = sql.query("SELECT shard_id FROM shards ORDER BY shard_id", &[]).await.expect("read");
        rows.iter().map(|row| row.get::<_, String>(0)).collect::<Vec<_>>()
    };
    let before = shards().await;
    assert_eq!(before, [legacy]);
    for bad in ["Tenant:43/Jobs", "resourcelease.Users", "resourcelease..users", &format!("a.{}", "b".repeat(130))] {
        let status = client
            .acquire_shard(pb::AcquireShardRequest { shard_id: bad.into(), owner: "node-a".into(), ttl: None })
            .await
            .expect_err(bad);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}: {status:?}");
        assert!(status.message().starts_with("shard_id: "), "{}", status.message());
        assert!(status.message().contains("a new shard needs a shard name"), "{}", status.message());
    }
    assert_eq!(shards().await, before, "a refused name created a shard");

    let epoch = acquire(&mut client, legacy, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    ack(appender.append(batch(legacy, "p", 1, epoch, &["a"])).await);
    let events = client
        .read_range(pb::ReadRangeRequest { shard_id: legacy.into(), from_sequence: 1, to_sequence: 0, limit: 0 })
        .await
        .expect("the old shard is read")
        .into_inner();
    assert_eq!(events.events.len(), 1);
    hub.stop().await;
}
