//! The caller identity every OmniRelay process records.

use std::fmt;
use std::sync::Arc;

/// A normalized caller identity (`rpc.principal`), e.g. a SPIFFE URI from a
/// client certificate or a JWT subject.
///
/// Backed by an `Arc<str>`: principals are copied into every event, lease
/// and handle, and a clone is a reference count, not an allocation.
#[derive(Debug, Clone, Eq, PartialOrd, Ord)]
pub struct Principal(Arc<str>);

impl std::hash::Hash for Principal {
    /// Hashes the text, as the equality compares it.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for Principal {
    /// Equal text; copies of one principal compare by pointer without
    /// reading it.
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || *self.0 == *other.0
    }
}

impl Principal {
    /// Wraps a string. Validation happens where a credential is bound
    /// (see [`crate::PrincipalConfig::authenticate`]).
    pub fn new(value: impl Into<String>) -> Self {
        Self(Arc::from(value.into()))
    }

    /// The string form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Principal {
    fn from(value: &str) -> Self {
        Self(Arc::from(value))
    }
}

impl From<String> for Principal {
    fn from(value: String) -> Self {
        Self(Arc::from(value))
    }
}

impl serde::Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Principal {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}
