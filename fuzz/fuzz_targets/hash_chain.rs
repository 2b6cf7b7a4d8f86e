//! The hash-chain verifier: rows built from the input (some chained
//! correctly, some with a changed body, hash, sequence or link) are linked
//! as a store links them and verified. A chain built by `chain` always
//! verifies; any change the input makes to it is always caught. Operator
//! anchors (`SHARD@SEQUENCE=HASH`) parse or fail without panicking.
#![no_main]

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use omnirelay_hub::event::{self, ChainHash, NewEvent, StoredRow};
use omnirelay_hub::ids::{Epoch, Sequence, ShardId};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<omnirelay_hub::verify::Anchor>();
    }
    let Some((&head, rest)) = data.split_first() else { return };
    let shard = ShardId::parse("resourcelease.fuzz").expect("valid");
    let first = Sequence(u64::from(head % 8) + 1);
    let anchor = if head & 0x80 == 0 { ChainHash::ZERO } else { ChainHash::compute(&ChainHash::ZERO, Sequence(9), Epoch(1), rest) };
    // Bodies: the input cut into pieces of up to 16 bytes.
    let events: Vec<NewEvent> = rest
        .chunks(16)
        .take(64)
        .map(|body| NewEvent { recorded_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1), body: Bytes::copy_from_slice(body) })
        .collect();
    let chained = event::chain(anchor, first, Epoch(u64::from(head)), &events);
    let rows: Vec<StoredRow> = chained
        .iter()
        .map(|e| StoredRow { sequence: e.sequence, epoch: e.epoch, recorded_at: e.recorded_at, body: e.body.clone(), hash: Bytes::copy_from_slice(e.hash.as_bytes()) })
        .collect();
    let linked = event::link(anchor, rows.clone());
    assert_eq!(event::verify(&shard, first, &anchor, &linked), Ok(()), "an untouched chain verifies");
    if rows.is_empty() {
        return;
    }
    // One change, chosen by the input: it must be caught.
    let at = usize::from(head) % rows.len();
    let mut changed = rows;
    match head % 4 {
        0 => {
            let mut body = changed[at].body.to_vec();
            body.push(head);
            changed[at].body = Bytes::from(body);
        }
        1 => {
            let mut hash = changed[at].hash.to_vec();
            hash[usize::from(head) % 32] ^= 1;
            changed[at].hash = Bytes::from(hash);
        }
        2 => changed[at].sequence = Sequence(changed[at].sequence.0 + 1),
        _ => {
            changed.remove(at);
            if changed.is_empty() || at == changed.len() {
                // Dropping the last event leaves a valid shorter chain.
                return;
            }
        }
    }
    let linked = event::link(anchor, changed);
    assert!(event::verify(&shard, first, &anchor, &linked).is_err(), "a changed chain verifies (change {})", head % 4);
});
