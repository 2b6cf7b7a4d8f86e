//! The JSON form of the ResourceLease messages, for the HTTP/JSON transport.
//!
//! Each request and response body is the protobuf message of the same
//! procedure, written as JSON by these rules (`docs/mesh-node.md` has the
//! table and examples):
//!
//! - field names are the proto field names (`resource_id`, `fencing_token`),
//!   the spelling every protobuf JSON parser accepts and the one the
//!   diagnostics endpoints use;
//! - a field left out takes its proto default; an unknown field is refused
//!   with INVALID_ARGUMENT naming it, so a typo never silently drops data;
//! - 64-bit integers are JSON numbers (strings of digits are accepted too);
//! - `bytes` are base64 (standard alphabet, padded; URL-safe or unpadded
//!   input is accepted);
//! - timestamps are RFC 3339 in UTC (`2026-01-01T00:00:00.250Z`), durations
//!   seconds with an `s` suffix (`"1.5s"`);
//! - enums are their proto names (`"DRAIN_MODE_HAND_BACK"`); numbers are
//!   accepted;
//! - an unset message field is `null` in responses.
//!
//! Decoding errors name the JSON path of the field (`payload.body`,
//! `snapshot.items[2].item_id`) as [`WireError`]s, like the protobuf
//! decoding in [`crate::wire`]. Every message is mapped field by field in a
//! way the compiler checks: adding a field to the contract breaks the build
//! until its JSON form exists.
//!
//! ```
//! use omnirelay_client::node::json;
//! use omnirelay_client::proto::resourcelease::v1 as pb;
//!
//! let request: pb::EnqueueRequest = json::decode(
//!     br#"{"payload": {"resource_type": "user", "resource_id": "42", "body": "aGk="}, "delay": "1.5s"}"#,
//! )?;
//! assert_eq!(request.payload.as_ref().map(|p| p.body.as_ref()), Some(&b"hi"[..]));
//! assert_eq!(request.delay.map(|d| (d.seconds, d.nanos)), Some((1, 500_000_000)));
//!
//! let bad = json::decode::<pb::EnqueueRequest>(br#"{"payload": {"resource_idd": "42"}}"#).unwrap_err();
//! assert_eq!(bad.field, "payload.resource_idd");
//! # Ok::<(), omnirelay_client::wire::WireError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use base64::Engine;
use omnirelay_proto as prost_types;
use omnirelay_proto::resourcelease::v1 as pb;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::wire::WireError;

/// The field name of errors about the body as a whole (not JSON, empty
/// where an object was expected).
const BODY_FIELD: &str = "request body";

/// A ResourceLease request or response that has a JSON form.
pub trait JsonMessage: Sized + sealed::Sealed {
    /// The message as JSON.
    fn to_json(&self) -> serde_json::Value;

    /// Reads the message from a JSON document; an empty document is the
    /// message with every field at its default.
    fn from_json(bytes: &[u8]) -> Result<Self, WireError>;
}

mod sealed {
    pub trait Sealed {}
}

/// Decodes a message from its JSON form; errors name the field's path.
pub fn decode<M: JsonMessage>(bytes: &[u8]) -> Result<M, WireError> {
    M::from_json(bytes)
}

/// Encodes a message in its JSON form.
pub fn encode<M: JsonMessage>(message: &M) -> Vec<u8> {
    // Writing a `Value` to a Vec cannot fail.
    serde_json::to_vec(&message.to_json()).unwrap_or_default()
}

/// A backpressure signal in its JSON form (for error details and the
/// diagnostics endpoints).
pub fn signal(signal: &pb::BackpressureSignal) -> serde_json::Value {
    json_value(&BackpressureSignal::from_pb(signal.clone()))
}

