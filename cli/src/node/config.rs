//! The sidecar's configuration: a TOML file, `OMNIRELAY_NODE_*` environment
//! variables and flags, merged in that order (flags override the
//! environment, which overrides the file), then validated into what
//! [`super::run`] needs. `docs/mesh-node.md` lists every key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use omnirelay_client::QueueConfig;
use omnirelay_client::middleware::{
    AuthorizationConfig, AuthorizationTable, ClientCertPolicy, JwtVerifier, MiddlewareConfig, PrincipalConfig,
    TrustedProxies,
};
use omnirelay_client::node::{Assignment, ConcurrencyLimits, NodeConfig};
use omnirelay_client::peer_health::HealthConfig;
use serde::{Deserialize, Serialize};

/// Where the sidecar listens when nothing says otherwise: loopback, so a
/// node started by hand is not reachable from the network by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

/// The node id when neither the configuration nor `HOSTNAME` names one.
pub const DEFAULT_NODE_ID: &str = "omnirelay-node";

/// How a client certificate is treated (`client_certs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertPolicy {
    /// Certificates are not looked at.
    Disabled,
    /// A certificate identifies the caller when present; otherwise a token
    /// must.
    Optional,
    /// Every call needs a client certificate.
    Required,
}

/// Where the node's queues write their events (`replicator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicatorKind {
    /// The replication hub (durable; the default when hub endpoints are
    /// configured).
    Hub,
    /// Process memory, bounded per shard: everything is lost when the node
    /// stops (tests, trying things out; the default without a hub).
    Memory,
    /// A local SQLite file (`replicator_path`): durable on this node alone,
    /// for a single node without a hub. A restarted node rebuilds its
    /// queues from the file; events covered by a snapshot are trimmed.
    Sqlite,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `omnirelay node`; each also reads an `OMNIRELAY_NODE_*`
