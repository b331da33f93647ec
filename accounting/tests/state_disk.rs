//! The state directory on a disk that fills up during a run, or turns read-only: the run fails
//! (exit 1) with a message that says what to do, the state on disk stays loadable and holds
//! every record the sink got (the write-ahead held), and once there is space again the next run
//! delivers everything. The disk is a small tmpfs mounted for the test: run as root (as
//! scripts/test does), or the tests say they were skipped.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;

fn config(s: &Setup, port: u16) {
    s.write_config(&format!(
        "[retry]\nmax_attempts = 2\ninitial_backoff_ms = 20\nmax_backoff_ms = 40\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\nbatch_size = 100\ntimeout_s = 30\nverify = false\n"
    ));
}

#[test]
fn a_state_disk_that_fills_up_mid_run_loses_nothing() {
    if !ergon_testkit::needs_root(
        "a_state_disk_that_fills_up_mid_run_loses_nothing",
        "mount a tmpfs",
    ) {
        return;
    }
    const JOBS: u32 = 2500;
    let s = Setup::new();
    let disk = ergon_testkit::Tmpfs::mount(&s.state(), "16m");
    for job in 1..=JOBS {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let (tx, rx) = mpsc::channel();
    // The 6th request stalls: by then the first chunk is journalled and partly delivered.
    let server = Receiver::start(Some(6), tx);
    config(&s, server.port);
    let run = s
        .ergon()
        .arg("run")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the run reached the 6th request");
    let filler = disk.fill();
    server.release();
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("No space left on device") && stderr.contains("free space there"),
        "{stderr}"
    );
    assert!(
        !s.state().join(".state.json.tmp").exists(),
        "a part-written state file was left behind"
    );

    // What the sink got is in the state on disk (replayed from its journal).
    let got = server.per_job();
    assert!(!got.is_empty());
    let state = ergon_accounting::ledger::load_merged(&s.state()).unwrap();
    for job in got.keys() {
        assert!(
            state.jobs.contains_key(&format!("c1/{job}")),
            "job {job} reached the sink but is not in the state"
        );
    }

    // Space again: the next run delivers the rest.
    std::fs::remove_file(filler).unwrap();
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let per_job = server.per_job();
    assert_eq!(per_job.len(), JOBS as usize, "every job delivered");
    // Only records whose delivery could not be recorded are sent twice (VictoriaMetrics with
    // `verify` would find them there and not send them again).
    assert!(per_job.values().all(|n| *n <= 2), "{per_job:?}");
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 0);
    let before = server.requests();
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(server.requests(), before, "the run after sends nothing");
}

#[test]
fn a_read_only_state_disk_stops_the_run_before_anything_is_sent() {
    if !ergon_testkit::needs_root(
        "a_read_only_state_disk_stops_the_run_before_anything_is_sent",
        "mount a tmpfs",
    ) {
        return;
    }
    let s = Setup::new();
    let disk = ergon_testkit::Tmpfs::mount(&s.state(), "4m");
    for job in 1..=10 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let (tx, _rx) = mpsc::channel();
    let server = Receiver::start(None, tx);
    config(&s, server.port);
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for job in 11..=20 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    disk.remount("ro");
    let out = s.run();
    disk.remount("rw");
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Read-only file system") && stderr.contains("remount it read-write"),
        "{stderr}"
    );
    assert_eq!(server.per_job().len(), 10, "nothing sent while read-only");
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let per_job = server.per_job();
    assert_eq!(per_job.len(), 20);
    assert!(per_job.values().all(|n| *n == 1), "{per_job:?}");
}
