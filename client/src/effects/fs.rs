//! The file system state store: one JSON file per key, human-inspectable.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::{DeterministicRecord, DeterministicStateStore, StateFuture, StateStoreError, check_key};

/// A [`DeterministicStateStore`] that keeps each record as a JSON file in a
/// directory (development, air-gapped deployments, a record an operator can
/// read with `cat`).
///
/// A key maps to one file name: ASCII letters, digits, `-`, `_` and `.` are
/// kept, every other byte is written `%XX` (so `change/seq/7` is
/// `change%2Fseq%2F7.json`), so distinct keys never share a file and no key
/// escapes the directory.
///
/// Writes are atomic and durable: the record goes to a temporary file that
/// is fsynced, then `set` renames it over the key's file and `try_add` hard
/// links it to the key's file (which fails when the file exists: the
/// insert-if-absent is the file system's own, so it holds across processes
/// sharing the directory on one machine), then the directory is fsynced.
/// A reader sees the whole old record or the whole new one, never part.
#[derive(Debug, Clone)]
pub struct FileSystemStateStore {
    dir: PathBuf,
}

impl FileSystemStateStore {
    /// A store in `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StateStoreError::Unavailable(format!("create {}: {e}", dir.display())))?;
        Ok(Self { dir })
    }

    /// The file of `key`.
    pub fn path_of(&self, key: &str) -> PathBuf {
        let mut name = String::with_capacity(key.len() + 5);
        for byte in key.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.') {
                name.push(char::from(byte));
            } else {
                name.push_str(&format!("%{byte:02X}"));
            }
        }
        name.push_str(".json");
        self.dir.join(name)
    }

    /// Writes `record` to a fresh, fsynced temporary file in the directory.
    fn temporary(&self, record: &DeterministicRecord) -> std::io::Result<PathBuf> {
        let path = self.dir.join(format!(".tmp-{}-{:016x}", std::process::id(), fastrand::u64(..)));
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        file.write_all(&record.to_json())?;
        file.sync_all()?;
        Ok(path)
    }

    fn sync_dir(&self) -> std::io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

fn unavailable(what: &str, path: &Path, err: &std::io::Error) -> StateStoreError {
    StateStoreError::Unavailable(format!("{what} {}: {err}", path.display()))
}

impl DeterministicStateStore for FileSystemStateStore {
    fn get(&self, key: &str) -> StateFuture<'_, Option<DeterministicRecord>> {
        let checked = check_key(key).map(|()| self.path_of(key));
        Box::pin(async move {
            let path = checked?;
            match tokio::fs::read(&path).await {
                Ok(bytes) => DeterministicRecord::from_json(&bytes).map(Some),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(err) => Err(unavailable("read", &path, &err)),
            }
        })
    }

    fn set(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, ()> {
        let (checked, store, record) = (check_key(key).map(|()| self.path_of(key)), self.clone(), record.clone());
        Box::pin(async move {
            let path = checked?;
            tokio::task::spawn_blocking(move || {
                let temporary = store.temporary(&record).map_err(|e| unavailable("write", &store.dir, &e))?;
                std::fs::rename(&temporary, &path).map_err(|e| unavailable("rename to", &path, &e))?;
                store.sync_dir().map_err(|e| unavailable("sync", &store.dir, &e))
            })
            .await
            .map_err(|e| StateStoreError::Unavailable(format!("file system store thread: {e}")))?
        })
    }

    fn try_add(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, bool> {
        let (checked, store, record) = (check_key(key).map(|()| self.path_of(key)), self.clone(), record.clone());
        Box::pin(async move {
            let path = checked?;
            tokio::task::spawn_blocking(move || {
                let temporary = store.temporary(&record).map_err(|e| unavailable("write", &store.dir, &e))?;
                let linked = std::fs::hard_link(&temporary, &path);
                let _ = std::fs::remove_file(&temporary);
                match linked {
                    Ok(()) => {
                        store.sync_dir().map_err(|e| unavailable("sync", &store.dir, &e))?;
                        Ok(true)
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(err) => Err(unavailable("link", &path, &err)),
                }
            })
            .await
            .map_err(|e| StateStoreError::Unavailable(format!("file system store thread: {e}")))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_state_store_contract() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = FileSystemStateStore::open(dir.path()).expect("open");
        crate::effects::contract::check(&store, "").await;
        // One readable file per key; nothing escapes the directory.
        let path = store.path_of("../change/seq/7");
        assert_eq!(path.parent(), Some(dir.path()));
        assert!(path.ends_with("..%2Fchange%2Fseq%2F7.json"), "{}", path.display());
    }
}