fn json_value<T: Serialize>(value: &T) -> serde_json::Value {
    // Every form serializes (timestamps out of RFC 3339's range become
    // `null` rather than failing the response).
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn decode_form<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let bytes = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => b"{}".as_slice(),
        Some(b'{') => bytes,
        Some(_) => return Err(WireError { field: BODY_FIELD.into(), reason: "must be a JSON object".into() }),
    };
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(path_error)?;
    deserializer
        .end()
        .map_err(|err| WireError { field: BODY_FIELD.into(), reason: format!("not valid JSON: {err}") })?;
    Ok(value)
}

/// Names the field an error is about: the path serde was at (for unknown
/// fields, the path ends with the unknown key).
fn path_error(error: serde_path_to_error::Error<serde_json::Error>) -> WireError {
    let inner = error.inner();
    if inner.is_syntax() || inner.is_eof() || inner.is_io() {
        return WireError { field: BODY_FIELD.into(), reason: format!("not valid JSON: {inner}") };
    }
    let mut field = String::new();
    for segment in error.path() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key } => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(key);
            }
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    // serde_json appends " at line 1 column 7"; the path already says where.
    let message = inner.to_string();
    let message = message.split(" at line ").next().unwrap_or(&message).to_string();
    if message.starts_with("unknown field `") {
        // The path already ends with the unknown key.
        return WireError { field, reason: "is not a field of this message".into() };
    }
    if field.is_empty() {
        field = BODY_FIELD.into();
    }
    WireError { field, reason: message }
}

/// A JSON form of a protobuf value `P`.
trait Form<P>: Sized {
    fn from_pb(value: P) -> Self;
    fn into_pb(self) -> P;
}

macro_rules! same_form {
    ($($t:ty),*) => {
        $(impl Form<$t> for $t {
            fn from_pb(value: $t) -> Self {
                value
            }
            fn into_pb(self) -> $t {
                self
            }
        })*
    };
}

same_form!(String, bool, u32, i32, BTreeMap<String, String>);

impl<T: Form<P>, P> Form<Option<P>> for Option<T> {
    fn from_pb(value: Option<P>) -> Self {
        value.map(T::from_pb)
    }
    fn into_pb(self) -> Option<P> {
        self.map(T::into_pb)
    }
}

impl<T: Form<P>, P> Form<Vec<P>> for Vec<T> {
    fn from_pb(value: Vec<P>) -> Self {
        value.into_iter().map(T::from_pb).collect()
    }
    fn into_pb(self) -> Vec<P> {
        self.into_iter().map(T::into_pb).collect()
    }
}

/// A `uint64`: a JSON number, or a string of digits on input.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Uint64(u64);

impl Form<u64> for Uint64 {
    fn from_pb(value: u64) -> Self {
        Self(value)
    }
    fn into_pb(self) -> u64 {
        self.0
    }
}

impl Serialize for Uint64 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Uint64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Uint64Visitor;
        impl Visitor<'_> for Uint64Visitor {
            type Value = Uint64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an unsigned 64-bit integer (a number or a string of digits)")
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Uint64, E> {
                Ok(Uint64(value))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Uint64, E> {
                value.parse().map(Uint64).map_err(|_| E::invalid_value(de::Unexpected::Str(value), &self))
            }
        }
        deserializer.deserialize_any(Uint64Visitor)
    }
}

/// `bytes`: base64.
#[derive(Debug, Clone, Default, PartialEq)]
struct Base64(bytes::Bytes);

impl Form<bytes::Bytes> for Base64 {
    fn from_pb(value: bytes::Bytes) -> Self {
        Self(value)
    }
    fn into_pb(self) -> bytes::Bytes {
        self.0
    }
}

impl Serialize for Base64 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
        let text = String::deserialize(deserializer)?;
        [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(&text).ok())
            .map(|decoded| Base64(decoded.into()))
            .ok_or_else(|| de::Error::custom("is not base64"))
    }
}

/// `google.protobuf.Timestamp`: RFC 3339, UTC on output.
#[derive(Debug, Clone, Default, PartialEq)]
struct Time(prost_types::Timestamp);

