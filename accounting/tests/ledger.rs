//! The ledger (`<state_dir>/ledger.sqlite`): jobs whose every delivery is done leave the state
//! file for it, with their spool-index entries. The state file stays as small as what is
//! pending; a delivered job's manifests still in the spool are not collected again (across
//! processes, and when the index entries are lost); a late node manifest recombines a delivered
//! job; `ergon prune` looks in the ledger; a crash between the ledger's commit and the state's
//! save loses nothing and sends nothing twice; an old state file migrates; the age bound prunes
//! the ledger; a dry run never creates it.

mod common;

use std::sync::mpsc;

use common::*;
use ergon_accounting::ledger::{self, Ledger};
use ergon_accounting::state::State;

/// The config: the VictoriaMetrics sink (a [`Receiver`] at `port`, one line per job) and the
/// job-records database, plus `extra` TOML.
fn config(s: &Setup, port: u16, extra: &str) {
    s.write_config(&format!(
        "[retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\nbatch_size = 100\ntimeout_s = 30\nverify = false\n\n{extra}"
    ));
}

fn receiver() -> Receiver {
    let (tx, _rx) = mpsc::channel();
    Receiver::start(None, tx)
}

fn run_ok(s: &Setup) -> String {
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The state file alone (what a run loads and rewrites).
fn state_file(s: &Setup) -> State {
    State::load(&s.state()).unwrap()
}

/// Jobs in the ledger.
fn ledger_jobs(s: &Setup) -> u64 {
    Ledger::open_read_only(&s.state())
        .unwrap()
        .counts()
        .unwrap()
        .0
}

fn state_bytes(s: &Setup) -> u64 {
    std::fs::metadata(State::path(&s.state())).unwrap().len()
}

#[test]
fn the_state_file_stays_flat_while_the_ledger_grows() {
    let s = Setup::new();
    let server = receiver();
    config(&s, server.port, "");
    let per_run = 300u32;
    let mut sizes = Vec::new();
    for round in 0..4u32 {
        for job in round * per_run + 1..=(round + 1) * per_run {
            write_manifest(&s.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
        }
        let stderr = run_ok(&s);
        assert!(
            stderr.contains(&format!("collected {per_run} new")),
            "{stderr}"
        );
        let st = state_file(&s);
        assert!(st.jobs.is_empty(), "delivered jobs left the state file");
        assert!(st.index.is_empty(), "and their index entries");
        assert_eq!(ledger_jobs(&s), u64::from((round + 1) * per_run));
        sizes.push(state_bytes(&s));
    }
    // 300 jobs of ~560 bytes each would be 168 kB more per run; the file is the sink status
    // and the run summary, whatever the number of jobs delivered.
    let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(*max < 4096 && max - min < 256, "state.json sizes {sizes:?}");
    // Every job arrived once, and the status counts the ledger's jobs.
    let per_job = server.per_job();
    assert_eq!(per_job.len(), 4 * per_run as usize);
    assert!(per_job.values().all(|n| *n == 1));
    let status = s.status_json();
    assert_eq!(status["jobs"], 4 * per_run, "{status}");
    assert_eq!(status["ledger_jobs"], 4 * per_run, "{status}");
    assert_eq!(backlog(&status, "victoria_metrics"), 0);
}

#[test]
fn a_delivered_job_in_the_spool_is_not_collected_again() {
    let s = Setup::new();
    let server = receiver();
    config(&s, server.port, "");
    for job in 1..=20 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
    }
    run_ok(&s);
    assert_eq!(ledger_jobs(&s), 20);
    assert!(state_file(&s).jobs.is_empty());

    // Another process: the files are known from the ledger's index, not even read.
    let stderr = run_ok(&s);
    assert!(
        stderr.contains("collected 0 new and 0 updated") && stderr.contains("(0 manifests read"),
        "{stderr}"
    );

    // The ledger's index entries lost: every file is read again, and each job is found in the
    // ledger with the same record: not collected, not sent. The entries come back.
    let db = rusqlite::Connection::open(s.state().join(ledger::FILE)).unwrap();
    db.execute("DELETE FROM files", []).unwrap();
    drop(db);
    let stderr = run_ok(&s);
    assert!(
        stderr.contains("collected 0 new and 0 updated") && stderr.contains("(20 manifests read"),
        "{stderr}"
    );
    let stderr = run_ok(&s);
    assert!(stderr.contains("(0 manifests read"), "{stderr}");
    let per_job = server.per_job();
    assert_eq!(per_job.len(), 20);
    assert!(per_job.values().all(|n| *n == 1), "{per_job:?}");
}

#[test]
fn a_late_node_manifest_recombines_a_delivered_job() {
    let s = Setup::new();
    let server = receiver();
    config(&s, server.port, "");
    write_manifest(&s.spool(), &manifest("c1", 7, "n1", 100.0, 1.0, 1.0));
    write_manifest(&s.spool(), &manifest("c1", 7, "n2", 200.0, 2.0, 1.0));
    write_manifest(&s.spool(), &manifest("c1", 8, "n1", 5.0, 1.0, 1.0));
    run_ok(&s);
    let before = ledger::load_merged(&s.state()).unwrap();
    let first_key = before.jobs["c1/7"].key.clone();
    assert!(
        state_file(&s).index.is_empty(),
        "job 7's files are in the ledger"
    );

    // The third node's manifest comes late.
    write_manifest(&s.spool(), &manifest("c1", 7, "n3", 300.0, 3.0, 1.0));
    let stderr = run_ok(&s);
    assert!(
        stderr.contains("collected 0 new and 1 updated") && stderr.contains("(3 manifests read"),
        "{stderr}"
    );
    // Recombined from all three (two of them known from the ledger's index), sent again.
    assert_eq!(server.per_job()[&7], 2);
    assert_eq!(server.per_job()[&8], 1);
    let out = s.ergon().args(["report", "7", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let record = &r["manifests"];
    let nodes: Vec<&str> = record["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
    // The ledger has the new record and the three files; the state file neither.
    let after = ledger::load_merged(&s.state()).unwrap();
    assert_ne!(after.jobs["c1/7"].key, first_key);
    assert_eq!(after.index.values().filter(|e| e.job == "c1/7").count(), 3);
    assert!(state_file(&s).jobs.is_empty());
    let stderr = run_ok(&s);
    assert!(stderr.contains("(0 manifests read"), "{stderr}");
    assert_eq!(server.per_job()[&7], 2);
}

#[test]
fn prune_removes_delivered_manifests_from_the_ledger_and_keeps_pending_ones() {
    let s = Setup::new();
    s.write_config("");
    let old = |job: u32| {
        ergon_protocol::testing::ManifestBuilder::new("c1", job, "n1")
            .ended(now_ns() - 10 * 86_400_000_000_000, 100)
            .gpu(Some(1.0))
            .socket(1.0, None)
            .build()
    };
    let delivered = write_manifest(&s.spool(), &old(1));
    run_ok(&s);
    // A job the records database cannot take: pending, in the state.
    let bad = s.dir.path().join("not-a-file");
    std::fs::create_dir_all(&bad).unwrap();
    s.write_config(&format!("[records]\npath = {bad:?}\n"));
    let pending = write_manifest(&s.spool(), &old(2));
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(
        state_file(&s).jobs.keys().collect::<Vec<_>>(),
        ["c1/2"],
        "only the pending job is in the state file"
    );
    assert_eq!(ledger_jobs(&s), 1);

    let out = s
        .ergon()
        .args(["prune", "--json", "--older-than", "7"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&v["removed"], &v["kept_pending"]),
        (&1.into(), &1.into()),
        "{v}"
    );
    assert!(!delivered.exists());
    assert!(pending.exists());
    // The removed file left the ledger's index too.
    let merged = ledger::load_merged(&s.state()).unwrap();
    assert!(!merged.index.contains_key(delivered.to_str().unwrap()));
    assert!(
        merged.jobs.contains_key("c1/1"),
        "the job stays in the ledger"
    );
}

#[test]
fn a_crash_between_the_ledger_commit_and_the_state_save_loses_nothing() {
    let s = Setup::new();
    let server = receiver();
    config(&s, server.port, "");
    for job in 1..=50 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
    }
    run_ok(&s);
    // What the disk holds after a crash between the ledger's commit and the state's save: the
    // delivered jobs and their index entries in both.
    let mut both = ledger::load_merged(&s.state()).unwrap();
    assert_eq!(both.jobs.len(), 50);
    both.save(&s.state()).unwrap();
    assert_eq!(state_file(&s).jobs.len(), 50);
    assert_eq!(ledger_jobs(&s), 50);
    // And a new job, not yet collected.
    write_manifest(&s.spool(), &manifest("c1", 51, "n1", 10.0, 1.0, 1.0));

    let stderr = run_ok(&s);
    assert!(
        stderr.contains("collected 1 new and 0 updated") && stderr.contains("(1 manifests read"),
        "{stderr}"
    );
    let per_job = server.per_job();
    assert_eq!(per_job.len(), 51);
    assert!(
        per_job.values().all(|n| *n == 1),
        "nothing twice: {per_job:?}"
    );
    assert!(state_file(&s).jobs.is_empty(), "moved again");
    assert_eq!(ledger_jobs(&s), 51);
    assert_eq!(s.status_json()["jobs"], 51);
}

#[test]
fn an_old_state_file_migrates_into_the_ledger() {
    let s = Setup::new();
    let server = receiver();
    config(&s, server.port, "");
    for job in 1..=30 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
    }
    run_ok(&s);
    // A state file written before the ledger existed: every job in it, no ledger.
    let mut old = ledger::load_merged(&s.state()).unwrap();
    old.save(&s.state()).unwrap();
    std::fs::remove_file(s.state().join(ledger::FILE)).unwrap();
    let old_bytes = state_bytes(&s);

    let stderr = run_ok(&s);
    assert!(
        stderr.contains("collected 0 new and 0 updated") && stderr.contains("(0 manifests read"),
        "{stderr}"
    );
    assert_eq!(ledger_jobs(&s), 30);
    assert!(state_file(&s).jobs.is_empty() && state_file(&s).index.is_empty());
    assert!(
        state_bytes(&s) < old_bytes / 4,
        "{} of {old_bytes}",
        state_bytes(&s)
    );
    let stderr = run_ok(&s);
    assert!(stderr.contains("(0 manifests read"), "{stderr}");
    assert!(server.per_job().values().all(|n| *n == 1));
}

#[test]
fn the_age_bound_prunes_the_ledger_and_moves_the_horizon() {
    let s = Setup::new();
    let server = receiver();
    config(&s, server.port, "");
    let ended_days_ago = |job: u32, days: u64| {
        ergon_protocol::testing::ManifestBuilder::new("c1", job, "n1")
            .ended(now_ns() - days * 86_400_000_000_000, 100)
            .gpu(Some(1.0))
            .socket(1.0, None)
            .build()
    };
    write_manifest(&s.spool(), &ended_days_ago(1, 10));
    write_manifest(&s.spool(), &ended_days_ago(2, 1));
    run_ok(&s);
    assert_eq!(ledger_jobs(&s), 2);

    config(&s, server.port, "[state]\nmax_age_days = 5\n");
    run_ok(&s);
    assert_eq!(ledger_jobs(&s), 1, "job 1 ended 10 days ago");
    let merged = ledger::load_merged(&s.state()).unwrap();
    assert!(!merged.jobs.contains_key("c1/1"));
    assert!(merged.index.values().all(|e| e.job == "c1/2"));
    assert!(merged.horizon_unix_ns > 0);
    // Its manifest, still in the spool, is read again and skipped by the horizon: not sent.
    let stderr = run_ok(&s);
    assert!(stderr.contains("collected 0 new and 0 updated"), "{stderr}");
    assert_eq!(s.status_json()["skipped_before_horizon"], 1);
    assert!(server.per_job().values().all(|n| *n == 1));
}

#[test]
fn a_dry_run_and_the_status_never_create_the_ledger() {
    let s = Setup::new();
    let server = receiver();
    config(&s, server.port, "");
    write_manifest(&s.spool(), &manifest("c1", 1, "n1", 10.0, 1.0, 1.0));
    let out = s.ergon().args(["run", "--dry-run"]).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let _ = s.status_json();
    assert!(!s.state().join(ledger::FILE).exists());
    run_ok(&s);
    assert!(s.state().join(ledger::FILE).exists());
    // A dry run after: the delivered job is known (from the ledger), nothing to send.
    let out = s.ergon().args(["run", "--dry-run"]).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("collect: 0 new jobs"), "{stdout}");
    assert!(server.per_job().values().all(|n| *n == 1));
}
