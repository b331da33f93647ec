//! Harness for ergon's end-to-end tests against a real one-node Slurm cluster.
//!
//! The cluster is the one `scripts/slurm-cluster` runs: real munge, MariaDB, slurmdbd, slurmctld
//! and slurmd on loopback. [`cluster()`] brings it up once per test binary (`up` is idempotent and
//! cheap when the cluster already runs), so `cargo test -p ergon-tests` works on its own;
//! `scripts/test` also brings it down at the end.
//!
//! The Slurm release is `$ERGON_CLUSTER_SLURM` (22.05, the host's, by default; 24.11 and 26.05
//! run from Debian roots). Every Slurm command a test runs goes through [`Cluster::cmd`], which
//! picks that release's own program, and the plugin under test is the build for that release
//! ([`Cluster::plugin_so`]).
//!
//! Waiting is always for a condition (a job state in sacct, a file's appearance), polled at a short
//! interval with a deadline, never a fixed sleep.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(100);

/// Default deadline for a job to reach a state. Generous: CI has 2 cores and several tests'
/// jobs may queue behind each other.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// The plugin arguments every test runs with (besides the socket and gres.conf).
pub const PLUGIN_ARGS: &str = "timeout_ms=100";

/// The running development cluster, as described by `scripts/slurm-cluster env`.
#[derive(Debug)]
pub struct Cluster {
    /// The state directory (`$ERGON_CLUSTER_DIR`).
    pub dir: PathBuf,
    /// The `slurm.conf` every client command must use (exported as `SLURM_CONF`).
    pub slurm_conf: PathBuf,
    /// The node's name as in slurm.conf (`$ERGON_CLUSTER_NODE`, default `hostname -s`); on a
    /// multi-node cluster the base of the nodes' names.
    pub node: String,
    /// Every node's name: `[node]` on the one-node cluster, `node1 … nodeN` on a multi-node one
    /// (`scripts/slurm-cluster up --nodes N`).
    pub nodes: Vec<String>,
    /// A non-root user registered in the accounting database, for tests that need one.
    pub test_user: String,
    /// The Slurm release (`22.05`, `24.11`, `26.05`).
    pub release: String,
    /// Where this release's client commands are (wrappers that run them in its Debian root);
    /// `None` for the host's own Slurm.
    pub bin: Option<PathBuf>,
    /// The release's Debian root as mounted for this cluster; `None` for the host's own Slurm.
    pub root: Option<PathBuf>,
}

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cluster, brought up on first use in this process.
///
/// Panics with the script's output when the cluster cannot be brought up: every end-to-end test
/// needs it, and the script's message says which daemon failed.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| match bring_up() {
        Ok(c) => c,
        Err(e) => panic!("the test cluster is not available: {e:#}"),
    })
}

fn bring_up() -> Result<Cluster> {
    let script = repo_root().join("scripts/slurm-cluster");
    let out = Command::new(&script)
        .arg("up")
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} up failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let env = Command::new(&script).arg("env").output()?;
    let env = String::from_utf8(env.stdout)?;
    let var = |name: &str| -> Result<String> {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(|v| v.trim_matches('\'').to_string())
            .ok_or_else(|| anyhow!("`slurm-cluster env` printed no {name}"))
    };
    let node = var("ERGON_CLUSTER_NODE")?;
    let dir: PathBuf = var("ERGON_CLUSTER_DIR")?.into();
    let release = var("ERGON_CLUSTER_SLURM")?;
    let bin = Some(dir.join("bin")).filter(|b| b.join("sbatch").exists());
    let root = var("ERGON_CLUSTER_ROOT").ok().map(PathBuf::from);
    let nodes = var("ERGON_CLUSTER_NODE_NAMES")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_else(|_| vec![node.clone()]);
    let cluster = Cluster {
        nodes,
        dir,
        slurm_conf: var("SLURM_CONF")?.into(),
        node,
        test_user: std::env::var("ERGON_CLUSTER_TEST_USER").unwrap_or_else(|_| "ergontest".into()),
        release,
        bin,
        root,
    };
    // Every test runs with this build's plugin listed as `required`: a job-breaking hook would
    // fail every test, and no earlier build's plugin line can linger.
    cluster.install_plugin(PLUGIN_ARGS)?;
    Ok(cluster)
}

