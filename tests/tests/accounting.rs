//! `ergon run` writes the job's `ergon1` record into sacct (AdminComment) on the real cluster,
//! keeping foreign content, and `ergon report` reads it back.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use ergon_protocol::manifest::*;
use ergon_protocol::record::JobRecord;
use ergon_protocol::testing::ManifestBuilder;
use ergon_tests::{cluster, scratch_dir, target_dir, wait_for, Cluster};

fn ergon_bin() -> PathBuf {
    let bin = target_dir().join("debug/ergon");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p ergon-accounting)",
        bin.display()
    );
    bin
}

/// Job `job`'s manifest on n1: 5000 J (GPU 4000, CPU 900, DRAM 100) over 100 s that just ended.
fn manifest(cluster: &str, job: u32) -> Manifest {
    let end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    ManifestBuilder::new(cluster, job, "n1")
        .user("root", 0)
        .ended(end, 100)
        .gpu(Some(4000.0))
        .socket(900.0, Some(100.0))
        .peak_w(120.0)
        .node_context(6000.0, 1000.0, 0.0)
        .coverage(0.99)
        .batch_step()
        .build()
}

/// A spool with the job's manifest and a config (sacct on, no sinks) under `dir`.
fn setup(dir: &Path, job: u32, extra_sacct: &str) -> PathBuf {
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let m = manifest("ergon-dev", job);
    std::fs::write(spool.join(format!("{job}.json")), m.to_json().unwrap()).unwrap();
    let config = dir.join("accounting.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dirs = [{:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\n{extra_sacct}\n",
            spool,
            dir.join("quarantine"),
            dir.join("state")
        ),
    )
    .unwrap();
    config
}

