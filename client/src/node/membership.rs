//! Which node serves which namespace: membership through the log's leases,
//! and rendezvous hashing over the live members.
//!
//! With [`Assignment::Every`] the node tries to own every namespace it
//! hosts: one node serves them all, and a second node configured alike is a
//! hot standby whose owners take each shard once the first node's lease
//! lapses or is released.
//!
//! With [`Assignment::Rendezvous`] the namespaces spread over the live
//! nodes:
//!
//! 1. **Membership.** Each node holds a *member lease* on the log, on the
//!    shard `omnirelay.members.<node id>` ([`MEMBER_PREFIX`]) with itself as
//!    owner, acquired when it starts, renewed like a shard lease and
//!    released when it stops. The live members are the holders of the
//!    member leases the log lists ([`Replicator::held_leases`]): no static
//!    peer list, and a node that dies leaves the list when its lease lapses
//!    (the lease TTL), judged by the log's clock.
//! 2. **Assignment.** Every [`MEMBERSHIP_POLL`] the node lists the members
//!    and gives each namespace to the member with the highest
//!    [`rendezvous_score`]; a node that joins or leaves moves only the
//!    namespaces it wins or held.
//! 3. **Handover.** A namespace that moves away is stopped here the graceful
//!    way (decided events made durable, a last snapshot, the shard lease
//!    released; see [`ownership`](super::ownership)) in the background, and
//!    its new owner, which keeps asking for the lease every
//!    [`HELD_RETRY`](super::ownership::HELD_RETRY), takes it at once. A
//!    namespace that moves here gets a shard owner, which acquires the
//!    lease (a new epoch) and rebuilds the queue from the log.
//!
//! Safety never rests on two nodes agreeing on the member list: a shard is
//! written only under its lease's current epoch, which the log checks on
//! every batch, and an owner that cannot renew stops serving before its
//! lease can lapse. Membership only decides who *tries* to own a shard.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::follower::Follower;
pub use super::ownership::Assignment;
use super::ownership::{CLOCK_DRIFT_MARGIN, OwnershipConfig, ShardOwner, bounded};
use crate::ids::{Epoch, PeerId, ShardId};
use crate::queue::Queue;
use crate::replication::{ReplicationError, Replicator};

/// Shard-id prefix of the member leases: `omnirelay.members.<node id>`.
/// Outside the namespace grammar (`resourcelease(.segment)*`), so no queue
/// can collide with it.
pub const MEMBER_PREFIX: &str = "omnirelay.members.";

/// How often a node lists the live members and recomputes its share.
/// Detection of a dead node is bounded by the lease TTL plus this, and a
/// graceful handover by this plus one [`HELD_RETRY`](super::ownership::HELD_RETRY)
/// plus the leaver's last snapshot: half a second keeps a handover within
/// its one-second target (at one second, rounds of the failover benchmark
/// took up to 1.18 s), for two cheap reads per node per second.
pub const MEMBERSHIP_POLL: Duration = Duration::from_millis(500);

/// Longest a node id may be under rendezvous assignment: the member lease's
/// shard id (prefix plus id) must be a shard name
/// ([`omnirelay_proto::names::MAX_SHARD_NAME_BYTES`]), so 110 bytes.
pub const MAX_MEMBER_ID_LEN: usize = omnirelay_proto::names::MAX_SHARD_NAME_BYTES - MEMBER_PREFIX.len();

/// Checks a node id for use in a member lease: the member shard
/// `omnirelay.members.<id>` must be a shard name (the grammar the hub
/// shares, [`omnirelay_proto::names`]), so the id is at most
/// [`MAX_MEMBER_ID_LEN`] bytes of dot-separated `a-z`, `0-9`, `-`, `_`.
pub fn check_member_id(id: &str) -> Result<(), &'static str> {
    use omnirelay_proto::names::{ShardNameError, check_shard_name};
    check_shard_name(&format!("{MEMBER_PREFIX}{id}")).map_err(|err| match err {
        ShardNameError::TooLong(_) => {
            "longer than 110 bytes (the member shard name's limit) under rendezvous assignment"
        }
        ShardNameError::Empty | ShardNameError::EmptySegment | ShardNameError::SegmentTooLong => {
            "must be dot-separated segments of 1 to 63 bytes under rendezvous assignment"
        }
        ShardNameError::BadCharacter(_) => "may hold only a-z, 0-9, '-', '_' and '.' under rendezvous assignment",
    })
}

