//! The JSON form of events and snapshots, as the NDJSON sink writes them and
//! `omnirelay tail --output json` prints them: one object per event, with
//! the envelope (`shard`, `sequence`, `epoch`, `hash`, `prev_hash` in hex,
//! `principal`, `peer_id`, `recorded_at` in RFC 3339, `metadata`), the
//! idempotence `key`, the event's `type` (snake case, e.g. `enqueued`) and
//! its fields under `data`. Item bodies are base64. The keys of every
//! object are in byte order.
//!
//! [`write_event`] writes an event's JSON straight from the decoded event
//! (serde views that borrow its fields, declared with their keys in order):
//! no `serde_json::Value` tree is built per event, which was most of the
//! NDJSON sink's own cost per event. [`event`] builds the same object as a
//! `Value`, for callers that pick fields out of it.

use std::collections::BTreeMap;
use std::fmt;

use omnirelay_proto::Timestamp;
use omnirelay_proto::replication::v1 as rpb;
use omnirelay_proto::replication::v1::replication_event::Event as Kind;
use omnirelay_proto::resourcelease::v1 as pb;
use serde::Serialize;
use serde::ser::{SerializeMap as _, Serializer};
use serde_json::{Value, json};

use super::{SinkEvent, SinkSnapshot};

/// Writes an event as one JSON object (no newline) to `out`. See the
/// [module docs](self).
pub fn write_event(out: &mut Vec<u8>, event: &SinkEvent) -> serde_json::Result<()> {
    serde_json::to_writer(out, &EventView::new(event))
}

/// An event as one JSON object. See the [module docs](self).
pub fn event(event: &SinkEvent) -> Value {
    serde_json::to_value(EventView::new(event)).expect("an event view should always serialize: its keys are strings")
}

/// A snapshot as one JSON object of `type` `snapshot`, its items listed.
pub fn snapshot(snapshot: &SinkSnapshot) -> Value {
    let items: Vec<ItemView<'_>> =
        snapshot.state.items.iter().filter_map(|q| q.item.as_ref()).map(ItemView::new).collect();
    let dead_letters: Vec<ItemView<'_>> = snapshot
        .state
        .dead_letters
        .iter()
        .filter_map(|d| d.dead_letter.as_ref()?.item.as_ref())
        .map(ItemView::new)
        .collect();
    json!({
        "key": format!("{}/{}", snapshot.shard, snapshot.sequence),
        "shard": snapshot.shard.as_str(),
        "sequence": snapshot.sequence.get(),
        "type": "snapshot",
        "data": { "items": items, "dead_letters": dead_letters, "draining": snapshot.state.draining },
        "hash": hex(&snapshot.hash),
    })
}

/// An event's envelope; the fields are declared in key order.
#[derive(Serialize)]
struct EventView<'a> {
    data: Data<'a>,
    epoch: u64,
    hash: Hex<'a>,
    key: Key<'a>,
    metadata: &'a BTreeMap<String, String>,
    peer_id: &'a str,
    prev_hash: Hex<'a>,
    principal: &'a str,
    recorded_at: Time<'a>,
    sequence: u64,
    shard: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl<'a> EventView<'a> {
    fn new(event: &'a SinkEvent) -> Self {
        let e = &event.event;
        Self {
            data: Data(e.event.as_ref()),
            epoch: e.epoch,
            hash: Hex(&e.hash),
            key: Key(event),
            metadata: &e.metadata,
            peer_id: &e.peer_id,
            prev_hash: Hex(&e.prev_hash),
            principal: &e.principal,
            recorded_at: Time(e.recorded_at.as_ref()),
            sequence: e.sequence,
            shard: &e.shard_id,
            kind: kind_name(e.event.as_ref()),
        }
    }
}

/// The idempotence key, `{shard}/{sequence}`, written without a `String`.
struct Key<'a>(&'a SinkEvent);

impl Serialize for Key<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}/{}", self.0.shard, self.0.sequence))
    }
}

/// The event's type name.
fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        None => "unknown",
        Some(Kind::Enqueued(_)) => "enqueued",
        Some(Kind::Leased(_)) => "leased",
        Some(Kind::Heartbeat(_)) => "heartbeat",
        Some(Kind::Completed(_)) => "completed",
        Some(Kind::Failed(_)) => "failed",
        Some(Kind::Requeued(_)) => "requeued",
        Some(Kind::Expired(_)) => "expired",
        Some(Kind::DeadLettered(_)) => "dead_lettered",
        Some(Kind::Redriven(_)) => "redriven",
        Some(Kind::DeadLettersPurged(_)) => "dead_letters_purged",
        Some(Kind::DrainedPurged(_)) => "drained_purged",
        Some(Kind::DrainStarted(_)) => "drain_started",
        Some(Kind::Drained(_)) => "drained",
        Some(Kind::Resumed(_)) => "resumed",
        Some(Kind::Restored(_)) => "restored",
        Some(Kind::BackpressureChanged(_)) => "backpressure_changed",
    }
}

