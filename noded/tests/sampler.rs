//! The sampler end to end: its threads reading the fake NVML library, a generated powercap tree
//! whose counters a writer thread advances (with wraps), and generated cgroup v1 and
//! `/proc/stat` trees. Checked: energies against ground truth, a lost GPU, missed-tick
//! accounting with a slow GPU, bounded buffers, cgroup registration, thread CPU time.

mod common;

use common::profile::{DeviceModel, Profile};
use common::FakeNvml;
use ergon_testkit::{
    write_cgroup_v1_usage, write_cpu_topology, write_proc_stat, PowercapTree, ZoneFixture,
};
use ergond::clock::monotonic_ns;
use ergond::config::Config;
use ergond::counter::Method;
use ergond::sampler::{
    Sampler, SamplerError, SamplerHandle, SamplerOptions, SamplerSources, TraceOf, TraceSample,
};
use ergond::snapshot::{NodeSnapshot, SamplerHealth};
use ergond::sources::nvml::GpuSource;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const MS: u64 = 1_000_000;

fn gpu(uuid_tail: u32, profile: Value, period_ms: f64) -> Value {
    json!({"uuid": format!("GPU-00000000-0000-0000-0000-{uuid_tail:012}"), "minor": uuid_tail,
           "profile": profile, "update_period_ms": period_ms, "initial_energy_mj": 7_000_000u64})
}

fn model(scenario_gpu: &Value) -> DeviceModel {
    DeviceModel {
        profile: serde_json::from_value::<Profile>(scenario_gpu["profile"].clone()).unwrap(),
        update_period_s: scenario_gpu["update_period_ms"].as_f64().unwrap() / 1000.0,
        initial_energy_mj: 0,
        reset_at_s: None,
    }
}

fn health<'a>(s: &'a NodeSnapshot, source: &str) -> &'a SamplerHealth {
    s.samplers
        .iter()
        .find(|h| h.source == source)
        .unwrap_or_else(|| panic!("no {source} health in {:?}", s.samplers))
}

