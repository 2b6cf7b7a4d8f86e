//! Forwarding: a node that does not own a call's namespace calls the owner
//! on the caller's behalf, when configured to ([`ForwardingConfig`]);
//! otherwise it redirects ([`NodeError::NotOwner`]).
//!
//! - **Who the owner sees.** The forwarding node authenticates itself with
//!   its own credential (the client certificate of
//!   [`ForwardingConfig::tls`], or [`ForwardingConfig::metadata`] such as a
//!   bearer token) and vouches for the caller it authenticated with
//!   `x-client-principal`, `x-mtls-thumbprint` and `x-client-roles`. The
//!   owner accepts those headers only from a principal it lists as a
//!   trusted forwarder (or from a trusted proxy address), and then binds,
//!   authorizes and records the *caller*, as if it had called directly.
//! - **No loops.** The forwarded call carries [`FORWARDED_BY_HEADER`]; a
//!   node never forwards such a call again. If the membership moved in
//!   between, the node it reached answers with the redirect, which goes
//!   back to the caller unchanged.
//! - **A failing owner is skipped.** The node keeps a
//!   [`PeerLeaseHealthTracker`] over the other members: every membership
//!   poll counts as a heartbeat of the members it lists, every forwarded
//!   call as a lease granted and completed (answered) or failed (no
//!   answer: connection refused, reset, timed out). The owner is picked
//!   through a [`RoundRobinChooser`] over that tracker, so an owner that
//!   failed [`HealthConfig::consecutive_failures_to_eject`] calls in a row,
//!   or dropped out of the membership, is not called: the caller gets the
//!   redirect at once instead of waiting on a dead connection, and its
//!   routing client retries or follows it.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use omnirelay_proto::resourcelease::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::error::{ForwardedStatus, NodeError};
use super::membership::{Assigned, MEMBERSHIP_POLL};
use super::procedures::{ProcedureRequest, procedures};
use crate::chooser::{PeerChooser, RoundRobinChooser};
use crate::ids::{PeerId, ShardId};
use crate::middleware::principal::{CLIENT_PRINCIPAL_HEADER, CLIENT_ROLES_HEADER, Caller, MTLS_THUMBPRINT_HEADER};
use crate::peer_health::{HealthConfig, PeerLeaseHealthTracker, PeerMetadata};

/// Metadata (and HTTP header) naming the node that forwarded a call. A call
/// carrying it is never forwarded again.
pub const FORWARDED_BY_HEADER: &str = "omnirelay-forwarded-by";

/// Connecting to an owner that does not accept fails after this long: the
/// owners are members that renewed their lease within the last poll, so a
/// connection that takes longer is failing, and the caller is better served
/// by the redirect (its own client retries within its deadline).
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A forwarded call whose caller named no deadline gets this long: the
/// middleware's default call deadline is what the caller would have had at
/// the owner.
pub const FORWARD_DEFAULT_TIMEOUT: Duration = crate::middleware::defaults::DEFAULT_DEADLINE;

/// Most owner addresses a node keeps connections to: one per member; a
/// bound on memory should the membership list many addresses.
pub const MAX_FORWARD_CHANNELS: usize = 256;

/// How a node forwards calls for namespaces another member owns.
#[derive(Clone, Default)]
pub struct ForwardingConfig {
    /// TLS to the owners (their CA, and this node's client certificate for
    /// mutual TLS); plain HTTP/2 when `None`. Owner addresses are the URLs
    /// the members advertise.
    pub tls: Option<ClientTlsConfig>,
    /// Metadata sent with every forwarded call, e.g. `authorization: Bearer
    /// <this node's token>` when the owners authenticate nodes by token.
    pub metadata: Vec<(String, String)>,
    /// Thresholds of the tracker over the other members.
    pub health: HealthConfig,
}

impl std::fmt::Debug for ForwardingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardingConfig")
            .field("tls", &self.tls.is_some())
            .field("metadata", &self.metadata.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .field("health", &self.health)
            .finish()
    }
}

type Metadata = Vec<(MetadataKey<tonic::metadata::Ascii>, MetadataValue<tonic::metadata::Ascii>)>;

/// Where a call goes: the owner's member id and advertised address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) namespace: ShardId,
    pub(crate) owner: String,
    pub(crate) address: String,
}

impl Target {
    /// The redirect the caller gets when the call is not forwarded.
    fn redirect(&self) -> NodeError {
        NodeError::NotOwner {
            namespace: self.namespace.clone(),
            owner: self.owner.clone(),
            address: Some(self.address.clone()),
        }
    }
}

