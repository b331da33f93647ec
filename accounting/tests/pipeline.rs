//! The pipelined run (collection and upload at once): many batches with a job whose node
//! manifests are far apart in the spools, and a run killed between batches.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use ergon_accounting::state::State;

/// The config: two spools, the VictoriaMetrics sink at `port` with `batch_size`.
fn config(s: &Setup, port: u16, batch_size: usize) {
    let text = format!(
        "spool_dirs = [{:?}, {:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\nenabled = false\n\n[retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\nbatch_size = {batch_size}\ntimeout_s = 30\nverify = false\n",
        s.spool(),
        s.dir.path().join("spool2"),
        s.quarantine(),
        s.state()
    );
    std::fs::write(s.config_path(), text).unwrap();
}

fn write_as(dir: &std::path::Path, name: &str, m: &ergon_protocol::manifest::Manifest) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), m.to_json().unwrap()).unwrap();
}

const JOBS: u32 = 2500;
const SPREAD: u32 = 9000;

/// `JOBS` one-node jobs in the first spool (`<job>.n1.json`), and job `SPREAD` on three nodes:
/// its first manifest sorts first in the first spool, its second last, its third is in the
/// second spool.
fn spool(s: &Setup) {
    for job in 1..=JOBS {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    write_as(
        &s.spool(),
        "0000-first.json",
        &manifest("c1", SPREAD, "n1", 100.0, 1.0, 1.0),
    );
    write_as(
        &s.spool(),
        "zzz-last.json",
        &manifest("c1", SPREAD, "n2", 200.0, 2.0, 1.0),
    );
    write_as(
        &s.dir.path().join("spool2"),
        &format!("c1-{SPREAD}-n3.json"),
        &manifest("c1", SPREAD, "n3", 300.0, 3.0, 1.0),
    );
}

#[test]
fn many_batches_deliver_each_job_once_and_a_spread_job_as_one_record() {
    let s = Setup::new();
    spool(&s);
    let (tx, _rx) = mpsc::channel();
    let server = Receiver::start(None, tx);
    config(&s, server.port, 50);

    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let per_job = server.per_job();
    assert_eq!(per_job.len(), JOBS as usize + 1, "every job arrived");
    let not_once: Vec<_> = per_job.iter().filter(|(_, n)| **n != 1).collect();
    assert!(not_once.is_empty(), "not exactly once: {not_once:?}");
    assert!(server.requests() >= 50, "{} requests", server.requests());
    // One record for the three nodes, with all three.
    let state = ergon_accounting::ledger::load_merged(&s.state()).unwrap();
    assert_eq!(state.jobs.len(), JOBS as usize + 1);
    let spread = &state.jobs[&format!("c1/{SPREAD}")];
    assert!(!spread.any_pending());
    let nodes: Vec<&str> = state
        .index
        .values()
        .filter(|e| e.job == format!("c1/{SPREAD}"))
        .map(|e| e.content_hash.as_str())
        .collect();
    assert_eq!(nodes.len(), 3, "the three files are indexed for the job");
    assert!(
        !State::path(&s.state())
            .with_file_name("journal.jsonl")
            .exists(),
        "the final save removes the journal"
    );

    // The next run sends nothing.
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(server.per_job().values().sum::<usize>(), JOBS as usize + 1);
}

#[test]
fn the_spread_job_is_combined_from_its_three_nodes() {
    // The record itself: ergon report reads the job's manifests; the state's record is gone once
    // delivered, so check it while the sink refuses (records stay pending with their bodies).
    let s = Setup::new();
    spool(&s);
    let port = free_port();
    config(&s, port, 50);
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let state = ergon_accounting::ledger::load_merged(&s.state()).unwrap();
    let record = state.jobs[&format!("c1/{SPREAD}")]
        .record
        .as_ref()
        .expect("pending: the record is kept");
    let nodes: Vec<&str> = record.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
    assert_eq!(record.energy_j, 606.0);
    assert_eq!(
        state.pending_for("victoria_metrics").len(),
        JOBS as usize + 1
    );
}

#[test]
fn a_run_killed_between_batches_loses_nothing() {
    let s = Setup::new();
    spool(&s);
    let (tx, rx) = mpsc::channel();
    // The 8th request stalls; the run is killed while it (and maybe another lane's) hangs.
    let server = Receiver::start(Some(8), tx);
    config(&s, server.port, 100);
    let mut child = s
        .ergon()
        .arg("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the run reached the 8th request");
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let before = server.per_job();
    assert!(
        before.len() >= 600,
        "{} jobs delivered before",
        before.len()
    );
    assert!(before.len() < JOBS as usize, "the run was killed early");

    // Write-ahead: everything that reached the sink is in the state (the journal, replayed).
    let state = ergon_accounting::ledger::load_merged(&s.state()).unwrap();
    assert!(state.replayed > 0, "the journal was replayed");
    for job in before.keys() {
        assert!(
            state.jobs.contains_key(&format!("c1/{job}")),
            "job {job} reached the sink but is not in the state"
        );
    }

    // The next run delivers the rest; only the batches in flight at the kill come twice.
    server.release();
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let after = server.per_job();
    assert_eq!(after.len(), JOBS as usize + 1, "nothing lost");
    let twice = after.values().filter(|n| **n > 1).count();
    assert!(
        after.values().all(|n| *n <= 2) && twice <= 4 * 100,
        "{twice} jobs delivered twice (at most the batches in flight)"
    );
    let state = ergon_accounting::ledger::load_merged(&s.state()).unwrap();
    assert_eq!(state.replayed, 0);
    assert!(state.pending_for("victoria_metrics").is_empty());
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(server.per_job(), after, "the run after sends nothing");
}

/// With two requests in flight, a sink that fails fails both: the error is logged once, and the
/// second request gives up instead of retrying on.
#[test]
fn a_failing_sink_is_reported_once_though_two_requests_were_in_flight() {
    let s = Setup::new();
    for job in 1..=200 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    std::fs::create_dir_all(s.dir.path().join("spool2")).unwrap();
    // Nothing listens on the port: every request fails.
    config(&s, free_port(), 10);
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "the error once:\n{stderr}");
    assert!(
        errors[0].contains("victoria_metrics") && errors[0].contains("stay pending"),
        "{stderr}"
    );
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 200);
}

