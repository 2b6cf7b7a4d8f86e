//! `omnirelay subscribers lag`, `verify`, `snapshot show` and `inspect`: a
//! hub's logs, read over its gRPC API (`GetCheckpoints`, `ReadRange`,
//! `GetSnapshot`), as a caller with the hub's `operator` role (or any
//! loopback caller of a hub in protected mode).
//!
//! `inspect --at` is time travel: the queue's state at a sequence or a
//! time, rebuilt by the client's own recovery
//! ([`omnirelay_client::queue::replay`]) from the newest snapshot at or
//! before that point plus the events up to it.

use std::time::SystemTime;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use omnirelay_client::queue::{ReplayProgress, Until, replay};
use omnirelay_client::replication::StoredSnapshot;
use omnirelay_client::sink::chain::ShardChain;
use omnirelay_client::{QueueState, Sequence, ShardId, Timestamp};
use omnirelay_proto::hub::v1 as pb;
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::{Outcome, progress_bar, rfc3339};
use crate::control::REQUEST_TIMEOUT;
use crate::sink::HubArgs;

/// Exit status of `verify` when the chain is broken (as `omnirelay-hub
/// verify`).
pub const EXIT_CORRUPT: u8 = 1;
/// Exit status of `verify` (and `inspect`) for a shard the hub does not
/// have (as `omnirelay-hub verify`).
pub const EXIT_NO_SUCH_SHARD: u8 = 3;
/// Exit status of `verify` when it could not read the log to the end (the
/// hub unreachable, the caller refused): nothing is known about the chain.
pub const EXIT_UNVERIFIED: u8 = 4;

/// Events asked for in one `ReadRange` call while verifying (the hub caps
/// it at its own maximum).
pub const VERIFY_PAGE_EVENTS: u32 = 1_000;

/// Checkpoints asked for in one `GetCheckpoints` call.
pub const CHECKPOINT_PAGE: u32 = 1_000;

/// Most snapshots `inspect --at <time>` steps back through to find one
/// taken before that time (each step is two calls); past it the replay
/// starts from the log's first event.
pub const MAX_SNAPSHOT_STEPS: usize = 32;

/// Most items of each kind `inspect` lists unless `--limit` says otherwise.
pub const DEFAULT_ITEMS: usize = 100;

/// `omnirelay subscribers ...`.
#[derive(Debug, Subcommand)]
pub enum SubscribersCommand {
    /// Each checkpoint with its shard's head and the lag in events and in
    /// seconds (the age of the oldest event the subscriber has not
    /// processed).
    Lag {
        /// The hub.
        #[command(flatten)]
        hub: HubArgs,
        /// Only this subscriber.
        #[arg(long)]
        subscriber: Option<String>,
        /// Only these shards (repeat, or comma-separate).
        #[arg(long = "shard", value_delimiter = ',')]
        shards: Vec<String>,
    },
}

/// `omnirelay snapshot ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// The newest snapshot of a shard (or the newest at or below a
    /// sequence): its sequence, size and the queue it holds.
    Show {
        /// The hub.
        #[command(flatten)]
        hub: HubArgs,
        /// The shard.
        shard: String,
        /// The newest snapshot at or below this sequence instead.
        #[arg(long)]
        at_or_below: Option<u64>,
        /// Write the snapshot's bytes (the queue's state encoding) here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// `omnirelay verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The hub.
    #[command(flatten)]
    pub hub: HubArgs,
    /// The shard.
    pub shard: String,
}

/// `omnirelay inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The hub.
    #[command(flatten)]
    pub hub: HubArgs,
    /// The shard (the queue's namespace).
    pub shard: String,
    /// The point of the log: a sequence (`42`) or an RFC 3339 time
    /// (`2026-01-01T12:00:00Z`); the head when absent.
    #[arg(long)]
    pub at: Option<String>,
    /// Most items of each kind to list.
    #[arg(long, default_value_t = DEFAULT_ITEMS)]
    pub limit: usize,
}

/// A call to the hub, bounded by [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!("{what}: no answer within {REQUEST_TIMEOUT:?}"))),
    }
}

async fn read_range(
    client: &mut pb::hub_client::HubClient<Channel>,
    shard: &str,
    from: u64,
    to: u64,
    limit: u32,
) -> Result<pb::ReadRangeResponse, tonic::Status> {
    let request = pb::ReadRangeRequest { shard_id: shard.to_string(), from_sequence: from, to_sequence: to, limit };
    bounded("read the log", client.read_range(request)).await
}

/// Whether a hub status reports a corrupt log (the hub names the first bad
/// sequence and refuses to serve it) rather than its own failure.
fn is_corrupt(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Internal && status.message().contains("omnirelay-hub verify")
}

