//! The JSON form of events and snapshots, as the NDJSON sink writes them and
//! `omnirelay tail --output json` prints them: one object per event, with
//! the envelope (`shard`, `sequence`, `epoch`, `hash`, `prev_hash` in hex,
//! `principal`, `peer_id`, `recorded_at` in RFC 3339, `metadata`), the
//! idempotence `key`, the event's `type` (snake case, e.g. `enqueued`) and
//! its fields under `data`. Item bodies are base64.

use base64::Engine as _;
use omnirelay_proto::Timestamp;
use omnirelay_proto::replication::v1::replication_event::Event as Kind;
use omnirelay_proto::resourcelease::v1 as pb;
use serde_json::{Value, json};

use super::{SinkEvent, SinkSnapshot};

/// An event as one JSON object. See the [module docs](self).
pub fn event(event: &SinkEvent) -> Value {
    let e = &event.event;
    let (kind, data) = kind(e.event.as_ref());
    json!({
        "key": event.idempotence_key(),
        "shard": e.shard_id,
        "sequence": e.sequence,
        "epoch": e.epoch,
        "type": kind,
        "principal": e.principal,
        "peer_id": e.peer_id,
        "recorded_at": time(e.recorded_at.as_ref()),
        "metadata": e.metadata,
        "data": data,
        "prev_hash": hex(&e.prev_hash),
        "hash": hex(&e.hash),
    })
}

/// A snapshot as one JSON object of `type` `snapshot`, its items listed.
pub fn snapshot(snapshot: &SinkSnapshot) -> Value {
    let items: Vec<Value> = snapshot.state.items.iter().filter_map(|q| q.item.as_ref()).map(item).collect();
    let dead_letters: Vec<Value> =
        snapshot.state.dead_letters.iter().filter_map(|d| d.dead_letter.as_ref()?.item.as_ref()).map(item).collect();
    json!({
        "key": format!("{}/{}", snapshot.shard, snapshot.sequence),
        "shard": snapshot.shard.as_str(),
        "sequence": snapshot.sequence.get(),
        "type": "snapshot",
        "data": { "items": items, "dead_letters": dead_letters, "draining": snapshot.state.draining },
        "hash": hex(&snapshot.hash),
    })
}

/// The event's type name and fields.
fn kind(kind: Option<&Kind>) -> (&'static str, Value) {
    match kind {
        None => ("unknown", Value::Null),
        Some(Kind::Enqueued(e)) => ("enqueued", json!({ "item": e.item.as_ref().map(item) })),
        Some(Kind::Leased(e)) => (
            "leased",
            json!({ "item_id": e.item_id, "attempt": e.attempt, "lease_id": e.lease_id, "owner": e.owner,
                    "expires_at": time(e.expires_at.as_ref()) }),
        ),
        Some(Kind::Heartbeat(e)) => (
            "heartbeat",
            json!({ "item_id": e.item_id, "fencing_token": e.fencing_token,
                    "expires_at": time(e.expires_at.as_ref()), "progress": e.progress }),
        ),
        Some(Kind::Completed(e)) => ("completed", json!({ "item_id": e.item_id, "fencing_token": e.fencing_token })),
        Some(Kind::Failed(e)) => {
            ("failed", json!({ "item_id": e.item_id, "fencing_token": e.fencing_token, "error": e.error }))
        }
        Some(Kind::Requeued(e)) => {
            ("requeued", json!({ "item_id": e.item_id, "not_before": time(e.not_before.as_ref()), "reason": e.reason }))
        }
        Some(Kind::Expired(e)) => {
            ("expired", json!({ "item_id": e.item_id, "fencing_token": e.fencing_token, "owner": e.owner }))
        }
        Some(Kind::DeadLettered(e)) => ("dead_lettered", json!({ "item_id": e.item_id, "reason": e.reason })),
        Some(Kind::Redriven(e)) => {
            ("redriven", json!({ "item_id": e.item_id, "not_before": time(e.not_before.as_ref()) }))
        }
        Some(Kind::DeadLettersPurged(e)) => ("dead_letters_purged", json!({ "item_ids": e.item_ids })),
        Some(Kind::DrainedPurged(e)) => ("drained_purged", json!({ "item_ids": e.item_ids })),
        Some(Kind::DrainStarted(e)) => {
            ("drain_started", json!({ "mode": pb::DrainMode::try_from(e.mode).map_or("unknown", |m| m.as_str_name()) }))
        }
        Some(Kind::Drained(e)) => ("drained", json!({ "pending": e.pending, "in_flight": e.in_flight })),
        Some(Kind::Resumed(_)) => ("resumed", json!({})),
        Some(Kind::Restored(e)) => {
            ("restored", json!({ "items": e.items.iter().map(item).collect::<Vec<_>>(), "skipped": e.skipped }))
        }
        Some(Kind::BackpressureChanged(e)) => (
            "backpressure_changed",
            match &e.signal {
                Some(s) => json!({ "active": s.active, "pending": s.pending, "high": s.high, "low": s.low,
                                   "observed_at": time(s.observed_at.as_ref()) }),
                None => Value::Null,
            },
        ),
    }
}

/// An item's identity, payload and queue fields (not its attempt history).
fn item(item: &pb::WorkItem) -> Value {
    let payload = item.payload.clone().unwrap_or_default();
    json!({
        "item_id": item.item_id,
        "resource_type": payload.resource_type,
        "resource_id": payload.resource_id,
        "partition_key": payload.partition_key,
        "request_id": payload.request_id,
        "attributes": payload.attributes,
        "body": base64::engine::general_purpose::STANDARD.encode(&payload.body),
        "priority": item.priority,
        "attempt": item.attempt,
        "enqueued_at": time(item.enqueued_at.as_ref()),
        "not_before": time(item.not_before.as_ref()),
        "last_error": item.last_error,
    })
}

/// RFC 3339 with nanoseconds, or null when unset or out of range.
pub fn time(at: Option<&Timestamp>) -> Value {
    let Some(at) = at else { return Value::Null };
    let nanos = i128::from(at.seconds) * 1_000_000_000 + i128::from(at.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use omnirelay_proto::replication::v1 as rpb;

    use super::*;
    use crate::ids::Sequence;

    #[test]
    fn an_event_renders_its_envelope_type_and_fields() {
        let raw = rpb::ReplicationEvent {
            shard_id: "resourcelease.users".into(),
            sequence: 7,
            epoch: 2,
            principal: "spiffe://w".into(),
            recorded_at: Some(Timestamp { seconds: 1_700_000_000, nanos: 5 }),
            event: Some(Kind::Completed(rpb::Completed { item_id: "i-1".into(), fencing_token: 6 })),
            hash: Bytes::from_static(&[0xab; 32]),
            ..Default::default()
        };
        let event = SinkEvent {
            shard: "resourcelease.users".into(),
            sequence: Sequence::new(7),
            hash: raw.hash.clone(),
            raw: Bytes::new(),
            event: raw,
        };
        let value = super::event(&event);
        assert_eq!(value["key"], "resourcelease.users/7");
        assert_eq!(value["type"], "completed");
        assert_eq!(value["data"]["fencing_token"], 6);
        assert_eq!(value["recorded_at"], "2023-11-14T22:13:20.000000005Z");
        assert_eq!(value["hash"].as_str().map(str::len), Some(64));
    }
}