/// Manifests that appear while a run is going on (a new job, and a late node of a job the run
/// has already sent) are not lost: the run goes on with what it listed, and the next run
/// collects the new job and combines the late node with its job (delivered again, new key).
#[test]
fn manifests_that_appear_during_a_run_are_collected_by_the_next() {
    let s = Setup::new();
    std::fs::create_dir_all(s.dir.path().join("spool2")).unwrap();
    for job in 1..=500 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let (tx, rx) = mpsc::channel();
    let server = Receiver::start(Some(3), tx);
    config(&s, server.port, 50);
    let run = s
        .ergon()
        .arg("run")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the run reached the 3rd request");
    // Job 1 was in the first batch: its second node turns up now, and so does job 9001.
    write_manifest(&s.spool(), &manifest("c1", 1, "n2", 1000.0, 1.0, 1.0));
    write_manifest(&s.spool(), &manifest("c1", 9001, "n1", 5.0, 1.0, 1.0));
    server.release();
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let first = server.per_job();
    assert_eq!(first.len(), 500, "the run delivered what it had listed");

    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("collected 1 new and 1 updated jobs"),
        "{}",
        show(&out)
    );
    let after = server.per_job();
    assert_eq!(after.len(), 501);
    assert_eq!(after[&1], 2, "job 1 again, with both nodes");
    assert_eq!(after[&9001], 1);
    let state = ergon_accounting::ledger::load_merged(&s.state()).unwrap();
    assert_eq!(
        state.index.values().filter(|e| e.job == "c1/1").count(),
        2,
        "job 1's two manifests are indexed"
    );
}
