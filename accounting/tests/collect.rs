//! Collection: bad manifests are quarantined with their reasons, good ones are combined per job.

mod common;

use common::*;
use ergon_accounting::collect::combine;

#[test]
fn bad_manifests_are_quarantined_with_reasons_and_good_ones_go_on() {
    let s = Setup::new();
    s.write_config("");
    // Job 1 on two nodes, job 2 on one: good.
    write_manifest(&s.spool(), &manifest("c1", 1, "n1", 100.0, 10.0, 1.0));
    write_manifest(&s.spool(), &manifest("c1", 1, "n2", 300.0, 30.0, 0.5));
    write_manifest(&s.spool(), &manifest("c1", 2, "n1", 50.0, 5.0, 1.0));
    // Corrupt JSON, truncated, another schema version, modified after sealing.
    std::fs::write(s.spool().join("corrupt.json"), b"{ not json at all").unwrap();
    let good = manifest("c1", 3, "n1", 1.0, 1.0, 1.0).to_json().unwrap();
    std::fs::write(s.spool().join("truncated.json"), &good[..good.len() / 2]).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["schema_version"] = 99.into();
    std::fs::write(
        s.spool().join("version.json"),
        serde_json::to_vec(&v).unwrap(),
    )
    .unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["totals"]["energy_j"] = 12345.0.into();
    std::fs::write(
        s.spool().join("tampered.json"),
        serde_json::to_vec(&v).unwrap(),
    )
    .unwrap();

    let out = s.run();
    // Quarantining makes the run "not everything went through".
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));

    let reason = |name: &str| {
        std::fs::read_to_string(s.quarantine().join(format!("{name}.reason")))
            .unwrap_or_else(|e| panic!("no reason for {name}: {e}"))
    };
    assert!(reason("corrupt.json").contains("not valid JSON"));
    assert!(reason("truncated.json").contains("not valid JSON"));
    assert!(reason("version.json").contains("schema version 99"));
    assert!(reason("tampered.json").contains("hash mismatch"));
    for name in ["corrupt", "truncated", "version", "tampered"] {
        assert!(s.quarantine().join(format!("{name}.json")).exists());
        assert!(!s.spool().join(format!("{name}.json")).exists());
    }
    let status = s.status_json();
    assert_eq!(status["quarantined"], 4);
    assert_eq!(status["jobs"], 2, "{status}");

    // A second run finds nothing new and nothing bad.
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(s.status_json()["jobs"], 2);
}

#[test]
fn nodes_are_combined_into_one_record() {
    let a = manifest("c1", 7, "n2", 300.0, 30.0, 0.5);
    let b = manifest("c1", 7, "n1", 100.0, 10.0, 1.0);
    let r = combine(&[a.clone(), b.clone()]);
    assert_eq!(r, combine(&[b.clone(), a.clone()]), "order must not matter");
    assert_eq!(r.energy_j, 440.0);
    assert_eq!(r.gpu_j, Some(400.0));
    assert_eq!(r.cpu_j, Some(40.0));
    assert_eq!(r.dram_j, None);
    assert_eq!(r.nodes.len(), 2);
    assert_eq!(r.nodes[0].node, "n1");
    assert_eq!(r.gpus.len(), 2);
    assert_eq!(r.coverage_min, 0.5);
    // Energy-weighted: (110 * 1.0 + 330 * 0.5) / 440.
    assert!((r.coverage_weighted - 0.625).abs() < 1e-12);
    assert!(r.idempotency_key.starts_with("c1/7/"));
    let rec = r.sacct_record();
    assert_eq!((rec.energy_j, rec.gpus, rec.nodes), (440, 2, 2));
    assert_eq!(rec.coverage, 0.5);
    // A different set of manifests gives a different key.
    let c = manifest("c1", 7, "n3", 1.0, 1.0, 1.0);
    assert_ne!(combine(&[a, b, c]).idempotency_key, r.idempotency_key);
}

#[test]
fn dry_run_changes_nothing() {
    let s = Setup::new();
    s.write_config("");
    write_manifest(&s.spool(), &manifest("c1", 1, "n1", 100.0, 10.0, 1.0));
    std::fs::write(s.spool().join("corrupt.json"), b"{").unwrap();
    let out = s.ergon().args(["run", "--dry-run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 new jobs"), "{text}");
    assert!(text.contains("1 bad manifests"), "{text}");
    assert!(s.spool().join("corrupt.json").exists());
    assert!(!s.quarantine().exists());
    assert!(!s.state().exists());
}

