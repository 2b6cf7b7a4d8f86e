//! What every reader checks before serving events ([`decode_page`]), and
//! walking a shard's stored log end to end with the same checks: what
//! `omnirelay-hub verify` runs. Because `verify` and the readers share these
//! checks, an event that `ReadRange` or `Subscribe` would refuse never
//! verifies `ok`.

use crate::api::wire;
use crate::defaults;
use crate::log::event::{ChainHash, CorruptEvent};
use crate::log::ids::{Sequence, ShardId};
use crate::proto::raw::RawEvent;
use crate::store::{EventPage, LogStore, StoreError};

/// Checks a page as every reader does before serving it
/// ([`EventPage::verify`]: no hole, every link and hash), and decodes each
/// event into the form served to clients, which fails for a body that does
/// not decode. Returns the first corrupt event otherwise.
pub fn decode_page(page: &EventPage) -> Result<Vec<RawEvent>, CorruptEvent> {
    page.verify()?;
    page.events.iter().map(|event| wire::event(&page.shard, event)).collect()
}

/// A hash the log must hold at a sequence, known from outside the chain:
/// a subscriber's checkpoint, a snapshot, or an anchor an operator saved
/// from an earlier run. A log rewritten consistently (every hash and the
/// head hash recomputed) still verifies as a chain; it no longer matches
/// its pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The pinned sequence.
    pub sequence: Sequence,
    /// The hash the event at `sequence` had.
    pub hash: ChainHash,
    /// Who holds the pin, for the report (`subscriber sink's checkpoint`).
    pub holder: String,
}

/// An operator's pin: `SHARD@SEQUENCE=HASH` on the command line, the hash
/// as the 64 hex characters `verify` prints (`head_hash=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The shard.
    pub shard: ShardId,
    /// The pinned sequence and hash.
    pub pin: Pin,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let form = "expected SHARD@SEQUENCE=HASH with the 64-character hex hash `verify` prints";
        let (shard, rest) = s.rsplit_once('@').ok_or_else(|| format!("{form}; got {s:?}"))?;
        let (sequence, hash) = rest.split_once('=').ok_or_else(|| format!("{form}; got {s:?}"))?;
        let shard = ShardId::parse(shard).map_err(|err| format!("{form}: {err}"))?;
        let sequence = sequence.parse::<u64>().map_err(|_| format!("{form}: {sequence:?} is not a sequence"))?;
        let hash = ChainHash::from_hex(hash).ok_or_else(|| format!("{form}: {hash:?} is not 64 hex characters"))?;
        Ok(Anchor { shard, pin: Pin { sequence: Sequence(sequence), hash, holder: "the anchor given".into() } })
    }
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
    /// The head's hash as recorded for the shard: save it (with the head)
    /// to pin the log as it is now (`--anchor SHARD@HEAD=HASH`).
    pub head_hash: ChainHash,
    /// Events checked.
    pub checked: u64,
    /// Pins (checkpoints, snapshot, anchors) compared with the log.
    pub pinned: u64,
    /// Pins below the retention low-water mark, which nothing stored can
    /// confirm any more.
    pub unverifiable: u64,
    /// The first corrupt event, if any.
    pub corrupt: Option<CorruptEvent>,
}

/// Verifies every stored event of `shard` from the low-water mark to the
/// head, with every check a reader makes ([`decode_page`]): each hash
/// matches its content and links to the one before, no sequence is
/// missing, each body decodes, the first links to the trim anchor, the last
/// is the head's hash. The log is also compared with the hashes held
/// outside the chain: every subscriber checkpoint that recorded one and the
/// newest snapshot. Stops at the first corrupt event.
pub async fn verify_shard(store: &dyn LogStore, shard: ShardId) -> Result<ShardReport, StoreError> {
    verify_shard_pinned(store, shard, Vec::new()).await
}