fn ergon(c: &Cluster, config: &Path, args: &[&str]) -> Output {
    c.cmd(ergon_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A finished job whose sacct record is whole (slurmdbd fills a short job in from several
/// messages).
fn finished_job(c: &Cluster, script: &str) -> u32 {
    let job = c
        .sbatch([
            "--job-name=ergon-acct",
            "--output=/dev/null",
            "--wrap",
            script,
        ])
        .unwrap();
    c.wait_completed(job).unwrap();
    wait_for(Duration::from_secs(60), "the job's record in sacct", || {
        Ok((c.sacct_field(job, "JobName")?.as_deref() == Some("ergon-acct")).then_some(()))
    })
    .unwrap();
    job
}

fn admin_comment(c: &Cluster, job: u32) -> String {
    c.sacct_field(job, "AdminComment")
        .unwrap()
        .unwrap_or_default()
}

#[test]
fn record_lands_in_admin_comment_next_to_foreign_content_and_report_reads_it() {
    let c = cluster();
    let job = finished_job(c, "true");
    // Foreign content another tool (jobstats) put there; through sacctmgr it is lowercase.
    let foreign = "js1:h4siaaaa+2ty==";
    c.run(
        "sacctmgr",
        [
            "-i",
            "modify",
            "job",
            "where",
            &format!("jobid={job}"),
            "set",
            &format!("AdminComment={foreign}"),
        ],
    )
    .unwrap();
    assert_eq!(admin_comment(c, job), foreign);

    let dir = scratch_dir("acct-sacct").unwrap();
    let config = setup(dir.path(), job, "");
    let out = ergon(c, &config, &["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    let expected = expected_record(&job_hash(c, &config, job));
    let field = admin_comment(c, job);
    assert_eq!(field, format!("{foreign}; {}", expected.encode()));

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sacct: 1 written, 0 already in place"),
        "{stderr}"
    );

    // A second run changes nothing.
    let out = ergon(c, &config, &["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(admin_comment(c, job), field);

    // With the state lost, a run finds the record in place: it says so, and writes nothing.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let out = ergon(c, &config, &["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sacct: 0 written, 1 already in place"),
        "{stderr}"
    );
    assert_eq!(admin_comment(c, job), field);

    let out = ergon(c, &config, &["report", &job.to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let record: JobRecord = serde_json::from_value(report["sacct_record"].clone()).unwrap();
    assert_eq!(record, expected.normalized());
    assert_eq!(report["foreign_content"], foreign);
    assert_eq!(report["manifests"]["energy_j"], 5000.0);
    let out = ergon(c, &config, &["report", &job.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("5000 J"), "{text}");
    // The plain report shows the foreign content too, as --json does.
    assert!(
        text.contains(&format!("also in AdminComment: {foreign}")),
        "{text}"
    );
}

fn consumed_energy(c: &Cluster, job: u32) -> u64 {
    c.sacct_field(job, "ConsumedEnergyRaw")
        .unwrap()
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Slurm 25.11+: `ergon run` also sets the job's own ConsumedEnergy (TRES energy) to ergon's
/// total, read back like the record; a figure Slurm measured itself (as an AcctGatherEnergyType
/// plugin would have) is kept and said, unless `consumed_energy = "overwrite"`. Older releases
/// leave ConsumedEnergy alone and say why, in one line.
#[test]
fn consumed_energy_is_ergons_figure_where_slurm_allows_it() {
    let c = cluster();
    let dir = scratch_dir("acct-energy").unwrap();
    let job = finished_job(c, "true");
    assert_eq!(consumed_energy(c, job), 0, "no energy plugin runs here");
    let config = setup(&dir.path().join("plain"), job, "");
    let out = ergon(c, &config, &["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if c.version() < (25, 11) {
        assert_eq!(consumed_energy(c, job), 0);
        assert_eq!(
            stderr.matches("cannot set a finished job's energy").count(),
            1,
            "one line saying why: {}",
            show(&out)
        );
        return;
    }
    // sacct's ConsumedEnergy and the TRES sreport reads both show ergon's 5000 J.
    assert_eq!(consumed_energy(c, job), 5000, "{}", show(&out));
    let tres = c.sacct_field(job, "AllocTRES").unwrap().unwrap_or_default();
    assert!(tres.contains("energy=5000"), "AllocTRES {tres}");
    assert!(admin_comment(c, job).contains("ergon1 e=5000 "));

    // A job Slurm measured itself: its figure stays, and the run says so.
    let job = finished_job(c, "true");
    c.run(
        "sacctmgr",
        [
            "-i",
            "modify",
            "job",
            "where",
            &format!("jobid={job}"),
            "set",
            "TRES=energy=812",
        ],
    )
    .unwrap();
    let config = setup(&dir.path().join("slurms"), job, "");
    let out = ergon(c, &config, &["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(consumed_energy(c, job), 812, "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("keep the ConsumedEnergy Slurm measured itself"),
        "{}",
        show(&out)
    );
    assert!(admin_comment(c, job).contains("ergon1 e=5000 "));
    // Asked to: ergon's figure replaces it.
    let config = setup(
        &dir.path().join("overwrite"),
        job,
        "consumed_energy = \"overwrite\"",
    );
    let out = ergon(c, &config, &["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(consumed_energy(c, job), 5000, "{}", show(&out));
}

/// The record `ergon run` should write for the test manifest, given the job hash (which
/// `ergon report` shows from the manifests).
fn expected_record(job_hash: &str) -> JobRecord {
    JobRecord {
        energy_j: 5000,
        gpu_j: 4000,
        cpu_j: 900,
        dram_j: 100,
        other_j: None,
        avg_w: 50.0,
        peak_w: 120.0,
        gpus: 1,
        nodes: 1,
        coverage: 0.99,
        hash: JobRecord::short_hash(job_hash),
        ..JobRecord::default()
    }
}

fn job_hash(c: &Cluster, config: &Path, job: u32) -> String {
    let out = ergon(c, config, &["report", &job.to_string(), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["manifests"]["job_hash"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn foreign_content_with_uppercase_is_not_clobbered_unless_asked() {
    let c = cluster();
    // scontrol (unlike sacctmgr) keeps case, but only while the job runs: the job waits for a
    // file the test creates once the comment is set.
    let dir = scratch_dir("acct-upper").unwrap();
    let go = dir.path().join("go");
    let job = c
        .sbatch([
            "--job-name=ergon-acct",
            "--output=/dev/null",
            "--wrap",
            &format!("while [ ! -e {} ]; do sleep 0.2; done", go.display()),
        ])
        .unwrap();
    c.wait_job_state(job, &["RUNNING"], Duration::from_secs(60))
        .unwrap();
    c.run(
        "scontrol",
        ["update", &format!("jobid={job}"), "AdminComment=JS1:AbC"],
    )
    .unwrap();
    std::fs::write(&go, "").unwrap();
    c.wait_completed(job).unwrap();
    wait_for(
        Duration::from_secs(60),
        "the foreign comment in sacct",
        || Ok((admin_comment(c, job) == "JS1:AbC").then_some(())),
    )
    .unwrap();

    let config = setup(&dir.path().join("default"), job, "");
    let out = ergon(c, &config, &["run"]);
    // Skipped on purpose: the run says not everything went through.
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("uppercase"),
        "{}",
        show(&out)
    );
    assert_eq!(admin_comment(c, job), "JS1:AbC");
    let out = ergon(c, &config, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["sacct_skipped"], 1, "{status}");

    // Asked to write anyway: sacctmgr 22.05 stores the foreign part lowercased; the sacctmgr of
    // 24.11 and later keeps its case (found by running this test on them).
    let config = setup(
        &dir.path().join("lowercase"),
        job,
        "foreign_unsafe = \"lowercase\"",
    );
    let out = ergon(c, &config, &["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let foreign = if c.version() < (24, 11) {
        "js1:abc"
    } else {
        "JS1:AbC"
    };
    assert_eq!(
        admin_comment(c, job),
        format!(
            "{foreign}; {}",
            expected_record(&job_hash(c, &config, job)).encode()
        )
    );
}

/// A schema 4 manifest (a node whose GPUs ergond could not know, CPU covered 90.5 %, an
/// estimated gap, a SLUID) gives a sacct record that says so, through the real sacctmgr, and
/// `ergon report` shows it from sacct: never a GPU part of 0 that reads like a CPU-only job.
#[test]
fn a_schema_4_record_says_what_is_unknown_and_estimated() {
    let c = cluster();
    let job = finished_job(c, "true");
    let dir = scratch_dir("acct-schema4").unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let mut m = manifest("ergon-dev", job);
    m.schema_version = MANIFEST_SCHEMA_VERSION_COVERAGE;
    m.gpus.clear();
    m.totals = Totals {
        energy_j: 1000.0,
        gpu_j: None,
        cpu_j: Some(900.0),
        dram_j: Some(100.0),
        avg_w: 10.0,
        peak_w: 20.0,
    };
    m.steps[0].energy_j = 1000.0;
    m.steps[0].gpu_j = None;
    m.steps[0].cpu_j = Some(900.0);
    m.coverage.components = Some(ComponentCoverage {
        gpu: Some(0.0),
        cpu: Some(0.905),
        dram: Some(0.905),
    });
    m.coverage.fraction = 0.0;
    m.coverage.gpus_unknown = Some("nvml could not be initialised".into());
    let mut gap = Gap::new(
        m.start_unix_ns,
        m.start_unix_ns + 9_500_000_000,
        "ergond restarted",
        true,
    );
    gap.estimate = Some(GapEstimate {
        energy_j: 95.0,
        bound_j: 12.3,
    });
    m.coverage.gaps.push(gap);
    m.job.sluid = Some("S2GXM9475CEH00".into());
    m.seal();
    std::fs::write(spool.join(format!("{job}.json")), m.to_json().unwrap()).unwrap();
    let config = dir.path().join("accounting.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dirs = [{:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n",
            spool,
            dir.path().join("quarantine"),
            dir.path().join("state")
        ),
    )
    .unwrap();
    let out = ergon(c, &config, &["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let field = admin_comment(c, job);
    assert!(
        field.starts_with("ergon1 e=1000 gpu=0 cpu=900 dram=100 avgw=10.0 peakw=20.0 ngpu=0 nodes=1 cov=0.000 gcov=0.000 ccov=0.905 dcov=0.905 gunk=1 errj=13 sluid=s2gxm9475ceh00 h="),
        "{field}"
    );
    let record = JobRecord::decode(&field).unwrap();
    assert_eq!(record.gpus_unknown_nodes, 1);
    assert_eq!(record.estimate_bound_j, Some(13));

    let out = ergon(c, &config, &["report", &job.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "(1000 J) ± 13 J estimated",
        "by part   gpu unknown, cpu 900 J, dram 100 J",
        "GPUs unknown on 1 node(s)",
        "coverage  0.0% (gpu 0.0%, cpu 90.5%, dram 90.5%)",
        "sluid     s2gxm9475ceh00",
        "GPUs unknown on node n1: nvml could not be initialised",
        "n1 estimated 95 J ± 13 J over 9.5 s: ergond restarted",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    let out = ergon(c, &config, &["report", &job.to_string(), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sacct_record"]["gpus_unknown_nodes"], 1, "{report}");
    assert_eq!(report["sacct_record"]["sluid"], "s2gxm9475ceh00");
    assert_eq!(report["manifests"]["gpus_unknown"][0]["node"], "n1");
}

/// Measures sacct write throughput through `ergon run` for `sacct.parallel` = 1, 4, 8 and 16 (each
/// round writes a different record into the same finished jobs, and every record is verified by
/// read-back inside the run). A measurement, not a test: run with `--ignored --nocapture`.
#[test]
#[ignore = "measurement; run explicitly"]
fn sacct_write_rate() {
    let c = cluster();
    let n = 40;
    let jobs: Vec<u32> = (0..n)
        .map(|_| {
            c.sbatch([
                "--job-name=ergon-acct",
                "--output=/dev/null",
                "--wrap",
                "true",
            ])
            .unwrap()
        })
        .collect();
    for &job in &jobs {
        c.wait_completed(job).unwrap();
    }
    let dir = scratch_dir("acct-rate").unwrap();
    for (round, parallel) in [1usize, 4, 8, 16].into_iter().enumerate() {
        let root = dir.path().join(format!("p{parallel}"));
        let spool = root.join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        for &job in &jobs {
            let mut m = manifest("ergon-dev", job);
            m.totals.energy_j += round as f64;
            m.seal();
            std::fs::write(spool.join(format!("{job}.json")), m.to_json().unwrap()).unwrap();
        }
        let config = root.join("accounting.toml");
        std::fs::write(
            &config,
            format!(
                "spool_dirs = [{spool:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\nparallel = {parallel}\n",
                root.join("q"),
                root.join("state")
            ),
        )
        .unwrap();
        let start = std::time::Instant::now();
        let out = ergon(c, &config, &["run"]);
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        for &job in &jobs {
            let field = admin_comment(c, job);
            assert!(
                field.contains(&format!("ergon1 e={} ", 5000 + round)),
                "{job}: {field}"
            );
        }
        println!(
            "sacct.parallel = {parallel}: {n} jobs in {secs:.2} s = {:.1} jobs/s (verified)",
            n as f64 / secs
        );
    }
}
