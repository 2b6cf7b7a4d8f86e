//! Integrity: a row corrupted directly in SQL is detected by every reader
//! and by `omnirelay-hub verify`, and never served as valid (invariant 7).

use std::time::Duration;

use omnirelay_hub::event::ChainHash;
use omnirelay_hub::ids::{Epoch, Sequence, ShardId};
use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::proto::hub::v1::hub_client::HubClient;
use omnirelay_hub::verify;
use omnirelay_tests::TestDb;
use tonic::transport::Channel;

use crate::support::{self, Appender, TestHub, ack, acquire, batch};

const LONG: Duration = Duration::from_secs(60);

async fn ten_events(hub: &TestHub, shard: &str) {
    let mut client = hub.client().await;
    let epoch = acquire(&mut client, shard, "node-a", LONG).await;
    let mut appender = Appender::open(&mut client).await;
    for seq in 1..=10u64 {
        ack(appender.append(batch(shard, "p", seq, epoch, &[&format!("item-{seq}")])).await);
    }
}

/// Runs `omnirelay-hub verify` and returns its exit code and output.
async fn verify_command(url: &str, shard: Option<&str>) -> (i32, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_omnirelay-hub"));
    command.arg("verify").arg("--database-url").arg(url);
    if let Some(shard) = shard {
        command.arg("--shard").arg(shard);
    }
    let output = command.output().await.expect("run omnirelay-hub verify");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test]
async fn a_row_corrupted_in_sql_is_detected_by_readers_and_by_verify() {
    let (store, db) = support::fresh_store().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.corrupt";
    ten_events(&hub, shard).await;
    ten_events(&hub, "resourcelease.healthy").await;
    let (code, output) = verify_command(db.url(), None).await;
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("ok       resourcelease.corrupt events=10"), "{output}");

    // Flip one byte of event 6's body, leaving its stored hash alone.
    db.client()
        .await
        .execute(
            "UPDATE events SET body = set_byte(body, 3, get_byte(body, 3) # 1)
             WHERE sequence = 6 AND shard_no = (SELECT shard_no FROM shards WHERE shard_id = $1)",
            &[&shard],
        )
        .await
        .expect("corrupt a row");

    let mut client = hub.client().await;
    let err = client
        .read_range(pb::ReadRangeRequest { shard_id: shard.into(), from_sequence: 1, to_sequence: 0, limit: 0 })
        .await
        .expect_err("a range holding the corrupt event must fail");
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(err.message().contains("sequence 6"), "{}", err.message());
    let before = client
        .read_range(pb::ReadRangeRequest { shard_id: shard.into(), from_sequence: 1, to_sequence: 5, limit: 0 })
        .await
        .expect("the events before it are intact")
        .into_inner();
    assert_eq!(before.events.len(), 5);

    // A subscriber gets the valid prefix, then an error naming the event.
    let mut frames = client
        .subscribe(pb::SubscribeRequest {
            subscriber_id: "sink".into(),
            shard_ids: vec![shard.into()],
            start: Some(pb::StartPosition { position: Some(pb::start_position::Position::AfterSequence(0)) }),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut delivered = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), frames.message()).await.expect("a frame within 30 s") {
            Ok(Some(pb::SubscribeResponse { frame: Some(pb::subscribe_response::Frame::Events(batch)) })) => {
                delivered.extend(support::decoded(&batch.events).into_iter().map(|e| e.sequence));
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without reporting the corruption"),
            Err(status) => break status,
        }
    };
    assert_eq!(delivered, vec![1, 2, 3, 4, 5], "the valid prefix and never the corrupt event");
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("sequence 6"), "{}", status.message());

    let report = verify::verify_shard(&store, ShardId::parse(shard).expect("valid")).await.expect("verify");
    assert_eq!(report.corrupt.expect("corruption found").sequence.0, 6);
    let (code, output) = verify_command(db.url(), Some(shard)).await;
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("first corrupt sequence 6"), "{output}");
    let (code, output) = verify_command(db.url(), None).await;
    assert_eq!(code, 1);
    assert!(output.contains("ok       resourcelease.healthy"), "other shards still verify: {output}");
    hub.stop().await;
    omnirelay_hub::store::LogStore::close(&store).await.expect("close");
}