/// Nanoseconds since the epoch of a protobuf timestamp (`None` before 1970
/// or past 2554).
fn nanos(time: &omnirelay_proto::Timestamp) -> Option<u64> {
    u64::try_from(time.seconds).ok()?.checked_mul(1_000_000_000)?.checked_add(u64::try_from(time.nanos).ok()?)
}

fn recorded_at(event: &omnirelay_proto::raw::RawEvent) -> Option<u64> {
    nanos(&event.decode().ok()?.recorded_at?)
}

fn now_nanos() -> u64 {
    Timestamp::from_system_time(SystemTime::now()).as_unix_nanos()
}

/// Runs `subscribers lag`.
pub async fn subscribers(command: SubscribersCommand) -> anyhow::Result<Outcome> {
    let SubscribersCommand::Lag { hub, subscriber, shards } = command;
    let mut client = hub.client()?;
    let mut checkpoints = Vec::new();
    let mut token = String::new();
    loop {
        let request = pb::GetCheckpointsRequest {
            subscriber_id: subscriber.clone().unwrap_or_default(),
            shard_ids: shards.clone(),
            page_size: CHECKPOINT_PAGE,
            page_token: token,
        };
        let page = bounded("read the checkpoints", client.get_checkpoints(request))
            .await
            .map_err(|status| anyhow!("the hub refused GetCheckpoints: {} ({:?})", status.message(), status.code()))?;
        checkpoints.extend(page.checkpoints);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let now = now_nanos();
    let mut rows = Vec::new();
    for checkpoint in &checkpoints {
        rows.push(lag_of(&mut client, checkpoint, now).await);
    }
    let mut text = format!(
        "{:<24} {:<32} {:>10} {:>10} {:>10} {:>10}  UPDATED_AT\n",
        "SUBSCRIBER", "SHARD", "CHECKPOINT", "HEAD", "LAG", "LAG_S"
    );
    for row in &rows {
        let number = |key: &str| row[key].as_u64().map_or_else(|| "-".to_string(), |n| n.to_string());
        text.push_str(&format!(
            "{:<24} {:<32} {:>10} {:>10} {:>10} {:>10}  {}{}\n",
            row["subscriber"].as_str().unwrap_or(""),
            row["shard"].as_str().unwrap_or(""),
            number("checkpoint"),
            number("head"),
            number("lag_events"),
            row["lag_seconds"].as_f64().map_or_else(|| "-".to_string(), |s| format!("{s:.1}")),
            row["updated_at"].as_str().unwrap_or(""),
            row["error"].as_str().map(|e| format!("  ({e})")).unwrap_or_default(),
        ));
    }
    if rows.is_empty() {
        text.push_str("no checkpoints\n");
    }
    Ok(Outcome::ok(json!({ "checkpoints": rows }), text))
}

/// One checkpoint's row: its shard's head, and the lag in events and in
/// seconds (now minus the recording time of the oldest unprocessed event;
/// zero when caught up).
async fn lag_of(client: &mut pb::hub_client::HubClient<Channel>, checkpoint: &pb::Checkpoint, now: u64) -> Value {
    let updated = checkpoint.updated_at.as_ref().and_then(nanos).map(rfc3339);
    let mut row = json!({
        "subscriber": checkpoint.subscriber_id,
        "shard": checkpoint.shard_id,
        "checkpoint": checkpoint.sequence,
        "updated_at": updated,
        "head": null,
        "lag_events": null,
        "lag_seconds": null,
    });
    let next = read_range(client, &checkpoint.shard_id, checkpoint.sequence + 1, 0, 1).await;
    let (head, oldest) = match next {
        Ok(page) => (page.head_sequence, page.events.first().and_then(recorded_at)),
        // Caught up: nothing after the checkpoint; read its own event for the head.
        Err(status) if status.code() == tonic::Code::OutOfRange && checkpoint.sequence > 0 => {
            match read_range(client, &checkpoint.shard_id, checkpoint.sequence, 0, 1).await {
                Ok(page) => (page.head_sequence, None),
                Err(status) => {
                    row["error"] = json!(status.message());
                    return row;
                }
            }
        }
        Err(status) => {
            row["error"] = json!(status.message());
            return row;
        }
    };
    let lag = head.saturating_sub(checkpoint.sequence);
    row["head"] = json!(head);
    row["lag_events"] = json!(lag);
    row["lag_seconds"] = match (lag, oldest) {
        (0, _) => json!(0.0),
        (_, Some(at)) => json!(now.saturating_sub(at) as f64 / 1e9),
        (_, None) => Value::Null,
    };
    row
}

/// Runs `verify`: reads the shard's whole log (from its first stored
/// event, or its newest snapshot when retention trimmed the start) and
/// checks every event's hash and link on this side too. Exit status 0
/// when intact, [`EXIT_CORRUPT`], [`EXIT_NO_SUCH_SHARD`] or
/// [`EXIT_UNVERIFIED`].
pub async fn verify(args: VerifyArgs) -> anyhow::Result<Outcome> {
    let shard = args.shard.clone();
    let mut client = args.hub.client()?;
    let unverified = |why: String| Outcome {
        json: json!({ "shard": shard, "result": "unverified", "error": why }),
        text: format!("UNVERIFIED {shard}: {why}\n"),
        code: EXIT_UNVERIFIED,
    };
    let corrupt = |why: String| Outcome {
        json: json!({ "shard": shard, "result": "corrupt", "error": why }),
        text: format!("CORRUPT    {shard}: {why}\n"),
        code: EXIT_CORRUPT,
    };
    let classify = |status: tonic::Status| match status.code() {
        tonic::Code::NotFound => Outcome {
            json: json!({ "shard": shard, "result": "no_such_shard" }),
            text: format!("no such shard {shard} on the hub; nothing to verify\n"),
            code: EXIT_NO_SUCH_SHARD,
        },
        _ if is_corrupt(&status) => corrupt(status.message().to_string()),
        code => unverified(format!("{} ({code:?})", status.message())),
    };
    // Where the chain starts: the first event, or the newest snapshot when
    // the events before it were trimmed.
    let (mut chain, mut from, trimmed) = match read_range(&mut client, &shard, 1, 0, 1).await {
        Ok(_) => (ShardChain::new(ShardId::from(shard.as_str()), Sequence::ZERO, None), 1, false),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            let request = pb::GetSnapshotRequest { shard_id: shard.clone(), at_or_below: 0 };
            match bounded("read the snapshot", client.get_snapshot(request)).await {
                Ok(pb::GetSnapshotResponse { snapshot: Some(snapshot) }) => {
                    let mut chain = ShardChain::new(ShardId::from(shard.as_str()), Sequence::ZERO, None);
                    if let Err(err) = chain.admit_snapshot(Sequence::new(snapshot.sequence), snapshot.hash) {
                        return Ok(corrupt(err.to_string()));
                    }
                    (chain, snapshot.sequence + 1, true)
                }
                Ok(_) => {
                    return Ok(corrupt("the log's first events were trimmed and no snapshot replaces them".into()));
                }
                Err(status) => return Ok(classify(status)),
            }
        }
        Err(status) if status.code() == tonic::Code::OutOfRange => {
            let json = json!({ "shard": shard, "result": "intact", "events": 0, "head": 0 });
            return Ok(Outcome::ok(json, format!("ok         {shard} events=0 head=0\n")));
        }
        Err(status) => return Ok(classify(status)),
    };
    let bar = progress_bar(0, "verify");
    let mut head = None;
    let mut checked = 0u64;
    loop {
        let page = match read_range(&mut client, &shard, from, head.unwrap_or(0), VERIFY_PAGE_EVENTS).await {
            Ok(page) => page,
            // Nothing after the position: the walk is at the head.
            Err(status) if status.code() == tonic::Code::OutOfRange => break,
            Err(status) => {
                bar.finish_and_clear();
                return Ok(classify(status));
            }
        };
        // The head when the walk began: events appended meanwhile are the
        // next run's.
        let end = *head.get_or_insert(page.head_sequence);
        bar.set_length(end);
        if page.events.is_empty() {
            if chain.position().get() < end {
                bar.finish_and_clear();
                return Ok(corrupt(format!("the log's head is {end} but no event follows {}", chain.position())));
            }
            break;
        }
        match chain.admit(&page.events) {
            Ok(admitted) => checked += admitted.len() as u64,
            Err(err) => {
                bar.finish_and_clear();
                return Ok(corrupt(err.to_string()));
            }
        }
        bar.set_position(chain.position().get());
        if chain.position().get() >= end {
            break;
        }
        from = chain.position().get() + 1;
    }
    bar.finish_and_clear();
    let head = head.unwrap_or(chain.position().get());
    let hash = chain.hash().map(|hash| hash.iter().map(|b| format!("{b:02x}")).collect::<String>()).unwrap_or_default();
    let json = json!({
        "shard": shard, "result": "intact", "events": checked, "head": head, "head_hash": hash,
        "from_snapshot": trimmed,
    });
    let text = format!(
        "ok         {shard} events={checked} head={head} head_hash={hash}{}\n",
        if trimmed { " (from the newest snapshot; earlier events were trimmed)" } else { "" }
    );
    Ok(Outcome::ok(json, text))
}