#[test]
fn records_beyond_the_age_bound_are_dropped_counted_and_not_collected_again() {
    let s = Setup::new();
    // A sink that cannot be reached keeps the record pending.
    let port = free_port();
    s.write_config(&format!(
        "[state]\nmax_age_days = 1\n\n[retry]\nmax_attempts = 1\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\n"
    ));
    let mut old = manifest("c1", 1, "n1", 100.0, 10.0, 1.0);
    old.end_unix_ns -= 3 * 86_400 * 1_000_000_000;
    old.start_unix_ns -= 3 * 86_400 * 1_000_000_000;
    old.seal();
    write_manifest(&s.spool(), &old);
    write_manifest(&s.spool(), &manifest("c1", 2, "n1", 100.0, 10.0, 1.0));

    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let status = s.status_json();
    assert_eq!(status["dropped_by_age"], 1, "{status}");
    assert_eq!(status["jobs"], 1);
    assert_eq!(backlog(&status, "victoria_metrics"), 1);

    // The old job's manifest is still in the spool; it is not collected (or dropped) again.
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let status = s.status_json();
    assert_eq!(status["dropped_by_age"], 1, "{status}");
    assert_eq!(status["skipped_before_horizon"], 1, "{status}");
    assert_eq!(status["jobs"], 1);
}

#[test]
fn a_manifest_seen_in_two_spools_counts_once() {
    use ergon_accounting::collect::scan;
    let dir = tempfile::tempdir().unwrap();
    let (local, shared) = (dir.path().join("local"), dir.path().join("shared"));
    std::fs::create_dir_all(&local).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    let a = manifest("c1", 9, "n1", 100.0, 10.0, 1.0);
    write_manifest(&local, &a);
    write_manifest(&shared, &a);
    // A second, different manifest of the same node (rewritten, more complete) wins over a
    // partial one, whatever the order the spools are read in.
    let partial = manifest("c1", 9, "n2", 5.0, 1.0, 0.2);
    let full = manifest("c1", 9, "n2", 50.0, 5.0, 1.0);
    write_manifest(&local, &partial);
    let p = write_manifest(&shared, &full);
    std::fs::rename(&p, shared.join("c1-9-n2.copy.json")).unwrap();
    let s = scan(&[local, shared], None, std::time::Duration::ZERO).unwrap();
    let found = &s.jobs["c1/9"];
    assert_eq!(found.len(), 2, "one manifest per node");
    let ms: Vec<_> = found.iter().map(|f| f.manifest.clone()).collect();
    let r = combine(&ms);
    assert_eq!(r.energy_j, 110.0 + 55.0);
}

#[test]
fn report_names_a_broken_manifest_of_the_job_and_counts_a_duplicate_once() {
    let s = Setup::new();
    s.write_config("");
    let a = manifest("c1", 5, "n1", 100.0, 10.0, 1.0);
    write_manifest(&s.spool(), &a);
    let copy = s.dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    write_manifest(&copy, &a);
    std::fs::write(
        s.spool().join("c1-5-n2.json"),
        b"{\"schema_version\": 1, trunc",
    )
    .unwrap();
    std::fs::write(s.spool().join("c1-6-n2.json"), b"not ours").unwrap();
    let cfg = format!(
        "spool_dirs = [{:?}, {:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\nenabled = false\n",
        s.spool(),
        copy,
        s.quarantine(),
        s.state()
    );
    std::fs::write(s.config_path(), cfg).unwrap();
    let out = s.ergon().args(["report", "5", "--json"]).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("c1-5-n2.json") && text.contains("not a valid manifest"),
        "{text}"
    );
    assert!(!text.contains("c1-6-n2.json"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["manifests"]["energy_j"].as_f64(), Some(110.0), "{v}");
    assert_eq!(v["manifest_problems"].as_array().unwrap().len(), 1, "{v}");
}

