//! `scripts/bench sampler`: what the sampler costs, against a Python pynvml sampler.
//!
//! Builds a fake node in a temporary directory: 8 GPUs of the fake NVML library (energy counter
//! updated every 100 ms, like recent data-centre GPUs), 4 RAPL zones (a generated 2-socket
//! powercap tree), 64 job cgroups (a generated cgroup v1 `cpuacct` tree, all registered with
//! `watch_cgroup`) and a 64-CPU `/proc/stat` with its sysfs topology. Then, for the default rates
//! and the profiling rates in turn, it runs the sampler for `--seconds` after a 1 s warm-up and
//! measures, from the sampler's own snapshot and the process:
//!
//! * CPU time per tick of each sampler thread (its `pthread_getcpuclockid` clock);
//! * achieved rate, missed ticks, tick lateness and read latency p50/p99 (the health window is
//!   sized to hold every tick of the run);
//! * % of one core (sampler threads, and the whole process from `getrusage`);
//! * VmRSS after the warm-up and every second after, and whether it stayed flat;
//! * heap allocations made by the sampler threads after the warm-up (a counting allocator; the
//!   main thread, which only measures, is not counted).
//!
//! Each mode is followed by the Python baseline (`--python`, run with `LD_LIBRARY_PATH` pointing
//! at the same copy of the fake library, named `libnvidia-ml.so.1` as pynvml loads it) at the
//! same GPU period, and the ratio of CPU time per GPU sample.
//!
//! Writes one JSON object per line to `--json` and prints a table.

use ergon_testkit::{
    write_cgroup_v1_usage, write_cpu_topology, write_proc_stat, PowercapLayout, PowercapTree,
};
use ergond::config::Config;
use ergond::sampler::{
    detect_gpu_counter_period, Sampler, SamplerHandle, SamplerOptions, SamplerSources,
    DETECT_BUDGET,
};
use ergond::snapshot::{NodeSnapshot, SamplerHealth};
use serde_json::{json, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counts heap allocations made by every thread except those that opted out.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static NOT_COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if !NOT_COUNTED.try_with(Cell::get).unwrap_or(true) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; counting has no effect on
// the memory returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const GPUS: usize = 8;
const CGROUPS: usize = 64;
const CPUS: u32 = 64;
const COUNTER_PERIOD_MS: f64 = 100.0;
/// ergond's CPU per GPU sample over the floor loop's (see [`floor_loop`]).
const FLOOR_RATIO_TARGET: f64 = 1.2;

struct Args {
    fake_nvml: PathBuf,
    python: Option<PathBuf>,
    seconds: f64,
    json: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        fake_nvml: PathBuf::new(),
        python: None,
        seconds: 20.0,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--fake-nvml" => a.fake_nvml = PathBuf::from(v()),
            "--python" => a.python = Some(PathBuf::from(v())),
            "--seconds" => a.seconds = v().parse().expect("--seconds N"),
            "--json" => a.json = Some(PathBuf::from(v())),
            other => panic!(
                "unknown argument {other}; usage: bench_sampler --fake-nvml LIB [--python \
                 SCRIPT] [--seconds N] [--json FILE]"
            ),
        }
    }
    assert!(
        a.fake_nvml.is_file(),
        "--fake-nvml must name the built fake library (target/release/libnvidia_ml.so)"
    );
    a
}

/// The fake node: trees and configuration.
struct Node {
    _dir: tempfile::TempDir,
    nvml_dir: PathBuf,
    config: Config,
    cgroups: Vec<String>,
}

