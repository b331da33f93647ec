//! `scripts/bench sacct`: sacct write rates on the real cluster (root, `scripts/slurm-cluster up`,
//! `SLURM_CONF` set as `scripts/slurm-cluster env` prints it).
//!
//! Submits `--jobs` (default 40) `sbatch --wrap true` jobs and waits until sacct lists them all
//! COMPLETED, then writes a record into AdminComment of every job:
//!
//! - **plain**: one `sacctmgr -i modify job where jobid=N set AdminComment=…` per job, one after
//!   another (the baseline); the values are read back afterwards with one `sacct` call (not timed);
//! - **ergon**: ergon's sacct path (`ergon_accounting::sacct::Sacct::write`, what `ergon run`
//!   calls: one `sacct` read of the chunk, `parallel` sacctmgr processes at once, read-back
//!   verification of the chunk) at `parallel` = 1, 4, 8, 16. Each pass writes a new record (the
//!   energy differs), so every job is really written, and is then checked once more with its own
//!   `sacct` read.
//!
//! Prints a table and, with `--json PATH`, appends one JSON object per pass to PATH.
//!
//! ```text
//! bench_sacct [--jobs N] [--parallel 1,4,8,16] [--json PATH]
//! ```

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ergon_accounting::config::SacctConfig;
use ergon_accounting::sacct::{Sacct, SacctJob, SacctOutcome};
use ergon_protocol::record::{find_in_field, JobRecord};
use serde_json::json;

fn main() {
    let mut n = 40usize;
    let mut parallels = vec![1usize, 4, 8, 16];
    let mut json_path: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--jobs" => n = it.next().and_then(|v| v.parse().ok()).expect("--jobs N"),
            "--parallel" => {
                parallels = it
                    .next()
                    .expect("--parallel 1,4,8,16")
                    .split(',')
                    .map(|p| p.parse().expect("a number"))
                    .collect()
            }
            "--json" => json_path = Some(it.next().expect("--json PATH").into()),
            other => panic!("unknown argument {other}"),
        }
    }
    let cluster = cluster_name();
    eprintln!("cluster {cluster}: submitting {n} jobs");
    let jobs: Vec<u32> = (0..n).map(|_| sbatch()).collect();
    wait_completed(&jobs);
    eprintln!("jobs {}..{} completed", jobs[0], jobs[n - 1]);
    let sacct = Sacct::new(SacctConfig::default());
    let mut rows = Vec::new();

    // (a) plain: one sacctmgr per job, one after another.
    let tag = std::process::id();
    let start = Instant::now();
    let mut failures = 0;
    for &job in &jobs {
        let ok = Command::new("sacctmgr")
            .args([
                "-i",
                "modify",
                "job",
                "where",
                &format!("jobid={job}"),
                &format!("cluster={cluster}"),
                "set",
                &format!("AdminComment=bench-plain-{tag}-{job}"),
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        failures += usize::from(!ok);
    }
    let secs = start.elapsed().as_secs_f64();
    let back = sacct.read(Some(&cluster), &jobs).expect("sacct read");
    let verified = jobs
        .iter()
        .filter(|j| back.get(j).map(String::as_str) == Some(&format!("bench-plain-{tag}-{j}")))
        .count();
    let plain_rate = n as f64 / secs;
    rows.push(json!({
        "group": "sacct", "path": "plain sacctmgr, one per job, sequential", "parallel": 1,
        "jobs": n, "seconds": secs, "jobs_per_s": plain_rate, "ratio": 1.0,
        "failed": failures, "verified": verified, "verified_timed": false,
    }));

    // (b) ergon's path.
    for (pass, &parallel) in parallels.iter().enumerate() {
        let writer = Sacct::new(SacctConfig {
            parallel,
            ..SacctConfig::default()
        });
        let list: Vec<SacctJob> = jobs
            .iter()
            .map(|&job| SacctJob {
                cluster: cluster.clone(),
                job_id: job,
                record: record(job, pass),
            })
            .collect();
        let start = Instant::now();
        let mut outcomes = Vec::new();
        for chunk in list.chunks(50) {
            outcomes.extend(
                writer
                    .write(&cluster, chunk, &|| {})
                    .expect("sacct answers"),
            );
        }
        let secs = start.elapsed().as_secs_f64();
        let written = outcomes
            .iter()
            .filter(|o| matches!(o, SacctOutcome::Written { already: false }))
            .count();
        let back = sacct.read(Some(&cluster), &jobs).expect("sacct read");
        let verified = list
            .iter()
            .filter(|j| {
                back.get(&j.job_id)
                    .and_then(|v| find_in_field(v))
                    .is_some_and(|r| r == Ok(j.record.normalized()))
            })
            .count();
        rows.push(json!({
            "group": "sacct", "path": "ergon Sacct::write", "parallel": parallel,
            "jobs": n, "seconds": secs, "jobs_per_s": n as f64 / secs,
            "ratio": n as f64 / secs / plain_rate,
            "failed": n - written, "verified": verified, "verified_timed": true,
        }));
    }

    if let Some(path) = &json_path {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("opening the JSON output");
        for r in &rows {
            writeln!(f, "{r}").unwrap();
        }
    }
    println!();
    println!("| path | parallel | jobs | s | jobs/s | × plain | written | verified |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.1}× | {} | {}{} |",
            r["path"].as_str().unwrap(),
            r["parallel"],
            r["jobs"],
            r["seconds"].as_f64().unwrap(),
            r["jobs_per_s"].as_f64().unwrap(),
            r["ratio"].as_f64().unwrap(),
            n as u64 - r["failed"].as_u64().unwrap(),
            r["verified"],
            if r["verified_timed"] == true {
                " (in the time)"
            } else {
                " (after, untimed)"
            }
        );
    }
}

/// A distinct record per job and pass (ergon's records differ per job).
fn record(job: u32, pass: usize) -> JobRecord {
    let e = 100_000 + u64::from(job) * 10 + pass as u64;
    JobRecord {
        energy_j: e,
        gpu_j: e * 8 / 10,
        cpu_j: e / 10,
        dram_j: e / 20,
        other_j: None,
        avg_w: e as f64 / 600.0,
        peak_w: e as f64 / 400.0,
        gpus: 1 + job % 4,
        nodes: 1,
        coverage: 0.999,
        hash: format!("{:012x}", (u64::from(job) << 8) | pass as u64),
        ..JobRecord::default()
    }
}

fn output(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cluster_name() -> String {
    output("scontrol", &["show", "config"])
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "ClusterName").then(|| v.trim().to_owned())
        })
        .expect("ClusterName in scontrol show config")
}

fn sbatch() -> u32 {
    let text = output(
        "sbatch",
        &[
            "--parsable",
            "--job-name=ergon-bench-sacct",
            "--output=/dev/null",
            "--wrap",
            "true",
        ],
    );
    text.trim()
        .split(';')
        .next()
        .and_then(|id| id.parse().ok())
        .expect("a job id from sbatch --parsable")
}

fn wait_completed(jobs: &[u32]) {
    let ids: Vec<String> = jobs.iter().map(u32::to_string).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = output(
            "sacct",
            &[
                "-n",
                "-P",
                "-X",
                "-j",
                &ids.join(","),
                "-o",
                "JobIDRaw,State",
            ],
        );
        let done = text.lines().filter(|l| l.ends_with("|COMPLETED")).count();
        if done == jobs.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {} jobs COMPLETED after 10 minutes",
            jobs.len()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}
