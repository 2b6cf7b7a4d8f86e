//! [`RawEvent`]: a `ReplicationEvent` carried as the bytes it was encoded to.
//!
//! Every hub message that holds replication events (`AppendRequest`,
//! `EventBatch`, `ReadRangeResponse`) holds them as `RawEvent`s: on the wire
//! they are ordinary embedded `ReplicationEvent` messages, but in Rust they
//! keep their bytes. The hub validates an event by decoding it, then stores
//! and hashes the bytes it received, so fields a newer producer added (and
//! this build does not know) stay in the durable log; and it serves stored
//! bytes without re-encoding them. Producers and readers convert with
//! [`RawEvent::encode`] and [`RawEvent::decode`].
//!
//! [`fields`] (and [`walk`], one field at a time) walks the top-level
//! fields of an encoding, for the hub's byte-level edits (dropping the
//! fields the log assigns) and the chain hash.

use bytes::{Buf, BufMut, Bytes};
use prost::DecodeError;
use prost::encoding::{DecodeContext, WireType, decode_varint, encode_key, encode_varint};

use crate::replication::v1::ReplicationEvent;

/// A `ReplicationEvent` as its protobuf encoding. See the [module docs](self).
#[derive(Clone, Default)]
pub struct RawEvent {
    /// The encoding, once complete.
    bytes: Bytes,
    /// Fields collected while decoding, appended field by field.
    building: Vec<u8>,
}

impl RawEvent {
    /// Encodes `event`.
    pub fn encode(event: &ReplicationEvent) -> Self {
        Self::from_bytes(Bytes::from(prost::Message::encode_to_vec(event)))
    }

    /// Wraps an encoding as it is (it is not checked here).
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self { bytes, building: Vec::new() }
    }

    /// Decodes the event (fields this build does not know are dropped).
    pub fn decode(&self) -> Result<ReplicationEvent, DecodeError> {
        <ReplicationEvent as prost::Message>::decode(self.as_slice())
    }

    /// The encoding.
    pub fn as_slice(&self) -> &[u8] {
        if self.building.is_empty() { &self.bytes } else { &self.building }
    }

    /// The encoding, without a copy when it was built from bytes.
    pub fn into_bytes(self) -> Bytes {
        if self.building.is_empty() { self.bytes } else { Bytes::from(self.building) }
    }
}

impl PartialEq for RawEvent {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for RawEvent {}

impl std::fmt::Debug for RawEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.decode() {
            Ok(event) => event.fmt(f),
            Err(_) => f.debug_struct("RawEvent").field("bytes", &self.as_slice().len()).finish_non_exhaustive(),
        }
    }
}

impl prost::Message for RawEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(self.as_slice());
    }

    /// Appends the field exactly as it was read: its key, then its value
    /// (a varint re-encoded minimally, the others copied).
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if self.building.is_empty() && !self.bytes.is_empty() {
            self.building = self.bytes.to_vec();
            self.bytes = Bytes::new();
        }
        let out = &mut self.building;
        // prost's own readers check lengths and bounds, with its errors.
        match wire_type {
            WireType::Varint => {
                let mut value = 0u64;
                prost::encoding::uint64::merge(wire_type, &mut value, buf, ctx)?;
                encode_key(tag, wire_type, out);
                encode_varint(value, out);
            }
            WireType::SixtyFourBit => {
                let mut value = 0u64;
                prost::encoding::fixed64::merge(wire_type, &mut value, buf, ctx)?;
                encode_key(tag, wire_type, out);
                out.put_u64_le(value);
            }
            WireType::ThirtyTwoBit => {
                let mut value = 0u32;
                prost::encoding::fixed32::merge(wire_type, &mut value, buf, ctx)?;
                encode_key(tag, wire_type, out);
                out.put_u32_le(value);
            }
            WireType::LengthDelimited => {
                let mut value: Vec<u8> = Vec::new();
                prost::encoding::bytes::merge(wire_type, &mut value, buf, ctx)?;
                encode_key(tag, wire_type, out);
                encode_varint(value.len() as u64, out);
                out.extend_from_slice(&value);
            }
            WireType::StartGroup | WireType::EndGroup => return Err(groups_refused()),
        }
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.as_slice().len()
    }

    fn clear(&mut self) {
        self.bytes = Bytes::new();
        self.building.clear();
    }
}

/// Groups (a proto2 feature no OmniRelay message uses) cannot be kept byte
/// for byte by a reader that walks fields; an event holding one is refused.
#[allow(deprecated)] // prost offers no other way to name a decoding error of one's own
fn groups_refused() -> DecodeError {
    DecodeError::new("groups are not supported in replication events")
}

