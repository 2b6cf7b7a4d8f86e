//! The mesh with real processes: `omnirelay node` sidecars on one hub
//! spread their namespaces by rendezvous hashing over the members the hub
//! lists, and when one is killed with SIGKILL its namespaces move to the
//! survivors with every acknowledged item, and leases it granted stay
//! valid under their fencing tokens. Callers use the routing client
//! (`omnirelay_client::mesh`), which follows the nodes' redirects and
//! rides the failover.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use omnirelay_client::mesh::{MeshClientConfig, ResourceLeaseClient};
use omnirelay_proto::resourcelease::v1 as pb;
use omnirelay_tests::sidecar::{Sidecar, SidecarBuilder};
use omnirelay_tests::{WorkspaceBinaries, free_port, within};
use tokio::process::Command;

use crate::durable::{HANG_GUARD, Hub, call, payload};
use crate::http::http_get;

const NAMESPACES: [&str; 6] = [
    "resourcelease.mesh.a",
    "resourcelease.mesh.b",
    "resourcelease.mesh.c",
    "resourcelease.mesh.d",
    "resourcelease.mesh.e",
    "resourcelease.mesh.f",
];

/// The nodes' shard and member lease TTL: short, so the test waits little
/// for a dead node's leases to lapse.
pub(crate) const TTL_MS: u64 = 2_000;

/// The owner of `shard` among `members`, computed from the rendezvous
/// function as `docs/mesh-node.md` defines it (as a client in any language
/// would): 64-bit FNV-1a over the member id, one 0xff byte and the shard
/// id, then the SplitMix64 finalizer; the highest score wins, ties to the
/// greater id.
pub(crate) fn rendezvous_owner<'a>(shard: &str, members: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let score = |member: &str| {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in member.bytes().chain([0xff]).chain(shard.bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        hash ^ (hash >> 31)
    };
    members.into_iter().max_by_key(|member| (score(member), *member))
}

/// A node of this suite's mesh ([`NAMESPACES`]) on one hub, not yet waited
/// for.
fn spawn(binary: &Path, dir: &Path, id: &str, hub: SocketAddr) -> Sidecar {
    mesh_node(binary, dir, id, &format!("http://{hub}"), &NAMESPACES).spawn()
}

/// A node with id `id` hosting `namespaces` on the hub endpoints `hubs`
/// (comma-separated URLs), placed by rendezvous hashing, with the mesh's
/// short TTL.
pub(crate) fn mesh_node(binary: &Path, dir: &Path, id: &str, hubs: &str, namespaces: &[&str]) -> SidecarBuilder {
    Sidecar::builder(binary, dir)
        .node_id(id)
        .namespaces(namespaces)
        .hub(hubs)
        .args(&["--assignment", "rendezvous"])
        .shard_lease_ttl_ms(TTL_MS)
}

/// Namespace -> status (`serving`, `fenced`, `standby`), or an error while
/// the node does not answer.
pub(crate) async fn statuses(node: &Sidecar) -> Result<BTreeMap<String, String>, String> {
    Ok(epochs(node).await?.into_iter().map(|(ns, (status, _))| (ns, status)).collect())
}

/// Namespace -> (status, the shard epoch the node's batches carry).
async fn epochs(node: &Sidecar) -> Result<BTreeMap<String, (String, u64)>, String> {
    Ok(replication(node).await?.0)
}

/// The node's `/omnirelay/control/replication`: namespace -> (status,
/// epoch), and its view of the owners (namespace -> member id).
async fn replication(node: &Sidecar) -> Result<(BTreeMap<String, (String, u64)>, BTreeMap<String, String>), String> {
    let (_, body) = http_get(node.control, "/omnirelay/control/replication").await?;
    let all: serde_json::Value = serde_json::from_str(&body).map_err(|err| err.to_string())?;
    let owners = all["owners"]
        .as_object()
        .ok_or("no owners")?
        .iter()
        .map(|(ns, owner)| (ns.clone(), owner.as_str().unwrap_or_default().to_string()))
        .collect();
    let namespaces = all["namespaces"].as_object().ok_or("no namespaces")?;
    let epochs = namespaces
        .iter()
        .map(|(ns, state)| {
            let status = state["status"].as_str().unwrap_or_default().to_string();
            (ns.clone(), (status, state["epoch"].as_u64().unwrap_or_default()))
        })
        .collect();
    Ok((epochs, owners))
}

/// Waits until every one of [`NAMESPACES`] is served by exactly the node
/// rendezvous hashing gives it among `nodes` (and by no other), and every
/// node's view names that owner (a node whose last membership poll missed
/// a member that joined since would still redirect or forward to another),
/// and returns namespace -> node id.
async fn converged(nodes: &[&Sidecar]) -> BTreeMap<String, String> {
    converged_on(nodes, &NAMESPACES).await
}

