//! The size limits both ends of the contracts share: the hub enforces them
//! on what it stores, and the client derives its own request limits from
//! them, so nothing a node accepts can later be refused by the hub.
//!
//! Sizes are of protobuf encodings.

/// Largest item body a producer may enqueue. Bodies are references to work,
/// not the work itself; past this size a body belongs in object storage.
pub const MAX_ITEM_BODY_BYTES: usize = 1024 * 1024;

/// Room an event needs besides an item body: the envelope (shard, principal,
/// peer, timestamps, metadata) and the item's other fields at their limits
/// (resource type 128 bytes, resource id 512, partition key 256, request id
/// 256, 64 attributes of up to 1,152 bytes each: about 75 KiB), with room to
/// spare for a restored item's attempt history.
pub const EVENT_ENVELOPE_BYTES: usize = 256 * 1024;

/// Largest encoded `ReplicationEvent` the hub stores: an item at its limits
/// fits in one event.
pub const MAX_EVENT_BYTES: usize = MAX_ITEM_BODY_BYTES + EVENT_ENVELOPE_BYTES;

/// Largest encoded batch of events (one `AppendRequest`'s events). A
/// producer splits larger sets of events into several batches; one batch is
/// written atomically, so a single command (a restore) must fit in one.
pub const MAX_BATCH_BYTES: usize = 24 * 1024 * 1024;

/// Largest `Restore` request a node accepts: its items become `Restored`
/// events of one batch, which must stay under [`MAX_BATCH_BYTES`] with the
/// events' envelopes added. Larger drain snapshots are restored in several
/// calls (each is atomic; items already present are skipped).
pub const MAX_RESTORE_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// Largest queue snapshot the hub stores. A queue whose canonical state
/// encodes larger is not snapshotted (recovery then replays a longer tail).
pub const MAX_SNAPSHOT_BYTES: usize = 32 * 1024 * 1024;

/// Largest gRPC message on the hub's surface: a full snapshot, or a full
/// batch, plus its frame.
pub const MAX_MESSAGE_BYTES: usize = {
    let largest = if MAX_SNAPSHOT_BYTES > MAX_BATCH_BYTES { MAX_SNAPSHOT_BYTES } else { MAX_BATCH_BYTES };
    largest + 1024 * 1024
};

// The limits hold together, checked when the crate compiles: a restore
// fits in one batch even if every restored item needed an envelope of its
// own (a restore of bodies at their limit has at most this many items), a
// batch fits in one message, and an event in one batch.
const _: () = {
    let items = MAX_RESTORE_REQUEST_BYTES / MAX_ITEM_BODY_BYTES;
    assert!(MAX_RESTORE_REQUEST_BYTES + items * EVENT_ENVELOPE_BYTES <= MAX_BATCH_BYTES);
    assert!(MAX_BATCH_BYTES < MAX_MESSAGE_BYTES);
    assert!(MAX_EVENT_BYTES < MAX_BATCH_BYTES);
};