impl Form<prost_types::Timestamp> for Time {
    fn from_pb(value: prost_types::Timestamp) -> Self {
        Self(value)
    }
    fn into_pb(self) -> prost_types::Timestamp {
        self.0
    }
}

/// Formats a timestamp as RFC 3339 in UTC with 0, 3, 6 or 9 fractional
/// digits, the way protobuf's JSON mapping writes it.
pub(crate) fn format_timestamp(timestamp: &prost_types::Timestamp) -> Option<String> {
    let time = time::OffsetDateTime::from_unix_timestamp(timestamp.seconds).ok()?;
    let nanos = u32::try_from(timestamp.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    let fraction = match nanos {
        0 => String::new(),
        n if n % 1_000_000 == 0 => format!(".{:03}", n / 1_000_000),
        n if n % 1_000 == 0 => format!(".{:06}", n / 1_000),
        n => format!(".{n:09}"),
    };
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}Z",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second()
    ))
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match format_timestamp(&self.0) {
            Some(text) => serializer.serialize_str(&text),
            None => Err(serde::ser::Error::custom("timestamp out of the RFC 3339 range")),
        }
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let time = time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
            .map_err(|_| de::Error::custom("is not an RFC 3339 timestamp (e.g. 2026-01-01T00:00:00Z)"))?;
        Ok(Time(prost_types::Timestamp {
            seconds: time.unix_timestamp(),
            nanos: i32::try_from(time.nanosecond()).unwrap_or(0),
        }))
    }
}

/// `google.protobuf.Duration`: seconds with an `s` suffix (`"1.5s"`).
#[derive(Debug, Clone, Default, PartialEq)]
struct Span(prost_types::Duration);

impl Form<prost_types::Duration> for Span {
    fn from_pb(value: prost_types::Duration) -> Self {
        Self(value)
    }
    fn into_pb(self) -> prost_types::Duration {
        self.0
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let prost_types::Duration { seconds, nanos } = self.0;
        let sign = if seconds < 0 || nanos < 0 { "-" } else { "" };
        let (seconds, nanos) = (seconds.unsigned_abs(), nanos.unsigned_abs());
        let text = match nanos {
            0 => format!("{sign}{seconds}s"),
            n if n % 1_000_000 == 0 => format!("{sign}{seconds}.{:03}s", n / 1_000_000),
            n if n % 1_000 == 0 => format!("{sign}{seconds}.{:06}s", n / 1_000),
            n => format!("{sign}{seconds}.{n:09}s"),
        };
        serializer.serialize_str(&text)
    }
}

/// Parses `"-1.25s"`-style durations into seconds and nanoseconds.
fn parse_duration(text: &str) -> Option<prost_types::Duration> {
    let body = text.strip_suffix('s')?;
    let (negative, body) = match body.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, body),
    };
    let (whole, fraction) = body.split_once('.').unwrap_or((body, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || fraction.len() > 9 {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) || (body.contains('.') && fraction.is_empty()) {
        return None;
    }
    let seconds: i64 = whole.parse().ok()?;
    let nanos: i32 = format!("{fraction:0<9}").parse().ok()?;
    Some(if negative {
        prost_types::Duration { seconds: -seconds, nanos: -nanos }
    } else {
        prost_types::Duration { seconds, nanos }
    })
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(Span)
            .ok_or_else(|| de::Error::custom("is not a duration in seconds with an 's' suffix (e.g. \"1.5s\")"))
    }
}

/// A protobuf enum of this contract.
trait ProtoEnum {
    fn name(value: i32) -> Option<&'static str>;
    fn value(name: &str) -> Option<i32>;
}

