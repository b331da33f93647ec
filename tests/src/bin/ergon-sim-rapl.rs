//! Simulated CPU energy counters for the demo (`scripts/demo`) on machines without RAPL. Not
//! shipped.
//!
//! ```text
//! ergon-sim-rapl --powercap DIR [--proc-root /proc] [--sysfs-root /sys] [--period-ms 100]
//!                [--package-idle-w 35] [--package-per-cpu-w 8]
//!                [--dram-idle-w 5] [--dram-per-cpu-w 1]
//!                [--hwmon DIR --gpu-scenario FILE [--rest-w 120]]
//! ```
//!
//! Creates a powercap class directory under DIR with the layout of an Intel server (one
//! `package-N` zone per socket, each with a `dram` subzone; the sockets are the real
//! `physical_package_id`s of this machine's CPUs) and then, every period, moves each zone's
//! `energy_uj` counter as a real one would move at the power the **real** load implies:
//!
//! - package power = `package-idle-w` + `package-per-cpu-w` × busy CPUs of that socket,
//! - DRAM power = `dram-idle-w` + `dram-per-cpu-w` × busy CPUs of that socket,
//!
//! where "busy CPUs" is the sum over the socket's CPUs of their busy fraction in the last period,
//! from the real `/proc/stat` (busy = user + nice + system + irq + softirq + steal; total adds
//! idle and iowait). Counters wrap at each zone's `max_energy_range_uj`, as real ones do.
//!
//! The files are written with `ergon_testkit`'s writers (fixed-width, in place), so ergond,
//! pointed at DIR with `powercap_root`, reads them through its real powercap code. Runs until
//! killed; prints one line at start and one every 10 s (to stderr).

//!
//! With `--hwmon DIR` it also simulates a whole-node meter: an ACPI-style hwmon device
//! (`DIR/class/hwmon/hwmon0`, name `power_meter`) whose `energy1_input` (µJ) is the simulated
//! node's energy since the simulator started: the RAPL zones' energy above, plus the fake GPUs'
//! energy from their profiles in the fake NVML scenario FILE (which must set
//! `start_monotonic_ns`, so that both follow the same clock), plus a constant rest of the node
//! (`--rest-w`, fans, disks, NICs, power supplies).

#![deny(unsafe_code)]

#[path = "../../fake-nvml/src/profile.rs"]
#[allow(dead_code)]
mod profile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ergon_testkit::{PowercapLayout, PowercapTree};

/// The power model and where to read and write.
#[derive(Debug, Clone)]
struct Options {
    powercap: PathBuf,
    proc_root: PathBuf,
    sysfs_root: PathBuf,
    period: Duration,
    package_idle_w: f64,
    package_per_cpu_w: f64,
    dram_idle_w: f64,
    dram_per_cpu_w: f64,
    hwmon: Option<PathBuf>,
    gpu_scenario: Option<PathBuf>,
    rest_w: f64,
}

const USAGE: &str = "usage: ergon-sim-rapl --powercap DIR [--proc-root /proc] [--sysfs-root /sys] \
[--period-ms 100] [--package-idle-w 35] [--package-per-cpu-w 8] [--dram-idle-w 5] [--dram-per-cpu-w 1] \
[--hwmon DIR --gpu-scenario FILE [--rest-w 120]]";

fn parse_args(args: &[String]) -> Result<Options> {
    let mut o = Options {
        powercap: PathBuf::new(),
        proc_root: "/proc".into(),
        sysfs_root: "/sys".into(),
        period: Duration::from_millis(100),
        package_idle_w: 35.0,
        package_per_cpu_w: 8.0,
        dram_idle_w: 5.0,
        dram_per_cpu_w: 1.0,
        hwmon: None,
        gpu_scenario: None,
        rest_w: 120.0,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let watts = || -> Result<f64> {
            let w: f64 = value
                .parse()
                .with_context(|| format!("{flag} {value:?}: not a number of watts"))?;
            if !(0.0..=10_000.0).contains(&w) {
                bail!("{flag} {w}: outside 0..=10000 W");
            }
            Ok(w)
        };
        match flag.as_str() {
            "--powercap" => o.powercap = value.into(),
            "--proc-root" => o.proc_root = value.into(),
            "--sysfs-root" => o.sysfs_root = value.into(),
            "--period-ms" => {
                let ms: u64 = value
                    .parse()
                    .with_context(|| format!("--period-ms {value:?}"))?;
                if !(10..=10_000).contains(&ms) {
                    bail!("--period-ms {ms}: outside 10..=10000");
                }
                o.period = Duration::from_millis(ms);
            }
            "--package-idle-w" => o.package_idle_w = watts()?,
            "--package-per-cpu-w" => o.package_per_cpu_w = watts()?,
            "--dram-idle-w" => o.dram_idle_w = watts()?,
            "--dram-per-cpu-w" => o.dram_per_cpu_w = watts()?,
            "--hwmon" => o.hwmon = Some(value.into()),
            "--gpu-scenario" => o.gpu_scenario = Some(value.into()),
            "--rest-w" => o.rest_w = watts()?,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.powercap.as_os_str().is_empty() {
        bail!("--powercap DIR is required\n{USAGE}");
    }
    if o.hwmon.is_some() != o.gpu_scenario.is_some() {
        bail!("--hwmon and --gpu-scenario go together\n{USAGE}");
    }
    Ok(o)
}

/// The fake GPUs of a scenario, on its clock.
struct Gpus {
    profiles: Vec<profile::Profile>,
    start_ns: u64,
    time_scale: f64,
}

impl Gpus {
    fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let start_ns = v["start_monotonic_ns"]
            .as_u64()
            .with_context(|| format!("{}: no start_monotonic_ns", path.display()))?;
        let profiles = v["gpus"]
            .as_array()
            .with_context(|| format!("{}: no gpus", path.display()))?
            .iter()
            .map(|g| serde_json::from_value(g["profile"].clone()))
            .collect::<Result<Vec<profile::Profile>, _>>()
            .with_context(|| format!("{}: a GPU profile", path.display()))?;
        Ok(Self {
            profiles,
            start_ns,
            time_scale: v["time_scale"].as_f64().unwrap_or(1.0),
        })
    }

    /// Scenario time now, s.
    fn now_s(&self) -> f64 {
        ergond::clock::monotonic_ns().saturating_sub(self.start_ns) as f64 / 1e9 * self.time_scale
    }

    /// Every GPU's energy between scenario times `t0` and `t1`, J.
    fn energy_j(&self, t0: f64, t1: f64) -> f64 {
        self.profiles.iter().map(|p| p.energy_j(t0, t1)).sum()
    }
}

/// Busy and total jiffies of one CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Jiffies {
    busy: u64,
    total: u64,
}