fn build_node(fake_nvml: &Path) -> Node {
    let dir = tempfile::tempdir().expect("temporary directory");
    let nvml_dir = dir.path().join("nvml");
    std::fs::create_dir_all(&nvml_dir).unwrap();
    let lib = nvml_dir.join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml, &lib).expect("copy the fake NVML library");
    let profiles = [
        json!({"kind": "constant", "watts": 310.0}),
        json!({"kind": "square", "low_w": 90.0, "high_w": 650.0, "period_s": 2.0}),
        json!({"kind": "ramp", "from_w": 80.0, "to_w": 700.0, "period_s": 5.0}),
        json!({"kind": "constant", "watts": 120.0}),
    ];
    let gpus: Vec<Value> = (0..GPUS)
        .map(|i| {
            json!({"uuid": format!("GPU-bench000-0000-0000-0000-{i:012}"), "name": "Fake H100",
                   "minor": i, "profile": profiles[i % profiles.len()],
                   "update_period_ms": COUNTER_PERIOD_MS,
                   "initial_energy_mj": 1_000_000_000u64 + i as u64})
        })
        .collect();
    std::fs::write(
        format!("{}.scenario.json", lib.display()),
        serde_json::to_vec(&json!({ "gpus": gpus })).unwrap(),
    )
    .unwrap();

    let powercap = PowercapTree::create(
        &dir.path().join("powercap"),
        &PowercapLayout::IntelServer { sockets: 2 }.zones(),
    );
    for (z, v) in [
        ("intel-rapl:0", 123_456_789_012u64),
        ("intel-rapl:0:0", 23_456_789_012),
        ("intel-rapl:1", 133_456_789_012),
        ("intel-rapl:1:0", 33_456_789_012),
    ] {
        powercap.set_energy_uj(z, v);
    }
    let cgroup_root = dir.path().join("cgroup");
    let cgroups: Vec<String> = (0..CGROUPS)
        .map(|i| {
            format!(
                "slurm_node0042/uid_{}/job_{}",
                10_000 + i % 8,
                4_200_000 + i
            )
        })
        .collect();
    for (i, c) in cgroups.iter().enumerate() {
        write_cgroup_v1_usage(&cgroup_root, c, 987_654_321_000 + i as u64);
    }
    let sys = dir.path().join("sys");
    let cpus: Vec<(u32, u32, u32)> = (0..CPUS).map(|c| (c, c / (CPUS / 2), 0)).collect();
    write_cpu_topology(&sys, &cpus);
    let proc = dir.path().join("proc");
    let stat: Vec<(u32, [u64; 8])> = (0..CPUS)
        .map(|c| {
            let b = 1_000_000 + u64::from(c) * 1_000;
            (c, [b, 10, b / 4, 8 * b, 100, 10, 20, 0])
        })
        .collect();
    write_proc_stat(&proc, &stat);
    let config = Config {
        nvml_library: Some(lib),
        powercap_root: powercap.root().to_path_buf(),
        perf_sysfs_root: dir.path().join("no-perf"),
        sysfs_root: sys,
        cgroup_root,
        proc_root: proc,
        prefer_perf: false,
        ..Config::default()
    };
    Node {
        _dir: dir,
        nvml_dir,
        config,
        cgroups,
    }
}

fn vm_rss_kib() -> u64 {
    ergon_testkit::proc_status_kib("self", "VmRSS")
}

fn process_cpu_ns() -> u64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let ru = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage of this process");
    let tv =
        |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000_000 + t.tv_usec() as u64 * 1_000;
    tv(ru.user_time()) + tv(ru.system_time())
}

fn health<'a>(s: &'a NodeSnapshot, source: &str) -> &'a SamplerHealth {
    s.samplers.iter().find(|h| h.source == source).unwrap()
}

fn thread_cpu(s: &NodeSnapshot, name: &str) -> u64 {
    s.threads
        .iter()
        .find(|t| t.name == name)
        .and_then(|t| t.cpu_ns)
        .unwrap_or(0)
}

struct Measured {
    seconds: f64,
    before: NodeSnapshot,
    after: NodeSnapshot,
    process_cpu_ns: u64,
    rss_kib: Vec<u64>,
    allocations: u64,
    /// The GPU thread's CPU time (ns) and GPU ticks in each whole second of the run.
    gpu_per_second: Vec<(u64, u64)>,
}