/// Runs `snapshot show`.
pub async fn snapshot(command: SnapshotCommand) -> anyhow::Result<Outcome> {
    let SnapshotCommand::Show { hub, shard, at_or_below, out } = command;
    let mut client = hub.client()?;
    let request = pb::GetSnapshotRequest { shard_id: shard.clone(), at_or_below: at_or_below.unwrap_or(0) };
    let response = bounded("read the snapshot", client.get_snapshot(request))
        .await
        .map_err(|status| anyhow!("the hub refused GetSnapshot: {} ({:?})", status.message(), status.code()))?;
    let Some(snapshot) = response.snapshot else {
        return Ok(Outcome {
            json: json!({ "shard": shard, "snapshot": null }),
            text: format!("no snapshot of {shard}\n"),
            code: EXIT_NO_SUCH_SHARD,
        });
    };
    let created = snapshot.created_at.as_ref().and_then(nanos).map(rfc3339);
    let hash: String = snapshot.hash.iter().map(|b| format!("{b:02x}")).collect();
    let state = QueueState::decode(&snapshot.data).ok();
    if let Some(path) = &out {
        std::fs::write(path, &snapshot.data).with_context(|| format!("write {}", path.display()))?;
    }
    let json = json!({
        "shard": shard,
        "sequence": snapshot.sequence,
        "bytes": snapshot.data.len(),
        "created_at": created,
        "hash": hash,
        "queue": state.as_ref().map(|state| json!({
            "pending": state.pending(), "active": state.active(), "dead_letters": state.dead_letters(),
        })),
        "out": out,
    });
    let mut text = format!(
        "snapshot of {shard} at sequence {}: {} bytes, stored {}, hash {hash}\n",
        snapshot.sequence,
        snapshot.data.len(),
        created.as_deref().unwrap_or("-"),
    );
    match &state {
        Some(state) => text.push_str(&format!(
            "  queue: pending {}, leased {}, dead letters {}\n",
            state.pending(),
            state.active(),
            state.dead_letters()
        )),
        None => text.push_str("  the snapshot does not decode as a queue state\n"),
    }
    if let Some(path) = &out {
        text.push_str(&format!("  written to {}\n", path.display()));
    }
    Ok(Outcome::ok(json, text))
}

