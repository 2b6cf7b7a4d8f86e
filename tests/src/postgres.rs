//! Throwaway PostgreSQL clusters and per-test databases.
//!
//! A [`PgCluster`] is a private cluster in a temporary directory, on a free
//! loopback port, that its owner can stop, crash, pause and start again (the
//! failure drills need that). Clusters are copied from a template data directory made
//! once per machine by `initdb`, so a new cluster costs a copy and a start,
//! not an initdb; this matters because nextest runs every test in its own
//! process.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, the server
//! programs run as the `postgres` user (or `nobody`), which owns the
//! directories.

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, Weak};

use crate::binaries::{PostgresBinaries, find_postgres_binaries};
use crate::{HarnessError, Result};

/// Environment variable naming an existing server to create test databases on,
/// e.g. `postgres://postgres@127.0.0.1:5432/postgres`. The role must be allowed
/// to create databases.
pub const DATABASE_URL_ENV: &str = "OMNIRELAY_TEST_DATABASE_URL";

/// Longest wait for `pg_ctl start` and `stop`: a cold start on a loaded
/// two-core machine takes a few seconds; a minute means something is broken.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Attempts to start a cluster when the chosen port was taken in between
/// (another test process picked the same free port).
const START_ATTEMPTS: u32 = 3;

/// Prefix of every cluster directory; the creating process id follows, so a
/// later run can find clusters whose owner died without cleaning up.
const CLUSTER_DIR_PREFIX: &str = "omnirelay-pg-";

/// Superuser created by `initdb` and used by the harness.
const SUPERUSER: &str = "postgres";

/// Folder of a cluster's directory that an archiving cluster
/// ([`PgCluster::start_archiving`]) copies its finished WAL segments into.
const ARCHIVE_DIR: &str = "archive";

/// Longest wait for a recovered cluster ([`PgCluster::recover`]) to replay
/// the archive up to its target and promote: a few hundred segments at
/// most in a test; minutes mean recovery is stuck.
const RECOVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Pause between looks at a recovering cluster.
const RECOVERY_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Where archive recovery stops ([`PgCluster::recover`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// A restore point made with `pg_create_restore_point(name)`
    /// (`recovery_target_name`).
    Name(String),
    /// The last transaction committed at or before this time, as
    /// PostgreSQL reads a `timestamptz` (`recovery_target_time`).
    Time(String),
}

/// A base backup taken by [`PgCluster::base_backup`] (`pg_basebackup`, with
/// the WAL it needs), deleted on drop.
#[derive(Debug)]
pub struct BaseBackup {
    dir: tempfile::TempDir,
}

impl BaseBackup {
    /// The backed-up data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

/// How a [`PgCluster`] is configured.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Flush to disk (`fsync = on`). Off by default: commits still wait for
    /// the WAL write (`synchronous_commit = on`), so a server crash loses
    /// nothing acknowledged; only a machine crash could. Benchmarks and
    /// durability drills turn it on.
    pub durable: bool,
    /// `max_connections`; tests with several hub replicas need more than the
    /// default 100.
    pub max_connections: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self { durable: false, max_connections: 200 }
    }
}

/// The server certificate and key of a [`PgCluster`] started with
/// [`PgCluster::start_with_tls`], in PEM.
#[derive(Debug, Clone)]
pub struct PgServerTls {
    /// The server certificate chain (leaf first).
    pub cert_pem: String,
    /// The certificate's private key.
    pub key_pem: String,
}

/// The OS user the server programs run as.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A private PostgreSQL cluster, stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
    bins: PostgresBinaries,
    run_as: Option<RunAs>,
    /// Set while [`PgCluster::pause`] holds the server's processes stopped.
    paused: std::sync::atomic::AtomicBool,
    /// Whether the cluster archives its WAL (see [`PgCluster::start_archiving`]).
    archiving: bool,
}

impl PgCluster {
    /// Creates and starts a cluster.
    pub fn start(options: PgOptions) -> Result<Self> {
        Self::start_inner(options, None, false)
    }

