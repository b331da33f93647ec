//! The demo's simulated hardware (`scripts/demo` on a machine without NVIDIA GPUs or RAPL). Not
//! shipped.
//!
//! ```text
//! ergon-demo-hw describe [gpus] [rapl] [meter]
//! ergon-demo-hw gpus --lib LIBNVIDIA_ML_SO --dir DIR DEVICE...
//! ergon-demo-hw rapl-start --simulator ERGON_SIM_RAPL --powercap DIR --pidfile FILE --log FILE
//!                          [--period-ms 100] [--hwmon DIR --gpu-scenario FILE]
//! ergon-demo-hw rapl-stop --pidfile FILE
//! ```
//!
//! - `describe` prints what is simulated (the GPUs' power profiles, the RAPL power model, the
//!   node meter; all unless some are named), for the demo's "Hardware" section: the numbers come
//!   from the same constants the other commands use.
//! - `gpus` installs the fake NVML library (`tests/fake-nvml`) as `DIR/libnvidia-ml.so.1` (a new
//!   file renamed into place: a running ergond may have the old one mapped) and writes its
//!   scenario beside it (its clock starting now, `start_monotonic_ns`, so that the simulated node
//!   meter follows the same GPU power): GPU *i* has the minor number of the *i*-th DEVICE (the character device
//!   files the cluster's `gres.conf` lists), so ergond charges a job the GPUs Slurm gave it.
//!   Prints the `ergond.toml` line that loads it.
//! - `rapl-start` starts `ergon-sim-rapl` on a new powercap tree under DIR, detached from this
//!   process (its own process group, stdin from `/dev/null`, output appended to the log; only
//!   descriptors 0–2 are passed on, so a caller's pipe is not held open), records its pid,
//!   waits until the first counter (and the meter's, with `--hwmon`) is written (or the
//!   simulator exits: then its log is shown) and prints the `ergond.toml` lines that make
//!   ergond read that tree. With `--hwmon DIR` and `--gpu-scenario` (the scenario `gpus`
//!   wrote), the simulator also writes a whole-node hwmon meter under DIR: the simulated GPUs +
//!   CPU/DRAM + [`NODE_REST_W`] for the rest of the node (`[meters.hwmon] root =
//!   "DIR/class/hwmon"`).
//! - `rapl-stop` stops the simulator of the pid file (SIGTERM, then SIGKILL after 15 s; a pid
//!   that no longer runs `ergon-sim-rapl` is never signalled) and prints `stopped` or
//!   `not running`.
//!
//! Errors go to stderr as `ergon-demo-hw: error: …` with exit status 1.

#![deny(unsafe_code)]

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

const USAGE: &str = "usage: ergon-demo-hw describe [gpus] [rapl] [meter]
       ergon-demo-hw gpus --lib LIBNVIDIA_ML_SO --dir DIR DEVICE...
       ergon-demo-hw rapl-start --simulator ERGON_SIM_RAPL --powercap DIR --pidfile FILE --log FILE [--period-ms 100] [--hwmon DIR --gpu-scenario FILE]
       ergon-demo-hw rapl-stop --pidfile FILE";

/// The simulated GPUs' model name.
const GPU_NAME: &str = "NVIDIA H100 80GB HBM3 (simulated)";
/// The fake driver's version.
const DRIVER_VERSION: &str = "550.54.15";
/// How often the simulated GPU energy counters update (ms), as on real H100s.
const GPU_UPDATE_MS: u64 = 100;

/// The simulated RAPL power model (W): package = idle + per busy CPU, DRAM likewise.
const PACKAGE_IDLE_W: f64 = 35.0;
const PACKAGE_PER_CPU_W: f64 = 8.0;
const DRAM_IDLE_W: f64 = 5.0;
const DRAM_PER_CPU_W: f64 = 1.0;

/// The simulated node meter's rest of the node (fans, disks, NICs, power supplies), W.
const NODE_REST_W: f64 = 120.0;

/// How long `rapl-start` waits for the simulator's first counter.
const RAPL_START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `rapl-stop` waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The simulator's program name, checked against `/proc/PID/exe` before any signal.
const SIMULATOR: &str = "ergon-sim-rapl";

