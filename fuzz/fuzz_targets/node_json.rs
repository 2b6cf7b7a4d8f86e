//! The node's HTTP/JSON forms: every request form decodes or is refused
//! naming a path, and what decodes encodes back to JSON that decodes to the
//! same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use omnirelay_client::node::json::{self, JsonMessage};
use omnirelay_proto::resourcelease::v1 as pb;

fn round_trip<M: JsonMessage + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(message) = json::decode::<M>(data) {
        let encoded = json::encode(&message);
        let again = json::decode::<M>(&encoded).expect("what the node encodes, it decodes");
        assert_eq!(again, message, "the round trip changed the message");
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<pb::EnqueueRequest>(data);
    round_trip::<pb::LeaseRequest>(data);
    round_trip::<pb::HeartbeatRequest>(data);
    round_trip::<pb::CompleteRequest>(data);
    round_trip::<pb::FailRequest>(data);
    round_trip::<pb::RestoreRequest>(data);
    round_trip::<pb::ListDeadLettersRequest>(data);
    round_trip::<pb::RedriveDeadLetterRequest>(data);
    round_trip::<pb::PurgeDeadLettersRequest>(data);
    round_trip::<pb::DrainRequest>(data);
});