/// Longest advertised address: the member lease's owner (`id@address`)
/// must fit the log's 200-byte owner ids.
pub const MAX_ADVERTISE_LEN: usize = 200 - MAX_MEMBER_ID_LEN - 1;

/// Checks an advertised address: printable ASCII without spaces, '*', ','
/// or ';', at most [`MAX_ADVERTISE_LEN`] bytes.
pub fn check_advertise(address: &str) -> Result<(), &'static str> {
    if address.is_empty() || address.len() > MAX_ADVERTISE_LEN {
        return Err("must be 1 to 89 bytes long");
    }
    if !address.bytes().all(|byte| byte.is_ascii_graphic() && !matches!(byte, b'*' | b',' | b';')) {
        return Err("must be printable ASCII without spaces, '*', ',' or ';'");
    }
    Ok(())
}

/// The rendezvous score of `member` for `shard`: 64-bit FNV-1a over the
/// member id's bytes, one `0xff` byte (which no id contains), and the
/// shard id's bytes, then the SplitMix64 finalizer to spread the bits.
/// Stable across versions and easy to compute in any language, so a client
/// can find a shard's owner from the member list alone.
pub fn rendezvous_score(member: &str, shard: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in member.bytes().chain(std::iter::once(0xff)).chain(shard.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The member that owns `shard`: the highest [`rendezvous_score`], ties
/// going to the greater id. `None` without members.
pub fn rendezvous_owner<'a>(shard: &str, members: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    members.into_iter().max_by_key(|member| (rendezvous_score(member, shard), *member))
}

/// The member that takes `shard` over when its owner leaves: the second in
/// the same order. It keeps a warm copy of the shard (a standby follower).
/// `None` with fewer than two members.
pub fn rendezvous_standby<'a>(shard: &str, members: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let members: Vec<&'a str> = members.into_iter().collect();
    let owner = rendezvous_owner(shard, members.iter().copied())?;
    rendezvous_owner(shard, members.into_iter().filter(|member| *member != owner))
}

/// What a node knows of the mesh after its latest assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct View {
    /// The namespaces assigned to this node.
    pub(crate) mine: BTreeSet<ShardId>,
    /// Under rendezvous assignment, the live members by id, with the address
    /// each advertised; empty under [`Assignment::Every`].
    pub(crate) members: BTreeMap<String, Option<String>>,
    /// The namespaces this node follows as the standby (next owner), with
    /// the sequence each copy had reached at the latest poll (zero: not
    /// built yet).
    pub(crate) following: BTreeMap<ShardId, u64>,
}

impl View {
    /// The member another node's namespace belongs to, with its advertised
    /// address; `None` when the namespace is this node's, or under
    /// [`Assignment::Every`].
    pub(crate) fn elsewhere(&self, shard: &ShardId) -> Option<(&str, Option<&str>)> {
        if self.members.is_empty() || self.mine.contains(shard) {
            return None;
        }
        let owner = rendezvous_owner(shard.as_str(), self.members.keys().map(String::as_str))?;
        Some((owner, self.members.get(owner).and_then(Option::as_deref)))
    }
}

/// What the node is assigned now: `None` until the first assignment.
pub(crate) type Assigned = watch::Receiver<Option<View>>;

/// The owner string of a member lease: the node id, then `@` and the
/// address it advertises, if any.
pub fn member_owner(node_id: &str, advertise: Option<&str>) -> String {
    match advertise {
        Some(address) => format!("{node_id}@{address}"),
        None => node_id.to_string(),
    }
}

/// A member lease's node id and advertised address, from its shard id and
/// owner; `None` when the two do not match (not a member lease).
pub fn parse_member(shard: &str, owner: &str) -> Option<(String, Option<String>)> {
    let id = shard.strip_prefix(MEMBER_PREFIX)?;
    match owner.strip_prefix(id)? {
        "" => Some((id.to_string(), None)),
        rest => rest.strip_prefix('@').map(|address| (id.to_string(), Some(address.to_string()))),
    }
}

