//! Who may call what on the hub: every Hub RPC binds its caller to a
//! principal and checks it against a default-deny table of hub roles, with
//! the identity layer the mesh node uses (`omnirelay-identity`).
//!
//! Roles (the hub's vocabulary in that table):
//!
//! | role | may |
//! |---|---|
//! | `producer` | `Append`, `AcquireShard`, `RenewShard`, `ReleaseShard`, `PutSnapshot` on its shards, and read them back (`ReadRange`, `GetSnapshot`, `ListShardLeases`): a shard owner rebuilds from its own log, and a node finds the mesh's members |
//! | `subscriber` | `Subscribe`, `CommitCheckpoint`, `GetCheckpoints` on its shards, under its own subscriber ids only |
//! | `reader` | `ReadRange`, `GetSnapshot`, `ListShardLeases` on its shards |
//! | `operator` | `ReadRange`, `GetSnapshot`, `ListShardLeases`, and `GetCheckpoints` of every subscriber (an empty `subscriber_id`): what verification and retention decisions read |
//!
//! The table ([`AccessConfig`], JSON, `--access`):
//!
//! ```json
//! {
//!   "trusted_proxies": ["10.0.0.0/8"],
//!   "jwt": {"algorithm": "ES256", "public_key_file": "/etc/omnirelay/jwt.pem",
//!           "issuer": "https://sts.example", "audience": "omnirelay-hub"},
//!   "grants": [
//!     {"name": "nodes", "principals": ["spiffe://prod.example/ns/queues/*"],
//!      "hub_roles": ["producer"], "shards": ["resourcelease", "resourcelease.*"]},
//!     {"name": "billing", "principals": ["spiffe://prod.example/ns/billing/sink"],
//!      "hub_roles": ["subscriber"], "shards": ["resourcelease.billing"], "subscribers": ["billing"]}
//!   ],
//!   "limits": {"append_streams": 256, "subscriptions": 256}
//! }
//! ```
//!
//! Modes: when the hub has an identity source (mutual TLS, a JWT verifier
//! or trusted proxies) the table is enforced, and a caller it cannot
//! identify is UNAUTHENTICATED, one the table does not allow
//! PERMISSION_DENIED; both are refused before anything is read or written.
//! With no identity source the hub is in *protected mode* (like Redis'):
//! it serves callers on loopback addresses only, with every role, and
//! refuses to start listening anywhere else (see [`Guard::check_listen`]).

use std::net::SocketAddr;
use std::path::Path;

use omnirelay_identity::grants::{self, NamePattern, Subjects};
use omnirelay_identity::{
    Caller, ConfigError, CredentialSource, JwtVerifier, Principal, PrincipalConfig, TrustedProxies,
};
use serde::Deserialize;
use tonic::Status;

use crate::defaults;
use crate::log::ids::{ShardId, ShardPattern, SubscriberId};
use crate::security::transport::ConnectionInfo;

/// The principal of a loopback caller of a hub in protected mode.
pub const LOCAL_PRINCIPAL: &str = "local";

/// A hub role: what a grant lets its subjects do on its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HubRole {
    /// Appends to and owns shards.
    Producer,
    /// Follows shards and keeps its own checkpoints.
    Subscriber,
    /// Reads ranges and snapshots.
    Reader,
    /// Reads everything verification and retention need.
    Operator,
}

impl HubRole {
    /// Every role.
    pub const ALL: [HubRole; 4] = [HubRole::Producer, HubRole::Subscriber, HubRole::Reader, HubRole::Operator];

    /// The role's name in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            HubRole::Producer => "producer",
            HubRole::Subscriber => "subscriber",
            HubRole::Reader => "reader",
            HubRole::Operator => "operator",
        }
    }

    /// The role named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.as_str() == name)
    }
}

/// The Hub RPCs, each with the roles that allow it: the table a test
/// generated over the contract checks (an RPC missing here fails it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HubProcedure {
    /// `Append`.
    Append,
    /// `Subscribe`.
    Subscribe,
    /// `CommitCheckpoint`.
    CommitCheckpoint,
    /// `GetCheckpoints`.
    GetCheckpoints,
    /// `AcquireShard`.
    AcquireShard,
    /// `RenewShard`.
    RenewShard,
    /// `ReleaseShard`.
    ReleaseShard,
    /// `ReadRange`.
    ReadRange,
    /// `PutSnapshot`.
    PutSnapshot,
    /// `GetSnapshot`.
    GetSnapshot,
    /// `ListShardLeases`.
    ListShardLeases,
}

