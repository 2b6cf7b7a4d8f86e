//! From the log to subscribers: the live tail of each followed shard
//! (`tail`), subscriptions (`subscribe`: catch-up, live tail, fallback,
//! snapshots, with its outbox) and the one memory budget they share
//! (`budget`).

pub(crate) mod budget;
pub(crate) mod subscribe;
pub(crate) mod tail;
