//! The one place that converts between the client's domain types and the
//! protobuf types of `omnirelay-proto`. Domain code never sees `pb` types.
//!
//! Decoding checks everything that came from the network: ids must parse,
//! timestamps must be valid, enums known; a [`WireError`] names the field.

use std::sync::Arc;
use std::time::Duration;

use omnirelay_proto as prost_types;
use omnirelay_proto::Message;
use omnirelay_proto::replication::v1 as rpb;
use omnirelay_proto::replication::v1::replication_event::Event as PbEvent;
use omnirelay_proto::resourcelease::v1 as pb;

use crate::backpressure::BackpressureSignal;
use crate::clock::Timestamp;
use crate::ids::{FencingToken, ItemId, LeaseId, PeerId, Principal, Sequence, ShardId};
use crate::queue::{
    AttemptOutcome, AttemptRecord, DeadLetter, DeadLetterReason, DrainMode, DrainSnapshot, Event, EventKind, Lease,
    LeaseHandle, NewItem, Origin, Payload, QueueError, QueueState, RequeueReason, SequencedEvent, WorkItem,
};
use crate::queue::{FailAction, FailRequest};

/// A message that does not decode into a domain value; `field` is the path
/// to the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct WireError {
    /// Path to the field, e.g. `items[2].item_id`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl From<WireError> for QueueError {
    fn from(error: WireError) -> Self {
        QueueError::InvalidArgument { field: error.field, reason: error.reason }
    }
}

fn wire_error(field: impl Into<String>, reason: impl Into<String>) -> WireError {
    WireError { field: field.into(), reason: reason.into() }
}

fn at(prefix: &str, field: &str) -> String {
    if prefix.is_empty() { field.to_string() } else { format!("{prefix}.{field}") }
}

// ----- scalars -----

/// A domain timestamp as a protobuf timestamp.
pub fn timestamp(time: Timestamp) -> prost_types::Timestamp {
    let nanos = time.as_unix_nanos();
    prost_types::Timestamp { seconds: (nanos / 1_000_000_000) as i64, nanos: (nanos % 1_000_000_000) as i32 }
}

/// A protobuf timestamp as a domain timestamp; unset is the epoch.
pub fn timestamp_from_pb(field: &str, time: Option<&prost_types::Timestamp>) -> Result<Timestamp, WireError> {
    let Some(time) = time else { return Ok(Timestamp::EPOCH) };
    if time.seconds < 0 || !(0..1_000_000_000).contains(&time.nanos) {
        return Err(wire_error(field, "must be a valid time after 1970"));
    }
    let nanos = (time.seconds as u64)
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(time.nanos as u64))
        .ok_or_else(|| wire_error(field, "is too far in the future"))?;
    Ok(Timestamp::from_unix_nanos(nanos))
}

/// A protobuf duration as a `Duration`; unset is `None`.
pub fn duration_from_pb(field: &str, duration: Option<&prost_types::Duration>) -> Result<Option<Duration>, WireError> {
    let Some(duration) = duration else { return Ok(None) };
    if duration.seconds < 0 || !(0..1_000_000_000).contains(&duration.nanos) {
        return Err(wire_error(field, "must be a non-negative duration"));
    }
    Ok(Some(Duration::new(duration.seconds as u64, duration.nanos as u32)))
}

/// A `Duration` as a protobuf duration.
pub fn duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: duration.subsec_nanos() as i32,
    }
}

/// An item id from its 32-digit hexadecimal form; `field` names it in the
/// error.
pub fn item_id_from_pb(field: &str, text: &str) -> Result<ItemId, WireError> {
    text.parse().map_err(|_| wire_error(field, "must be an item id (32 hexadecimal digits)"))
}

fn lease_id_from_pb(field: &str, text: &str) -> Result<LeaseId, WireError> {
    text.parse().map_err(|_| wire_error(field, "must be a lease id (32 hexadecimal digits)"))
}

// ----- items -----

/// A payload as its protobuf message.
pub fn payload(payload: &Payload) -> pb::ItemPayload {
    pb::ItemPayload {
        resource_type: payload.resource_type.clone(),
        resource_id: payload.resource_id.clone(),
        partition_key: payload.partition_key.clone(),
        attributes: payload.attributes.clone(),
        body: payload.body.clone(),
        request_id: payload.request_id.clone(),
    }
}

