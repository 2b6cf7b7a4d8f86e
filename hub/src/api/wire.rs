//! Conversions between the wire contracts (`omnirelay.hub.v1`,
//! `omnirelay.replication.v1`) and the hub's domain types: the one module
//! that knows both. Every value from the network is validated here, and the
//! error names the field.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;

use crate::defaults;
use crate::log::event::{CorruptEvent, LogEvent, NewEvent};
use crate::log::ids::{
    Epoch, InvalidInput, OwnerId, ProducerId, ProducerSeq, Sequence, ShardId, ShardPattern, SubscriberId,
};
use crate::proto::hub::v1 as pb;
use crate::proto::raw::{self, RawEvent};
use crate::proto::replication::v1 as rpb;
use crate::store::{AppendAck, AppendBatch, Checkpoint, ShardLease, Snapshot};

/// Latest `recorded_at` accepted: the end of year 9999, far inside what the
/// store can represent, and no queue records events that far ahead.
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// Validates an append request into a batch: ids, sizes, and every event
/// (see `new_event` for how its stored body is made from the bytes sent).
pub fn append_batch(request: pb::AppendRequest) -> Result<AppendBatch, InvalidInput> {
    let shard = ShardId::parse(request.shard_id)?;
    let producer = ProducerId::parse(request.producer_id)?;
    if request.events.is_empty() {
        return Err(InvalidInput::new("events", "a batch needs at least one event"));
    }
    if request.events.len() > defaults::MAX_BATCH_EVENTS {
        return Err(InvalidInput::new(
            "events",
            format!("{} events in one batch; the limit is {}", request.events.len(), defaults::MAX_BATCH_EVENTS),
        ));
    }
    let events = request
        .events
        .into_iter()
        .enumerate()
        .map(|(index, event)| new_event(&shard, index, event))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AppendBatch {
        shard,
        producer,
        producer_seq: ProducerSeq(request.producer_seq),
        epoch: Epoch(request.epoch),
        expected_first: (request.expected_first_sequence != 0).then_some(Sequence(request.expected_first_sequence)),
        events,
    })
}

/// Fields of a `ReplicationEvent` the log assigns: sequence, epoch,
/// prev_hash and hash. Dropped from what a producer sent; added when an
/// event is served.
const LOG_ASSIGNED_FIELDS: [u32; 4] = [2, 3, 8, 9];

/// The `shard_id` field of a `ReplicationEvent`.
const SHARD_ID_FIELD: u32 = 1;

/// Validates one event (it must decode, name the batch's shard or none,
/// say what happened, and carry its time) and makes its stored body: the
/// bytes the producer sent, fields this build does not know included,
/// without the fields the log assigns, with the batch's `shard_id` first.
/// A producer that encodes canonically and names its shard (as the client
/// does) gets its bytes stored as they are, without a copy.
fn new_event(shard: &ShardId, index: usize, raw: RawEvent) -> Result<NewEvent, InvalidInput> {
    let received = raw.into_bytes();
    let invalid = |field: &'static str, reason: String| InvalidInput::new(field, format!("event {index} {reason}"));
    let event = rpb::ReplicationEvent::decode(received.clone())
        .map_err(|err| invalid("events", format!("does not decode: {err}")))?;
    let fields = raw::fields(&received).map_err(|err| invalid("events", format!("does not parse: {err}")))?;
    if !event.shard_id.is_empty() && event.shard_id != shard.as_str() {
        return Err(invalid(
            "events.shard_id",
            format!("names shard {:?} but the batch is for {shard}", event.shard_id),
        ));
    }
    if event.event.is_none() {
        return Err(invalid("events.event", "says nothing happened (no event set)".to_string()));
    }
    let recorded_at = match &event.recorded_at {
        Some(at) => timestamp("events.recorded_at", at)?,
        None => return Err(invalid("events.recorded_at", "has no recorded_at".to_string())),
    };
    let as_is = fields
        .first()
        .is_some_and(|first| first.tag == SHARD_ID_FIELD && first.value == Some(shard.as_str().as_bytes()))
        && fields[1..].iter().all(|f| f.tag != SHARD_ID_FIELD && !LOG_ASSIGNED_FIELDS.contains(&f.tag));
    let body = if as_is {
        received
    } else {
        let mut body = Vec::with_capacity(received.len() + shard.as_str().len() + 2);
        prost::encoding::string::encode(SHARD_ID_FIELD, &shard.as_str().to_string(), &mut body);
        for field in &fields {
            if field.tag != SHARD_ID_FIELD && !LOG_ASSIGNED_FIELDS.contains(&field.tag) {
                body.extend_from_slice(field.bytes);
            }
        }
        Bytes::from(body)
    };
    if body.len() > defaults::MAX_EVENT_BYTES {
        return Err(invalid(
            "events",
            format!("encodes to {} bytes; the limit is {}", body.len(), defaults::MAX_EVENT_BYTES),
        ));
    }
    Ok(NewEvent { recorded_at, body })
}