macro_rules! proto_enum {
    ($($e:ident),*) => {
        $(impl ProtoEnum for pb::$e {
            fn name(value: i32) -> Option<&'static str> {
                pb::$e::try_from(value).ok().map(|e| e.as_str_name())
            }
            fn value(name: &str) -> Option<i32> {
                pb::$e::from_str_name(name).map(|e| e as i32)
            }
        })*
    };
}

proto_enum!(AttemptOutcome, FailAction, FailOutcome, DrainMode);

/// An enum field: its proto name, or a number. Unknown numbers pass through
/// so the shared decoding refuses them exactly as it does for protobuf.
struct Enum<E>(i32, PhantomData<E>);

impl<E> fmt::Debug for Enum<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E> Clone for Enum<E> {
    fn clone(&self) -> Self {
        Self(self.0, PhantomData)
    }
}

impl<E> Default for Enum<E> {
    fn default() -> Self {
        Self(0, PhantomData)
    }
}

impl<E> PartialEq for Enum<E> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<E> Form<i32> for Enum<E> {
    fn from_pb(value: i32) -> Self {
        Self(value, PhantomData)
    }
    fn into_pb(self) -> i32 {
        self.0
    }
}

impl<E: ProtoEnum> Serialize for Enum<E> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match E::name(self.0) {
            Some(name) => serializer.serialize_str(name),
            None => serializer.serialize_i32(self.0),
        }
    }
}

impl<'de, E: ProtoEnum> Deserialize<'de> for Enum<E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnumVisitor<E>(PhantomData<E>);
        impl<E: ProtoEnum> Visitor<'_> for EnumVisitor<E> {
            type Value = Enum<E>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an enum value name or number")
            }
            fn visit_i64<Er: de::Error>(self, value: i64) -> Result<Enum<E>, Er> {
                i32::try_from(value)
                    .map(|v| Enum(v, PhantomData))
                    .map_err(|_| Er::invalid_value(de::Unexpected::Signed(value), &self))
            }
            fn visit_u64<Er: de::Error>(self, value: u64) -> Result<Enum<E>, Er> {
                i32::try_from(value)
                    .map(|v| Enum(v, PhantomData))
                    .map_err(|_| Er::invalid_value(de::Unexpected::Unsigned(value), &self))
            }
            fn visit_str<Er: de::Error>(self, value: &str) -> Result<Enum<E>, Er> {
                E::value(value)
                    .map(|v| Enum(v, PhantomData))
                    .ok_or_else(|| Er::custom(format!("{value:?} is not a known value of this enum")))
            }
        }
        deserializer.deserialize_any(EnumVisitor(PhantomData))
    }
}

/// Declares the JSON form of protobuf messages: a private struct with the
/// same fields, and both conversions, which destructure every field so the
/// compiler catches a field missing here.
macro_rules! message {
    ($($name:ident { $($field:ident: $ty:ty),* $(,)? })*) => {
        $(
            #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
            #[serde(default, deny_unknown_fields)]
            struct $name {
                $($field: $ty,)*
            }

            impl Form<pb::$name> for $name {
                fn from_pb(message: pb::$name) -> Self {
                    let pb::$name { $($field),* } = message;
                    Self { $($field: Form::from_pb($field)),* }
                }
                fn into_pb(self) -> pb::$name {
                    pb::$name { $($field: Form::into_pb(self.$field)),* }
                }
            }
        )*
    };
}

/// Declares the requests and responses as [`JsonMessage`]s.
macro_rules! top_level {
    ($($name:ident),* $(,)?) => {
        $(
            impl sealed::Sealed for pb::$name {}

            impl JsonMessage for pb::$name {
                fn to_json(&self) -> serde_json::Value {
                    json_value(&$name::from_pb(self.clone()))
                }

                fn from_json(bytes: &[u8]) -> Result<Self, WireError> {
                    decode_form::<$name>(bytes).map(Form::into_pb)
                }
            }
        )*
    };
}

