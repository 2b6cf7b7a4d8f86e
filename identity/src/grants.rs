//! The default-deny authorization table both the node and the hub enforce:
//! rules of *who* (principal patterns or roles) may do *what* (a service's
//! own vocabulary: the node's procedures, the hub's roles) on *which shards*
//! (shard patterns). A request is allowed when some rule matches all three;
//! the empty table denies everything.
//!
//! Patterns: a principal is exact, `prefix*`, or `*` (any authenticated
//! caller); a role is exact (roles come from bearer tokens); a shard is an
//! exact name, `name.*` (every shard strictly below it), or `*`.

use crate::binding::Caller;
use crate::error::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum PrincipalPattern {
    Any,
    Exact(String),
    Prefix(String),
}

/// Who a rule is for: principal patterns and roles; a caller matches when
/// any pattern matches its principal or it holds any listed role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    principals: Vec<PrincipalPattern>,
    roles: Vec<String>,
}

impl Subjects {
    /// Validates a rule's principal patterns and roles; errors name
    /// `{at}.principals[j]` or `{at}.roles[j]`.
    pub fn parse(at: &str, principals: &[String], roles: &[String]) -> Result<Self, ConfigError> {
        if principals.is_empty() && roles.is_empty() {
            return Err(ConfigError::new(format!("{at}.principals"), "a rule needs at least one principal or role"));
        }
        let mut parsed = Vec::with_capacity(principals.len());
        for (j, pattern) in principals.iter().enumerate() {
            let field = || format!("{at}.principals[{j}]");
            parsed.push(match pattern.as_str() {
                "*" => PrincipalPattern::Any,
                "" => return Err(ConfigError::new(field(), "must not be empty")),
                p => match p.strip_suffix('*') {
                    Some(prefix) if !prefix.contains('*') => PrincipalPattern::Prefix(prefix.to_string()),
                    None if !p.contains('*') => PrincipalPattern::Exact(p.to_string()),
                    _ => {
                        return Err(ConfigError::new(field(), "'*' is only allowed at the end of a principal pattern"));
                    }
                },
            });
        }
        for (j, role) in roles.iter().enumerate() {
            if role.trim().is_empty() {
                return Err(ConfigError::new(format!("{at}.roles[{j}]"), "must not be empty"));
            }
        }
        Ok(Self { principals: parsed, roles: roles.to_vec() })
    }

    /// True when `caller` is one of these subjects.
    pub fn matches(&self, caller: &Caller) -> bool {
        self.principals.iter().any(|p| match p {
            PrincipalPattern::Any => true,
            PrincipalPattern::Exact(exact) => caller.principal.as_str() == exact,
            PrincipalPattern::Prefix(prefix) => caller.principal.as_str().starts_with(prefix.as_str()),
        }) || self.roles.iter().any(|r| caller.roles.contains(r))
    }
}

/// Which shards (or other dotted names) a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    /// Every name.
    Any,
    /// Exactly this name.
    Exact(String),
    /// Every name strictly below this one; stored with the trailing dot
    /// (`resourcelease.`).
    Below(String),
}

impl NamePattern {
    /// Parses `*`, `name.*` or `name`, checking the name with the service's
    /// `grammar` (which returns the canonical name or why it is invalid);
    /// errors name `field`.
    pub fn parse(
        field: &str,
        pattern: &str,
        grammar: impl Fn(&str) -> Result<String, String>,
    ) -> Result<Self, ConfigError> {
        if pattern == "*" {
            return Ok(NamePattern::Any);
        }
        if pattern.is_empty() {
            return Err(ConfigError::new(field, "must not be empty"));
        }
        match pattern.strip_suffix(".*") {
            Some(base) => {
                Ok(NamePattern::Below(format!("{}.", grammar(base).map_err(|e| ConfigError::new(field, e))?)))
            }
            None => Ok(NamePattern::Exact(grammar(pattern).map_err(|e| ConfigError::new(field, e))?)),
        }
    }

    /// True when `name` is covered.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Any => true,
            NamePattern::Exact(exact) => name == exact,
            NamePattern::Below(prefix) => name.starts_with(prefix.as_str()),
        }
    }
}