    /// Creates and starts a cluster that archives every finished WAL
    /// segment (`wal_level = replica`, `archive_mode = on`, an
    /// `archive_command` copying into [`PgCluster::archive_dir`]) and
    /// accepts replication connections, so that [`PgCluster::base_backup`]
    /// and [`PgCluster::recover`] can restore it to a point in time.
    pub fn start_archiving(options: PgOptions) -> Result<Self> {
        Self::start_inner(options, None, true)
    }

    /// Creates and starts a cluster that also accepts TLS connections
    /// (`ssl = on`) with the given server certificate and key. Plain
    /// connections are still accepted, so tests can compare both.
    pub fn start_with_tls(options: PgOptions, tls: &PgServerTls) -> Result<Self> {
        Self::start_inner(options, Some(tls), false)
    }

    fn start_inner(options: PgOptions, tls: Option<&PgServerTls>, archiving: bool) -> Result<Self> {
        let bins = find_postgres_binaries()?;
        let run_as = run_as()?;
        reap_orphans(&bins, run_as);
        let template = template_data_dir(&bins, run_as)?;

        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let (dir, data) = cluster_dir_from(&template, run_as, "copy template cluster")?;
            let port = free_port()?;
            write_config(&data, dir.path(), port, &options)?;
            if let Some(tls) = tls {
                write_tls(&data, tls, run_as)?;
            }
            if archiving {
                let archive = dir.path().join(ARCHIVE_DIR);
                std::fs::create_dir(&archive).map_err(|source| io("create the WAL archive", source))?;
                chown_to(&archive, run_as)?;
                append_config(
                    &data,
                    &format!(
                        "wal_level = replica\n\
                         archive_mode = on\n\
                         archive_command = 'test ! -f \"{archive}/%f\" && cp \"%p\" \"{archive}/%f\"'\n",
                        archive = archive.display()
                    ),
                )?;
            }
            let cluster = Self::stopped(dir, port, bins.clone(), run_as, archiving);
            match cluster.start_again() {
                Ok(()) => return Ok(cluster),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one start attempt should have run"))
    }

    /// Restores a new cluster from `backup` and the WAL archive `archive`
    /// up to `target`, the way an operator's point-in-time recovery does:
    /// the backup is copied into a new directory, `restore_command` reads
    /// the archive, `recovery.signal` starts archive recovery, and the
    /// server promotes itself (a new timeline, writable) once it reaches
    /// the target. Returns when it has promoted; an error (with the
    /// server's log) when recovery failed, for example because the archive
    /// does not reach the target. The new cluster does not archive.
    pub fn recover(backup: &BaseBackup, archive: &Path, target: &RecoveryTarget, options: PgOptions) -> Result<Self> {
        let bins = find_postgres_binaries()?;
        let run_as = run_as()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let (dir, data) = cluster_dir_from(&backup.data_dir(), run_as, "copy the base backup")?;
            let port = free_port()?;
            // Later settings win: these replace the origin's port, socket
            // directory and archiving, which the backup carries.
            write_config(&data, dir.path(), port, &options)?;
            let (setting, value) = match target {
                RecoveryTarget::Name(name) => ("recovery_target_name", name),
                RecoveryTarget::Time(time) => ("recovery_target_time", time),
            };
            append_config(
                &data,
                &format!(
                    "archive_mode = off\n\
                     restore_command = 'cp \"{archive}/%f\" \"%p\"'\n\
                     {setting} = '{value}'\n\
                     recovery_target_action = 'promote'\n",
                    archive = archive.display(),
                ),
            )?;
            let signal = data.join("recovery.signal");
            std::fs::write(&signal, b"").map_err(|source| io("write recovery.signal", source))?;
            chown_to(&signal, run_as)?;
            let cluster = Self::stopped(dir, port, bins.clone(), run_as, false);
            match cluster.start_again() {
                Ok(()) => return cluster.wait_promoted().map(|()| cluster),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one start attempt should have run"))
    }

    /// Waits until archive recovery ended with a promotion (the server
    /// deletes `recovery.signal` then).
    fn wait_promoted(&self) -> Result<()> {
        let started = std::time::Instant::now();
        while self.data_dir().join("recovery.signal").exists() {
            let failed = |detail: &str| HarnessError::Process {
                what: "recover PostgreSQL to the target".into(),
                detail: format!("{detail}\nserver log:\n{}", self.log_tail()),
            };
            if !self.data_dir().join("postmaster.pid").exists() {
                return Err(failed("the server stopped during recovery"));
            }
            if started.elapsed() > RECOVERY_TIMEOUT {
                return Err(failed(&format!("not promoted within {RECOVERY_TIMEOUT:?}")));
            }
            std::thread::sleep(RECOVERY_POLL);
        }
        Ok(())
    }

    /// The directory the WAL archive of a cluster started with
    /// [`PgCluster::start_archiving`] lives in (with the cluster: it goes
    /// when the cluster is dropped, not when it is stopped or crashed).
    pub fn archive_dir(&self) -> Option<PathBuf> {
        self.archiving.then(|| self.dir.path().join(ARCHIVE_DIR))
    }

    /// Takes a base backup with `pg_basebackup` (a fast checkpoint; the
    /// WAL written during the backup streamed into it), while the server
    /// keeps serving.
    pub fn base_backup(&self) -> Result<BaseBackup> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{CLUSTER_DIR_PREFIX}{}-backup-", std::process::id()))
            .tempdir()
            .map_err(|source| io("create backup directory", source))?;
        chown_to(dir.path(), self.run_as)?;
        let pg_basebackup = self.bins.pg_ctl.with_file_name("pg_basebackup");
        run(
            pg_command(&pg_basebackup, self.run_as)
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER])
                .args(["--checkpoint=fast", "--wal-method=stream", "--no-sync"]),
            "pg_basebackup",
        )?;
        Ok(BaseBackup { dir })
    }

    /// A cluster in `dir`, not started yet.
    fn stopped(
        dir: tempfile::TempDir,
        port: u16,
        bins: PostgresBinaries,
        run_as: Option<RunAs>,
        archiving: bool,
    ) -> Self {
        Self { dir, port, bins, run_as, paused: std::sync::atomic::AtomicBool::new(false), archiving }
    }

    /// The loopback port the cluster listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server cleanly (fast shutdown: sessions are disconnected,
    /// everything committed is flushed).
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl(&["stop", "-m", "fast"], "stop PostgreSQL")
    }

    /// Stops the server the way a crash would (immediate shutdown: no
    /// checkpoint, recovery replays the WAL on the next start).
    pub fn crash(&self) -> Result<()> {
        self.pg_ctl(&["stop", "-m", "immediate"], "crash PostgreSQL")
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn start_again(&self) -> Result<()> {
        let log = self.dir.path().join("postgres.log");
        let log = log.to_str().ok_or_else(|| io("log path is not UTF-8", std::io::ErrorKind::InvalidData.into()))?;
        self.pg_ctl(&["start", "-l", log], "start PostgreSQL").map_err(|err| match err {
            HarnessError::Process { what, detail } => {
                HarnessError::Process { what, detail: format!("{detail}\nserver log:\n{}", self.log_tail()) }
            }
            other => other,
        })
    }

    /// Freezes every server process (SIGSTOP), the way a stalled host, a
    /// hung storage layer or a long VM pause would: connections stay open
    /// and nothing on them is answered; new connections queue in the
    /// kernel unanswered. [`PgCluster::resume`] thaws them (dropping the
    /// cluster does too).
    pub fn pause(&self) -> Result<()> {
        let pids = self.server_pids()?;
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        signal(&pids, "-STOP", "pause PostgreSQL")
    }

    /// Thaws the processes [`PgCluster::pause`] froze (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        let pids = self.server_pids()?;
        signal(&pids, "-CONT", "resume PostgreSQL")?;
        self.paused.store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The postmaster (from `postmaster.pid`) and its children (from
    /// `/proc`), postmaster first.
    pub fn server_pids(&self) -> Result<Vec<u32>> {
        let pid_file = self.data_dir().join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file).map_err(|source| io("read postmaster.pid", source))?;
        let postmaster: u32 = text.lines().next().and_then(|line| line.trim().parse().ok()).ok_or_else(|| {
            HarnessError::Process { what: "read postmaster.pid".into(), detail: format!("no pid in {text:?}") }
        })?;
        let mut pids = vec![postmaster];
        let proc_dir = std::fs::read_dir("/proc").map_err(|source| io("list /proc", source))?;
        for entry in proc_dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // `pid (comm) state ppid ...`; comm may hold spaces, so read after
            // the last ')'.
            let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent.and_then(|ppid| ppid.parse::<u32>().ok()) == Some(postmaster) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// The last lines of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl(&self, args: &[&str], what: &str) -> Result<()> {
        run(
            pg_command(&self.bins.pg_ctl, self.run_as)
                .arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-t", PG_CTL_TIMEOUT_SECS])
                .args(args),
            what,
        )
        .map(drop)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // A frozen server would ignore the stop until pg_ctl gives up.
        if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = self.resume();
        }
        // Immediate: the data is thrown away, so a clean checkpoint is wasted work.
        let _ = self.crash();
    }
}