/// A protobuf payload as a domain payload (validated by the queue).
pub fn payload_from_pb(payload: pb::ItemPayload) -> Payload {
    Payload {
        resource_type: payload.resource_type,
        resource_id: payload.resource_id,
        partition_key: payload.partition_key,
        attributes: payload.attributes,
        body: payload.body,
        request_id: payload.request_id,
    }
}

fn outcome(outcome: AttemptOutcome) -> pb::AttemptOutcome {
    match outcome {
        AttemptOutcome::Completed => pb::AttemptOutcome::Completed,
        AttemptOutcome::Failed => pb::AttemptOutcome::Failed,
        AttemptOutcome::Expired => pb::AttemptOutcome::Expired,
        AttemptOutcome::HandedBack => pb::AttemptOutcome::HandedBack,
    }
}

fn attempt_record(record: &AttemptRecord) -> pb::AttemptRecord {
    pb::AttemptRecord {
        attempt: record.attempt,
        owner: record.owner.to_string(),
        fencing_token: record.fencing_token.get(),
        lease_id: record.lease_id.to_string(),
        leased_at: Some(timestamp(record.leased_at)),
        ended_at: Some(timestamp(record.ended_at)),
        outcome: outcome(record.outcome) as i32,
        error: record.error.clone(),
    }
}

/// A lease handle as its protobuf message.
pub fn handle(handle: &LeaseHandle) -> pb::OwnershipHandle {
    pb::OwnershipHandle {
        item_id: handle.item_id.to_string(),
        attempt: handle.attempt,
        lease_id: handle.lease_id.to_string(),
        fencing_token: handle.fencing_token.get(),
        owner: handle.owner.to_string(),
        expires_at: Some(timestamp(handle.expires_at)),
    }
}

/// A protobuf handle as a domain handle; `field` is the handle's path.
pub fn handle_from_pb(field: &str, handle: Option<&pb::OwnershipHandle>) -> Result<LeaseHandle, WireError> {
    let handle = handle.ok_or_else(|| wire_error(field, "is required"))?;
    Ok(LeaseHandle {
        item_id: item_id_from_pb(&at(field, "item_id"), &handle.item_id)?,
        attempt: handle.attempt,
        lease_id: lease_id_from_pb(&at(field, "lease_id"), &handle.lease_id)?,
        fencing_token: FencingToken::new(handle.fencing_token),
        owner: PeerId::new(handle.owner.clone()),
        expires_at: timestamp_from_pb(&at(field, "expires_at"), handle.expires_at.as_ref())?,
    })
}

/// An item as its protobuf message. A leased item's in-flight attempt is the
/// last history entry, without `ended_at` (that is where `leased_at` lives).
pub fn work_item(item: &WorkItem) -> pb::WorkItem {
    let mut history: Vec<pb::AttemptRecord> = item.history.iter().map(attempt_record).collect();
    if let Some(lease) = &item.lease {
        history.push(pb::AttemptRecord {
            attempt: item.attempt,
            owner: lease.owner.to_string(),
            fencing_token: lease.fencing_token.get(),
            lease_id: lease.lease_id.to_string(),
            leased_at: Some(timestamp(lease.leased_at)),
            ended_at: None,
            outcome: pb::AttemptOutcome::Unspecified as i32,
            error: String::new(),
        });
    }
    pb::WorkItem {
        item_id: item.id.to_string(),
        payload: Some(payload(&item.payload)),
        priority: item.priority,
        enqueued_at: Some(timestamp(item.enqueued_at)),
        not_before: Some(timestamp(item.not_before)),
        attempt: item.attempt,
        last_error: item.last_error.clone(),
        last_fencing_token: item.last_fencing_token.get(),
        history,
        lease: item.handle().as_ref().map(handle),
    }
}