/// The wire form of a stored event: its body as stored, followed by the
/// fields the log assigned (a decoder merges them in). The body must decode,
/// or the event is corrupt: readers never serve what they could not read.
pub fn event(shard: &ShardId, event: &LogEvent) -> Result<RawEvent, CorruptEvent> {
    rpb::ReplicationEvent::decode(event.body.clone()).map_err(|err| CorruptEvent {
        shard: shard.clone(),
        sequence: event.sequence,
        reason: format!("its body does not decode: {err}"),
    })?;
    let mut served = Vec::with_capacity(event.body.len() + 2 * (32 + 2) + 2 * 11);
    served.extend_from_slice(&event.body);
    prost::encoding::uint64::encode(2, &event.sequence.0, &mut served);
    prost::encoding::uint64::encode(3, &event.epoch.0, &mut served);
    prost::encoding::bytes::encode(8, &event.prev_hash.as_bytes().to_vec(), &mut served);
    prost::encoding::bytes::encode(9, &event.hash.as_bytes().to_vec(), &mut served);
    Ok(RawEvent::from_bytes(Bytes::from(served)))
}

/// The wire form of an acknowledgement.
pub fn append_ack(ack: &AppendAck) -> pb::AppendAck {
    pb::AppendAck {
        first_sequence: ack.first.0,
        last_sequence: ack.last.0,
        duplicate: ack.duplicate,
        last_hash: Bytes::copy_from_slice(ack.last_hash.as_bytes()),
    }
}

/// The wire form of a lease.
pub fn lease(lease: &ShardLease) -> pb::ShardLease {
    pb::ShardLease {
        shard_id: lease.shard.to_string(),
        owner: lease.owner.as_ref().map(ToString::to_string).unwrap_or_default(),
        epoch: lease.epoch.0,
        head_sequence: lease.head.0,
        expires_at: lease.expires_at.map(to_timestamp),
    }
}

/// The wire form of a checkpoint.
pub fn checkpoint(checkpoint: &Checkpoint) -> pb::Checkpoint {
    pb::Checkpoint {
        subscriber_id: checkpoint.subscriber.to_string(),
        shard_id: checkpoint.shard.to_string(),
        sequence: checkpoint.sequence.0,
        updated_at: Some(to_timestamp(checkpoint.updated_at)),
        hash: checkpoint.hash.map(|hash| Bytes::copy_from_slice(hash.as_bytes())).unwrap_or_default(),
    }
}

/// The wire form of a snapshot, with or without its data.
pub fn snapshot(snapshot: &Snapshot, with_data: bool) -> pb::Snapshot {
    pb::Snapshot {
        shard_id: snapshot.shard.to_string(),
        sequence: snapshot.sequence.0,
        data: if with_data { snapshot.data.clone() } else { Bytes::new() },
        created_at: Some(to_timestamp(snapshot.created_at)),
        hash: Bytes::copy_from_slice(snapshot.hash.as_bytes()),
    }
}

/// A shard id from `field`.
pub fn shard(field: &'static str, value: String) -> Result<ShardId, InvalidInput> {
    ShardId::parse(value).map_err(|err| InvalidInput { field, ..err })
}

/// An owner id from `owner`.
pub fn owner(value: String) -> Result<OwnerId, InvalidInput> {
    OwnerId::parse(value)
}

/// A subscriber id from `subscriber_id`.
pub fn subscriber(value: String) -> Result<SubscriberId, InvalidInput> {
    SubscriberId::parse(value)
}

/// Where a page of `GetCheckpoints` goes on from: `None` for an empty
/// token, else the `(subscriber, shard)` pair the token names. Tokens are
/// `subscriber,shard`, which no id can be confused with (ids never hold ',').
pub fn checkpoint_page_token(token: &str) -> Result<Option<(SubscriberId, ShardId)>, InvalidInput> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || InvalidInput::new("page_token", "not a token this hub answered; pass next_page_token as it came");
    let (subscriber, shard) = token.split_once(',').ok_or_else(invalid)?;
    let subscriber = SubscriberId::parse(subscriber).map_err(|_| invalid())?;
    let shard = ShardId::parse(shard).map_err(|_| invalid())?;
    Ok(Some((subscriber, shard)))
}

