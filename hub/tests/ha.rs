//! High availability: three hub processes on one database; appends through
//! one, subscribers on the others; a replica killed mid-stream, and the
//! subscriber resuming on another from its checkpoint with no loss, no
//! reorder and nothing at or below the checkpoint again.

use std::time::Duration;

use omnirelay_hub::proto::hub::v1 as pb;

use crate::support::{self, Appender, HubProcess, ack, acquire, batch};

const LONG: Duration = Duration::from_secs(60);
const TOTAL: u64 = 400;

fn subscribe_request(subscriber: &str, shard: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        subscriber_id: subscriber.into(),
        shard_ids: vec![shard.into()],
        start: Some(pb::StartPosition { position: Some(pb::start_position::Position::FromCheckpoint(true)) }),
        ..Default::default()
    }
}

/// Reads events until `until` (inclusive) arrived or the stream fails,
/// committing a checkpoint every `every` events; returns the sequences.
async fn consume(
    frames: &mut tonic::Streaming<pb::SubscribeResponse>,
    client: &mut omnirelay_hub::proto::hub::v1::hub_client::HubClient<tonic::transport::Channel>,
    subscriber: &str,
    shard: &str,
    until: u64,
    every: usize,
) -> (Vec<u64>, Option<tonic::Status>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "stalled after {seen:?}");
        let message = match tokio::time::timeout(Duration::from_secs(30), frames.message()).await {
            Ok(message) => message,
            Err(_) => panic!("no frame within 30 s after {seen:?}"),
        };
        match message {
            Ok(Some(pb::SubscribeResponse { frame: Some(pb::subscribe_response::Frame::Events(batch)) })) => {
                for event in support::decoded(&batch.events) {
                    seen.push(event.sequence);
                    if seen.len() % every == 0 {
                        let committed = client
                            .commit_checkpoint(pb::CommitCheckpointRequest {
                                subscriber_id: subscriber.into(),
                                shard_id: shard.into(),
                                sequence: event.sequence,
                                hash: event.hash.clone(),
                            })
                            .await;
                        if let Err(status) = committed {
                            return (seen, Some(status));
                        }
                    }
                    if event.sequence >= until {
                        return (seen, None);
                    }
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return (seen, Some(tonic::Status::unavailable("stream ended"))),
            Err(status) => return (seen, Some(status)),
        }
    }
}

// Spawns three hub processes; about fifteen seconds on a loaded machine.
#[tokio::test]
async fn a_subscriber_resumes_on_another_replica_from_its_checkpoint_after_a_replica_dies() {
    let db = support::migrated_db().await;
    let writer = HubProcess::start(db.url()).await;
    let mut doomed = HubProcess::start(db.url()).await;
    let survivor = HubProcess::start(db.url()).await;
    let shard = "resourcelease.ha";

    let mut write_client = writer.client().await;
    let epoch = acquire(&mut write_client, shard, "node-a", LONG).await;
    let producer = tokio::spawn(async move {
        let mut appender = Appender::open(&mut write_client).await;
        for seq in 1..=TOTAL {
            ack(appender.append(batch(shard, "p", seq, epoch, &[&format!("item-{seq}")])).await);
            if seq % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    // A second subscriber on the survivor reads everything while the first
    // one moves between replicas.
    let mut watcher_client = survivor.client().await;
    let mut watcher =
        watcher_client.subscribe(subscribe_request("watcher", shard)).await.expect("subscribe").into_inner();

    let mut client = doomed.client().await;
    let mut frames = client.subscribe(subscribe_request("sink", shard)).await.expect("subscribe").into_inner();
    let (before, failure) = consume(&mut frames, &mut client, "sink", shard, TOTAL / 4, 10).await;
    assert!(failure.is_none(), "{failure:?}");
    doomed.kill().await;
    // Whatever was in flight is cut off with the replica.
    let (in_flight, failure) = consume(&mut frames, &mut client, "sink", shard, TOTAL, 10).await;
    assert!(failure.is_some(), "the stream of a killed replica must fail");
    let delivered: Vec<u64> = before.iter().chain(&in_flight).copied().collect();

    let mut client = survivor.client().await;
    let checkpoint = client
        .get_checkpoints(pb::GetCheckpointsRequest {
            subscriber_id: "sink".into(),
            shard_ids: vec![shard.into()],
            ..Default::default()
        })
        .await
        .expect("read the checkpoint")
        .into_inner()
        .checkpoints[0]
        .sequence;
    assert!(checkpoint >= 10 && delivered.contains(&checkpoint), "checkpoint {checkpoint} of {delivered:?}");
    let mut frames = client.subscribe(subscribe_request("sink", shard)).await.expect("resubscribe").into_inner();
    let (after, failure) = consume(&mut frames, &mut client, "sink", shard, TOTAL, 10).await;
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(after[0], checkpoint + 1, "resumes right after the checkpoint, never at or below it");
    assert_eq!(after, (checkpoint + 1..=TOTAL).collect::<Vec<_>>(), "no loss, no reorder, no repeat");
    let processed: Vec<u64> = delivered.iter().copied().filter(|&s| s <= checkpoint).chain(after).collect();
    assert_eq!(processed, (1..=TOTAL).collect::<Vec<_>>());

    let (all, failure) = consume(&mut watcher, &mut watcher_client, "watcher", shard, TOTAL, 1000).await;
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(all, (1..=TOTAL).collect::<Vec<_>>(), "a subscriber on a surviving replica saw everything once");
    producer.await.expect("the producer should finish");
}