/// A protobuf item as a domain item; `field` is the item's path.
pub fn work_item_from_pb(field: &str, item: pb::WorkItem) -> Result<WorkItem, WireError> {
    let id = item_id_from_pb(&at(field, "item_id"), &item.item_id)?;
    let mut history = Vec::with_capacity(item.history.len());
    let mut in_flight = None;
    for (index, record) in item.history.into_iter().enumerate() {
        let path = format!("{}[{index}]", at(field, "history"));
        let outcome = match pb::AttemptOutcome::try_from(record.outcome) {
            Ok(pb::AttemptOutcome::Completed) => Some(AttemptOutcome::Completed),
            Ok(pb::AttemptOutcome::Failed) => Some(AttemptOutcome::Failed),
            Ok(pb::AttemptOutcome::Expired) => Some(AttemptOutcome::Expired),
            Ok(pb::AttemptOutcome::HandedBack) => Some(AttemptOutcome::HandedBack),
            Ok(pb::AttemptOutcome::Unspecified) => None,
            Err(_) => return Err(wire_error(at(&path, "outcome"), "is not a known outcome")),
        };
        let leased_at = timestamp_from_pb(&at(&path, "leased_at"), record.leased_at.as_ref())?;
        match outcome {
            Some(outcome) => history.push(AttemptRecord {
                attempt: record.attempt,
                owner: PeerId::new(record.owner),
                fencing_token: FencingToken::new(record.fencing_token),
                lease_id: lease_id_from_pb(&at(&path, "lease_id"), &record.lease_id)?,
                leased_at,
                ended_at: timestamp_from_pb(&at(&path, "ended_at"), record.ended_at.as_ref())?,
                outcome,
                error: record.error,
            }),
            None => in_flight = Some(leased_at),
        }
    }
    let lease = match item.lease {
        None => None,
        Some(lease) => {
            let handle = handle_from_pb(&at(field, "lease"), Some(&lease))?;
            Some(Lease {
                lease_id: handle.lease_id,
                fencing_token: handle.fencing_token,
                owner: handle.owner,
                leased_at: in_flight.unwrap_or(Timestamp::EPOCH),
                expires_at: handle.expires_at,
            })
        }
    };
    Ok(WorkItem {
        id,
        payload: Arc::new(payload_from_pb(item.payload.unwrap_or_default())),
        priority: item.priority,
        enqueued_at: timestamp_from_pb(&at(field, "enqueued_at"), item.enqueued_at.as_ref())?,
        not_before: timestamp_from_pb(&at(field, "not_before"), item.not_before.as_ref())?,
        attempt: item.attempt,
        last_error: item.last_error,
        last_fencing_token: FencingToken::new(item.last_fencing_token),
        history,
        lease,
    })
}

fn reason_from_pb(field: &str, reason: &str) -> Result<DeadLetterReason, WireError> {
    match reason {
        "max_attempts" => Ok(DeadLetterReason::MaxAttempts),
        "requested" => Ok(DeadLetterReason::Requested),
        _ => Err(wire_error(field, "must be \"max_attempts\" or \"requested\"")),
    }
}

/// A dead letter as its protobuf message.
pub fn dead_letter(letter: &DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        item: Some(work_item(&letter.item)),
        dead_lettered_at: Some(timestamp(letter.dead_lettered_at)),
        reason: letter.reason.as_str().to_string(),
    }
}

/// A protobuf dead letter as a domain dead letter.
pub fn dead_letter_from_pb(field: &str, letter: pb::DeadLetter) -> Result<DeadLetter, WireError> {
    let item = letter.item.ok_or_else(|| wire_error(at(field, "item"), "is required"))?;
    Ok(DeadLetter {
        item: work_item_from_pb(&at(field, "item"), item)?,
        dead_lettered_at: timestamp_from_pb(&at(field, "dead_lettered_at"), letter.dead_lettered_at.as_ref())?,
        reason: reason_from_pb(&at(field, "reason"), &letter.reason)?,
    })
}

/// A backpressure signal as its protobuf message.
pub fn signal(signal: &BackpressureSignal) -> pb::BackpressureSignal {
    pb::BackpressureSignal {
        active: signal.active,
        pending: signal.pending,
        high: signal.high,
        low: signal.low,
        observed_at: Some(timestamp(signal.observed_at)),
        namespace: signal.shard.to_string(),
    }
}