/// The `next_page_token` after `last`, the last checkpoint of a page.
pub fn next_checkpoint_page_token(last: &Checkpoint) -> String {
    format!("{},{}", last.subscriber, last.shard)
}

/// A lease length from `ttl`: the default when unset, else within bounds.
pub fn lease_ttl(ttl: Option<prost_types::Duration>) -> Result<Duration, InvalidInput> {
    let Some(ttl) = ttl else { return Ok(defaults::LEASE_TTL) };
    let ttl = duration("ttl", &ttl)?;
    if ttl < defaults::MIN_LEASE_TTL || ttl > defaults::MAX_LEASE_TTL {
        return Err(InvalidInput::new(
            "ttl",
            format!("{ttl:?} is outside {:?} through {:?}", defaults::MIN_LEASE_TTL, defaults::MAX_LEASE_TTL),
        ));
    }
    Ok(ttl)
}

/// A progress interval: the default when unset, else at least the minimum.
pub fn progress_interval(interval: Option<prost_types::Duration>) -> Result<Duration, InvalidInput> {
    let Some(interval) = interval else { return Ok(defaults::PROGRESS_INTERVAL) };
    let interval = duration("progress_interval", &interval)?;
    if interval < defaults::MIN_PROGRESS_INTERVAL {
        return Err(InvalidInput::new(
            "progress_interval",
            format!("{interval:?} is below the minimum {:?}", defaults::MIN_PROGRESS_INTERVAL),
        ));
    }
    Ok(interval)
}

/// Where a subscription starts on each shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After the subscriber's stored checkpoint (from the first event when none).
    Checkpoint,
    /// After this sequence.
    After(Sequence),
    /// From the first event recorded at or after this time.
    Since(SystemTime),
    /// Only events appended from now on.
    Latest,
}

/// What a subscription follows, validated.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Subscriber identity.
    pub subscriber: SubscriberId,
    /// Explicit shards.
    pub shards: Vec<ShardId>,
    /// Pattern, if any.
    pub pattern: Option<ShardPattern>,
    /// Start position.
    pub start: Start,
    /// Idle interval between progress frames.
    pub progress_interval: Duration,
}

/// Validates a subscribe request.
pub fn selection(request: pb::SubscribeRequest) -> Result<Selection, InvalidInput> {
    let subscriber = subscriber(request.subscriber_id)?;
    let shards = request.shard_ids.into_iter().map(|id| shard("shard_ids", id)).collect::<Result<Vec<_>, _>>()?;
    let pattern =
        if request.shard_pattern.is_empty() { None } else { Some(ShardPattern::parse(&request.shard_pattern)?) };
    if shards.is_empty() && pattern.is_none() {
        return Err(InvalidInput::new("shard_ids", "name at least one shard, or a shard_pattern"));
    }
    let start = match request.start.and_then(|s| s.position) {
        None | Some(pb::start_position::Position::FromCheckpoint(_)) => Start::Checkpoint,
        Some(pb::start_position::Position::AfterSequence(sequence)) => Start::After(Sequence(sequence)),
        Some(pb::start_position::Position::Since(at)) => Start::Since(timestamp("start.since", &at)?),
        Some(pb::start_position::Position::Latest(_)) => Start::Latest,
    };
    Ok(Selection {
        subscriber,
        shards,
        pattern,
        start,
        progress_interval: progress_interval(request.progress_interval)?,
    })
}

/// A time from the wire, within the range the store represents.
pub fn timestamp(field: &'static str, at: &prost_types::Timestamp) -> Result<SystemTime, InvalidInput> {
    if !(0..=MAX_TIMESTAMP_SECONDS).contains(&at.seconds) || !(0..1_000_000_000).contains(&at.nanos) {
        return Err(InvalidInput::new(
            field,
            format!("{}s {}ns is outside 1970-01-01 through 9999-12-31", at.seconds, at.nanos),
        ));
    }
    Ok(UNIX_EPOCH + Duration::new(at.seconds as u64, at.nanos as u32))
}

/// A time for the wire.
pub fn to_timestamp(at: SystemTime) -> prost_types::Timestamp {
    match at.duration_since(UNIX_EPOCH) {
        Ok(since) => prost_types::Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32 },
        Err(before) => {
            let before = before.duration();
            let mut timestamp =
                prost_types::Timestamp { seconds: -(before.as_secs() as i64), nanos: -(before.subsec_nanos() as i32) };
            timestamp.normalize();
            timestamp
        }
    }
}