message! {
    ItemPayload {
        resource_type: String,
        resource_id: String,
        partition_key: String,
        attributes: BTreeMap<String, String>,
        body: Base64,
        request_id: String,
    }
    OwnershipHandle {
        item_id: String,
        attempt: u32,
        lease_id: String,
        fencing_token: Uint64,
        owner: String,
        expires_at: Option<Time>,
    }
    AttemptRecord {
        attempt: u32,
        owner: String,
        fencing_token: Uint64,
        lease_id: String,
        leased_at: Option<Time>,
        ended_at: Option<Time>,
        outcome: Enum<pb::AttemptOutcome>,
        error: String,
    }
    WorkItem {
        item_id: String,
        payload: Option<ItemPayload>,
        priority: i32,
        enqueued_at: Option<Time>,
        not_before: Option<Time>,
        attempt: u32,
        last_error: String,
        last_fencing_token: Uint64,
        history: Vec<AttemptRecord>,
        lease: Option<OwnershipHandle>,
    }
    BackpressureSignal {
        active: bool,
        pending: Uint64,
        high: Uint64,
        low: Uint64,
        observed_at: Option<Time>,
        namespace: String,
    }
    EnqueueRequest {
        namespace: String,
        payload: Option<ItemPayload>,
        priority: i32,
        delay: Option<Span>,
    }
    EnqueueResponse {
        item_id: String,
        deduplicated: bool,
        sequence: Uint64,
    }
    LeaseRequest {
        namespace: String,
        owner: String,
        wait: Option<Span>,
        lease_duration: Option<Span>,
    }
    LeaseResponse {
        item: Option<WorkItem>,
    }
    HeartbeatRequest {
        namespace: String,
        handle: Option<OwnershipHandle>,
        progress: BTreeMap<String, String>,
        extend_by: Option<Span>,
    }
    HeartbeatResponse {
        expires_at: Option<Time>,
    }
    CompleteRequest {
        namespace: String,
        handle: Option<OwnershipHandle>,
    }
    CompleteResponse {
        already_completed: bool,
    }
    FailRequest {
        namespace: String,
        handle: Option<OwnershipHandle>,
        error: String,
        action: Enum<pb::FailAction>,
        requeue_delay: Option<Span>,
    }
    FailResponse {
        outcome: Enum<pb::FailOutcome>,
        not_before: Option<Time>,
    }
    DrainRequest {
        namespace: String,
        mode: Enum<pb::DrainMode>,
        wait_timeout: Option<Span>,
    }
    DrainSnapshot {
        namespace: String,
        sequence: Uint64,
        taken_at: Option<Time>,
        items: Vec<WorkItem>,
        in_flight: Vec<WorkItem>,
    }
    DrainResponse {
        snapshot: Option<DrainSnapshot>,
    }
    ResumeRequest {
        namespace: String,
    }
    ResumeResponse {
        resumed: bool,
    }
    RestoreRequest {
        namespace: String,
        snapshot: Option<DrainSnapshot>,
    }
    RestoreResponse {
        restored: u32,
        skipped: u32,
    }
    DeadLetter {
        item: Option<WorkItem>,
        dead_lettered_at: Option<Time>,
        reason: String,
    }
    ListDeadLettersRequest {
        namespace: String,
        page_size: u32,
        page_token: String,
    }
    ListDeadLettersResponse {
        dead_letters: Vec<DeadLetter>,
        next_page_token: String,
    }
    GetDeadLetterRequest {
        namespace: String,
        item_id: String,
    }
    GetDeadLetterResponse {
        dead_letter: Option<DeadLetter>,
    }
    RedriveDeadLetterRequest {
        namespace: String,
        item_id: String,
    }
    RedriveDeadLetterResponse {
        item_id: String,
    }
    PurgeDrainedRequest {
        namespace: String,
        item_ids: Vec<String>,
    }
    PurgeDrainedResponse {
        purged: u32,
        skipped: u32,
    }
    PurgeDeadLettersRequest {
        namespace: String,
        item_ids: Vec<String>,
        all: bool,
    }
    PurgeDeadLettersResponse {
        purged: u32,
    }
    StatsRequest {
        namespace: String,
    }
    StatsResponse {
        pending: Uint64,
        active: Uint64,
        dead_letters: Uint64,
        draining: bool,
        capacity: Uint64,
        backpressure: Option<BackpressureSignal>,
        last_sequence: Uint64,
    }
}