impl HubProcedure {
    /// Every procedure.
    pub const ALL: [HubProcedure; 11] = [
        HubProcedure::Append,
        HubProcedure::Subscribe,
        HubProcedure::CommitCheckpoint,
        HubProcedure::GetCheckpoints,
        HubProcedure::AcquireShard,
        HubProcedure::RenewShard,
        HubProcedure::ReleaseShard,
        HubProcedure::ReadRange,
        HubProcedure::PutSnapshot,
        HubProcedure::GetSnapshot,
        HubProcedure::ListShardLeases,
    ];

    /// The gRPC method name.
    pub fn grpc_method(self) -> &'static str {
        match self {
            HubProcedure::Append => "Append",
            HubProcedure::Subscribe => "Subscribe",
            HubProcedure::CommitCheckpoint => "CommitCheckpoint",
            HubProcedure::GetCheckpoints => "GetCheckpoints",
            HubProcedure::AcquireShard => "AcquireShard",
            HubProcedure::RenewShard => "RenewShard",
            HubProcedure::ReleaseShard => "ReleaseShard",
            HubProcedure::ReadRange => "ReadRange",
            HubProcedure::PutSnapshot => "PutSnapshot",
            HubProcedure::GetSnapshot => "GetSnapshot",
            HubProcedure::ListShardLeases => "ListShardLeases",
        }
    }

    /// The procedure of gRPC method `method`.
    pub fn from_grpc_method(method: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|procedure| procedure.grpc_method() == method)
    }

    /// The roles that allow this procedure (on a shard the grant covers).
    /// `GetCheckpoints` of every subscriber is `operator` only; see
    /// [`Guard::authorize_checkpoints`].
    pub fn roles(self) -> &'static [HubRole] {
        match self {
            HubProcedure::Append
            | HubProcedure::AcquireShard
            | HubProcedure::RenewShard
            | HubProcedure::ReleaseShard
            | HubProcedure::PutSnapshot => &[HubRole::Producer],
            HubProcedure::Subscribe | HubProcedure::CommitCheckpoint => &[HubRole::Subscriber],
            HubProcedure::GetCheckpoints => &[HubRole::Subscriber, HubRole::Operator],
            HubProcedure::ReadRange | HubProcedure::GetSnapshot | HubProcedure::ListShardLeases => {
                &[HubRole::Producer, HubRole::Reader, HubRole::Operator]
            }
        }
    }
}

/// One grant as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// A label for logs.
    #[serde(default)]
    pub name: Option<String>,
    /// Principal patterns: exact, `prefix*`, or `*`.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Roles from bearer tokens, exact.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Hub roles granted: `producer`, `subscriber`, `reader`, `operator`.
    pub hub_roles: Vec<String>,
    /// Shard patterns: a shard id, `id.*` (strictly below it), or `*`.
    pub shards: Vec<String>,
    /// Subscriber ids a `subscriber` grant may use: exact or `prefix*`.
    #[serde(default)]
    pub subscribers: Vec<String>,
}

/// The JWT verifier's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The pinned algorithm, e.g. `ES256`, `RS256`, `EdDSA`.
    pub algorithm: String,
    /// PEM file of the issuer's public key, or a list of them during a key
    /// rotation (a token signed by any of them verifies).
    pub public_key_file: omnirelay_identity::jwt::KeyFiles,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// Claim holding roles (`roles` when unset).
    #[serde(default)]
    pub roles_claim: Option<String>,
}

/// The hub's access file (`--access`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Proxies whose `x-client-principal` is believed (addresses or CIDRs).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Bearer tokens, when accepted.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Required prefix of client-certificate SAN URIs.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// The grants; none means every call is denied.
    #[serde(default)]
    pub grants: Vec<GrantConfig>,
    /// Per-principal limits; the defaults when unset.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// Per-principal limits as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open append streams per principal per replica
    /// ([`defaults::MAX_APPEND_STREAMS_PER_PRINCIPAL`] when unset).
    #[serde(default)]
    pub append_streams: Option<usize>,
    /// Open subscriptions per principal per replica
    /// ([`defaults::MAX_SUBSCRIPTIONS_PER_PRINCIPAL`] when unset).
    #[serde(default)]
    pub subscriptions: Option<usize>,
    /// Events per second a principal may append per replica
    /// ([`defaults::APPEND_RATE_PER_PRINCIPAL`] when unset; may be fractional).
    #[serde(default)]
    pub append_rate: Option<f64>,
    /// Events a principal may append at once above its rate
    /// ([`defaults::APPEND_BURST_PER_PRINCIPAL`] when unset).
    #[serde(default)]
    pub append_burst: Option<u64>,
}