fn duration(field: &'static str, value: &prost_types::Duration) -> Result<Duration, InvalidInput> {
    Duration::try_from(*value)
        .map_err(|_| InvalidInput::new(field, format!("{value:?} is not a valid positive duration")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::event::{ChainHash, chain};

    fn completed(shard: &str) -> rpb::ReplicationEvent {
        rpb::ReplicationEvent {
            shard_id: shard.into(),
            principal: "spiffe://omnirelay/worker".into(),
            recorded_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5 }),
            metadata: [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into(),
            event: Some(rpb::replication_event::Event::Completed(rpb::Completed {
                item_id: "i".into(),
                fencing_token: 3,
            })),
            ..Default::default()
        }
    }

    fn request(events: Vec<rpb::ReplicationEvent>) -> pb::AppendRequest {
        raw_request(events.iter().map(RawEvent::encode).collect())
    }

    fn raw_request(events: Vec<RawEvent>) -> pb::AppendRequest {
        pb::AppendRequest {
            expected_first_sequence: 0,
            batch_id: 1,
            shard_id: "resourcelease.users".into(),
            producer_id: "node-a".into(),
            producer_seq: 4,
            epoch: 2,
            events,
        }
    }

    #[test]
    fn bodies_are_canonical_with_log_fields_cleared() {
        let mut with_log_fields = completed("");
        with_log_fields.sequence = 99;
        with_log_fields.hash = Bytes::from_static(b"forged");
        let a = append_batch(request(vec![completed("resourcelease.users")])).expect("valid");
        let b = append_batch(request(vec![with_log_fields])).expect("valid");
        assert_eq!(a.events, b.events, "log-assigned fields and an empty shard id do not change the body");
        let decoded = rpb::ReplicationEvent::decode(a.events[0].body.clone()).expect("decodes");
        assert_eq!(decoded.shard_id, "resourcelease.users");
        assert_eq!((decoded.sequence, decoded.hash.len()), (0, 0));
        assert_eq!(a.events[0].recorded_at, UNIX_EPOCH + Duration::new(1_700_000_000, 5));
    }

    #[test]
    fn served_events_carry_the_log_fields_and_match_the_documented_hash() {
        let batch = append_batch(request(vec![completed("")])).expect("valid");
        let stored = chain(ChainHash::ZERO, Sequence(1), Epoch(2), &batch.events);
        let served = event(&batch.shard, &stored[0]).expect("decodes").decode().expect("an ordinary message");
        assert_eq!((served.sequence, served.epoch), (1, 2));
        assert_eq!(served.prev_hash.as_ref(), &[0u8; 32]);
        // A client recomputes the hash from the served message alone.
        let mut body = served.clone();
        body.sequence = 0;
        body.epoch = 0;
        body.prev_hash = Bytes::new();
        body.hash = Bytes::new();
        let recomputed = ChainHash::compute(&ChainHash::ZERO, Sequence(1), Epoch(2), &body.encode_to_vec());
        assert_eq!(served.hash.as_ref(), recomputed.as_bytes());
    }

    #[test]
    fn fields_this_build_does_not_know_are_stored_hashed_and_served() {
        // A newer producer adds field 50; the hub stores and hashes the bytes
        // it received (without the log's fields), and serves them back.
        let mut sent = completed("resourcelease.users").encode_to_vec();
        prost::encoding::string::encode(50, &"from a newer producer".to_string(), &mut sent);
        prost::encoding::uint64::encode(2, &77, &mut sent); // a forged sequence, dropped
        let batch = append_batch(raw_request(vec![RawEvent::from_bytes(Bytes::from(sent.clone()))])).expect("valid");
        let body = &batch.events[0].body;
        let tags: Vec<u32> = raw::fields(body).expect("parses").iter().map(|f| f.tag).collect();
        assert!(tags.contains(&50), "the unknown field is stored: {tags:?}");
        assert!(!tags.contains(&2), "the log's fields are not: {tags:?}");
        assert_eq!(body.as_ref(), &sent[..sent.len() - 2], "otherwise the bytes are as sent");
        let stored = chain(ChainHash::ZERO, Sequence(1), Epoch(2), &batch.events);
        assert_eq!(stored[0].hash, ChainHash::compute(&ChainHash::ZERO, Sequence(1), Epoch(2), body));
        let served = event(&batch.shard, &stored[0]).expect("serves");
        assert!(served.as_slice().starts_with(body), "served as stored, the log's fields after");
        let served_tags: Vec<u32> = raw::fields(served.as_slice()).expect("parses").iter().map(|f| f.tag).collect();
        assert!(served_tags.contains(&50));
    }

    #[test]
    fn a_canonical_event_naming_its_shard_is_stored_without_a_copy() {
        let sent = Bytes::from(completed("resourcelease.users").encode_to_vec());
        let batch = append_batch(raw_request(vec![RawEvent::from_bytes(sent.clone())])).expect("valid");
        assert_eq!(batch.events[0].body.as_ptr(), sent.as_ptr(), "the very bytes received");
    }

    #[test]
    fn bad_batches_name_the_field() {
        let cases: Vec<(pb::AppendRequest, &str)> = vec![
            (pb::AppendRequest { shard_id: String::new(), ..request(vec![completed("")]) }, "shard_id"),
            (pb::AppendRequest { producer_id: "a b".into(), ..request(vec![completed("")]) }, "producer_id"),
            (request(Vec::new()), "events"),
            (request(vec![completed("resourcelease.other")]), "events.shard_id"),
            (request(vec![rpb::ReplicationEvent { event: None, ..completed("") }]), "events.event"),
            (request(vec![rpb::ReplicationEvent { recorded_at: None, ..completed("") }]), "events.recorded_at"),
            (
                request(vec![rpb::ReplicationEvent {
                    recorded_at: Some(prost_types::Timestamp { seconds: -1, nanos: 0 }),
                    ..completed("")
                }]),
                "events.recorded_at",
            ),
        ];
        for (request, field) in cases {
            let err = append_batch(request).expect_err("invalid batch");
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn subscriptions_need_a_selection_and_valid_start() {
        let base = pb::SubscribeRequest { subscriber_id: "sink".into(), ..Default::default() };
        assert_eq!(selection(base.clone()).expect_err("no shards").field, "shard_ids");
        let ok = selection(pb::SubscribeRequest { shard_pattern: "resourcelease.*".into(), ..base.clone() })
            .expect("pattern only");
        assert_eq!(ok.start, Start::Checkpoint);
        assert_eq!(ok.progress_interval, defaults::PROGRESS_INTERVAL);
        let err = selection(pb::SubscribeRequest {
            shard_ids: vec!["a".into()],
            progress_interval: Some(prost_types::Duration { seconds: 0, nanos: 1 }),
            ..base.clone()
        })
        .expect_err("too frequent");
        assert_eq!(err.field, "progress_interval");
        let err = selection(pb::SubscribeRequest { shard_ids: vec!["".into()], ..base }).expect_err("empty id");
        assert_eq!(err.field, "shard_ids");
    }

    #[test]
    fn lease_ttls_are_bounded() {
        assert_eq!(lease_ttl(None).expect("default"), defaults::LEASE_TTL);
        let err = lease_ttl(Some(prost_types::Duration { seconds: 0, nanos: 1_000 })).expect_err("too short");
        assert_eq!(err.field, "ttl");
        assert!(lease_ttl(Some(prost_types::Duration { seconds: -5, nanos: 0 })).is_err());
    }
}

/// Arbitrary bytes where the network puts them: every decoder and validator
/// answers (a value or an error naming the field) and never panics. A
/// stable-toolchain stand-in for the `cargo fuzz` targets issue 11 asks for.
#[cfg(test)]
mod arbitrary_input {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn append_frames_and_events_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..512),
                                                event in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(request) = pb::AppendRequest::decode(Bytes::from(frame)) {
                let _ = append_batch(request);
            }
            let request = pb::AppendRequest {
                expected_first_sequence: 0,
                batch_id: 1,
                shard_id: "resourcelease.users".into(),
                producer_id: "node-a".into(),
                producer_seq: 1,
                epoch: 1,
                events: vec![RawEvent::from_bytes(Bytes::from(event))],
            };
            if let Err(err) = append_batch(request) {
                prop_assert!(err.field.starts_with("events"), "{err}");
            }
        }

        #[test]
        fn unary_requests_and_page_tokens_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256),
                                                      token in ".{0,64}") {
            if let Ok(request) = pb::SubscribeRequest::decode(Bytes::from(bytes.clone())) {
                let _ = selection(request);
            }
            if let Ok(request) = pb::AcquireShardRequest::decode(Bytes::from(bytes)) {
                let _ = shard("shard_id", request.shard_id);
                let _ = owner(request.owner);
                let _ = lease_ttl(request.ttl);
            }
            if let Err(err) = checkpoint_page_token(&token) {
                prop_assert_eq!(err.field, "page_token");
            }
        }
    }
}