/// variable. Unset values fall back to the file, then to the defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// TOML configuration file.
    #[arg(long, env = "OMNIRELAY_NODE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Prints the effective configuration as JSON and exits.
    #[arg(long)]
    pub print_config: bool,
    /// Address for gRPC and HTTP/JSON (and the diagnostics, unless
    /// `--control-listen` is set) [default: 127.0.0.1:7420].
    #[arg(long, env = "OMNIRELAY_NODE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Separate address for the diagnostics endpoints.
    #[arg(long, env = "OMNIRELAY_NODE_CONTROL_LISTEN")]
    pub control_listen: Option<SocketAddr>,
    /// The URL other nodes send callers to for this node's namespaces
    /// (`omnirelay-owner-address`) [default: the listen address with http://
    /// or https://, unless it is a wildcard address].
    #[arg(long, env = "OMNIRELAY_NODE_ADVERTISE")]
    pub advertise: Option<String>,
    /// This node's peer id [default: $HOSTNAME, else omnirelay-node].
    #[arg(long, env = "OMNIRELAY_NODE_ID")]
    pub node_id: Option<String>,
    /// A namespace to host (repeat, or comma-separate in the variable).
    #[arg(long = "namespace", env = "OMNIRELAY_NODE_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Most items per queue (pending + leased).
    #[arg(long, env = "OMNIRELAY_NODE_CAPACITY")]
    pub capacity: Option<u64>,
    /// Pending depth at which backpressure turns on.
    #[arg(long, env = "OMNIRELAY_NODE_HIGH_WATERMARK")]
    pub high_watermark: Option<u64>,
    /// Pending depth at which backpressure turns off.
    #[arg(long, env = "OMNIRELAY_NODE_LOW_WATERMARK")]
    pub low_watermark: Option<u64>,
    /// Leases per item before it is dead-lettered.
    #[arg(long, env = "OMNIRELAY_NODE_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Default lease duration, in milliseconds.
    #[arg(long, env = "OMNIRELAY_NODE_LEASE_DURATION_MS")]
    pub lease_duration_ms: Option<u64>,
    /// Longest lease a worker may ask for, in milliseconds.
    #[arg(long, env = "OMNIRELAY_NODE_MAX_LEASE_DURATION_MS")]
    pub max_lease_duration_ms: Option<u64>,
    /// Server certificate chain (PEM); enables TLS.
    #[arg(long, env = "OMNIRELAY_NODE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "OMNIRELAY_NODE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that signs client certificates; enables mutual TLS.
    #[arg(long, env = "OMNIRELAY_NODE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Client certificate policy [default: optional].
    #[arg(long, value_enum, env = "OMNIRELAY_NODE_CLIENT_CERTS")]
    pub client_certs: Option<CertPolicy>,
    /// Required prefix of client certificate SAN URIs (a SPIFFE trust domain).
    #[arg(long, env = "OMNIRELAY_NODE_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Pinned JWT algorithm (ES256, RS256, EdDSA, ...).
    #[arg(long, env = "OMNIRELAY_NODE_JWT_ALGORITHM")]
    pub jwt_algorithm: Option<String>,
    /// The token issuer's public key (PEM file); repeat (or comma-separate in
    /// the variable) during a key rotation: a token signed by any verifies.
    #[arg(long, env = "OMNIRELAY_NODE_JWT_PUBLIC_KEY", value_delimiter = ',')]
    pub jwt_public_key: Vec<PathBuf>,
    /// Required `iss` of tokens.
    #[arg(long, env = "OMNIRELAY_NODE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of tokens.
    #[arg(long, env = "OMNIRELAY_NODE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Claim holding the caller's roles [default: roles].
    #[arg(long, env = "OMNIRELAY_NODE_JWT_ROLES_CLAIM")]
    pub jwt_roles_claim: Option<String>,
    /// A proxy (address or CIDR) trusted to send x-client-principal (repeat,
    /// or comma-separate in the variable).
    #[arg(long = "trusted-proxy", env = "OMNIRELAY_NODE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// The authorization table as a JSON file (replaces the file's
    /// `[authorization]`).
    #[arg(long, env = "OMNIRELAY_NODE_AUTHORIZATION_FILE")]
    pub authorization_file: Option<PathBuf>,
    /// Concurrent calls per namespace [default: 1024].
    #[arg(long, env = "OMNIRELAY_NODE_CONCURRENCY_LIMIT_NORMAL")]
    pub concurrency_limit_normal: Option<usize>,
    /// Concurrent calls per namespace under backpressure [default: 64].
    #[arg(long, env = "OMNIRELAY_NODE_CONCURRENCY_LIMIT_BACKPRESSURE")]
    pub concurrency_limit_backpressure: Option<usize>,
    /// The former name of `--concurrency-limit-normal` (it limits
    /// concurrent calls, never a rate), still accepted with its variable so
    /// existing deployments keep their setting; the new name wins.
    #[arg(long, env = "OMNIRELAY_NODE_RATE_LIMIT_NORMAL", hide = true)]
    pub rate_limit_normal: Option<usize>,
    /// The former name of `--concurrency-limit-backpressure`, likewise.
    #[arg(long, env = "OMNIRELAY_NODE_RATE_LIMIT_BACKPRESSURE", hide = true)]
    pub rate_limit_backpressure: Option<usize>,
    /// Replication hub endpoints (`http://host:7400` or `https://...`;
    /// repeat, or comma-separate); makes the hub the replicator.
    #[arg(long = "hub", env = "OMNIRELAY_NODE_HUB", value_delimiter = ',')]
    pub hub: Vec<String>,
    /// Where the queues write their events [default: hub when --hub is
    /// given, else memory].
    #[arg(long, value_enum, env = "OMNIRELAY_NODE_REPLICATOR")]
    pub replicator: Option<ReplicatorKind>,
    /// The SQLite log file of `--replicator sqlite` (created if missing;
    /// one node per file).
    #[arg(long, env = "OMNIRELAY_NODE_REPLICATOR_PATH")]
    pub replicator_path: Option<PathBuf>,
    /// CA bundle (PEM) that signs the hub's certificate (https endpoints).
    #[arg(long, env = "OMNIRELAY_NODE_HUB_CA")]
    pub hub_ca: Option<PathBuf>,
    /// This node's certificate chain (PEM) for mutual TLS to the hub.
    #[arg(long, env = "OMNIRELAY_NODE_HUB_CERT")]
    pub hub_cert: Option<PathBuf>,
    /// This node's private key (PEM) for mutual TLS to the hub.
    #[arg(long, env = "OMNIRELAY_NODE_HUB_KEY")]
    pub hub_key: Option<PathBuf>,
    /// Name to verify the hub's certificate against, when it differs from
    /// the endpoints' host names.
    #[arg(long, env = "OMNIRELAY_NODE_HUB_DOMAIN")]
    pub hub_domain: Option<String>,
    /// How long this node's lease on a shard lasts without renewal, in
    /// milliseconds [default: 10000].
    #[arg(long, env = "OMNIRELAY_NODE_SHARD_LEASE_TTL_MS")]
    pub shard_lease_ttl_ms: Option<u64>,
    /// Which namespaces this node tries to own: `rendezvous` spreads them
    /// over the live nodes sharing the replicator (membership through member
    /// leases on the log); `every` makes this node own all of them, with any
    /// other node configured alike as a hot standby [default: rendezvous
    /// with the hub replicator, every with the others].
    #[arg(long, env = "OMNIRELAY_NODE_ASSIGNMENT")]
    pub assignment: Option<String>,
    /// OTLP/gRPC collector for spans, e.g. http://otel-collector:4317.
    #[arg(long, env = "OMNIRELAY_NODE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log format [default: text].
    #[arg(long, value_enum, env = "OMNIRELAY_NODE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Forward calls for namespaces another node owns to that owner instead
    /// of redirecting the caller (the owner must list this node with
    /// --trusted-forwarder).
    #[arg(long, env = "OMNIRELAY_NODE_FORWARD")]
    pub forward: bool,
    /// CA bundle (PEM) that signs the other nodes' certificates, for
    /// forwarding to https members [default: --tls-client-ca]; this node
    /// presents its own --tls-cert/--tls-key as its client certificate.
    #[arg(long, env = "OMNIRELAY_NODE_FORWARD_CA")]
    pub forward_ca: Option<PathBuf>,
    /// A file holding the bearer token this node presents when it forwards
    /// (for owners that authenticate nodes by token).
    #[arg(long, env = "OMNIRELAY_NODE_FORWARD_TOKEN_FILE")]
    pub forward_token_file: Option<PathBuf>,
    /// A node principal (certificate SAN URI or token subject) allowed to
    /// forward calls on its callers' behalf (repeat, or comma-separate in
    /// the variable).
    #[arg(long = "trusted-forwarder", env = "OMNIRELAY_NODE_TRUSTED_FORWARDERS", value_delimiter = ',')]
    pub trusted_forwarders: Vec<String>,
    /// TEST ONLY, NEVER IN SERVICE: acknowledge writes the log refused and
    /// never self-fence, so a stale owner keeps answering. The failure
    /// drill uses it to prove its checker sees what fencing prevents.
    #[arg(long, hide = true)]
    pub unsafe_disable_fencing: bool,
}

