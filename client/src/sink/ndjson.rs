//! The NDJSON file sink: every event as one line of JSON ([`super::json`]),
//! appended to numbered files in a directory.
//!
//! Files are named `{prefix}-{n:06}.ndjson`; once one holds
//! [`NdjsonConfig::rotate_bytes`] it is synced, closed, and the next number
//! is opened (the directory is synced too, so the new name survives a
//! crash). A restarted sink appends to the highest-numbered file.
//!
//! Delivery is at least once: after a crash the lines after the last hub
//! checkpoint are written again, with the same `key` (the idempotence key),
//! which a reader deduplicates on. A line is never half-written by a
//! timeout: the writes run on a blocking thread that finishes each batch.
//! [`FsyncPolicy`] chooses when lines reach the disk.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Delivery, ReplicationSink, SinkBatch, SinkError, SinkSnapshot, defaults, json};

/// When the NDJSON sink syncs its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// After every batch: no line is lost by a power failure once the sink
    /// returned, at the cost of one fsync per batch.
    EveryBatch,
    /// Before every hub checkpoint commit (the default): a power failure
    /// loses no line the checkpoint covers, so nothing is skipped; lines
    /// after it are written again.
    #[default]
    OnCheckpoint,
    /// Never (the OS decides): a power failure may lose lines the
    /// checkpoint already covers. For files that are a convenience, not a
    /// record.
    Never,
}

/// Where and how the NDJSON sink writes.
#[derive(Debug, Clone)]
pub struct NdjsonConfig {
    /// The directory of the files (created if missing).
    pub dir: PathBuf,
    /// File name prefix.
    pub prefix: String,
    /// Size at which a file is rotated; see [`defaults::NDJSON_ROTATE_BYTES`].
    pub rotate_bytes: u64,
    /// When to sync.
    pub fsync: FsyncPolicy,
}

impl NdjsonConfig {
    /// Files `events-*.ndjson` in `dir`, the default rotation and fsync policy.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            prefix: "events".into(),
            rotate_bytes: defaults::NDJSON_ROTATE_BYTES,
            fsync: FsyncPolicy::default(),
        }
    }
}

/// Appends events to rotated NDJSON files. See the [module docs](self).
#[derive(Debug)]
pub struct NdjsonSink {
    inner: Arc<Mutex<Files>>,
    fsync: FsyncPolicy,
}

#[derive(Debug)]
struct Files {
    config: NdjsonConfig,
    number: u64,
    file: BufWriter<File>,
    written: u64,
    /// Bytes written since the last sync.
    unsynced: bool,
}

impl NdjsonSink {
    /// Opens the directory and the file to append to.
    pub async fn open(config: NdjsonConfig) -> Result<Self, SinkError> {
        if config.rotate_bytes == 0 {
            return Err(SinkError::Config { field: "rotate_bytes".into(), reason: "must be at least 1".into() });
        }
        let fsync = config.fsync;
        let files = blocking(move || Files::open(config)).await?;
        Ok(Self { inner: Arc::new(Mutex::new(files)), fsync })
    }

    /// The file being written.
    pub fn current_file(&self) -> PathBuf {
        let files = self.inner.lock().expect("the NDJSON writer should not be poisoned");
        files.path(files.number)
    }

    async fn write(&self, lines: Vec<u8>, sync: bool) -> Result<(), SinkError> {
        let inner = self.inner.clone();
        blocking(move || {
            let mut files = inner.lock().map_err(|_| SinkError::Fatal("the NDJSON writer panicked".into()))?;
            files.append(&lines)?;
            if sync { files.sync() } else { Ok(()) }
        })
        .await
    }
}