/// Per-principal limits, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Open append streams per principal per replica.
    pub append_streams: usize,
    /// Open subscriptions per principal per replica.
    pub subscriptions: usize,
    /// Events per second a principal may append per replica; positive and
    /// finite.
    pub append_rate: f64,
    /// Events a principal may append at once above its rate; at least 1.
    pub append_burst: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            append_streams: defaults::MAX_APPEND_STREAMS_PER_PRINCIPAL,
            subscriptions: defaults::MAX_SUBSCRIPTIONS_PER_PRINCIPAL,
            append_rate: defaults::APPEND_RATE_PER_PRINCIPAL,
            append_burst: defaults::APPEND_BURST_PER_PRINCIPAL,
        }
    }
}

impl Limits {
    /// Sets the append rate and burst where given, checking them; `field`
    /// names where they came from (`limits` in the access file, or the flags).
    pub fn with_append_rate(
        mut self,
        (rate_field, rate): (&str, Option<f64>),
        (burst_field, burst): (&str, Option<u64>),
    ) -> Result<Self, ConfigError> {
        if let Some(rate) = rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ConfigError::new(
                    rate_field,
                    format!("{rate} is not a positive number of events per second"),
                ));
            }
            self.append_rate = rate;
        }
        match burst {
            Some(0) => return Err(ConfigError::new(burst_field, "must be at least 1 event")),
            Some(burst) => self.append_burst = burst,
            None => {}
        }
        Ok(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum IdPattern {
    Exact(String),
    Prefix(String),
}

/// What a grant adds to the shared rule shape: its subscriber ids.
#[derive(Debug, Clone, Default)]
pub struct GrantScope {
    subscribers: Vec<IdPattern>,
}

impl GrantScope {
    fn allows(&self, subscriber: &SubscriberId) -> bool {
        self.subscribers.iter().any(|pattern| match pattern {
            IdPattern::Exact(exact) => subscriber.as_str() == exact,
            IdPattern::Prefix(prefix) => subscriber.as_str().starts_with(prefix.as_str()),
        })
    }
}

/// How callers are identified and what they may do: the validated access
/// configuration.
#[derive(Debug, Clone, Default)]
pub struct Access {
    principal: PrincipalConfig,
    has_sources: bool,
    table: grants::Table<HubRole, GrantScope>,
    limits: Limits,
}

impl Access {
    /// No identity source and no grants: protected mode unless mutual TLS
    /// is on.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads and validates an access file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::new("--access", format!("cannot read {}: {err}", path.display())))?;
        Self::from_json(&text)
    }

    /// Validates an access file's JSON.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: AccessConfig =
            serde_json::from_str(json).map_err(|err| ConfigError::new("access", err.to_string()))?;
        Self::from_config(&config)
    }

    /// Validates an access configuration, naming the first bad field.
    pub fn from_config(config: &AccessConfig) -> Result<Self, ConfigError> {
        let mut principal = PrincipalConfig::new();
        let mut has_sources = false;
        if !config.trusted_proxies.is_empty() {
            principal = principal.trusted_proxies(TrustedProxies::parse(&config.trusted_proxies)?);
            has_sources = true;
        }
        if let Some(domain) = &config.trust_domain {
            principal = principal.trust_domain(domain.clone());
        }
        if let Some(jwt) = &config.jwt {
            let algorithm = jwt.algorithm.parse::<omnirelay_identity::jwt::Algorithm>().map_err(|_| {
                ConfigError::new("jwt.algorithm", format!("{:?} is not a JWT algorithm", jwt.algorithm))
            })?;
            let pems = omnirelay_identity::jwt::read_key_files("jwt.public_key_file", jwt.public_key_file.paths())?;
            let mut verifier =
                JwtVerifier::from_public_key_pems(algorithm, &pems, jwt.issuer.clone(), jwt.audience.clone()).map_err(
                    |err| ConfigError::new(err.field.replace("jwt.public_key", "jwt.public_key_file"), err.reason),
                )?;
            if let Some(claim) = &jwt.roles_claim {
                verifier = verifier.with_roles_claim(claim.clone());
            }
            principal = principal.jwt(verifier);
            has_sources = true;
        }
        let mut rules = Vec::with_capacity(config.grants.len());
        for (i, grant) in config.grants.iter().enumerate() {
            let at = |field: &str| format!("grants[{i}].{field}");
            let subjects = Subjects::parse(&format!("grants[{i}]"), &grant.principals, &grant.roles)?;
            if grant.hub_roles.is_empty() {
                return Err(ConfigError::new(at("hub_roles"), "a grant needs at least one hub role"));
            }
            let mut roles = Vec::new();
            for (j, name) in grant.hub_roles.iter().enumerate() {
                roles.push(HubRole::from_name(name).ok_or_else(|| {
                    ConfigError::new(
                        at(&format!("hub_roles[{j}]")),
                        format!("{name:?} is not a hub role (producer, subscriber, reader, operator)"),
                    )
                })?);
            }
            if grant.shards.is_empty() {
                return Err(ConfigError::new(at("shards"), "a grant needs at least one shard pattern (or \"*\")"));
            }
            let mut shards = Vec::with_capacity(grant.shards.len());
            for (j, pattern) in grant.shards.iter().enumerate() {
                let field = at(&format!("shards[{j}]"));
                shards.push(NamePattern::parse(&field, pattern, |name| {
                    ShardId::parse(name).map(|id| id.to_string()).map_err(|err| err.to_string())
                })?);
            }
            let mut subscribers = Vec::with_capacity(grant.subscribers.len());
            for (j, pattern) in grant.subscribers.iter().enumerate() {
                let field = at(&format!("subscribers[{j}]"));
                subscribers.push(match pattern.strip_suffix('*') {
                    Some(prefix) => IdPattern::Prefix(prefix.to_string()),
                    None => IdPattern::Exact(
                        SubscriberId::parse(pattern.clone())
                            .map_err(|err| ConfigError::new(&field, err.to_string()))?
                            .to_string(),
                    ),
                });
            }
            if roles.contains(&HubRole::Subscriber) && subscribers.is_empty() {
                return Err(ConfigError::new(
                    at("subscribers"),
                    "a subscriber grant names the subscriber ids it may use (exact or `prefix*`)",
                ));
            }
            rules.push(grants::Rule {
                name: grant.name.clone().unwrap_or_else(|| format!("grants[{i}]")),
                subjects,
                permissions: roles,
                shards,
                extra: GrantScope { subscribers },
            });
        }
        let mut limits = Limits::default();
        for (field, given, limit) in [
            ("limits.append_streams", config.limits.append_streams, &mut limits.append_streams),
            ("limits.subscriptions", config.limits.subscriptions, &mut limits.subscriptions),
        ] {
            match given {
                Some(0) => return Err(ConfigError::new(field, "must be at least 1")),
                Some(given) => *limit = given,
                None => {}
            }
        }
        let limits = limits.with_append_rate(
            ("limits.append_rate", config.limits.append_rate),
            ("limits.append_burst", config.limits.append_burst),
        )?;
        Ok(Self { principal, has_sources, table: grants::Table::new(rules), limits })
    }

    /// True when bearer tokens or trusted proxies can identify callers.
    pub fn has_identity_source(&self) -> bool {
        self.has_sources
    }

    /// The number of grants.
    pub fn grants(&self) -> usize {
        self.table.len()
    }

    /// The per-principal limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Overrides the append rate and burst (the `--append-rate` and
    /// `--append-burst` flags, which win over the access file).
    pub fn with_append_rate(mut self, rate: Option<f64>, burst: Option<u64>) -> Result<Self, ConfigError> {
        self.limits = self.limits.with_append_rate(("--append-rate", rate), ("--append-burst", burst))?;
        Ok(self)
    }
}