/// Reads `--at`: a sequence, or an RFC 3339 time.
pub fn parse_at(at: Option<&str>) -> anyhow::Result<Until> {
    let Some(at) = at else { return Ok(Until::Head) };
    if let Ok(sequence) = at.parse::<u64>() {
        return Ok(Until::Sequence(Sequence::new(sequence)));
    }
    let time = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .map_err(|err| anyhow!("--at {at:?}: neither a sequence nor an RFC 3339 time ({err})"))?;
    let nanos = u64::try_from(time.unix_timestamp_nanos()).map_err(|_| anyhow!("--at {at:?}: before 1970"))?;
    Ok(Until::Time(Timestamp::from_unix_nanos(nanos)))
}

fn stored(snapshot: pb::Snapshot) -> StoredSnapshot {
    StoredSnapshot {
        sequence: Sequence::new(snapshot.sequence),
        data: snapshot.data,
        hash: (!snapshot.hash.is_empty()).then(|| Bytes::clone(&snapshot.hash)),
    }
}

/// The newest snapshot at or before `until` (see [`MAX_SNAPSHOT_STEPS`]).
async fn snapshot_before(
    client: &mut pb::hub_client::HubClient<Channel>,
    shard: &str,
    until: Until,
) -> anyhow::Result<Option<StoredSnapshot>> {
    let get = |at_or_below: u64| pb::GetSnapshotRequest { shard_id: shard.to_string(), at_or_below };
    let refused =
        |status: tonic::Status| anyhow!("the hub refused GetSnapshot: {} ({:?})", status.message(), status.code());
    match until {
        Until::Head => {
            Ok(bounded("read the snapshot", client.get_snapshot(get(0))).await.map_err(refused)?.snapshot.map(stored))
        }
        Until::Sequence(sequence) if sequence == Sequence::ZERO => Ok(None),
        Until::Sequence(sequence) => Ok(bounded("read the snapshot", client.get_snapshot(get(sequence.get())))
            .await
            .map_err(refused)?
            .snapshot
            .map(stored)),
        Until::Time(time) => {
            let mut below = 0;
            for _ in 0..MAX_SNAPSHOT_STEPS {
                let Some(snapshot) =
                    bounded("read the snapshot", client.get_snapshot(get(below))).await.map_err(refused)?.snapshot
                else {
                    return Ok(None);
                };
                // The snapshot fits when its last event was recorded by then.
                let last = read_range(client, shard, snapshot.sequence, snapshot.sequence, 1).await;
                let fits = match last {
                    Ok(page) => page.events.first().and_then(recorded_at).is_some_and(|at| at <= time.as_unix_nanos()),
                    // Trimmed: only this snapshot remains of that part of the log.
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => snapshot
                        .created_at
                        .as_ref()
                        .and_then(nanos)
                        .is_some_and(|created| created <= time.as_unix_nanos()),
                    Err(status) => bail!("read the log: {} ({:?})", status.message(), status.code()),
                };
                if fits {
                    return Ok(Some(stored(snapshot)));
                }
                if snapshot.sequence <= 1 {
                    return Ok(None);
                }
                below = snapshot.sequence - 1;
            }
            Ok(None)
        }
    }
}

