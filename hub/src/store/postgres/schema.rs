//! The hub's PostgreSQL schema: applying the migrations in `migrations/`, and
//! checking at start-up that a database carries the schema this build needs.
//!
//! Migrations are embedded in the binary at build time, applied by refinery
//! (its `tokio-postgres` driver, on a connection we open) under a
//! PostgreSQL advisory lock so that concurrent `migrate` runs (two Helm hook
//! pods, say) apply each migration once.

use crate::defaults;

#[allow(missing_docs, unreachable_pub, clippy::all)]
mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// The table where refinery records applied migrations.
const HISTORY_TABLE: &str = "refinery_schema_history";

/// Why a schema could not be applied or is not the expected one.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The database has no hub schema, or an older one.
    #[error(
        "the database schema is at version {found} but this hub needs version {needed}: \
         run `omnirelay-hub migrate` against this database first"
    )]
    Behind {
        /// Highest applied version (0 when none).
        found: i32,
        /// Highest version this build embeds.
        needed: i32,
    },
    /// An applied migration differs from the one this build embeds (a landed
    /// migration was edited, which the rules forbid).
    #[error(
        "migration V{version} applied to the database differs from the one in this build \
         (checksum {applied} vs {embedded}); landed migrations must never change"
    )]
    Divergent {
        /// Version of the migration.
        version: i32,
        /// Checksum recorded in the database.
        applied: String,
        /// Checksum of the embedded file.
        embedded: u64,
    },
    /// Applying the migrations failed.
    #[error("applying migrations failed")]
    Migrate(#[source] refinery::Error),
    /// A query against the database failed.
    #[error("{what} failed")]
    Database {
        /// What was attempted.
        what: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// The highest migration version this build embeds.
pub fn needed_version() -> i32 {
    embedded::migrations::runner().get_migrations().iter().map(|m| m.version()).max().unwrap_or(0)
}

/// A fingerprint of the embedded migrations (versions, names and checksums),
/// e.g. to name a test template database that must be rebuilt whenever they
/// change.
pub fn fingerprint() -> String {
    let runner = embedded::migrations::runner();
    let mut parts: Vec<String> =
        runner.get_migrations().iter().map(|m| format!("{}{}{:x}", m.version(), m.name(), m.checksum())).collect();
    parts.sort();
    let joined = parts.join("/");
    let hash = crate::log::event::ChainHash::compute(
        &crate::log::event::ChainHash::ZERO,
        Default::default(),
        Default::default(),
        joined.as_bytes(),
    );
    format!("v{}_{hash}", needed_version())
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Migrations applied by this run, as `V{version}__{name}`.
    pub applied: Vec<String>,
    /// Schema version afterwards.
    pub version: i32,
}

/// Applies every pending migration, holding an advisory lock for the whole
/// run so concurrent runs wait for each other instead of racing.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<MigrationReport, SchemaError> {
    let db = |what| move |source| SchemaError::Database { what, source };
    client
        .execute("SELECT pg_advisory_lock($1)", &[&defaults::MIGRATION_LOCK_KEY])
        .await
        .map_err(db("take the migration lock"))?;
    let outcome = embedded::migrations::runner().set_abort_divergent(true).run_async(client).await;
    // Unlock even after a failure; the lock is per session, so a dropped
    // connection would release it as well.
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&defaults::MIGRATION_LOCK_KEY]).await;
    let report = outcome.map_err(SchemaError::Migrate)?;
    unlocked.map_err(db("release the migration lock"))?;
    let applied = report.applied_migrations().iter().map(|m| format!("V{}__{}", m.version(), m.name())).collect();
    check(client).await?;
    Ok(MigrationReport { applied, version: needed_version() })
}

/// Checks that the database's schema is the one this build needs: every
/// embedded migration applied, unchanged. A database ahead of this build is
/// accepted (the migration rules keep schema changes compatible with the
/// previous release during a rolling upgrade). Returns the applied version.
pub async fn check(client: &tokio_postgres::Client) -> Result<i32, SchemaError> {
    let db = |what| move |source| SchemaError::Database { what, source };
    let needed = needed_version();
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE])
        .await
        .map_err(db("look up the schema history"))?
        .get(0);
    if !exists {
        return Err(SchemaError::Behind { found: 0, needed });
    }
    let rows = client
        .query(&format!("SELECT version, checksum FROM {HISTORY_TABLE} ORDER BY version"), &[])
        .await
        .map_err(db("read the schema history"))?;
    let applied: Vec<(i32, String)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let found = applied.iter().map(|(version, _)| *version).max().unwrap_or(0);
    for migration in embedded::migrations::runner().get_migrations() {
        match applied.iter().find(|(version, _)| *version == migration.version()) {
            None => return Err(SchemaError::Behind { found, needed }),
            Some((_, checksum)) if *checksum != migration.checksum().to_string() => {
                return Err(SchemaError::Divergent {
                    version: migration.version(),
                    applied: checksum.clone(),
                    embedded: migration.checksum(),
                });
            }
            Some(_) => {}
        }
    }
    if found > needed {
        tracing::warn!(
            found,
            needed,
            "the database schema is newer than this build; serving under the compatibility rules"
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_embedded_in_order_and_named_by_the_rules() {
        let runner = embedded::migrations::runner();
        let versions: Vec<i32> = runner.get_migrations().iter().map(|m| m.version()).collect();
        assert!(!versions.is_empty());
        let mut sorted = versions.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), versions.len(), "versions must be unique");
        assert_eq!(needed_version(), *sorted.last().expect("non-empty"));
        assert!(fingerprint().starts_with(&format!("v{}_", needed_version())));
    }

    #[test]
    fn behind_error_says_what_to_run() {
        let message = SchemaError::Behind { found: 0, needed: 1 }.to_string();
        assert!(message.contains("omnirelay-hub migrate"), "{message}");
    }
}