/// Enforces [`Access`] on every Hub RPC.
#[derive(Debug, Clone)]
pub struct Guard {
    access: Access,
    /// No identity source: loopback callers only, with every role.
    protected: bool,
}

/// The refusal for a caller that was not identified.
fn unauthenticated(peer: Option<SocketAddr>, reason: impl std::fmt::Display) -> Status {
    tracing::info!(peer = ?peer, reason = %reason, "refusing an unauthenticated call");
    Status::unauthenticated(format!("unauthenticated: {reason}"))
}

impl Guard {
    /// A guard for `access`; `mutual_tls` says whether client certificates
    /// identify callers. Without either, the guard is in protected mode.
    pub fn new(access: Access, mutual_tls: bool) -> Self {
        let protected = !mutual_tls && !access.has_identity_source();
        Self { access, protected }
    }

    /// True in protected mode (no identity configured).
    pub fn is_protected(&self) -> bool {
        self.protected
    }

    /// The per-principal limits the service enforces.
    pub fn limits(&self) -> Limits {
        self.access.limits()
    }

    /// In protected mode, refuses a listening address that is not loopback;
    /// says loudly at start that the hub trusts every local caller.
    pub fn check_listen(&self, listen: SocketAddr) -> Result<(), ProtectedModeError> {
        if !self.protected {
            if self.access.table.is_empty() {
                tracing::warn!("no grants are configured (--access): every call will be denied");
            }
            return Ok(());
        }
        if !listen.ip().is_loopback() {
            return Err(ProtectedModeError { listen });
        }
        tracing::warn!(
            listen = %listen,
            "PROTECTED MODE: no identity is configured (no --tls-client-ca, no bearer tokens or trusted proxies \
             in --access); serving local callers only, each with every role. Configure an identity before \
             listening on any other address"
        );
        Ok(())
    }

