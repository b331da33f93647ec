//! `scripts/bench meters`: does a slow BMC change the GPU and RAPL samplers' lateness?
//!
//! Builds a fake node (8 GPUs of the fake NVML library, a 2-socket powercap tree, a 64-CPU
//! topology and `/proc/stat`) and runs the sampler in alternating rounds, in one process: without
//! a node meter, then with a node meter whose every read takes 2 s, attached as ergond attaches
//! it (`NodeMeterHandle`, a thread of its own). Run as root, the meter is the real Redfish client
//! against a loopback HTTP BMC that answers each request after 2 s (the credentials file must be
//! root's); otherwise a meter whose `read` blocks 2 s (the same thread, the same blocking, no
//! HTTP), and the JSON says which. Each round runs `--seconds` after a 1 s warm-up; the GPU and
//! RAPL lateness p99 of each round come from the sampler's own health window (sized to hold every
//! tick of a round). Reports the median p99 of each side and their ratio (with / without).
//!
//! Then, as root where OpenIPMI's `ipmi_sim` and `ipmitool` are installed, what an IPMI meter
//! costs the node: alternating rounds without a meter, with the IPMI meter running one ipmitool
//! per read (`session = false`), and with its default session (one `ipmitool shell` kept open),
//! reading an emulated BMC's DCMI power each second (`ergon_testkit::ipmi_sim`, over RMCP+ on
//! loopback), measuring this process's CPU time and its reaped children's (the emulated BMC is
//! not counted: it stands for the BMC, not the node). A session's ipmitool is reaped only when
//! its round ends, so its CPU is counted then. Reports each side's CPU, the CPU per read above
//! the rounds without a meter, and the ratio session / per-read.
//!
//! Writes one JSON object per line to `--json` and prints a table.

use ergon_testkit::{
    write_cgroup_v1_usage, write_cpu_topology, write_proc_stat, PowercapLayout, PowercapTree,
};
use ergond::config::Config;
use ergond::sampler::{NodeMeterHandle, Sampler, SamplerOptions, SamplerSources};
use ergond::sources::meter::{
    MeterError, MeterKind, MeterReading, MetersConfig, NodeMeter, Quantity,
};
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const GPUS: usize = 8;
const CPUS: u32 = 64;
const BMC_DELAY: Duration = Duration::from_secs(2);

/// A meter whose read blocks for [`BMC_DELAY`] (when the Redfish client cannot be used).
struct BlockingMeter;

impl NodeMeter for BlockingMeter {
    fn kind(&self) -> MeterKind {
        MeterKind::Redfish
    }
    fn source(&self) -> String {
        "a read blocking 2 s".into()
    }
    fn resolution_ns(&self) -> u64 {
        1_000_000_000
    }
    fn read(&mut self) -> Result<MeterReading, MeterError> {
        std::thread::sleep(BMC_DELAY);
        Ok(MeterReading {
            at_ns: ergond::clock::monotonic_ns(),
            quantity: Quantity::Power { watts: 800.0 },
            generation: None,
            freshness: None,
        })
    }
}

/// A plain-HTTP Redfish BMC on loopback answering each request after [`BMC_DELAY`].
fn slow_bmc(stop: Arc<AtomicBool>) -> String {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            std::thread::sleep(BMC_DELAY);
            let body = "{\"PowerControl\": [{\"PowerConsumedWatts\": 800}]}";
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    url
}

fn build_node(fake_nvml: &Path, dir: &Path) -> Config {
    let nvml_dir = dir.join("nvml");
    std::fs::create_dir_all(&nvml_dir).unwrap();
    let lib = nvml_dir.join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml, &lib).expect("copy the fake NVML library");
    let gpus: Vec<Value> = (0..GPUS)
        .map(|i| {
            json!({"uuid": format!("GPU-meters00-0000-0000-0000-{i:012}"), "name": "Fake H100",
                   "minor": i, "profile": {"kind": "constant", "watts": 300.0},
                   "update_period_ms": 100.0})
        })
        .collect();
    std::fs::write(
        format!("{}.scenario.json", lib.display()),
        serde_json::to_vec(&json!({ "gpus": gpus })).unwrap(),
    )
    .unwrap();
    let powercap = PowercapTree::create(
        &dir.join("powercap"),
        &PowercapLayout::IntelServer { sockets: 2 }.zones(),
    );
    let sys = dir.join("sys");
    let cpus: Vec<(u32, u32, u32)> = (0..CPUS).map(|c| (c, c / (CPUS / 2), 0)).collect();
    write_cpu_topology(&sys, &cpus);
    let proc = dir.join("proc");
    let stat: Vec<(u32, [u64; 8])> = (0..CPUS)
        .map(|c| (c, [1_000_000, 10, 250_000, 8_000_000, 100, 10, 20, 0]))
        .collect();
    write_proc_stat(&proc, &stat);
    write_cgroup_v1_usage(&dir.join("cgroup"), "slurm/uid_1/job_1", 1_000);
    Config {
        nvml_library: Some(lib),
        powercap_root: powercap.root().to_path_buf(),
        perf_sysfs_root: dir.join("no-perf"),
        sysfs_root: sys,
        cgroup_root: dir.join("cgroup"),
        proc_root: proc,
        prefer_perf: false,
        ..Config::default()
    }
}

