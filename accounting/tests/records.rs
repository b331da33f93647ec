//! The job-records database through the real `ergon` binary: `ergon run` writes it, `ergon
//! report` and `ergon jobs` read it, a run killed with `kill -9` loses nothing the state calls
//! delivered, and a database that cannot be written leaves its records pending without
//! stopping the other destinations.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ergon_accounting::collect::combine;
use ergon_accounting::records::{JobFilter, RecordsDb, SINK_NAME};
use ergon_accounting::state::Delivery;

fn db_path(s: &Setup) -> std::path::PathBuf {
    s.state().join("records.sqlite")
}

fn report_json(s: &Setup, job: u32) -> serde_json::Value {
    let out = s
        .ergon()
        .args(["report", &job.to_string(), "--json"])
        .output()
        .unwrap();
    // No sacct in these tests: the report's exit comes from the record alone.
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Everything `ergon report` shows of a job (schema 4 coverage, unknown GPUs, estimates, a MIG
/// share) is in the database: the report from it is the report from the manifests, and stays
/// so once the manifests are gone from the spool.
#[test]
fn report_reads_the_database_and_matches_the_manifests() {
    let s = Setup::new();
    s.write_config("");
    let job4 = schema4_job("c1", 41);
    for m in &job4 {
        write_manifest(&s.spool(), m);
    }
    let mut mig = manifest("c1", 42, "n1", 100.0, 10.0, 1.0);
    mig.gpus[0].shared = true;
    mig.gpus[0].mig = Some(ergon_protocol::GpuMig {
        total_slices: 7,
        instances: vec![ergon_protocol::MigInstanceRef {
            gpu_instance_id: 2,
            compute_instance_id: Some(0),
            slices: Some(3),
            uuid: Some("MIG-2".into()),
        }],
        share_method: ergon_protocol::MigShareMethod::SliceSize,
    });
    mig.schema_version = mig.schema_version_for();
    mig.seal();
    write_manifest(&s.spool(), &mig);

    // Before the run the report comes from the spool.
    let before = report_json(&s, 41);
    assert_eq!(before["source"], "spool", "{before}");

    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), SINK_NAME), 0);

    for (job, manifests) in [(41, job4.to_vec()), (42, vec![mig.clone()])] {
        let v = report_json(&s, job);
        assert_eq!(v["source"], "records", "{v}");
        let want = serde_json::to_value(combine(&manifests)).unwrap();
        assert_eq!(v["manifests"], want);
        // The text report from the database says what the one from the manifests says, but
        // for where it came from.
        let text = |s: &Setup| {
            let out = s
                .ergon()
                .args(["report", &job.to_string()])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        let from_db = text(&s);
        assert!(
            from_db.contains("from the job-records database"),
            "{from_db}"
        );
        if job == 41 {
            assert!(
                from_db.contains("GPUs unknown on node n2: NVML failed to initialise"),
                "{from_db}"
            );
            assert!(from_db.contains("n1 estimated 50 J ± 5 J"), "{from_db}");
        } else {
            assert!(from_db.contains("MIG GI 2 (3 of 7 slices)"), "{from_db}");
        }
    }
    // The spool is emptied (pruned, lost): the records are still there.
    for e in std::fs::read_dir(s.spool()).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let v = report_json(&s, 41);
    assert_eq!(
        v["manifests"],
        serde_json::to_value(combine(&job4)).unwrap()
    );
    // A job not in the database nor the spool: exit 1, as before.
    let out = s.ergon().args(["report", "43"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
}

/// `ergon jobs` lists from the database, filtered, in each format.
#[test]
fn jobs_lists_with_filters_and_formats() {
    let s = Setup::new();
    s.write_config("");
    let end = now_ns() - 60_000_000_000;
    for (job, user, account) in [
        (1, "alice", "phys"),
        (2, "bob", "phys"),
        (3, "alice", "chem"),
    ] {
        let m = ergon_protocol::testing::ManifestBuilder::new("c1", job, "n1")
            .user(user, 1000 + job)
            .account(account)
            .ended(end - u64::from(3 - job) * 3_600_000_000_000, 100)
            .socket(10.0 * f64::from(job), None)
            .build();
        write_manifest(&s.spool(), &m);
    }
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let jobs = |args: &[&str]| -> Vec<u64> {
        let out = s
            .ergon()
            .args(["jobs", "--format", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", show(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(jobs(&[]), [3, 2, 1]);
    assert_eq!(jobs(&["--user", "alice"]), [3, 1]);
    assert_eq!(jobs(&["--account", "phys"]), [2, 1]);
    assert_eq!(jobs(&["--user", "nobody"]), Vec::<u64>::new());
    let since = format!("@{}", (end - 90 * 60_000_000_000) / 1_000_000_000);
    assert_eq!(jobs(&["--since", &since]), [3, 2]);
    assert_eq!(jobs(&["--until", &since]), [1]);
    let out = s
        .ergon()
        .args(["jobs", "--format", "csv", "--user", "bob"])
        .output()
        .unwrap();
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("cluster,job_id,user,account,"), "{csv}");
    assert!(
        csv.lines().nth(1).unwrap().starts_with("c1,2,bob,phys,"),
        "{csv}"
    );
    let out = s.ergon().args(["jobs"]).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.lines().next().unwrap().contains("ENERGY"), "{table}");
    // A bad time is a usage error that says what to give.
    let out = s
        .ergon()
        .args(["jobs", "--since", "last week"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(show(&out).contains("YYYY-MM-DD"), "{}", show(&out));
    // Without a database yet: an error that says so.
    let t = Setup::new();
    t.write_config("");
    let out = t.ergon().arg("jobs").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        show(&out).contains("`ergon run` creates it"),
        "{}",
        show(&out)
    );
}

/// `ergon summary` sums the collected jobs by user, account, partition and node, in each
/// format; a user who is not root sees their own jobs' sums only.
#[test]
fn summary_sums_the_collected_jobs_by_group() {
    let s = Setup::new();
    s.write_config("");
    let end = now_ns() - 60_000_000_000;
    let mut truth = std::collections::BTreeMap::<&str, (u64, f64)>::new();
    for (job, user, account, nodes) in [
        (1, "alice", "phys", &["n1"][..]),
        (2, "bob", "phys", &["n1", "n2"][..]),
        (3, "alice", "chem", &["n2"][..]),
    ] {
        let mut energy = 0.0;
        for node in nodes {
            let m = ergon_protocol::testing::ManifestBuilder::new("c1", job, node)
                .user(user, 1000 + job)
                .account(account)
                .partition("gpu")
                .ended(end, 3_600)
                .gpu(Some(1_000.0 * f64::from(job)))
                .socket(10.0 * f64::from(job), None)
                .build();
            energy += m.totals.energy_j;
            write_manifest(&s.spool(), &m);
        }
        let t = truth.entry(user).or_default();
        *t = (t.0 + 1, t.1 + energy);
    }
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let summary = |args: &[&str]| -> serde_json::Value {
        let out = s
            .ergon()
            .args(["summary", "--format", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", show(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let root = own_uid() == 0;
    let v = summary(&["--by", "user"]);
    let groups = v["groups"].as_array().unwrap();
    if !root {
        // Not root: the sums of this user's own jobs only (none here), and the scope says so.
        assert!(groups.is_empty(), "{v}");
        assert!(
            v["scope"]["user"]
                .as_str()
                .unwrap()
                .contains("your jobs only"),
            "{v}"
        );
        return;
    }
    assert_eq!(groups.len(), 2, "{v}");
    for g in groups {
        let (jobs, energy) = truth[g["key"].as_str().unwrap()];
        assert_eq!(g["jobs"], jobs, "{g}");
        assert!(
            (g["energy_j"].as_f64().unwrap() - energy).abs() < 1e-6,
            "{g} vs {energy}"
        );
        // One GPU per node for an hour.
        assert!(g["gpu_hours"].as_f64().unwrap() >= 1.0, "{g}");
    }
    let all: f64 = truth.values().map(|t| t.1).sum();
    for by in ["account", "partition", "node"] {
        let v = summary(&["--by", by]);
        assert!(
            (v["total"]["energy_j"].as_f64().unwrap() - all).abs() < 1e-6,
            "{by}: {v}"
        );
    }
    // By node a job on two nodes counts on each; GPU-hours follow the node's GPUs.
    let v = summary(&["--by", "node"]);
    assert_eq!(v["total"]["jobs"], 4, "{v}");
    assert!(
        (v["total"]["gpu_hours"].as_f64().unwrap() - 4.0).abs() < 1e-6,
        "{v}"
    );
    let v = summary(&["--by", "account", "--user", "alice"]);
    assert_eq!(v["groups"].as_array().unwrap().len(), 2, "{v}");
    let out = s
        .ergon()
        .args(["summary", "--by", "account", "--format", "csv"])
        .output()
        .unwrap();
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("cluster,account,jobs,energy_j,"), "{csv}");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let out = s.ergon().args(["summary"]).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.starts_with("ergon summary: by user, every job collected"),
        "{table}"
    );
    assert!(
        table.contains("TOTAL") && table.contains("alice"),
        "{table}"
    );
}

fn own_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(u32::MAX)
}

/// A database that cannot be written (its path is a directory) keeps its records pending and
/// the run exits 3; the next run with a usable path writes them all.
#[test]
fn a_database_that_cannot_be_written_keeps_its_records_pending() {
    let s = Setup::new();
    let bad = s.dir.path().join("not-a-file");
    std::fs::create_dir_all(&bad).unwrap();
    s.write_config(&format!("[records]\npath = {bad:?}\n"));
    for job in 1..=3 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
    }
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(
        show(&out).contains("job-records database"),
        "{}",
        show(&out)
    );
    assert_eq!(backlog(&s.status_json(), SINK_NAME), 3);
    s.write_config("");
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), SINK_NAME), 0);
    let db = RecordsDb::open_read_only(&db_path(&s)).unwrap();
    assert_eq!(db.count().unwrap(), 3);
}