fn measure(h: SamplerHandle, node: &Node, seconds: f64) -> Measured {
    for c in &node.cgroups {
        h.watch_cgroup(c).expect("watch a generated cgroup");
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = h.snapshot();
    drop(h.snapshot()); // the reader's copies are now in the allocator's free lists
    let cpu0 = process_cpu_ns();
    let alloc0 = ALLOCATIONS.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut rss_kib = vec![vm_rss_kib()];
    let end = t0 + Duration::from_secs_f64(seconds);
    let mut next = t0;
    let gpu_at = |s: &NodeSnapshot| (thread_cpu(s, "ergond-gpu"), health(s, "gpu").samples);
    let mut gpu_prev = gpu_at(&before);
    let mut gpu_per_second = Vec::new();
    loop {
        next += Duration::from_secs(1);
        let now = Instant::now();
        if next >= end {
            std::thread::sleep(end.saturating_duration_since(now));
            break;
        }
        std::thread::sleep(next.saturating_duration_since(now));
        rss_kib.push(vm_rss_kib());
        let g = gpu_at(&h.snapshot());
        gpu_per_second.push((g.0 - gpu_prev.0, g.1 - gpu_prev.1));
        gpu_prev = g;
    }
    // RSS before the snapshot below, whose copies (the health windows) are the reader's memory.
    rss_kib.push(vm_rss_kib());
    let after = h.snapshot();
    let elapsed = t0.elapsed().as_secs_f64();
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - alloc0;
    let process_cpu_ns = process_cpu_ns() - cpu0;
    drop(h);
    Measured {
        seconds: elapsed,
        before,
        after,
        process_cpu_ns,
        rss_kib,
        allocations,
        gpu_per_second,
    }
}

/// What the floor loop measured: CPU time over its ticks, and whether every driver call
/// succeeded.
struct Floor {
    cpu_ns: u64,
    ticks: u64,
    calls_ok: bool,
    /// CPU time (ns) and ticks of each whole second of the run.
    per_second: Vec<(u64, u64)>,
}

/// The floor of any periodic GPU sampler making ergond's driver calls: a thread that sleeps to
/// absolute deadlines every `period` (timer slack 1 ns, as ergond's sampler threads) and at each
/// makes exactly the NVML calls ergond's read makes for every GPU, on its own handles to the
/// same library — nothing else. Runs for `seconds` from `start_ns` (CLOCK_MONOTONIC), while
/// ergond's sampler runs, so both see the same machine.
fn floor_loop(node: &Node, period: Duration, start_ns: u64, seconds: f64) -> Floor {
    let (sources, problems) = SamplerSources::open(&node.config);
    assert!(problems.is_empty(), "{problems:?}");
    let gpu = sources.gpu.expect("the fake node has GPUs");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                use ergond::clock::{fine_timer_slack, sleep_until, thread_cpu_ns};
                NOT_COUNTED.with(|c| c.set(true));
                fine_timer_slack();
                let p = period.as_nanos() as u64;
                let ticks = (seconds * 1e9 / p as f64) as u64;
                let per_s = (1e9 / p as f64).round().max(1.0) as u64;
                let mut calls_ok = true;
                let mut per_second = Vec::new();
                sleep_until(start_ns.saturating_sub(p));
                let c0 = thread_cpu_ns();
                let mut c_s = c0;
                for k in 0..ticks {
                    sleep_until(start_ns + k * p);
                    for i in 0..gpu.len() {
                        calls_ok &= gpu.driver_calls_only(i);
                    }
                    if (k + 1) % per_s == 0 {
                        let c = thread_cpu_ns();
                        per_second.push((c - c_s, per_s));
                        c_s = c;
                    }
                }
                Floor {
                    cpu_ns: thread_cpu_ns() - c0,
                    ticks,
                    calls_ok,
                    per_second,
                }
            })
            .join()
            .unwrap()
    })
}

/// CPU time per tick of a thread that ticks like the sampler (absolute CLOCK_MONOTONIC
/// deadlines, timer slack 1 ns) and does nothing else: the cost of waking up, which every
/// sampler pays once per tick whatever it reads.
fn idle_tick_cpu_ns(period: Duration, seconds: f64) -> f64 {
    std::thread::spawn(move || {
        use ergond::clock::{fine_timer_slack, monotonic_ns, sleep_until, thread_cpu_ns};
        fine_timer_slack();
        let p = period.as_nanos() as u64;
        let ticks = (seconds * 1e9 / p as f64) as u64;
        let start = monotonic_ns() + p;
        let c0 = thread_cpu_ns();
        for k in 0..ticks {
            sleep_until(start + k * p);
        }
        (thread_cpu_ns() - c0) as f64 / ticks.max(1) as f64
    })
    .join()
    .unwrap()
}

