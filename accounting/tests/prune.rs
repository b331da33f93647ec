//! `ergon prune`: only manifests the state knows as collected and unchanged, of jobs every
//! destination has, that ended long enough ago; a collected job's report still works after.

mod common;

use common::*;

fn old(job: u32, days: u64) -> ergon_protocol::manifest::Manifest {
    ergon_protocol::testing::ManifestBuilder::new("c1", job, "n1")
        .ended(now_ns() - days * 86_400_000_000_000, 100)
        .gpu(Some(f64::from(job)))
        .socket(1.0, None)
        .build()
}

fn prune(s: &Setup, args: &[&str]) -> serde_json::Value {
    let out = s
        .ergon()
        .args(["prune", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn prune_removes_only_what_every_destination_has() {
    let s = Setup::new();
    s.write_config("");
    let delivered = write_manifest(&s.spool(), &old(1, 10));
    let changed = write_manifest(&s.spool(), &old(2, 10));
    let recent = write_manifest(&s.spool(), &old(3, 1));
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // A job whose record the database could not take: pending.
    let bad = s.dir.path().join("not-a-file");
    std::fs::create_dir_all(&bad).unwrap();
    s.write_config(&format!("[records]\npath = {bad:?}\n"));
    let pending = write_manifest(&s.spool(), &old(4, 10));
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    // Not collected yet; and one changed since it was collected.
    let unknown = write_manifest(&s.spool(), &old(5, 10));
    let mut text = std::fs::read(&changed).unwrap();
    text.push(b'\n');
    std::fs::write(&changed, text).unwrap();

    let v = prune(&s, &["--older-than", "7", "--dry-run"]);
    assert_eq!(v["removed"], 1, "{v}");
    for f in [&delivered, &changed, &recent, &pending, &unknown] {
        assert!(f.exists(), "dry run removed {}", f.display());
    }
    let v = prune(&s, &["--older-than", "7"]);
    assert_eq!(
        (
            &v["removed"],
            &v["kept_pending"],
            &v["kept_recent"],
            &v["kept_changed"],
            &v["kept_unknown"]
        ),
        (&1.into(), &1.into(), &1.into(), &1.into(), &1.into()),
        "{v}"
    );
    assert!(!delivered.exists());
    for f in [&changed, &recent, &pending, &unknown] {
        assert!(f.exists(), "{} removed", f.display());
    }
    // With a shorter horizon the recent one goes too.
    let v = prune(&s, &["--older-than", "0"]);
    assert_eq!(v["removed"], 1, "{v}");
    assert!(!recent.exists());

    // The removed jobs are still reported, from the database.
    s.write_config("");
    let out = s.ergon().args(["report", "1", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["source"], "records", "{r}");
    let out = s.run();
    // The changed file's content hash is the same (a newline added): taken as it is.
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "records"), 0);
}