/// The event's fields (`data`): an object per type, keys in order; null
/// for an event of a type this build does not know.
struct Data<'a>(Option<&'a Kind>);

impl Serialize for Data<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let kind = match self.0 {
            // A backpressure change without its signal is null, as an
            // event of an unknown type is.
            None | Some(Kind::BackpressureChanged(rpb::BackpressureChanged { signal: None })) => {
                return serializer.serialize_none();
            }
            Some(kind) => kind,
        };
        let mut map = serializer.serialize_map(None)?;
        match kind {
            Kind::Enqueued(e) => map.serialize_entry("item", &e.item.as_ref().map(ItemView::new))?,
            Kind::Leased(e) => {
                map.serialize_entry("attempt", &e.attempt)?;
                map.serialize_entry("expires_at", &Time(e.expires_at.as_ref()))?;
                map.serialize_entry("item_id", &e.item_id)?;
                map.serialize_entry("lease_id", &e.lease_id)?;
                map.serialize_entry("owner", &e.owner)?;
            }
            Kind::Heartbeat(e) => {
                map.serialize_entry("expires_at", &Time(e.expires_at.as_ref()))?;
                map.serialize_entry("fencing_token", &e.fencing_token)?;
                map.serialize_entry("item_id", &e.item_id)?;
                map.serialize_entry("progress", &e.progress)?;
            }
            Kind::Completed(e) => {
                map.serialize_entry("fencing_token", &e.fencing_token)?;
                map.serialize_entry("item_id", &e.item_id)?;
            }
            Kind::Failed(e) => {
                map.serialize_entry("error", &e.error)?;
                map.serialize_entry("fencing_token", &e.fencing_token)?;
                map.serialize_entry("item_id", &e.item_id)?;
            }
            Kind::Requeued(e) => {
                map.serialize_entry("item_id", &e.item_id)?;
                map.serialize_entry("not_before", &Time(e.not_before.as_ref()))?;
                map.serialize_entry("reason", &e.reason)?;
            }
            Kind::Expired(e) => {
                map.serialize_entry("fencing_token", &e.fencing_token)?;
                map.serialize_entry("item_id", &e.item_id)?;
                map.serialize_entry("owner", &e.owner)?;
            }
            Kind::DeadLettered(e) => {
                map.serialize_entry("item_id", &e.item_id)?;
                map.serialize_entry("reason", &e.reason)?;
            }
            Kind::Redriven(e) => {
                map.serialize_entry("item_id", &e.item_id)?;
                map.serialize_entry("not_before", &Time(e.not_before.as_ref()))?;
            }
            Kind::DeadLettersPurged(rpb::DeadLettersPurged { item_ids })
            | Kind::DrainedPurged(rpb::DrainedPurged { item_ids }) => map.serialize_entry("item_ids", item_ids)?,
            Kind::DrainStarted(e) => {
                map.serialize_entry("mode", pb::DrainMode::try_from(e.mode).map_or("unknown", |m| m.as_str_name()))?
            }
            Kind::Drained(e) => {
                map.serialize_entry("in_flight", &e.in_flight)?;
                map.serialize_entry("pending", &e.pending)?;
            }
            Kind::Resumed(_) => {}
            Kind::Restored(e) => {
                map.serialize_entry("items", &Items(&e.items))?;
                map.serialize_entry("skipped", &e.skipped)?;
            }
            Kind::BackpressureChanged(rpb::BackpressureChanged { signal: None }) => {}
            Kind::BackpressureChanged(rpb::BackpressureChanged { signal: Some(s) }) => {
                map.serialize_entry("active", &s.active)?;
                map.serialize_entry("high", &s.high)?;
                map.serialize_entry("low", &s.low)?;
                map.serialize_entry("observed_at", &Time(s.observed_at.as_ref()))?;
                map.serialize_entry("pending", &s.pending)?;
            }
        }
        map.end()
    }
}

/// Items as an array.
struct Items<'a>(&'a [pb::WorkItem]);

impl Serialize for Items<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(ItemView::new))
    }
}