/// One validated rule: `subjects` may use `permissions` on `shards`;
/// `extra` is what a service adds (the hub: which subscriber ids).
#[derive(Debug, Clone)]
pub struct Rule<P, E = ()> {
    /// A label for logs and errors.
    pub name: String,
    /// Who.
    pub subjects: Subjects,
    /// What, in the service's vocabulary.
    pub permissions: Vec<P>,
    /// Where.
    pub shards: Vec<NamePattern>,
    /// Service-specific conditions.
    pub extra: E,
}

/// A validated default-deny table. The empty table denies everything.
#[derive(Debug, Clone)]
pub struct Table<P, E = ()> {
    rules: Vec<Rule<P, E>>,
}

impl<P, E> Default for Table<P, E> {
    fn default() -> Self {
        Self { rules: Vec::new() }
    }
}

impl<P: Copy + Eq, E> Table<P, E> {
    /// The table that denies everything.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// A table of validated rules (order does not matter: any match allows).
    pub fn new(rules: Vec<Rule<P, E>>) -> Self {
        Self { rules }
    }

    /// The rules that let `caller` use `permission` on `shard`.
    pub fn granting<'a>(
        &'a self,
        caller: &'a Caller,
        permission: P,
        shard: &'a str,
    ) -> impl Iterator<Item = &'a Rule<P, E>> + 'a {
        self.rules.iter().filter(move |rule| {
            rule.permissions.contains(&permission)
                && rule.shards.iter().any(|s| s.matches(shard))
                && rule.subjects.matches(caller)
        })
    }

    /// The rules that let `caller` use `permission` on some shard.
    pub fn granting_any<'a>(&'a self, caller: &'a Caller, permission: P) -> impl Iterator<Item = &'a Rule<P, E>> + 'a {
        self.rules.iter().filter(move |rule| rule.permissions.contains(&permission) && rule.subjects.matches(caller))
    }

    /// True when some rule lets `caller` use `permission` on `shard`.
    pub fn allows(&self, caller: &Caller, permission: P, shard: &str) -> bool {
        match self.granting(caller, permission, shard).next() {
            Some(rule) => {
                tracing::trace!(rule = %rule.name, principal = %caller.principal, "allowed");
                true
            }
            None => false,
        }
    }

    /// True when no rule grants anything.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CredentialSource, Principal};

    fn caller(principal: &str, roles: &[&str]) -> Caller {
        Caller {
            principal: Principal::new(principal),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            source: CredentialSource::BearerToken,
            thumbprint: None,
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn any_name(name: &str) -> Result<String, String> {
        Ok(name.to_string())
    }

    #[test]
    fn a_rule_needs_subject_permission_and_shard_to_match() {
        let rule = Rule {
            name: "workers".into(),
            subjects: Subjects::parse("rules[0]", &strings(&["spiffe://ex/worker/*"]), &strings(&["ops"]))
                .expect("valid"),
            permissions: vec![1u8],
            shards: vec![NamePattern::parse("s", "resourcelease.*", any_name).expect("valid")],
            extra: (),
        };
        let table = Table::new(vec![rule]);
        assert!(table.allows(&caller("spiffe://ex/worker/7", &[]), 1, "resourcelease.users"));
        assert!(table.allows(&caller("alice", &["ops"]), 1, "resourcelease.users"));
        assert!(!table.allows(&caller("spiffe://ex/worker/7", &[]), 2, "resourcelease.users"), "other permission");
        assert!(!table.allows(&caller("spiffe://ex/worker/7", &[]), 1, "resourcelease"), "strictly below");
        assert!(!table.allows(&caller("spiffe://ex/workers-evil", &[]), 1, "resourcelease.users"));
        assert!(!Table::<u8>::deny_all().allows(&caller("alice", &["ops"]), 1, "resourcelease.users"));
    }

    #[test]
    fn bad_patterns_name_the_field() {
        let err = Subjects::parse("rules[3]", &strings(&["a*b"]), &[]).expect_err("star inside");
        assert_eq!(err.field, "rules[3].principals[0]");
        let err = Subjects::parse("rules[3]", &[], &[]).expect_err("nobody");
        assert_eq!(err.field, "rules[3].principals");
        let err = Subjects::parse("rules[3]", &[], &strings(&[" "])).expect_err("blank role");
        assert_eq!(err.field, "rules[3].roles[0]");
        let err = NamePattern::parse("rules[0].shards[1]", "", any_name).expect_err("empty");
        assert_eq!(err.field, "rules[0].shards[1]");
    }
}
