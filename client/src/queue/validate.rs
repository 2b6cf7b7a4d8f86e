//! Input checks: every rejection names the field as the wire contract spells
//! it, and runs before the queue is locked or anything is written.

use std::collections::BTreeMap;
use std::time::Duration;

use omnirelay_proto::limits::MAX_EVENT_BYTES;
use prost::Message;

use crate::defaults;
use crate::item::{Payload, WorkItem};
use crate::queue::error::{QueueError, Result};

/// A field path, formatted only when an error needs it: validation of a
/// good payload must not allocate (it runs on every enqueue).
#[derive(Clone, Copy)]
struct Field<'a> {
    prefix: &'a str,
    name: &'a str,
}

impl Field<'_> {
    fn path(self) -> String {
        if self.prefix.is_empty() { self.name.to_string() } else { format!("{}.{}", self.prefix, self.name) }
    }
}

fn required(field: Field<'_>, value: &str, max: usize) -> Result<()> {
    if is_blank(value) {
        return Err(QueueError::invalid(field.path(), "is required and must not be blank"));
    }
    bounded(field, value, max)
}

fn bounded(field: Field<'_>, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(QueueError::invalid(field.path(), format!("is {} bytes long; the limit is {max}", value.len())));
    }
    Ok(())
}

/// Whether `value` is surely non-blank and within `max` bytes: its first byte
/// is a visible ASCII character. Cheap, and true for almost every real value;
/// when it is false the full check decides.
#[inline]
fn plainly_filled(value: &str, max: usize) -> bool {
    value.len() <= max && value.as_bytes().first().is_some_and(u8::is_ascii_graphic)
}

/// Whether `value` is blank (empty or only whitespace).
#[inline]
pub(crate) fn is_blank(value: &str) -> bool {
    !value.as_bytes().first().is_some_and(u8::is_ascii_graphic) && value.chars().all(char::is_whitespace)
}

/// Checks a producer's payload; `prefix` is the path to it (`payload`,
/// `snapshot.items[3].payload`).
#[inline]
pub(crate) fn payload(prefix: &str, payload: &Payload) -> Result<()> {
    // The common payload, decided without walking any field; anything else
    // (attributes, a value starting with a space or a non-ASCII character, a
    // value over its limit) takes the full check, which names the field.
    if plainly_filled(&payload.resource_type, defaults::RESOURCE_TYPE_MAX_BYTES)
        && plainly_filled(&payload.resource_id, defaults::RESOURCE_ID_MAX_BYTES)
        && payload.partition_key.len() <= defaults::PARTITION_KEY_MAX_BYTES
        && payload.request_id.len() <= defaults::REQUEST_ID_MAX_BYTES
        && payload.body.len() <= defaults::BODY_MAX_BYTES
        && payload.attributes.is_empty()
    {
        return Ok(());
    }
    payload_in_full(prefix, payload)
}

#[cold]
fn payload_in_full(prefix: &str, payload: &Payload) -> Result<()> {
    let field = |name| Field { prefix, name };
    required(field("resource_type"), &payload.resource_type, defaults::RESOURCE_TYPE_MAX_BYTES)?;
    required(field("resource_id"), &payload.resource_id, defaults::RESOURCE_ID_MAX_BYTES)?;
    bounded(field("partition_key"), &payload.partition_key, defaults::PARTITION_KEY_MAX_BYTES)?;
    bounded(field("request_id"), &payload.request_id, defaults::REQUEST_ID_MAX_BYTES)?;
    if payload.body.len() > defaults::BODY_MAX_BYTES {
        return Err(QueueError::invalid(
            field("body").path(),
            format!("is {} bytes long; the limit is {}", payload.body.len(), defaults::BODY_MAX_BYTES),
        ));
    }
    if payload.attributes.len() > defaults::ATTRIBUTES_MAX_COUNT {
        return Err(QueueError::invalid(
            field("attributes").path(),
            format!("has {} entries; the limit is {}", payload.attributes.len(), defaults::ATTRIBUTES_MAX_COUNT),
        ));
    }
    for (key, value) in &payload.attributes {
        required(field("attributes (key)"), key, defaults::ATTRIBUTE_KEY_MAX_BYTES)?;
        if value.len() > defaults::ATTRIBUTE_VALUE_MAX_BYTES {
            bounded(Field { prefix, name: &format!("attributes[{key}]") }, value, defaults::ATTRIBUTE_VALUE_MAX_BYTES)?;
        }
    }
    Ok(())
}

/// Checks a delay against its limit.
#[inline]
pub(crate) fn delay(field: &'static str, delay: Duration, max: Duration) -> Result<()> {
    if delay > max {
        return Err(QueueError::invalid(field, format!("is {delay:?}; the limit is {max:?}")));
    }
    Ok(())
}

/// Checks a worker's error text.
pub(crate) fn error_text(error: &str) -> Result<()> {
    bounded(Field { prefix: "", name: "error" }, error, defaults::ERROR_MAX_BYTES)
}

