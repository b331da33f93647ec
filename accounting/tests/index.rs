//! The spool index: a run reads only the manifests that are new or changed since the last
//! one; a late node manifest still recombines its job from all of its files; a manifest that
//! changed after it was collected is quarantined; the index stays within the state's bounds;
//! schema 1 manifests are collected next to schema 2 ones.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use ergon_accounting::collect::scan_indexed;
use ergon_accounting::spool::SpoolIndex;
use ergon_accounting::state::State;

/// `(manifests read, manifests known unchanged)` of the last run, from its summary line.
fn read_known(s: &Setup) -> (usize, usize) {
    let line = State::load(&s.state())
        .unwrap()
        .last_run_summary
        .expect("a run has finished");
    let inner = line
        .split_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(i, _)| i.to_owned())
        .unwrap_or_else(|| panic!("no counts in {line:?}"));
    let n: Vec<usize> = inner
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    assert!(inner.contains("manifests read") && n.len() == 2, "{line:?}");
    (n[0], n[1])
}

fn state(s: &Setup) -> State {
    ergon_accounting::ledger::load_merged(&s.state()).unwrap()
}

fn run_ok(s: &Setup) {
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

/// Set a file's modification time.
fn set_mtime(path: &std::path::Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn a_second_run_reads_nothing_it_has_collected() {
    let s = Setup::new();
    s.write_config("");
    let a = write_manifest(&s.spool(), &manifest("c1", 1, "n1", 100.0, 10.0, 1.0));
    write_manifest(&s.spool(), &manifest("c1", 1, "n2", 300.0, 30.0, 0.5));
    write_manifest(&s.spool(), &manifest("c1", 2, "n1", 50.0, 5.0, 1.0));
    run_ok(&s);
    assert_eq!(read_known(&s), (3, 0));
    let st = state(&s);
    assert_eq!(st.index.len(), 3);
    let e = &st.index[a.to_str().unwrap()];
    assert_eq!(e.job, "c1/1");
    assert_eq!(e.size, std::fs::metadata(&a).unwrap().len());
    let m = ergon_protocol::Manifest::from_json(&std::fs::read(&a).unwrap()).unwrap();
    assert_eq!(e.content_hash, m.content_hash);

    run_ok(&s);
    assert_eq!(read_known(&s), (0, 3));
    assert_eq!(state(&s).jobs, st.jobs);

    // Proof that a known file is not read: garbage of the same size and modification time
    // goes unnoticed (and is not quarantined). This is the index's documented blind spot.
    let meta = std::fs::metadata(&a).unwrap();
    std::fs::write(&a, vec![b'x'; meta.len() as usize]).unwrap();
    set_mtime(&a, meta.modified().unwrap());
    run_ok(&s);
    assert_eq!(read_known(&s), (0, 3));
    assert!(a.exists());
}

#[test]
fn a_late_node_manifest_recombines_the_job_from_all_its_files() {
    let s = Setup::new();
    s.write_config("");
    write_manifest(&s.spool(), &manifest("c1", 7, "n1", 100.0, 10.0, 1.0));
    write_manifest(&s.spool(), &manifest("c1", 8, "n1", 1.0, 1.0, 1.0));
    run_ok(&s);
    let before = state(&s).jobs["c1/7"].key.clone();

    // Another node's manifest of job 7 arrives after the job was collected.
    write_manifest(&s.spool(), &manifest("c1", 7, "n2", 300.0, 30.0, 1.0));
    run_ok(&s);
    // The new file, and job 7's known file again to combine them; job 8 is not read.
    assert_eq!(read_known(&s), (2, 1));
    let st = state(&s);
    assert_ne!(
        st.jobs["c1/7"].key, before,
        "the job's key changes with its node set"
    );
    assert_eq!(st.index.len(), 3);
    assert!(st
        .last_run_summary
        .unwrap()
        .contains("collected 0 new and 1 updated jobs"));

    // What the run combined: both nodes (the library's scan with the same index).
    let scan = scan_indexed(
        &[s.spool()],
        None,
        Duration::ZERO,
        &SpoolIndex::new(), // an empty index reads everything, like the first run
    )
    .unwrap();
    let r = ergon_accounting::collect::combine(
        &scan.jobs["c1/7"]
            .iter()
            .map(|f| f.manifest.clone())
            .collect::<Vec<_>>(),
    );
    assert_eq!(r.idempotency_key, st.jobs["c1/7"].key);
    assert_eq!(r.energy_j, 440.0);

    run_ok(&s);
    assert_eq!(read_known(&s), (0, 3));
}

#[test]
fn a_manifest_changed_after_collection_is_quarantined_and_the_record_kept() {
    let s = Setup::new();
    s.write_config("");
    let original = manifest("c1", 3, "n1", 100.0, 10.0, 1.0);
    let path = write_manifest(&s.spool(), &original);
    write_manifest(&s.spool(), &manifest("c1", 4, "n1", 1.0, 1.0, 1.0));
    run_ok(&s);
    let key = state(&s).jobs["c1/3"].key.clone();

    // Rewritten with other, validly sealed content (e.g. a requeued job that ran again on the
    // same node, or an edit resealed by hand).
    let mut changed = original.clone();
    changed.totals.energy_j = 5000.0;
    changed.seal();
    std::fs::write(&path, changed.to_json().unwrap()).unwrap();
    set_mtime(&path, SystemTime::now() - Duration::from_secs(5));

    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(read_known(&s), (1, 1));
    let name = path.file_name().unwrap().to_str().unwrap();
    let reason = std::fs::read_to_string(s.quarantine().join(format!("{name}.reason"))).unwrap();
    assert!(
        reason.contains("changed after it was collected")
            && reason.contains(&original.content_hash)
            && reason.contains(&changed.content_hash),
        "{reason}"
    );
    assert!(!path.exists());
    let st = state(&s);
    assert_eq!(st.jobs["c1/3"].key, key, "the record collected is kept");
    assert!(!st.index.contains_key(path.to_str().unwrap()));
    assert_eq!(st.index.len(), 1);

    // Nothing more to do: the next run is clean.
    run_ok(&s);
    assert_eq!(read_known(&s), (0, 1));
}

#[test]
fn a_manifest_touched_or_copied_back_unchanged_only_refreshes_its_entry() {
    let s = Setup::new();
    s.write_config("");
    let path = write_manifest(&s.spool(), &manifest("c1", 5, "n1", 100.0, 10.0, 1.0));
    run_ok(&s);
    let before = state(&s);

    // Same content, new modification time (touch, or rewritten identically).
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    set_mtime(&path, SystemTime::now() - Duration::from_secs(3));
    run_ok(&s);
    assert_eq!(read_known(&s), (1, 0));
    let after = state(&s);
    assert_eq!(after.jobs, before.jobs, "not collected again");
    let key = path.to_str().unwrap();
    assert_ne!(after.index[key].mtime_ns, before.index[key].mtime_ns);
    assert_eq!(
        after.index[key].content_hash,
        before.index[key].content_hash
    );

    run_ok(&s);
    assert_eq!(read_known(&s), (0, 1));
}

#[test]
fn the_index_only_names_jobs_the_state_keeps() {
    let s = Setup::new();
    s.write_config("[state]\nmax_jobs = 1\n");
    // Job 1 ended before job 2: the size bound removes it (nothing pending: no loss).
    let mut older = manifest("c1", 1, "n1", 100.0, 10.0, 1.0);
    older.end_unix_ns -= 3_600_000_000_000;
    older.start_unix_ns -= 3_600_000_000_000;
    older.seal();
    let old_path = write_manifest(&s.spool(), &older);
    let new_path = write_manifest(&s.spool(), &manifest("c1", 2, "n1", 50.0, 5.0, 1.0));
    run_ok(&s);
    let st = state(&s);
    assert_eq!(st.jobs.keys().collect::<Vec<_>>(), ["c1/2"]);
    assert_eq!(
        st.index.keys().collect::<Vec<_>>(),
        [new_path.to_str().unwrap()]
    );
    assert!(st.index.values().all(|e| st.jobs.contains_key(&e.job)));

    // The removed job's file is still in the spool: read again, skipped by the horizon.
    run_ok(&s);
    assert_eq!(read_known(&s), (1, 1));
    let st = state(&s);
    assert_eq!(st.dropped.skipped_before_horizon, 1);
    assert!(!st.index.contains_key(old_path.to_str().unwrap()));
    assert_eq!(st.jobs.len(), 1);
}

#[test]
fn new_manifests_of_an_unsettled_job_are_not_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let n1 = write_manifest(&spool, &manifest("c1", 9, "n1", 100.0, 10.0, 1.0));
    set_mtime(&n1, SystemTime::now() - Duration::from_secs(3600));
    let first = scan_indexed(
        std::slice::from_ref(&spool),
        None,
        Duration::from_secs(600),
        &SpoolIndex::new(),
    )
    .unwrap();
    assert_eq!((first.jobs.len(), first.unsettled, first.read), (1, 0, 1));
    let index: SpoolIndex = first.index.into_iter().map(|f| (f.path, f.entry)).collect();
    assert_eq!(index.len(), 1);

    // A second node's manifest, just written: the job waits, n1 is not read again, and the
    // new file is not indexed (so that the next scan reads it and collects the job).
    let n2 = write_manifest(&spool, &manifest("c1", 9, "n2", 1.0, 1.0, 1.0));
    let second = scan_indexed(
        std::slice::from_ref(&spool),
        None,
        Duration::from_secs(600),
        &index,
    )
    .unwrap();
    assert!(second.jobs.is_empty());
    assert_eq!((second.unsettled, second.read, second.known), (1, 1, 1));
    let kept: Vec<&str> = second.index.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(kept, [n1.to_str().unwrap()]);

    // Settled: both files are read and the job is combined from both.
    set_mtime(&n2, SystemTime::now() - Duration::from_secs(3600));
    let third = scan_indexed(&[spool], None, Duration::from_secs(600), &index).unwrap();
    assert_eq!((third.unsettled, third.read, third.known), (0, 2, 0));
    assert_eq!(third.jobs["c1/9"].len(), 2);
    assert_eq!(third.index.len(), 2);
}

#[test]
fn a_state_without_an_index_reads_everything_once() {
    let s = Setup::new();
    s.write_config("");
    write_manifest(&s.spool(), &manifest("c1", 1, "n1", 100.0, 10.0, 1.0));
    run_ok(&s);
    // A state written before the index (and the ledger) existed: the delivered job in the
    // state file, no `index` field.
    let mut old = state(&s);
    old.index.clear();
    old.save(&s.state()).unwrap();
    std::fs::remove_file(s.state().join(ergon_accounting::ledger::FILE)).unwrap();
    let path = State::path(&s.state());
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("index").unwrap();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(state(&s).index.is_empty());
    assert_eq!(state(&s).jobs.len(), 1);

    run_ok(&s);
    assert_eq!(read_known(&s), (1, 0));
    let st = state(&s);
    assert!(st
        .last_run_summary
        .unwrap()
        .contains("collected 0 new and 0 updated"));
    assert_eq!(st.index.len(), 1);
}

#[test]
fn schema_1_manifests_are_collected_next_to_schema_2_ones() {
    let s = Setup::new();
    // The fixture's job ended in 2023: keep it within the age bound.
    s.write_config("[state]\nmax_age_days = 36500\n");
    std::fs::write(
        s.spool().join("hpc1-1234-gpu-node-07.json"),
        include_bytes!("../../protocol/tests/fixtures/manifest-v1.json"),
    )
    .unwrap();
    write_manifest(&s.spool(), &manifest("c1", 1, "n1", 100.0, 10.0, 1.0));
    run_ok(&s);
    let st = state(&s);
    assert_eq!(
        st.jobs.keys().collect::<Vec<_>>(),
        ["c1/1", "hpc1/1234"],
        "{:?}",
        st.last_run_summary
    );
    assert!(st.last_run_summary.unwrap().contains("collected 2 new"));
    run_ok(&s);
    assert_eq!(read_known(&s), (0, 2));
}
