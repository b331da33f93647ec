//! `scripts/bench accounting`: collection + upload throughput of `ergon run` with 100,000 job
//! records, against a private VictoriaMetrics.
//!
//! For each manifest size (`lean`: one GPU, one socket, no trace; `realistic`: 1–4 GPUs, two
//! sockets with DRAM, two steps, sensors and a 600-point power trace per device;
//! `realistic-v1`: the same as schema 1 manifests, traces as decimal arrays, as ergon wrote them
//! before schema 2), it:
//!
//! 1. writes `--jobs` sealed manifests (one node per job) into a temporary spool, the way ergond
//!    writes them (`Manifest::to_json`), and sums their sizes;
//! 2. starts `/usr/bin/victoria-metrics` on a free loopback port with temporary storage;
//! 3. runs `ergon run` (the library's `run::run`, the code the binary calls) in a child process of
//!    its own (so that its peak RSS is its own) with the VictoriaMetrics sink only (sacct and the
//!    job-records database disabled: the baseline feeds VictoriaMetrics alone; `scripts/bench
//!    scale` measures the database), and records the run's step timings;
//! 4. queries VictoriaMetrics (`/api/v1/export`) and checks that every job arrived exactly once;
//! 5. runs `ergon run` again with nothing new (the cost of a cron run over a full spool: the spool
//!    index lets it skip every file unread) and checks that nothing was sent again;
//! 6. writes `--jobs / 100` more manifests and runs `ergon run` once more (a cron run with a little
//!    new work in a full spool), and checks that exactly those jobs were added, once each.
//!
//! Prints a table and, with `--json PATH`, appends one JSON object per size to PATH.
//!
//! The sink verifies what VictoriaMetrics holds (`victoria_metrics.verify`); with
//! `ERGON_BENCH_NO_VERIFY` set it does not, for comparison.
//!
//! `ergon run` pipelines collection and upload; with `ERGON_BENCH_SEQUENTIAL` set in the
//! environment the child runs use the sequential path instead (`RunOptions::sequential`: collect
//! everything, save the whole state, then upload), for comparison.
//!
//! ```text
//! bench_accounting [--jobs N] [--sizes lean,realistic,realistic-v1] [--json PATH]
//! ```

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ergon_accounting::config::Config;
use ergon_accounting::run::{run, RunOptions, RunSummary};
use ergon_protocol::manifest::*;
use ergon_protocol::testing::ManifestBuilder;
use ergon_protocol::StepId;
use serde_json::{json, Value};