/// A protobuf signal as a domain signal.
pub fn signal_from_pb(field: &str, signal: Option<pb::BackpressureSignal>) -> Result<BackpressureSignal, WireError> {
    let signal = signal.ok_or_else(|| wire_error(field, "is required"))?;
    Ok(BackpressureSignal {
        active: signal.active,
        pending: signal.pending,
        high: signal.high,
        low: signal.low,
        observed_at: timestamp_from_pb(&at(field, "observed_at"), signal.observed_at.as_ref())?,
        shard: ShardId::new(signal.namespace),
    })
}

fn drain_mode(mode: DrainMode) -> pb::DrainMode {
    match mode {
        DrainMode::Wait => pb::DrainMode::Wait,
        DrainMode::HandBack => pb::DrainMode::HandBack,
    }
}

/// A protobuf drain mode (unspecified means wait).
pub fn drain_mode_from_pb(field: &str, mode: i32) -> Result<DrainMode, WireError> {
    match pb::DrainMode::try_from(mode) {
        Ok(pb::DrainMode::Unspecified | pb::DrainMode::Wait) => Ok(DrainMode::Wait),
        Ok(pb::DrainMode::HandBack) => Ok(DrainMode::HandBack),
        Err(_) => Err(wire_error(field, "is not a known drain mode")),
    }
}

/// A drain snapshot as its protobuf message.
pub fn drain_snapshot(snapshot: &DrainSnapshot) -> pb::DrainSnapshot {
    pb::DrainSnapshot {
        namespace: snapshot.shard.to_string(),
        sequence: snapshot.sequence.get(),
        taken_at: Some(timestamp(snapshot.taken_at)),
        items: snapshot.items.iter().map(work_item).collect(),
        in_flight: snapshot.in_flight.iter().map(work_item).collect(),
    }
}

