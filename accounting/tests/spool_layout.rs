//! The sharded spool layout (`<spool>/<YYYY-MM-DD>/<node>/<name>.json.gz`, ergond's
//! `spool_layout = "sharded"`) is read beside the flat one: collection, the spool index,
//! `ergon report`, `ergon plot` and `ergon prune`.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use common::*;

/// `m` gzip-compressed at `<spool>/<day>/<node>/c1-<job>-<node>.json.gz`, as ergond writes it.
fn write_sharded(spool: &Path, day: &str, m: &ergon_protocol::manifest::Manifest) -> PathBuf {
    let dir = spool.join(day).join(&m.node);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-{}-{}.json.gz", m.cluster, m.job.job_id, m.node));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&m.to_json().unwrap()).unwrap();
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    path
}

#[test]
fn sharded_and_flat_manifests_are_read_side_by_side() {
    let s = Setup::new();
    s.write_config("");
    // Job 1 on two nodes: one manifest flat, one sharded. Jobs 2..=20 sharded over two days.
    let n1 = manifest("c1", 1, "n1", 100.0, 1.0, 1.0);
    let n2 = manifest("c1", 1, "n2", 50.0, 1.0, 1.0);
    write_manifest(&s.spool(), &n1);
    let sharded = write_sharded(&s.spool(), "2026-12-05", &n2);
    for job in 2..=20 {
        let day = if job % 2 == 0 {
            "2026-12-05"
        } else {
            "2026-12-06"
        };
        let node = format!("n{}", job % 3);
        write_sharded(&s.spool(), day, &manifest("c1", job, &node, 10.0, 1.0, 1.0));
    }
    // Not a day: not entered. A day directory that is a symbolic link: not followed.
    let other = s.dir.path().join("elsewhere");
    write_sharded(
        &other,
        "2026-12-07",
        &manifest("c1", 99, "n1", 1.0, 1.0, 1.0),
    );
    std::os::unix::fs::symlink(other.join("2026-12-07"), s.spool().join("2026-12-07")).unwrap();
    write_sharded(
        &s.spool().join("not-a-day"),
        "x",
        &manifest("c1", 98, "n1", 1.0, 1.0, 1.0),
    );

    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = show(&out);
    assert!(text.contains("collected 20 new"), "{text}");
    // The index knows them: the next run reads none.
    let out = s.run();
    assert!(
        show(&out).contains("0 manifests read, 21 known unchanged"),
        "{}",
        show(&out)
    );

    // report and plot of the two-node job find both manifests.
    std::fs::remove_file(s.state().join("records.sqlite")).unwrap();
    let out = s.ergon().args(["report", "1", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["source"], "spool", "{v}");
    assert_eq!(v["manifests"]["nodes"].as_array().unwrap().len(), 2, "{v}");
    let svg = s.dir.path().join("p.svg");
    let out = s
        .ergon()
        .args(["plot", "1", "-o"])
        .arg(&svg)
        .output()
        .unwrap();
    // No trace in these manifests: plot says so, having found both files.
    assert!(!show(&out).contains("no manifests"), "{}", show(&out));

    // prune removes sharded files too (the records are delivered; --older-than 0).
    let out = s
        .ergon()
        .args(["prune", "--older-than", "0", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["removed"], 21, "{v}");
    assert!(!sharded.exists());
}

/// A compressed file that is not gzip, or not a manifest, is quarantined with its reason like a
/// bad flat one.
#[test]
fn a_bad_compressed_manifest_is_quarantined() {
    let s = Setup::new();
    s.write_config("");
    let dir = s.spool().join("2026-12-05").join("n1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c1-7-n1.json.gz"), b"not gzip at all").unwrap();
    write_sharded(
        &s.spool(),
        "2026-12-05",
        &manifest("c1", 8, "n1", 1.0, 1.0, 1.0),
    );
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let reason = std::fs::read_to_string(s.quarantine().join("c1-7-n1.json.gz.reason")).unwrap();
    assert!(!reason.is_empty());
    assert_eq!(backlog(&s.status_json(), "records"), 0);
}

/// Set a directory's modification time (what sealing compares).
fn age_dir(dir: &Path, by: std::time::Duration) {
    let t = std::time::SystemTime::now() - by;
    std::fs::File::open(dir).unwrap().set_modified(t).unwrap();
}

/// The counts of the last run's summary line, by the words that follow each number.
fn last_line(s: &Setup) -> String {
    ergon_accounting::state::State::load(&s.state())
        .unwrap()
        .last_run_summary
        .expect("a run has finished")
}

fn sealed_rows(s: &Setup) -> Vec<String> {
    let db = rusqlite::Connection::open(s.state().join("ledger.sqlite")).unwrap();
    let mut stmt = db
        .prepare("SELECT path FROM sealed_dirs ORDER BY path")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A node directory whose manifests are all delivered, and that has not changed for ten
/// minutes, is sealed: later runs do not list it until its modification time changes. A job
/// combined again because of a late node manifest still gets its files from sealed
/// directories; `--rescan` lists everything; the seal of a removed directory is forgotten.
#[test]
fn sealed_node_directories_are_not_listed_and_late_nodes_still_combine() {
    let s = Setup::new();
    s.write_config("");
    let day = "2026-12-05";
    let old = std::time::Duration::from_secs(3600);
    // Jobs 1..=4 on n1 and n2; job 1 spans both nodes.
    for job in 1..=4 {
        write_sharded(
            &s.spool(),
            day,
            &manifest("c1", job, "n1", 100.0, 10.0, 1.0),
        );
    }
    write_sharded(&s.spool(), day, &manifest("c1", 1, "n2", 300.0, 30.0, 1.0));
    write_sharded(&s.spool(), day, &manifest("c1", 5, "n2", 5.0, 1.0, 1.0));
    let (n1, n2) = (
        s.spool().join(day).join("n1"),
        s.spool().join(day).join("n2"),
    );
    // A directory still being written into (changed a moment ago) is never sealed.
    write_sharded(&s.spool(), day, &manifest("c1", 6, "n3", 5.0, 1.0, 1.0));
    age_dir(&n1, old);
    age_dir(&n2, old);

    run_ok(&s);
    assert!(
        last_line(&s).contains("collected 6 new"),
        "{}",
        last_line(&s)
    );
    assert!(
        last_line(&s).contains("2 directories sealed"),
        "{}",
        last_line(&s)
    );
    assert_eq!(
        sealed_rows(&s),
        vec![n1.to_str().unwrap(), n2.to_str().unwrap()]
    );

    // Nothing new: the sealed directories are not listed, the young one is (its file known).
    run_ok(&s);
    let line = last_line(&s);
    assert!(
        line.contains(
            "0 manifests read, 1 known unchanged), 6 manifests in 2 sealed directories not listed"
        ),
        "{line}"
    );

    // A late node manifest of job 1 (whose other files are in sealed n1 and n2): the job is
    // combined again from all three, and the record says so.
    let before = ergon_accounting::ledger::load_merged(&s.state())
        .unwrap()
        .jobs["c1/1"]
        .key
        .clone();
    write_sharded(&s.spool(), day, &manifest("c1", 1, "n4", 50.0, 5.0, 1.0));
    run_ok(&s);
    let line = last_line(&s);
    assert!(
        line.contains("collected 0 new and 1 updated jobs"),
        "{line}"
    );
    let st = ergon_accounting::ledger::load_merged(&s.state()).unwrap();
    assert_ne!(st.jobs["c1/1"].key, before);
    let all =
        ergon_accounting::collect::scan(&[s.spool()], None, std::time::Duration::ZERO).unwrap();
    assert_eq!(all.jobs["c1/1"].len(), 3, "the job has three manifests");
    let r = ergon_accounting::collect::combine(
        &all.jobs["c1/1"]
            .iter()
            .map(|f| f.manifest.clone())
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        r.idempotency_key, st.jobs["c1/1"].key,
        "the run combined the job from all its manifests, those in sealed directories too"
    );
    assert_eq!(r.energy_j, 100.0 + 10.0 + 300.0 + 30.0 + 50.0 + 5.0);
    // The sealed directories stayed sealed (unchanged), and were not listed.
    assert!(
        line.contains("in 2 sealed directories not listed"),
        "{line}"
    );

    // A new file in a sealed directory changes its modification time: it is listed again.
    write_sharded(&s.spool(), day, &manifest("c1", 7, "n2", 5.0, 1.0, 1.0));
    run_ok(&s);
    let line = last_line(&s);
    assert!(line.contains("collected 1 new"), "{line}");
    assert!(
        line.contains("manifests in 1 sealed directories not listed"),
        "{line}"
    );

    // --rescan lists every directory.
    let out = s.ergon().args(["run", "--rescan"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let line = last_line(&s);
    assert!(
        line.contains("0 manifests read, 9 known unchanged"),
        "{line}"
    );
    assert!(!line.contains("not listed"), "{line}");

    // A sealed directory removed (ergon prune, an admin): its seal goes.
    std::fs::remove_dir_all(&n1).unwrap();
    run_ok(&s);
    assert!(!sealed_rows(&s).contains(&n1.to_str().unwrap().to_owned()));
}

/// A node directory whose manifests are of jobs that ended before the horizon (their entries
/// removed by `max_age_days`, the files still in the spool), alone or beside delivered ones, is
/// sealed too: without it every run would read those files again only to skip them.
#[test]
fn directories_of_jobs_before_the_horizon_are_sealed_too() {
    let s = Setup::new();
    s.write_config("");
    let day = "2026-12-05";
    let ended_days_ago = |job: u32, node: &str, days: u64| {
        ergon_protocol::testing::ManifestBuilder::new("c1", job, node)
            .ended(now_ns() - days * 86_400_000_000_000, 100)
            .gpu(Some(1.0))
            .socket(1.0, None)
            .build()
    };
    // n1: a job of ten days ago beside a recent one; n2: only a job of ten days ago.
    write_sharded(&s.spool(), day, &ended_days_ago(1, "n1", 10));
    write_sharded(&s.spool(), day, &manifest("c1", 2, "n1", 10.0, 1.0, 1.0));
    write_sharded(&s.spool(), day, &ended_days_ago(3, "n2", 10));
    let (n1, n2) = (
        s.spool().join(day).join("n1"),
        s.spool().join(day).join("n2"),
    );
    // Collected while the directories are young: nothing sealed yet.
    run_ok(&s);
    let line = last_line(&s);
    assert!(line.contains("collected 3 new"), "{line}");
    assert!(sealed_rows(&s).is_empty(), "{:?}", sealed_rows(&s));

    // The age bound removes jobs 1 and 3 (delivered: nothing lost) and moves the horizon; the
    // directories are now old enough. Their files are read and skipped before the horizon,
    // and both directories are sealed.
    s.write_config("[state]\nmax_age_days = 5\n");
    let old = std::time::Duration::from_secs(3600);
    age_dir(&n1, old);
    age_dir(&n2, old);
    run_ok(&s);
    let line = last_line(&s);
    assert!(line.contains("2 before horizon"), "{line}");
    assert!(line.contains("2 directories sealed"), "{line}");
    assert_eq!(
        sealed_rows(&s),
        vec![n1.to_str().unwrap(), n2.to_str().unwrap()]
    );

    // The next run lists neither directory and reads nothing.
    run_ok(&s);
    let line = last_line(&s);
    assert!(
        line.contains(
            "(0 manifests read, 0 known unchanged), 3 manifests in 2 sealed directories not listed"
        ),
        "{line}"
    );
    assert!(line.contains("0 before horizon"), "{line}");
    assert_eq!(s.status_json()["skipped_before_horizon"], 0);

    // A new manifest in n2 unseals it: read with the old one, which is skipped again.
    write_sharded(&s.spool(), day, &manifest("c1", 4, "n2", 10.0, 1.0, 1.0));
    run_ok(&s);
    let line = last_line(&s);
    assert!(line.contains("collected 1 new"), "{line}");
    assert!(line.contains("1 before horizon"), "{line}");
    assert!(
        line.contains("2 manifests in 1 sealed directories not listed"),
        "{line}"
    );
}

fn run_ok(s: &Setup) {
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}