/// The task that keeps the node's member lease and its shard owners.
#[derive(Debug)]
pub(crate) struct Assigner {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

struct Context {
    queues: BTreeMap<ShardId, Queue>,
    replicator: Arc<dyn Replicator>,
    node_id: PeerId,
    advertise: Option<String>,
    config: OwnershipConfig,
    assigned: watch::Sender<Option<View>>,
}

impl Assigner {
    /// Starts assigning `queues` to this node; the receiver follows what it
    /// is assigned.
    pub(crate) fn spawn(
        queues: Vec<Queue>,
        replicator: Arc<dyn Replicator>,
        node_id: PeerId,
        advertise: Option<String>,
        config: OwnershipConfig,
    ) -> (Self, Assigned) {
        let (assigned, receiver) = watch::channel(None);
        let context = Context {
            queues: queues.into_iter().map(|queue| (queue.shard().clone(), queue)).collect(),
            replicator,
            node_id,
            advertise,
            config,
            assigned,
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(context, cancel.clone()));
        (Self { cancel, task: Some(task) }, receiver)
    }

    /// Stops every shard owner (each hands its shard over) and leaves the
    /// membership; waits for both.
    pub(crate) async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(error = %error, "shard assignment task ended abnormally");
        }
    }
}

impl Drop for Assigner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn run(context: Context, cancel: CancellationToken) {
    match context.config.assignment {
        Assignment::Every => every(context, cancel).await,
        Assignment::Rendezvous => rendezvous(context, cancel).await,
    }
}

async fn every(context: Context, cancel: CancellationToken) {
    let mut owners = Vec::with_capacity(context.queues.len());
    for queue in context.queues.values() {
        owners.push(ShardOwner::spawn(
            queue.clone(),
            Arc::clone(&context.replicator),
            context.node_id.clone(),
            context.config,
            None,
        ));
    }
    context.assigned.send_replace(Some(View {
        mine: context.queues.keys().cloned().collect(),
        members: BTreeMap::new(),
        following: BTreeMap::new(),
    }));
    cancel.cancelled().await;
    futures_util::future::join_all(owners.into_iter().map(ShardOwner::shutdown)).await;
}

/// The node's member lease.
struct Member {
    shard: ShardId,
    /// The lease's owner: the node id, and the address it advertises.
    owner: String,
    /// The grant: its epoch and when the call that confirmed it last
    /// started.
    held: Option<(Epoch, Instant)>,
}

