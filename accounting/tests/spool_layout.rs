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