/// A new cluster directory (owned by the server's user) whose `data` is a
/// copy of the data directory `source`: (the directory, its `data`).
fn cluster_dir_from(source: &Path, run_as: Option<RunAs>, what: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{CLUSTER_DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(|source| io("create cluster directory", source))?;
    chown_to(dir.path(), run_as)?;
    let data = dir.path().join("data");
    run(pg_command(Path::new("cp"), run_as).arg("-a").arg(source).arg(&data), what)?;
    Ok((dir, data))
}

/// Sends `signal` (`-STOP`, `-CONT`) to the server's processes. They may
/// belong to another user (the harness's `postgres`), which `kill` as root
/// may signal.
fn signal(pids: &[u32], signal: &str, what: &str) -> Result<()> {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    run(Command::new("kill").arg(signal).args(&pids), what).map(drop)
}

/// A fresh database for one test, dropped at the end when it lives on an
/// external server (an owned cluster is deleted whole).
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    cluster: Option<Arc<PgCluster>>,
}

/// The cluster shared by the tests of one process; the last [`TestDb`] to go
/// stops it. Weak, because statics are never dropped and a strong reference
/// would leave the server running after the process exits.
static SHARED_CLUSTER: Mutex<Weak<PgCluster>> = Mutex::new(Weak::new());