/// `kill -9` in the middle of a run: every record the state (with its journal) calls delivered
/// to the database is in it; the next run writes the rest, each job once.
#[test]
fn a_run_killed_with_kill_9_loses_nothing_the_state_calls_delivered() {
    const JOBS: u32 = 3000;
    let s = Setup::new();
    s.write_config("[records]\nbatch_size = 10\n");
    for job in 1..=JOBS {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let mut child = s.ergon().arg("run").spawn().unwrap();
    // Kill it once the database holds some of the jobs, not all.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = 0;
    while Instant::now() < deadline {
        if let Ok(db) = RecordsDb::open_read_only(&db_path(&s)) {
            seen = db.count().unwrap_or(0);
            if seen > 0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(seen > 0, "the run wrote no records in 120 s");
    child.kill().unwrap();
    child.wait().unwrap();

    let state = ergon_accounting::ledger::load_merged(&s.state()).unwrap();
    let db = RecordsDb::open_read_only(&db_path(&s)).unwrap();
    let in_db: std::collections::BTreeSet<u32> = db
        .list(&JobFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| r.job_id)
        .collect();
    let delivered: Vec<u32> = state
        .jobs
        .iter()
        .filter(|(_, e)| matches!(e.sinks.get(SINK_NAME), Some(Delivery::Done { .. })))
        .map(|(k, _)| k.rsplit('/').next().unwrap().parse().unwrap())
        .collect();
    let lost: Vec<_> = delivered.iter().filter(|j| !in_db.contains(j)).collect();
    assert!(
        lost.is_empty(),
        "delivered but not in the database: {lost:?}"
    );
    println!(
        "killed with {} of {JOBS} in the database, {} delivered in the state",
        in_db.len(),
        delivered.len()
    );
    assert!(
        (in_db.len() as u32) < JOBS,
        "the run had finished: kill earlier"
    );
    drop(db);

    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let db = RecordsDb::open_read_only(&db_path(&s)).unwrap();
    assert_eq!(db.count().unwrap(), u64::from(JOBS));
    for job in [1, JOBS / 2, JOBS] {
        let got = db.get(Some("c1"), job).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].energy_j, job as f64 + 1.0);
    }
    assert_eq!(backlog(&s.status_json(), SINK_NAME), 0);
}

/// A job's GPU efficiency (manifest schema 6) goes through `ergon run`: into the sacct record's
/// keys, the database (`ergon report` from it says what the manifests say, idle GPUs named) and
/// `ergon summary`'s idle-GPU energy.
#[test]
fn gpu_efficiency_reaches_the_record_the_database_and_the_summary() {
    let s = Setup::new();
    s.write_config("");
    let eff = |util: f64, xid: Option<u64>| ergon_protocol::GpuEfficiency {
        sampled_s: 100.0,
        partial: false,
        sm_util_avg_pct: Some(util),
        idle: Some(util < 5.0),
        idle_threshold_pct: 5.0,
        memory_used_max_bytes: Some(2 << 30),
        temperature_max_c: Some(70),
        sm_clock_avg_mhz: Some(1410.0),
        mem_clock_avg_mhz: None,
        throttle_s: ergon_protocol::ThrottleSeconds {
            power_cap: Some(12.5),
            sw_thermal: None,
            hw_thermal: Some(2.0),
            hw_power_brake: None,
        },
        ecc_corrected: Some(0),
        ecc_uncorrected: Some(0),
        xid_count: xid.map(|_| 1),
        xids: xid.map(|x| {
            vec![ergon_protocol::XidEvent {
                at_unix_ns: 1,
                xid: x,
            }]
        }),
    };
    let m = ergon_protocol::testing::ManifestBuilder::new("c1", 50, "n1")
        .user("alice", own_uid())
        .account("phys")
        .ended(now_ns() - 60_000_000_000, 100)
        .gpu(Some(41_200.0))
        .gpu_efficiency(eff(1.0, None))
        .gpu(Some(90_000.0))
        .gpu_efficiency(eff(90.0, Some(79)))
        .socket(1000.0, None)
        .build();
    assert_eq!(m.schema_version, 6);
    write_manifest(&s.spool(), &m);
    let record = combine(std::slice::from_ref(&m)).sacct_record();
    assert_eq!(record.gpu_idle_j, Some(41_200));
    assert_eq!(record.gpu_util_pct, Some(45.5));
    assert_eq!(record.gpu_throttle_s, Some(29.0));
    assert_eq!(record.xid_events, Some(1));
    assert!(
        record
            .encode()
            .contains(" gidle=41200 gutil=45.5 gthr=29.0 xid=1 "),
        "{}",
        record.encode()
    );

    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let v = report_json(&s, 50);
    assert_eq!(v["source"], "records", "{v}");
    assert_eq!(
        v["manifests"],
        serde_json::to_value(combine(std::slice::from_ref(&m))).unwrap()
    );
    let out = s.ergon().args(["report", "50"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "idle GPUs n1 gpu0: 1 % average SM utilisation, 41.2 kJ spent idle",
        "throttled 14.5 s (power cap 12.5 s, hw thermal 2.0 s)",
        "1 Xid event(s): 79",
    ] {
        assert!(text.contains(want), "{want:?} missing from\n{text}");
    }
    let out = s
        .ergon()
        .args(["summary", "--format", "json", "--by", "account"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"]["gpu_idle_j"], 41_200.0, "{v}");
    let out = s
        .ergon()
        .args(["summary", "--format", "json", "--by", "node"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let idle = v["groups"][0]["gpu_idle_j"].as_f64().unwrap();
    assert!((idle - 41_200.0).abs() < 1e-6, "by node: {v}");
    let out = s
        .ergon()
        .args(["summary", "--by", "account"])
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("IDLE-GPU") && table.contains("41.2 kJ"),
        "{table}"
    );
}

/// A job's energy at the wall (manifest schema 6, from its nodes' meters) reaches the sacct
/// record (`wall=`), the database and `ergon report`, summed over its nodes when every node had
/// a meter; with one node without a meter there is no total, and nothing is invented for it.
#[test]
fn wall_energy_reaches_the_record_the_database_and_the_report() {
    let s = Setup::new();
    s.write_config("");
    let wall = |components: f64, rest: f64| ergon_protocol::WallEnergy {
        energy_j: components + rest,
        components_j: components,
        rest_of_node_j: rest,
        rule: "allocation".into(),
        meter: ergon_protocol::WallMeter {
            kind: "hwmon".into(),
            source: "/sys/class/hwmon/hwmon3 power_meter".into(),
            resolution_s: 1.0,
            accuracy_percent: 5.0,
        },
        metered_s: 100.0,
        unmetered_s: 0.0,
        disagreements: 0,
        disagreement_intervals: Vec::new(),
    };
    let node = |job: u32, name: &str, gpu_j: f64, w: Option<ergon_protocol::WallEnergy>| {
        let mut b = ergon_protocol::testing::ManifestBuilder::new("c1", job, name)
            .user("alice", own_uid())
            .ended(now_ns() - 60_000_000_000, 100)
            .nodes(&["n1", "n2"])
            .gpu(Some(gpu_j));
        if let Some(w) = w {
            b = b.wall(w);
        }
        b.build()
    };
    let both = [
        node(60, "n1", 10_000.0, Some(wall(10_000.0, 1_500.0))),
        node(60, "n2", 20_000.0, Some(wall(20_000.0, 2_500.0))),
    ];
    let one = [
        node(61, "n1", 10_000.0, Some(wall(10_000.0, 1_500.0))),
        node(61, "n2", 20_000.0, None),
    ];
    for m in both.iter().chain(&one) {
        write_manifest(&s.spool(), m);
    }
    let full = combine(&both);
    assert_eq!(full.wall_j(), Some(34_000.0));
    assert!(
        full.sacct_record().encode().contains(" wall=34000 h="),
        "{}",
        full.sacct_record().encode()
    );
    let partial = combine(&one);
    assert_eq!(partial.wall_j(), None);
    assert!(!partial.sacct_record().encode().contains("wall="));

    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let v = report_json(&s, 60);
    assert_eq!(v["source"], "records", "{v}");
    assert_eq!(v["manifests"], serde_json::to_value(&full).unwrap());
    let text = |job: &str| {
        let out = s.ergon().args(["report", job]).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let t = text("60");
    for want in [
        "at the wall 34.0 kJ = components 30.0 kJ + rest of node 4.00 kJ (node meters)",
        "n2             22.5 kJ (rest of node 2.50 kJ, split by allocation; hwmon",
    ] {
        assert!(t.contains(want), "{want:?} missing from\n{t}");
    }
    let t = text("61");
    assert!(
        t.contains("at the wall: 1 of the job's 2 nodes had a meter; no total"),
        "{t}"
    );
}