/// Why [`fields`] could not walk an encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed event encoding: {0}")]
pub struct Malformed(pub &'static str);

/// One top-level field of an encoding: its number and its whole encoding
/// (key and value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    /// The field number.
    pub tag: u32,
    /// The field's bytes, key included.
    pub bytes: &'a [u8],
    /// The value of a length-delimited field (a string, bytes, a message).
    pub value: Option<&'a [u8]>,
}

/// The top-level fields of an encoding, in order; an error for an encoding
/// that does not parse (or uses groups).
pub fn fields(encoding: &[u8]) -> Result<Vec<Field<'_>>, Malformed> {
    walk(encoding).collect()
}

/// The top-level fields of an encoding, one at a time (without collecting
/// them, for readers that look at each once); an error ends the walk.
pub fn walk(encoding: &[u8]) -> Fields<'_> {
    Fields { whole: encoding, rest: encoding }
}

/// The iterator of [`walk`].
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    whole: &'a [u8],
    rest: &'a [u8],
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            // Nothing after a malformed field can be read.
            self.rest = &[];
        }
        Some(field)
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<Field<'a>, Malformed> {
        let whole = self.whole;
        let mut encoding = self.rest;
        let start = whole.len() - encoding.len();
        let key = decode_varint(&mut encoding).map_err(|_| Malformed("a varint runs past the end"))?;
        let tag = u32::try_from(key >> 3).map_err(|_| Malformed("field number too large"))?;
        if tag == 0 {
            return Err(Malformed("field number 0"));
        }
        let mut value = None;
        match key & 7 {
            0 => {
                decode_varint(&mut encoding).map_err(|_| Malformed("a varint runs past the end"))?;
            }
            1 | 5 => {
                let len = if key & 7 == 1 { 8 } else { 4 };
                if encoding.len() < len {
                    return Err(Malformed("buffer underflow"));
                }
                encoding = &encoding[len..];
            }
            2 => {
                let len =
                    usize::try_from(decode_varint(&mut encoding).map_err(|_| Malformed("a varint runs past the end"))?)
                        .map_err(|_| Malformed("length too large"))?;
                if encoding.len() < len {
                    return Err(Malformed("buffer underflow"));
                }
                value = Some(&encoding[..len]);
                encoding = &encoding[len..];
            }
            _ => return Err(Malformed("unsupported wire type")),
        }
        self.rest = encoding;
        let end = whole.len() - encoding.len();
        Ok(Field { tag, bytes: &whole[start..end], value })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::hub::v1 as pb;
    use crate::replication::v1 as rpb;

    fn event() -> rpb::ReplicationEvent {
        rpb::ReplicationEvent {
            shard_id: "resourcelease.users".into(),
            principal: "p".into(),
            metadata: [("a".to_string(), "1".to_string())].into(),
            event: Some(rpb::replication_event::Event::Completed(rpb::Completed {
                item_id: "i".into(),
                fencing_token: 7,
            })),
            ..Default::default()
        }
    }

    #[test]
    fn events_in_hub_messages_keep_their_bytes_unknown_fields_included() {
        // A newer producer's event: a field this build does not know (99).
        let mut bytes = event().encode_to_vec();
        encode_key(99, WireType::LengthDelimited, &mut bytes);
        encode_varint(3, &mut bytes);
        bytes.extend_from_slice(b"new");
        let request =
            pb::AppendRequest { events: vec![RawEvent::from_bytes(Bytes::from(bytes.clone()))], ..Default::default() };
        let decoded = pb::AppendRequest::decode(request.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.events[0].as_slice(), bytes.as_slice(), "the bytes survive decoding, field 99 included");
        assert_eq!(decoded.events[0].decode().expect("decodes"), event());
        let tags: Vec<u32> = fields(decoded.events[0].as_slice()).expect("parses").iter().map(|f| f.tag).collect();
        assert_eq!(tags.last(), Some(&99));
    }

    #[test]
    fn a_raw_event_is_an_ordinary_message_on_the_wire() {
        let raw = pb::EventBatch { shard_id: "s".into(), events: vec![RawEvent::encode(&event())] };
        // A reader that knows only the ordinary message reads it as such.
        #[derive(Clone, PartialEq, prost::Message)]
        struct PlainBatch {
            #[prost(string, tag = "1")]
            shard_id: String,
            #[prost(message, repeated, tag = "2")]
            events: Vec<rpb::ReplicationEvent>,
        }
        let plain = PlainBatch::decode(raw.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(plain.events, vec![event()]);
    }

    #[test]
    fn malformed_encodings_are_refused() {
        assert!(fields(&[0x0a, 0x05, b'a']).is_err(), "a length past the end");
        assert!(fields(&[0x00]).is_err(), "field number 0");
        assert!(pb::AppendRequest::decode([0x32, 0x02, 0x0b, 0x0c].as_slice()).is_err(), "a group inside an event");
    }
}
