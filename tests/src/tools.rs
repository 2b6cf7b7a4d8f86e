//! The operations tools the deployment tests run for real: a Python
//! environment with Helm's SDK and Kubernetes' schemas, Prometheus' server
//! and `promtool`, and the workspace's own binaries.
//!
//! Every tool that is missing is an error saying how to install it; no test
//! skips because of one, in CI or elsewhere.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binaries::{is_executable, path_dirs};
use crate::{HarnessError, Result};

/// The Python packages the chart checks import, pinned (see
/// `helm/tests/requirements.txt`, which this must match).
const REQUIREMENTS: &str = include_str!("../../helm/tests/requirements.txt");

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate sits in the workspace").to_path_buf()
}

/// Cargo's target folder (`CARGO_TARGET_DIR`, else `target/` in the workspace).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// A virtual environment with `helm/tests/requirements.txt` installed.
#[derive(Debug, Clone)]
pub struct PythonTools {
    /// The environment's interpreter.
    pub python: PathBuf,
}

impl PythonTools {
    /// Creates (once, under a file lock, in `target/ops-venv`) or reuses the
    /// environment. Installing downloads about 80 MB from PyPI the first
    /// time; later runs reuse it while the requirements are unchanged.
    pub fn ensure() -> Result<Self> {
        let python = ensure_venv("ops", REQUIREMENTS, "helm/tests/requirements.txt")?;
        Ok(Self { python })
    }