/// CPU time (user + system) of this process and of its reaped children so far, seconds.
fn cpu_s() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    [UsageWho::RUSAGE_SELF, UsageWho::RUSAGE_CHILDREN]
        .into_iter()
        .map(|who| {
            let u = getrusage(who).expect("getrusage");
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .sum()
}

/// One round: lateness p99 (µs) of `gpu` and `rapl`, the meter's reads when there is one, and
/// the CPU time spent over the measured seconds.
fn round(config: &Config, meter: Option<Box<dyn NodeMeter>>, seconds: f64) -> Value {
    let (sources, problems) = SamplerSources::open(config);
    assert!(problems.is_empty(), "{problems:?}");
    let mut opts = SamplerOptions::from_config(&config.sampling, None);
    opts.latency_window = ((seconds + 2.0) * 1000.0) as usize;
    let mut h = Sampler::start_with(opts, sources).expect("start the sampler");
    let with = meter.is_some();
    if let Some(m) = meter {
        h.attach_meter(NodeMeterHandle::start(m, &MetersConfig::default()).unwrap());
    }
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, reads0) = (cpu_s(), h.snapshot().meter.as_ref().map_or(0, |m| m.reads));
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let s = h.snapshot();
    let p99 = |src: &str| {
        s.samplers
            .iter()
            .find(|x| x.source == src)
            .map_or(f64::NAN, |x| x.lateness_p99_ns as f64 / 1e3)
    };
    let out = json!({
        "meter": with,
        "gpu_lateness_p99_us": p99("gpu"),
        "rapl_lateness_p99_us": p99("rapl"),
        "meter_reads": s.meter.as_ref().map(|m| m.reads),
        "measured_reads": s.meter.as_ref().map(|m| m.reads - reads0),
    });
    // After the sampler and its meter are gone: a session's ipmitool is reaped (and its CPU
    // counted) only then.
    drop(h);
    // The meter's thread drops it (and reaps its ipmitool) after its current read.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let me = std::process::id();
    while !ergon_testkit::child_processes(me, "ipmitool").is_empty()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = out;
    out["cpu_s"] = json!(cpu_s() - cpu0);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (mut fake_nvml, mut seconds, mut rounds, mut json_path) =
        (PathBuf::new(), 10.0, 3usize, None::<PathBuf>);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--fake-nvml" => fake_nvml = PathBuf::from(v()),
            "--seconds" => seconds = v().parse().expect("--seconds N"),
            "--rounds" => rounds = v().parse().expect("--rounds N"),
            "--json" => json_path = Some(PathBuf::from(v())),
            other => panic!(
                "unknown argument {other}; usage: bench_meters --fake-nvml LIB [--seconds N] \
                 [--rounds N] [--json FILE]"
            ),
        }
    }
    assert!(
        fake_nvml.is_file(),
        "--fake-nvml must name the built fake library"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = build_node(&fake_nvml, dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let root = nix::unistd::geteuid().is_root();
    let bmc = if root {
        let creds = ergon_testkit::write_bmc_credentials(&dir.path().join("bmc.toml"), 0o600);
        let mut cfg =
            ergond::sources::meter::redfish::RedfishConfig::new(&slow_bmc(stop.clone()), &creds);
        cfg.insecure = true;
        cfg.chassis = Some("1".into());
        cfg.timeout_ms = 10_000;
        Some(cfg)
    } else {
        None
    };
    let kind = if root { "redfish" } else { "blocking-read" };
    let mut rows = Vec::new();
    for r in 0..rounds {
        for with in [false, true] {
            let meter: Option<Box<dyn NodeMeter>> = match (with, &bmc) {
                (false, _) => None,
                (true, Some(cfg)) => Some(Box::new(
                    ergond::sources::meter::redfish::RedfishMeter::new(cfg.clone()).unwrap(),
                )),
                (true, None) => Some(Box::new(BlockingMeter)),
            };
            let v = round(&config, meter, seconds);
            eprintln!("round {r}: {v}");
            rows.push(v);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let side = |with: bool, key: &str| {
        median(
            rows.iter()
                .filter(|v| v["meter"] == with)
                .map(|v| v[key].as_f64().unwrap_or(f64::NAN))
                .collect(),
        )
    };
    let mut summary = json!({"group": "meters", "bmc": kind, "bmc_delay_s": BMC_DELAY.as_secs_f64(),
                             "seconds": seconds, "rounds": rounds});
    println!(
        "{:<6} {:>16} {:>16} {:>8}",
        "source", "p99 without µs", "p99 with µs", "ratio"
    );
    for src in ["gpu", "rapl"] {
        let key = format!("{src}_lateness_p99_us");
        let (without, with) = (side(false, &key), side(true, &key));
        let ratio = with / without;
        println!("{src:<6} {without:>16.1} {with:>16.1} {ratio:>8.2}");
        summary[format!("{src}_lateness_p99_us_without")] = json!(without);
        summary[format!("{src}_lateness_p99_us_with")] = json!(with);
        summary[format!("{src}_lateness_p99_ratio")] = json!(ratio);
    }
    summary["rounds_detail"] = json!(rows);
    summary["ipmi"] = ipmi_cost(&config, dir.path(), seconds, rounds, root);
    if let Some(p) = json_path {
        let mut f = std::fs::File::create(&p).unwrap();
        writeln!(f, "{summary}").unwrap();
        println!("\nresults: {}", p.display());
    }
}

/// The IPMI meter's cost to the node: CPU with and without it (see the module documentation).
fn ipmi_cost(config: &Config, dir: &Path, seconds: f64, rounds: usize, root: bool) -> Value {
    use ergon_testkit::ipmi_sim::IpmiSim;
    use ergond::sources::meter::ipmi::{IpmiConfig, IpmiMeter};
    if !root {
        println!(
            "\nIPMI cost: not measured (the BMC credentials file must be root's: run as root)"
        );
        return json!({"skipped": "not root"});
    }
    let sim = match IpmiSim::start(&dir.join("bmc"), 0, Some("800")) {
        Ok(sim) => sim,
        Err(why) => {
            println!("\nIPMI cost: not measured ({})", why.0);
            return json!({"skipped": why.0});
        }
    };
    let creds = ergon_testkit::write_bmc_credentials(&dir.join("ipmi.toml"), 0o600);
    let mut cfg = IpmiConfig::local();
    cfg.host = Some("127.0.0.1".into());
    cfg.port = sim.port;
    cfg.credentials_file = Some(creds);
    cfg.cipher_suite = Some(3);
    // Three sides per round, alternating: no meter, one ipmitool per read, one session.
    const SIDES: [&str; 3] = ["none", "per-read", "session"];
    let mut rows = Vec::new();
    for r in 0..rounds {
        for side in SIDES {
            let meter: Option<Box<dyn NodeMeter>> = (side != "none").then(|| {
                let mut c = cfg.clone();
                c.session = side == "session";
                Box::new(IpmiMeter::new(c).unwrap()) as Box<dyn NodeMeter>
            });
            let mut v = round(config, meter, seconds);
            v["ipmitool"] = json!(side);
            eprintln!("IPMI round {r}: {v}");
            rows.push(v);
        }
    }
    let of = |side: &str| {
        rows.iter()
            .filter(|v| v["ipmitool"] == side)
            .collect::<Vec<_>>()
            .into_iter()
    };
    let cores = |side: &str| {
        median(
            of(side)
                .map(|v| v["cpu_s"].as_f64().unwrap_or(f64::NAN) / seconds)
                .collect(),
        )
    };
    let cpu_total = |side: &str| {
        of(side)
            .map(|v| v["cpu_s"].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    let reads = |side: &str| {
        of(side)
            .filter_map(|v| v["measured_reads"].as_u64())
            .sum::<u64>()
    };
    // Per read: the CPU above the rounds without a meter, over the reads.
    let per_read_ms = |side: &str| (cpu_total(side) - cpu_total("none")) / reads(side) as f64 * 1e3;
    println!(
        "\nIPMI meter (DCMI via ipmitool, ipmi_sim on loopback, one read per second):\n\
         {:<10} {:>14} {:>8} {:>14}",
        "ipmitool", "CPU (cores)", "reads", "CPU/read ms"
    );
    let mut out = json!({"rounds_detail": rows.clone()});
    for side in SIDES {
        let (c, n) = (cores(side), reads(side));
        let per = if side == "none" {
            f64::NAN
        } else {
            per_read_ms(side)
        };
        println!("{side:<10} {c:>14.4} {n:>8} {per:>14.2}");
        out[format!("cpu_cores_{side}")] = json!(c);
        out[format!("reads_{side}")] = json!(n);
        if side != "none" {
            out[format!("cpu_per_read_ms_{side}")] = json!(per);
        }
    }
    let ratio = per_read_ms("session") / per_read_ms("per-read");
    println!("CPU per read, session / per-read: {ratio:.3}");
    out["cpu_per_read_ratio_session_to_per_read"] = json!(ratio);
    out
}