impl TestDb {
    /// Creates a fresh, empty database; panics with the fix when PostgreSQL
    /// is unavailable (tests want that, not an error to unwrap).
    pub async fn new() -> Self {
        Self::try_new().await.unwrap_or_else(|err| panic!("test database unavailable: {err}"))
    }

    /// Creates a fresh, empty database.
    pub async fn try_new() -> Result<Self> {
        let (admin_url, cluster) = server().await?;
        let name = unique_name("omnirelay_test");
        let admin = connect(&admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|err| process("create test database", err))?;
        Ok(Self { url: replace_database(&admin_url, &name), name, admin_url, cluster })
    }

    /// Creates a database copied from a template built once per server by
    /// `init` (for example one that applies the migrations).
    ///
    /// `key` names the template and must change whenever `init` would build a
    /// different database (include a hash or version of the migrations), since
    /// a server named by `OMNIRELAY_TEST_DATABASE_URL` keeps templates between
    /// runs.
    pub async fn from_template<F, Fut>(key: &str, init: F) -> Self
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        Self::try_from_template(key, init).await.unwrap_or_else(|err| panic!("test database unavailable: {err}"))
    }

    /// Fallible form of [`TestDb::from_template`].
    pub async fn try_from_template<F, Fut>(key: &str, init: F) -> Result<Self>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let (admin_url, cluster) = server().await?;
        let template: String = format!("omnirelay_tpl_{key}")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .take(63)
            .collect();
        let admin = connect(&admin_url).await?;
        // Serializes template builds across test processes sharing a server.
        admin
            .execute("SELECT pg_advisory_lock(hashtext($1))", &[&template])
            .await
            .map_err(|err| process("lock template", err))?;
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
            .await
            .map_err(|err| process("look up template", err))?
            .is_some();
        if !exists {
            let building = format!("{}_b", &template[..template.len().min(60)]);
            // One statement per call: a multi-statement batch is one implicit
            // transaction, which DROP and CREATE DATABASE refuse.
            for statement in [format!("DROP DATABASE IF EXISTS {building}"), format!("CREATE DATABASE {building}")] {
                admin.batch_execute(&statement).await.map_err(|err| process("create template", err))?;
            }
            init(replace_database(&admin_url, &building)).await.map_err(|err| HarnessError::Process {
                what: "initialise template".into(),
                detail: format!("{err:#}"),
            })?;
            for statement in [
                format!("ALTER DATABASE {building} RENAME TO {template}"),
                format!("ALTER DATABASE {template} WITH IS_TEMPLATE true"),
            ] {
                admin.batch_execute(&statement).await.map_err(|err| process("finish template", err))?;
            }
        }
        let name = unique_name("omnirelay_test");
        let created = admin.batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}")).await;
        admin
            .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&template])
            .await
            .map_err(|err| process("unlock template", err))?;
        created.map_err(|err| process("create test database from template", err))?;
        Ok(Self { url: replace_database(&admin_url, &name), name, admin_url, cluster })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection URL for the database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The harness-owned cluster the database lives on, or `None` on an
    /// external server (which tests must not stop).
    pub fn cluster(&self) -> Option<&PgCluster> {
        self.cluster.as_deref()
    }

    /// A new connection to the database; its driver task runs on the current
    /// runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await.unwrap_or_else(|err| panic!("connect to test database: {err}"))
    }

    /// A connection pool of at most `size` connections to the database.
    pub fn pool(&self, size: usize) -> deadpool_postgres::Pool {
        let config: tokio_postgres::Config = self.url.parse().expect("harness URLs should parse");
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        deadpool_postgres::Pool::builder(manager).max_size(size).build().expect("pool settings should be valid")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.cluster.is_some() {
            return; // the whole cluster goes with its last user
        }
        // Async drop does not exist; a helper thread with its own runtime
        // works inside and outside a runtime alike.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let admin = connect(&admin_url).await.ok()?;
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            tracing::warn!(database = %self.name, "failed to drop test database");
        }
    }
}