/// Checks heartbeat progress details.
pub(crate) fn progress(progress: &BTreeMap<String, String>) -> Result<()> {
    if progress.len() > defaults::PROGRESS_MAX_ENTRIES {
        return Err(QueueError::invalid(
            "progress",
            format!("has {} entries; the limit is {}", progress.len(), defaults::PROGRESS_MAX_ENTRIES),
        ));
    }
    for (key, value) in progress {
        required(Field { prefix: "", name: "progress (key)" }, key, defaults::PROGRESS_ENTRY_MAX_BYTES)?;
        if value.len() > defaults::PROGRESS_ENTRY_MAX_BYTES {
            bounded(
                Field { prefix: "", name: &format!("progress[{key}]") },
                value,
                defaults::PROGRESS_ENTRY_MAX_BYTES,
            )?;
        }
    }
    Ok(())
}

/// Room a `Restored` event needs besides its items' encodings (envelope,
/// principal, peer, timestamps): generous, since it only decides where a
/// restore's events are split.
const RESTORED_ENVELOPE_BYTES: usize = 8 * 1024;

/// Checks that a restored item fits in one event of the log (its body is
/// within its limit, but a long attempt history could push it over).
pub(crate) fn restored_item(field: &str, item: &WorkItem) -> Result<()> {
    let bytes = crate::wire::work_item(item).encoded_len();
    if bytes + RESTORED_ENVELOPE_BYTES > MAX_EVENT_BYTES {
        return Err(QueueError::invalid(
            field,
            format!(
                "encodes to {bytes} bytes with its history; one item must fit in an event of {MAX_EVENT_BYTES} bytes"
            ),
        ));
    }
    Ok(())
}

/// Splits a restore's items into groups that each fit in one `Restored`
/// event within the log's event limit, keeping their order.
pub(crate) fn restore_chunks(items: Vec<WorkItem>) -> Vec<Vec<WorkItem>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = RESTORED_ENVELOPE_BYTES;
    for item in items {
        // Field tag and length prefix of the repeated message: at most 6 bytes.
        let size = crate::wire::work_item(&item).encoded_len() + 6;
        if !chunk.is_empty() && bytes + size > MAX_EVENT_BYTES {
            chunks.push(std::mem::take(&mut chunk));
            bytes = RESTORED_ENVELOPE_BYTES;
        }
        bytes += size;
        chunk.push(item);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<()>) -> String {
        match result {
            Err(QueueError::InvalidArgument { field, .. }) => field,
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn blank_or_missing_resource_fields_are_named() {
        let blank_type = Payload::new("  ", "42", "");
        assert_eq!(field_of(payload("payload", &blank_type)), "payload.resource_type");
        let missing_id = Payload::new("user", "", "");
        assert_eq!(field_of(payload("payload", &missing_id)), "payload.resource_id");
    }

    #[test]
    fn blankness_follows_unicode_whitespace_not_the_first_byte() {
        assert_eq!(payload("payload", &Payload::new(" user", "\u{e9}t\u{e9}", "")), Ok(()));
        let ideographic_space = Payload::new("user", "\u{3000}\t", "");
        assert_eq!(field_of(payload("payload", &ideographic_space)), "payload.resource_id");
        assert!(is_blank("") && is_blank(" \u{a0}") && !is_blank(" x") && !is_blank("x"));
    }

    #[test]
    fn oversized_fields_are_named() {
        let long_id = Payload::new("user", "x".repeat(defaults::RESOURCE_ID_MAX_BYTES + 1), "");
        assert_eq!(field_of(payload("payload", &long_id)), "payload.resource_id");
        let big_body = Payload::new("user", "1", vec![0u8; defaults::BODY_MAX_BYTES + 1]);
        assert_eq!(field_of(payload("snapshot.items[2].payload", &big_body)), "snapshot.items[2].payload.body");
        let long_request =
            Payload::new("user", "1", "").with_request_id("r".repeat(defaults::REQUEST_ID_MAX_BYTES + 1));
        assert_eq!(field_of(payload("payload", &long_request)), "payload.request_id");
        assert_eq!(field_of(error_text(&"e".repeat(defaults::ERROR_MAX_BYTES + 1))), "error");
        assert_eq!(field_of(delay("delay", Duration::MAX, defaults::ENQUEUE_DELAY_MAX)), "delay");
    }

    #[test]
    fn payloads_at_the_limits_are_accepted() {
        let mut at_limit = Payload::new(
            "t".repeat(defaults::RESOURCE_TYPE_MAX_BYTES),
            "i".repeat(defaults::RESOURCE_ID_MAX_BYTES),
            vec![1u8; defaults::BODY_MAX_BYTES],
        );
        at_limit.attributes.insert("k".into(), "v".repeat(defaults::ATTRIBUTE_VALUE_MAX_BYTES));
        assert_eq!(payload("payload", &at_limit), Ok(()));
    }
}
