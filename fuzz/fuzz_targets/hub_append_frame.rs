//! The hub's protobuf decoders and validation: an append frame as the
//! stream reads it, then the batch and event checks; unary requests and the
//! checkpoint page token. Nothing may panic, and every refusal names a field.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::wire;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(request) = pb::AppendRequest::decode(bytes.clone()) {
        if let Err(err) = wire::append_batch(request) {
            assert!(!err.field.is_empty(), "a refusal names its field: {err}");
        }
    }
    // The same bytes as one event's body in an otherwise valid batch.
    let request = pb::AppendRequest {
        expected_first_sequence: 0,
        batch_id: 1,
        shard_id: "resourcelease.users".into(),
        producer_id: "node-a".into(),
        producer_seq: 1,
        epoch: 1,
        events: vec![omnirelay_proto::raw::RawEvent::from_bytes(bytes.clone())],
    };
    if let Err(err) = wire::append_batch(request) {
        assert!(err.field.starts_with("events"), "{err}");
    }
    if let Ok(request) = pb::SubscribeRequest::decode(bytes.clone()) {
        let _ = wire::selection(request);
    }
    if let Ok(request) = pb::AcquireShardRequest::decode(bytes.clone()) {
        if let Ok(shard) = wire::shard("shard_id", request.shard_id) {
            let _ = shard.check_new();
        }
        let _ = wire::owner(request.owner);
        let _ = wire::lease_ttl(request.ttl);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(err) = wire::checkpoint_page_token(text) {
            assert_eq!(err.field, "page_token");
        }
        let _ = omnirelay_proto::names::check_shard_name(text);
    }
});