/// An item's identity, payload and queue fields (not its attempt history);
/// the fields are declared in key order.
#[derive(Serialize)]
struct ItemView<'a> {
    attempt: u32,
    attributes: &'a BTreeMap<String, String>,
    body: Base64<'a>,
    enqueued_at: Time<'a>,
    item_id: &'a str,
    last_error: &'a str,
    not_before: Time<'a>,
    partition_key: &'a str,
    priority: i32,
    request_id: &'a str,
    resource_id: &'a str,
    resource_type: &'a str,
}

/// What an item without a payload shows: empty fields.
static NO_ATTRIBUTES: BTreeMap<String, String> = BTreeMap::new();

impl<'a> ItemView<'a> {
    fn new(item: &'a pb::WorkItem) -> Self {
        let payload = item.payload.as_ref();
        Self {
            attempt: item.attempt,
            attributes: payload.map_or(&NO_ATTRIBUTES, |p| &p.attributes),
            body: Base64(payload.map_or(&[][..], |p| &p.body)),
            enqueued_at: Time(item.enqueued_at.as_ref()),
            item_id: &item.item_id,
            last_error: &item.last_error,
            not_before: Time(item.not_before.as_ref()),
            partition_key: payload.map_or("", |p| &p.partition_key),
            priority: item.priority,
            request_id: payload.map_or("", |p| &p.request_id),
            resource_id: payload.map_or("", |p| &p.resource_id),
            resource_type: payload.map_or("", |p| &p.resource_type),
        }
    }
}

/// Bytes as standard base64 (padded), written without a `String`.
struct Base64<'a>(&'a [u8]);

impl Serialize for Base64<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&base64::display::Base64Display::new(self.0, &base64::engine::general_purpose::STANDARD))
    }
}

/// Bytes as lowercase hex.
struct Hex<'a>(&'a [u8]);

impl Serialize for Hex<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        // A chain hash (32 bytes) in one write; longer values in pieces.
        let mut buf = [0u8; 64];
        for chunk in self.0.chunks(buf.len() / 2) {
            for (i, byte) in chunk.iter().enumerate() {
                buf[2 * i] = DIGITS[usize::from(byte >> 4)];
                buf[2 * i + 1] = DIGITS[usize::from(byte & 0xf)];
            }
            let text = std::str::from_utf8(&buf[..2 * chunk.len()]).expect("hex digits should be ASCII");
            f.write_str(text)?;
        }
        Ok(())
    }
}

/// A timestamp as RFC 3339 with nanoseconds, or null when unset or out of
/// range.
struct Time<'a>(Option<&'a Timestamp>);

impl Serialize for Time<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Some(at) = self.0.and_then(datetime) else { return serializer.serialize_none() };
        // The longest RFC 3339 form is 35 bytes (nanoseconds and an offset).
        let mut cursor = std::io::Cursor::new([0u8; 64]);
        match at.format_into(&mut cursor, &time::format_description::well_known::Rfc3339) {
            Ok(_) => {
                let len = usize::try_from(cursor.position()).expect("at most 64 bytes");
                let text = std::str::from_utf8(&cursor.get_ref()[..len]).expect("RFC 3339 should be ASCII");
                serializer.serialize_str(text)
            }
            // A year RFC 3339 cannot show (before 0 or after 9999).
            Err(_) => serializer.serialize_none(),
        }
    }
}

