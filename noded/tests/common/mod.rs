//! Shared helpers for ergond's integration tests: the fake NVML library and the ground truth.

#![allow(dead_code)]

#[path = "../../../tests/fake-nvml/src/profile.rs"]
pub mod profile;

pub mod prometheus;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// Path of the built fake NVML library (`libnvidia_ml.so` of the `fake-nvml` crate).
///
/// Order: `$FAKE_NVML_LIB`; `<target>/debug/libnvidia_ml.so` (run `cargo build -p fake-nvml`
/// first, as scripts/test does); otherwise it is built here into a separate target directory
/// (a nested cargo on the same target directory would wait forever for the lock the outer
/// `cargo test` holds).
pub fn fake_nvml_lib() -> PathBuf {
    if let Ok(p) = std::env::var("FAKE_NVML_LIB") {
        return PathBuf::from(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let built = target.join("debug/libnvidia_ml.so");
    if built.exists() {
        return built;
    }
    let side = target.join("fake-nvml-for-tests");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "fake-nvml"])
        .env("CARGO_TARGET_DIR", &side)
        .current_dir(&workspace)
        .status()
        .expect("run cargo build -p fake-nvml");
    assert!(status.success(), "cargo build -p fake-nvml failed");
    side.join("debug/libnvidia_ml.so")
}

/// A private copy of the fake library with its own scenario next to it, so tests running in
/// parallel threads of one process do not share fake state (each copy is a separate dlopen).
pub struct FakeNvml {
    _dir: tempfile::TempDir,
    pub lib: PathBuf,
    pub start_ns: u64,
}

impl FakeNvml {
    /// Copy the library and write `scenario` (its `start_monotonic_ns` is set to now + 20 ms
    /// unless present).
    pub fn new(mut scenario: serde_json::Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(fake_nvml_lib(), &lib).unwrap();
        let start_ns = match scenario.get("start_monotonic_ns").and_then(|v| v.as_u64()) {
            Some(s) => s,
            None => {
                let s = ergond::clock::monotonic_ns() + 20_000_000;
                scenario["start_monotonic_ns"] = s.into();
                s
            }
        };
        let scen = PathBuf::from(format!("{}.scenario.json", lib.display()));
        std::fs::write(scen, serde_json::to_vec_pretty(&scenario).unwrap()).unwrap();
        Self {
            _dir: dir,
            lib,
            start_ns,
        }
    }

    /// Scenario time (s) of a monotonic instant.
    pub fn t(&self, at_ns: u64, time_scale: f64) -> f64 {
        (at_ns as f64 - self.start_ns as f64) / 1e9 * time_scale
    }

    /// Sleep until scenario time 0.
    pub fn wait_for_start(&self) {
        let now = ergond::clock::monotonic_ns();
        if now < self.start_ns {
            std::thread::sleep(std::time::Duration::from_nanos(self.start_ns - now));
        }
    }
}

/// Relative error |a − b| / |b|.
pub fn rel_err(got: f64, truth: f64) -> f64 {
    (got - truth).abs() / truth.abs()
}

/// A path as a TOML string literal.
pub fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A generated node under `dir` for running the `ergond` binary: a one-socket Intel powercap
/// tree, a 2-CPU topology and `/proc/stat`, a cgroup v2 tree with `cgroup_rel` at `usage_usec`,
/// and `ergond.toml` pointing every root there (socket `run/ergond.sock`, `state/`, `spool/`),
/// NVML at `nvml`, `/metrics` at `metrics`, and `extra` TOML lines appended. Returns the
/// configuration file.
pub fn write_node(
    dir: &Path,
    nvml: &Path,
    metrics: &str,
    cgroup_rel: &str,
    usage_usec: u64,
    extra: &str,
) -> PathBuf {
    use ergon_testkit::{
        write_cgroup_v2_usage, write_cpu_topology, write_proc_stat, PowercapLayout, PowercapTree,
    };
    let powercap = dir.join("powercap");
    PowercapTree::create(
        &powercap,
        &PowercapLayout::IntelServer { sockets: 1 }.zones(),
    );
    let sys = dir.join("sys");
    write_cpu_topology(&sys, &[(0, 0, 0), (1, 0, 0)]);
    let proc_root = dir.join("proc");
    write_proc_stat(&proc_root, &[(0, [10, 0, 5, 100, 0, 0, 0, 0]); 2]);
    // An 8 GiB node.
    std::fs::write(
        proc_root.join("meminfo"),
        "MemTotal:        8388608 kB\nMemFree:         4194304 kB\n",
    )
    .unwrap();
    let cgroup = dir.join("cgroup");
    write_cgroup_v2_usage(&cgroup, cgroup_rel, usage_usec);
    let config = dir.join("ergond.toml");
    // ergond takes job events from root and slurm_user only: run by an ordinary user, the tests
    // send them as that user, its SlurmUser.
    let slurm_user = if ergon_testkit::is_root() {
        String::new()
    } else {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .expect("the test's user has a name");
        format!("slurm_user = {:?}\n", me.name)
    };
    std::fs::write(
        &config,
        format!(
            "nvml_library = {}\npowercap_root = {}\nperf_sysfs_root = {}\nsysfs_root = {}\n\
             cgroup_root = {}\nproc_root = {}\nsocket_path = {}\nstate_dir = {}\nspool_dir = {}\n\
             metrics_listen = \"{metrics}\"\n{slurm_user}{extra}",
            toml_str(nvml),
            toml_str(&powercap),
            toml_str(&dir.join("perf")),
            toml_str(&sys),
            toml_str(&cgroup),
            toml_str(&proc_root),
            toml_str(&dir.join("run/ergond.sock")),
            toml_str(&dir.join("state")),
            toml_str(&dir.join("spool")),
        ),
    )
    .unwrap();
    config
}