    /// Binds the caller of `request` to a principal, or UNAUTHENTICATED.
    pub fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<Caller, Status> {
        let info = request.extensions().get::<ConnectionInfo>();
        let peer = info.map(|info| info.remote_addr).or_else(|| request.remote_addr());
        if self.protected {
            return match peer {
                Some(addr) if addr.ip().is_loopback() => Ok(Caller {
                    principal: Principal::new(LOCAL_PRINCIPAL),
                    roles: Vec::new(),
                    source: CredentialSource::LocalConnection,
                    thumbprint: None,
                }),
                _ => Err(unauthenticated(
                    peer,
                    "this hub has no identity configured (protected mode) and serves local callers only",
                )),
            };
        }
        let connection = omnirelay_identity::ConnectionInfo {
            remote_addr: peer,
            client_certs: info.and_then(|info| info.client_certs.clone()),
        };
        let headers = request.metadata().clone().into_headers();
        self.access.principal.authenticate(&headers, &connection).map_err(|err| unauthenticated(peer, err))
    }

    /// Allows `caller` to call `procedure` on `shard`, or PERMISSION_DENIED.
    pub fn authorize(&self, caller: &Caller, procedure: HubProcedure, shard: &ShardId) -> Result<(), Status> {
        if self.protected
            || procedure.roles().iter().any(|role| self.access.table.allows(caller, *role, shard.as_str()))
        {
            return Ok(());
        }
        Err(denied(caller, procedure, &format!("shard {shard}")))
    }

    /// Allows `caller` to call a listing `procedure` (`ListShardLeases`)
    /// when one of its roles is granted on any shard, or PERMISSION_DENIED;
    /// what is listed is then filtered with [`Guard::may`].
    pub fn authorize_listing(&self, caller: &Caller, procedure: HubProcedure) -> Result<(), Status> {
        if self.protected
            || procedure.roles().iter().any(|role| self.access.table.granting_any(caller, *role).next().is_some())
        {
            return Ok(());
        }
        Err(denied(caller, procedure, "any shard"))
    }

    /// True when `caller` may call `procedure` on `shard` (no log line: for
    /// filtering what a listing returns).
    pub fn may(&self, caller: &Caller, procedure: HubProcedure, shard: &ShardId) -> bool {
        self.protected || procedure.roles().iter().any(|role| self.access.table.allows(caller, *role, shard.as_str()))
    }

    /// Allows `caller` to act as `subscriber` on `shard` (`Subscribe`,
    /// `CommitCheckpoint`, `GetCheckpoints` of its own id), or
    /// PERMISSION_DENIED.
    pub fn authorize_subscriber(
        &self,
        caller: &Caller,
        procedure: HubProcedure,
        subscriber: &SubscriberId,
        shard: &ShardId,
    ) -> Result<(), Status> {
        if self.protected
            || self
                .access
                .table
                .granting(caller, HubRole::Subscriber, shard.as_str())
                .any(|rule| rule.extra.allows(subscriber))
        {
            return Ok(());
        }
        Err(denied(caller, procedure, &format!("shard {shard} as subscriber {subscriber}")))
    }