/// Runs `inspect`: the queue's state at `--at`, replayed.
pub async fn inspect(args: InspectArgs) -> anyhow::Result<Outcome> {
    let until = parse_at(args.at.as_deref())?;
    let shard = ShardId::from(args.shard.as_str());
    let mut client = args.hub.client()?;
    let head = match read_range(&mut client, &args.shard, 1, 0, 1).await {
        Ok(page) => page.head_sequence,
        Err(status) if status.code() == tonic::Code::NotFound => {
            return Ok(Outcome {
                json: json!({ "shard": args.shard, "result": "no_such_shard" }),
                text: format!("no such shard {} on the hub\n", args.shard),
                code: EXIT_NO_SUCH_SHARD,
            });
        }
        // Trimmed or empty: the replay finds out what it can read.
        Err(status) if matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::OutOfRange) => 0,
        Err(status) => bail!("the hub refused ReadRange: {} ({:?})", status.message(), status.code()),
    };
    let snapshot = snapshot_before(&mut client, &args.shard, until).await?;
    let from = snapshot.as_ref().map_or(0, |snapshot| snapshot.sequence.get());
    let replicator = args.hub.replicator()?;
    let target = |head: u64| match until {
        Until::Sequence(sequence) => sequence.get().min(head.max(from)),
        Until::Head | Until::Time(_) => head,
    };
    let bar = progress_bar(target(head).saturating_sub(from), "replay");
    // The first read may not have seen the head (a trimmed start): each
    // page of the replay reports it.
    let mut head = head;
    let mut progress = |step: ReplayProgress| {
        head = head.max(step.head.get());
        bar.set_length(target(head).saturating_sub(from));
        bar.set_position(step.at.get().saturating_sub(from));
    };
    let rebuilt = replay(&replicator, &shard, snapshot, until, &mut progress)
        .await
        .with_context(|| format!("replay shard {shard}"))?;
    bar.finish_and_clear();
    let view = omnirelay_client::node::queue_view(&rebuilt.state, args.limit);
    let requested = match until {
        Until::Head => json!("head"),
        Until::Sequence(sequence) => json!(sequence.get()),
        Until::Time(time) => json!(rfc3339(time.as_unix_nanos())),
    };
    let json = json!({
        "shard": args.shard,
        "at": requested,
        "sequence": rebuilt.state.last_sequence().get(),
        "head": head,
        "snapshot": (rebuilt.snapshot != Sequence::ZERO).then(|| rebuilt.snapshot.get()),
        "replayed": rebuilt.replayed,
        "state": view,
    });
    let mut text = format!(
        "{} at {}: sequence {} of {head} ({}{} events replayed)\n",
        args.shard,
        args.at.as_deref().unwrap_or("head"),
        rebuilt.state.last_sequence(),
        if rebuilt.snapshot == Sequence::ZERO {
            String::new()
        } else {
            format!("snapshot at {}, then ", rebuilt.snapshot)
        },
        rebuilt.replayed,
    );
    text.push_str(&super::queue::render_queue(&json["state"]));
    Ok(Outcome::ok(json, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_is_a_sequence_or_an_rfc3339_time() {
        assert_eq!(parse_at(None).expect("head"), Until::Head);
        assert_eq!(parse_at(Some("42")).expect("sequence"), Until::Sequence(Sequence::new(42)));
        assert_eq!(
            parse_at(Some("1970-01-01T00:00:01.5Z")).expect("time"),
            Until::Time(Timestamp::from_unix_nanos(1_500_000_000))
        );
        let err = parse_at(Some("yesterday")).expect_err("refused");
        assert!(err.to_string().contains("--at"), "{err}");
    }
}