/// A job's state as sacct prints it for the job allocation (`-X`), e.g. `COMPLETED`, `FAILED`,
/// `CANCELLED by 0`; the first word is what tests compare.
pub type JobState = String;

impl Cluster {
    /// A command for a Slurm client program (or any program), with this cluster's `SLURM_CONF`
    /// and a `PATH` that finds this release's Slurm commands first (so programs that call
    /// `sacct` or `sacctmgr` themselves, like `ergon`, reach the right release too).
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(self.program(program));
        c.env("SLURM_CONF", &self.slurm_conf);
        let path = std::env::var("PATH").unwrap_or_default();
        match &self.bin {
            Some(bin) => c.env("PATH", format!("{}:{path}:/usr/sbin:/sbin", bin.display())),
            None => c.env("PATH", format!("{path}:/usr/sbin:/sbin")),
        };
        c
    }

    /// The program to run for `name`: this release's own wrapper for a Slurm command (and for
    /// `runuser`, which then runs its command inside the release's root), else `name` itself.
    pub fn program(&self, name: impl AsRef<OsStr>) -> PathBuf {
        let name = Path::new(name.as_ref());
        match &self.bin {
            Some(bin) if name.components().count() == 1 && bin.join(name).exists() => {
                bin.join(name)
            }
            _ => name.to_path_buf(),
        }
    }

    /// Where the release's files are, seen from the host: its mounted root, or `/`.
    pub fn root_path(&self, path: &str) -> PathBuf {
        match &self.root {
            Some(root) => root.join(path.trim_start_matches('/')),
            None => PathBuf::from(path),
        }
    }

    /// Whether this is the host's own Slurm (22.05), not one in a Debian root.
    pub fn is_host_release(&self) -> bool {
        self.bin.is_none()
    }

    /// The release as a comparable number: `(major, minor)`, e.g. `(26, 5)`.
    pub fn version(&self) -> (u32, u32) {
        let mut it = self.release.split('.').map(|p| p.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    }

    /// The plugin built for this release: the workspace's own build for the host's Slurm,
    /// `scripts/build-plugin --slurm R`'s for the others.
    pub fn plugin_so(&self) -> Result<PathBuf> {
        let so = if self.is_host_release() {
            target_dir().join("debug/libspank_ergon.so")
        } else {
            target_dir().join(format!("slurm-{}/debug/libspank_ergon.so", self.release))
        };
        if !so.exists() {
            bail!(
                "{} is missing: build it first ({})",
                so.display(),
                if self.is_host_release() {
                    "cargo build -p spank-ergon".to_string()
                } else {
                    format!("scripts/build-plugin --slurm {}", self.release)
                }
            );
        }
        Ok(so)
    }

    /// Runs a Slurm client command and returns its output, failing with stderr when it fails.
    pub fn run<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self
            .cmd(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Submits a batch job with `sbatch --parsable` and returns its job id.
    pub fn sbatch<I, S>(&self, args: I) -> Result<u32>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.run(
            "sbatch",
            std::iter::once(OsStr::new("--parsable").to_owned())
                .chain(args.into_iter().map(|a| a.as_ref().to_owned())),
        )?;
        let text = String::from_utf8(out.stdout)?;
        // --parsable prints "jobid" or "jobid;cluster".
        let id = text.trim().split(';').next().unwrap_or_default();
        id.parse()
            .with_context(|| format!("sbatch printed {text:?}, not a job id"))
    }

    /// One sacct field of the job allocation (`sacct -X -n -P -j JOB -o FIELD`), or `None` when
    /// sacct does not list the job yet.
    pub fn sacct_field(&self, job: u32, field: &str) -> Result<Option<String>> {
        let out = self.run(
            "sacct",
            ["-X", "-n", "-P", "-j", &job.to_string(), "-o", field],
        )?;
        let text = String::from_utf8(out.stdout)?;
        Ok(text.lines().next().map(|l| l.trim_end().to_string()))
    }

    /// All sacct rows of a job (allocation and steps) with the given fields, `|`-separated.
    pub fn sacct_rows(&self, job: u32, fields: &str) -> Result<Vec<Vec<String>>> {
        let out = self.run("sacct", ["-n", "-P", "-j", &job.to_string(), "-o", fields])?;
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect())
    }

    /// Waits until sacct shows the job in one of `states` (compared on the first word) and returns
    /// the state. Fails early if the job reaches a different final state.
    pub fn wait_job_state(&self, job: u32, states: &[&str], timeout: Duration) -> Result<JobState> {
        const FINAL: &[&str] = &[
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "PREEMPTED",
            "BOOT_FAIL",
            "DEADLINE",
        ];
        let mut last = None;
        wait_for(timeout, &format!("job {job} to reach {states:?}"), || {
            let state = self.sacct_field(job, "State")?;
            last = state.clone();
            let Some(state) = state else { return Ok(None) };
            let word = state.split_whitespace().next().unwrap_or_default();
            if states.contains(&word) {
                return Ok(Some(state));
            }
            if FINAL.contains(&word) {
                bail!("job {job} ended {state}, expected one of {states:?}");
            }
            Ok(None)
        })
        .with_context(|| format!("last sacct state: {last:?}"))
    }

    /// Waits for a job to complete successfully (`COMPLETED`).
    pub fn wait_completed(&self, job: u32) -> Result<()> {
        self.wait_job_state(job, &["COMPLETED"], JOB_TIMEOUT)
            .map(|_| ())
    }

    /// `scontrol -d show job JOB` as key=value pairs (first occurrence of each key; `-d` adds
    /// the per-node `CPU_IDs` and GRES indices).
    pub fn scontrol_job(&self, job: u32) -> Result<Vec<(String, String)>> {
        let out = self.run("scontrol", ["-o", "-d", "show", "job", &job.to_string()])?;
        let text = String::from_utf8(out.stdout)?;
        Ok(text
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// Installs a plugstack.conf drop-in (`plugstack.conf.d/NAME.conf`) until the guard drops.
    /// slurmd, sbatch and srun read plugstack.conf at every job, so no restart is needed.
    pub fn plugstack_dropin(&self, name: &str, content: &str) -> Result<DropIn> {
        let path = self
            .dir
            .join("etc/plugstack.conf.d")
            .join(format!("{name}.conf"));
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
        Ok(DropIn { path })
    }

    /// The slurmd log, for tests that check what the node logged.
    pub fn slurmd_log(&self) -> PathBuf {
        self.dir.join("log/slurmd.log")
    }

    /// The socket the test plugin configuration points the SPANK plugin at.
    pub fn plugin_socket(&self) -> PathBuf {
        self.dir.join("run/ergon-test.sock")
    }

    /// Where the plugin queues the events ergond could not take (its default: `queue/` beside
    /// [`Cluster::plugin_socket`]).
    pub fn plugin_queue(&self) -> PathBuf {
        self.dir.join("run/queue")
    }

    /// The events queued in [`Cluster::plugin_queue`], oldest first.
    pub fn queued_events(&self) -> Result<Vec<ergon_protocol::Request>> {
        let mut names: Vec<PathBuf> = match std::fs::read_dir(self.plugin_queue()) {
            Ok(d) => d
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "event"))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        names.sort();
        names
            .iter()
            .map(|p| {
                let bytes = std::fs::read(p)?;
                Ok(ergon_protocol::read_frame(&mut bytes.as_slice())?)
            })
            .collect()
    }

    /// Empty the plugin's queue, so that an ergond started fresh replays only what its own
    /// test queues.
    pub fn clear_plugin_queue(&self) -> Result<()> {
        match std::fs::remove_dir_all(self.plugin_queue()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Installs the freshly built `spank_ergon.so` in the cluster's plugstack (socket:
    /// [`Cluster::plugin_socket`], `extra` appended to its arguments) and restarts slurmd when
    /// the plugin is new there, since slurmd only learns about job prolog/epilog hooks at start.
    pub fn install_plugin(&self, extra: &str) -> Result<()> {
        let so = self.plugin_so()?;
        let line = format!(
            "required {} socket={} gres_conf={} {extra}\n",
            so.display(),
            self.plugin_socket().display(),
            self.dir.join("etc/gres.conf").display()
        );
        let path = self.dir.join("etc/plugstack.conf.d/ergon.conf");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        if old == line {
            return Ok(());
        }
        std::fs::write(&path, &line).with_context(|| format!("writing {}", path.display()))?;
        // Every process that runs the plugin (the prolog/epilog helper and slurmstepd included)
        // reads plugstack.conf when it starts, so new arguments apply to the next job. Only
        // slurmd's own knowledge of which plugins have prolog hooks needs a restart, when the
        // plugin itself is new.
        let same_plugin = old.split_whitespace().nth(1) == line.split_whitespace().nth(1);
        if same_plugin {
            return Ok(());
        }
        let script = repo_root().join("scripts/slurm-cluster");
        let out = Command::new(&script).arg("restart-slurmd").output()?;
        if !out.status.success() {
            bail!(
                "restart-slurmd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Lines of the slurmd log written after `offset` bytes (see [`Cluster::slurmd_log_len`]).
    pub fn slurmd_log_since(&self, offset: u64) -> Result<String> {
        let bytes = std::fs::read(self.slurmd_log())?;
        Ok(String::from_utf8_lossy(&bytes[(offset as usize).min(bytes.len())..]).into_owned())
    }

    /// The slurmd log's current length, to read only what a test causes.
    pub fn slurmd_log_len(&self) -> u64 {
        std::fs::metadata(self.slurmd_log())
            .map(|m| m.len())
            .unwrap_or(0)
    }
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// A plugstack.conf drop-in, removed when dropped.
#[derive(Debug)]
pub struct DropIn {
    path: PathBuf,
}

impl Drop for DropIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Polls `check` every [`POLL`] until it returns `Some`, fails, or `timeout` passes.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `path` exists and returns its content.
pub fn wait_for_file(path: &Path, timeout: Duration) -> Result<String> {
    wait_for(
        timeout,
        &format!("{} to appear", path.display()),
        || match std::fs::read_to_string(path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        },
    )
}

/// A scratch directory for one test's job scripts and outputs, readable by jobs of any user and
/// removed at the end of the test.
pub fn scratch_dir(name: &str) -> Result<TempDir> {
    let base = std::env::temp_dir().join("ergon-tests");
    std::fs::create_dir_all(&base)?;
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    Ok(TempDir { path: dir })
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// How the test listener answers (see `src/bin/ergon-test-listener.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// Answers `Ok` at once.
    Ok,
    /// Accepts and never answers.
    Hang,
    /// Answers bytes that are not a frame.
    Garbage,
}

/// A running `ergon-test-listener`, killed (and its socket removed) on drop.
#[derive(Debug)]
pub struct Listener {
    child: std::process::Child,
    socket: PathBuf,
    events: PathBuf,
}

/// One event the listener recorded.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RecordedEvent {
    /// The sender's uid (`SO_PEERCRED`).
    pub peer_uid: Option<u32>,
    /// When the listener received it.
    pub received_unix_ns: u64,
    /// The decoded request.
    pub request: ergon_protocol::Request,
}

impl Listener {
    /// Starts a listener on `socket`, recording to `events`, and waits until it accepts.
    pub fn start(
        binary: &Path,
        socket: &Path,
        events: &Path,
        mode: ListenerMode,
    ) -> Result<Listener> {
        let _ = std::fs::remove_file(socket);
        let mode = match mode {
            ListenerMode::Ok => "ok",
            ListenerMode::Hang => "hang",
            ListenerMode::Garbage => "garbage",
        };
        let child = Command::new(binary)
            .arg(socket)
            .arg(events)
            .args(["--mode", mode])
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let listener = Listener {
            child,
            socket: socket.to_path_buf(),
            events: events.to_path_buf(),
        };
        wait_for(
            Duration::from_secs(10),
            "the test listener's socket",
            || {
                Ok(std::os::unix::net::UnixStream::connect(socket)
                    .is_ok()
                    .then_some(()))
            },
        )?;
        // That probe connection sent nothing; the listener logs it as a bad frame and goes on.
        Ok(listener)
    }

    /// Everything recorded so far.
    pub fn events(&self) -> Result<Vec<RecordedEvent>> {
        let text = match std::fs::read_to_string(&self.events) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        // Only whole lines: the listener may be in the middle of appending the next one.
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("event line {l}")))
            .collect()
    }

    /// Waits until the recorded events satisfy `pred`, and returns them.
    pub fn wait_events(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[RecordedEvent]) -> bool,
    ) -> Result<Vec<RecordedEvent>> {
        let mut last = Vec::new();
        wait_for(timeout, what, || {
            let ev = self.events()?;
            if pred(&ev) {
                return Ok(Some(ev));
            }
            last = ev;
            Ok(None)
        })
        .with_context(|| format!("events so far: {last:#?}"))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