/// GPU `i`'s power profile (the fake NVML scenario's `profile`) and its counter's start value
/// (mJ, "since the driver loaded").
fn gpu_profile(i: usize) -> (serde_json::Value, u64) {
    match i {
        0 => (
            json!({"kind": "square", "low_w": 250, "high_w": 650, "period_s": 4}),
            2_400_000_000,
        ),
        1 => (
            json!({"kind": "ramp", "from_w": 250, "to_w": 650, "period_s": 5}),
            2_100_000_000,
        ),
        2 => (
            json!({"kind": "random", "seed": 2, "min_w": 55, "max_w": 68, "segment_s": 1}),
            900_000_000,
        ),
        3 => (
            json!({"kind": "random", "seed": 3, "min_w": 56, "max_w": 66, "segment_s": 1}),
            950_000_000,
        ),
        i => (
            json!({"kind": "random", "seed": i, "min_w": 55, "max_w": 68, "segment_s": 1}),
            1_000_000_000,
        ),
    }
}

/// GPU `i`'s SM utilisation (%) and the fraction of the time its power cap holds its clocks
/// down, as the fake driver reports them: gpu0 busy and sometimes capped, gpu1 allocated with
/// it but left idle (so that the report's idle-GPU line shows), the others idle.
fn gpu_use(i: usize) -> (u32, f64) {
    match i {
        0 => (92, 0.2),
        1 => (2, 0.0),
        _ => (1, 0.0),
    }
}

/// How many of [`description`]'s lines are about the GPUs (the rest are about RAPL).
const GPU_LINES: usize = 4;

/// The lines `describe` prints: [`GPU_LINES`] about the GPUs, then RAPL's.
fn description() -> Vec<String> {
    let p = |i| gpu_profile(i).0;
    let (g0, g1) = (p(0), p(1));
    vec![
        format!(
            "GPUs:     SIMULATED: one fake \"{GPU_NAME}\" per GPU of the cluster's gres.conf (a fake libnvidia-ml.so that ergond loads like the real driver)"
        ),
        format!(
            "          gpu0 square wave {}/{} W ({} s each), gpu1 ramp {}->{} W every {} s, gpu2 and gpu3 idle ~60 W",
            g0["low_w"],
            g0["high_w"],
            g0["period_s"].as_f64().unwrap_or(0.0) / 2.0,
            g1["from_w"],
            g1["to_w"],
            g1["period_s"]
        ),
        format!(
            "          SM utilisation gpu0 {} % (power-capped {} % of the time), gpu1 {} % (idle though it draws power), others {} %",
            gpu_use(0).0,
            gpu_use(0).1 * 100.0,
            gpu_use(1).0,
            gpu_use(2).0
        ),
        format!(
            "          (counters update every {GPU_UPDATE_MS} ms; the fake driver follows these profiles whatever the jobs do)"
        ),
        "CPU/DRAM: SIMULATED: a generated powercap tree whose counters ergon-sim-rapl moves from the REAL"
            .to_string(),
        format!(
            "          /proc/stat load: package = {PACKAGE_IDLE_W} W + {PACKAGE_PER_CPU_W} W x busy CPUs, DRAM = {DRAM_IDLE_W} W + {DRAM_PER_CPU_W} W x busy CPUs"
        ),
    ]
}

/// What `describe meter` prints.
fn meter_description() -> String {
    format!(
        "Node:     SIMULATED: a whole-node hwmon power meter (power_meter, energy1_input) = the simulated CPU/DRAM + the simulated GPU power + {NODE_REST_W} W for the rest of the node"
    )
}

/// The minor number of a device number (glibc's `minor()`).
fn minor_of(rdev: u64) -> u64 {
    (rdev & 0xff) | ((rdev >> 12) & 0xffff_ff00)
}

/// The minor number of character device `path`.
fn device_minor(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("GPU device {}", path.display()))?;
    if !meta.file_type().is_char_device() {
        bail!(
            "GPU device {} is not a character device (the cluster's gres.conf lists character \
             devices: run scripts/slurm-cluster up first)",
            path.display()
        );
    }
    Ok(minor_of(meta.rdev()))
}