fn run_python(script: &Path, node: &Node, period: Duration, seconds: f64) -> Option<Value> {
    let out = Command::new("python3")
        .arg(script)
        .args(["--period-ms", &format!("{}", period.as_secs_f64() * 1e3)])
        .args(["--seconds", &seconds.to_string()])
        .args(["--gpus", &GPUS.to_string()])
        .env("LD_LIBRARY_PATH", &node.nvml_dir)
        .output()
        .expect("run python3");
    if !out.status.success() {
        eprintln!(
            "python baseline failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn main() {
    NOT_COUNTED.with(|c| c.set(true));
    let args = parse_args();
    let node = build_node(&args.fake_nvml);
    let mut lines: Vec<Value> = Vec::new();
    let mut table: Vec<String> = Vec::new();

    // Detect the counter period once, as Sampler::start does.
    let detected = {
        let (mut sources, problems) = SamplerSources::open(&node.config);
        assert!(problems.is_empty(), "{problems:?}");
        detect_gpu_counter_period(sources.gpu.as_mut().unwrap(), DETECT_BUDGET)
    };
    eprintln!("detected GPU counter period: {detected:?}");

    for mode in ["default", "profiling"] {
        let (sources, problems) = SamplerSources::open(&node.config);
        assert!(problems.is_empty(), "{problems:?}");
        let s = &node.config.sampling;
        let mut opts = match mode {
            "default" => SamplerOptions::from_config(s, detected),
            _ => SamplerOptions::profiling(s, detected),
        };
        // Hold every tick of the run (1 kHz × seconds + warm-up) in the health window.
        opts.latency_window = ((args.seconds + 2.0) * 1000.0) as usize;
        let gpu_period = opts.gpu_period;
        eprintln!(
            "==> ergond sampler, {mode} rates: {opts:?}, {} s",
            args.seconds
        );
        let h = Sampler::start_with(opts.clone(), sources).expect("start the sampler");
        // The floor runs beside the sampler over the measured window (after the 1 s warm-up).
        // Its phase against the sampler's ticks is arbitrary; a tick's reads take about 1 %
        // of the GPU period, so the two rarely meet at the fake library's lock.
        let floor_start = ergond::clock::monotonic_ns() + 1_000_000_000;
        let (m, floor) = std::thread::scope(|scope| {
            let f = scope.spawn(|| floor_loop(&node, gpu_period, floor_start, args.seconds));
            let m = measure(h, &node, args.seconds);
            (m, f.join().unwrap())
        });
        let (b, a) = (&m.before, &m.after);
        let gpu_cpu = thread_cpu(a, "ergond-gpu") - thread_cpu(b, "ergond-gpu");
        let cpu_cpu = thread_cpu(a, "ergond-cpu") - thread_cpu(b, "ergond-cpu");
        let mut per_source = Vec::new();
        for src in ["gpu", "rapl", "cgroup"] {
            let (hb, ha) = (health(b, src), health(a, src));
            let ticks = ha.samples - hb.samples;
            per_source.push(json!({
                "source": src,
                "period_ms": ha.period_ns as f64 / 1e6,
                "target_hz": 1e9 / ha.period_ns as f64,
                "achieved_hz": ticks as f64 / m.seconds,
                "ticks": ticks,
                "missed_ticks": ha.missed_ticks - hb.missed_ticks,
                "read_errors": ha.read_errors - hb.read_errors,
                "lateness_p50_us": ha.lateness_p50_ns as f64 / 1e3,
                "lateness_p99_us": ha.lateness_p99_ns as f64 / 1e3,
                "lateness_max_us": ha.max_lateness_ns as f64 / 1e3,
                "read_latency_p50_us": ha.read_latency_p50_ns as f64 / 1e3,
                "read_latency_p99_us": ha.read_latency_p99_ns as f64 / 1e3,
            }));
        }
        let gpu_ticks = health(a, "gpu").samples - health(b, "gpu").samples;
        let cpu_ticks = health(a, "rapl").samples - health(b, "rapl").samples;
        let threads_pct = (gpu_cpu + cpu_cpu) as f64 / (m.seconds * 1e9) * 100.0;
        let process_pct = m.process_cpu_ns as f64 / (m.seconds * 1e9) * 100.0;
        let rss_start = m.rss_kib[0];
        let rss_end = *m.rss_kib.last().unwrap();
        let rss_max = *m.rss_kib.iter().max().unwrap();
        let rss_flat = rss_max <= rss_start + 64;
        let target_pct = if mode == "default" { 0.5 } else { 5.0 };
        let gpu_sample_ns = gpu_cpu as f64 / (gpu_ticks * GPUS as u64).max(1) as f64;
        let line = json!({
            "group": "sampler", "kind": "ergond", "mode": mode, "seconds": m.seconds,
            "gpus": GPUS, "zones": a.zones.len(), "cgroups": a.cgroups.len(),
            "sockets": a.sockets.len(),
            "sources": per_source,
            "gpu_thread_cpu_per_tick_us": gpu_cpu as f64 / gpu_ticks.max(1) as f64 / 1e3,
            "gpu_thread_cpu_per_gpu_sample_us": gpu_sample_ns / 1e3,
            "cpu_thread_cpu_per_tick_us": cpu_cpu as f64 / cpu_ticks.max(1) as f64 / 1e3,
            "gpu_thread_core_pct": gpu_cpu as f64 / (m.seconds * 1e9) * 100.0,
            "cpu_thread_core_pct": cpu_cpu as f64 / (m.seconds * 1e9) * 100.0,
            "threads_core_pct": threads_pct,
            "process_core_pct": process_pct,
            "target_core_pct": target_pct,
            "core_target_met": threads_pct <= target_pct && process_pct <= target_pct,
            "rss_kib_start": rss_start, "rss_kib_end": rss_end, "rss_kib_max": rss_max,
            "rss_kib_series": m.rss_kib,
            "rss_flat": rss_flat,
            "rss_target_met": rss_max <= 20 * 1024 && rss_flat,
            "sampler_allocations": m.allocations,
            "sampler_allocations_per_tick":
                m.allocations as f64 / (gpu_ticks + cpu_ticks).max(1) as f64,
        });
        table.push(format!(
            "ergond {mode:<9}  gpu {:>6.1} Hz ({:>5.1} target) {:>6.2} µs/tick  cpu-thread {:>7.1} Hz ({:>6.1} target) {:>6.2} µs/tick | threads {:.3} % core, process {:.3} % (target <= {target_pct} %: {}) | lateness p50/p99 gpu {:.0}/{:.0} µs, rapl {:.0}/{:.0} µs | RSS {} -> {} KiB (max {}, {}) | allocs after warm-up {}",
            gpu_ticks as f64 / m.seconds,
            1e9 / health(a, "gpu").period_ns as f64,
            gpu_cpu as f64 / gpu_ticks.max(1) as f64 / 1e3,
            cpu_ticks as f64 / m.seconds,
            1e9 / health(a, "rapl").period_ns as f64,
            cpu_cpu as f64 / cpu_ticks.max(1) as f64 / 1e3,
            threads_pct,
            process_pct,
            if line["core_target_met"] == true { "ok" } else { "MISSED" },
            health(a, "gpu").lateness_p50_ns as f64 / 1e3,
            health(a, "gpu").lateness_p99_ns as f64 / 1e3,
            health(a, "rapl").lateness_p50_ns as f64 / 1e3,
            health(a, "rapl").lateness_p99_ns as f64 / 1e3,
            rss_start,
            rss_end,
            rss_max,
            if rss_flat { "flat" } else { "GREW" },
            m.allocations,
        ));
        lines.push(line);

        // ergond's GPU thread against the floor loop, per GPU sample (same period, same GPUs,
        // same calls, same window).
        // Per second, then the median of the seconds' ratios: a burst of load from elsewhere
        // on a shared machine spoils a second or two, not the figure.
        let floor_ns = floor.cpu_ns as f64 / (floor.ticks * GPUS as u64).max(1) as f64;
        let per_tick = |(cpu, ticks): (u64, u64)| cpu as f64 / ticks.max(1) as f64;
        let mut ratios: Vec<f64> = m
            .gpu_per_second
            .iter()
            .zip(&floor.per_second)
            .filter(|(g, f)| g.1 > 0 && f.1 > 0)
            .map(|(g, f)| per_tick(*g) / per_tick(*f))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let floor_ratio = match ratios.len() {
            0 => gpu_sample_ns / floor_ns,
            n if n % 2 == 1 => ratios[n / 2],
            n => (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0,
        };
        let floor_met = floor_ratio <= FLOOR_RATIO_TARGET && floor.calls_ok;
        table.push(format!(
            "floor  {mode:<9}  {:.2} µs CPU per GPU sample (a loop making only the same NVML calls at the same period) | ergond {:.2} µs | ratio, median of {} seconds: {floor_ratio:.2}x (target <= {FLOOR_RATIO_TARGET}x: {})",
            floor_ns / 1e3,
            gpu_sample_ns / 1e3,
            ratios.len(),
            if floor_met { "met" } else { "MISSED" },
        ));
        lines.push(json!({"group": "sampler", "kind": "floor", "mode": mode,
            "period_ms": gpu_period.as_secs_f64() * 1e3, "ticks": floor.ticks,
            "calls_ok": floor.calls_ok,
            "floor_gpu_sample_us": floor_ns / 1e3,
            "ergond_gpu_sample_us": gpu_sample_ns / 1e3,
            "whole_run_ratio": gpu_sample_ns / floor_ns,
            "per_second_ratios": ratios,
            "ratio": floor_ratio, "target": format!("<= {FLOOR_RATIO_TARGET} (median of the per-second ratios)"),
            "target_met": floor_met}));

        // The wake-up cost alone, at the GPU period, for the net figures below.
        let idle_ns = idle_tick_cpu_ns(gpu_period, args.seconds.min(5.0));
        let gpu_net_ns =
            (gpu_cpu as f64 / gpu_ticks.max(1) as f64 - idle_ns).max(0.0) / GPUS as f64;
        table.push(format!(
            "idle tick {mode:<9} {:.2} µs CPU per wake-up at {gpu_period:?}: ergond net of it {:.2} µs per GPU sample",
            idle_ns / 1e3,
            gpu_net_ns / 1e3
        ));
        lines.push(
            json!({"group": "sampler", "kind": "idle_tick", "mode": mode,
            "period_ms": gpu_period.as_secs_f64() * 1e3, "cpu_per_tick_us": idle_ns / 1e3,
            "ergond_net_gpu_sample_us": gpu_net_ns / 1e3}),
        );

        if let Some(script) = &args.python {
            eprintln!("==> pynvml baseline at {gpu_period:?}, {} s", args.seconds);
            if let Some(mut py) = run_python(script, &node, gpu_period, args.seconds) {
                let py_ns = py["thread_cpu_ns_per_gpu_sample"]
                    .as_f64()
                    .unwrap_or(f64::NAN);
                let ratio = py_ns / gpu_sample_ns;
                let py_tick_ns = py_ns * GPUS as f64;
                let py_net_ns = (py_tick_ns - idle_ns).max(0.0) / GPUS as f64;
                // The idle tick is measured separately and is noisy: when it costs as much as
                // the sampler's whole tick, the net figures say nothing.
                let net_ratio = if gpu_net_ns > 0.0 && py_net_ns > 0.0 {
                    py_net_ns / gpu_net_ns
                } else {
                    f64::NAN
                };
                py["group"] = json!("sampler");
                py["kind"] = json!("pynvml");
                py["mode"] = json!(mode);
                table.push(format!(
                    "pynvml {mode:<9}  gpu {:>6.1} Hz, {:.2} µs CPU per GPU sample (thread), {:.3} % core (process) | ergond {:.2} µs per GPU sample: pynvml costs {:.1}x (information; the target is the floor ratio above); net of the wake-up: pynvml {:.2} µs, ergond {:.2} µs, {}",
                    py["achieved_hz"].as_f64().unwrap_or(0.0),
                    py_ns / 1e3,
                    py["process_core_pct"].as_f64().unwrap_or(0.0),
                    gpu_sample_ns / 1e3,
                    ratio,
                    py_net_ns / 1e3,
                    gpu_net_ns / 1e3,
                    if net_ratio.is_finite() {
                        format!("{net_ratio:.1}x")
                    } else {
                        "no ratio (ergond's net cost is within the idle tick's noise)".to_owned()
                    },
                ));
                lines.push(py);
                lines.push(json!({"group": "sampler", "kind": "ratio", "mode": mode,
                    "ergond_gpu_sample_us": gpu_sample_ns / 1e3,
                    "pynvml_gpu_sample_us": py_ns / 1e3,
                    "ratio": ratio, "information": "pynvml's CPU per GPU sample over ergond's; the target is kind floor",
                    "idle_tick_us": idle_ns / 1e3,
                    "ergond_net_gpu_sample_us": gpu_net_ns / 1e3,
                    "pynvml_net_gpu_sample_us": py_net_ns / 1e3,
                    "net_ratio": net_ratio}));
            }
        }
    }
    println!();
    for l in &table {
        println!("{l}");
    }
    if let Some(path) = &args.json {
        let mut f = std::fs::File::create(path).expect("create the JSON file");
        for l in &lines {
            writeln!(f, "{l}").unwrap();
        }
        println!("\nresults: {}", path.display());
    }
}
