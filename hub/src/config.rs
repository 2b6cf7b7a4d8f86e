//! The hub's configuration: what `run` needs, validated once.

use std::time::Duration;

use crate::defaults;

/// Configuration errors; each names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting has an unusable value.
    #[error("{setting}: {reason}")]
    Invalid {
        /// The setting, as the flag names it.
        setting: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Settings of one hub replica.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL connection URL.
    pub database_url: String,
    /// Pooled database connections.
    pub pool_size: usize,
    /// Group committers.
    pub committers: usize,
    /// How often retention runs; `None` disables it on this replica.
    pub retention_interval: Option<Duration>,
    /// Age after which a checkpoint stops holding back retention.
    pub checkpoint_max_age: Duration,
}

impl Config {
    /// A configuration for `database_url` with every other setting at its
    /// default.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            pool_size: defaults::POOL_SIZE,
            committers: defaults::COMMITTERS,
            retention_interval: Some(defaults::RETENTION_INTERVAL),
            checkpoint_max_age: defaults::CHECKPOINT_MAX_AGE,
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database_url.trim().is_empty() {
            return Err(ConfigError::Invalid { setting: "database-url", reason: "must not be empty".into() });
        }
        if self.committers == 0 {
            return Err(ConfigError::Invalid { setting: "committers", reason: "at least one is needed".into() });
        }
        // Committers hold a connection each while committing; the rest of
        // the pool serves reads, leases and checkpoints.
        if self.pool_size <= self.committers {
            return Err(ConfigError::Invalid {
                setting: "pool-size",
                reason: format!("{} leaves no connection beside the {} committers", self.pool_size, self.committers),
            });
        }
        if self.retention_interval.is_some_and(|interval| interval.is_zero()) {
            return Err(ConfigError::Invalid { setting: "retention-interval", reason: "must be positive".into() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_settings_are_named() {
        Config::new("postgres://localhost/hub").validate().expect("defaults are valid");
        let err = Config { pool_size: 2, ..Config::new("postgres://x/y") }.validate().expect_err("too small a pool");
        assert!(err.to_string().starts_with("pool-size:"), "{err}");
        let err = Config::new(" ").validate().expect_err("empty url");
        assert!(err.to_string().starts_with("database-url:"), "{err}");
    }
}