/// [`converged`] for `namespaces`.
pub(crate) async fn converged_on(nodes: &[&Sidecar], namespaces: &[&str]) -> BTreeMap<String, String> {
    let ids: Vec<&str> = nodes.iter().map(|node| node.id()).collect();
    let expected: BTreeMap<String, String> = namespaces
        .iter()
        .map(|ns| (ns.to_string(), rendezvous_owner(ns, ids.iter().copied()).expect("members").to_string()))
        .collect();
    let converged = within(HANG_GUARD, || async {
        // The nodes are asked one after the other, so a handover that
        // completes between two answers shows the old owner, then the new
        // one (a higher epoch), both serving. A node asked later that still
        // serves under a *lower* epoch than one seen earlier overlapped
        // with its successor: that is two owners at once.
        let mut serving: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        let mut views = Vec::new();
        for node in nodes {
            let (epochs, owners) = replication(node).await?;
            for (ns, (status, epoch)) in epochs {
                if status == "serving" {
                    serving.entry(ns).or_default().push((node.id().to_string(), epoch));
                }
            }
            views.push((node.id(), owners));
        }
        for (ns, servers) in &serving {
            for (index, (later, epoch)) in servers.iter().enumerate() {
                for (earlier, newer) in &servers[..index] {
                    assert!(
                        epoch >= newer,
                        "{ns} is served by {later} under epoch {epoch} after {earlier} served it under epoch {newer}"
                    );
                }
            }
        }
        if serving.values().any(|servers| servers.len() > 1) {
            return Err(format!("a handover is under way: {serving:?}"));
        }
        let now: BTreeMap<String, String> =
            serving.into_iter().map(|(ns, mut servers)| (ns, servers.remove(0).0)).collect();
        if now != expected {
            return Err(format!("serving {now:?}, expected {expected:?}"));
        }
        for (id, owners) in views {
            if expected.iter().any(|(ns, owner)| owners.get(ns) != Some(owner)) {
                return Err(format!("{id}'s view is not current yet: it names {owners:?}, expected {expected:?}"));
            }
        }
        Ok(now)
    })
    .await;
    converged.unwrap_or_else(|why| {
        let logs: Vec<String> = nodes.iter().map(|node| node.describe()).collect();
        panic!(
            "every namespace served by its rendezvous owner only: still not true after {HANG_GUARD:?}; \
             last attempt: {why}\n{}",
            logs.join("\n")
        )
    })
}

/// POSTs `body` as the loopback principal `ops`; the status and the head.
async fn http_post_head(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nx-client-principal: ops\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8_lossy(&response).to_string();
    let head = response.split("\r\n\r\n").next().unwrap_or_default().to_string();
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, head)
}