/// A request a forwarding node can send to the owner: the tonic client's
/// method of its procedure.
pub(crate) trait Forwardable: ProcedureRequest {
    /// Calls the procedure on `client`.
    fn send(
        client: pb::resource_lease_client::ResourceLeaseClient<Channel>,
        request: tonic::Request<Self>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Response>, tonic::Status>> + Send;
}

/// Implements [`Forwardable`] for every request of the one list.
macro_rules! forwardable {
    ($($variant:ident => $method:ident($request:ident) -> $response:ident),* $(,)?) => {
        $(impl Forwardable for pb::$request {
            fn send(
                mut client: pb::resource_lease_client::ResourceLeaseClient<Channel>,
                request: tonic::Request<Self>,
            ) -> impl Future<Output = Result<tonic::Response<pb::$response>, tonic::Status>> + Send {
                async move { client.$method(request).await }
            }
        })*
    };
}

procedures!(forwardable);

/// The forwarding side of a node. See the [module docs](self).
pub(crate) struct Forwarder {
    node_id: PeerId,
    tls: Option<ClientTlsConfig>,
    metadata: Metadata,
    channels: Mutex<HashMap<String, Channel>>,
    tracker: PeerLeaseHealthTracker,
    chooser: RoundRobinChooser,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Checks the configuration (errors name `forwarding.*`).
    pub(crate) fn new(node_id: PeerId, config: ForwardingConfig) -> Result<Self, (String, String)> {
        let tracker = PeerLeaseHealthTracker::without_gauges(config.health)
            .map_err(|err| ("forwarding.health".to_string(), err.to_string()))?;
        let mut metadata = Vec::with_capacity(config.metadata.len());
        for (index, (name, value)) in config.metadata.iter().enumerate() {
            let field = format!("forwarding.metadata[{index}]");
            let key = MetadataKey::from_bytes(name.as_bytes())
                .map_err(|_| (field.clone(), format!("{name:?} is not a metadata name")))?;
            if [CLIENT_PRINCIPAL_HEADER, CLIENT_ROLES_HEADER, MTLS_THUMBPRINT_HEADER, FORWARDED_BY_HEADER]
                .contains(&key.as_str())
            {
                return Err((field, format!("{name} is set by the forwarder itself")));
            }
            let value = value.parse().map_err(|_| (field, "the value must be printable ASCII".to_string()))?;
            metadata.push((key, value));
        }
        let chooser = RoundRobinChooser::new(tracker.clone());
        Ok(Self { node_id, tls: config.tls, metadata, channels: Mutex::new(HashMap::new()), tracker, chooser })
    }

    /// The tracker over the other members.
    #[cfg(test)]
    pub(crate) fn tracker(&self) -> &PeerLeaseHealthTracker {
        &self.tracker
    }