/// A running `ergond` child, killed on drop, with its log file.
pub struct Ergond {
    pub child: Child,
    pub log: PathBuf,
}

impl Ergond {
    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its resident memory (KiB).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Ergond {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on a fresh connection, one reply, as the plugin does.
pub fn try_request(
    socket: &Path,
    req: &ergon_protocol::Request,
) -> std::io::Result<ergon_protocol::Reply> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    ergon_protocol::write_frame(&mut s, req).map_err(std::io::Error::other)?;
    ergon_protocol::read_frame(&mut s).map_err(std::io::Error::other)
}

/// `/metrics` of the ergond whose config `write_node` wrote into `dir`.
pub fn scrape_metrics(dir: &Path) -> String {
    let config = std::fs::read_to_string(dir.join("ergond.toml")).unwrap();
    let addr = config
        .lines()
        .find_map(|l| l.strip_prefix("metrics_listen = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `/metrics` of the ergond of `dir` once it has a sample whose line starts with `prefix` (a
/// series that begins with a source's first reading); fails with ergond's log after 20 s.
pub fn wait_metrics_with(dir: &Path, prefix: &str, e: &Ergond) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = scrape_metrics(dir);
        if text.lines().any(|l| l.starts_with(prefix)) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {prefix} in /metrics:\n{}",
            e.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The value of the first sample of `name` in an exposition.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Write the node under `dir` (once: a later call restarts ergond on the same node) and start
/// ergond on it, logging to `log_name`; returns when its socket answers.
pub fn start_node(dir: &Path, nvml: &Path, extra: &str, log_name: &str) -> Ergond {
    use std::time::{Duration, Instant};
    let config = dir.join("ergond.toml");
    if !config.exists() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        write_node(
            dir,
            nvml,
            &format!("127.0.0.1:{port}"),
            "system.slice/cron.service",
            0,
            extra,
        );
    }
    let log = dir.join(log_name);
    let file = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ergond"))
        .args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut e = Ergond { child, log };
    let socket = dir.join("run/ergond.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(
        try_request(&socket, &ergon_protocol::Request::Ping),
        Ok(ergon_protocol::Reply::Pong)
    ) {
        if let Some(s) = e.child.try_wait().unwrap() {
            panic!("ergond exited ({s}):\n{}", e.log());
        }
        assert!(Instant::now() < deadline, "no socket:\n{}", e.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    e
}

/// The sealed manifest at `path`, once ergond has written it (15 s at most).
pub fn wait_manifest(path: &Path, e: &Ergond) -> ergon_protocol::Manifest {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(b) = std::fs::read(path) {
            return ergon_protocol::Manifest::from_json(&b).expect("a valid, sealed manifest");
        }
        assert!(
            Instant::now() < deadline,
            "no manifest {}:\n{}",
            path.display(),
            e.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `cmd` with `input` on its standard input; its standard output and error are captured.
pub fn run_with_input(cmd: &mut std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    // A child that exits without reading closes the pipe: what it says tells why.
    let _ = child.stdin.take().expect("piped").write_all(input);
    child.wait_with_output().unwrap()
}
