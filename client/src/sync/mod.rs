//! Data-structure and concurrency primitives, kept apart from the domain
//! folders that use them (as tokio and neon keep `sync/`): nothing here
//! knows a queue, an event or a transport.
//!
//! - [`table`]: the open-addressing tables behind the queue's hottest
//!   indexes (decision 48 in `docs/DECISIONS.md`).

pub(crate) mod table;