/// Queue options as the file writes them (`[queue]` for every namespace,
/// `[[queues]]` per namespace); unset fields keep the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueOptions {
    /// Namespace (only in `[[queues]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Most items held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// Backpressure on at this pending depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_watermark: Option<u64>,
    /// Backpressure off at this pending depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_watermark: Option<u64>,
    /// Leases per item before dead-lettering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Default lease duration, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_ms: Option<u64>,
    /// Longest lease, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lease_duration_ms: Option<u64>,
    /// First backoff delay after a failure, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base_ms: Option<u64>,
    /// Longest backoff delay, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max_ms: Option<u64>,
}

impl QueueOptions {
    /// `self` with every field `over` sets replaced.
    fn overridden_by(&self, over: &QueueOptions) -> QueueOptions {
        QueueOptions {
            namespace: over.namespace.clone().or_else(|| self.namespace.clone()),
            capacity: over.capacity.or(self.capacity),
            high_watermark: over.high_watermark.or(self.high_watermark),
            low_watermark: over.low_watermark.or(self.low_watermark),
            max_attempts: over.max_attempts.or(self.max_attempts),
            lease_duration_ms: over.lease_duration_ms.or(self.lease_duration_ms),
            max_lease_duration_ms: over.max_lease_duration_ms.or(self.max_lease_duration_ms),
            backoff_base_ms: over.backoff_base_ms.or(self.backoff_base_ms),
            backoff_max_ms: over.backoff_max_ms.or(self.backoff_max_ms),
        }
    }

    fn apply(&self, config: &mut QueueConfig) {
        if let Some(v) = self.capacity {
            config.capacity = v;
        }
        if let Some(v) = self.high_watermark {
            config.high_watermark = v;
        }
        if let Some(v) = self.low_watermark {
            config.low_watermark = v;
        }
        if let Some(v) = self.max_attempts {
            config.max_attempts = v;
        }
        if let Some(v) = self.lease_duration_ms {
            config.lease_duration = Duration::from_millis(v);
        }
        if let Some(v) = self.max_lease_duration_ms {
            config.max_lease_duration = Duration::from_millis(v);
        }
        if let Some(v) = self.backoff_base_ms {
            config.backoff_base = Duration::from_millis(v);
        }
        if let Some(v) = self.backoff_max_ms {
            config.backoff_max = Duration::from_millis(v);
        }
    }
}

/// TLS files (`[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// Server certificate chain, PEM.
    pub cert: Option<PathBuf>,
    /// Server private key, PEM.
    pub key: Option<PathBuf>,
    /// Client CA bundle, PEM (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// Forwarding to the owners of other namespaces (`[forwarding]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardingFile {
    /// Forward instead of redirecting.
    pub enabled: Option<bool>,
    /// CA bundle that signs the other nodes' certificates, PEM.
    pub ca: Option<PathBuf>,
    /// File holding this node's bearer token for the owners.
    pub token_file: Option<PathBuf>,
}

/// The replication hub (`[hub]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    /// Endpoints, tried in order.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// CA bundle that signs the hub's certificate, PEM.
    pub ca: Option<PathBuf>,
    /// This node's certificate chain for mutual TLS, PEM.
    pub cert: Option<PathBuf>,
    /// This node's private key for mutual TLS, PEM.
    pub key: Option<PathBuf>,
    /// Name to verify the hub's certificate against.
    pub domain: Option<String>,
}

/// Shard leases and snapshots (`[ownership]`), milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnershipFile {
    /// Lease TTL.
    pub lease_ttl_ms: Option<u64>,
    /// Renewal interval [default: a third of the TTL].
    pub renew_every_ms: Option<u64>,
    /// Durable events between snapshots.
    pub snapshot_every_events: Option<u64>,
    /// Longest time between snapshots of a shard that changed.
    pub snapshot_every_ms: Option<u64>,
    /// `rendezvous` or `every` (see `--assignment`).
    pub assignment: Option<String>,
}

/// JWT settings (`[jwt]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtFile {
    /// Pinned algorithm.
    pub algorithm: Option<String>,
    /// Issuer public key, PEM file, or a list of them during a key rotation.
    pub public_key: Option<omnirelay_identity::jwt::KeyFiles>,
    /// Required issuer.
    pub issuer: Option<String>,
    /// Required audience.
    pub audience: Option<String>,
    /// Roles claim.
    pub roles_claim: Option<String>,
}

