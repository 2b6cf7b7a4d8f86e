//! Integrity: a row corrupted directly in SQL is detected by every reader
//! and by `omnirelay-hub verify`, and never served as valid (invariant 7).

use std::time::Duration;

use omnirelay_hub::ids::ShardId;
use omnirelay_hub::proto::hub::v1 as pb;
use omnirelay_hub::verify;

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
                delivered.extend(batch.events.into_iter().map(|e| e.sequence));
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
