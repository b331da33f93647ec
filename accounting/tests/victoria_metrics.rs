//! Upload to a real VictoriaMetrics (`/usr/bin/victoria-metrics`, Debian's package): stopped
//! during a run and restarted, or killed with SIGKILL at random points over several runs; every
//! record present exactly once, and a record the state calls delivered is always there.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::victoria::*;
use common::*;

impl Vm {
    /// Samples per job id of `ergon_job_energy_j`.
    fn samples_per_job(&self) -> BTreeMap<String, usize> {
        self.samples_per_job_of("ergon_job_energy_j")
    }

    /// Samples per job id of the series `metric`.
    fn samples_per_job_of(&self, metric: &str) -> BTreeMap<String, usize> {
        get(&format!(
            "http://127.0.0.1:{}/internal/force_flush",
            self.port
        ));
        let text = get(&format!(
            "http://127.0.0.1:{}/api/v1/export?match[]={metric}",
            self.port
        ))
        .unwrap();
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let job = v["metric"]["job_id"].as_str().unwrap().to_string();
            *out.entry(job).or_insert(0) += v["values"].as_array().unwrap().len();
        }
        out
    }
}

/// The tests here run one at a time: a test that restarts its VictoriaMetrics leaves its port
/// free meanwhile, and `free_port` in a test running beside it could be given that port.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn records_arrive_exactly_once_across_a_stop_and_restart() {
    let _serial = one_at_a_time();
    assert!(
        Path::new(VM).exists(),
        "{VM} is missing: run scripts/slurm-cluster up (it installs victoria-metrics)"
    );
    let s = Setup::new();
    let data = s.dir.path().join("vm-data");
    let port = free_port();
    s.write_config(&format!(
        "[retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\nbatch_size = 1\ntimeout_s = 5\n"
    ));
    for job in 1..=1000 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let vm = Vm::start(port, &data);

    // Stop VictoriaMetrics while the run is uploading (one record per request).
    let run = s.ergon().arg("run").stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.samples_per_job().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.stop();
    let out = run.wait_with_output().unwrap();
    let pending = backlog(&s.status_json(), "victoria_metrics");
    assert!(
        out.status.code() == Some(3) && pending > 0,
        "the run should have left records pending: {} pending, {}",
        pending,
        show(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("victoria_metrics"), "{stderr}");

    // While it is down, a run retries and keeps everything pending.
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), pending);

    let vm = Vm::start(port, &data);
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 0);
    // And once more: nothing is sent again.
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    let per_job = vm.samples_per_job();
    assert_eq!(per_job.len(), 1000, "every job present");
    let doubled: Vec<_> = per_job.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        doubled.is_empty(),
        "jobs not present exactly once: {doubled:?}"
    );
    vm.stop();
}

/// With `verify_every`, a run verifies what VictoriaMetrics accepted as the upload goes (and
/// delivers it then), not only at its end: the debug log shows one verification per
/// `verify_every` records accepted, then one for the rest.
#[test]
fn accepted_records_are_verified_as_the_upload_goes() {
    let _serial = one_at_a_time();
    let s = Setup::new();
    let data = s.dir.path().join("vm-data");
    let port = free_port();
    s.write_config(&format!(
        "[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nbatch_size = 10\ntimeout_s = 5\nverify_every = 100\n"
    ));
    for job in 1..=450 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let _vm = Vm::start(port, &data);
    let out = s
        .ergon()
        .arg("run")
        .env("ERGON_LOG", "debug")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 0);
    // "victoria_metrics: verification round 0: N records asked, …"
    let asked: Vec<usize> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("victoria_metrics: verification round 0:"))
        .filter_map(|l| l.split("round 0: ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(
        asked.iter().sum::<usize>(),
        450,
        "every record verified once: {asked:?}"
    );
    // Two lanes may each add a batch before one of them verifies: 100 to 110 records a round.
    assert!(
        asked.len() >= 4 && asked.iter().take(4).all(|&n| (100..=110).contains(&n)),
        "verified every 100 accepted records, then the rest: {asked:?}"
    );
}

/// A small xorshift generator, seeded from the clock (the seed is printed to reproduce a run).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("ERGON_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| now_ns() | 1);
        eprintln!("kill -9 schedule seed: {seed} (ERGON_TEST_SEED={seed} repeats it)");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// VictoriaMetrics acknowledges a write before it is on disk: killed with SIGKILL within a few