/// The configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// RPC (and diagnostics) address.
    pub listen: Option<SocketAddr>,
    /// Diagnostics address.
    pub control_listen: Option<SocketAddr>,
    /// The URL other nodes redirect callers to.
    pub advertise: Option<String>,
    /// Peer id.
    pub node_id: Option<String>,
    /// Namespaces to host (besides those of `[[queues]]`).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Options for every queue.
    #[serde(default)]
    pub queue: QueueOptions,
    /// Per-namespace options (each also hosts its namespace).
    #[serde(default)]
    pub queues: Vec<QueueOptions>,
    /// TLS files.
    #[serde(default)]
    pub tls: TlsFile,
    /// Client certificate policy.
    pub client_certs: Option<CertPolicy>,
    /// Required SAN URI prefix.
    pub trust_domain: Option<String>,
    /// JWT settings.
    #[serde(default)]
    pub jwt: JwtFile,
    /// Trusted proxies.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Node principals allowed to forward on their callers' behalf.
    #[serde(default)]
    pub trusted_forwarders: Vec<String>,
    /// Forwarding to owners (`[forwarding]`).
    #[serde(default)]
    pub forwarding: ForwardingFile,
    /// The authorization table, inline.
    pub authorization: Option<AuthorizationConfig>,
    /// The authorization table as a JSON file.
    pub authorization_file: Option<PathBuf>,
    /// Concurrent calls per namespace (`rate_limit_normal`, its former
    /// name, is still read).
    #[serde(alias = "rate_limit_normal")]
    pub concurrency_limit_normal: Option<usize>,
    /// Concurrent calls per namespace under backpressure
    /// (`rate_limit_backpressure`, its former name, is still read).
    #[serde(alias = "rate_limit_backpressure")]
    pub concurrency_limit_backpressure: Option<usize>,
    /// Sweeper interval, milliseconds.
    pub sweep_interval_ms: Option<u64>,
    /// Peer health thresholds (durations in milliseconds).
    pub health: Option<HealthConfig>,
    /// Where events go.
    pub replicator: Option<ReplicatorKind>,
    /// The SQLite log file (`replicator = "sqlite"`).
    pub replicator_path: Option<PathBuf>,
    /// The replication hub.
    #[serde(default)]
    pub hub: HubFile,
    /// Shard leases and snapshots.
    #[serde(default)]
    pub ownership: OwnershipFile,
    /// OTLP endpoint.
    pub otlp_endpoint: Option<String>,
    /// Log format.
    pub log_format: Option<LogFormat>,
}

impl FileConfig {
    /// Reads and parses a file; errors name the file and the key.
    pub fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read the config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parse the config file {}", path.display()))
    }
}

/// The merged configuration, before files named in it are read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SidecarConfig {
    /// RPC (and diagnostics, without `control_listen`) address.
    pub listen: SocketAddr,
    /// Separate diagnostics address.
    pub control_listen: Option<SocketAddr>,
    /// The URL other nodes redirect callers to (none for a wildcard listen
    /// address without `--advertise`).
    pub advertise: Option<String>,
    /// Peer id.
    pub node_id: String,
    /// One entry per hosted namespace, every option resolved.
    pub queues: Vec<QueueOptions>,
    /// TLS files.
    pub tls: TlsFile,
    /// Client certificate policy.
    pub client_certs: CertPolicy,
    /// Required SAN URI prefix.
    pub trust_domain: Option<String>,
    /// JWT settings.
    pub jwt: JwtFile,
    /// Trusted proxies.
    pub trusted_proxies: Vec<String>,
    /// Node principals allowed to forward on their callers' behalf.
    pub trusted_forwarders: Vec<String>,
    /// Forwarding to owners.
    pub forwarding: ForwardingFile,
    /// The authorization table.
    pub authorization: AuthorizationConfig,
    /// Concurrent calls per namespace (normal, backpressure).
    pub concurrency_limits: (usize, usize),
    /// Sweeper interval, milliseconds.
    pub sweep_interval_ms: u64,
    /// Peer health thresholds.
    pub health: HealthConfig,
    /// Where events go.
    pub replicator: ReplicatorKind,
    /// The SQLite log file (`replicator = "sqlite"`).
    pub replicator_path: Option<PathBuf>,
    /// The replication hub.
    pub hub: HubFile,
    /// Shard leases and snapshots.
    pub ownership: OwnershipFile,
    /// OTLP endpoint.
    pub otlp_endpoint: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Test only: see `NodeArgs::unsafe_disable_fencing`.
    pub unsafe_disable_fencing: bool,
}