/// The fake NVML scenario for GPUs with these minors.
fn scenario(minors: &[u64]) -> serde_json::Value {
    let gpus: Vec<_> = minors
        .iter()
        .enumerate()
        .map(|(i, &minor)| {
            let (profile, initial) = gpu_profile(i);
            let (util, power_cap) = gpu_use(i);
            json!({
                "uuid": format!("GPU-5e0d0000-0000-4000-8000-{i:012x}"),
                "name": GPU_NAME,
                "minor": minor,
                "profile": profile,
                "update_period_ms": GPU_UPDATE_MS,
                "initial_energy_mj": initial,
                "utilization": util,
                "throttle": {"power_cap": power_cap, "sw_thermal": 0.0, "hw_thermal": 0.0},
            })
        })
        .collect();
    json!({"driver_version": DRIVER_VERSION, "gpus": gpus,
           "start_monotonic_ns": ergond::clock::monotonic_ns()})
}

/// Write `bytes` to `path` through a new file renamed into place.
fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let name = path.file_name().context("a file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.new"));
    let _ = std::fs::remove_file(&tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// A TOML basic string (the paths here are plain, but quotes and backslashes are escaped).
fn toml_str(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn cmd_gpus(lib: &Path, dir: &Path, devices: &[PathBuf]) -> Result<String> {
    if devices.is_empty() {
        bail!("gpus: name at least one GPU device file\n{USAGE}");
    }
    let minors = devices
        .iter()
        .map(|d| device_minor(d))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let so = dir.join("libnvidia-ml.so.1");
    let bytes = std::fs::read(lib).with_context(|| {
        format!(
            "reading the fake NVML library {} (cargo build -p fake-nvml)",
            lib.display()
        )
    })?;
    replace_file(&so, &bytes, 0o755)?;
    let text = serde_json::to_string_pretty(&scenario(&minors))? + "\n";
    replace_file(
        &dir.join("libnvidia-ml.so.1.scenario.json"),
        text.as_bytes(),
        0o644,
    )?;
    Ok(format!("nvml_library = {}\n", toml_str(&so)))
}

/// The pid in a pid file, if it names a process that runs `program`.
fn running(pidfile: &Path, program: &str) -> Option<Pid> {
    let text = std::fs::read_to_string(pidfile).ok()?;
    let pid: i32 = text.trim().parse().ok().filter(|&p| p > 1)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    (name.trim_end_matches(" (deleted)") == program && !zombie(pid)).then_some(Pid::from_raw(pid))
}

/// Whether `pid` has exited (gone, or a zombie waiting for its parent).
fn zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// The last lines of a log, indented, for an error message.
fn log_tail(log: &Path) -> String {
    match std::fs::read_to_string(log) {
        Ok(text) if !text.trim().is_empty() => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            format!(
                "\nlast lines of {}:\n    {}",
                log.display(),
                tail.join("\n    ")
            )
        }
        _ => format!("\n({} is empty or missing)", log.display()),
    }
}

struct RaplStart {
    simulator: PathBuf,
    powercap: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
    period_ms: u64,
    /// The simulated node meter's directory and the GPU scenario it follows.
    meter: Option<(PathBuf, PathBuf)>,
}

fn cmd_rapl_start(o: &RaplStart) -> Result<String> {
    if let Some(pid) = running(&o.pidfile, SIMULATOR) {
        bail!(
            "the RAPL simulator of {} already runs (pid {pid}): stop it first (rapl-stop)",
            o.pidfile.display()
        );
    }
    for dir in [&o.powercap, &o.pidfile, &o.log] {
        let dir = if dir == &o.powercap {
            dir.as_path()
        } else {
            dir.parent().unwrap_or(Path::new("."))
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&o.log)
        .with_context(|| format!("opening {}", o.log.display()))?;
    let mut child = Command::new(&o.simulator)
        .arg("--powercap")
        .arg(&o.powercap)
        .args(["--period-ms", &o.period_ms.to_string()])
        .args(["--package-idle-w", &PACKAGE_IDLE_W.to_string()])
        .args(["--package-per-cpu-w", &PACKAGE_PER_CPU_W.to_string()])
        .args(["--dram-idle-w", &DRAM_IDLE_W.to_string()])
        .args(["--dram-per-cpu-w", &DRAM_PER_CPU_W.to_string()])
        .args(o.meter.iter().flat_map(|(hwmon, scenario)| {
            [
                "--hwmon".into(),
                hwmon.clone().into_os_string(),
                "--gpu-scenario".into(),
                scenario.clone().into_os_string(),
                "--rest-w".into(),
                NODE_REST_W.to_string().into(),
            ]
        }))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the caller does not stop it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", o.simulator.display()))?;
    let pid = child.id();
    replace_file(&o.pidfile, format!("{pid}\n").as_bytes(), 0o644)?;
    // Ready when every tree it simulates is: the first RAPL counter and, with a meter, the
    // meter's counter (reached through the class link, which is made last).
    let first = o.powercap.join("intel-rapl:0/energy_uj");
    let ready: Vec<PathBuf> = std::iter::once(first.clone())
        .chain(
            o.meter
                .iter()
                .map(|(hwmon, _)| hwmon.join("class/hwmon/hwmon0/energy1_input")),
        )
        .collect();
    let deadline = Instant::now() + RAPL_START_TIMEOUT;
    loop {
        if ready
            .iter()
            .all(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
        {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let _ = std::fs::remove_file(&o.pidfile);
            bail!("the RAPL simulator exited ({status}){}", log_tail(&o.log));
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = child.wait();
            let _ = std::fs::remove_file(&o.pidfile);
            bail!(
                "the RAPL simulator did not write {} within {} s{}",
                ready
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and "),
                RAPL_START_TIMEOUT.as_secs(),
                log_tail(&o.log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The simulator outlives this process (it is reparented when we exit): not waited for.
    drop(child);
    Ok(format!(
        "powercap_root = {}\n\
         perf_sysfs_root = {}   # no perf power PMU: the simulated powercap tree is read\n\
         prefer_perf = false\n",
        toml_str(&o.powercap),
        toml_str(&o.powercap.with_file_name("no-perf")),
    ))
}

fn cmd_rapl_stop(pidfile: &Path) -> Result<String> {
    let Some(pid) = running(pidfile, SIMULATOR) else {
        let _ = std::fs::remove_file(pidfile);
        return Ok("not running\n".into());
    };
    kill(pid, Signal::SIGTERM).with_context(|| format!("SIGTERM to pid {pid}"))?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    while !zombie(pid.as_raw()) {
        if Instant::now() >= deadline {
            eprintln!(
                "ergon-demo-hw: the RAPL simulator (pid {pid}) ignored SIGTERM for {} s: sending SIGKILL",
                STOP_TIMEOUT.as_secs()
            );
            let _ = kill(pid, Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(pidfile);
    Ok("stopped\n".into())
}

/// A command's arguments: `--option value` pairs and the remaining words.
struct Args {
    options: Vec<(String, String)>,
    words: Vec<PathBuf>,
}

impl Args {
    /// Split `args`; an option not in `known`, or without a value, is an error.
    fn parse(args: &[String], known: &[&str]) -> Result<Args> {
        let mut parsed = Args {
            options: Vec::new(),
            words: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if !known.contains(&name) {
                    bail!("unknown option {a:?}\n{USAGE}");
                }
                let v = it
                    .next()
                    .with_context(|| format!("{a} needs a value\n{USAGE}"))?;
                parsed.options.push((name.to_string(), v.clone()));
            } else {
                parsed.words.push(PathBuf::from(a));
            }
        }
        Ok(parsed)
    }

    /// The last value of `--name`, if given.
    fn value(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn required(&self, name: &str) -> Result<PathBuf> {
        self.value(name)
            .map(PathBuf::from)
            .with_context(|| format!("--{name} is required\n{USAGE}"))
    }

    fn no_words(&self) -> Result<()> {
        match self.words.first() {
            Some(w) => bail!("unexpected argument {:?}\n{USAGE}", w.display()),
            None => Ok(()),
        }
    }
}

fn run(args: &[String]) -> Result<String> {
    let (cmd, rest) = args.split_first().context(USAGE)?;
    match cmd.as_str() {
        "-h" | "--help" | "help" => Ok(format!("{USAGE}\n")),
        "describe" => {
            let words = Args::parse(rest, &[])?.words;
            let (mut gpus, mut rapl, mut meter) =
                (words.is_empty(), words.is_empty(), words.is_empty());
            for w in &words {
                match w.to_str() {
                    Some("gpus") => gpus = true,
                    Some("rapl") => rapl = true,
                    Some("meter") => meter = true,
                    _ => bail!(
                        "describe: {:?} is not gpus, rapl or meter\n{USAGE}",
                        w.display()
                    ),
                }
            }
            let d = description();
            let (g, r) = d.split_at(GPU_LINES);
            let mut out = String::new();
            for line in gpus
                .then_some(g)
                .into_iter()
                .chain(rapl.then_some(r))
                .flatten()
            {
                out += line;
                out.push('\n');
            }
            if meter {
                out += &meter_description();
                out.push('\n');
            }
            Ok(out)
        }
        "gpus" => {
            let a = Args::parse(rest, &["lib", "dir"])?;
            cmd_gpus(&a.required("lib")?, &a.required("dir")?, &a.words)
        }
        "rapl-start" => {
            let a = Args::parse(
                rest,
                &[
                    "simulator",
                    "powercap",
                    "pidfile",
                    "log",
                    "period-ms",
                    "hwmon",
                    "gpu-scenario",
                ],
            )?;
            a.no_words()?;
            let period_ms = match a.value("period-ms") {
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|ms| (10..=10_000).contains(ms))
                    .with_context(|| format!("--period-ms {v:?}: a number of ms in 10..=10000"))?,
                None => 100,
            };
            cmd_rapl_start(&RaplStart {
                simulator: a.required("simulator")?,
                powercap: a.required("powercap")?,
                pidfile: a.required("pidfile")?,
                log: a.required("log")?,
                period_ms,
                meter: match (a.value("hwmon"), a.value("gpu-scenario")) {
                    (Some(h), Some(s)) => Some((h.into(), s.into())),
                    (None, None) => None,
                    _ => bail!("rapl-start: --hwmon and --gpu-scenario go together\n{USAGE}"),
                },
            })
        }
        "rapl-stop" => {
            let a = Args::parse(rest, &["pidfile"])?;
            a.no_words()?;
            cmd_rapl_stop(&a.required("pidfile")?)
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(out.as_bytes());
        }
        Err(e) => {
            eprintln!("ergon-demo-hw: error: {e:#}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minors_follow_glibc() {
        // makedev(195, 6) and makedev(4, 300) as glibc encodes them.
        assert_eq!(minor_of((195 << 8) | 6), 6);
        let big = ((300u64 & 0xffff_ff00) << 12) | (300 & 0xff) | (4 << 8);
        assert_eq!(minor_of(big), 300);
    }

    #[test]
    fn scenario_gives_gpu_i_the_minor_of_device_i() {
        let s = scenario(&[6, 7, 4, 5]);
        let minors: Vec<u64> = s["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["minor"].as_u64().unwrap())
            .collect();
        assert_eq!(minors, [6, 7, 4, 5]);
        assert_eq!(s["gpus"][0]["profile"]["kind"], "square");
        assert_eq!(s["gpus"][1]["profile"]["kind"], "ramp");
        let uuids: std::collections::BTreeSet<_> = s["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["uuid"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(uuids.len(), 4, "{uuids:?}");
    }

    #[test]
    fn description_states_the_model_in_use() {
        let d = description().join("\n");
        assert!(d.contains("square wave 250/650 W (2 s each)"), "{d}");
        assert!(d.contains("ramp 250->650 W every 5 s"), "{d}");
        assert!(
            d.contains("package = 35 W + 8 W x busy CPUs, DRAM = 5 W + 1 W x busy CPUs"),
            "{d}"
        );
    }

    #[test]
    fn arguments_are_checked() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert!(run(&args("bogus")).is_err());
        assert!(run(&args("gpus --lib /x")).is_err());
        assert!(run(&args("rapl-stop --pidfile")).is_err());
        assert!(run(&args("rapl-stop --pidfile /x extra")).is_err());
        let e = run(&args(
            "rapl-start --simulator /s --powercap /p --pidfile /f --log /l --period-ms 5",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("--period-ms"), "{e}");
        let e = run(&args("describe --bogus 1")).unwrap_err();
        assert!(e.to_string().contains("unknown option"), "{e}");
        assert!(run(&args("describe disks")).is_err());
        let gpus = run(&args("describe gpus")).unwrap();
        let rapl = run(&args("describe rapl")).unwrap();
        assert!(
            gpus.starts_with("GPUs:") && !gpus.contains("CPU/DRAM"),
            "{gpus}"
        );
        assert!(
            rapl.starts_with("CPU/DRAM:") && !rapl.contains("GPUs"),
            "{rapl}"
        );
        let meter = run(&args("describe meter")).unwrap();
        assert!(
            meter.starts_with("Node:     SIMULATED") && meter.contains("120 W"),
            "{meter}"
        );
        assert_eq!(run(&args("describe")).unwrap(), gpus + &rapl + &meter);
        let e = run(&args(
            "rapl-start --simulator /s --powercap /p --pidfile /f --log /l --hwmon /h",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
    }
}