#[tokio::test]
async fn deleted_or_relinked_rows_are_reported_at_the_first_bad_sequence() {
    let (store, db) = support::fresh_store().await;
    let hub = TestHub::start(db.url()).await;
    ten_events(&hub, "resourcelease.gap").await;
    ten_events(&hub, "resourcelease.hash").await;
    ten_events(&hub, "resourcelease.truncated").await;
    let sql = db.client().await;
    let shard_no = "(SELECT shard_no FROM shards WHERE shard_id = $1)";
    sql.execute(&format!("DELETE FROM events WHERE sequence = 4 AND shard_no = {shard_no}"), &[&"resourcelease.gap"])
        .await
        .expect("delete a row");
    sql.execute(
        &format!(
            "UPDATE events SET hash = decode(repeat('ab', 32), 'hex') WHERE sequence = 8 AND shard_no = {shard_no}"
        ),
        &[&"resourcelease.hash"],
    )
    .await
    .expect("overwrite a hash");
    sql.execute(
        &format!("DELETE FROM events WHERE sequence >= 9 AND shard_no = {shard_no}"),
        &[&"resourcelease.truncated"],
    )
    .await
    .expect("truncate the log");

    let reports = verify::verify_all(&store, "resourcelease.").await.expect("verify");
    let first_bad: Vec<(String, Option<u64>)> =
        reports.iter().map(|r| (r.shard.to_string(), r.corrupt.as_ref().map(|c| c.sequence.0))).collect();
    assert_eq!(
        first_bad,
        vec![
            ("resourcelease.gap".to_string(), Some(4)),
            ("resourcelease.hash".to_string(), Some(8)),
            ("resourcelease.truncated".to_string(), Some(9)),
        ]
    );

    let mut client = hub.client().await;
    let err = client
        .read_range(pb::ReadRangeRequest {
            shard_id: "resourcelease.gap".into(),
            from_sequence: 2,
            to_sequence: 0,
            limit: 0,
        })
        .await
        .expect_err("a gap is corruption");
    assert!(err.message().contains("sequence 4"), "{}", err.message());
    hub.stop().await;
    omnirelay_hub::store::LogStore::close(&store).await.expect("close");
}