impl SidecarConfig {
    /// Merges flags (and their variables, which clap already folded in:
    /// a flag wins over its variable) over the file over the defaults.
    pub fn merge(args: &NodeArgs, file: FileConfig) -> anyhow::Result<Self> {
        let flags = QueueOptions {
            namespace: None,
            capacity: args.capacity,
            high_watermark: args.high_watermark,
            low_watermark: args.low_watermark,
            max_attempts: args.max_attempts,
            lease_duration_ms: args.lease_duration_ms,
            max_lease_duration_ms: args.max_lease_duration_ms,
            backoff_base_ms: None,
            backoff_max_ms: None,
        };
        let mut names: Vec<String> = if args.namespaces.is_empty() {
            let mut names = file.namespaces.clone();
            names.extend(file.queues.iter().filter_map(|q| q.namespace.clone()));
            names
        } else {
            args.namespaces.clone()
        };
        if names.is_empty() {
            names.push(omnirelay_client::shard::DEFAULT_NAMESPACE.to_string());
        }
        let mut seen = std::collections::HashSet::new();
        names.retain(|name| seen.insert(name.clone()));
        for (index, queue) in file.queues.iter().enumerate() {
            if queue.namespace.is_none() {
                bail!("queues[{index}].namespace: is required");
            }
        }
        let queues = names
            .into_iter()
            .map(|name| {
                let per_namespace = file.queues.iter().find(|q| q.namespace.as_deref() == Some(name.as_str()));
                let mut options = file.queue.clone();
                if let Some(per_namespace) = per_namespace {
                    options = options.overridden_by(per_namespace);
                }
                options = options.overridden_by(&flags);
                options.namespace = Some(name);
                options
            })
            .collect();
        let authorization = match args.authorization_file.as_ref().or(file.authorization_file.as_ref()) {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read the authorization file {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("parse the authorization file {}", path.display()))?
            }
            None => file.authorization.clone().unwrap_or_default(),
        };
        let hub = HubFile {
            endpoints: if args.hub.is_empty() { file.hub.endpoints.clone() } else { args.hub.clone() },
            ca: args.hub_ca.clone().or(file.hub.ca.clone()),
            cert: args.hub_cert.clone().or(file.hub.cert.clone()),
            key: args.hub_key.clone().or(file.hub.key.clone()),
            domain: args.hub_domain.clone().or(file.hub.domain.clone()),
        };
        let hub_kind = args.replicator.or(file.replicator).unwrap_or(if hub.endpoints.is_empty() {
            ReplicatorKind::Memory
        } else {
            ReplicatorKind::Hub
        });
        let listen: SocketAddr =
            args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid default"));
        let tls = args.tls_cert.is_some() || file.tls.cert.is_some();
        let advertise = args.advertise.clone().or(file.advertise.clone()).or_else(|| {
            (!listen.ip().is_unspecified()).then(|| format!("{}://{listen}", if tls { "https" } else { "http" }))
        });
        Ok(Self {
            listen,
            control_listen: args.control_listen.or(file.control_listen),
            advertise,
            node_id: args
                .node_id
                .clone()
                .or(file.node_id)
                .or_else(|| {
                    // Host names are case-insensitive; shard names (which
                    // embed the node id) are lowercase.
                    std::env::var("HOSTNAME").ok().filter(|h| !h.trim().is_empty()).map(|h| h.to_ascii_lowercase())
                })
                .unwrap_or_else(|| DEFAULT_NODE_ID.to_string()),
            queues,
            tls: TlsFile {
                cert: args.tls_cert.clone().or(file.tls.cert),
                key: args.tls_key.clone().or(file.tls.key),
                client_ca: args.tls_client_ca.clone().or(file.tls.client_ca),
            },
            client_certs: args.client_certs.or(file.client_certs).unwrap_or(CertPolicy::Optional),
            trust_domain: args.trust_domain.clone().or(file.trust_domain),
            jwt: JwtFile {
                algorithm: args.jwt_algorithm.clone().or(file.jwt.algorithm),
                public_key: if args.jwt_public_key.is_empty() {
                    file.jwt.public_key
                } else {
                    Some(omnirelay_identity::jwt::KeyFiles::Many(args.jwt_public_key.clone()))
                },
                issuer: args.jwt_issuer.clone().or(file.jwt.issuer),
                audience: args.jwt_audience.clone().or(file.jwt.audience),
                roles_claim: args.jwt_roles_claim.clone().or(file.jwt.roles_claim),
            },
            trusted_proxies: if args.trusted_proxies.is_empty() {
                file.trusted_proxies
            } else {
                args.trusted_proxies.clone()
            },
            trusted_forwarders: if args.trusted_forwarders.is_empty() {
                file.trusted_forwarders
            } else {
                args.trusted_forwarders.clone()
            },
            forwarding: ForwardingFile {
                enabled: Some(args.forward || file.forwarding.enabled.unwrap_or(false)),
                ca: args.forward_ca.clone().or(file.forwarding.ca),
                token_file: args.forward_token_file.clone().or(file.forwarding.token_file),
            },
            authorization,
            concurrency_limits: (
                args.concurrency_limit_normal
                    .or(args.rate_limit_normal)
                    .or(file.concurrency_limit_normal)
                    .unwrap_or(ConcurrencyLimits::default().normal),
                args.concurrency_limit_backpressure
                    .or(args.rate_limit_backpressure)
                    .or(file.concurrency_limit_backpressure)
                    .unwrap_or(ConcurrencyLimits::default().backpressure),
            ),
            sweep_interval_ms: file.sweep_interval_ms.unwrap_or_else(|| {
                u64::try_from(omnirelay_client::defaults::SWEEP_INTERVAL.as_millis()).unwrap_or(u64::MAX)
            }),
            health: file.health.unwrap_or_default(),
            replicator: hub_kind,
            replicator_path: args.replicator_path.clone().or(file.replicator_path),
            hub,
            ownership: OwnershipFile {
                lease_ttl_ms: args.shard_lease_ttl_ms.or(file.ownership.lease_ttl_ms),
                assignment: Some(args.assignment.clone().or_else(|| file.ownership.assignment.clone()).unwrap_or_else(
                    || {
                        // Only the hub is shared between nodes; a node on
                        // its own log owns all of its namespaces.
                        if hub_kind == ReplicatorKind::Hub { Assignment::Rendezvous } else { Assignment::Every }
                            .as_str()
                            .to_string()
                    },
                )),
                ..file.ownership
            },
            otlp_endpoint: args.otlp_endpoint.clone().or(file.otlp_endpoint),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            unsafe_disable_fencing: args.unsafe_disable_fencing,
        })
    }

    /// Validates everything and reads the files it names (JWT key), giving
    /// the node's configuration. Errors name the key at fault.
    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        let mut config = NodeConfig::new(self.node_id.as_str());
        for options in &self.queues {
            let namespace = options.namespace.clone().unwrap_or_default();
            let mut queue = QueueConfig::new(namespace, self.node_id.as_str());
            options.apply(&mut queue);
            config.queues.push(queue);
        }
        let policy = match self.client_certs {
            CertPolicy::Disabled => ClientCertPolicy::Disabled,
            CertPolicy::Optional => ClientCertPolicy::Optional,
            CertPolicy::Required => ClientCertPolicy::Required,
        };
        if policy == ClientCertPolicy::Required && self.tls.client_ca.is_none() && self.trusted_proxies.is_empty() {
            bail!("client_certs: \"required\" needs tls.client_ca (or trusted proxies that vouch for certificates)");
        }
        let mut principal = PrincipalConfig::new().client_certs(policy);
        if let Some(domain) = &self.trust_domain {
            principal = principal.trust_domain(domain.clone());
        }
        principal = principal.trusted_proxies(TrustedProxies::parse(&self.trusted_proxies)?);
        let mut forwarders = Vec::with_capacity(self.trusted_forwarders.len());
        for (index, forwarder) in self.trusted_forwarders.iter().enumerate() {
            let principal = omnirelay_identity::binding::normalize("trusted forwarder", forwarder)
                .map_err(|err| anyhow::anyhow!("trusted_forwarders[{index}]: {err}"))?;
            forwarders.push(principal);
        }
        principal = principal.trusted_forwarders(forwarders);
        if let Some(verifier) = self.jwt_verifier()? {
            principal = principal.jwt(verifier);
        }
        let authorization = AuthorizationTable::from_config(&self.authorization)
            .map_err(|err| anyhow::anyhow!("authorization.{err}"))?;
        config.middleware = MiddlewareConfig { principal, authorization, ..MiddlewareConfig::default() };
        config.concurrency_limits =
            ConcurrencyLimits { normal: self.concurrency_limits.0, backpressure: self.concurrency_limits.1 };
        config.sweep_interval = Duration::from_millis(self.sweep_interval_ms);
        config.health = self.health.clone();
        config.advertise = self.advertise.clone();
        config.forwarding = self.forwarding_config()?;
        let ownership = &mut config.ownership;
        if let Some(ttl) = self.ownership.lease_ttl_ms {
            ownership.lease_ttl = Duration::from_millis(ttl);
            ownership.renew_every = ownership.lease_ttl / 3;
        }
        if let Some(every) = self.ownership.renew_every_ms {
            ownership.renew_every = Duration::from_millis(every);
        }
        if let Some(events) = self.ownership.snapshot_every_events {
            ownership.snapshot_every_events = events;
        }
        if let Some(every) = self.ownership.snapshot_every_ms {
            ownership.snapshot_every = Duration::from_millis(every);
        }
        if let Some(assignment) = &self.ownership.assignment {
            ownership.assignment = assignment.parse().map_err(|err| anyhow::anyhow!("ownership.assignment: {err}"))?;
        }
        match self.replicator {
            ReplicatorKind::Hub if self.hub.endpoints.is_empty() => {
                bail!("hub.endpoints: the hub replicator needs at least one endpoint (--hub URL)")
            }
            ReplicatorKind::Memory if !self.hub.endpoints.is_empty() => {
                bail!("replicator: \"memory\" cannot be combined with hub endpoints; drop --hub or the replicator")
            }
            ReplicatorKind::Sqlite if !self.hub.endpoints.is_empty() => {
                bail!("replicator: \"sqlite\" cannot be combined with hub endpoints; drop --hub or the replicator")
            }
            ReplicatorKind::Sqlite if self.replicator_path.is_none() => {
                bail!("replicator_path: the sqlite replicator needs its file (--replicator-path FILE)")
            }
            ReplicatorKind::Hub | ReplicatorKind::Memory if self.replicator_path.is_some() => {
                bail!("replicator_path: only the sqlite replicator has a file; add --replicator sqlite")
            }
            _ => {}
        }
        if self.hub.cert.is_some() != self.hub.key.is_some() {
            bail!("hub.cert, hub.key: mutual TLS to the hub needs both");
        }
        config.validate()?;
        Ok(config)
    }

    /// Forwarding, when enabled: TLS to the owners from this node's own
    /// certificate and the mesh CA, and its token. Errors name the key.
    fn forwarding_config(&self) -> anyhow::Result<Option<omnirelay_client::node::ForwardingConfig>> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let forwarding = &self.forwarding;
        if forwarding.enabled != Some(true) {
            if forwarding.ca.is_some() || forwarding.token_file.is_some() {
                bail!("forwarding.enabled: forwarding.ca and forwarding.token_file need forwarding (--forward)");
            }
            return Ok(None);
        }
        let read = |what: &str, path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("{what}: read {}", path.display()))
        };
        let tls = match (&self.tls.cert, &self.tls.key) {
            (Some(cert), Some(key)) => {
                let ca = forwarding.ca.as_ref().or(self.tls.client_ca.as_ref()).context(
                    "forwarding.ca: a node serving TLS forwards over TLS and needs the CA of the other nodes \
                     (--forward-ca, or --tls-client-ca)",
                )?;
                Some(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(read("forwarding.ca", ca)?))
                        .identity(Identity::from_pem(read("tls.cert", cert)?, read("tls.key", key)?)),
                )
            }
            _ => None,
        };
        let mut metadata = Vec::new();
        if let Some(path) = &forwarding.token_file {
            let token =
                String::from_utf8(read("forwarding.token_file", path)?).context("forwarding.token_file: not UTF-8")?;
            let token = token.trim();
            if token.is_empty() {
                bail!("forwarding.token_file: {} is empty", path.display());
            }
            metadata.push(("authorization".to_string(), format!("Bearer {token}")));
        }
        Ok(Some(omnirelay_client::node::ForwardingConfig { tls, metadata, health: self.health.clone() }))
    }

    /// The replicator the node's queues write to: the hub (TLS files read
    /// here), a local SQLite file, or bounded process memory.
    pub async fn replicator(&self) -> anyhow::Result<(std::sync::Arc<dyn omnirelay_client::Replicator>, &'static str)> {
        use omnirelay_client::replication::{HubEndpoint, HubReplicator, HubReplicatorConfig, HubTls};
        match self.replicator {
            ReplicatorKind::Memory => Ok((
                std::sync::Arc::new(omnirelay_client::InMemoryReplicator::with_retention(
                    omnirelay_client::defaults::MEMORY_RETENTION_EVENTS,
                )),
                "in-memory",
            )),
            ReplicatorKind::Sqlite => {
                use omnirelay_client::replication::{SqliteReplicator, SqliteReplicatorConfig};
                let path = self.replicator_path.clone().context("replicator_path: missing")?;
                let config = SqliteReplicatorConfig { trim_below_snapshots: true };
                let replicator = SqliteReplicator::open_with(&path, config)
                    .await
                    .with_context(|| format!("replicator_path: open {}", path.display()))?;
                Ok((std::sync::Arc::new(replicator), "sqlite"))
            }
            ReplicatorKind::Hub => {
                let read = |what: &str, path: &PathBuf| {
                    std::fs::read(path).with_context(|| format!("{what}: read {}", path.display()))
                };
                let tls = match &self.hub.ca {
                    None => None,
                    Some(ca) => Some(HubTls {
                        ca_pem: read("hub.ca", ca)?,
                        identity: match (&self.hub.cert, &self.hub.key) {
                            (Some(cert), Some(key)) => Some((read("hub.cert", cert)?, read("hub.key", key)?)),
                            _ => None,
                        },
                        domain: self.hub.domain.clone(),
                    }),
                };
                let mut config = HubReplicatorConfig::new(self.hub.endpoints.iter().map(HubEndpoint::new));
                config.tls = tls;
                let replicator = HubReplicator::new(config).map_err(|err| anyhow::anyhow!("hub.{err}"))?;
                Ok((std::sync::Arc::new(replicator), "hub"))
            }
        }
    }

    fn jwt_verifier(&self) -> anyhow::Result<Option<JwtVerifier>> {
        let jwt = &self.jwt;
        let any = jwt.algorithm.is_some() || jwt.public_key.is_some() || jwt.issuer.is_some() || jwt.audience.is_some();
        if !any {
            return Ok(None);
        }
        let algorithm: jsonwebtoken::Algorithm = jwt
            .algorithm
            .as_deref()
            .context("jwt.algorithm: is required when tokens are accepted")?
            .parse()
            .map_err(|_| anyhow::anyhow!("jwt.algorithm: not a JWT algorithm name (ES256, RS256, EdDSA, ...)"))?;
        let keys = jwt.public_key.as_ref().context("jwt.public_key: is required when tokens are accepted")?;
        let pems = omnirelay_identity::jwt::read_key_files("jwt.public_key", keys.paths())?;
        let issuer = jwt.issuer.clone().context("jwt.issuer: is required when tokens are accepted")?;
        let audience = jwt.audience.clone().context("jwt.audience: is required when tokens are accepted")?;
        let mut verifier = JwtVerifier::from_public_key_pems(algorithm, &pems, issuer, audience)?;
        if let Some(claim) = &jwt.roles_claim {
            verifier = verifier.with_roles_claim(claim.clone());
        }
        Ok(Some(verifier))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileConfig {
        toml::from_str(text).expect("valid TOML")
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let file = file(
            r#"
            listen = "0.0.0.0:9000"
            node_id = "from-file"
            namespaces = ["resourcelease"]
            [queue]
            capacity = 500
            high_watermark = 400
            low_watermark = 100
            max_attempts = 3
            [[queues]]
            namespace = "resourcelease.users"
            capacity = 50
            high_watermark = 40
            low_watermark = 10
            max_attempts = 4
            "#,
        );
        let args = NodeArgs { node_id: Some("from-flag".into()), max_attempts: Some(9), ..NodeArgs::default() };
        let config = SidecarConfig::merge(&args, file).expect("merges");
        assert_eq!(config.listen, "0.0.0.0:9000".parse().expect("addr"));
        assert_eq!(config.node_id, "from-flag");
        let names: Vec<_> = config.queues.iter().map(|q| q.namespace.clone().unwrap_or_default()).collect();
        assert_eq!(names, ["resourcelease", "resourcelease.users"]);
        assert_eq!(config.queues[0].capacity, Some(500));
        assert_eq!(config.queues[1].capacity, Some(50), "per-namespace file options beat [queue]");
        assert_eq!(config.queues[1].max_attempts, Some(9), "flags beat the file, per namespace too");
        let node = config.node_config().expect("valid");
        assert_eq!(node.queues[1].capacity, 50);
        assert_eq!(node.queues[1].high_watermark, 40);
        assert_eq!(node.queues[0].max_attempts, 9);
        assert_eq!(node.queues[0].lease_duration, omnirelay_client::defaults::LEASE_DURATION);
    }

    #[test]
    fn the_former_rate_limit_names_still_set_the_concurrency_limits() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeArgs,
        }
        let parse = |flags: &[&str]| {
            let cli = <Cli as clap::Parser>::try_parse_from(std::iter::once("node").chain(flags.iter().copied()))
                .expect("valid flags");
            SidecarConfig::merge(&cli.node, FileConfig::default()).expect("merges").concurrency_limits
        };
        assert_eq!(parse(&["--concurrency-limit-normal", "7", "--concurrency-limit-backpressure", "3"]), (7, 3));
        assert_eq!(parse(&["--rate-limit-normal", "7", "--rate-limit-backpressure", "3"]), (7, 3));
        assert_eq!(parse(&["--rate-limit-normal", "7", "--concurrency-limit-normal", "8"]).0, 8, "the new name wins");
        let old = file("rate_limit_normal = 5\nrate_limit_backpressure = 2\n");
        assert_eq!(SidecarConfig::merge(&NodeArgs::default(), old).expect("merges").concurrency_limits, (5, 2));
        let new = file("concurrency_limit_normal = 5\nconcurrency_limit_backpressure = 2\n");
        assert_eq!(SidecarConfig::merge(&NodeArgs::default(), new).expect("merges").concurrency_limits, (5, 2));
    }

    #[test]
    fn the_defaults_host_the_default_namespace_on_loopback_and_deny_everything() {
        let config = SidecarConfig::merge(&NodeArgs::default(), FileConfig::default()).expect("merges");
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().expect("addr"));
        assert_eq!(config.queues.len(), 1);
        assert_eq!(config.queues[0].namespace.as_deref(), Some("resourcelease"));
        assert!(config.authorization.rules.is_empty());
        config.node_config().expect("valid");
    }

    #[test]
    fn jwt_keys_are_a_list_during_a_rotation_and_flags_replace_the_file() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let write = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, rcgen::KeyPair::generate().expect("an EC key").public_key_pem()).expect("write");
            path
        };
        let (old, new) = (write("old.pem"), write("new.pem"));
        let jwt =
            |keys: &str| format!("[jwt]\nalgorithm = \"ES256\"\nissuer = \"i\"\naudience = \"a\"\npublic_key = {keys}");
        let one = SidecarConfig::merge(&NodeArgs::default(), file(&jwt(&format!("{:?}", old)))).expect("merges");
        assert_eq!(one.jwt_verifier().expect("valid").expect("tokens accepted").key_count(), 1);
        let both =
            SidecarConfig::merge(&NodeArgs::default(), file(&jwt(&format!("[{old:?}, {new:?}]")))).expect("merges");
        assert_eq!(both.jwt_verifier().expect("valid").expect("tokens accepted").key_count(), 2);
        let flags = NodeArgs { jwt_public_key: vec![new.clone()], ..NodeArgs::default() };
        let replaced = SidecarConfig::merge(&flags, file(&jwt(&format!("[{old:?}, {new:?}]")))).expect("merges");
        assert_eq!(replaced.jwt.public_key.as_ref().map(|keys| keys.paths().to_vec()), Some(vec![new.clone()]));
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a key").expect("write");
        let broken =
            SidecarConfig::merge(&NodeArgs::default(), file(&jwt(&format!("[{old:?}, {bad:?}]")))).expect("merges");
        let err = broken.node_config().expect_err("a bad second key");
        assert!(format!("{err:#}").starts_with("jwt.public_key[1]"), "{err:#}");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let cases = [
            (r#"namespaces = ["users"]"#, "queues[0].shard"),
            ("[queue]\nlow_watermark = 90000\nhigh_watermark = 80000", "queues[0]"),
            (r#"trusted_proxies = ["not-an-ip"]"#, "trusted_proxies[0]"),
            ("trusted_forwarders = [\"node-a\", \" \"]", "trusted_forwarders[1]"),
            ("[forwarding]\nca = \"/tmp/ca.pem\"", "forwarding.enabled"),
            ("[forwarding]\nenabled = true\ntoken_file = \"/nonexistent/token\"", "forwarding.token_file"),
            ("[jwt]\nissuer = \"x\"", "jwt.algorithm"),
            (r#"client_certs = "required""#, "client_certs"),
            ("node_id = \"Node-A\"\n[hub]\nendpoints = [\"http://h:1\"]", "node_id"),
            (
                "[[authorization.rules]]\nroles = [\"w\"]\nprocedures = [\"lease_all\"]\nshards = [\"*\"]",
                "authorization.rules[0].procedures[0]",
            ),
        ];
        for (text, key) in cases {
            let config = SidecarConfig::merge(&NodeArgs::default(), file(text)).expect("merges");
            let err = config.node_config().expect_err(text);
            assert!(format!("{err:#}").starts_with(key), "{text}: {err:#}");
        }
        let sqlite_cases = [
            ("replicator = \"sqlite\"", "replicator_path"),
            ("replicator_path = \"/tmp/log.sqlite\"", "replicator_path"),
            ("replicator = \"sqlite\"\nreplicator_path = \"x\"\n[hub]\nendpoints = [\"http://h:1\"]", "replicator"),
        ];
        for (text, key) in sqlite_cases {
            let config = SidecarConfig::merge(&NodeArgs::default(), file(text)).expect("merges");
            let err = config.node_config().expect_err(text);
            assert!(format!("{err:#}").starts_with(key), "{text}: {err:#}");
        }
        let sqlite = SidecarConfig::merge(
            &NodeArgs { replicator_path: Some("/tmp/flag.sqlite".into()), ..NodeArgs::default() },
            file("replicator = \"sqlite\"\nreplicator_path = \"/tmp/file.sqlite\""),
        )
        .expect("merges");
        assert_eq!(
            sqlite.replicator_path.as_deref(),
            Some(std::path::Path::new("/tmp/flag.sqlite")),
            "flags beat the file"
        );
        sqlite.node_config().expect("a sqlite replicator with its file is valid");
        let unknown: Result<FileConfig, _> = toml::from_str("lissten = \"127.0.0.1:1\"");
        assert!(unknown.expect_err("unknown key").to_string().contains("lissten"));
    }
}