/// seconds of a write, it comes back without those samples. Over several runs it is killed at
/// random points, while ergon uploads and right after a run that exited 0; after each restart
/// every record the state calls delivered must be in VictoriaMetrics, and at the end every
/// record is there exactly once (each of its fields).
#[test]
fn records_survive_kill_9_at_random_points_exactly_once() {
    let _serial = one_at_a_time();
    assert!(
        Path::new(VM).exists(),
        "{VM} is missing: run scripts/slurm-cluster up (it installs victoria-metrics)"
    );
    const CYCLES: u32 = 6;
    const PER_CYCLE: u32 = 500;
    let mut rng = Rng::new();
    let s = Setup::new();
    let data = s.dir.path().join("vm-data");
    let port = free_port();
    s.write_config(&format!(
        "[retry]\nmax_attempts = 2\ninitial_backoff_ms = 20\nmax_backoff_ms = 40\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\nbatch_size = 5\ntimeout_s = 5\nverify_every = 60\n"
    ));
    let mut vm = Vm::start(port, &data);
    let mut killed_after_success = 0;
    let mut run_took = Duration::ZERO;
    let mut seen_before = std::collections::BTreeSet::new();
    for cycle in 0..CYCLES {
        for job in cycle * PER_CYCLE + 1..=(cycle + 1) * PER_CYCLE {
            write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
        }
        let mut run = s.ergon().arg("run").stderr(Stdio::piped()).spawn().unwrap();
        // Even cycles: kill as soon as the run has ended (and time it); odd cycles: kill while
        // the run goes on, at a random moment within the time the last run took.
        let spawned = Instant::now();
        if cycle % 2 == 0 {
            let status = run.wait().unwrap();
            run_took = spawned.elapsed();
            if status.code() == Some(0) {
                killed_after_success += 1;
            }
        } else {
            let ms = run_took.as_millis().max(1) as u64;
            std::thread::sleep(Duration::from_millis(rng.below(ms)));
        }
        vm.kill9();
        let out = run.wait_with_output().unwrap();
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "cycle {cycle}: {}",
            show(&out)
        );
        eprintln!(
            "cycle {cycle}: run exit {:?}, {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| l.contains("collected") || l.contains("ERROR"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        vm = Vm::start(port, &data);
        // What the state calls delivered is there.
        let present = vm.samples_per_job();
        let state = ergon_accounting::ledger::load_merged(&s.state()).unwrap();
        let lost: Vec<&String> = state
            .jobs
            .iter()
            .filter(|(_, e)| {
                matches!(
                    e.sinks.get("victoria_metrics"),
                    Some(ergon_accounting::state::Delivery::Done { .. })
                )
            })
            .map(|(k, _)| k)
            .filter(|k| !present.contains_key(k.trim_start_matches("c1/")))
            .collect();
        // Which side lost them: records this run marked delivered (ergon called them durable
        // too early) or records found after an earlier restart (the server lost stored data).
        let earlier = lost.iter().filter(|k| seen_before.contains(**k)).count();
        assert!(
            lost.is_empty(),
            "cycle {cycle}: {} records marked delivered are not in VictoriaMetrics after a kill -9 ({earlier} of them were found after the previous restart, {} were marked delivered in this cycle), e.g. {:?}",
            lost.len(),
            lost.len() - earlier,
            &lost[..lost.len().min(5)]
        );
        seen_before = state
            .jobs
            .keys()
            .filter(|k| present.contains_key(k.trim_start_matches("c1/")))
            .cloned()
            .collect();
    }
    assert!(killed_after_success > 0, "no run completed before a kill");

    // The next run delivers what is left: every record exactly once, every field of it too.
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 0);
    let total = (CYCLES * PER_CYCLE) as usize;
    for metric in [
        "ergon_job_energy_j",
        "ergon_job_gpu_j",
        "ergon_job_coverage_min",
        "ergon_job_gpus",
    ] {
        let per_job = vm.samples_per_job_of(metric);
        assert_eq!(per_job.len(), total, "{metric}: every job present");
        let not_once: Vec<_> = per_job.iter().filter(|(_, n)| **n != 1).collect();
        assert!(
            not_once.is_empty(),
            "{metric}: {} jobs not present exactly once, e.g. {:?}",
            not_once.len(),
            &not_once[..not_once.len().min(5)]
        );
    }
    vm.stop();
}