fn node_by<'a>(nodes: &[&'a Sidecar], id: &str) -> &'a Sidecar {
    nodes.iter().find(|node| node.id() == id).expect("a known node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_namespaces_move_to_the_survivors_with_their_items_and_leases() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let db = omnirelay_tests::TestDb::new().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let hub = Hub::start(&binaries.hub, db.url(), free_port()).await;
    let mut nodes: Vec<Sidecar> =
        ["node-1", "node-2", "node-3"].iter().map(|id| spawn(&binaries.omnirelay, dir.path(), id, hub.grpc)).collect();
    let owners = converged(&nodes.iter().collect::<Vec<_>>()).await;

    // A node that does not own a namespace names its owner: gRPC with
    // UNAVAILABLE and metadata, HTTP/JSON with 421 and headers.
    let all: Vec<&Sidecar> = nodes.iter().collect();
    let (ns, owner) = owners.iter().next().expect("six namespaces");
    let owner_node = node_by(&all, owner);
    let other = all.iter().find(|node| node.id() != *owner).expect("another node");
    let refused = other
        .client()
        .await
        .enqueue(call(pb::EnqueueRequest {
            namespace: ns.clone(),
            payload: Some(payload("misrouted")),
            ..Default::default()
        }))
        .await
        .expect_err("a non-owner refuses");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(refused.metadata().get("omnirelay-owner").and_then(|v| v.to_str().ok()), Some(owner.as_str()));
    let address = format!("http://{}", owner_node.rpc);
    assert_eq!(refused.metadata().get("omnirelay-owner-address").and_then(|v| v.to_str().ok()), Some(address.as_str()));
    let (status, head) = http_post_head(
        other.rpc,
        &format!("/resourcelease/v1/{ns}/enqueue"),
        r#"{"payload": {"resource_type": "t", "resource_id": "r"}}"#,
    )
    .await;
    assert_eq!(status, 421, "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("omnirelay-owner-address: {address}")), "{head}");

    // Five acknowledged items per namespace, through the routing client
    // started from one node: it follows the redirects to each owner.
    let mesh = ResourceLeaseClient::new(MeshClientConfig {
        nodes: vec![format!("http://{}", other.rpc)],
        metadata: vec![("x-client-principal".into(), "ops".into())],
        ..Default::default()
    })
    .expect("a valid client");
    for (ns, owner) in &owners {
        for n in 0..5 {
            let request = pb::EnqueueRequest {
                namespace: ns.clone(),
                payload: Some(payload(&format!("{ns}-{n}"))),
                ..Default::default()
            };
            mesh.enqueue(request).await.expect("the owner acknowledges the enqueue");
        }
        let address = format!("http://{}", node_by(&all, owner).rpc);
        assert_eq!(mesh.cached_owner(ns), Some(address), "the client learned {ns}'s owner");
    }
    // The victim owns the most namespaces; a worker holds a lease on one.
    let victim = ["node-1", "node-2", "node-3"]
        .into_iter()
        .max_by_key(|id| owners.values().filter(|owner| owner.as_str() == *id).count())
        .expect("three nodes")
        .to_string();
    let victim_ns: Vec<String> =
        owners.iter().filter(|(_, owner)| **owner == victim).map(|(ns, _)| ns.clone()).collect();
    assert!(!victim_ns.is_empty(), "{victim} owns namespaces: {owners:?}");
    let leased_ns = victim_ns[0].clone();
    let mut victim_client = node_by(&nodes.iter().collect::<Vec<_>>(), &victim).client().await;
    let held = victim_client
        .lease(call(pb::LeaseRequest { namespace: leased_ns.clone(), owner: "worker-1".into(), ..Default::default() }))
        .await
        .expect("lease")
        .into_inner()
        .item
        .expect("an item");
    let handle = held.lease.clone().expect("a lease handle");

    // SIGKILL the victim.
    let position = nodes.iter().position(|node| node.id() == victim).expect("the victim");
    let killed = nodes.remove(position);
    let killed_at = Instant::now();
    let log = killed.kill().await;
    // Calls for the dead node's namespaces, made at once, are answered by
    // their new owners within the client's deadline.
    for ns in &victim_ns {
        let request = pb::EnqueueRequest {
            namespace: ns.clone(),
            payload: Some(payload(&format!("{ns}-after-kill"))),
            ..Default::default()
        };
        mesh.enqueue(request).await.expect("the client rides the failover");
    }
    let survivors: Vec<&Sidecar> = nodes.iter().collect();
    let after = converged(&survivors).await;
    let failover = killed_at.elapsed();
    eprintln!(
        "failover after SIGKILL of {victim} ({} namespaces): {failover:?} with a {TTL_MS} ms TTL",
        victim_ns.len()
    );
    for (ns, owner) in &after {
        if !victim_ns.contains(ns) {
            assert_eq!(&owners[ns], owner, "{ns} moved although its owner lives");
        }
    }

    // Every acknowledged item is on the new owners; the lease the dead node
    // granted is still held, and its worker completes it at the new owner.
    for (ns, owner) in &after {
        let mut client = node_by(&survivors, owner).client().await;
        let stats = client.stats(call(pb::StatsRequest { namespace: ns.clone() })).await.expect("stats").into_inner();
        let moved = u64::from(victim_ns.contains(ns));
        let (pending, active) = if *ns == leased_ns { (4 + moved, 1) } else { (5 + moved, 0) };
        assert_eq!((stats.pending, stats.active), (pending, active), "{ns} on {owner}; victim log:\n{log}");
    }
    let new_owner = node_by(&survivors, &after[&leased_ns]);
    let mut client = new_owner.client().await;
    client
        .complete(call(pb::CompleteRequest { namespace: leased_ns.clone(), handle: Some(handle) }))
        .await
        .expect("a lease granted by the dead owner completes at the new one");
    let stats =
        client.stats(call(pb::StatsRequest { namespace: leased_ns.clone() })).await.expect("stats").into_inner();
    assert_eq!((stats.pending, stats.active), (5, 0));

    // The killed node comes back: it takes back what rendezvous gives it,
    // handed over gracefully by the survivors, with nothing lost.
    nodes.push(spawn(&binaries.omnirelay, dir.path(), &victim, hub.grpc));
    let back = converged(&nodes.iter().collect::<Vec<_>>()).await;
    assert_eq!(back, owners, "the same members give the same assignment");
    let mut pending = 0;
    for (ns, owner) in &back {
        let mut client = node_by(&nodes.iter().collect::<Vec<_>>(), owner).client().await;
        pending +=
            client.stats(call(pb::StatsRequest { namespace: ns.clone() })).await.expect("stats").into_inner().pending;
    }
    assert_eq!(pending, 5 * NAMESPACES.len() as u64 - 1 + victim_ns.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_kills_a_node_and_every_check_passes() {
    let binaries = tokio::task::spawn_blocking(WorkspaceBinaries::build).await.expect("join").expect("binaries");
    let output = Command::new(&binaries.omnirelay)
        .args(["demo", "--seconds", "6", "--lease-ttl-ms", "2000"])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run omnirelay demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("  PASS  ").count(), 4, "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("killed"), "{stdout}");
}