top_level!(
    EnqueueRequest,
    EnqueueResponse,
    LeaseRequest,
    LeaseResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    CompleteRequest,
    CompleteResponse,
    FailRequest,
    FailResponse,
    DrainRequest,
    DrainResponse,
    ResumeRequest,
    ResumeResponse,
    RestoreRequest,
    RestoreResponse,
    ListDeadLettersRequest,
    ListDeadLettersResponse,
    GetDeadLetterRequest,
    GetDeadLetterResponse,
    RedriveDeadLetterRequest,
    RedriveDeadLetterResponse,
    PurgeDrainedRequest,
    PurgeDrainedResponse,
    PurgeDeadLettersRequest,
    PurgeDeadLettersResponse,
    StatsRequest,
    StatsResponse,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_trimmed_fractions() {
        assert_eq!(format_timestamp(&ts(0, 0)).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(format_timestamp(&ts(1_767_225_600, 250_000_000)).as_deref(), Some("2026-01-01T00:00:00.250Z"));
        assert_eq!(format_timestamp(&ts(1, 1_000)).as_deref(), Some("1970-01-01T00:00:01.000001Z"));
        assert_eq!(format_timestamp(&ts(1, 7)).as_deref(), Some("1970-01-01T00:00:01.000000007Z"));
    }

    #[test]
    fn durations_parse_and_print_in_seconds() {
        for (text, seconds, nanos) in [("1.5s", 1, 500_000_000), ("0s", 0, 0), ("20s", 20, 0), ("0.000000001s", 0, 1)] {
            let parsed = parse_duration(text).expect(text);
            assert_eq!((parsed.seconds, parsed.nanos), (seconds, nanos), "{text}");
        }
        for bad in ["1.5", "s", "1.s", "1.5ms", "abc", "1.1234567891s", "+1s"] {
            assert!(parse_duration(bad).is_none(), "{bad}");
        }
        let printed =
            serde_json::to_string(&Span(prost_types::Duration { seconds: 1, nanos: 500_000_000 })).expect("serializes");
        assert_eq!(printed, "\"1.500s\"");
    }

    #[test]
    fn every_message_round_trips_through_its_json_form() {
        let handle = pb::OwnershipHandle {
            item_id: "0123456789abcdef0123456789abcdef".into(),
            attempt: 2,
            lease_id: "fedcba9876543210fedcba9876543210".into(),
            fencing_token: 9_007_199_254_740_993,
            owner: "worker-1#a".into(),
            expires_at: Some(ts(1_767_225_600, 5_000_000)),
        };
        let item = pb::WorkItem {
            item_id: handle.item_id.clone(),
            payload: Some(pb::ItemPayload {
                resource_type: "user".into(),
                resource_id: "42".into(),
                partition_key: "p".into(),
                attributes: [("k".to_string(), "v".to_string())].into(),
                body: bytes::Bytes::from_static(b"\x00\xffbody"),
                request_id: "r".into(),
            }),
            priority: -3,
            enqueued_at: Some(ts(1, 0)),
            not_before: Some(ts(2, 0)),
            attempt: 2,
            last_error: "boom".into(),
            last_fencing_token: 7,
            history: vec![pb::AttemptRecord {
                attempt: 1,
                owner: "w".into(),
                fencing_token: 7,
                lease_id: "l".into(),
                leased_at: Some(ts(1, 1)),
                ended_at: Some(ts(1, 2)),
                outcome: pb::AttemptOutcome::Expired as i32,
                error: "lapsed".into(),
            }],
            lease: Some(handle.clone()),
        };
        let drain = pb::DrainResponse {
            snapshot: Some(pb::DrainSnapshot {
                namespace: "resourcelease".into(),
                sequence: 12,
                taken_at: Some(ts(3, 0)),
                items: vec![item.clone()],
                in_flight: vec![item.clone()],
            }),
        };
        let back: pb::DrainResponse = decode(&encode(&drain)).expect("decodes");
        assert_eq!(back, drain);
        let fail = pb::FailRequest {
            namespace: "resourcelease.users".into(),
            handle: Some(handle),
            error: "e".into(),
            action: pb::FailAction::DeadLetter as i32,
            requeue_delay: Some(prost_types::Duration { seconds: 3, nanos: 1 }),
        };
        let json = fail.to_json();
        assert_eq!(json["action"], "FAIL_ACTION_DEAD_LETTER");
        assert_eq!(json["requeue_delay"], "3.000000001s");
        assert_eq!(json["handle"]["fencing_token"], 9_007_199_254_740_993u64);
        assert_eq!(decode::<pb::FailRequest>(&encode(&fail)).expect("decodes"), fail);
        let stats = pb::StatsResponse { pending: 3, ..Default::default() };
        let json = stats.to_json();
        assert_eq!(json["pending"], 3);
        assert_eq!(json["backpressure"], serde_json::Value::Null);
    }

    #[test]
    fn inputs_accept_the_lenient_spellings() {
        let request: pb::HeartbeatRequest = decode(
            br#"{"handle": {"fencing_token": "17", "expires_at": "2026-01-01T01:00:00+01:00"}, "extend_by": "2s"}"#,
        )
        .expect("decodes");
        let handle = request.handle.expect("handle");
        assert_eq!(handle.fencing_token, 17);
        assert_eq!(handle.expires_at, Some(ts(1_767_225_600, 0)));
        let payload: pb::EnqueueRequest =
            decode(br#"{"payload": {"body": "_-8"}, "priority": 2}"#).expect("url-safe unpadded base64");
        assert_eq!(payload.payload.map(|p| p.body), Some(bytes::Bytes::from_static(&[0xff, 0xef])));
        let drain: pb::DrainRequest = decode(br#"{"mode": 2}"#).expect("enum number");
        assert_eq!(drain.mode, pb::DrainMode::HandBack as i32);
        let empty: pb::StatsRequest = decode(b"  ").expect("an empty body is the default message");
        assert_eq!(empty, pb::StatsRequest::default());
    }

    #[test]
    fn decoding_errors_name_the_path_of_the_field() {
        let cases: [(&[u8], &str); 8] = [
            (br#"{"payload": {"resource_id": 42}}"#, "payload.resource_id"),
            (br#"{"payload": {"nope": 1}}"#, "payload.nope"),
            (br#"{"payload": {"body": "***"}}"#, "payload.body"),
            (br#"{"delay": "soon"}"#, "delay"),
            (br#"{"priority": "high"}"#, "priority"),
            (br#"{"payload": "#, "request body"),
            (br#"[1, 2]"#, "request body"),
            (br#"{"payload": {}} trailing"#, "request body"),
        ];
        for (body, field) in cases {
            let error = decode::<pb::EnqueueRequest>(body).expect_err(field);
            assert_eq!(error.field, field, "{}: {error}", String::from_utf8_lossy(body));
        }
        let error = decode::<pb::RestoreRequest>(br#"{"snapshot": {"items": [{}, {"attempt": -1}]}}"#)
            .expect_err("negative attempt");
        assert_eq!(error.field, "snapshot.items[1].attempt");
        let error = decode::<pb::DrainRequest>(br#"{"mode": "SIDEWAYS"}"#).expect_err("unknown enum name");
        assert_eq!(error.field, "mode");
    }
}