/// Rewrites a shard's events from `from` to its head the way a forger with
/// write access to the database would: each body replaced by what `body`
/// returns for it, every hash from there on recomputed with the documented
/// formula, and the shard's head hash moved to match, so the chain inside
/// the database is consistent again.
async fn forge(db: &TestDb, shard: &str, from: u64, mut body: impl FnMut(u64, Vec<u8>) -> Vec<u8>) {
    let sql = db.client().await;
    let rows = sql
        .query(
            "SELECT e.sequence, e.epoch, e.body, e.hash FROM events e JOIN shards s USING (shard_no)
             WHERE s.shard_id = $1 AND e.sequence >= $2::bigint - 1 ORDER BY e.sequence",
            &[&shard, &(from as i64)],
        )
        .await
        .expect("read the rows to forge");
    let mut prev = ChainHash::ZERO;
    for row in rows {
        let (sequence, epoch, old, hash): (i64, i64, Vec<u8>, Vec<u8>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if (sequence as u64) < from {
            prev = ChainHash::from_slice(&hash).expect("a stored hash");
            continue;
        }
        let new = body(sequence as u64, old);
        let forged = ChainHash::compute(&prev, Sequence(sequence as u64), Epoch(epoch as u64), &new);
        sql.execute(
            "UPDATE events SET body = $3, hash = $4
             WHERE sequence = $2 AND shard_no = (SELECT shard_no FROM shards WHERE shard_id = $1)",
            &[&shard, &sequence, &new, &forged.as_bytes().as_slice()],
        )
        .await
        .expect("rewrite a row");
        prev = forged;
    }
    sql.execute("UPDATE shards SET head_hash = $2 WHERE shard_id = $1", &[&shard, &prev.as_bytes().as_slice()])
        .await
        .expect("move the head hash");
}

/// Reads `[from, to]` (0: to the head) and returns the error's code and
/// message, or the sequences read.
async fn read(
    client: &mut HubClient<Channel>,
    shard: &str,
    from: u64,
    to: u64,
) -> Result<Vec<u64>, (tonic::Code, String)> {
    client
        .read_range(pb::ReadRangeRequest { shard_id: shard.into(), from_sequence: from, to_sequence: to, limit: 0 })
        .await
        .map(|response| support::decoded(&response.into_inner().events).iter().map(|e| e.sequence).collect())
        .map_err(|status| (status.code(), status.message().to_string()))
}

/// Subscribes to `shard` after `after` and returns what was delivered before
/// the stream failed, and the failure.
async fn subscribe_until_failure(
    client: &mut HubClient<Channel>,
    shard: &str,
    after: u64,
) -> (Vec<u64>, tonic::Status) {
    let mut frames = client
        .subscribe(pb::SubscribeRequest {
            subscriber_id: "sink".into(),
            shard_ids: vec![shard.into()],
            start: Some(pb::StartPosition { position: Some(pb::start_position::Position::AfterSequence(after)) }),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut delivered = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), frames.message()).await.expect("a frame within 30 s") {
            Ok(Some(pb::SubscribeResponse { frame: Some(pb::subscribe_response::Frame::Events(batch)) })) => {
                delivered.extend(support::decoded(&batch.events).into_iter().map(|e| e.sequence));
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without reporting the corruption"),
            Err(status) => return (delivered, status),
        }
    }
}

#[tokio::test]
async fn a_hole_is_corruption_wherever_a_read_starts_or_ends() {
    let (store, db) = support::fresh_store().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.hole";
    ten_events(&hub, shard).await;
    db.client()
        .await
        .execute(
            "DELETE FROM events WHERE sequence = 5 AND shard_no = (SELECT shard_no FROM shards WHERE shard_id = $1)",
            &[&shard],
        )
        .await
        .expect("delete event 5");

    let mut client = hub.client().await;
    assert_eq!(read(&mut client, shard, 1, 4).await, Ok(vec![1, 2, 3, 4]), "the events before the hole are intact");
    for (from, to) in [(5, 5), (5, 0), (6, 0), (6, 6), (3, 5), (1, 0)] {
        let (code, message) = read(&mut client, shard, from, to).await.expect_err("a range touching the hole fails");
        assert_eq!(code, tonic::Code::Internal, "[{from}..{to}]: {message}");
        assert!(
            message.contains("sequence 5") && message.contains("missing"),
            "[{from}..{to}] must blame the missing event 5: {message}"
        );
    }
    let (delivered, status) = subscribe_until_failure(&mut client, shard, 5).await;
    assert!(delivered.is_empty(), "nothing after the hole can be checked: {delivered:?}");
    assert!(status.message().contains("sequence 5"), "{}", status.message());
    let (delivered, status) = subscribe_until_failure(&mut client, shard, 0).await;
    assert_eq!(delivered, vec![1, 2, 3, 4]);
    assert!(status.message().contains("sequence 5"), "{}", status.message());
    let report = verify::verify_shard(&store, ShardId::parse(shard).expect("valid")).await.expect("verify");
    assert_eq!(report.corrupt.expect("corrupt").sequence, Sequence(5));
    hub.stop().await;
    omnirelay_hub::store::LogStore::close(&store).await.expect("close");
}

#[tokio::test]
async fn an_undecodable_body_with_a_recomputed_hash_fails_verify_and_readers_alike() {
    let (store, db) = support::fresh_store().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.undecodable";
    ten_events(&hub, shard).await;
    // A body no reader can decode, with a chain that is consistent again.
    forge(&db, shard, 6, |sequence, body| if sequence == 6 { vec![0xff] } else { body }).await;

    let report = verify::verify_shard(&store, ShardId::parse(shard).expect("valid")).await.expect("verify");
    let corrupt = report.corrupt.expect("verify must not say ok for what readers refuse");
    assert_eq!(corrupt.sequence, Sequence(6));
    assert!(corrupt.reason.contains("does not decode"), "{}", corrupt.reason);
    let (code, output) = verify_command(db.url(), Some(shard)).await;
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("first corrupt sequence 6"), "{output}");

    let mut client = hub.client().await;
    let (code, message) = read(&mut client, shard, 1, 0).await.expect_err("the range holds it");
    assert_eq!(code, tonic::Code::Internal);
    assert!(message.contains("sequence 6") && message.contains("omnirelay-hub verify"), "{message}");
    // A subscriber gets every valid event before it, from the same
    // catch-up read, then the error.
    let (delivered, status) = subscribe_until_failure(&mut client, shard, 0).await;
    assert_eq!(delivered, vec![1, 2, 3, 4, 5]);
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("sequence 6"), "{}", status.message());
    hub.stop().await;
    omnirelay_hub::store::LogStore::close(&store).await.expect("close");
}

