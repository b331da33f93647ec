//! `scripts/bench scale`: ergon's accounting at a large site's rate, scaled down in time.
//!
//! The site: 10,000 nodes, 1,000,000 jobs a day, 5 % of them on 2–8 nodes; the accounting timer
//! runs every 5 minutes, so each run finds 1,000,000 / 288 ≈ 3,472 new jobs. This machine cannot
//! hold 30 days of that (30 M jobs), so the simulation runs `--runs` consecutive timer runs at the
//! full per-run rate (default 24: two hours of the site), each over the spool and state the
//! earlier runs left, in ergond's sharded layout (`<day>/<node>/<name>.json.gz`), with the
//! job-records database (SQLite) and a private VictoriaMetrics (usage counters, verified) as
//! destinations, sacct disabled (its rate is measured by `scripts/bench sacct`). Each run is
//! `ergon run` (the library's `run::run`) in a child process of its own. It records:
//!
//! - each run's wall time against the 300 s interval, and its peak RSS;
//! - the job-records database's size per million jobs (jobs, node, GPU rows);
//! - listing every job in the database (`ergon jobs`' query, all rows) as a ratio against reading
//!   the same rows once with a plain `SELECT` (the baseline);
//! - the series in VictoriaMetrics against the jobs;
//! - sacct's needed write rate at 1 M jobs a day against the rate `scripts/bench sacct` measured.
//!
//! ```text
//! bench_scale [--runs N] [--jobs-per-run J] [--json PATH]
//! ```

use std::io::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ergon_accounting::config::Config;
use ergon_accounting::records::{JobFilter, RecordsDb};
use ergon_accounting::run::{run, RunOptions};
use ergon_protocol::testing::ManifestBuilder;
use serde_json::{json, Value};

