//! What every reader checks before serving events ([`decode_page`]), and
//! walking a shard's stored log end to end with the same checks: what
//! `omnirelay-hub verify` runs. Because `verify` and the readers share these
//! checks, an event that `ReadRange` or `Subscribe` would refuse never
//! verifies `ok`.

use crate::defaults;
use crate::event::{ChainHash, CorruptEvent};
use crate::ids::{Sequence, ShardId};
use crate::proto::replication::v1 as rpb;
use crate::store::{EventPage, LogStore, StoreError};
use crate::wire;

/// Checks a page as every reader does before serving it
/// ([`EventPage::verify`]: no hole, every link and hash), and decodes each
/// event into the form served to clients, which fails for a body that does
/// not decode. Returns the first corrupt event otherwise.
pub fn decode_page(page: &EventPage) -> Result<Vec<rpb::ReplicationEvent>, CorruptEvent> {
    page.verify()?;
    page.events.iter().map(|event| wire::event(&page.shard, event)).collect()
}

/// Outcome of verifying one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReport {
    /// Shard.
    pub shard: ShardId,
    /// Lowest stored sequence.
    pub low: Sequence,
    /// Head when the walk ended.
    pub head: Sequence,
    /// Events checked.
    pub checked: u64,
    /// The first corrupt event, if any.
    pub corrupt: Option<CorruptEvent>,
}

/// Verifies every stored event of `shard` from the low-water mark to the
/// head: each hash matches its content and links to the one before, no
/// sequence is missing, the first links to the trim anchor, the last is the
/// head's hash. Stops at the first corrupt event.
pub async fn verify_shard(store: &dyn LogStore, shard: ShardId) -> Result<ShardReport, StoreError> {
    let state =
        store.shard_state(shard.clone()).await?.ok_or_else(|| StoreError::UnknownShard { shard: shard.clone() })?;
    let mut report =
        ShardReport { shard: shard.clone(), low: state.low, head: state.lease.head, checked: 0, corrupt: None };
    let mut next = state.low;
    let mut prev: ChainHash = state.low_prev_hash;
    while next <= report.head {
        let page = match store.read_range(shard.clone(), next, Some(report.head), defaults::MAX_READ_RANGE_LIMIT).await
        {
            Ok(page) => page,
            // Retention moved on while we walked: continue from its mark.
            Err(StoreError::Trimmed { low, .. }) => {
                let state = store
                    .shard_state(shard.clone())
                    .await?
                    .ok_or_else(|| StoreError::UnknownShard { shard: shard.clone() })?;
                next = low;
                prev = state.low_prev_hash;
                report.low = low;
                continue;
            }
            Err(err) => return Err(err),
        };
        if let Err(corrupt) = decode_page(&page) {
            report.corrupt = Some(corrupt);
            return Ok(report);
        }
        // Consecutive pages must agree on the row between them (a row
        // rewritten while the walk ran would not).
        if page.anchor != prev {
            report.corrupt = Some(CorruptEvent {
                shard: shard.clone(),
                sequence: next,
                reason: "it does not link to the event before it".into(),
            });
            return Ok(report);
        }
        let Some(last) = page.events.last() else {
            // Unreachable: an empty page with events due fails the check above.
            break;
        };
        report.checked += page.events.len() as u64;
        prev = last.hash;
        next = last.sequence.next();
    }
    if report.head == state.lease.head && report.checked > 0 && prev != state.head_hash {
        report.corrupt = Some(CorruptEvent {
            shard: shard.clone(),
            sequence: report.head,
            reason: "its hash differs from the head hash recorded for the shard".into(),
        });
    }
    Ok(report)
}

/// Verifies every shard whose id starts with `prefix` (all when empty).
pub async fn verify_all(store: &dyn LogStore, prefix: &str) -> Result<Vec<ShardReport>, StoreError> {
    let mut reports = Vec::new();
    for state in store.list_shards(prefix.to_string()).await? {
        reports.push(verify_shard(store, state.lease.shard).await?);
    }
    Ok(reports)
}
