//! The operator CLI against real processes: an `omnirelay-hub` on the
//! harness's PostgreSQL and an `omnirelay node` replicating to it, driven
//! over gRPC, then read with `omnirelay dead-letters`, `queue show`,
//! `inspect --at` and `verify`.

use std::collections::BTreeSet;

use omnirelay_proto::resourcelease::v1 as pb;
use omnirelay_tests::{WorkspaceBinaries, free_port};
use serde_json::Value;
use tokio::process::Command;

use crate::durable::{HANG_GUARD, Hub, SHARD, call, payload, start_node};

/// Runs `omnirelay args... --output json`, which must succeed; its document.
async fn omnirelay_json(binary: &std::path::Path, args: &[&str]) -> Value {
    let mut command = Command::new(binary);
    command.args(args).args(["--output", "json"]).kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if name.starts_with("OMNIRELAY_") {
            command.env_remove(name);
        }
    }
    let output = tokio::time::timeout(HANG_GUARD, command.output())
        .await
        .unwrap_or_else(|_| panic!("omnirelay {args:?} did not end"))
        .expect("run omnirelay");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "omnirelay {args:?}: {stderr}{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("omnirelay {args:?} printed no JSON ({e}): {stdout}"))
}

fn ids(items: &Value, nested: bool) -> BTreeSet<String> {
    items
        .as_array()
        .expect("a list")
        .iter()
        .map(|item| if nested { &item["item"] } else { item })
        .map(|item| item["item_id"].as_str().expect("an item id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cli_reads_a_node_and_its_hub_on_postgres() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let db = omnirelay_tests::TestDb::new().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let hub = Hub::start(&binaries.hub, db.url(), free_port()).await;
    let node = start_node(&binaries.omnirelay, dir.path(), hub.grpc).await;
    let mut client = node.client().await;
    let namespace = || SHARD.to_string();

    let mut enqueued = BTreeSet::new();
    for id in ["cli-1", "cli-2"] {
        let request = pb::EnqueueRequest { namespace: namespace(), payload: Some(payload(id)), ..Default::default() };
        enqueued.insert(client.enqueue(call(request)).await.expect("enqueue").into_inner().item_id);
    }
    let both_pending = client.stats(call(pb::StatsRequest { namespace: namespace() })).await.expect("stats");
    let both_pending = both_pending.into_inner().last_sequence;
    let lease = pb::LeaseRequest { namespace: namespace(), owner: "worker".into(), ..Default::default() };
    let item = client.lease(call(lease)).await.expect("lease").into_inner().item.expect("an item");
    let fail = pb::FailRequest {
        namespace: namespace(),
        handle: item.lease.clone(),
        error: "the invoice does not parse".into(),
        action: pb::FailAction::DeadLetter as i32,
        ..Default::default()
    };
    client.fail(call(fail)).await.expect("dead-letter");
    let head = client.stats(call(pb::StatsRequest { namespace: namespace() })).await.expect("stats");
    let head = head.into_inner().last_sequence;

    let exe = &binaries.omnirelay;
    let (node_url, control_url, hub_url) =
        (format!("http://{}", node.rpc), format!("http://{}", node.control), format!("http://{}", hub.grpc));
    let listed =
        omnirelay_json(exe, &["dead-letters", "list", "--node", &node_url, "--principal", "ops", "--namespace", SHARD])
            .await;
    assert_eq!(ids(&listed["dead_letters"], true), [item.item_id.clone()].into(), "{listed}");
    let view = omnirelay_json(exe, &["queue", "show", SHARD, "--node", &control_url]).await;
    let still_pending: BTreeSet<String> = enqueued.iter().filter(|id| **id != item.item_id).cloned().collect();
    assert_eq!(ids(&view["pending_items"], false), still_pending, "{view}");
    assert_eq!(ids(&view["dead_letter_items"], true), [item.item_id.clone()].into(), "{view}");

    let then = omnirelay_json(exe, &["inspect", SHARD, "--hub", &hub_url, "--at", &both_pending.to_string()]).await;
    assert_eq!(ids(&then["state"]["pending_items"], false), enqueued, "{then}");
    assert_eq!(then["state"]["dead_letters"], 0, "{then}");
    let now = omnirelay_json(exe, &["inspect", SHARD, "--hub", &hub_url]).await;
    assert_eq!(now["sequence"], head, "{now}");
    assert_eq!(ids(&now["state"]["pending_items"], false), still_pending, "{now}");
    assert_eq!(ids(&now["state"]["dead_letter_items"], true), [item.item_id.clone()].into(), "{now}");
    let verified = omnirelay_json(exe, &["verify", SHARD, "--hub", &hub_url]).await;
    assert_eq!((verified["result"].as_str(), verified["events"].as_u64()), (Some("intact"), Some(head)), "{verified}");
}