const VM: &str = "/usr/bin/victoria-metrics";
const NODES: u32 = 10_000;
const USERS: u32 = 2_000;
const ACCOUNTS: u32 = 200;
const PARTITIONS: u32 = 4;
/// `scripts/bench sacct`'s figure at parallel 8 (BENCHMARKS.md, docs/accounting.md).
const SACCT_MEASURED_JOBS_PER_S: f64 = 24.0;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(how @ ("--child-run" | "--child-rescan")) = args.first().map(String::as_str) {
        child_run(Path::new(&args[1]), how == "--child-rescan");
        return;
    }
    let mut runs = 24u32;
    let mut per_run = 3_472u32;
    let mut json_path = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--jobs-per-run" => {
                per_run = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--jobs-per-run J")
            }
            "--json" => json_path = it.next(),
            other => panic!("unknown argument {other}; usage: bench_scale [--runs N] [--jobs-per-run J] [--json PATH]"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&spool).unwrap();
    let vm = Vm::start(&dir.path().join("vm"));
    let config = dir.path().join("accounting.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dirs = [{spool:?}]\nquarantine_dir = {:?}\nstate_dir = {state:?}\nsettle_s = 0\n\n[sacct]\nenabled = false\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{}\"\n",
            dir.path().join("quarantine"),
            vm.port
        ),
    )
    .unwrap();

    let start_ns = now_ns() - u64::from(runs) * 300_000_000_000 - 3_600_000_000_000;
    let mut job = 1u32;
    let mut node_manifests = 0u64;
    let mut rows = Vec::new();
    for r in 0..runs {
        // The jobs that ended in this 5-minute window.
        let window = start_ns + u64::from(r) * 300_000_000_000;
        for _ in 0..per_run {
            let multi = job % 20 == 0;
            let nodes = if multi { 2 + job % 7 } else { 1 };
            for k in 0..nodes {
                let node = format!("n{:05}", (job.wrapping_mul(7919) + k) % NODES);
                let end = window + u64::from(job % 300) * 1_000_000_000;
                let m = ManifestBuilder::new("big", job, &node)
                    .user(&format!("u{}", job % USERS), 10_000 + job % USERS)
                    .account(&format!("a{}", job % ACCOUNTS))
                    .partition(&format!("p{}", job % PARTITIONS))
                    .ended(end, 600 + u64::from(job % 3000))
                    .gpu(Some(1000.0 + f64::from(job % 5000)))
                    .socket(200.0, Some(20.0))
                    .batch_step()
                    .build();
                let day = day(end);
                let d = spool.join(day).join(&node);
                std::fs::create_dir_all(&d).unwrap();
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(&m.to_json().unwrap()).unwrap();
                std::fs::write(
                    d.join(format!("big-{job}-{node}.json.gz")),
                    gz.finish().unwrap(),
                )
                .unwrap();
                node_manifests += 1;
            }
            job += 1;
        }
        let (wall, child) = run_child(&config);
        let series = vm.series();
        assert_eq!(child["collected"], u64::from(per_run), "{child}");
        assert_eq!(child["complete"], true, "{child}");
        eprintln!(
            "run {:>3}: {} new jobs, {:.1} s ({:.1} % of the 300 s interval), peak RSS {:.0} MiB, {} manifests known, {series} series, state.json {} B (max {} B), ledger {} B",
            r + 1,
            per_run,
            wall,
            wall / 3.0,
            child["maxrss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            child["manifests_known"],
            child["state_bytes_final"],
            child["state_bytes_max"],
            child["ledger_bytes"]
        );
        rows.push(json!({"run": r + 1, "wall_s": wall, "series": series, "child": child}));
    }
    let jobs = u64::from(job - 1);
    let sealed = sealed_days(&spool, &config);

    // The database: size per million jobs.
    let db_path = state.join("records.sqlite");
    let db_bytes = std::fs::metadata(&db_path).unwrap().len();
    let db = RecordsDb::open_read_only(&db_path).unwrap();
    assert_eq!(db.count().unwrap(), jobs);
    // Listing every job (what `ergon jobs` asks) against reading the rows once.
    let t = Instant::now();
    let listed = db.list(&JobFilter::default()).unwrap();
    let list_s = t.elapsed().as_secs_f64();
    assert_eq!(listed.len() as u64, jobs);
    let conn =
        rusqlite::Connection::open_with_flags(&db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let t = Instant::now();
    let mut stmt = conn
        .prepare(
            "SELECT cluster, job_id, `user`, account, `partition`, start_unix_ns, end_unix_ns,
                duration_s, energy_j, gpu_j, cpu_j, dram_j, nodes, gpus, coverage_min, estimated
             FROM jobs",
        )
        .unwrap();
    let mut n = 0u64;
    let mut sum = 0.0;
    let mut q = stmt.query([]).unwrap();
    while let Some(row) = q.next().unwrap() {
        sum += row.get::<_, f64>(8).unwrap();
        n += 1;
    }
    let baseline_s = t.elapsed().as_secs_f64();
    assert_eq!(n, jobs);
    let per_million = db_bytes as f64 * 1e6 / jobs as f64;

    // Series in VictoriaMetrics.
    let series = vm.series();

    // Last (it empties the ledger): every job past the age bound.
    let past = past_horizon(&config);

    let needed = 1e6 / 86_400.0;
    let walls: Vec<f64> = rows.iter().map(|r| r["wall_s"].as_f64().unwrap()).collect();
    let rss: Vec<f64> = rows
        .iter()
        .map(|r| r["child"]["maxrss_kib"].as_f64().unwrap_or(0.0) / 1024.0)
        .collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let summary = json!({
        "runs": runs,
        "jobs_per_run": per_run,
        "jobs": jobs,
        "node_manifests": node_manifests,
        "run_wall_s_first": walls.first(),
        "run_wall_s_last": walls.last(),
        "run_wall_s_max": max(&walls),
        "run_fraction_of_interval_max": max(&walls) / 300.0,
        "peak_rss_mib_max": max(&rss),
        "db_bytes": db_bytes,
        "db_bytes_per_million_jobs": per_million,
        "list_all_s": list_s,
        "read_rows_once_s": baseline_s,
        "list_vs_read_once": list_s / baseline_s,
        "energy_sum_j": sum,
        "vm_series": series,
        "sacct_needed_jobs_per_s": needed,
        "sacct_measured_jobs_per_s": SACCT_MEASURED_JOBS_PER_S,
        "per_run": rows,
        "sealed_days": sealed
            .iter()
            .map(|(name, wall, child)| json!({"run": name, "wall_s": wall, "child": child}))
            .collect::<Vec<_>>(),
        "past_horizon": past
            .iter()
            .map(|(name, wall, child)| json!({"run": name, "wall_s": wall, "child": child}))
            .collect::<Vec<_>>(),
    });
    println!();
    println!("scale: {runs} timer runs of {per_run} new jobs (1 M jobs/day ÷ 288 runs/day); {jobs} jobs, {node_manifests} node manifests");
    println!("| figure | value |");
    println!("|---|---|");
    println!("| run time, first / last / max | {:.1} / {:.1} / {:.1} s ({:.1} % of the 300 s interval at most) |", walls[0], walls[walls.len() - 1], max(&walls), max(&walls) / 3.0);
    println!("| peak RSS of a run (max) | {:.0} MiB |", max(&rss));
    println!(
        "| job-records database | {:.1} MB for {jobs} jobs = {:.0} MB per million jobs |",
        db_bytes as f64 / 1e6,
        per_million / 1e6
    );
    println!("| list every job (`ergon jobs` query) vs reading the rows once | {list_s:.3} s vs {baseline_s:.3} s = {:.2}× |", list_s / baseline_s);
    println!(
        "| series in VictoriaMetrics after run 1 / last | {} / {series} for {} / {jobs} jobs ({USERS} users) |",
        rows[0]["series"], per_run
    );
    println!("| sacct writes needed at 1 M jobs/day vs measured (parallel 8) | {needed:.1} vs {SACCT_MEASURED_JOBS_PER_S} jobs/s |");
    println!();
    println!("sealed days: every node directory so far aged 2 h (its day is over), then runs with nothing new");
    println!("| run | wall | peak RSS | manifests listed (known) | in sealed directories, not listed | directories sealed |");
    println!("|---|---|---|---|---|---|");
    for (name, wall, child) in &sealed {
        println!(
            "| {name} | {wall:.2} s | {:.0} MiB | {} | {} | {} |",
            child["maxrss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            child["manifests_known"],
            child["manifests_in_skipped_dirs"],
            child["dirs_sealed"]
        );
    }
    let (w_sealed, w_all) = (sealed[1].1, sealed[2].1);
    let rss = |i: usize| sealed[i].2["maxrss_kib"].as_f64().unwrap_or(0.0);
    println!(
        "sealed vs listing everything (--rescan), nothing new: wall {:.2}x, peak RSS {:.2}x",
        w_sealed / w_all,
        rss(1) / rss(2)
    );
    println!();
    println!("past the horizon: max_age_days = 0 removes every job from the ledger; its manifests stay in the spool");
    println!("| run | wall | peak RSS | manifests read | skipped before the horizon | in sealed directories, not listed | directories sealed |");
    println!("|---|---|---|---|---|---|---|");
    for (name, wall, child) in &past {
        println!(
            "| {name} | {wall:.2} s | {:.0} MiB | {} | {} | {} | {} |",
            child["maxrss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            child["manifests_read"],
            child["skipped_before_horizon"],
            child["manifests_in_skipped_dirs"],
            child["dirs_sealed"]
        );
    }
    let rss = |i: usize| past[i].2["maxrss_kib"].as_f64().unwrap_or(0.0);
    println!(
        "sealed vs reading them all (each run's cost for such directories before they could be sealed): wall {:.2}x, peak RSS {:.2}x",
        past[2].1 / past[1].1,
        rss(2) / rss(1)
    );
    if let Some(path) = json_path {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&summary).unwrap() + "\n",
        )
        .unwrap();
        println!("\nresults: {path}");
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// `YYYY-MM-DD` (UTC) of Unix ns, as ergond's sharded layout names a day.
fn day(unix_ns: u64) -> String {
    let t = ergon_accounting::records::format_time(unix_ns);
    t[..10].to_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Vm {
    child: Child,
    port: u16,
}

impl Vm {
    fn start(data: &Path) -> Vm {
        let port = free_port();
        let child = Command::new(VM)
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", data.display()))
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting /usr/bin/victoria-metrics (scripts/slurm-cluster install)");
        let vm = Vm { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if get(&format!("http://127.0.0.1:{port}/health")).is_some() {
                return vm;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("victoria-metrics did not become healthy on port {port}");
    }

    /// Series named `ergon_…` over the last day.
    fn series(&self) -> usize {
        let now = now_ns() / 1_000_000_000;
        let text = get(&format!(
            "http://127.0.0.1:{}/api/v1/series?match[]=%7B__name__%3D~%22ergon_.%2B%22%7D&start={}&end={}",
            self.port,
            now - 86_400,
            now + 60
        ))
        .expect("/api/v1/series");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["data"].as_array().map_or(0, Vec::len)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> Option<String> {
    let r = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .ok()?
        .get(url)
        .send()
        .ok()?;
    r.status().is_success().then(|| r.text().unwrap())
}

/// The spool's days over: every node directory so far aged by 2 h (past `SEAL_AFTER`), then
/// three runs with nothing new: the first seals the directories, the second skips them, the
/// third lists everything (`--rescan`, which also checks every seal again). (name, wall s,
/// the child's JSON line) of each.
fn sealed_days(spool: &Path, config: &Path) -> Vec<(&'static str, f64, Value)> {
    let aged = std::time::SystemTime::now() - Duration::from_secs(7200);
    for day in std::fs::read_dir(spool).unwrap() {
        for node in std::fs::read_dir(day.unwrap().path()).unwrap() {
            std::fs::File::open(node.unwrap().path())
                .unwrap()
                .set_modified(aged)
                .unwrap();
        }
    }
    let mut out = Vec::new();
    for (name, rescan) in [
        ("sealing run", false),
        ("sealed", false),
        ("--rescan", true),
    ] {
        let (wall, child) = run_child_with(config, rescan);
        assert_eq!(child["collected"], 0, "{child}");
        eprintln!(
            "{name}: {wall:.2} s, peak RSS {:.0} MiB, {} manifests known, {} in sealed directories, {} sealed",
            child["maxrss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            child["manifests_known"],
            child["manifests_in_skipped_dirs"],
            child["dirs_sealed"]
        );
        out.push((name, wall, child));
    }
    out
}

/// Every job past the age bound (`max_age_days = 0`: the ledger is emptied, the horizon moves
/// to the newest job), the manifests still in the spool, every directory old enough to seal:
/// a run with `--rescan` (the first: it prunes, reads every manifest, skips each as before the
/// horizon and seals every directory), another (`--rescan`: reads them all again, as every run
/// did, before such directories could be sealed, for a directory whose jobs passed the horizon
/// unsealed: a spool from before sealing, or a directory changed since), then one without
/// (sealed). (name, wall s,
/// the child's JSON line) of each.
fn past_horizon(config: &Path) -> Vec<(&'static str, f64, Value)> {
    let aged = config.with_file_name("accounting-aged.toml");
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(&aged, text + "\n[state]\nmax_age_days = 0\n").unwrap();
    let mut out = Vec::new();
    for (name, rescan) in [
        ("pruning run (--rescan)", true),
        ("reading them all (--rescan)", true),
        ("sealed", false),
    ] {
        let (wall, child) = run_child_with(&aged, rescan);
        assert_eq!(child["collected"], 0, "{child}");
        eprintln!(
            "{name}: {wall:.2} s, peak RSS {:.0} MiB, {} manifests read, {} jobs before the horizon, {} in sealed directories, {} sealed",
            child["maxrss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            child["manifests_read"],
            child["skipped_before_horizon"],
            child["manifests_in_skipped_dirs"],
            child["dirs_sealed"]
        );
        out.push((name, wall, child));
    }
    out
}

/// Run `ergon run` in a child process; (wall seconds, the child's JSON line).
fn run_child(config: &Path) -> (f64, Value) {
    run_child_with(config, false)
}

/// [`run_child`], with `--rescan` or without.
fn run_child_with(config: &Path, rescan: bool) -> (f64, Value) {
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .arg(if rescan {
            "--child-rescan"
        } else {
            "--child-run"
        })
        .arg(config)
        .stderr(Stdio::inherit())
        .output()
        .expect("running the child");
    let wall = start.elapsed().as_secs_f64();
    assert!(out.status.success(), "child run failed: {:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().expect("the child prints its figures");
    (wall, serde_json::from_str(line).unwrap())
}

/// The child: one `ergon run`, then its figures as one JSON line.
fn child_run(config_path: &Path, rescan: bool) {
    let config = Config::load(config_path).expect("config");
    let summary = run(
        &config,
        RunOptions {
            dry_run: false,
            progress: false,
            sequential: false,
            rescan,
        },
    )
    .expect("ergon run");
    println!(
        "{}",
        json!({
            "collected": summary.collected,
            "manifests_read": summary.manifests_read,
            "manifests_known": summary.manifests_known,
            "manifests_in_skipped_dirs": summary.manifests_in_skipped_dirs,
            "skipped_before_horizon": summary.skipped_before_horizon,
            "dirs_skipped": summary.dirs_skipped,
            "dirs_sealed": summary.dirs_sealed,
            "complete": summary.complete(),
            "scan_s": summary.timings.scan.as_secs_f64(),
            "state_bytes_max": summary.timings.state_bytes_max,
            // After the run: delivered jobs have moved to the ledger.
            "state_bytes_final": file_len(&ergon_accounting::state::State::path(&config.state_dir)),
            "ledger_bytes": file_len(&ergon_accounting::ledger::Ledger::path(&config.state_dir)),
            "run_s": summary.timings.total.as_secs_f64(),
            "maxrss_kib": ergon_testkit::peak_rss_kib(),
        })
    );
}