/// Records left pending by a run whose fate is unknown (VictoriaMetrics may hold them, or part
/// of them) are read back before anything is sent: only what is missing is sent, field by
/// field, so nothing is stored twice.
#[test]
fn pending_records_are_checked_first_and_only_missing_fields_sent() {
    let _serial = one_at_a_time();
    let s = Setup::new();
    let data = s.dir.path().join("vm-data");
    let port = free_port();
    s.write_config(&format!(
        "[retry]\nmax_attempts = 1\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\nbatch_size = 10\ntimeout_s = 5\n"
    ));
    let manifests: Vec<_> = (1..=3)
        .map(|job| manifest("c1", job, "n1", 10.0 * job as f64, 1.0, 1.0))
        .collect();
    for m in &manifests {
        write_manifest(&s.spool(), m);
    }
    // VictoriaMetrics is not up: everything stays pending.
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 3);

    // Job 1's energy (only) and all of job 2 reached it anyway, as if a run had been killed
    // after VictoriaMetrics took them and before the state said so.
    let vm = Vm::start(port, &data);
    let line = |m: &ergon_protocol::manifest::Manifest, fields: &str| {
        format!(
            "ergon_job,cluster=c1,job_id={},user=alice,account=phys,partition=gpu {fields} {}\n",
            m.job.job_id, m.end_unix_ns
        )
    };
    let body = line(&manifests[0], "energy_j=11")
        + &line(
            &manifests[1],
            "energy_j=21,gpu_j=20,cpu_j=1,avg_w=0.21,peak_w=0.42,coverage_min=1,coverage_weighted=1,duration_s=100,nodes=1,gpus=1",
        );
    let client = reqwest::blocking::Client::new();
    let r = client
        .post(format!("http://127.0.0.1:{port}/write"))
        .body(body)
        .send()
        .unwrap();
    assert!(r.status().is_success());

    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 0);
    for metric in [
        "ergon_job_energy_j",
        "ergon_job_gpu_j",
        "ergon_job_cpu_j",
        "ergon_job_avg_w",
        "ergon_job_duration_s",
        "ergon_job_gpus",
    ] {
        let per_job = vm.samples_per_job_of(metric);
        let expected: BTreeMap<String, usize> = (1..=3).map(|j| (j.to_string(), 1)).collect();
        assert_eq!(per_job, expected, "{metric}: each job exactly once");
    }
    vm.stop();
}

/// A schema 4 job's line carries its per-component coverage, the number of nodes whose GPUs
/// are unknown, the estimates' bound and its SLUID (as a tag), verified like every field.
#[test]
fn a_schema_4_job_is_uploaded_with_what_it_says() {
    let _serial = one_at_a_time();
    let s = Setup::new();
    let data = s.dir.path().join("vm-data");
    let port = free_port();
    s.write_config(&format!(
        "[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\ntimeout_s = 5\n"
    ));
    for m in schema4_job("c1", 12) {
        write_manifest(&s.spool(), &m);
    }
    let vm = Vm::start(port, &data);
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let url = format!(
        "http://127.0.0.1:{port}/api/v1/export?match[]={{__name__=~\"ergon_job_.%2B\",job_id=\"12\"}}"
    );
    let text = get(&url).unwrap();
    let mut got = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["metric"]["sluid"], "s2gxm9475ceh00", "{v}");
        got.insert(
            v["metric"]["__name__"].as_str().unwrap().to_string(),
            v["values"][0].as_f64().unwrap(),
        );
    }
    assert_eq!(got["ergon_job_gpu_coverage"], 0.25, "{got:?}");
    assert_eq!(got["ergon_job_cpu_coverage"], 0.95, "{got:?}");
    assert!(!got.contains_key("ergon_job_dram_coverage"), "{got:?}");
    assert_eq!(got["ergon_job_gpus_unknown_nodes"], 1.0);
    assert_eq!(got["ergon_job_estimate_bound_j"], 7.5);
    vm.stop();
}