/// The per-CPU lines (`cpuN ...`) of `/proc/stat`.
fn parse_proc_stat(text: &str) -> BTreeMap<u32, Jiffies> {
    let mut cpus = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(label) = words.next() else { continue };
        let Some(n) = label
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let v: Vec<u64> = words.take(8).filter_map(|w| w.parse().ok()).collect();
        if v.len() < 5 {
            continue;
        }
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
        cpus.insert(
            n,
            Jiffies {
                busy,
                total: busy + get(3) + get(4),
            },
        );
    }
    cpus
}

/// The socket (`physical_package_id`) of each CPU; 0 where the topology does not say.
fn socket_of(sysfs_root: &Path, cpu: u32) -> u32 {
    let path = sysfs_root.join(format!(
        "devices/system/cpu/cpu{cpu}/topology/physical_package_id"
    ));
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|&s| s >= 0)
        .map_or(0, |s| s as u32)
}

/// Busy CPUs per socket between two `/proc/stat` readings.
fn busy_cpus(
    before: &BTreeMap<u32, Jiffies>,
    after: &BTreeMap<u32, Jiffies>,
    sockets: &BTreeMap<u32, u32>,
) -> BTreeMap<u32, f64> {
    let mut busy: BTreeMap<u32, f64> = BTreeMap::new();
    for (cpu, a) in after {
        let Some(b) = before.get(cpu) else { continue };
        let total = a.total.saturating_sub(b.total);
        if total == 0 {
            continue;
        }
        let fraction = (a.busy.saturating_sub(b.busy) as f64 / total as f64).clamp(0.0, 1.0);
        *busy
            .entry(sockets.get(cpu).copied().unwrap_or(0))
            .or_default() += fraction;
    }
    busy
}

/// One simulated zone: its directory, wrap range and energy so far.
struct Zone {
    dir: String,
    range_uj: u64,
    socket: u32,
    dram: bool,
    energy_j: f64,
}