impl Member {
    /// Acquires the member lease when not held, renews it when due, and
    /// drops it when it was lost or can no longer be confirmed in time.
    async fn keep(&mut self, replicator: &dyn Replicator, node_id: &PeerId, config: &OwnershipConfig) {
        let now = Instant::now();
        match self.held {
            None => match bounded(replicator.acquire_shard(&self.shard, &self.owner, config.lease_ttl)).await {
                Ok(grant) if grant.granted => {
                    tracing::info!(node = %node_id, epoch = %grant.epoch, "joined the mesh");
                    self.held = Some((grant.epoch, now));
                }
                Ok(grant) => {
                    tracing::warn!(node = %node_id, holder = %grant.owner, "the member lease is held by someone else");
                }
                Err(error) => tracing::warn!(node = %node_id, error = %error, "failed to join the mesh; retrying"),
            },
            Some((epoch, confirmed)) if now.duration_since(confirmed) >= config.renew_every => {
                match bounded(replicator.renew_shard(&self.shard, &self.owner, epoch, config.lease_ttl)).await {
                    Ok(_) => self.held = Some((epoch, now)),
                    Err(ReplicationError::Unavailable(error)) => {
                        tracing::warn!(node = %node_id, error = %error, "failed to renew the member lease; retrying");
                        if now.duration_since(confirmed) >= config.lease_ttl.saturating_sub(CLOCK_DRIFT_MARGIN) {
                            self.held = None;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(node = %node_id, error = %error, "lost the member lease; joining again");
                        self.held = None;
                    }
                }
            }
            Some(_) => {}
        }
    }

    async fn leave(&mut self, replicator: &dyn Replicator, node_id: &PeerId) {
        if let Some((epoch, _)) = self.held.take() {
            match bounded(replicator.release_shard(&self.shard, &self.owner, epoch)).await {
                Ok(_) => tracing::info!(node = %node_id, "left the mesh"),
                Err(error) => tracing::warn!(node = %node_id, error = %error, "failed to release the member lease"),
            }
        }
    }
}

async fn rendezvous(context: Context, cancel: CancellationToken) {
    let Context { queues, replicator, node_id, advertise, config, assigned } = context;
    let mut member = Member {
        shard: ShardId::new(format!("{MEMBER_PREFIX}{node_id}")),
        owner: member_owner(node_id.as_str(), advertise.as_deref()),
        held: None,
    };
    let mut owners: HashMap<ShardId, ShardOwner> = HashMap::new();
    let mut followers: HashMap<ShardId, Follower> = HashMap::new();
    // Shards being handed over: not restarted here until their owner ended.
    let mut handovers: JoinSet<ShardId> = JoinSet::new();
    let mut leaving: BTreeSet<ShardId> = BTreeSet::new();
    let mut polls = tokio::time::interval(MEMBERSHIP_POLL);
    polls.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(ended) = handovers.join_next(), if !handovers.is_empty() => {
                if let Ok(shard) = ended {
                    leaving.remove(&shard);
                }
                continue;
            }
            _ = polls.tick() => {}
        }
        member.keep(&*replicator, &node_id, &config).await;
        if member.held.is_none() {
            // Not a member now: keep the current owners (each guards its own
            // lease) and ask again next time.
            continue;
        }
        let mut members = match bounded(replicator.held_leases(MEMBER_PREFIX)).await {
            Ok(leases) => leases
                .iter()
                .filter_map(|lease| parse_member(lease.shard.as_str(), &lease.owner))
                .collect::<BTreeMap<_, _>>(),
            Err(error) => {
                tracing::warn!(node = %node_id, error = %error, "failed to list the mesh members; keeping the current assignment");
                continue;
            }
        };
        members.insert(node_id.to_string(), advertise.clone());
        let mine: BTreeSet<ShardId> = queues
            .keys()
            .filter(|shard| {
                rendezvous_owner(shard.as_str(), members.keys().map(String::as_str)) == Some(node_id.as_str())
            })
            .cloned()
            .collect();
        let moved: Vec<ShardId> = owners.keys().filter(|shard| !mine.contains(*shard)).cloned().collect();
        for shard in moved {
            if let Some(owner) = owners.remove(&shard) {
                tracing::info!(node = %node_id, shard = %shard, "handing the shard over to its new owner");
                leaving.insert(shard.clone());
                handovers.spawn(async move {
                    owner.shutdown().await;
                    shard
                });
            }
        }
        for shard in &mine {
            if !owners.contains_key(shard) && !leaving.contains(shard) {
                // The standby copy, when this node followed the shard.
                let warm = match followers.remove(shard) {
                    Some(follower) => follower.into_state().await,
                    None => None,
                };
                tracing::info!(
                    node = %node_id,
                    shard = %shard,
                    members = members.len(),
                    warm = warm.is_some(),
                    "taking the shard"
                );
                let queue = queues[shard].clone();
                let owner = ShardOwner::spawn(queue, Arc::clone(&replicator), node_id.clone(), config, warm);
                owners.insert(shard.clone(), owner);
            }
        }
        let standby: BTreeSet<ShardId> = queues
            .keys()
            .filter(|shard| {
                rendezvous_standby(shard.as_str(), members.keys().map(String::as_str)) == Some(node_id.as_str())
            })
            .cloned()
            .collect();
        followers.retain(|shard, _| standby.contains(shard));
        for shard in &standby {
            followers.entry(shard.clone()).or_insert_with(|| Follower::spawn(Arc::clone(&replicator), shard.clone()));
        }
        let following = followers.iter().map(|(shard, follower)| (shard.clone(), follower.sequence())).collect();
        let view = View { mine, members, following };
        assigned.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&view);
            *current = Some(view);
            changed
        });
    }
    // Leave first, so the other members start taking this node's shards at
    // their next poll while its owners hand them over.
    member.leave(&*replicator, &node_id).await;
    futures_util::future::join_all(owners.into_values().map(ShardOwner::shutdown)).await;
    while handovers.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn owners(shards: &[String], members: &[String]) -> Vec<String> {
        shards
            .iter()
            .map(|shard| rendezvous_owner(shard, members.iter().map(String::as_str)).expect("members").to_string())
            .collect()
    }

    #[test]
    fn the_score_is_the_documented_function() {
        // Fixed values: a change to the function would move every shard of
        // every mesh during a rolling upgrade, so it must not change.
        assert_ne!(
            rendezvous_score("node-a", "resourcelease.orders"),
            rendezvous_score("node-b", "resourcelease.orders")
        );
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(rendezvous_score("ab", "c"), rendezvous_score("a", "bc"));
        // Computed independently (Python, from the doc comment's
        // definition), as a client in another language would.
        assert_eq!(rendezvous_score("node-a", "resourcelease.orders"), 0xc9ee_b4f7_0e44_5b53);
        assert_eq!(rendezvous_score("", ""), 0x4f2d_b50f_1240_40cd);
    }

    #[test]
    fn shards_spread_over_members_and_a_leaving_member_moves_only_its_own() {
        let shards: Vec<String> = (0..300).map(|i| format!("resourcelease.q{i}")).collect();
        let three = members(3);
        let before = owners(&shards, &three);
        for member in &three {
            let count = before.iter().filter(|owner| *owner == member).count();
            assert!((60..=140).contains(&count), "{member} owns {count} of 300");
        }
        let two: Vec<String> = three.iter().filter(|m| *m != "node-1").cloned().collect();
        let after = owners(&shards, &two);
        for ((shard, old), new) in shards.iter().zip(&before).zip(&after) {
            if old != "node-1" {
                assert_eq!(old, new, "{shard} moved although its owner stayed");
            } else {
                assert_ne!(new, "node-1");
            }
        }
        // A joining member takes only shards it wins, from whoever had them.
        let four = members(4);
        let joined = owners(&shards, &four);
        for (old, new) in before.iter().zip(&joined) {
            assert!(new == old || new == "node-3", "{old} -> {new}");
        }
        assert!(joined.iter().any(|owner| owner == "node-3"));
    }

    #[test]
    fn no_members_no_owner_and_ties_are_stable() {
        assert_eq!(rendezvous_owner("resourcelease.x", std::iter::empty()), None);
        let members = ["b", "a", "c"];
        let one = rendezvous_owner("resourcelease.x", members);
        let other = rendezvous_owner("resourcelease.x", ["c", "b", "a"]);
        assert_eq!(one, other, "the order of the member list does not matter");
    }

    #[test]
    fn member_ids_must_fit_a_shard_id() {
        assert!(check_member_id("node-a.pod.cluster.local").is_ok());
        assert!(check_member_id(&format!("{}.{}", "x".repeat(63), "y".repeat(46))).is_ok(), "110 bytes");
        for bad in ["has space", "node-a:7000", "Node-A", "a..b", "é"] {
            assert!(check_member_id(bad).is_err(), "{bad}");
        }
        assert!(check_member_id(&format!("{}.{}", "x".repeat(63), "y".repeat(47))).is_err(), "111 bytes");
    }

    #[test]
    fn member_leases_carry_the_advertised_address() {
        let owner = member_owner("node-1", Some("http://10.0.0.1:7000"));
        assert_eq!(owner, "node-1@http://10.0.0.1:7000");
        assert_eq!(
            parse_member("omnirelay.members.node-1", &owner),
            Some(("node-1".into(), Some("http://10.0.0.1:7000".into())))
        );
        assert_eq!(parse_member("omnirelay.members.node-1", "node-1"), Some(("node-1".into(), None)));
        assert_eq!(parse_member("omnirelay.members.node-1", "node-10"), None);
        assert_eq!(parse_member("resourcelease.x", "node-1"), None);
        assert!(check_advertise("http://10.0.0.1:7000").is_ok());
        assert!(check_advertise(&"h".repeat(89)).is_ok());
        assert!(check_advertise(&"h".repeat(90)).is_err());
        assert!(check_member_id("a@b").is_err(), "'@' separates the id from the address");
    }

    #[test]
    fn assignments_parse() {
        assert_eq!("rendezvous".parse::<Assignment>(), Ok(Assignment::Rendezvous));
        assert_eq!("every".parse::<Assignment>(), Ok(Assignment::Every));
        assert!("random".parse::<Assignment>().expect_err("unknown").contains("random"));
    }
}