fn wait_for(h: &SamplerHandle, what: &str, cond: impl Fn(&NodeSnapshot) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond(&h.snapshot()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn trace(h: &SamplerHandle, of: TraceOf) -> Vec<TraceSample> {
    let mut out = Vec::new();
    assert!(h.trace(of, &mut out), "no trace {of:?}");
    out
}

/// Checks a GPU's energy against the fake's ground truth between the first (baseline) and last
/// samples of its trace. The counter reports the energy up to its last update instant, so the
/// truth is taken between the update instants the two samples describe: the first is stamped
/// at its read (a reading taken within 0.5 ms of an update instant may have seen either one,
/// so every candidate is tried), the last at its update (estimated; the nearest update).
fn assert_gpu_energy_tracks_truth(
    fake: &FakeNvml,
    m: &DeviceModel,
    t: &[TraceSample],
    label: &str,
) {
    assert!(t.len() >= 10, "{label}: only {} samples", t.len());
    let (first, last) = (t[0], t[t.len() - 1]);
    assert_eq!(
        first.energy_j, 0.0,
        "{label}: the first sample is the baseline"
    );
    let candidates = |at: u64| {
        let mut c: Vec<f64> = [at - MS / 2, at, at + MS / 2]
            .iter()
            .map(|&x| m.published_at(fake.t(x, 1.0)))
            .collect();
        c.dedup();
        c
    };
    // Later samples are stamped with the counter update that produced them (estimated to
    // within a few ms): their value is the one published at the update nearest the stamp.
    let nearest_update = |at: u64| {
        let p = m.update_period_s;
        let t = fake.t(at, 1.0);
        vec![if p > 0.0 { (t / p).round() * p } else { t }]
    };
    let mut errs = Vec::new();
    for a in candidates(first.at_ns) {
        for b in nearest_update(last.at_ns) {
            let truth = m.profile.energy_j(a, b);
            errs.push((last.energy_j - truth).abs() / truth);
        }
    }
    let best = errs.iter().cloned().fold(f64::INFINITY, f64::min);
    let span_s = (last.at_ns - first.at_ns) as f64 / 1e9;
    println!(
        "{label}: {:.3} J over {span_s:.3} s, relative error {:.5} %",
        last.energy_j,
        best * 100.0
    );
    assert!(
        best < 0.005,
        "{label}: {} J is {:.3} % off the ground truth",
        last.energy_j,
        best * 100.0
    );
}

/// A node of generated trees: powercap (2 zones, a small range so that they wrap), cgroup v1,
/// sysfs topology (2 sockets × 2 CPUs) and /proc/stat.
struct Trees {
    _dir: tempfile::TempDir,
    powercap: PowercapTree,
    config: Config,
}

const PKG_RANGE_UJ: u64 = 20_000_000; // 20 J: wraps every 0.2 s at 100 W
const DRAM_RANGE_UJ: u64 = 65_712_999_613;

fn trees(nvml: &Path) -> Trees {
    let dir = tempfile::tempdir().unwrap();
    let powercap = PowercapTree::create(
        &dir.path().join("powercap"),
        &[
            ZoneFixture::new("intel-rapl:0", "package-0").with_range(PKG_RANGE_UJ),
            ZoneFixture::new("intel-rapl:0:0", "dram").with_range(DRAM_RANGE_UJ),
        ],
    );
    let cgroup = dir.path().join("cgroup");
    for j in 0..3 {
        write_cgroup_v1_usage(&cgroup, &format!("slurm/uid_1000/job_{j}"), 1_000 * j);
    }
    let sys = dir.path().join("sys");
    write_cpu_topology(&sys, &[(0, 0, 0), (1, 0, 0), (2, 1, 0), (3, 1, 0)]);
    let proc = dir.path().join("proc");
    write_proc_stat(
        &proc,
        &[
            (0, [10, 0, 5, 100, 0, 0, 0, 0]),
            (1, [20, 0, 0, 100, 0, 0, 0, 0]),
            (2, [1, 0, 0, 100, 0, 0, 0, 0]),
            (3, [2, 0, 0, 100, 0, 0, 0, 0]),
        ],
    );
    let mut config = Config {
        nvml_library: Some(nvml.to_path_buf()),
        powercap_root: powercap.root().to_path_buf(),
        perf_sysfs_root: dir.path().join("no-perf"),
        sysfs_root: sys,
        cgroup_root: cgroup,
        proc_root: proc,
        prefer_perf: false,
        ..Config::default()
    };
    config.sampling.rapl_period_ms = 5;
    config.sampling.cgroup_period_ms = 10;
    Trees {
        _dir: dir,
        powercap,
        config,
    }
}

/// Advances the package zone by 0.2 J and DRAM by 0.02 J per 2 ms step (100 W and 10 W; modulo
/// each zone's range, as the hardware counter does) for `steps` steps; returns the energy
/// written, µJ per zone. Every quarter of the package range it waits until the sampler has read
/// what was written, so the test holds however the machine schedules the threads (a sampler that
/// misses a whole range between two reads cannot see the wrap; that is the counter's physics, not
/// what this test is about).
fn write_rapl(tree: &PowercapTree, h: &SamplerHandle, steps: u64) -> (u64, u64) {
    let (mut pkg, mut dram) = (0u64, 0u64);
    for step in 1..=steps {
        std::thread::sleep(Duration::from_millis(2));
        pkg += 200_000;
        dram += 20_000;
        tree.set_energy_uj("intel-rapl:0", pkg % (PKG_RANGE_UJ + 1));
        tree.set_energy_uj("intel-rapl:0:0", dram % (DRAM_RANGE_UJ + 1));
        if step % 25 == 0 || step == steps {
            let written = pkg as f64 * 1e-6;
            wait_for(h, "the sampler to read the package zone", |s| {
                (s.zones[0].energy_j - written).abs() < 1e-6
            });
        }
    }
    (pkg, dram)
}

#[test]
fn energies_track_ground_truth_across_rapl_wraps() {
    let scenario_gpus = vec![
        gpu(1, json!({"kind": "constant", "watts": 250.0}), 20.0),
        gpu(
            2,
            json!({"kind": "square", "low_w": 80.0, "high_w": 400.0, "period_s": 0.3}),
            20.0,
        ),
        gpu(
            3,
            json!({"kind": "ramp", "from_w": 100.0, "to_w": 600.0, "period_s": 0.7}),
            20.0,
        ),
    ];
    let fake = FakeNvml::new(json!({ "gpus": scenario_gpus }));
    fake.wait_for_start();
    let t = trees(&fake.lib);
    let (sources, problems) = SamplerSources::open(&t.config);
    assert_eq!(problems, [], "every generated source opens");
    // The default path: detect the counter period (20 ms), sample GPUs at half of it.
    let h = Sampler::start(&t.config, sources).unwrap();
    let gpu_period = h.options().gpu_period;
    assert!(
        (Duration::from_millis(10)..=Duration::from_millis(12)).contains(&gpu_period),
        "GPU period {gpu_period:?} from a 20 ms counter"
    );
    wait_for(&h, "the RAPL baseline", |s| health(s, "rapl").samples >= 1);
    // 350 steps of 0.2 J: 70 J through a 20 J range, three wraps.
    let (pkg_uj, dram_uj) = write_rapl(&t.powercap, &h, 350);
    wait_for(&h, "the final DRAM reading and 50 GPU ticks", |s| {
        (s.zones[1].energy_j - dram_uj as f64 * 1e-6).abs() < 1e-6 && health(s, "gpu").samples >= 50
    });
    let gpu_traces: Vec<_> = (0..3).map(|i| trace(&h, TraceOf::Gpu(i))).collect();
    let s = h.stop();

    for (i, g) in scenario_gpus.iter().enumerate() {
        let snap = &s.gpus[i];
        assert_eq!(snap.method, Method::Counter);
        assert!(snap.measurable && !snap.lost);
        assert_eq!((snap.resets, snap.dropped_intervals), (0, 0));
        let tr = &gpu_traces[i];
        assert!((tr[tr.len() - 1].energy_j - snap.energy_j).abs() < 1e-9);
        assert_gpu_energy_tracks_truth(&fake, &model(g), tr, &snap.uuid);
    }
    let gh = health(&s, "gpu");
    assert_eq!(gh.read_errors, 0);
    assert!(gh.samples >= 50, "{gh:?}");

    // RAPL: counter arithmetic over wraps gives exactly what was written.
    let pkg = &s.zones[0];
    assert_eq!(pkg.key.to_string(), "package-0");
    assert!(
        pkg.wraps == pkg_uj / (PKG_RANGE_UJ + 1) && pkg.wraps >= 2,
        "{} J written over a 20 J range: {pkg:?}",
        pkg_uj as f64 / 1e6
    );
    assert_eq!(pkg.dropped_intervals, 0);
    assert!(
        (pkg.energy_j - pkg_uj as f64 * 1e-6).abs() < 1e-6,
        "{} J vs {} J written",
        pkg.energy_j,
        pkg_uj as f64 * 1e-6
    );
    assert!((s.zones[1].energy_j - dram_uj as f64 * 1e-6).abs() < 1e-6);
    // Every 5 ms deadline over the ≥ 0.7 s of writing was either sampled or counted as missed.
    let rh = health(&s, "rapl");
    assert!(rh.samples + rh.missed_ticks >= 100, "{rh:?}");

    // Sockets from the generated /proc/stat, on the cgroup ticks.
    let tick = 1_000_000_000 / ergond::sources::cgroup::user_hz();
    assert_eq!(s.sockets.len(), 2);
    assert_eq!(
        (s.sockets[0].busy_ns, s.sockets[1].busy_ns),
        (35 * tick, 3 * tick)
    );
    assert!(s.sockets[0].at_ns > 0);
    // Thread CPU time is reported, also after the stop.
    assert_eq!(s.threads.len(), 2);
    assert!(
        s.threads.iter().all(|t| t.cpu_ns.is_some_and(|c| c > 0)),
        "{:?}",
        s.threads
    );
}

#[test]
fn a_lost_gpu_is_reported_and_the_others_keep_being_sampled() {
    let mut lost = gpu(2, json!({"kind": "constant", "watts": 300.0}), 10.0);
    lost["lost_at_s"] = json!(0.3);
    let scenario_gpus = vec![
        gpu(1, json!({"kind": "constant", "watts": 200.0}), 10.0),
        lost,
        gpu(
            3,
            json!({"kind": "square", "low_w": 50.0, "high_w": 350.0, "period_s": 0.2}),
            10.0,
        ),
    ];
    let fake = FakeNvml::new(json!({ "gpus": scenario_gpus }));
    fake.wait_for_start();
    let src = GpuSource::open(Some(&fake.lib)).unwrap();
    let opts = SamplerOptions {
        gpu_period: Duration::from_millis(10),
        gpu_counter_period: Duration::from_millis(10),
        ..SamplerOptions::from_config(&Default::default(), None)
    };
    let h = Sampler::start_with(
        opts,
        SamplerSources {
            gpu: Some(src),
            ..Default::default()
        },
    )
    .unwrap();
    // GPU 1 is lost 0.3 s in; the others must go on being read well past that.
    wait_for(&h, "GPU 1 lost and the others sampled 0.5 s past it", |s| {
        s.gpus[1].lost
            && [0, 2]
                .iter()
                .all(|&i| s.gpus[i].at_ns >= s.gpus[1].at_ns + 500 * MS)
    });
    let traces: Vec<_> = (0..3).map(|i| trace(&h, TraceOf::Gpu(i))).collect();
    let s = h.stop();
    assert!(s.gpus[1].lost, "{:?}", s.gpus[1]);
    assert_eq!(s.gpus[1].read_errors, 1, "a lost GPU is not read again");
    assert_eq!(health(&s, "gpu").read_errors, 1);
    // The lost GPU's energy stops at its last reading, about 0.3 s in.
    let lost_j = s.gpus[1].energy_j;
    assert!(
        (50.0..=100.0).contains(&lost_j),
        "{lost_j} J before the loss"
    );
    for i in [0, 2] {
        let g = &s.gpus[i];
        assert!(!g.lost && g.read_errors == 0);
        assert!(
            g.at_ns >= s.gpus[1].at_ns + 500 * MS,
            "GPU {i} still sampled after the loss"
        );
        assert_gpu_energy_tracks_truth(&fake, &model(&scenario_gpus[i]), &traces[i], &g.uuid);
    }
}

#[test]
fn a_slow_gpu_overruns_ticks_that_are_skipped_and_counted() {
    let mut slow = gpu(1, json!({"kind": "constant", "watts": 200.0}), 10.0);
    slow["read_delay_us"] = json!(25_000);
    let fake = FakeNvml::new(json!({ "gpus": [slow] }));
    fake.wait_for_start();
    let dir = tempfile::tempdir().unwrap();
    let tree = PowercapTree::create(dir.path(), &[ZoneFixture::new("intel-rapl:0", "package-0")]);
    let gpu_src = GpuSource::open(Some(&fake.lib)).unwrap();
    let rapl = ergond::sources::rapl::RaplSource::from_backend(
        ergond::sources::rapl::RaplBackend::Powercap(
            ergond::sources::rapl::Powercap::open(tree.root()).unwrap(),
        ),
    );
    let period = 10 * MS;
    let opts = SamplerOptions {
        gpu_period: Duration::from_nanos(period),
        rapl_period: Duration::from_millis(5),
        ..SamplerOptions::from_config(&Default::default(), None)
    };
    let t0 = monotonic_ns();
    let h = Sampler::start_with(
        opts,
        SamplerSources {
            gpu: Some(gpu_src),
            rapl: Some(rapl),
            ..Default::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let t1 = monotonic_ns();
    let s = h.stop();
    let t2 = monotonic_ns();
    let g = health(&s, "gpu");
    println!("{g:?}");
    // Each tick takes ≥ 25 ms of a 10 ms schedule: at least two deadlines skipped per tick.
    assert!(g.samples >= 5, "{g:?}");
    assert!(g.missed_ticks >= 2 * (g.samples - 1), "{g:?}");
    // Every deadline up to the stop is either a tick or a counted miss.
    let (lo, hi) = ((t1 - t0) / period, (t2 - t0) / period + 1);
    let accounted = g.samples + g.missed_ticks;
    assert!(
        (lo.saturating_sub(2)..=hi + 1).contains(&accounted),
        "{accounted} ticks + misses, expected {lo}..={hi}"
    );
    assert!(g.read_latency_p50_ns >= 25 * MS, "{g:?}");
    // After an overrun the next tick is the next future deadline, not a burst of late ones.
    assert!(g.lateness_p50_ns < period, "{g:?}");
    // RAPL has its own thread and is not dragged along: on the GPU's thread it could sample
    // only once per 25 ms GPU read (as often as the GPU); on its own it keeps its 5 ms period.
    // (Bounds loose enough for a loaded 2-core CI machine, where the thread may be starved
    // for ~100 ms: that costs a fraction of its 120 deadlines, not 80 % of them.)
    let r = health(&s, "rapl");
    assert!(r.samples >= 3 * g.samples, "rapl {r:?}\ngpu {g:?}");
    assert!(r.samples >= 40, "{r:?}");
    assert!(r.missed_ticks < r.samples, "{r:?}");
}

#[test]
fn buffers_stop_growing_at_their_capacity() {
    let fake = FakeNvml::new(json!({ "gpus": [
        gpu(1, json!({"kind": "constant", "watts": 200.0}), 10.0),
        gpu(2, json!({"kind": "constant", "watts": 100.0}), 10.0),
    ]}));
    fake.wait_for_start();
    let dir = tempfile::tempdir().unwrap();
    let tree = PowercapTree::create(
        dir.path(),
        &[
            ZoneFixture::new("intel-rapl:0", "package-0"),
            ZoneFixture::new("intel-rapl:1", "package-1"),
        ],
    );
    let rapl = ergond::sources::rapl::RaplSource::from_backend(
        ergond::sources::rapl::RaplBackend::Powercap(
            ergond::sources::rapl::Powercap::open(tree.root()).unwrap(),
        ),
    );
    let cap = 16;
    let opts = SamplerOptions {
        gpu_period: Duration::from_millis(10),
        rapl_period: Duration::from_millis(1),
        trace_capacity: cap,
        latency_window: 8,
        ..SamplerOptions::from_config(&Default::default(), None)
    };
    let h = Sampler::start_with(
        opts,
        SamplerSources {
            gpu: Some(GpuSource::open(Some(&fake.lib)).unwrap()),
            rapl: Some(rapl),
            ..Default::default()
        },
    )
    .unwrap();
    wait_for(&h, "more ticks than the capacity", |s| {
        health(s, "gpu").samples > 2 * cap as u64 && health(s, "rapl").samples > 4 * cap as u64
    });
    let mut lens = Vec::new();
    for of in [
        TraceOf::Gpu(0),
        TraceOf::Gpu(1),
        TraceOf::Zone(0),
        TraceOf::Zone(1),
    ] {
        let t = trace(&h, of);
        lens.push(t.len());
        assert!(
            t.windows(2).all(|w| w[0].at_ns < w[1].at_ns),
            "{of:?} oldest first"
        );
        assert!(t.windows(2).all(|w| w[0].energy_j <= w[1].energy_j));
    }
    assert_eq!(lens, [cap; 4]);
    let mut out = Vec::new();
    assert!(!h.trace(TraceOf::Gpu(2), &mut out) && !h.trace(TraceOf::Zone(2), &mut out));
    // The newest sample is at least as recent as a snapshot taken before it.
    let before = h.snapshot();
    let newest = trace(&h, TraceOf::Gpu(0)).last().copied().unwrap();
    assert!(newest.at_ns >= before.gpus[0].at_ns);
    let s = h.stop();
    // Percentiles come from the bounded window (the last 8 ticks).
    let g = health(&s, "gpu");
    assert!(g.read_latency_p50_ns <= g.read_latency_p99_ns);
    assert!(g.lateness_p99_ns <= g.max_lateness_ns);
}

#[test]
fn cgroups_are_watched_and_unwatched_at_run_time() {
    let t = trees(Path::new("/nonexistent/libnvidia-ml.so.1"));
    let (sources, problems) = SamplerSources::open(&t.config);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].source, "nvml");
    assert!(problems[0].error.contains("/nonexistent/libnvidia-ml.so.1"));
    let h = Sampler::start_with(
        SamplerOptions::from_config(&t.config.sampling, None),
        sources,
    )
    .unwrap();
    assert!(h.snapshot().cgroups.is_empty());
    let cg = &t.config.cgroup_root;
    h.watch_cgroup("slurm/uid_1000/job_1").unwrap();
    h.watch_cgroup("/slurm/uid_1000/job_2").unwrap();
    h.watch_cgroup("slurm/uid_1000/job_1").unwrap(); // already watched: nothing changes
    let s = h.snapshot();
    let paths: Vec<_> = s
        .cgroups
        .iter()
        .map(|c| (c.path.as_str(), c.cpu_ns))
        .collect();
    assert_eq!(
        paths,
        [
            ("slurm/uid_1000/job_1", 1_000),
            ("/slurm/uid_1000/job_2", 2_000)
        ],
        "read once at registration"
    );
    let registered_at = s.cgroups[0].at_ns;
    write_cgroup_v1_usage(cg, "slurm/uid_1000/job_1", 5_000_000_000);
    wait_for(&h, "the new CPU time", |s| {
        s.cgroups[0].cpu_ns == 5_000_000_000
    });
    let s = h.snapshot();
    // Read on a later tick, both cgroups at the same instant.
    assert!(s.cgroups[0].at_ns > registered_at);
    assert_eq!(s.cgroups[0].at_ns, s.cgroups[1].at_ns);
    assert_eq!(s.cgroups[0].read_errors, 0);

    assert!(h.unwatch_cgroup("slurm/uid_1000/job_1"));
    assert!(!h.unwatch_cgroup("slurm/uid_1000/job_1"));
    assert_eq!(h.snapshot().cgroups.len(), 1);

    let e = h.watch_cgroup("slurm/uid_1000/job_404").unwrap_err();
    assert!(
        matches!(e, SamplerError::Cgroup(_)) && e.to_string().contains("job_404/cpuacct.usage"),
        "{e}"
    );
    let c = health(&h.snapshot(), "cgroup").clone();
    assert_eq!(c.period_ns, 10 * MS, "every second 5 ms RAPL tick");
    drop(h); // Drop stops the threads.

    // Without a cgroup hierarchy, watching is refused with the reason.
    let h = Sampler::start_with(
        SamplerOptions::from_config(&t.config.sampling, None),
        SamplerSources::default(),
    )
    .unwrap();
    let e = h.watch_cgroup("job_1").unwrap_err();
    assert!(matches!(e, SamplerError::NoCgroupHierarchy { .. }), "{e}");
    assert!(e.to_string().contains("cgroup_root"), "{e}");
    assert!(h.snapshot().threads.is_empty());
}

/// Reads that drift against the counter's updates (every 13 ms against 20 ms updates, as a
/// loaded node's jitter does) must not alias in the power trace: each 100 ms point of the
/// trace the manifest is built from is within 2 % of the true average power in that bin
/// (a read-time stamp put a stale counter value up to one update late, and bins lost or
/// gained up to a fifth of their energy).
#[test]
fn power_traces_do_not_alias_when_reads_drift_against_counter_updates() {
    let scenario_gpus = vec![
        gpu(11, json!({"kind": "constant", "watts": 300.0}), 20.0),
        // A slow ramp: 100 W to 600 W over 6 s (linear within each 20 ms update).
        gpu(
            12,
            json!({"kind": "ramp", "from_w": 100.0, "to_w": 600.0, "period_s": 6.0}),
            20.0,
        ),
    ];
    let fake = FakeNvml::new(json!({ "gpus": scenario_gpus }));
    fake.wait_for_start();
    let mut t = trees(&fake.lib);
    t.config.sampling.gpu_min_period_ms = 13;
    t.config.sampling.gpu_max_period_ms = 13;
    let (sources, problems) = SamplerSources::open(&t.config);
    assert_eq!(problems, []);
    let h = Sampler::start(&t.config, sources).unwrap();
    assert_eq!(h.options().gpu_period, Duration::from_millis(13));
    wait_for(&h, "2.5 s of GPU samples", |s| {
        health(s, "gpu").samples >= 190
    });
    let traces: Vec<_> = (0..2).map(|i| trace(&h, TraceOf::Gpu(i))).collect();
    drop(h.stop());
    for (i, g) in scenario_gpus.iter().enumerate() {
        let m = model(g);
        let tr = &traces[i];
        // Bins from 0.3 s after the first sample (the update clock has settled) to the end.
        let from = tr[0].at_ns + 300_000_000;
        let to = tr[tr.len() - 1].at_ns;
        let bin = 100_000_000u64;
        let (start, watts) = ergond::jobs::reading::power_series(tr, from, to, bin, 600);
        assert!(watts.len() >= 15, "{} bins", watts.len());
        let mut worst: f64 = 0.0;
        for (k, &w) in watts.iter().enumerate() {
            let a = start + k as u64 * bin;
            let truth = m.profile.energy_j(fake.t(a, 1.0), fake.t(a + bin, 1.0)) / 0.1;
            let err = (f64::from(w) - truth).abs() / truth;
            worst = worst.max(err);
            assert!(
                err < 0.02,
                "GPU {i}: bin {k} reads {w:.1} W, truly {truth:.1} W ({:.1} % off)",
                err * 100.0
            );
        }
        println!(
            "GPU {i}: {} bins, worst {:.2} % off the true average power",
            watts.len(),
            worst * 100.0
        );
    }
}