/// A job on a MIG instance (manifest schema 3) is collected like any other, its GPU keeps the
/// instance, and `ergon report` names it.
#[test]
fn a_mig_share_is_collected_and_reported_with_its_instance() {
    let s = Setup::new();
    s.write_config("");
    let mut m = manifest("c1", 7, "n1", 100.0, 10.0, 1.0);
    m.gpus[0].shared = true;
    m.gpus[0].mig = Some(ergon_protocol::GpuMig {
        total_slices: 7,
        instances: vec![ergon_protocol::MigInstanceRef {
            gpu_instance_id: 2,
            compute_instance_id: Some(0),
            slices: Some(3),
            uuid: Some("MIG-2".into()),
        }],
        share_method: ergon_protocol::MigShareMethod::SliceSize,
    });
    m.schema_version = m.schema_version_for();
    m.seal();
    assert_eq!(
        m.schema_version,
        ergon_protocol::MANIFEST_SCHEMA_VERSION_MIG
    );
    write_manifest(&s.spool(), &m);
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = s.ergon().args(["report", "7"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("MIG GI 2 (3 of 7 slices), estimated by slice size"),
        "{text}"
    );
    let out = s.ergon().args(["report", "7", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpu = &v["manifests"]["gpus"][0];
    assert_eq!(gpu["mig"]["instances"][0]["gpu_instance_id"], 2, "{v}");
}

/// Schema 4: per-component coverage is combined time-weighted over the nodes, a node whose GPUs
/// are unknown is named (and its GPU coverage is 0), estimates and their bounds are summed, and
/// the sacct record carries all of it.
#[test]
fn schema_4_coverage_unknown_gpus_and_estimates_are_combined_and_recorded() {
    use ergon_protocol::manifest::ComponentCoverage;
    let n1 = manifest_v4(
        "c1",
        7,
        "n1",
        10.0,
        V4 {
            components: Some(ComponentCoverage {
                gpu: Some(1.0),
                cpu: Some(0.8),
                dram: None,
            }),
            estimate: Some((50.0, 5.0)),
            sluid: Some("S2GXM9475CEH00".into()),
            duration_s: Some(100),
            ..V4::default()
        },
    );
    let n2 = manifest_v4(
        "c1",
        7,
        "n2",
        20.0,
        V4 {
            components: Some(ComponentCoverage {
                gpu: Some(0.0),
                cpu: Some(1.0),
                dram: None,
            }),
            gpus_unknown: Some("the plugin sent no GPU minors and NVML has 4 GPUs".into()),
            estimate: Some((10.0, 2.5)),
            sluid: Some("S2GXM9475CEH00".into()),
            duration_s: Some(300),
        },
    );
    let r = combine(&[n2.clone(), n1.clone()]);
    let c = r.coverage_components.expect("stated by the manifests");
    // Time-weighted: gpu (100 × 1 + 300 × 0) / 400, cpu (100 × 0.8 + 300 × 1) / 400.
    assert!((c.gpu.unwrap() - 0.25).abs() < 1e-12, "{c:?}");
    assert!((c.cpu.unwrap() - 0.95).abs() < 1e-12, "{c:?}");
    assert_eq!(c.dram, None);
    assert_eq!(r.gpus_unknown.len(), 1);
    assert_eq!(r.gpus_unknown[0].node, "n2");
    assert!(r.gpus_unknown[0].reason.contains("no GPU minors"));
    assert_eq!(r.estimates.len(), 2);
    assert_eq!(r.estimate_bound_j, Some(7.5));
    assert_eq!(r.sluid.as_deref(), Some("s2gxm9475ceh00"));
    assert_eq!(
        r.nodes[1].gpus_unknown.as_deref(),
        Some(r.gpus_unknown[0].reason.as_str())
    );
    // The GPU energy is what n1 measured; n2's is unknown.
    assert_eq!(r.gpu_j, Some(400.0));

    let rec = r.sacct_record();
    let text = rec.encode();
    assert!(
        text.contains(" cov=0.000 gcov=0.250 ccov=0.950 gunk=1 errj=8 sluid=s2gxm9475ceh00 h="),
        "{text}"
    );
    assert_eq!(
        ergon_protocol::record::JobRecord::decode(&text),
        Ok(rec.normalized())
    );
}

/// The record: a node whose GPUs were unknown must not read like a CPU-only job
/// (`gpu=0 … ngpu=0 cov=0.905`), whatever the manifest's coverage says.
#[test]
fn unknown_gpus_never_make_a_record_that_looks_cpu_only() {
    use ergon_protocol::manifest::ComponentCoverage;
    let unknown = V4 {
        gpus_unknown: Some("NVML failed to initialise".into()),
        ..V4::default()
    };
    // As ergond writes it (coverage the lowest component: 0), and as a writer that left the
    // components out and the coverage at the CPU's 0.905.
    let as_ergond = manifest_v4(
        "c1",
        8,
        "n1",
        100.0,
        V4 {
            components: Some(ComponentCoverage {
                gpu: Some(0.0),
                cpu: Some(0.905),
                dram: None,
            }),
            ..unknown.clone()
        },
    );
    let mut terse = manifest_v4("c1", 8, "n1", 100.0, unknown);
    terse.coverage.fraction = 0.905;
    terse.seal();
    let cpu_only = {
        let mut m = manifest("c1", 9, "n1", 0.0, 100.0, 0.905);
        m.gpus.clear();
        m.totals.gpu_j = None;
        m.seal();
        m
    };
    let cpu_only_rec = combine(&[cpu_only]).sacct_record();
    for m in [as_ergond, terse] {
        let rec = combine(&[m]).sacct_record();
        assert_eq!((rec.gpu_j, rec.gpus), (0, 0));
        assert_eq!(rec.gpus_unknown_nodes, 1, "{}", rec.encode());
        assert_eq!(rec.coverage_gpu, Some(0.0), "{}", rec.encode());
        assert!(rec.encode().contains(" gcov=0.000 "));
        assert!(rec.encode().contains(" gunk=1 "));
        // What tells them apart from a CPU-only job's record.
        assert_ne!(
            (rec.gpus_unknown_nodes, rec.coverage_gpu),
            (cpu_only_rec.gpus_unknown_nodes, cpu_only_rec.coverage_gpu)
        );
    }
    assert!(!cpu_only_rec.encode().contains("gunk"));
    assert!(!cpu_only_rec.encode().contains("gcov"));
}

/// A schema 4 job with complete coverage and nothing estimated keeps the short record; only
/// the SLUID is added.
#[test]
fn a_complete_schema_4_job_adds_only_its_sluid() {
    use ergon_protocol::manifest::ComponentCoverage;
    let m = manifest_v4(
        "c1",
        10,
        "n1",
        10.0,
        V4 {
            components: Some(ComponentCoverage {
                gpu: Some(1.0),
                cpu: Some(1.0),
                dram: Some(1.0),
            }),
            sluid: Some("s2gxm9475ceh01".into()),
            ..V4::default()
        },
    );
    let text = combine(&[m]).sacct_record().encode();
    for key in ["gcov", "ccov", "dcov", "gunk", "errj"] {
        assert!(!text.contains(&format!(" {key}=")), "{text}");
    }
    assert!(
        text.contains(" cov=1.000 sluid=s2gxm9475ceh01 h="),
        "{text}"
    );
}

/// `ergon report` shows what a schema 4 job's manifests say: coverage per component, the node
/// whose GPUs are unknown (not a zero), each estimate with its bound, the SLUID.
#[test]
fn report_shows_component_coverage_unknown_gpus_estimates_and_the_sluid() {
    let s = Setup::new();
    s.write_config("");
    for m in schema4_job("c1", 12) {
        write_manifest(&s.spool(), &m);
    }
    let out = s.ergon().args(["report", "12"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "sluid s2gxm9475ceh00",
        "coverage by component (time-weighted over the nodes): (gpu 25.0%, cpu 95.0%, dram n/a)",
        "coverage 80.0% (gpu 100.0%, cpu 80.0%, dram n/a)",
        "GPUs unknown on node n2: NVML failed to initialise; their energy is unknown, not 0",
        "n1 estimated 50 J ± 5 J over 10.0 s",
        "n2 estimated 10 J ± 3 J over 10.0 s",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    let out = s.ergon().args(["report", "12", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &v["manifests"];
    assert_eq!(m["sluid"], "s2gxm9475ceh00", "{m}");
    assert_eq!(m["coverage_components"]["cpu"].as_f64(), Some(0.95), "{m}");
    assert_eq!(m["coverage_components"]["dram"], serde_json::Value::Null);
    assert_eq!(m["gpus_unknown"][0]["node"], "n2");
    assert_eq!(m["estimate_bound_j"].as_f64(), Some(7.5));
    assert_eq!(m["estimates"].as_array().unwrap().len(), 2);
    assert_eq!(m["nodes"][1]["gpus_unknown"], "NVML failed to initialise");
}