    /// Feeds the membership into the tracker every [`MEMBERSHIP_POLL`]:
    /// members listed count as alive, members gone are forgotten. Ends with
    /// `stopping`.
    pub(crate) fn watch_members(self: &Arc<Self>, assigned: Assigned, stopping: CancellationToken) {
        let forwarder = Arc::clone(self);
        tokio::spawn(async move {
            let mut polls = tokio::time::interval(MEMBERSHIP_POLL);
            polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stopping.cancelled() => break,
                    _ = polls.tick() => {}
                }
                let members = assigned.borrow().as_ref().map(|view| view.members.clone());
                if let Some(members) = members {
                    forwarder.observe(&members);
                }
            }
        });
    }

    /// Heartbeats the members listed (other than this node) and forgets
    /// those no longer listed.
    pub(crate) fn observe(&self, members: &BTreeMap<String, Option<String>>) {
        for member in members.keys().filter(|member| member.as_str() != self.node_id.as_str()) {
            let peer = PeerId::from(member.as_str());
            if self.tracker.state(&peer).is_some() {
                self.tracker.record_heartbeat(&peer);
            } else {
                self.tracker.register(&peer, PeerMetadata::default());
            }
        }
        for candidate in self.tracker.candidates() {
            if !members.contains_key(candidate.peer.as_str()) {
                self.tracker.remove(&candidate.peer);
            }
        }
    }

    /// Calls `target` with `request` on behalf of `caller`, within
    /// `timeout`. The owner's answer (success or status, its own redirect
    /// included) comes back unchanged; a target the tracker does not
    /// consider eligible, or one that does not answer, gives the caller the
    /// redirect to it instead.
    pub(crate) async fn forward<Req, Resp, F, Fut>(
        &self,
        target: &Target,
        caller: &Caller,
        timeout: Option<Duration>,
        request: Req,
        call: F,
    ) -> Result<Resp, NodeError>
    where
        F: FnOnce(pb::resource_lease_client::ResourceLeaseClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let peer = PeerId::from(target.owner.as_str());
        if self.tracker.state(&peer).is_none() {
            // The view names it a live member, but the tracker's poll has
            // not seen it yet.
            self.tracker.register(&peer, PeerMetadata::default());
        }
        if let Err(why) = self.chooser.choose_from(std::slice::from_ref(&peer)) {
            tracing::debug!(owner = %target.owner, reason = %why, "not forwarding to an ineligible owner");
            return Err(target.redirect());
        }
        let channel = self.channel(&target.address).map_err(|reason| {
            tracing::warn!(owner = %target.owner, address = %target.address, %reason, "cannot forward");
            target.redirect()
        })?;
        let mut outgoing = tonic::Request::new(request);
        let timeout = timeout.unwrap_or(FORWARD_DEFAULT_TIMEOUT);
        outgoing.set_timeout(timeout);
        let metadata = outgoing.metadata_mut();
        for (key, value) in &self.metadata {
            metadata.insert(key.clone(), value.clone());
        }
        vouch(metadata, caller, &self.node_id)?;
        let started = tokio::time::Instant::now();
        self.tracker.record_lease_granted(&peer);
        let client = pb::resource_lease_client::ResourceLeaseClient::new(channel);
        let answer = tokio::time::timeout(timeout, call(client, outgoing)).await;
        match answer {
            Ok(Ok(response)) => {
                self.tracker.record_lease_completed(&peer, started.elapsed());
                Ok(response.into_inner())
            }
            Ok(Err(status)) if status.metadata().get("content-type").is_some() => {
                // The owner answered (a refusal is an answer).
                self.tracker.record_lease_completed(&peer, started.elapsed());
                Err(NodeError::Forwarded(ForwardedStatus(status)))
            }
            Ok(Err(status)) => {
                // The caller gets the redirect: worth an operator's look
                // (a member listed as alive that does not answer); once the
                // tracker ejects the owner, calls skip it quietly.
                tracing::warn!(
                    owner = %target.owner,
                    address = %target.address,
                    error = ?status,
                    "the owner did not answer a forwarded call; redirecting the caller"
                );
                self.tracker.record_lease_failed(&peer);
                Err(target.redirect())
            }
            Err(_) => {
                self.tracker.record_lease_failed(&peer);
                Err(NodeError::Forwarded(ForwardedStatus(tonic::Status::deadline_exceeded(format!(
                    "the owner {} did not answer the forwarded call within {timeout:?}",
                    target.owner
                )))))
            }
        }
    }

    fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let secure = address.starts_with("https://");
        if secure != self.tls.is_some() {
            return Err(if secure {
                "an https:// owner needs forwarding TLS".to_string()
            } else {
                "an http:// owner cannot be reached with forwarding TLS".to_string()
            });
        }
        let mut endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|err| err.to_string())?
            .connect_timeout(FORWARD_CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|err| err.to_string())?;
        }
        if channels.len() >= MAX_FORWARD_CHANNELS {
            channels.clear();
        }
        let channel = endpoint.connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Writes the caller's identity and the loop guard into a forwarded call's