/// The admin URL of the server test databases go on, and the owned cluster
/// behind it if any.
async fn server() -> Result<(String, Option<Arc<PgCluster>>)> {
    if let Ok(url) = std::env::var(DATABASE_URL_ENV) {
        return Ok((url, None));
    }
    tokio::task::spawn_blocking(|| {
        let mut shared = SHARED_CLUSTER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(cluster) = shared.upgrade() {
            return Ok((cluster.url(SUPERUSER), Some(cluster)));
        }
        let cluster = Arc::new(PgCluster::start(PgOptions::default())?);
        *shared = Arc::downgrade(&cluster);
        Ok((cluster.url(SUPERUSER), Some(cluster)))
    })
    .await
    .expect("cluster start should not panic")
}

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|err| process("connect to PostgreSQL", err))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "test connection closed");
        }
    });
    Ok(client)
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}_{}_{}_{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The user to run server programs as: ourselves, unless we are root.
fn run_as() -> Result<Option<RunAs>> {
    let me = std::fs::metadata("/proc/self").map_err(|source| io("read own uid", source))?;
    if me.uid() != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|source| io("read /etc/passwd", source))?;
    ["postgres", "nobody"]
        .iter()
        .find_map(|user| {
            passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.first() == Some(user) && fields.len() > 3)
                    .then(|| Some(RunAs { uid: fields[2].parse().ok()?, gid: fields[3].parse().ok()? }))
                    .flatten()
            })
        })
        .map(Some)
        .ok_or_else(|| HarnessError::Process {
            what: "find a user to run PostgreSQL as".into(),
            detail: "running as root and neither `postgres` nor `nobody` exists; create a `postgres` user".into(),
        })
}

fn pg_command(program: &Path, run_as: Option<RunAs>) -> Command {
    let mut command = Command::new(program);
    if let Some(user) = run_as {
        command.uid(user.uid).gid(user.gid);
    }
    // Server programs must not inherit a locale the machine lacks.
    command.env("LC_ALL", "C").env_remove("PGDATA");
    command
}