    /// [`Guard::authorize_subscriber`] for a pattern subscription: some
    /// subscriber grant must cover every shard the pattern can match.
    pub fn authorize_pattern(
        &self,
        caller: &Caller,
        subscriber: &SubscriberId,
        pattern: &ShardPattern,
    ) -> Result<(), Status> {
        if self.protected {
            return Ok(());
        }
        // A pattern without '*' names one shard; with it, every shard whose
        // id starts with the prefix, which a grant covers when it covers
        // everything below a prefix of it.
        let wildcard = pattern.to_string().ends_with('*');
        let covered = self.access.table.granting_any(caller, HubRole::Subscriber).any(|rule| {
            rule.extra.allows(subscriber)
                && rule.shards.iter().any(|shards| match shards {
                    NamePattern::Any => true,
                    NamePattern::Exact(exact) => !wildcard && pattern.prefix() == exact,
                    NamePattern::Below(below) => {
                        pattern.prefix().starts_with(below.as_str()) && (wildcard || pattern.prefix() != below)
                    }
                })
        });
        if covered {
            return Ok(());
        }
        Err(denied(caller, HubProcedure::Subscribe, &format!("shard pattern {pattern} as subscriber {subscriber}")))
    }

    /// Allows `GetCheckpoints`: of `subscriber` on `shards` (every shard
    /// when empty) for a subscriber grant using that id, or of anyone for an
    /// `operator` grant covering the shards (`*` when none are listed).
    pub fn authorize_checkpoints(
        &self,
        caller: &Caller,
        subscriber: Option<&SubscriberId>,
        shards: &[ShardId],
    ) -> Result<(), Status> {
        if self.protected {
            return Ok(());
        }
        let table = &self.access.table;
        let operator = if shards.is_empty() {
            table.granting_any(caller, HubRole::Operator).any(|rule| rule.shards.contains(&NamePattern::Any))
        } else {
            shards.iter().all(|shard| table.allows(caller, HubRole::Operator, shard.as_str()))
        };
        if operator {
            return Ok(());
        }
        let own = subscriber.is_some_and(|subscriber| {
            if shards.is_empty() {
                table.granting_any(caller, HubRole::Subscriber).any(|rule| rule.extra.allows(subscriber))
            } else {
                shards.iter().all(|shard| {
                    table
                        .granting(caller, HubRole::Subscriber, shard.as_str())
                        .any(|rule| rule.extra.allows(subscriber))
                })
            }
        });
        if own {
            return Ok(());
        }
        let what = match subscriber {
            Some(subscriber) => format!("checkpoints of subscriber {subscriber}"),
            None => "checkpoints of every subscriber".to_string(),
        };
        Err(denied(caller, HubProcedure::GetCheckpoints, &what))
    }
}

fn denied(caller: &Caller, procedure: HubProcedure, what: &str) -> Status {
    tracing::info!(principal = %caller.principal, procedure = procedure.grpc_method(), target = %what, "denying a call");
    Status::permission_denied(format!(
        "permission denied: {} may not call {} on {what}",
        caller.principal,
        procedure.grpc_method()
    ))
}

/// The hub would listen beyond loopback in protected mode.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to listen on {listen} in protected mode: no identity is configured, so the hub would serve anyone \
     who can reach it. Listen on a loopback address (127.0.0.1 or ::1), or configure an identity: mutual TLS \
     (--tls-client-ca) or bearer tokens / trusted proxies in --access, with grants"
)]
pub struct ProtectedModeError {
    /// The address refused.
    pub listen: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(principal: &str) -> Caller {
        Caller {
            principal: Principal::new(principal),
            roles: Vec::new(),
            source: CredentialSource::TrustedProxy,
            thumbprint: None,
        }
    }

    fn shard(id: &str) -> ShardId {
        ShardId::parse(id).expect("valid shard id")
    }

    fn guard(json: &str) -> Guard {
        let access = Access::from_json(json).expect("valid access file");
        Guard::new(access, true)
    }

