//! Authorization: default deny, and a table of principal or role to
//! procedures and shards.
//!
//! The table, as JSON (see `docs/mesh-security.md`):
//!
//! ```json
//! {
//!   "rules": [
//!     {
//!       "name": "workers",
//!       "principals": ["spiffe://omnirelay.example/worker/*"],
//!       "roles": ["worker"],
//!       "procedures": ["lease", "heartbeat", "complete", "fail"],
//!       "shards": ["resourcelease", "resourcelease.*"]
//!     }
//!   ]
//! }
//! ```
//!
//! A call is allowed when some rule matches its caller (any listed principal
//! pattern or any listed role), its procedure and its namespace; otherwise it
//! is PERMISSION_DENIED. Patterns: a principal is exact, `prefix*`, or `*`
//! (any authenticated caller); a shard is an exact namespace, `namespace.*`
//! (every namespace strictly below it), or `*`; procedures are the snake-case
//! names of the calls ([`Procedure::CALLS`]), or `*`.
//!
//! A session (`Session`, the stream of hot-path calls) is not in the table:
//! opening one needs only an authenticated caller, and each message on it is
//! authorized here as the call it carries, on the namespace it names.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::{self, Either};
use http::Request;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};

use omnirelay_identity::grants;

use super::error::{ConfigError, CredentialError};
use super::principal::Caller;
use super::{BoxError, MiddlewareError, Procedure, RpcRoute};
use crate::ShardId;
use crate::shard::parse_namespace;

/// One rule as written in configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A label for logs and errors.
    #[serde(default)]
    pub name: Option<String>,
    /// Principal patterns: exact, `prefix*`, or `*`.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Roles (from bearer tokens), exact.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Procedure names (`enqueue`, `list_dead_letters`, ...) or `*`.
    pub procedures: Vec<String>,
    /// Shard patterns: a namespace, `namespace.*`, or `*`.
    pub shards: Vec<String>,
}

/// The table as written in configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// The rules; order does not matter (any match allows).
    pub rules: Vec<RuleConfig>,
}

/// A validated authorization table. The empty table denies everything.
///
/// The rules and their matching are the identity layer's
/// ([`omnirelay_identity::grants::Table`], shared with the hub); the
/// vocabulary, the node's procedures, is this module's.
#[derive(Debug, Clone, Default)]
pub struct AuthorizationTable {
    table: grants::Table<Procedure>,
}

impl AuthorizationTable {
    /// The table that denies every call.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Parses and validates a JSON table.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: AuthorizationConfig =
            serde_json::from_str(json).map_err(|e| ConfigError::new("authorization", e.to_string()))?;
        Self::from_config(&config)
    }

    /// Validates a table, naming the first bad field as `rules[i].field[j]`.
    pub fn from_config(config: &AuthorizationConfig) -> Result<Self, ConfigError> {
        let mut rules = Vec::with_capacity(config.rules.len());
        for (i, rule) in config.rules.iter().enumerate() {
            let at = |field: &str| format!("rules[{i}].{field}");
            let subjects = grants::Subjects::parse(&format!("rules[{i}]"), &rule.principals, &rule.roles)?;
            if rule.procedures.is_empty() {
                return Err(ConfigError::new(at("procedures"), "a rule needs at least one procedure (or \"*\")"));
            }
            let mut procedures = Vec::new();
            for (j, name) in rule.procedures.iter().enumerate() {
                if name == "*" {
                    procedures.extend(Procedure::CALLS);
                } else if name == Procedure::Session.as_str() {
                    return Err(ConfigError::new(
                        at(&format!("procedures[{j}]")),
                        "a session is authorized message by message, as the calls it carries: list those \
                         (enqueue, lease, heartbeat, complete, fail) instead",
                    ));
                } else {
                    procedures.push(Procedure::from_name(name).ok_or_else(|| {
                        ConfigError::new(
                            at(&format!("procedures[{j}]")),
                            format!("{name:?} is not a ResourceLease procedure (expected one of: {})", vocabulary()),
                        )
                    })?);
                }
            }
            procedures.sort();
            procedures.dedup();
            if rule.shards.is_empty() {
                return Err(ConfigError::new(at("shards"), "a rule needs at least one shard pattern (or \"*\")"));
            }
            let mut shards = Vec::with_capacity(rule.shards.len());
            for (j, pattern) in rule.shards.iter().enumerate() {
                let field = at(&format!("shards[{j}]"));
                shards.push(grants::NamePattern::parse(&field, pattern, |name| {
                    parse_namespace(&field, name).map(|id| id.to_string()).map_err(|e| e.to_string())
                })?);
            }
            rules.push(grants::Rule {
                name: rule.name.clone().unwrap_or_else(|| format!("rules[{i}]")),
                subjects,
                permissions: procedures,
                shards,
                extra: (),
            });
        }
        Ok(Self { table: grants::Table::new(rules) })
    }

    /// True when some rule allows `caller` to call `procedure` on `namespace`.
    pub fn allows(&self, caller: &Caller, procedure: Procedure, namespace: &ShardId) -> bool {
        self.table.allows(caller, procedure, namespace.as_str())
    }

    /// [`allows`](Self::allows), as PERMISSION_DENIED when not.
    pub fn check(&self, caller: &Caller, procedure: Procedure, namespace: &ShardId) -> Result<(), MiddlewareError> {
        if self.allows(caller, procedure, namespace) {
            Ok(())
        } else {
            Err(MiddlewareError::PermissionDenied {
                principal: caller.principal.to_string(),
                procedure: procedure.as_str(),
                namespace: namespace.to_string(),
            })
        }
    }
}