/// metadata.
fn vouch(metadata: &mut tonic::metadata::MetadataMap, caller: &Caller, node: &PeerId) -> Result<(), NodeError> {
    let ascii = |what: &'static str, value: &str| {
        value
            .parse::<MetadataValue<tonic::metadata::Ascii>>()
            .map_err(|_| NodeError::invalid(what, "cannot be forwarded: not printable ASCII (call the owner directly)"))
    };
    metadata.insert(CLIENT_PRINCIPAL_HEADER, ascii("principal", caller.principal.as_str())?);
    if let Some(thumbprint) = &caller.thumbprint {
        metadata.insert(MTLS_THUMBPRINT_HEADER, ascii("thumbprint", thumbprint)?);
    }
    if !caller.roles.is_empty() {
        metadata.insert(CLIENT_ROLES_HEADER, ascii("roles", &caller.roles.join(","))?);
    }
    metadata.insert(FORWARDED_BY_HEADER, ascii("node id", node.as_str())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_health::PeerState;
    use omnirelay_identity::CredentialSource;

    fn caller() -> Caller {
        Caller {
            principal: "spiffe://mesh/worker".into(),
            roles: vec!["worker".into(), "reader".into()],
            source: CredentialSource::BearerToken,
            thumbprint: None,
        }
    }

    fn target(address: String) -> Target {
        Target { namespace: ShardId::from("resourcelease.a"), owner: "node-2".into(), address }
    }

    #[test]
    fn a_forwarded_call_names_the_caller_and_the_forwarder() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        vouch(&mut metadata, &caller(), &PeerId::from("node-1")).expect("printable");
        let get = |name: &str| metadata.get(name).and_then(|value| value.to_str().ok()).map(str::to_string);
        assert_eq!(get(CLIENT_PRINCIPAL_HEADER).as_deref(), Some("spiffe://mesh/worker"));
        assert_eq!(get(CLIENT_ROLES_HEADER).as_deref(), Some("worker,reader"));
        assert_eq!(get(FORWARDED_BY_HEADER).as_deref(), Some("node-1"));
        assert_eq!(get(MTLS_THUMBPRINT_HEADER), None);
    }

    #[test]
    fn the_forwarder_refuses_to_send_identity_headers_of_its_own() {
        let config =
            ForwardingConfig { metadata: vec![(CLIENT_PRINCIPAL_HEADER.into(), "admin".into())], ..Default::default() };
        let (field, _) = Forwarder::new(PeerId::from("node-1"), config).expect_err("refused");
        assert_eq!(field, "forwarding.metadata[0]");
    }

    #[tokio::test]
    async fn members_are_tracked_from_the_membership() {
        let forwarder = Forwarder::new(PeerId::from("node-1"), ForwardingConfig::default()).expect("valid");
        let members: BTreeMap<String, Option<String>> =
            [("node-1", None), ("node-2", Some("http://127.0.0.1:1".to_string()))]
                .into_iter()
                .map(|(id, address)| (id.to_string(), address))
                .collect();
        forwarder.observe(&members);
        assert_eq!(forwarder.tracker().state(&PeerId::from("node-2")), Some(PeerState::Healthy));
        assert_eq!(forwarder.tracker().state(&PeerId::from("node-1")), None, "not itself");
        forwarder.observe(&BTreeMap::new());
        assert_eq!(forwarder.tracker().state(&PeerId::from("node-2")), None, "a member that left is forgotten");
    }

    /// An owner that accepts connections and closes them at once: every
    /// forwarded call fails without an answer. After the tracker's
    /// threshold of failures in a row the owner is ejected and the next
    /// calls are not sent at all: the caller gets the redirect at once.
    #[tokio::test]
    async fn an_owner_that_keeps_failing_is_skipped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = format!("http://{}", listener.local_addr().expect("address"));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(socket);
            }
        });
        let health = HealthConfig { consecutive_failures_to_eject: 2, ..HealthConfig::default() };
        let forwarder =
            Forwarder::new(PeerId::from("node-1"), ForwardingConfig { health, ..Default::default() }).expect("valid");
        let members = [("node-2".to_string(), Some(address.clone()))].into_iter().collect();
        forwarder.observe(&members);
        let target = target(address.clone());
        let stats = |mut client: pb::resource_lease_client::ResourceLeaseClient<Channel>, request| async move {
            client.stats(request).await
        };
        for attempt in 0..2 {
            let request = pb::StatsRequest { namespace: "resourcelease.a".into() };
            let status = forwarder
                .forward(&target, &caller(), Some(Duration::from_secs(5)), request, stats)
                .await
                .expect_err("nobody answers")
                .status();
            assert_eq!(status.code(), tonic::Code::Unavailable, "attempt {attempt}: {status:?}");
            let redirect =
                status.metadata().get(super::super::error::OWNER_ADDRESS_HEADER).and_then(|v| v.to_str().ok());
            assert_eq!(redirect, Some(address.as_str()), "the caller is sent to the owner");
        }
        assert_eq!(forwarder.tracker().state(&PeerId::from("node-2")), Some(PeerState::Ejected));
        let tried = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert!(tried >= 1, "the failing owner was called");
        let request = pb::StatsRequest { namespace: "resourcelease.a".into() };
        let status = forwarder
            .forward(&target, &caller(), Some(Duration::from_secs(5)), request, stats)
            .await
            .expect_err("skipped");
        assert!(matches!(status, NodeError::NotOwner { .. }), "{status:?}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), tried, "an ejected owner is not called");
    }
}