    /// Generated over the contract: every Hub RPC in the compiled
    /// descriptors has an entry in the table, at least one role allows it,
    /// and the empty table denies it. An RPC added to the proto without an
    /// entry fails here.
    #[test]
    fn every_hub_rpc_is_in_the_table_and_denied_by_default() {
        let methods: Vec<String> = crate::proto::procedures()
            .into_iter()
            .filter(|(service, _)| service == "omnirelay.hub.v1.Hub")
            .map(|(_, method)| method)
            .collect();
        assert_eq!(methods.len(), HubProcedure::ALL.len(), "{methods:?}");
        let deny = Guard::new(Access::none(), true);
        let anyone = caller("spiffe://test/anyone");
        for method in methods {
            let procedure = HubProcedure::from_grpc_method(&method)
                .unwrap_or_else(|| panic!("{method} is missing from the hub's authorization table"));
            assert!(!procedure.roles().is_empty(), "{method} has no role");
            let err = deny.authorize(&anyone, procedure, &shard("resourcelease.users")).expect_err(&method);
            assert_eq!(err.code(), tonic::Code::PermissionDenied);
        }
    }

    #[test]
    fn roles_allow_their_procedures_on_their_shards_only() {
        let guard = guard(
            r#"{"trusted_proxies": ["127.0.0.1"], "grants": [
                {"principals": ["node-*"], "hub_roles": ["producer"], "shards": ["resourcelease.*"]},
                {"principals": ["reader"], "hub_roles": ["reader"], "shards": ["*"]},
                {"principals": ["sink"], "hub_roles": ["subscriber"], "shards": ["resourcelease.billing"], "subscribers": ["billing", "billing-eu*"]},
                {"principals": ["ops"], "hub_roles": ["operator"], "shards": ["*"]}
            ]}"#,
        );
        let users = shard("resourcelease.users");
        let billing = shard("resourcelease.billing");
        let node = caller("node-1");
        for procedure in HubProcedure::ALL {
            let allowed = guard.authorize(&node, procedure, &users).is_ok();
            assert_eq!(allowed, procedure.roles().contains(&HubRole::Producer), "{procedure:?}");
        }
        assert!(guard.authorize(&node, HubProcedure::Append, &shard("resourcelease")).is_err(), "strictly below");
        let reader = caller("reader");
        assert!(guard.authorize(&reader, HubProcedure::ReadRange, &users).is_ok());
        assert!(guard.authorize(&reader, HubProcedure::Append, &users).is_err());
        let sink = caller("sink");
        let id = |s: &str| SubscriberId::parse(s).expect("valid");
        assert!(guard.authorize_subscriber(&sink, HubProcedure::CommitCheckpoint, &id("billing"), &billing).is_ok());
        assert!(guard.authorize_subscriber(&sink, HubProcedure::Subscribe, &id("billing-eu-1"), &billing).is_ok());
        assert!(guard.authorize_subscriber(&sink, HubProcedure::Subscribe, &id("audit"), &billing).is_err());
        assert!(guard.authorize_subscriber(&sink, HubProcedure::Subscribe, &id("billing"), &users).is_err());
        let pattern = |p: &str| ShardPattern::parse(p).expect("valid");
        assert!(guard.authorize_pattern(&sink, &id("billing"), &pattern("resourcelease.billing")).is_ok());
        assert!(guard.authorize_pattern(&sink, &id("billing"), &pattern("resourcelease.*")).is_err());
        assert!(guard.authorize_checkpoints(&sink, Some(&id("billing")), &[]).is_ok());
        assert!(guard.authorize_checkpoints(&sink, Some(&id("audit")), &[]).is_err());
        assert!(guard.authorize_checkpoints(&sink, None, &[]).is_err(), "every subscriber is operator only");
        assert!(guard.authorize_checkpoints(&caller("ops"), None, &[]).is_ok());
        assert!(guard.authorize_checkpoints(&node, Some(&id("billing")), &[]).is_err());
    }

    #[test]
    fn bad_access_files_name_the_field() {
        let cases = [
            (
                r#"{"grants": [{"principals": ["a"], "hub_roles": ["writer"], "shards": ["*"]}]}"#,
                "grants[0].hub_roles[0]",
            ),
            (r#"{"grants": [{"principals": ["a"], "hub_roles": [], "shards": ["*"]}]}"#, "grants[0].hub_roles"),
            (r#"{"grants": [{"principals": ["a"], "hub_roles": ["reader"], "shards": []}]}"#, "grants[0].shards"),
            (
                r#"{"grants": [{"principals": ["a"], "hub_roles": ["subscriber"], "shards": ["*"]}]}"#,
                "grants[0].subscribers",
            ),
            (r#"{"grants": [{"hub_roles": ["reader"], "shards": ["*"]}]}"#, "grants[0].principals"),
            (r#"{"trusted_proxies": ["nope"]}"#, "trusted_proxies[0]"),
            (r#"{"grants": [], "extra": 1}"#, "access"),
            (r#"{"limits": {"append_rate": 0}}"#, "limits.append_rate"),
            (r#"{"limits": {"append_rate": -5.5}}"#, "limits.append_rate"),
            (r#"{"limits": {"append_burst": 0}}"#, "limits.append_burst"),
            (
                r#"{"jwt": {"algorithm": "ES256", "public_key_file": [], "issuer": "i", "audience": "a"}}"#,
                "jwt.public_key_file",
            ),
            (
                r#"{"jwt": {"algorithm": "ES256", "public_key_file": ["/nonexistent/a.pem"], "issuer": "i", "audience": "a"}}"#,
                "jwt.public_key_file[0]",
            ),
        ];
        for (json, field) in cases {
            let err = Access::from_json(json).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn append_rate_flags_win_over_the_access_file_and_are_checked() {
        let access = Access::from_json(r#"{"limits": {"append_rate": 5.5, "append_burst": 7}}"#).expect("valid");
        assert_eq!((access.limits().append_rate, access.limits().append_burst), (5.5, 7));
        let flags = access.clone().with_append_rate(Some(2.0), None).expect("valid");
        assert_eq!((flags.limits().append_rate, flags.limits().append_burst), (2.0, 7));
        let defaults = Access::none().limits();
        assert_eq!(
            (defaults.append_rate, defaults.append_burst),
            (defaults::APPEND_RATE_PER_PRINCIPAL, defaults::APPEND_BURST_PER_PRINCIPAL)
        );
        assert_eq!(access.clone().with_append_rate(Some(f64::NAN), None).expect_err("NaN").field, "--append-rate");
        assert_eq!(access.with_append_rate(None, Some(0)).expect_err("zero").field, "--append-burst");
    }

    #[test]
    fn protected_mode_is_loopback_only() {
        let protected = Guard::new(Access::none(), false);
        assert!(protected.is_protected());
        assert!(protected.check_listen("127.0.0.1:7400".parse().expect("addr")).is_ok());
        assert!(protected.check_listen("[::1]:7400".parse().expect("addr")).is_ok());
        let err = protected.check_listen("0.0.0.0:7400".parse().expect("addr")).expect_err("not loopback");
        assert!(err.to_string().contains("protected mode"), "{err}");
        assert!(!Guard::new(Access::none(), true).is_protected(), "mutual TLS identifies callers");
        let proxies = Access::from_json(r#"{"trusted_proxies": ["10.0.0.0/8"]}"#).expect("valid");
        assert!(!Guard::new(proxies, false).is_protected());
    }

    fn from(addr: &str) -> tonic::Request<()> {
        let mut request = tonic::Request::new(());
        let remote_addr = addr.parse().expect("addr");
        request.extensions_mut().insert(ConnectionInfo { remote_addr, principal: None, client_certs: None });
        request
    }

    #[test]
    fn protected_mode_serves_local_callers_only() {
        let protected = Guard::new(Access::none(), false);
        for local in ["127.0.0.1:5000", "[::1]:5000"] {
            let caller = protected.authenticate(&from(local)).expect("a local caller");
            assert_eq!(caller.principal.as_str(), LOCAL_PRINCIPAL);
            assert_eq!(caller.source, CredentialSource::LocalConnection);
            for procedure in HubProcedure::ALL {
                assert!(protected.authorize(&caller, procedure, &shard("resourcelease.users")).is_ok());
            }
        }
        let err = protected.authenticate(&from("192.0.2.7:5000")).expect_err("a remote caller");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("protected mode"), "{}", err.message());
        let err = protected.authenticate(&tonic::Request::new(())).expect_err("no address at all");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        // With an identity configured, a local caller is nobody special.
        let enforced = guard(r#"{"trusted_proxies": ["10.0.0.0/8"]}"#);
        let err = enforced.authenticate(&from("127.0.0.1:5000")).expect_err("no credential");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}