/// The procedure names the table accepts, for error messages.
fn vocabulary() -> String {
    Procedure::CALLS.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
}

/// Layer of [`Authorize`].
#[derive(Debug, Clone)]
pub struct AuthorizeLayer {
    table: Arc<AuthorizationTable>,
}

impl AuthorizeLayer {
    /// Enforces `table`.
    pub fn new(table: AuthorizationTable) -> Self {
        Self { table: Arc::new(table) }
    }

    /// The table this layer enforces.
    pub fn table(&self) -> &Arc<AuthorizationTable> {
        &self.table
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize { inner, table: self.table.clone() }
    }
}

/// Lets a call through only when the table allows its [`Caller`], procedure
/// and namespace (from its [`RpcRoute`]); otherwise PERMISSION_DENIED before
/// the inner service runs. Fails closed: a call without a caller is
/// UNAUTHENTICATED and one without a resolved namespace NOT_FOUND, so a stack
/// assembled in the wrong order denies rather than allows.
///
/// A session passes with a caller alone: the node authorizes each of its
/// messages with the same table ([`AuthorizationTable::check`]) as the call
/// it carries.
///
/// `poll_ready` is the inner service's readiness.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    table: Arc<AuthorizationTable>,
}

impl<S, B> Service<Request<B>> for Authorize<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Either<future::ErrInto<S::Future, BoxError>, future::Ready<Result<S::Response, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let decision = (|| {
            let caller = request.extensions().get::<Caller>().ok_or(CredentialError::Missing)?;
            if request.extensions().get::<RpcRoute>().is_some_and(|route| route.procedure.is_session()) {
                return Ok(());
            }
            let (procedure, namespace) = request
                .extensions()
                .get::<RpcRoute>()
                .and_then(|route| Some((route.procedure, route.namespace.as_ref()?)))
                .ok_or_else(|| MiddlewareError::UnknownProcedure { path: request.uri().path().to_string() })?;
            self.table.check(caller, procedure, namespace).inspect_err(|err| {
                tracing::info!(error = %err, "denying call");
            })
        })();
        match decision {
            Ok(()) => Either::Left(self.inner.call(request).err_into()),
            Err(err) => Either::Right(future::ready(Err(Box::new(err) as BoxError))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::ServiceExt;

    use super::*;
    use crate::middleware::{CredentialSource, Transport};
    use crate::{ErrorCode, Principal};

    fn caller(principal: &str, roles: &[&str]) -> Caller {
        Caller {
            principal: Principal::new(principal),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            source: CredentialSource::BearerToken,
            thumbprint: None,
        }
    }

    fn ns(name: &str) -> ShardId {
        ShardId::new(name)
    }

    fn rule(principals: &[&str], roles: &[&str], procedures: &[&str], shards: &[&str]) -> RuleConfig {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        RuleConfig {
            name: None,
            principals: strings(principals),
            roles: strings(roles),
            procedures: strings(procedures),
            shards: strings(shards),
        }
    }

    fn table(rules: Vec<RuleConfig>) -> AuthorizationTable {
        AuthorizationTable::from_config(&AuthorizationConfig { rules }).expect("valid table")
    }

    /// Generated over the contract: every ResourceLease RPC in the compiled
    /// descriptors is in the table's vocabulary, is denied by default, and a
    /// rule naming it allows exactly it; the session is the one RPC outside
    /// it, and every call it carries (the `call` fields of `SessionRequest`)
    /// is in it. A procedure missing from the vocabulary fails here.
    #[test]
    fn every_procedure_is_in_the_vocabulary_and_denied_by_default() {
        let rpcs: Vec<String> = crate::proto::procedures()
            .into_iter()
            .filter(|(service, _)| service == crate::middleware::RESOURCE_LEASE_SERVICE)
            .map(|(_, method)| method)
            .collect();
        assert_eq!(rpcs.len(), Procedure::ALL.len());
        let worker = caller("spiffe://omnirelay.example/worker/1", &[]);
        let mut calls = Vec::new();
        for method in rpcs {
            let procedure = Procedure::from_grpc_method(&method)
                .unwrap_or_else(|| panic!("{method} is missing from the authorization vocabulary"));
            if procedure.is_session() {
                let err = AuthorizationTable::from_config(&AuthorizationConfig {
                    rules: vec![rule(&["*"], &[], &["session"], &["*"])],
                })
                .expect_err("the session is not in the table");
                assert_eq!(err.field, "rules[0].procedures[0]");
                continue;
            }
            calls.push(procedure);
            assert!(
                !AuthorizationTable::deny_all().allows(&worker, procedure, &ns("resourcelease")),
                "{method} must be denied by default"
            );
            let only = table(vec![rule(&["*"], &[], &[procedure.as_str()], &["*"])]);
            for other in Procedure::CALLS {
                assert_eq!(
                    only.allows(&worker, other, &ns("resourcelease")),
                    other == procedure,
                    "{method} vs {other:?}"
                );
            }
        }
        assert_eq!(calls, Procedure::CALLS);
        let set = <prost_types::FileDescriptorSet as prost::Message>::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptors decode");
        let session = set
            .file
            .iter()
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "SessionRequest")
            .expect("SessionRequest");
        for field in session.field.iter().filter(|f| f.oneof_index.is_some()) {
            let procedure = Procedure::from_name(field.name())
                .unwrap_or_else(|| panic!("SessionRequest.{} is missing from the vocabulary", field.name()));
            let only = table(vec![rule(&["*"], &[], &[procedure.as_str()], &["*"])]);
            assert!(only.allows(&worker, procedure, &ns("resourcelease")));
            assert!(!AuthorizationTable::deny_all().allows(&worker, procedure, &ns("resourcelease")));
        }
    }

    #[test]
    fn principals_roles_and_shards_must_all_match() {
        let table = table(vec![
            rule(
                &["spiffe://omnirelay.example/worker/*"],
                &[],
                &["lease", "heartbeat", "complete", "fail"],
                &["resourcelease.*"],
            ),
            rule(&[], &["operator"], &["*"], &["*"]),
            rule(&["svc-billing"], &[], &["enqueue"], &["resourcelease.billing"]),
        ]);
        let worker = caller("spiffe://omnirelay.example/worker/7", &[]);
        assert!(table.allows(&worker, Procedure::Lease, &ns("resourcelease.users")));
        assert!(table.allows(&worker, Procedure::Fail, &ns("resourcelease.hash.03")));
        assert!(!table.allows(&worker, Procedure::Lease, &ns("resourcelease")), "`.*` is strictly below");
        assert!(!table.allows(&worker, Procedure::Enqueue, &ns("resourcelease.users")), "not a worker procedure");
        let impostor = caller("spiffe://omnirelay.example/workers-evil", &[]);
        assert!(!table.allows(&impostor, Procedure::Lease, &ns("resourcelease.users")), "prefix includes the slash");

        let operator = caller("alice", &["operator"]);
        assert!(table.allows(&operator, Procedure::PurgeDeadLetters, &ns("resourcelease")));
        let billing = caller("svc-billing", &["reader"]);
        assert!(table.allows(&billing, Procedure::Enqueue, &ns("resourcelease.billing")));
        assert!(!table.allows(&billing, Procedure::Enqueue, &ns("resourcelease.billing.eu")), "exact shard only");

        let err = table.check(&billing, Procedure::Drain, &ns("resourcelease.billing")).expect_err("denied");
        assert_eq!(err.code(), ErrorCode::PermissionDenied);
        assert_eq!(err.to_string(), "permission denied: svc-billing may not call drain on resourcelease.billing");
    }

    #[test]
    fn bad_tables_name_the_field() {
        let cases = [
            (rule(&[], &[], &["lease"], &["*"]), "rules[0].principals"),
            (rule(&["a*b"], &[], &["lease"], &["*"]), "rules[0].principals[0]"),
            (rule(&["a"], &[""], &["lease"], &["*"]), "rules[0].roles[0]"),
            (rule(&["a"], &[], &[], &["*"]), "rules[0].procedures"),
            (rule(&["a"], &[], &["lease", "Enqueue"], &["*"]), "rules[0].procedures[1]"),
            (rule(&["a"], &[], &["lease"], &[]), "rules[0].shards"),
            (rule(&["a"], &[], &["lease"], &["users"]), "rules[0].shards[0]"),
            (rule(&["a"], &[], &["lease"], &["resourcelease.Users.*"]), "rules[0].shards[0]"),
        ];
        for (rule, field) in cases {
            let err = AuthorizationTable::from_config(&AuthorizationConfig { rules: vec![rule] }).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        let err = AuthorizationTable::from_json(
            r#"{"rules": [{"principals": ["a"], "procedures": ["lease"], "shards": ["*"], "extra": 1}]}"#,
        )
        .expect_err("unknown field");
        assert_eq!(err.field, "authorization");
        let err = AuthorizationTable::from_json(
            r#"{"rules": [{"principals": ["a"], "procedures": ["lease_all"], "shards": ["*"]}]}"#,
        )
        .expect_err("unknown procedure");
        assert!(err.reason.contains("list_dead_letters"), "the error lists the vocabulary: {err}");
    }

    #[test]
    fn json_tables_parse() {
        let table = AuthorizationTable::from_json(
            r#"{"rules": [{"name": "workers", "roles": ["worker"], "procedures": ["lease"], "shards": ["resourcelease", "resourcelease.*"]}]}"#,
        )
        .expect("valid");
        assert!(table.allows(&caller("w", &["worker"]), Procedure::Lease, &ns("resourcelease")));
        assert!(table.allows(&caller("w", &["worker"]), Procedure::Lease, &ns("resourcelease.users")));
        assert!(!table.allows(&caller("w", &[]), Procedure::Lease, &ns("resourcelease")));
    }

    fn routed(caller: Option<Caller>, procedure: Procedure, namespace: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(caller) = caller {
            request.extensions_mut().insert(caller);
        }
        request.extensions_mut().insert(RpcRoute {
            transport: Transport::Grpc,
            procedure,
            namespace: namespace.map(ns),
        });
        request
    }

    #[tokio::test]
    async fn denied_calls_never_reach_the_inner_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let inner = tower::service_fn(move |_: Request<()>| {
            counter.fetch_add(1, Ordering::SeqCst);
            future::ready(Ok::<_, BoxError>(()))
        });
        let service = AuthorizeLayer::new(table(vec![rule(&["alice"], &[], &["stats"], &["*"])])).layer(inner);
        let code = |err: BoxError| err.downcast::<MiddlewareError>().expect("middleware error").code();
        let denied =
            service.clone().oneshot(routed(Some(caller("bob", &[])), Procedure::Stats, Some("resourcelease"))).await;
        assert_eq!(code(denied.expect_err("bob")), ErrorCode::PermissionDenied);
        let no_caller = service.clone().oneshot(routed(None, Procedure::Stats, Some("resourcelease"))).await;
        assert_eq!(code(no_caller.expect_err("no caller")), ErrorCode::Unauthenticated);
        let no_namespace = service.clone().oneshot(routed(Some(caller("alice", &[])), Procedure::Stats, None)).await;
        assert_eq!(code(no_namespace.expect_err("no namespace")), ErrorCode::NotFound);
        let anonymous_session = service.clone().oneshot(routed(None, Procedure::Session, None)).await;
        assert_eq!(code(anonymous_session.expect_err("no caller")), ErrorCode::Unauthenticated);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        service
            .clone()
            .oneshot(routed(Some(caller("alice", &[])), Procedure::Stats, Some("resourcelease")))
            .await
            .expect("allowed");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Bob may call nothing, yet may open a session: each of its messages
        // is checked against the table by the node.
        service.oneshot(routed(Some(caller("bob", &[])), Procedure::Session, None)).await.expect("session opens");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