/// A protobuf drain snapshot as a domain snapshot; `field` is its path.
pub fn drain_snapshot_from_pb(field: &str, snapshot: Option<pb::DrainSnapshot>) -> Result<DrainSnapshot, WireError> {
    let snapshot = snapshot.ok_or_else(|| wire_error(field, "is required"))?;
    let items = |name: &str, items: Vec<pb::WorkItem>| {
        items
            .into_iter()
            .enumerate()
            .map(|(index, item)| work_item_from_pb(&format!("{}[{index}]", at(field, name)), item))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(DrainSnapshot {
        shard: ShardId::new(snapshot.namespace),
        sequence: Sequence::new(snapshot.sequence),
        taken_at: timestamp_from_pb(&at(field, "taken_at"), snapshot.taken_at.as_ref())?,
        items: items("items", snapshot.items)?,
        in_flight: items("in_flight", snapshot.in_flight)?,
    })
}

/// A protobuf fail request's action, delay and error as a domain request.
pub fn fail_request_from_pb(request: &pb::FailRequest) -> Result<FailRequest, WireError> {
    let action = match pb::FailAction::try_from(request.action) {
        Ok(pb::FailAction::Unspecified | pb::FailAction::Requeue) => FailAction::Requeue,
        Ok(pb::FailAction::DeadLetter) => FailAction::DeadLetter,
        Err(_) => return Err(wire_error("action", "is not a known fail action")),
    };
    Ok(FailRequest {
        error: request.error.clone(),
        action,
        requeue_delay: duration_from_pb("requeue_delay", request.requeue_delay.as_ref())?,
    })
}

// ----- errors -----

/// The gRPC status for a queue error: its code, its message, and for
/// RESOURCE_EXHAUSTED the encoded `BackpressureSignal` as details.
pub fn status(error: &QueueError) -> tonic::Status {
    let code = error.code().grpc();
    match error.backpressure() {
        Some(bp) => tonic::Status::with_details(code, error.to_string(), signal(bp).encode_to_vec().into()),
        None => tonic::Status::new(code, error.to_string()),
    }
}

// ----- events -----

fn requeue_reason_from_pb(field: &str, reason: &str) -> Result<RequeueReason, WireError> {
    match reason {
        "failed" => Ok(RequeueReason::Failed),
        "expired" => Ok(RequeueReason::Expired),
        "handed_back" => Ok(RequeueReason::HandedBack),
        _ => Err(wire_error(field, "must be \"failed\", \"expired\" or \"handed_back\"")),
    }
}

/// An event at `sequence` as its log entry. Envelope fields the log assigns
/// (epoch, hashes) and `metadata` (tags a replicator adds, such as
/// `shard.id`) are left empty; they are not part of the queue's state.
pub fn event(sequence: Sequence, event: &Event) -> rpb::ReplicationEvent {
    let kind = match &event.kind {
        EventKind::Enqueued(new) => PbEvent::Enqueued(rpb::Enqueued {
            item: Some(pb::WorkItem {
                item_id: new.id.to_string(),
                payload: Some(payload(&new.payload)),
                priority: new.priority,
                enqueued_at: Some(timestamp(new.enqueued_at)),
                not_before: Some(timestamp(new.not_before)),
                ..Default::default()
            }),
        }),
        EventKind::Leased { item_id, attempt, lease_id, owner, expires_at } => PbEvent::Leased(rpb::Leased {
            item_id: item_id.to_string(),
            attempt: *attempt,
            lease_id: lease_id.to_string(),
            owner: owner.to_string(),
            expires_at: Some(timestamp(*expires_at)),
        }),
        EventKind::Heartbeat { item_id, fencing_token, expires_at, progress } => PbEvent::Heartbeat(rpb::Heartbeat {
            item_id: item_id.to_string(),
            fencing_token: fencing_token.get(),
            expires_at: Some(timestamp(*expires_at)),
            progress: progress.clone(),
        }),
        EventKind::Completed { item_id, fencing_token } => {
            PbEvent::Completed(rpb::Completed { item_id: item_id.to_string(), fencing_token: fencing_token.get() })
        }
        EventKind::Failed { item_id, fencing_token, error } => PbEvent::Failed(rpb::Failed {
            item_id: item_id.to_string(),
            fencing_token: fencing_token.get(),
            error: error.clone(),
        }),
        EventKind::Requeued { item_id, not_before, reason } => PbEvent::Requeued(rpb::Requeued {
            item_id: item_id.to_string(),
            not_before: Some(timestamp(*not_before)),
            reason: reason.as_str().to_string(),
        }),
        EventKind::Expired { item_id, fencing_token, owner } => PbEvent::Expired(rpb::Expired {
            item_id: item_id.to_string(),
            fencing_token: fencing_token.get(),
            owner: owner.to_string(),
        }),
        EventKind::DeadLettered { item_id, reason } => PbEvent::DeadLettered(rpb::DeadLettered {
            item_id: item_id.to_string(),
            reason: reason.as_str().to_string(),
        }),
        EventKind::Redriven { item_id, not_before } => {
            PbEvent::Redriven(rpb::Redriven { item_id: item_id.to_string(), not_before: Some(timestamp(*not_before)) })
        }
        EventKind::DeadLettersPurged { item_ids } => PbEvent::DeadLettersPurged(rpb::DeadLettersPurged {
            item_ids: item_ids.iter().map(ToString::to_string).collect(),
        }),
        EventKind::DrainedPurged { item_ids } => {
            PbEvent::DrainedPurged(rpb::DrainedPurged { item_ids: item_ids.iter().map(ToString::to_string).collect() })
        }
        EventKind::DrainStarted { mode } => PbEvent::DrainStarted(rpb::DrainStarted { mode: drain_mode(*mode) as i32 }),
        EventKind::Drained { pending, in_flight } => {
            PbEvent::Drained(rpb::Drained { pending: *pending, in_flight: *in_flight })
        }
        EventKind::Resumed => PbEvent::Resumed(rpb::Resumed {}),
        EventKind::Restored { items, skipped } => {
            PbEvent::Restored(rpb::Restored { items: items.iter().map(work_item).collect(), skipped: *skipped })
        }
        EventKind::BackpressureChanged { signal: bp } => {
            PbEvent::BackpressureChanged(rpb::BackpressureChanged { signal: Some(signal(bp)) })
        }
    };
    rpb::ReplicationEvent {
        shard_id: event.origin.shard.to_string(),
        sequence: sequence.get(),
        principal: event.origin.principal.to_string(),
        peer_id: event.origin.peer.to_string(),
        recorded_at: Some(timestamp(event.recorded_at)),
        event: Some(kind),
        ..Default::default()
    }
}

/// A log entry as a domain event with its sequence (`metadata` is dropped:
/// it is not part of the queue's state).
pub fn event_from_pb(entry: rpb::ReplicationEvent) -> Result<SequencedEvent, WireError> {
    let id = |field: &str, text: &str| item_id_from_pb(field, text);
    let time = |field: &str, t: Option<&prost_types::Timestamp>| timestamp_from_pb(field, t);
    let kind = match entry.event.ok_or_else(|| wire_error("event", "is required"))? {
        PbEvent::Enqueued(e) => {
            let item = e.item.ok_or_else(|| wire_error("enqueued.item", "is required"))?;
            let item = work_item_from_pb("enqueued.item", item)?;
            EventKind::Enqueued(NewItem {
                id: item.id,
                payload: item.payload,
                priority: item.priority,
                enqueued_at: item.enqueued_at,
                not_before: item.not_before,
            })
        }
        PbEvent::Leased(e) => EventKind::Leased {
            item_id: id("leased.item_id", &e.item_id)?,
            attempt: e.attempt,
            lease_id: lease_id_from_pb("leased.lease_id", &e.lease_id)?,
            owner: PeerId::new(e.owner),
            expires_at: time("leased.expires_at", e.expires_at.as_ref())?,
        },
        PbEvent::Heartbeat(e) => EventKind::Heartbeat {
            item_id: id("heartbeat.item_id", &e.item_id)?,
            fencing_token: FencingToken::new(e.fencing_token),
            expires_at: time("heartbeat.expires_at", e.expires_at.as_ref())?,
            progress: e.progress,
        },
        PbEvent::Completed(e) => EventKind::Completed {
            item_id: id("completed.item_id", &e.item_id)?,
            fencing_token: FencingToken::new(e.fencing_token),
        },
        PbEvent::Failed(e) => EventKind::Failed {
            item_id: id("failed.item_id", &e.item_id)?,
            fencing_token: FencingToken::new(e.fencing_token),
            error: e.error,
        },
        PbEvent::Requeued(e) => EventKind::Requeued {
            item_id: id("requeued.item_id", &e.item_id)?,
            not_before: time("requeued.not_before", e.not_before.as_ref())?,
            reason: requeue_reason_from_pb("requeued.reason", &e.reason)?,
        },
        PbEvent::Expired(e) => EventKind::Expired {
            item_id: id("expired.item_id", &e.item_id)?,
            fencing_token: FencingToken::new(e.fencing_token),
            owner: PeerId::new(e.owner),
        },
        PbEvent::DeadLettered(e) => EventKind::DeadLettered {
            item_id: id("dead_lettered.item_id", &e.item_id)?,
            reason: reason_from_pb("dead_lettered.reason", &e.reason)?,
        },
        PbEvent::Redriven(e) => EventKind::Redriven {
            item_id: id("redriven.item_id", &e.item_id)?,
            not_before: time("redriven.not_before", e.not_before.as_ref())?,
        },
        PbEvent::DeadLettersPurged(e) => EventKind::DeadLettersPurged {
            item_ids: e
                .item_ids
                .iter()
                .enumerate()
                .map(|(index, text)| id(&format!("dead_letters_purged.item_ids[{index}]"), text))
                .collect::<Result<_, _>>()?,
        },
        PbEvent::DrainedPurged(e) => EventKind::DrainedPurged {
            item_ids: e
                .item_ids
                .iter()
                .enumerate()
                .map(|(index, text)| id(&format!("drained_purged.item_ids[{index}]"), text))
                .collect::<Result<_, _>>()?,
        },
        PbEvent::DrainStarted(e) => EventKind::DrainStarted { mode: drain_mode_from_pb("drain_started.mode", e.mode)? },
        PbEvent::Drained(e) => EventKind::Drained { pending: e.pending, in_flight: e.in_flight },
        PbEvent::Resumed(_) => EventKind::Resumed,
        PbEvent::Restored(e) => EventKind::Restored {
            items: e
                .items
                .into_iter()
                .enumerate()
                .map(|(index, item)| work_item_from_pb(&format!("restored.items[{index}]"), item))
                .collect::<Result<_, _>>()?,
            skipped: e.skipped,
        },
        PbEvent::BackpressureChanged(e) => {
            EventKind::BackpressureChanged { signal: signal_from_pb("backpressure_changed.signal", e.signal)? }
        }
    };
    Ok(SequencedEvent {
        sequence: Sequence::new(entry.sequence),
        event: Event {
            origin: Arc::new(Origin {
                shard: ShardId::new(entry.shard_id),
                principal: Principal::new(entry.principal),
                peer: PeerId::new(entry.peer_id),
            }),
            recorded_at: time("recorded_at", entry.recorded_at.as_ref())?,
            kind,
        },
    })
}

// ----- queue state -----

/// A queue state as its canonical protobuf message: items in queue order,
/// dead letters in dead-letter order, completions oldest first.
pub fn queue_state(state: &QueueState) -> rpb::QueueState {
    let mut items: Vec<_> = state.entries().collect();
    items.sort_unstable_by_key(|entry| entry.order);
    let mut dead: Vec<_> = state.dead_entries().collect();
    dead.sort_unstable_by_key(|entry| entry.order);
    rpb::QueueState {
        shard_id: state.shard().to_string(),
        sequence: state.last_sequence().get(),
        items: items
            .into_iter()
            .map(|entry| rpb::QueuedItem { item: Some(work_item(&entry.item)), order: entry.order })
            .collect(),
        dead_letters: dead
            .into_iter()
            .map(|entry| rpb::QueuedDeadLetter { dead_letter: Some(dead_letter(&entry.letter)), order: entry.order })
            .collect(),
        completed: state
            .completions()
            .map(|completion| rpb::CompletedItem {
                item_id: completion.item_id.to_string(),
                fencing_token: completion.fencing_token.get(),
                completed_at: Some(timestamp(completion.completed_at)),
                request_id: completion.request_id.clone(),
            })
            .collect(),
        draining: state.draining().is_some(),
        drain_mode: state.draining().map_or(pb::DrainMode::Unspecified, drain_mode) as i32,
        backpressure: Some(signal(state.backpressure())),
        next_order: state.next_order,
        next_dead_letter_order: state.next_dead_order,
    }
}

/// A protobuf queue state as a domain state, indexes rebuilt.
pub fn queue_state_from_pb(message: rpb::QueueState) -> Result<QueueState, WireError> {
    let items = message
        .items
        .into_iter()
        .enumerate()
        .map(|(index, queued)| {
            let field = format!("items[{index}].item");
            let item = queued.item.ok_or_else(|| wire_error(&field, "is required"))?;
            Ok((work_item_from_pb(&field, item)?, queued.order))
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let dead = message
        .dead_letters
        .into_iter()
        .enumerate()
        .map(|(index, queued)| {
            let field = format!("dead_letters[{index}].dead_letter");
            let letter = queued.dead_letter.ok_or_else(|| wire_error(&field, "is required"))?;
            Ok((dead_letter_from_pb(&field, letter)?, queued.order))
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let completed = message
        .completed
        .into_iter()
        .enumerate()
        .map(|(index, completion)| {
            let field = format!("completed[{index}]");
            Ok(crate::queue::Completion {
                item_id: item_id_from_pb(&at(&field, "item_id"), &completion.item_id)?,
                fencing_token: FencingToken::new(completion.fencing_token),
                completed_at: timestamp_from_pb(&at(&field, "completed_at"), completion.completed_at.as_ref())?,
                request_id: completion.request_id,
            })
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let draining = if message.draining { Some(drain_mode_from_pb("drain_mode", message.drain_mode)?) } else { None };
    let backpressure = signal_from_pb("backpressure", message.backpressure)?;
    Ok(QueueState::from_parts(
        ShardId::new(message.shard_id),
        Sequence::new(message.sequence),
        items,
        dead,
        completed,
        draining,
        backpressure,
        message.next_order,
        message.next_dead_letter_order,
    ))
}

impl QueueState {
    /// The state in its canonical protobuf encoding (a snapshot's bytes).
    pub fn encode(&self) -> Vec<u8> {
        queue_state(self).encode_to_vec()
    }

    /// Decodes a state from [`encode`](Self::encode)'s bytes, rebuilding its
    /// indexes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let message = rpb::QueueState::decode(bytes).map_err(|error| wire_error("state", error.to_string()))?;
        queue_state_from_pb(message)
    }
}
