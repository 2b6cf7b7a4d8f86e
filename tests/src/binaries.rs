//! Locates the server binaries the harness runs, with errors that say how to
//! install them.

use std::path::{Path, PathBuf};

/// Where Debian and Ubuntu install the PostgreSQL server binaries, one folder
/// per major version.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

/// Environment variable naming a folder with `initdb`, `pg_ctl` and `postgres`,
/// for machines where they live elsewhere.
pub const PG_BIN_DIR_ENV: &str = "OMNIRELAY_PG_BIN_DIR";

/// A server binary the harness needs is missing.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found (looked in {searched}). \
         Fix: run scripts/test, which installs them; or `apt-get install postgresql`; \
         or set {PG_BIN_DIR_ENV} to their folder; or set OMNIRELAY_TEST_DATABASE_URL to an \
         existing server (tests that stop and restart PostgreSQL still need the binaries)"
    )]
    Postgres {
        /// The places searched, for the message.
        searched: String,
    },
    /// No `redis-server` was found.
    #[error(
        "redis-server not found on PATH. Fix: run scripts/test, which installs it; or \
         `apt-get install redis-server`; or set OMNIRELAY_TEST_REDIS_URL to an existing server"
    )]
    Redis,
}

/// Paths of the PostgreSQL server programs the harness runs.
#[derive(Debug, Clone)]
pub struct PostgresBinaries {
    /// `initdb`, which creates a cluster.
    pub initdb: PathBuf,
    /// `pg_ctl`, which starts and stops it.
    pub pg_ctl: PathBuf,
    /// The major version, taken from the Debian folder name when known.
    pub version: String,
}

/// Finds the PostgreSQL server binaries: `$OMNIRELAY_PG_BIN_DIR`, then the
/// newest `/usr/lib/postgresql/*/bin`, then `PATH`.
pub fn find_postgres_binaries() -> Result<PostgresBinaries, BinaryError> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os(PG_BIN_DIR_ENV) {
        candidates.push((PathBuf::from(dir), "custom".to_string()));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_PG_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    candidates.extend(versions.into_iter().map(|(v, p)| (p, v.to_string())));
    candidates.extend(path_dirs().into_iter().map(|p| (p, "path".to_string())));
    postgres_in(&candidates)
}

/// Picks the first folder holding both `initdb` and `pg_ctl`.
pub(crate) fn postgres_in(candidates: &[(PathBuf, String)]) -> Result<PostgresBinaries, BinaryError> {
    for (dir, version) in candidates {
        let (initdb, pg_ctl) = (dir.join("initdb"), dir.join("pg_ctl"));
        if is_executable(&initdb) && is_executable(&pg_ctl) {
            return Ok(PostgresBinaries { initdb, pg_ctl, version: version.clone() });
        }
    }
    let searched = candidates.iter().map(|(dir, _)| dir.display().to_string()).collect::<Vec<_>>().join(", ");
    Err(BinaryError::Postgres { searched: if searched.is_empty() { "nowhere".into() } else { searched } })
}

/// Finds `redis-server` on `PATH`.
pub fn find_redis_server() -> Result<PathBuf, BinaryError> {
    path_dirs().into_iter().map(|dir| dir.join("redis-server")).find(|p| is_executable(p)).ok_or(BinaryError::Redis)
}

pub(crate) fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default()
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_postgres_names_the_fix() {
        let err = postgres_in(&[(PathBuf::from("/nonexistent/bin"), "15".into())])
            .expect_err("an empty folder should not satisfy the search");
        let message = err.to_string();
        assert!(message.contains("/nonexistent/bin"), "{message}");
        assert!(message.contains("apt-get install postgresql"), "{message}");
        assert!(message.contains("scripts/test"), "{message}");
    }

    #[test]
    fn missing_redis_names_the_fix() {
        let message = BinaryError::Redis.to_string();
        assert!(message.contains("apt-get install redis-server"), "{message}");
    }
}