impl Files {
    fn open(config: NdjsonConfig) -> Result<Files, SinkError> {
        std::fs::create_dir_all(&config.dir).map_err(|err| io("create the directory", &config.dir, err))?;
        let mut number = 1;
        let entries = std::fs::read_dir(&config.dir).map_err(|err| io("list the directory", &config.dir, err))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let found = name
                .to_str()
                .and_then(|n| n.strip_prefix(&format!("{}-", config.prefix)))
                .and_then(|n| n.strip_suffix(".ndjson"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(found) = found {
                number = number.max(found);
            }
        }
        let (file, written) = Self::open_file(&config, number)?;
        Ok(Files { config, number, file, written, unsynced: false })
    }

    fn path(&self, number: u64) -> PathBuf {
        path(&self.config, number)
    }

    fn open_file(config: &NdjsonConfig, number: u64) -> Result<(BufWriter<File>, u64), SinkError> {
        let path = path(config, number);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|err| io("open", &path, err))?;
        let written = file.metadata().map_err(|err| io("stat", &path, err))?.len();
        Ok((BufWriter::with_capacity(256 * 1024, file), written))
    }

    fn append(&mut self, lines: &[u8]) -> Result<(), SinkError> {
        if self.written >= self.config.rotate_bytes {
            self.rotate()?;
        }
        let path = self.path(self.number);
        self.file.write_all(lines).map_err(|err| io("write", &path, err))?;
        self.written += lines.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Syncs and closes the full file, opens the next one and syncs the
    /// directory so its name is durable.
    fn rotate(&mut self) -> Result<(), SinkError> {
        self.sync()?;
        let next = self.number + 1;
        let (file, written) = Self::open_file(&self.config, next)?;
        File::open(&self.config.dir).and_then(|dir| dir.sync_all()).map_err(|err| io("sync", &self.config.dir, err))?;
        self.file = file;
        self.number = next;
        self.written = written;
        tracing::info!(file = %self.path(next).display(), "rotated the NDJSON file");
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SinkError> {
        let path = self.path(self.number);
        self.file.flush().map_err(|err| io("write", &path, err))?;
        if self.unsynced {
            self.file.get_ref().sync_data().map_err(|err| io("sync", &path, err))?;
            self.unsynced = false;
        }
        Ok(())
    }
}

fn path(config: &NdjsonConfig, number: u64) -> PathBuf {
    config.dir.join(format!("{}-{number:06}.ndjson", config.prefix))
}

/// File-system failures may pass (a full disk is freed, a mount returns):
/// the runtime retries them.
fn io(what: &str, path: &Path, err: std::io::Error) -> SinkError {
    SinkError::Transient(format!("{what} {}: {err}", path.display()))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SinkError> + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| SinkError::Fatal(format!("the NDJSON writer failed: {err}")))?
}

impl ReplicationSink for NdjsonSink {
    fn delivery(&self) -> Delivery {
        Delivery::AtLeastOnce
    }

    async fn deliver(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
        let mut lines = Vec::with_capacity(batch.events.iter().map(|e| e.raw.len() * 2 + 256).sum());
        for event in batch.events.iter() {
            json::write_event(&mut lines, event)
                .map_err(|err| SinkError::Fatal(format!("render event {}: {err}", event.idempotence_key())))?;
            lines.push(b'\n');
        }
        self.write(lines, self.fsync == FsyncPolicy::EveryBatch).await
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        let inner = self.inner.clone();
        let sync = self.fsync != FsyncPolicy::Never;
        blocking(move || {
            let mut files = inner.lock().map_err(|_| SinkError::Fatal("the NDJSON writer panicked".into()))?;
            if sync {
                files.sync()
            } else {
                let path = files.path(files.number);
                files.file.flush().map_err(|err| io("write", &path, err))
            }
        })
        .await
    }

    async fn apply_snapshot(&mut self, snapshot: &SinkSnapshot) -> Result<(), SinkError> {
        let mut line = serde_json::to_vec(&json::snapshot(snapshot))
            .map_err(|err| SinkError::Fatal(format!("render the snapshot: {err}")))?;
        line.push(b'\n');
        self.write(line, self.fsync == FsyncPolicy::EveryBatch).await
    }
}
