//! A real Prometheus (the Debian package, 2.42) for ergond's service tests: started privately,
//! scraping one ergond every second, asked through its HTTP API; and a child process killed when
//! dropped, polls against deadlines.

use serde_json::Value;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use ergon_testkit::dashboards::http_get;

/// The whole test must finish within this.
pub const TEST_BUDGET: Duration = Duration::from_secs(55);
pub const POLL: Duration = Duration::from_millis(100);

/// The Prometheus binary: `$ERGON_PROMETHEUS` or the Debian package's.
pub fn prometheus_bin() -> PathBuf {
    let p = std::env::var_os("ERGON_PROMETHEUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"));
    assert!(
        p.exists(),
        "{} is missing: install the Debian package `prometheus` (`scripts/slurm-cluster install` \
         does, and scripts/test runs it first) or set ERGON_PROMETHEUS to a prometheus binary",
        p.display()
    );
    p
}

/// A child process killed (and reaped) when dropped; its stderr goes to a file shown on failure.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { name, child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test with the process's log if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited early ({status}); its output:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// Waits for the process to exit by itself before `deadline`.
    pub fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An instant query's result vector (`[]` while Prometheus is not ready or has no data).
pub fn query(prom: SocketAddr, promql: &str) -> Vec<Value> {
    match http_get(
        prom,
        &format!(
            "/api/v1/query?query={}",
            ergon_testkit::dashboards::url_encode(promql)
        ),
    ) {
        Ok((200, body)) => {
            let v: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("Prometheus answered {body:?}: {e}"));
            assert_eq!(v["status"], "success", "{v}");
            v["data"]["result"].as_array().cloned().unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// The value of a vector element and one of its labels.
pub fn value_of(r: &Value) -> f64 {
    r["value"][1].as_str().unwrap().parse().unwrap()
}

pub fn label<'a>(r: &'a Value, name: &str) -> &'a str {
    r["metric"][name].as_str().unwrap_or("")
}

/// Polls `cond` until it returns `Some`, failing with `what` (and the processes' logs) at the
/// deadline.
pub fn wait_for<T>(
    what: &str,
    deadline: Instant,
    procs: &mut [&mut Proc],
    mut cond: impl FnMut() -> Option<T>,
) -> T {
    loop {
        if let Some(v) = cond() {
            return v;
        }
        for p in procs.iter_mut() {
            p.assert_running();
        }
        if Instant::now() >= deadline {
            let logs: String = procs
                .iter()
                .map(|p| format!("--- {} ---\n{}\n", p.name, p.log()))
                .collect();
            panic!("timed out waiting for {what}\n{logs}");
        }
        std::thread::sleep(POLL);
    }
}

/// The reference parser and linter find nothing to say about `body` (promtool ships with the
/// package: exit 3 would be a lint remark, 1 a parse error).
pub fn promtool_finds_nothing(prometheus: &Path, body: &str) {
    let promtool = prometheus.with_file_name("promtool");
    if promtool.exists() {
        let out = super::run_with_input(
            Command::new(&promtool).args(["check", "metrics"]),
            body.as_bytes(),
        );
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics ({}): {said}",
            out.status
        );
    } else {
        ergon_testkit::missing(
            "promtool check metrics",
            &format!("{} not found", promtool.display()),
        );
    }
}

/// A private Prometheus scraping `target` every second, its data under `dir`.
pub fn start_prometheus(prometheus: &Path, dir: &Path, target: SocketAddr) -> (Proc, SocketAddr) {
    let prom: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let prom_config = dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: ergond\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let proc = Proc::spawn(
        "prometheus",
        Command::new(prometheus).args([
            format!("--config.file={}", prom_config.display()),
            format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            format!("--web.listen-address={prom}"),
            "--log.level=warn".to_string(),
        ]),
        dir.join("prometheus.log"),
    );
    (proc, prom)
}
