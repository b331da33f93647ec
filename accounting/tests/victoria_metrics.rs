//! Upload to a real VictoriaMetrics (`/usr/bin/victoria-metrics`, Debian's package), stopped
//! during a run and restarted: every record present exactly once.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const VM: &str = "/usr/bin/victoria-metrics";

struct Vm {
    child: Child,
    port: u16,
}

impl Vm {
    fn start(port: u16, data: &Path) -> Vm {
        let child = Command::new(VM)
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", data.display()))
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("victoria-metrics is installed (scripts/slurm-cluster installs it)");
        let vm = Vm { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if get(&format!("http://127.0.0.1:{port}/health")).is_some() {
                return vm;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("victoria-metrics did not become healthy on port {port}");
    }

    /// Graceful stop (SIGTERM): in-flight requests finish, data is flushed.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap();
    }

    /// Samples per job id of `ergon_job_energy_j`.
    fn samples_per_job(&self) -> BTreeMap<String, usize> {
        get(&format!(
            "http://127.0.0.1:{}/internal/force_flush",
            self.port
        ));
        let text = get(&format!(
            "http://127.0.0.1:{}/api/v1/export?match[]=ergon_job_energy_j",
            self.port
        ))
        .unwrap();
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let job = v["metric"]["job_id"].as_str().unwrap().to_string();
            *out.entry(job).or_insert(0) += v["values"].as_array().unwrap().len();
        }
        out
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> Option<String> {
    let r = reqwest::blocking::get(url).ok()?;
    r.status().is_success().then(|| r.text().unwrap())
}

#[test]
fn records_arrive_exactly_once_across_a_stop_and_restart() {
    assert!(
        Path::new(VM).exists(),
        "{VM} is missing: run scripts/slurm-cluster up (it installs victoria-metrics)"
    );
    let s = Setup::new();
    let data = s.dir.path().join("vm-data");
    let port = free_port();
    s.write_config(&format!(
        "[retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nbatch_size = 1\ntimeout_s = 5\n"
    ));
    for job in 1..=1000 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let vm = Vm::start(port, &data);

    // Stop VictoriaMetrics while the run is uploading (one record per request).
    let run = s.ergon().arg("run").stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.samples_per_job().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.stop();
    let out = run.wait_with_output().unwrap();
    let pending = backlog(&s.status_json(), "victoria_metrics");
    assert!(
        out.status.code() == Some(3) && pending > 0,
        "the run should have left records pending: {} pending, {}",
        pending,
        show(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("victoria_metrics"), "{stderr}");

    // While it is down, a run retries and keeps everything pending.
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), pending);

    let vm = Vm::start(port, &data);
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 0);
    // And once more: nothing is sent again.
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    let per_job = vm.samples_per_job();
    assert_eq!(per_job.len(), 1000, "every job present");
    let doubled: Vec<_> = per_job.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        doubled.is_empty(),
        "jobs not present exactly once: {doubled:?}"
    );
    vm.stop();
}