fn run(command: &mut Command, what: &str) -> Result<Output> {
    let output = command.output().map_err(|source| io(what, source))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(HarnessError::Process {
            what: what.to_string(),
            detail: format!(
                "{}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

fn chown_to(path: &Path, run_as: Option<RunAs>) -> Result<()> {
    match run_as {
        Some(user) => std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .map_err(|source| io(&format!("chown {}", path.display()), source)),
        None => Ok(()),
    }
}

/// Returns the template data directory, running `initdb` once per machine,
/// PostgreSQL version and user. Concurrent processes each build their own
/// and race to rename it into place; the losers delete theirs.
fn template_data_dir(bins: &PostgresBinaries, run_as: Option<RunAs>) -> Result<PathBuf> {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or_default();
    let template = std::env::temp_dir().join(format!("omnirelay-pg-template-{}-{uid}", bins.version));
    if template.join("PG_VERSION").exists() {
        return Ok(template);
    }
    let scratch = tempfile::Builder::new()
        .prefix("omnirelay-pg-initdb-")
        .tempdir()
        .map_err(|source| io("create initdb directory", source))?;
    chown_to(scratch.path(), run_as)?;
    let data = scratch.path().join("data");
    run(
        pg_command(&bins.initdb, run_as).arg("-D").arg(&data).args([
            "--auth=trust",
            "--username",
            SUPERUSER,
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]),
        "initdb",
    )?;
    match std::fs::rename(&data, &template) {
        Ok(()) => Ok(template),
        Err(_) if template.join("PG_VERSION").exists() => Ok(template),
        Err(source) => Err(io("move template cluster into place", source)),
    }
}

fn write_config(data: &Path, socket_dir: &Path, port: u16, options: &PgOptions) -> Result<()> {
    let durable = if options.durable { "on" } else { "off" };
    let config = format!(
        "\n# omnirelay test harness\n\
         port = {port}\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{socket}'\n\
         max_connections = {max}\n\
         fsync = {durable}\n\
         full_page_writes = {durable}\n\
         synchronous_commit = on\n\
         shared_buffers = 64MB\n\
         log_min_messages = warning\n",
        socket = socket_dir.display(),
        max = options.max_connections,
    );
    append_config(data, &config)
}

/// Appends `settings` to `postgresql.conf` (a later line overrides an
/// earlier one).
fn append_config(data: &Path, settings: &str) -> Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut file| file.write_all(settings.as_bytes()))
        .map_err(|source| io("write postgresql.conf", source))
}

/// Writes the server certificate and key into the data directory (owned by
/// the server's user; PostgreSQL refuses a key others can read) and turns
/// TLS on.
fn write_tls(data: &Path, tls: &PgServerTls, run_as: Option<RunAs>) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    for (name, pem) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
        let path = data.join(name);
        std::fs::write(&path, pem).map_err(|source| io(&format!("write {name}"), source))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| io(&format!("restrict {name}"), source))?;
        chown_to(&path, run_as)?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut file| file.write_all(b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"))
        .map_err(|source| io("write postgresql.conf", source))
}

/// Stops and deletes clusters left behind by test processes that died
/// (killed by a timeout, say) before their drop ran.
fn reap_orphans(bins: &PostgresBinaries, run_as: Option<RunAs>) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(CLUSTER_DIR_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let data = entry.path().join("data");
        let _ = pg_command(&bins.pg_ctl, run_as)
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"])
            .output();
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

fn free_port() -> Result<u16> {
    Ok(crate::tools::free_port())
}

fn io(what: &str, source: std::io::Error) -> HarnessError {
    HarnessError::Io { what: what.to_string(), source }
}

fn process(what: &str, err: tokio_postgres::Error) -> HarnessError {
    HarnessError::Process { what: what.to_string(), detail: format!("{err}: {:?}", err.as_db_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_database_keeps_authority_and_query() {
        assert_eq!(
            replace_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://u@h:5432", "x"), "postgres://u@h:5432/x");
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name("a"), unique_name("a"));
    }
}