const VM: &str = "/usr/bin/victoria-metrics";
const TRACE_POINTS: usize = 600;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child-run") {
        child_run(Path::new(&args[1]));
        return;
    }
    let mut jobs = 100_000u32;
    let mut sizes = vec!["lean".to_string(), "realistic".to_string()];
    let mut json_path: Option<PathBuf> = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--jobs" => jobs = it.next().and_then(|v| v.parse().ok()).expect("--jobs N"),
            "--sizes" => {
                sizes = it
                    .next()
                    .expect("--sizes lean,realistic,realistic-v1")
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            "--json" => json_path = Some(it.next().expect("--json PATH").into()),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        Path::new(VM).exists(),
        "{VM} is missing: apt-get install victoria-metrics (scripts/slurm-cluster install does)"
    );
    let mut rows = Vec::new();
    for size in &sizes {
        let (realistic, schema) = match size.as_str() {
            "lean" => (false, MANIFEST_SCHEMA_VERSION),
            "realistic" => (true, MANIFEST_SCHEMA_VERSION),
            "realistic-v1" => (true, 1),
            other => panic!("unknown size {other} (lean, realistic, realistic-v1)"),
        };
        let row = bench_size(jobs, realistic, schema, size);
        if let Some(path) = &json_path {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("opening the JSON output");
            writeln!(f, "{row}").unwrap();
        }
        rows.push(row);
    }
    print_table(&rows);
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A small deterministic generator, so that every run writes the same manifests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One job's sealed manifest (one node) of schema `schema`. `base_ns`: the newest end time.
fn manifest(job: u32, realistic: bool, schema: u32, base_ns: u64) -> Manifest {
    let mut rng = Rng(u64::from(job).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // Jobs ended over the last ~28 hours, 1 s apart, all older than a minute.
    let end = base_ns - u64::from(job) * 1_000_000_000;
    let duration_s = if realistic { 600.0 } else { 100.0 };
    let start = end - (duration_s * 1e9) as u64;
    let ngpus = if realistic { 1 + (job % 4) } else { 1 };
    let nsockets = if realistic { 2 } else { 1 };
    let node = format!("gpu-node-{:04}", job % 512);
    let gpus: Vec<GpuEnergy> = (0..ngpus)
        .map(|i| {
            let avg = 150.0 + 200.0 * rng.next();
            GpuEnergy {
                uuid: format!("GPU-{:08x}-{:04x}-{:04x}", job, i, job % 512),
                index: i,
                minor: Some(i),
                pci_bus_id: realistic.then(|| format!("00000000:{:02X}:00.0", 0x17 + i * 0x20)),
                energy_j: Some((avg * duration_s).round()),
                avg_w: Some(avg),
                peak_w: Some(avg * 1.4),
                method: EnergyMethod::Counter,
                shared: false,
                mig: None,
                efficiency: None,
            }
        })
        .collect();
    let sockets: Vec<SocketEnergy> = (0..nsockets)
        .map(|s| SocketEnergy {
            socket: s,
            package_j: (90.0 + 60.0 * rng.next()) * duration_s,
            dram_j: realistic.then(|| (10.0 + 5.0 * rng.next()) * duration_s),
            method: EnergyMethod::Counter,
            share_method: ShareMethod::CgroupCpuTime,
        })
        .collect();
    let gpu_j: f64 = gpus.iter().filter_map(|g| g.energy_j).sum();
    let cpu_j: f64 = sockets.iter().map(|s| s.package_j).sum();
    let dram_j: Option<f64> = realistic.then(|| sockets.iter().filter_map(|s| s.dram_j).sum());
    let energy_j = gpu_j + cpu_j + dram_j.unwrap_or(0.0);
    let mut steps = vec![StepEnergy {
        step: StepId::Batch,
        start_unix_ns: start,
        end_unix_ns: end,
        energy_j,
        gpu_j: Some(gpu_j),
        cpu_j: Some(cpu_j),
        dram_j,
    }];
    if realistic {
        steps[0].energy_j = energy_j * 0.1;
        steps[0].gpu_j = Some(gpu_j * 0.1);
        steps[0].cpu_j = Some(cpu_j * 0.1);
        steps[0].dram_j = dram_j.map(|d| d * 0.1);
        steps.push(StepEnergy {
            step: StepId::from_raw(0),
            start_unix_ns: start + 5_000_000_000,
            end_unix_ns: end - 1_000_000_000,
            energy_j: energy_j * 0.9,
            gpu_j: Some(gpu_j * 0.9),
            cpu_j: Some(cpu_j * 0.9),
            dram_j: dram_j.map(|d| d * 0.9),
        });
    }
    let mut series: Vec<(String, Vec<f32>)> = Vec::new();
    if realistic {
        let trace = |mean: f64, rng: &mut Rng| -> Vec<f32> {
            (0..TRACE_POINTS)
                .map(|_| ((mean * (0.8 + 0.4 * rng.next())) * 10.0).round() as f32 / 10.0)
                .collect()
        };
        for g in &gpus {
            series.push((
                format!("gpu{}", g.index),
                trace(g.avg_w.unwrap_or(0.0), &mut rng),
            ));
        }
        for s in &sockets {
            series.push((
                format!("socket{}", s.socket),
                trace(s.package_j / duration_s, &mut rng),
            ));
            series.push((format!("dram{}", s.socket), trace(12.0, &mut rng)));
        }
    }
    let mut m = ManifestBuilder::new("bench", job, &node)
        .schema(schema)
        .user(&format!("user{:03}", job % 200), 10_000 + job % 200)
        .account(&format!("proj{:02}", job % 40))
        .partition("gpu")
        .span(start, end)
        .peak_w(energy_j / duration_s * 1.3)
        .node_context(energy_j + 50.0 * duration_s, 50.0 * duration_s, 0.0)
        .coverage(0.999)
        .trace(if realistic { 1000 } else { 0 }, series);
    if realistic {
        m = m
            .sensor(
                SensorKind::Nvml,
                "535.183.01 / NVML 12.535.183.01",
                &format!("{ngpus} GPUs, total energy counter"),
            )
            .sensor(
                SensorKind::RaplPowercap,
                "6.1.0-21-amd64",
                "intel-rapl:0, intel-rapl:0:0, intel-rapl:1, intel-rapl:1:0",
            )
            .sensor(SensorKind::Cgroup, "v1", "cpuacct.usage");
    }
    for g in gpus {
        m = m.gpu_entry(g);
    }
    for s in sockets {
        m = m.socket_entry(s);
    }
    for s in steps {
        m = m.step(s);
    }
    m.build()
}

/// Write the manifests of `jobs` into `spool` on two threads; the total bytes written. `base`: the end time of job 0 (job `n` ended `n` seconds before).
fn generate(
    spool: &Path,
    jobs: std::ops::RangeInclusive<u32>,
    realistic: bool,
    schema: u32,
    base: u64,
) -> u64 {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4)) as u32;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let jobs = jobs.clone();
                s.spawn(move || {
                    let mut bytes = 0u64;
                    for job in jobs.filter(|j| j % threads == t) {
                        let m = manifest(job, realistic, schema, base);
                        let text = m.to_json().expect("manifest serialises");
                        bytes += text.len() as u64;
                        std::fs::write(spool.join(format!("{job}.{}.json", m.node)), text)
                            .expect("writing a manifest");
                    }
                    bytes
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
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
            .arg("-retentionPeriod=10y")
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting victoria-metrics");
        let vm = Vm { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if get(&vm.url("/health")).is_some() {
                return vm;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("victoria-metrics did not become healthy on port {port}");
    }
    /// CPU seconds victoria-metrics has used (user + system).
    fn cpu_s(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / tick
    }
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
    /// Samples per job id of `ergon_job_energy_j`.
    fn samples_per_job(&self) -> BTreeMap<u32, usize> {
        get(&self.url("/internal/force_flush"));
        let text =
            get(&self.url("/api/v1/export?match[]=ergon_job_energy_j&start=0&end=9999999999"))
                .expect("export from victoria-metrics");
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_str(line).unwrap();
            let job: u32 = v["metric"]["job_id"].as_str().unwrap().parse().unwrap();
            *out.entry(job).or_insert(0) += v["values"].as_array().unwrap().len();
        }
        out
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> Option<String> {
    let r = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .ok()?
        .get(url)
        .send()
        .ok()?;
    r.status().is_success().then(|| r.text().unwrap())
}

/// Run `ergon run` in a child process; (wall seconds, the child's JSON line).
fn run_child(config: &Path) -> (f64, Value) {
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--child-run")
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
fn child_run(config_path: &Path) {
    let config = Config::load(config_path).expect("config");
    let summary: RunSummary = run(
        &config,
        RunOptions {
            dry_run: false,
            progress: false,
            sequential: std::env::var_os("ERGON_BENCH_SEQUENTIAL").is_some(),
            rescan: false,
        },
    )
    .expect("ergon run");
    let t = &summary.timings;
    let upload: f64 = t.upload.values().map(Duration::as_secs_f64).sum();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let cpu = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    println!(
        "{}",
        json!({
            "collected": summary.collected,
            "quarantined": summary.quarantined,
            "manifests_read": summary.manifests_read,
            "manifests_known": summary.manifests_known,
            "delivered": summary.delivered.get("victoria_metrics").copied().unwrap_or(0),
            "pending": summary.pending.get("victoria_metrics").copied().unwrap_or(0),
            "complete": summary.complete(),
            "load_state_s": t.load_state.as_secs_f64(),
            "scan_s": t.scan.as_secs_f64(),
            "combine_s": t.combine.as_secs_f64(),
            "upload_s": upload,
            "state_saves": t.state_saves,
            "state_save_s": t.state_save_time.as_secs_f64(),
            "state_bytes_max": t.state_bytes_max,
            "pipelined": t.pipelined,
            "journal_bytes": t.journal_bytes,
            "journal_syncs": t.journal_syncs,
            "journal_s": t.journal_time.as_secs_f64(),
            "run_s": t.total.as_secs_f64(),
            "user_cpu_s": cpu(usage.user_time()),
            "sys_cpu_s": cpu(usage.system_time()),
            "maxrss_kib": ergon_testkit::peak_rss_kib(),
        })
    );
}

fn bench_size(jobs: u32, realistic: bool, schema: u32, size: &str) -> Value {
    let dir = tempfile::Builder::new()
        .prefix("ergon-bench-accounting.")
        .tempdir()
        .expect("temp dir");
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    eprintln!("[{size}] writing {jobs} manifests into {}", spool.display());
    let t = Instant::now();
    // Jobs 1..=jobs ended over the last ~28 hours (1 s apart), all older than a minute; the
    // later batch (step 6) ended before them, so that the age bound keeps both.
    let base = now_ns() - 120_000_000_000;
    let bytes = generate(&spool, 1..=jobs, realistic, schema, base);
    eprintln!(
        "[{size}] {bytes} bytes ({:.0} per manifest) in {:.1} s",
        bytes as f64 / f64::from(jobs),
        t.elapsed().as_secs_f64()
    );
    let vm = Vm::start(&dir.path().join("vm-data"));
    let state = dir.path().join("state");
    let config = dir.path().join("accounting.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dirs = [{spool:?}]\nquarantine_dir = {:?}\nstate_dir = {state:?}\nsettle_s = 0\n\n[sacct]\nenabled = false\n\n[records]\nenabled = false\n\n[victoria_metrics]\nurl = \"http://127.0.0.1:{}\"\nper_job_series = true\nverify = {}\n",
            dir.path().join("quarantine"),
            vm.port,
            std::env::var_os("ERGON_BENCH_NO_VERIFY").is_none()
        ),
    )
    .unwrap();

    eprintln!("[{size}] ergon run (victoria_metrics only, sacct disabled)");
    let vm_cpu_before = vm.cpu_s();
    let (wall, first) = run_child(&config);
    let vm_cpu_s = vm.cpu_s() - vm_cpu_before;
    let state_bytes_final = std::fs::metadata(state.join("state.json"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!("[{size}] {first}");

    eprintln!("[{size}] checking victoria-metrics");
    let t = Instant::now();
    let per_job = vm.samples_per_job();
    let query_s = t.elapsed().as_secs_f64();
    let missing = (1..=jobs).filter(|j| !per_job.contains_key(j)).count();
    let doubled = per_job.values().filter(|n| **n != 1).count();
    let extra = per_job.keys().filter(|j| **j == 0 || **j > jobs).count();
    let exactly_once = missing == 0 && doubled == 0 && extra == 0;

    eprintln!("[{size}] ergon run again (nothing new)");
    let (rerun_wall, rerun) = run_child(&config);
    let after = vm.samples_per_job();
    let unchanged = after == per_job;
    eprintln!("[{size}] {rerun}");

    let more = (jobs / 100).max(1);
    eprintln!("[{size}] {more} new manifests, ergon run again");
    let more_bytes = generate(&spool, jobs + 1..=jobs + more, realistic, schema, base);
    let (incr_wall, incr) = run_child(&config);
    // New series can take a moment to be searchable: wait up to 30 s for all of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after_incr = vm.samples_per_job();
    while after_incr.len() < (jobs + more) as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        after_incr = vm.samples_per_job();
    }
    let incr_missing = (1..=jobs + more)
        .filter(|j| !after_incr.contains_key(j))
        .count();
    let incr_not_once = after_incr.values().filter(|n| **n != 1).count();
    let incr_exactly_once =
        incr_missing == 0 && incr_not_once == 0 && after_incr.len() == (jobs + more) as usize;
    eprintln!("[{size}] {incr}");

    eprintln!(
        "[{size}] baseline: the same records' line protocol fed by curl to a fresh VictoriaMetrics"
    );
    let batch = Config::load(&config)
        .expect("config")
        .victoria_metrics
        .expect("victoria_metrics section")
        .batch_size;
    let curl = curl_baseline(dir.path(), 1..=jobs, (realistic, schema, base), batch);
    eprintln!("[{size}] {curl}");

    let n = f64::from(jobs);
    let collect_s = first["scan_s"].as_f64().unwrap() + first["combine_s"].as_f64().unwrap();
    let upload_s = first["upload_s"].as_f64().unwrap();
    let e2e = n / wall;
    json!({
        "group": "accounting",
        "kind": "collect_upload",
        "size": size,
        "jobs": jobs,
        "manifest_bytes_total": bytes,
        "manifest_bytes_mean": (bytes as f64 / n).round(),
        "collect_s": collect_s,
        "collect_rps": n / collect_s,
        "upload_s": upload_s,
        "upload_rps": n / upload_s,
        "process_wall_s": wall,
        "e2e_rps": e2e,
        "state_bytes_final": state_bytes_final,
        "vm_cpu_s": vm_cpu_s,
        "run": first,
        "vm_jobs": per_job.len(),
        "vm_missing": missing,
        "vm_not_once": doubled,
        "vm_unexpected": extra,
        "vm_query_s": query_s,
        "exactly_once": exactly_once,
        "rerun_wall_s": rerun_wall,
        "rerun": rerun,
        "rerun_sent_nothing": unchanged && rerun["delivered"] == 0,
        "schema_version": schema,
        "incremental_jobs": more,
        "incremental_bytes": more_bytes,
        "incremental_wall_s": incr_wall,
        "incremental": incr,
        "incremental_exactly_once": incr_exactly_once,
        "incremental_vm_missing": incr_missing,
        "incremental_vm_not_once": incr_not_once,
        "target": ">= 5000 records/s end to end",
        "target_met": e2e >= 5000.0 && exactly_once,
        "curl": curl.clone(),
        "ratio": ratios(e2e, &first, &curl, n),
    })
}

/// The accounting targets as ratios against the curl baseline of the same run: `ergon run`'s
/// end-to-end rate ≥ 0.8× the rate at which VictoriaMetrics ingests the same line protocol
/// from curl, and ergon's CPU per record ≤ 0.5× VictoriaMetrics' CPU per record while it
/// ingests it.
fn ratios(e2e_rps: f64, run: &Value, curl: &Value, n: f64) -> Value {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let rate_ratio = e2e_rps / f(&curl["rps"]);
    let ergon_cpu_per_record = (f(&run["user_cpu_s"]) + f(&run["sys_cpu_s"])) / n;
    let vm_cpu_per_record = f(&curl["vm_cpu_s"]) / n;
    let cpu_ratio = ergon_cpu_per_record / vm_cpu_per_record;
    json!({
        "rate_ratio": rate_ratio,
        "rate_target": ">= 0.8",
        "rate_target_met": rate_ratio >= 0.8,
        "ergon_cpu_us_per_record": ergon_cpu_per_record * 1e6,
        "vm_cpu_us_per_record": vm_cpu_per_record * 1e6,
        "cpu_ratio": cpu_ratio,
        "cpu_target": "<= 0.5",
        "cpu_target_met": cpu_ratio <= 0.5,
    })
}

/// The baseline: the line protocol `ergon run` sends for the same jobs (the library's own
/// encoder over the same records, in batches of the sink's size), fed by one curl process (one
/// connection, one POST per batch, `--next`) to a VictoriaMetrics started exactly as ergon's
/// (same binary, same flags, fresh storage: it starts from what ergon's started from).
/// Measured: wall time of curl, VictoriaMetrics' CPU meanwhile.
fn curl_baseline(
    dir: &Path,
    jobs: std::ops::RangeInclusive<u32>,
    (realistic, schema, base): (bool, u32, u64),
    batch: usize,
) -> Value {
    let payload = dir.join("curl-baseline");
    std::fs::create_dir_all(&payload).unwrap();
    let ids: Vec<u32> = jobs.collect();
    let mut files = Vec::new();
    let mut bytes = 0u64;
    for (k, chunk) in ids.chunks(batch).enumerate() {
        let records: Vec<_> = chunk
            .iter()
            .map(|&j| ergon_accounting::collect::combine(&[manifest(j, realistic, schema, base)]))
            .collect();
        let refs: Vec<_> = records.iter().collect();
        let body = ergon_accounting::sinks::line_protocol(&refs);
        bytes += body.len() as u64;
        let f = payload.join(format!("batch-{k:05}.lp"));
        std::fs::write(&f, body).unwrap();
        files.push(f);
    }
    let vm = Vm::start(&dir.join("vm-data-curl"));
    let url = vm.url("/write");
    let mut cmd = Command::new("curl");
    for (k, f) in files.iter().enumerate() {
        if k > 0 {
            cmd.arg("--next");
        }
        cmd.args(["-sS", "--fail", "-o", "/dev/null", "--data-binary"])
            .arg(format!("@{}", f.display()))
            .arg(&url);
    }
    let vm_cpu_before = vm.cpu_s();
    let t = Instant::now();
    let status = cmd.status().expect("run curl (apt-get install curl)");
    let wall = t.elapsed().as_secs_f64();
    let vm_cpu_s = vm.cpu_s() - vm_cpu_before;
    assert!(
        status.success(),
        "curl feeding VictoriaMetrics failed: {status}"
    );
    json!({
        "records": ids.len(),
        "batches": files.len(),
        "batch_size": batch,
        "payload_bytes": bytes,
        "wall_s": wall,
        "rps": ids.len() as f64 / wall,
        "vm_cpu_s": vm_cpu_s,
    })
}

fn print_table(rows: &[Value]) {
    println!();
    println!(
        "| size | jobs | manifest B | collect rec/s | upload rec/s | end-to-end rec/s | run s | scan s | combine s | upload s | saves (s) | state max / final | peak RSS | ergon / VM CPU s | exactly once | re-run s (read / known) | +1 % run s (read) | target ≥ 5000/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let run = &r["run"];
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} ({:.2}) | {:.1} / {:.1} MiB | {:.0} MiB | {:.1} / {:.1} | {} | {:.2} ({} / {}) | {:.2} ({}) | {} |",
            r["size"].as_str().unwrap(),
            r["jobs"],
            f(&r["manifest_bytes_mean"]),
            f(&r["collect_rps"]),
            f(&r["upload_rps"]),
            f(&r["e2e_rps"]),
            f(&r["process_wall_s"]),
            f(&run["scan_s"]),
            f(&run["combine_s"]),
            f(&run["upload_s"]),
            run["state_saves"],
            f(&run["state_save_s"]),
            f(&run["state_bytes_max"]) / 1048576.0,
            f(&r["state_bytes_final"]) / 1048576.0,
            f(&run["maxrss_kib"]) / 1024.0,
            f(&run["user_cpu_s"]) + f(&run["sys_cpu_s"]),
            f(&r["vm_cpu_s"]),
            if r["exactly_once"] == true
                && r["rerun_sent_nothing"] == true
                && r["incremental_exactly_once"] == true
            {
                "yes"
            } else {
                "NO"
            },
            f(&r["rerun_wall_s"]),
            r["rerun"]["manifests_read"],
            r["rerun"]["manifests_known"],
            f(&r["incremental_wall_s"]),
            r["incremental"]["manifests_read"],
            if r["target_met"] == true { "met" } else { "MISSED" },
        );
    }
    println!();
    println!("| size | ergon end-to-end rec/s | curl → VictoriaMetrics rec/s | rate ratio (target ≥ 0.8) | ergon CPU µs/rec | VictoriaMetrics CPU µs/rec (curl feed) | CPU ratio (target ≤ 0.5) |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let q = &r["ratio"];
        let verdict = |b: &Value| if *b == true { "met" } else { "MISSED" };
        println!(
            "| {} | {:.0} | {:.0} | {:.2} ({}) | {:.1} | {:.1} | {:.2} ({}) |",
            r["size"].as_str().unwrap(),
            f(&r["e2e_rps"]),
            f(&r["curl"]["rps"]),
            f(&q["rate_ratio"]),
            verdict(&q["rate_target_met"]),
            f(&q["ergon_cpu_us_per_record"]),
            f(&q["vm_cpu_us_per_record"]),
            f(&q["cpu_ratio"]),
            verdict(&q["cpu_target_met"]),
        );
    }
}