    /// Runs a Python script of the repository with arguments; returns its
    /// standard output, or an error with its standard error.
    pub fn run_script(&self, script: &Path, args: &[&str]) -> Result<String> {
        let output = Command::new(&self.python)
            .arg(script)
            .args(args)
            .output()
            .map_err(|source| io(&format!("run {}", script.display()), source))?;
        if !output.status.success() {
            return Err(process(
                &format!("{} {}", script.display(), args.join(" ")),
                format!("{}\n{}", String::from_utf8_lossy(&output.stderr), String::from_utf8_lossy(&output.stdout)),
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Creates (once, under a file lock, in `target/{name}-venv`) or reuses a
/// Python virtual environment with `requirements` installed from PyPI
/// (`source` names them in errors); returns its interpreter. The
/// environment is rebuilt when the requirements change.
pub(crate) fn ensure_venv(name: &str, requirements: &str, source: &str) -> Result<PathBuf> {
    let target = target_dir();
    std::fs::create_dir_all(&target).map_err(|source| io("create the target folder", source))?;
    let lock = std::fs::File::create(target.join(format!("{name}-venv.lock")))
        .map_err(|source| io("create the environment's lock file", source))?;
    lock.lock().map_err(|source| io("lock the Python environment", source))?;
    let venv = target.join(format!("{name}-venv"));
    let python = venv.join("bin").join("python");
    let marker = venv.join("omnirelay-requirements.txt");
    if is_executable(&python) && std::fs::read_to_string(&marker).is_ok_and(|installed| installed == requirements) {
        return Ok(python);
    }
    let python3 =
        path_dirs().into_iter().map(|dir| dir.join("python3")).find(|p| is_executable(p)).ok_or_else(|| {
            process(
                "find python3",
                "python3 is not on PATH. Fix: `apt-get install python3 python3-venv` (scripts/test does)".into(),
            )
        })?;
    let _ = std::fs::remove_dir_all(&venv);
    run(
        Command::new(&python3).args(["-m", "venv"]).arg(&venv),
        "create a Python virtual environment (python3 -m venv; Debian needs python3-venv)",
    )?;
    let file = target.join(format!("{name}-requirements.txt"));
    std::fs::write(&file, requirements).map_err(|source| io("write the requirements", source))?;
    run(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--disable-pip-version-check", "--quiet", "-r"])
            .arg(&file),
        &format!("install {source} from PyPI into target/{name}-venv"),
    )?;
    std::fs::write(&marker, requirements).map_err(|source| io("mark the environment installed", source))?;
    Ok(python)
}

/// Prometheus' programs, from Debian's `prometheus` package.
#[derive(Debug, Clone)]
pub struct PrometheusTools {
    /// The server.
    pub prometheus: PathBuf,
    /// `promtool`: checks and unit-tests rules, checks expressions.
    pub promtool: PathBuf,
}

impl PrometheusTools {
    /// Finds `prometheus` and `promtool` on `PATH`.
    pub fn find() -> Result<Self> {
        let find = |name: &str| {
            path_dirs().into_iter().map(|dir| dir.join(name)).find(|p| is_executable(p)).ok_or_else(|| {
                process(
                    &format!("find {name}"),
                    format!("{name} is not on PATH. Fix: run scripts/test, which installs it; or `apt-get install prometheus`"),
                )
            })
        };
        Ok(Self { prometheus: find("prometheus")?, promtool: find("promtool")? })
    }
}

/// Paths of the workspace's binaries, built for this test run.
#[derive(Debug, Clone)]
pub struct WorkspaceBinaries {
    /// `omnirelay-hub`.
    pub hub: PathBuf,
    /// `omnirelay` (the CLI and the sidecar node).
    pub omnirelay: PathBuf,
}

impl WorkspaceBinaries {
    /// Builds (or finds fresh) `omnirelay-hub` and `omnirelay` with cargo,
    /// so a test never runs a stale binary, and returns their paths as cargo
    /// reports them. A test crate cannot name another package's binaries
    /// (`CARGO_BIN_EXE_*` covers its own only), hence the build.
    pub fn build() -> Result<Self> {
        let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| "cargo".into());
        let output = Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--message-format=json-render-diagnostics",
                "-p",
                "omnirelay-hub",
                "--bin",
                "omnirelay-hub",
                "-p",
                "omnirelay-cli",
                "--bin",
                "omnirelay",
            ])
            .output()
            .map_err(|source| io("run cargo build", source))?;
        if !output.status.success() {
            return Err(process(
                "cargo build the hub and the CLI",
                String::from_utf8_lossy(&output.stderr).into_owned(),
            ));
        }
        let mut hub = None;
        let mut omnirelay = None;
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            // Cargo's artifact messages: {"reason":"compiler-artifact",...,"executable":"/path"}.
            let Some(start) = line.find("\"executable\":\"") else { continue };
            let rest = &line[start + 14..];
            let Some(end) = rest.find('"') else { continue };
            let path = PathBuf::from(&rest[..end]);
            match path.file_name().and_then(|n| n.to_str()) {
                Some("omnirelay-hub") => hub = Some(path),
                Some("omnirelay") => omnirelay = Some(path),
                _ => {}
            }
        }
        let missing = |name: &str| process("cargo build", format!("cargo reported no {name} executable"));
        Ok(Self {
            hub: hub.ok_or_else(|| missing("omnirelay-hub"))?,
            omnirelay: omnirelay.ok_or_else(|| missing("omnirelay"))?,
        })
    }
}

/// Lowest port [`free_port`] hands out: above the well-known and most
/// registered services' ports.
const FREE_PORT_LOW: u16 = 20_000;

/// Ports [`free_port`] tries before it falls back to an ephemeral one.
const FREE_PORT_ATTEMPTS: usize = 200;

/// A free loopback port for a child process started right after (bound
/// and released), picked at random below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`, from 32768 by default), where no
/// outgoing connection is given a port. The port is also *reserved* for
/// the rest of this test process: an exclusive lock on
/// `$TMPDIR/omnirelay-test-ports/<port>.lock`, which every test process's
/// `free_port` takes before it hands a port out. Without it two tests
/// running side by side could both probe the same port free before either
/// child bound it, and one child would fail to start. The lock is released
/// when the process exits, so a killed test leaks nothing. Falls back to an
/// ephemeral port if none is free.
pub fn free_port() -> u16 {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let high = ephemeral.max(FREE_PORT_LOW + 1_000);
    let locks = std::env::temp_dir().join("omnirelay-test-ports");
    let _ = std::fs::create_dir_all(&locks);
    for _ in 0..FREE_PORT_ATTEMPTS {
        let port = fastrand::u16(FREE_PORT_LOW..high);
        let Some(reservation) = reserve(&locks, port) else { continue };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            RESERVED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(reservation);
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding an ephemeral loopback port should work")
}

/// The lock files of the ports this process reserved: held open (and
/// locked) until it exits.
static RESERVED: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());

/// `port`'s lock file in `dir`, locked exclusively, or `None` when another
/// process (or an earlier call of this one) holds it.
fn reserve(dir: &Path, port: u16) -> Option<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{port}.lock")))
        .ok()?;
    file.try_lock().ok()?;
    Some(file)
}

/// Writes `contents` to `path`, creating its folder.
pub fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| io("create a folder", source))?;
    }
    let mut file = std::fs::File::create(path).map_err(|source| io("create a file", source))?;
    file.write_all(contents).map_err(|source| io("write a file", source))
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let output = command.output().map_err(|source| io(what, source))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(process(
            what,
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
        ))
    }
}

fn io(what: &str, source: std::io::Error) -> HarnessError {
    HarnessError::Io { what: what.to_string(), source }
}

fn process(what: &str, detail: String) -> HarnessError {
    HarnessError::Process { what: what.to_string(), detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_port_is_not_handed_out_again_until_its_holder_lets_go() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let held = reserve(dir.path(), 20_001).expect("the first reservation");
        assert!(reserve(dir.path(), 20_001).is_none(), "the port is reserved");
        assert!(reserve(dir.path(), 20_002).is_some(), "another port is not");
        drop(held);
        assert!(reserve(dir.path(), 20_001).is_some(), "released with its lock file");
    }

    #[test]
    fn free_ports_handed_out_by_one_process_are_distinct() {
        // Enough that probing alone (bind, release) would hand one out
        // twice: about 3.5 repeats expected among 12,768 ports.
        let ports: std::collections::BTreeSet<u16> = (0..300).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 300);
    }
}