/// [`verify_shard`], also comparing the log with `anchors` (pins an
/// operator saved).
pub async fn verify_shard_pinned(
    store: &dyn LogStore,
    shard: ShardId,
    anchors: Vec<Pin>,
) -> Result<ShardReport, StoreError> {
    let state =
        store.shard_state(shard.clone()).await?.ok_or_else(|| StoreError::UnknownShard { shard: shard.clone() })?;
    let mut pins = anchors;
    for checkpoint in store.checkpoints(None, vec![shard.clone()]).await? {
        if let Some(hash) = checkpoint.hash {
            let holder = format!("subscriber {}'s checkpoint", checkpoint.subscriber);
            pins.push(Pin { sequence: checkpoint.sequence, hash, holder });
        }
    }
    if let Some(snapshot) = store.snapshot(shard.clone(), None).await? {
        pins.push(Pin { sequence: snapshot.sequence, hash: snapshot.hash, holder: "the newest snapshot".into() });
    }
    // Latest first, so `pop` yields them in sequence order.
    pins.sort_by_key(|pin| std::cmp::Reverse(pin.sequence));

    let mut report = ShardReport {
        shard: shard.clone(),
        low: state.low,
        head: state.lease.head,
        head_hash: state.head_hash,
        checked: 0,
        pinned: 0,
        unverifiable: 0,
        corrupt: None,
    };
    let mut next = state.low;
    let mut prev: ChainHash = state.low_prev_hash;
    // Pins at or below the anchor of the first stored event.
    if let Some(corrupt) = check_pins(&mut pins, &mut report, &shard, next.prev(), &prev) {
        report.corrupt = Some(corrupt);
        return Ok(report);
    }
    while next <= report.head {
        let page = match store
            .read_range(
                shard.clone(),
                next,
                Some(report.head),
                defaults::MAX_READ_RANGE_LIMIT,
                defaults::VERIFY_READ_BYTES,
            )
            .await
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
                if let Some(corrupt) = check_pins(&mut pins, &mut report, &shard, next.prev(), &prev) {
                    report.corrupt = Some(corrupt);
                    return Ok(report);
                }
                continue;
            }
            Err(err) => return Err(err),
        };
        let failed = decode_page(&page).err();
        // Consecutive pages must agree on the row between them (a row
        // rewritten while the walk ran would not).
        let failed = match failed {
            None if page.anchor != prev => Some(CorruptEvent {
                shard: shard.clone(),
                sequence: next,
                reason: "it does not link to the event before it".into(),
            }),
            other => other,
        };
        // The events before the first failure are valid; a pin among them
        // that does not match comes first.
        for event in page.events.iter().take_while(|e| failed.as_ref().is_none_or(|bad| e.sequence < bad.sequence)) {
            if let Some(corrupt) = check_pins(&mut pins, &mut report, &shard, event.sequence, &event.hash) {
                report.corrupt = Some(corrupt);
                return Ok(report);
            }
            report.checked += 1;
            prev = event.hash;
            next = event.sequence.next();
        }
        if let Some(corrupt) = failed {
            report.corrupt = Some(corrupt);
            return Ok(report);
        }
        if page.events.is_empty() {
            // Unreachable: an empty page with events due fails the checks above.
            break;
        }
    }
    if report.head == state.lease.head && prev != state.head_hash {
        report.corrupt = Some(CorruptEvent {
            shard: shard.clone(),
            sequence: report.head,
            reason: "its hash differs from the head hash recorded for the shard".into(),
        });
        return Ok(report);
    }
    // Pins past the head: the log lost events its holders had seen.
    if let Some(pin) = pins.pop() {
        report.corrupt = Some(CorruptEvent {
            shard,
            sequence: pin.sequence,
            reason: format!("missing: the log ends at {}, but {} holds its hash", report.head, pin.holder),
        });
    }
    Ok(report)
}

/// Compares the pins at or below `sequence` (whose event has `hash`) with
/// it; pins below it were trimmed and can no longer be confirmed.
fn check_pins(
    pins: &mut Vec<Pin>,
    report: &mut ShardReport,
    shard: &ShardId,
    sequence: Sequence,
    hash: &ChainHash,
) -> Option<CorruptEvent> {
    while pins.last().is_some_and(|pin| pin.sequence <= sequence) {
        let pin = pins.pop()?;
        if pin.sequence < sequence {
            report.unverifiable += 1;
            continue;
        }
        report.pinned += 1;
        if pin.hash != *hash {
            return Some(CorruptEvent {
                shard: shard.clone(),
                sequence,
                reason: format!("its hash {hash} differs from the hash {} that {} holds for it", pin.hash, pin.holder),
            });
        }
    }
    None
}

/// Verifies every shard whose id starts with `prefix` (all when empty).
pub async fn verify_all(store: &dyn LogStore, prefix: &str) -> Result<Vec<ShardReport>, StoreError> {
    let mut reports = Vec::new();
    for state in store.list_shards(prefix.to_string()).await? {
        reports.push(verify_shard(store, state.lease.shard).await?);
    }
    Ok(reports)
}
