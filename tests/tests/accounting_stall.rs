//! `ergon run` against a slurmdbd that hangs (stopped with SIGSTOP: it accepts connections and
//! never answers; sacct and sacctmgr then wait 45 s each before failing). The run must not hold
//! its lock for (pending jobs / 50) × 45 s: each call is cut at `sacct.timeout_s`, and the first
//! failed read stops sacct writing for the run, said once. Its own test binary, so that no other
//! test uses the cluster while slurmdbd is stopped.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use ergon_protocol::testing::ManifestBuilder;
use ergon_protocol::Manifest;
use ergon_tests::{cluster, scratch_dir, target_dir, wait_for, Cluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn ergon(c: &Cluster, config: &Path, args: &[&str]) -> Output {
    let bin = target_dir().join("debug/ergon");
    assert!(bin.exists(), "{} is missing: build it first", bin.display());
    c.cmd(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Job `job`'s manifest: 100 J of CPU over 10 s that just ended.
fn manifest(job: u32) -> Manifest {
    let end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    ManifestBuilder::new("ergon-dev", job, "n1")
        .user("root", 0)
        .ended(end, 10)
        .socket(100.0, None)
        .peak_w(10.0)
        .node_context(100.0, 0.0, 0.0)
        .batch_step()
        .build()
}

/// slurmdbd stopped (SIGSTOP) while the value lives; continued (SIGCONT) when dropped, also when
/// the test fails.
struct Stopped(i32);

impl Stopped {
    fn slurmdbd(c: &Cluster) -> Stopped {
        let pid: i32 = std::fs::read_to_string(c.dir.join("run/slurmdbd.pid"))
            .expect("slurmdbd's pid file")
            .trim()
            .parse()
            .unwrap();
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

fn admin_comment(c: &Cluster, job: u32) -> String {
    c.sacct_field(job, "AdminComment")
        .unwrap()
        .unwrap_or_default()
}

#[test]
fn a_hung_slurmdbd_costs_one_timeout_not_one_per_chunk() {
    let c = cluster();
    let job = c
        .sbatch([
            "--job-name=ergon-stall",
            "--output=/dev/null",
            "--wrap",
            "true",
        ])
        .unwrap();
    c.wait_completed(job).unwrap();
    wait_for(Duration::from_secs(60), "the job's record in sacct", || {
        Ok((c.sacct_field(job, "JobName")?.as_deref() == Some("ergon-stall")).then_some(()))
    })
    .unwrap();

    let dir = scratch_dir("acct-stall").unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    // The real job and 199 that sacct does not know: four chunks of 50.
    let fake: Vec<u32> = (0..199).map(|i| 3_000_000 + i).collect();
    for id in std::iter::once(job).chain(fake.iter().copied()) {
        std::fs::write(
            spool.join(format!("{id}.json")),
            manifest(id).to_json().unwrap(),
        )
        .unwrap();
    }
    let config: PathBuf = dir.path().join("accounting.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dirs = [{spool:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\ntimeout_s = 3\n",
            dir.path().join("quarantine"),
            dir.path().join("state")
        ),
    )
    .unwrap();

    let stopped = Stopped::slurmdbd(c);
    let start = Instant::now();
    let out = ergon(c, &config, &["run"]);
    let took = start.elapsed();
    drop(stopped);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    // One timed-out read (3 s), not four (12 s), let alone four of sacct's own 45 s.
    assert!(
        took < Duration::from_secs(9),
        "the run took {took:?}\n{}",
        show(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "said once:\n{stderr}");
    assert!(
        errors[0].contains("did not answer within 3 s") && errors[0].contains("200 stay pending"),
        "{stderr}"
    );
    let status = ergon(c, &config, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let backlog = status["backlog"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[0] == "sacct")
        .map(|e| e[1].as_u64().unwrap());
    assert_eq!(backlog, Some(200), "{status}");

    // slurmdbd answers again: the next run writes the real job's record (the others stay
    // pending: sacct does not know them).
    let out = ergon(c, &config, &["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(
        admin_comment(c, job).starts_with("ergon1 e=100 "),
        "{}\n{}",
        admin_comment(c, job),
        show(&out)
    );
}
