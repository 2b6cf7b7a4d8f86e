//! Opening the store's file: exclusive locking (one replica), WAL with full
//! sync, and the forward-only migrations counted by `PRAGMA user_version`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

/// Schema migrations, in order; `PRAGMA user_version` counts those applied.
/// Forward-only, like the PostgreSQL ones: never edit a landed entry.
pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("V0001__log.sql"),
    include_str!("V0002__checkpoint_hash.sql"),
    include_str!("V0003__lease_principal.sql"),
];

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum SqliteOpenError {
    /// Another store (in this process or another) holds the file.
    #[error(
        "the embedded SQLite store {} is in use by another omnirelay-hub; the embedded store serves one \
         replica only (stop the other one, or give each its own --sqlite-path, or use PostgreSQL with \
         --database-url to run several replicas)",
        path.display()
    )]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// The file could not be opened or prepared.
    #[error("cannot open the embedded SQLite store {}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer build.
    #[error(
        "the embedded SQLite store {} has schema version {found}, newer than this build's {supported}; \
         run a newer omnirelay-hub",
        path.display()
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The file's version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The store's thread could not be started.
    #[error("cannot start the SQLite store thread")]
    Thread(#[source] std::io::Error),
    /// The file (or its directory) cannot be written by this process.
    #[error(
        "the embedded SQLite store {} is read-only for this process; the hub must write it (check the file's \
         and its directory's owner and permissions, and that the volume is mounted read-write)",
        path.display()
    )]
    ReadOnly {
        /// The database file.
        path: PathBuf,
    },
    /// [`SqliteStore::open_existing`](super::SqliteStore::open_existing) found no file: a store is never
    /// created by a command that only reads it (a mistyped path would
    /// otherwise verify an empty store and report success).
    #[error(
        "the embedded SQLite store {} does not exist; check --sqlite-path (this command never creates a store)",
        path.display()
    )]
    Missing {
        /// The path given.
        path: PathBuf,
    },
}

/// Opens the file, takes the exclusive lock and migrates.
pub(super) fn open_connection(path: &Path, create: bool) -> Result<Connection, SqliteOpenError> {
    let open_error = |source: rusqlite::Error| {
        if is_busy(&source) {
            SqliteOpenError::Locked { path: path.to_path_buf() }
        } else {
            SqliteOpenError::Open { path: path.to_path_buf(), source }
        }
    };
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    } else if !path.is_file() {
        return Err(SqliteOpenError::Missing { path: path.to_path_buf() });
    }
    let mut connection = Connection::open_with_flags(path, flags).map_err(open_error)?;
    // SQLite quietly opens a file it may not write read-only; every later
    // step would then fail with a lock or I/O error code that names neither
    // the file's permissions nor the file.
    if connection.is_readonly(rusqlite::MAIN_DB).map_err(open_error)? {
        return Err(SqliteOpenError::ReadOnly { path: path.to_path_buf() });
    }
    // Fail at once when another store holds the file, instead of waiting.
    connection.busy_timeout(Duration::ZERO).map_err(open_error)?;
    // Exclusive locking mode: the lock taken below is kept until the
    // connection closes, which is what makes the store single-replica. It
    // must be set before WAL mode so the WAL index lives in this process's
    // memory rather than a shared-memory file others could use.
    connection.pragma_update(None, "locking_mode", "EXCLUSIVE").map_err(open_error)?;
    connection.pragma_update(None, "journal_mode", "WAL").map_err(open_error)?;
    // An append is acknowledged only after its transaction is on disk.
    connection.pragma_update(None, "synchronous", "FULL").map_err(open_error)?;
    connection.pragma_update(None, "foreign_keys", "ON").map_err(open_error)?;
    let txn = connection.transaction_with_behavior(TransactionBehavior::Exclusive).map_err(open_error)?;
    let version: i64 = txn.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(open_error)?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(SqliteOpenError::NewerSchema { path: path.to_path_buf(), found: version, supported });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        txn.execute_batch(migration).map_err(open_error)?;
        tracing::info!(path = %path.display(), version = index + 1, "applied embedded store migration");
    }
    txn.pragma_update(None, "user_version", supported).map_err(open_error)?;
    txn.commit().map_err(open_error)?;
    Ok(connection)
}

fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(err.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}