fn datetime(at: &Timestamp) -> Option<time::OffsetDateTime> {
    let nanos = i128::from(at.seconds) * 1_000_000_000 + i128::from(at.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// RFC 3339 with nanoseconds, or null when unset or out of range.
pub fn time(at: Option<&Timestamp>) -> Value {
    let Some(at) = at.and_then(datetime) else { return Value::Null };
    at.format(&time::format_description::well_known::Rfc3339).map_or(Value::Null, Value::String)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    Hex(bytes).to_string()
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

    /// Strings that need escaping, in every string field of the samples.
    const AWKWARD: &str = "quote \" backslash \\ newline \n tab \t bell \u{7} é 🦀 </script>";

    fn at(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 123_456_789 })
    }

    fn item(id: &str, payload: bool) -> pb::WorkItem {
        pb::WorkItem {
            item_id: id.into(),
            payload: payload.then(|| pb::ItemPayload {
                resource_type: "user".into(),
                resource_id: AWKWARD.into(),
                partition_key: "p".into(),
                request_id: "r-1".into(),
                attributes: [("b".to_string(), AWKWARD.to_string()), ("a".to_string(), "1".to_string())].into(),
                body: Bytes::from_static(b"\x00\x01\xfe\xffbody"),
            }),
            priority: -3,
            enqueued_at: at(1_700_000_000),
            // Past what RFC 3339 can show: null.
            not_before: Some(Timestamp { seconds: 400_000_000_000, nanos: 0 }),
            attempt: 2,
            last_error: AWKWARD.into(),
            ..Default::default()
        }
    }

    /// One event of every kind (and of none), with every field set.
    fn samples() -> Vec<SinkEvent> {
        let kinds = vec![
            None,
            Some(Kind::Enqueued(rpb::Enqueued { item: Some(item("i-1", true)) })),
            Some(Kind::Enqueued(rpb::Enqueued { item: Some(item("i-2", false)) })),
            Some(Kind::Enqueued(rpb::Enqueued { item: None })),
            Some(Kind::Leased(rpb::Leased {
                item_id: "i-1".into(),
                attempt: 1,
                lease_id: "l-1".into(),
                owner: AWKWARD.into(),
                expires_at: at(1_700_000_010),
            })),
            Some(Kind::Heartbeat(rpb::Heartbeat {
                item_id: "i-1".into(),
                fencing_token: 9,
                expires_at: None,
                progress: [("step".to_string(), AWKWARD.to_string()), ("done".to_string(), "3".to_string())].into(),
            })),
            Some(Kind::Completed(rpb::Completed { item_id: "i-1".into(), fencing_token: u64::MAX })),
            Some(Kind::Failed(rpb::Failed { item_id: "i-1".into(), fencing_token: 4, error: AWKWARD.into() })),
            Some(Kind::Requeued(rpb::Requeued {
                item_id: "i-1".into(),
                not_before: at(-62_135_596_800),
                reason: AWKWARD.into(),
            })),
            Some(Kind::Expired(rpb::Expired { item_id: "i-1".into(), fencing_token: 5, owner: "w".into() })),
            Some(Kind::DeadLettered(rpb::DeadLettered { item_id: "i-1".into(), reason: AWKWARD.into() })),
            Some(Kind::Redriven(rpb::Redriven { item_id: "i-1".into(), not_before: at(0) })),
            Some(Kind::DeadLettersPurged(rpb::DeadLettersPurged { item_ids: vec!["a".into(), AWKWARD.into()] })),
            Some(Kind::DrainedPurged(rpb::DrainedPurged { item_ids: Vec::new() })),
            Some(Kind::DrainStarted(rpb::DrainStarted { mode: pb::DrainMode::HandBack as i32 })),
            Some(Kind::DrainStarted(rpb::DrainStarted { mode: 99 })),
            Some(Kind::Drained(rpb::Drained { pending: 3, in_flight: 1 })),
            Some(Kind::Resumed(rpb::Resumed {})),
            Some(Kind::Restored(rpb::Restored { items: vec![item("i-3", true), item("i-4", false)], skipped: 2 })),
            Some(Kind::Restored(rpb::Restored { items: Vec::new(), skipped: 0 })),
            Some(Kind::BackpressureChanged(rpb::BackpressureChanged {
                signal: Some(pb::BackpressureSignal {
                    active: true,
                    pending: 80_000,
                    high: 80_000,
                    low: 60_000,
                    observed_at: at(1_700_000_020),
                    namespace: "resourcelease.users".into(),
                }),
            })),
            Some(Kind::BackpressureChanged(rpb::BackpressureChanged { signal: None })),
        ];
        kinds
            .into_iter()
            .zip(1u64..)
            .map(|(kind, sequence)| {
                let event = rpb::ReplicationEvent {
                    shard_id: "resourcelease.users".into(),
                    sequence,
                    epoch: 3,
                    principal: AWKWARD.into(),
                    peer_id: "node-a".into(),
                    recorded_at: if sequence % 2 == 0 { at(1_700_000_000 + sequence as i64) } else { None },
                    metadata: [("z".to_string(), AWKWARD.to_string()), ("trace".to_string(), "t".to_string())].into(),
                    // A long prev_hash, to cover hex beyond one chunk; an
                    // empty one now and then.
                    prev_hash: if sequence % 3 == 0 { Bytes::new() } else { Bytes::from(vec![0x5a; 70]) },
                    hash: Bytes::from((0..32).map(|b| b * 7 + sequence as u8).collect::<Vec<u8>>()),
                    event: kind,
                };
                SinkEvent {
                    shard: "resourcelease.users".into(),
                    sequence: Sequence::new(sequence),
                    hash: event.hash.clone(),
                    raw: Bytes::new(),
                    event,
                }
            })
            .collect()
    }

    #[test]
    fn written_events_are_byte_for_byte_the_value_encoding() {
        let events = samples();
        for event in &events {
            let expected = serde_json::to_vec(&reference::event(event)).expect("renders");
            let mut written = Vec::new();
            write_event(&mut written, event).expect("writes");
            assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&expected),
                "event {} ({:?})",
                event.sequence,
                event.event.event.as_ref().map(|k| kind_name(Some(k)))
            );
            assert_eq!(super::event(event), reference::event(event));
        }
        // Every kind was covered (and the unknown one).
        let kinds: std::collections::HashSet<&str> = events.iter().map(|e| kind_name(e.event.event.as_ref())).collect();
        assert_eq!(kinds.len(), 17, "{kinds:?}");
    }

    #[test]
    fn snapshots_render_as_before() {
        let state = rpb::QueueState {
            shard_id: "resourcelease.users".into(),
            sequence: 9,
            items: vec![
                rpb::QueuedItem { item: Some(item("i-1", true)), order: 1 },
                rpb::QueuedItem { item: None, order: 2 },
            ],
            dead_letters: vec![rpb::QueuedDeadLetter {
                dead_letter: Some(pb::DeadLetter { item: Some(item("i-2", false)), ..Default::default() }),
                order: 1,
            }],
            draining: true,
            ..Default::default()
        };
        let snapshot = SinkSnapshot {
            shard: "resourcelease.users".into(),
            sequence: Sequence::new(9),
            hash: Bytes::from_static(&[0x0f; 32]),
            state,
        };
        assert_eq!(
            serde_json::to_vec(&super::snapshot(&snapshot)).expect("renders"),
            serde_json::to_vec(&reference::snapshot(&snapshot)).expect("renders")
        );
    }

    /// The encoding the NDJSON sink wrote before [`write_event`]: a
    /// `serde_json::Value` per event (whose objects keep their keys in byte
    /// order). Kept as the reference the writer must match byte for byte.
    mod reference {
        use base64::Engine as _;

        use super::super::*;

        pub(super) fn event(event: &SinkEvent) -> Value {
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

        pub(super) fn snapshot(snapshot: &SinkSnapshot) -> Value {
            let items: Vec<Value> = snapshot.state.items.iter().filter_map(|q| q.item.as_ref()).map(item).collect();
            let dead_letters: Vec<Value> = snapshot
                .state
                .dead_letters
                .iter()
                .filter_map(|d| d.dead_letter.as_ref()?.item.as_ref())
                .map(item)
                .collect();
            json!({
                "key": format!("{}/{}", snapshot.shard, snapshot.sequence),
                "shard": snapshot.shard.as_str(),
                "sequence": snapshot.sequence.get(),
                "type": "snapshot",
                "data": { "items": items, "dead_letters": dead_letters, "draining": snapshot.state.draining },
                "hash": hex(&snapshot.hash),
            })
        }

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
                Some(Kind::Completed(e)) => {
                    ("completed", json!({ "item_id": e.item_id, "fencing_token": e.fencing_token }))
                }
                Some(Kind::Failed(e)) => {
                    ("failed", json!({ "item_id": e.item_id, "fencing_token": e.fencing_token, "error": e.error }))
                }
                Some(Kind::Requeued(e)) => (
                    "requeued",
                    json!({ "item_id": e.item_id, "not_before": time(e.not_before.as_ref()), "reason": e.reason }),
                ),
                Some(Kind::Expired(e)) => {
                    ("expired", json!({ "item_id": e.item_id, "fencing_token": e.fencing_token, "owner": e.owner }))
                }
                Some(Kind::DeadLettered(e)) => ("dead_lettered", json!({ "item_id": e.item_id, "reason": e.reason })),
                Some(Kind::Redriven(e)) => {
                    ("redriven", json!({ "item_id": e.item_id, "not_before": time(e.not_before.as_ref()) }))
                }
                Some(Kind::DeadLettersPurged(e)) => ("dead_letters_purged", json!({ "item_ids": e.item_ids })),
                Some(Kind::DrainedPurged(e)) => ("drained_purged", json!({ "item_ids": e.item_ids })),
                Some(Kind::DrainStarted(e)) => (
                    "drain_started",
                    json!({ "mode": pb::DrainMode::try_from(e.mode).map_or("unknown", |m| m.as_str_name()) }),
                ),
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

        fn time(at: Option<&Timestamp>) -> Value {
            let Some(at) = at else { return Value::Null };
            let nanos = i128::from(at.seconds) * 1_000_000_000 + i128::from(at.nanos);
            time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .map_or(Value::Null, Value::String)
        }

        fn hex(bytes: &[u8]) -> String {
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}