/// A sink that hangs instead of failing (VictoriaMetrics stopped with SIGSTOP: connections are
/// accepted, nothing is answered) costs a run its request timeouts, not forever; its records
/// stay pending, the error is logged once, and the next run delivers them exactly once.
#[test]
fn a_hung_victoria_metrics_costs_timeouts_and_loses_nothing() {
    let _serial = one_at_a_time();
    let s = Setup::new();
    let data = s.dir.path().join("vm-data");
    let port = free_port();
    s.write_config(&format!(
        "[retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\nbatch_size = 50\ntimeout_s = 1\n"
    ));
    for job in 1..=300 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let vm = Vm::start(port, &data);
    vm.pause(true);
    let start = Instant::now();
    let out = s.run();
    let took = start.elapsed();
    vm.pause(false);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    // One timeout of 1 s per request in flight: a request that went unanswered is not sent
    // again (it may have reached the sink), and nothing more is asked of a sink that hangs.
    assert!(took < Duration::from_secs(5), "the run took {took:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "said once:\n{stderr}");
    assert!(errors[0].contains("timed out"), "{stderr}");
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 300);
    // Resumed, VictoriaMetrics applies the requests it took in while it hung: the two in
    // flight (two batches of 50), each once.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut applied = vm.samples_per_job();
    while applied.len() < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        applied = vm.samples_per_job();
    }
    assert_eq!(applied.len(), 100, "{applied:?}");
    assert!(applied.values().all(|n| *n == 1), "{applied:?}");

    // The next run finds them there and sends the rest: every job exactly once.
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let per_job = vm.samples_per_job();
    assert_eq!(per_job.len(), 300);
    assert!(per_job.values().all(|n| *n == 1), "{per_job:?}");
    vm.stop();
}

/// A VictoriaMetrics that takes writes but refuses the snapshot (started with
/// `-snapshotAuthKey`): records stay sent, not delivered, and `ergon status` says so; with
/// `verify = false` a 2xx counts as delivered again.
#[test]
fn records_that_cannot_be_verified_stay_sent_and_status_says_so() {
    let _serial = one_at_a_time();
    let s = Setup::new();
    let data = s.dir.path().join("vm-data");
    let port = free_port();
    let config = |extra: &str| {
        s.write_config(&format!(
            "[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\ntimeout_s = 5\n{extra}"
        ))
    };
    config("");
    for job in 1..=20 {
        write_manifest(&s.spool(), &manifest("c1", job, "n1", job as f64, 1.0, 1.0));
    }
    let vm = Vm::start_with(port, &data, &["-snapshotAuthKey=only-the-admin"]);
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("20 records could not be verified"),
        "{}",
        show(&out)
    );
    assert_eq!(vm.samples_per_job().len(), 20, "written, not verified");
    let status = s.status_json();
    assert_eq!(backlog(&status, "victoria_metrics"), 20, "{status}");
    let text = s.ergon().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("backlog 20 (20 sent, not yet verified)"),
        "{text}"
    );

    // The next run checks again (still refused) and sends nothing twice.
    let out = s.run();
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(vm.samples_per_job().values().all(|n| *n == 1));

    // Without verification a 2xx is delivery: the sent records are delivered, not sent again.
    config("verify = false\n");
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 0);
    let per_job = vm.samples_per_job();
    assert_eq!(per_job.len(), 20);
    assert!(per_job.values().all(|n| *n == 1), "{per_job:?}");
    vm.stop();
}