#[tokio::test]
async fn a_consistently_rewritten_tail_is_caught_by_checkpoints_and_saved_anchors() {
    let (store, db) = support::fresh_store().await;
    let hub = TestHub::start(db.url()).await;
    let shard = "resourcelease.forged";
    ten_events(&hub, shard).await;
    let mut client = hub.client().await;
    // A subscriber processed everything and checkpointed 8 with the hash it
    // received; it also holds event 9's hash, not yet checkpointed.
    let received = client
        .read_range(pb::ReadRangeRequest { shard_id: shard.into(), from_sequence: 1, to_sequence: 0, limit: 0 })
        .await
        .expect("read")
        .into_inner()
        .events;
    let received = support::decoded(&received);
    let committed = client
        .commit_checkpoint(pb::CommitCheckpointRequest {
            subscriber_id: "sink".into(),
            shard_id: shard.into(),
            sequence: 8,
            hash: received[7].hash.clone(),
        })
        .await
        .expect("a hash the log holds is accepted")
        .into_inner();
    assert_eq!(committed.checkpoint.expect("stored").hash, received[7].hash);
    // The operator saves the head and its hash from a clean run.
    let (code, output) = verify_command(db.url(), Some(shard)).await;
    assert_eq!(code, 0, "{output}");
    let saved = output.split("head_hash=").nth(1).and_then(|rest| rest.split_whitespace().next()).expect("printed");
    let anchor = format!("{shard}@10={saved}");

    // Rewrite 6..10 with other (valid) bodies and recompute every hash and
    // the head hash: the chain inside the database is consistent.
    let first_body = db
        .client()
        .await
        .query_one(
            "SELECT body FROM events WHERE sequence = 1 AND shard_no = (SELECT shard_no FROM shards WHERE shard_id = $1)",
            &[&shard],
        )
        .await
        .expect("read a body")
        .get::<_, Vec<u8>>(0);
    forge(&db, shard, 6, |_, _| first_body.clone()).await;

    let report = verify::verify_shard(&store, ShardId::parse(shard).expect("valid")).await.expect("verify");
    let corrupt = report.corrupt.expect("the checkpoint's hash no longer matches");
    assert_eq!(corrupt.sequence, Sequence(8));
    assert!(corrupt.reason.contains("subscriber sink's checkpoint"), "{}", corrupt.reason);
    // Resuming from the checkpoint, the hub refuses to hand the subscriber
    // events that do not continue what it processed.
    let mut frames = client
        .subscribe(pb::SubscribeRequest {
            subscriber_id: "sink".into(),
            shard_ids: vec![shard.into()],
            start: Some(pb::StartPosition { position: Some(pb::start_position::Position::FromCheckpoint(true)) }),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), frames.message()).await.expect("a frame within 30 s") {
            Ok(Some(pb::SubscribeResponse { frame: Some(pb::subscribe_response::Frame::Events(batch)) })) => {
                panic!(
                    "forged events were served: {:?}",
                    support::decoded(&batch.events).iter().map(|e| e.sequence).collect::<Vec<_>>()
                )
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without reporting the forgery"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("checkpoint"), "{}", status.message());

    // A forger who also rewrites the checkpoints in the database...
    db.client()
        .await
        .execute(
            "UPDATE checkpoints SET hash = e.hash FROM events e
             WHERE e.shard_no = checkpoints.shard_no AND e.sequence = checkpoints.sequence",
            &[],
        )
        .await
        .expect("rewrite the checkpoints");
    let (code, output) = verify_command(db.url(), Some(shard)).await;
    assert_eq!(code, 0, "nothing inside the database disagrees any more: {output}");
    // ...is still caught by what lives outside it: the operator's anchor,
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_omnirelay-hub"))
        .args(["verify", "--database-url", db.url(), "--anchor", &anchor])
        .output()
        .await
        .expect("run verify with the saved anchor");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("first corrupt sequence 10") && stdout.contains("the anchor given"), "{stdout}");
    // ...and the subscriber's own copy of the hashes it received.
    let err = client
        .commit_checkpoint(pb::CommitCheckpointRequest {
            subscriber_id: "sink".into(),
            shard_id: shard.into(),
            sequence: 9,
            hash: received[8].hash.clone(),
        })
        .await
        .expect_err("the log no longer holds what the subscriber received");
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(err.message().contains("sequence 9") && err.message().contains("subscriber sink"), "{}", err.message());
    hub.stop().await;
    omnirelay_hub::store::LogStore::close(&store).await.expect("close");
}
