//! Walking a shard's stored log and checking its hash chain end to end:
//! what `omnirelay-hub verify` runs.

use crate::defaults;
use crate::event::{self, ChainHash, CorruptEvent};
use crate::ids::{Sequence, ShardId};
use crate::store::{LogStore, StoreError};

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
        let checked = &page.events[..];
        if let Err(corrupt) = event::verify(&shard, next, &prev, checked) {
            report.corrupt = Some(corrupt);
            return Ok(report);
        }
        let Some(last) = checked.last() else {
            report.corrupt = Some(CorruptEvent {
                shard: shard.clone(),
                sequence: next,
                reason: format!("missing from the stored log (the head is {})", report.head),
            });
            return Ok(report);
        };
        report.checked += checked.len() as u64;
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