/// Everything VictoriaMetrics holds made searchable: a snapshot (as ergon's verification does;
/// `/internal/force_flush` leaves the newest series unsearchable for a second or two), then
/// removed.
fn flush(port: u16) {
    let client = reqwest::blocking::Client::new();
    let answer: serde_json::Value = client
        .post(format!("http://127.0.0.1:{port}/snapshot/create"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let name = answer["snapshot"].as_str().unwrap();
    client
        .post(format!("http://127.0.0.1:{port}/snapshot/delete"))
        .form(&[("snapshot", name)])
        .send()
        .unwrap();
}

/// Series in VictoriaMetrics named `ergon_…`.
fn series_count(port: u16) -> usize {
    flush(port);
    let text = get(&format!(
        "http://127.0.0.1:{port}/api/v1/series?match[]=%7B__name__%3D~%22ergon_.%2B%22%7D&start={}&end={}",
        now_ns() / 1_000_000_000 - 3600,
        now_ns() / 1_000_000_000 + 60
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["data"].as_array().unwrap().len()
}

/// The newest value of each `ergon_usage_<counter>` series, summed over the groups (raw samples
/// from `/api/v1/export`: a query would not see the last 30 s).
fn usage_sum(port: u16, counter: &str) -> f64 {
    flush(port);
    // An explicit end: by default the newest 30 s are left out (`-search.latencyOffset`).
    let now = now_ns() / 1_000_000_000;
    let text = get(&format!(
        "http://127.0.0.1:{port}/api/v1/export?match[]=ergon_usage_{counter}&start={}&end={}",
        now - 3600,
        now + 60
    ))
    .unwrap();
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let times = v["timestamps"].as_array().unwrap();
        let values = v["values"].as_array().unwrap();
        let newest = (0..times.len())
            .max_by_key(|&i| times[i].as_i64().unwrap())
            .unwrap();
        sum += values[newest].as_f64().unwrap();
    }
    sum
}

/// By default VictoriaMetrics gets usage counters per cluster/partition/account/user: the number
/// of series stays the same as the jobs grow (here 3 users, 40 then 400 jobs), the counters add
/// up to the jobs' energy, each job counted once however often it is sent, and they are durable
/// (verified after a flush; still there after a `kill -9`). With `per_job_series` the series
/// grow with the jobs.
#[test]
fn series_stay_flat_as_jobs_grow() {
    let _serial = one_at_a_time();
    assert!(
        Path::new(VM).exists(),
        "{VM} is missing: run scripts/slurm-cluster up (it installs victoria-metrics)"
    );
    let s = Setup::new();
    let data = s.dir.path().join("vm-data");
    let port = free_port();
    let mut vm = Some(Vm::start(port, &data));
    s.write_config(&format!(
        "[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nbatch_size = 50\ntimeout_s = 5\n"
    ));
    let users = ["alice", "bob", "carol"];
    let mut energy = 0.0;
    let mut write = |from: u32, to: u32| {
        for job in from..to {
            let user = users[job as usize % users.len()];
            let m = ergon_protocol::testing::ManifestBuilder::new("c1", job, "n1")
                .user(user, 1000)
                .account("phys")
                .partition("gpu")
                .ended(now_ns() - 60_000_000_000, 100)
                .gpu(Some(f64::from(job)))
                .socket(1.0, None)
                .build();
            energy += m.totals.energy_j;
            write_manifest(&s.spool(), &m);
        }
    };
    write(1, 41);
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let first = series_count(port);
    // 8 counters for each of the 3 groups.
    assert_eq!(first, ergon_accounting::usage::N * users.len());
    assert_eq!(ergon_accounting::usage::N, 8);
    write(41, 401);
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(series_count(port), first, "series grew with the jobs");
    assert_eq!(usage_sum(port, "jobs_total"), 400.0);
    assert!((usage_sum(port, "energy_joules_total") - energy).abs() < 1e-6 * energy);
    // Sent again (a lost state: state.json and the ledger of delivered jobs): counted once.
    std::fs::remove_file(s.state().join("state.json")).unwrap();
    std::fs::remove_file(s.state().join(ergon_accounting::ledger::FILE)).unwrap();
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("collected 400 new"),
        "{}",
        show(&out)
    );
    assert_eq!(usage_sum(port, "jobs_total"), 400.0);
    // Durable: a kill -9 right after the run loses none of it.
    vm.take().unwrap().kill9();
    let _vm = Vm::start(port, &data);
    assert_eq!(usage_sum(port, "jobs_total"), 400.0);
    assert_eq!(series_count(port), first);

    // Per-job series on request: they grow with the jobs.
    let t = Setup::new();
    let port = free_port();
    let _vm2 = Vm::start(port, &t.dir.path().join("vm-data"));
    t.write_config(&format!(
        "[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\nper_job_series = true\ntimeout_s = 5\n"
    ));
    for job in 1..=20 {
        write_manifest(&t.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
    }
    let out = t.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let per_job = series_count(port);
    for job in 21..=40 {
        write_manifest(&t.spool(), &manifest("c1", job, "n1", 10.0, 1.0, 1.0));
    }
    let out = t.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // One user's 8 counters, and a series per field per job: twice the jobs, twice those.
    let n = ergon_accounting::usage::N;
    let jobs_part = per_job - n;
    assert!(jobs_part >= 20 * 10, "{per_job}");
    assert_eq!(series_count(port), n + 2 * jobs_part);
}