fn run(o: &Options) -> Result<()> {
    let stat_path = o.proc_root.join("stat");
    let read_stat = || -> Result<BTreeMap<u32, Jiffies>> {
        let text = std::fs::read_to_string(&stat_path)
            .with_context(|| format!("reading {}", stat_path.display()))?;
        Ok(parse_proc_stat(&text))
    };
    let mut before = read_stat()?;
    if before.is_empty() {
        bail!("{} has no per-CPU lines", stat_path.display());
    }
    let sockets: BTreeMap<u32, u32> = before
        .keys()
        .map(|&cpu| (cpu, socket_of(&o.sysfs_root, cpu)))
        .collect();
    let n_sockets = sockets.values().copied().max().unwrap_or(0) + 1;

    std::fs::create_dir_all(&o.powercap)
        .with_context(|| format!("creating {}", o.powercap.display()))?;
    let fixtures = PowercapLayout::IntelServer { sockets: n_sockets }.zones();
    let tree = PowercapTree::create(&o.powercap, &fixtures);
    let mut zones: Vec<Zone> = fixtures
        .iter()
        .map(|z| {
            // IntelServer: `intel-rapl:<s>` is package s, `intel-rapl:<s>:0` its DRAM.
            let mut parts = z.dir.trim_start_matches("intel-rapl:").split(':');
            let socket = u32::from_str_radix(parts.next().unwrap_or("0"), 16).unwrap_or(0);
            Zone {
                dir: z.dir.clone(),
                range_uj: z.max_energy_range_uj,
                socket,
                dram: parts.next().is_some(),
                energy_j: 0.0,
            }
        })
        .collect();
    eprintln!(
        "ergon-sim-rapl: simulating RAPL under {} for {} CPU(s) on {n_sockets} socket(s), every {} ms \
         from {}: package = {} W + {} W x busy CPUs, dram = {} W + {} W x busy CPUs (per socket)",
        o.powercap.display(),
        before.len(),
        o.period.as_millis(),
        stat_path.display(),
        o.package_idle_w,
        o.package_per_cpu_w,
        o.dram_idle_w,
        o.dram_per_cpu_w
    );

    // The simulated node meter: RAPL + GPUs + the rest, from now on.
    let meter = match (&o.hwmon, &o.gpu_scenario) {
        (Some(dir), Some(scenario)) => {
            let gpus = Gpus::load(scenario)?;
            let tree = ergon_testkit::HwmonTree::create(
                dir,
                &[ergon_testkit::HwmonFixture::new("power_meter")
                    .with("energy1_input", &format!("{:020}\n", 0))],
            );
            eprintln!(
                "ergon-sim-rapl: simulating a node meter under {}: RAPL + {} GPU(s) from {} + {} W",
                tree.root().display(),
                gpus.profiles.len(),
                scenario.display(),
                o.rest_w
            );
            let t0 = gpus.now_s();
            Some((tree, gpus, t0))
        }
        _ => None,
    };
    let start = Instant::now();
    let mut last = start;
    let mut next = start + o.period;
    let mut next_log = start + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        // Absolute deadlines; a late tick skips the missed ones rather than bursting.
        next += o.period;
        let now = Instant::now();
        if next <= now {
            next = now + o.period;
        }
        let after = read_stat()?;
        let busy = busy_cpus(&before, &after, &sockets);
        before = after;
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        for z in &mut zones {
            let b = busy.get(&z.socket).copied().unwrap_or(0.0);
            let watts = if z.dram {
                o.dram_idle_w + o.dram_per_cpu_w * b
            } else {
                o.package_idle_w + o.package_per_cpu_w * b
            };
            z.energy_j += watts * dt;
            let uj = (z.energy_j * 1e6) as u64 % z.range_uj;
            tree.set_energy_uj(&z.dir, uj);
        }
        if let Some((hwmon, gpus, t0)) = &meter {
            // Package zones contain nothing of the DRAM zones: the node is their sum.
            let rapl: f64 = zones.iter().map(|z| z.energy_j).sum();
            let node = rapl
                + gpus.energy_j(*t0, gpus.now_s())
                + o.rest_w * now.duration_since(start).as_secs_f64();
            hwmon.set(0, "energy1_input", (node * 1e6) as u64);
        }
        if now >= next_log {
            next_log += Duration::from_secs(10);
            let elapsed = now.duration_since(start).as_secs_f64();
            let avg: Vec<String> = zones
                .iter()
                .map(|z| {
                    format!(
                        "{}{} avg {:.1} W",
                        if z.dram { "dram-" } else { "package-" },
                        z.socket,
                        z.energy_j / elapsed
                    )
                })
                .collect();
            let busy: Vec<String> = busy
                .iter()
                .map(|(s, b)| format!("socket {s}: {b:.2} busy CPUs"))
                .collect();
            eprintln!(
                "ergon-sim-rapl: t={elapsed:.0}s {}; {}",
                busy.join(", "),
                avg.join(", ")
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = parse_args(&args).and_then(|o| run(&o));
    if let Err(e) = result {
        eprintln!("ergon-sim-rapl: error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_cpus_follow_proc_stat_per_socket() {
        let t0 = parse_proc_stat(
            "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0 0 0\n",
        );
        // cpu0 fully busy for 100 jiffies, cpu1 a quarter busy.
        let t1 = parse_proc_stat(
            "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 150 0 50 100 0 0 0 0 0 0\ncpu1 10 5 0 270 5 5 5 0 0 0\n",
        );
        let one_socket: BTreeMap<u32, u32> = [(0, 0), (1, 0)].into();
        let b = busy_cpus(&t0, &t1, &one_socket);
        assert!((b[&0] - 1.25).abs() < 1e-9, "{b:?}");
        let two: BTreeMap<u32, u32> = [(0, 0), (1, 1)].into();
        let b = busy_cpus(&t0, &t1, &two);
        assert!(
            (b[&0] - 1.0).abs() < 1e-9 && (b[&1] - 0.25).abs() < 1e-9,
            "{b:?}"
        );
    }

    #[test]
    fn arguments_are_checked() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse_args(&args("--powercap /x --package-idle-w 40 --period-ms 50")).unwrap();
        assert_eq!(o.package_idle_w, 40.0);
        assert_eq!(o.period, Duration::from_millis(50));
        assert!(parse_args(&args("--period-ms 50")).is_err());
        assert!(parse_args(&args("--powercap /x --bogus 1")).is_err());
        assert!(parse_args(&args("--powercap /x --dram-idle-w -1")).is_err());
        assert!(parse_args(&args("--powercap")).is_err());
    }
}
