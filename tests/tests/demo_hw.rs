//! `ergon-demo-hw`, the demo's simulated hardware set-up, on its own (no cluster, no root):
//!
//! - `gpus` installs the fake NVML library and writes a scenario whose GPU *i* has the minor
//!   number of the *i*-th device file, and refuses a device that is not a character device;
//! - `rapl-start` starts the real `ergon-sim-rapl` detached (the caller's pipes are not held
//!   open: `output()` returns while the simulator runs), records its pid, returns once the first
//!   counter is written, and the counters then move; a second start is refused; a simulator
//!   that exits at once is reported with its log;
//! - `rapl-stop` stops it (the process is gone) and says `not running` the second time.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TOOL: &str = env!("CARGO_BIN_EXE_ergon-demo-hw");
const SIMULATOR: &str = env!("CARGO_BIN_EXE_ergon-sim-rapl");

fn tool(args: &[&str]) -> Output {
    Command::new(TOOL)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {TOOL}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir()
        .join("ergon-tests")
        .join(format!("demo-hw-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether a process runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Poll `cond` every 20 ms for up to `limit`.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn gpus_get_the_minors_of_the_device_files() {
    let dir = scratch("gpus");
    let lib = dir.join("libnvidia_ml.so");
    std::fs::write(&lib, b"\x7fELF not really").unwrap();
    let nvml = dir.join("nvml");
    // /dev/null is 1:3, /dev/zero 1:5 on every Linux.
    let out = tool(&[
        "gpus",
        "--lib",
        s(&lib),
        "--dir",
        s(&nvml),
        "/dev/zero",
        "/dev/null",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "nvml_library = \"{}\"\n",
            nvml.join("libnvidia-ml.so.1").display()
        )
    );
    assert_eq!(
        std::fs::read(nvml.join("libnvidia-ml.so.1")).unwrap(),
        b"\x7fELF not really"
    );
    let scenario: serde_json::Value = serde_json::from_slice(
        &std::fs::read(nvml.join("libnvidia-ml.so.1.scenario.json")).unwrap(),
    )
    .unwrap();
    let minors: Vec<u64> = scenario["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["minor"].as_u64().unwrap())
        .collect();
    assert_eq!(minors, [5, 3], "{scenario:#}");

    // A regular file is no GPU device: a clear error, nothing half written.
    let other = dir.join("other");
    let out = tool(&["gpus", "--lib", s(&lib), "--dir", s(&other), s(&lib)]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a character device") && err.contains("libnvidia_ml.so"),
        "{err}"
    );
    assert!(!other.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_rapl_simulator_starts_detached_moves_its_counters_and_stops() {
    let dir = scratch("rapl");
    let powercap = dir.join("sim/powercap");
    let pidfile = dir.join("run/sim-rapl.pid");
    let log = dir.join("log/sim-rapl.log");
    let start = [
        "rapl-start",
        "--simulator",
        SIMULATOR,
        "--powercap",
        s(&powercap),
        "--pidfile",
        s(&pidfile),
        "--log",
        s(&log),
        "--period-ms",
        "20",
    ];
    // output() waits for EOF on stdout and stderr: it returns only because the simulator holds
    // neither of the tool's pipes.
    let t0 = Instant::now();
    let out = tool(&start);
    assert!(out.status.success(), "{}", text(&out));
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("powercap_root = \"{}\"", powercap.display()))
            && stdout.contains("prefer_perf = false"),
        "{stdout}"
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid), "simulator {pid} not running:\n{}", text(&out));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("ergon-sim-rapl"), "{}", exe.display());

    // The counter is there at once, and moves.
    let counter = powercap.join("intel-rapl:0/energy_uj");
    let read = || -> u64 {
        std::fs::read_to_string(&counter)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let first = read();
    assert!(
        wait_until(Duration::from_secs(5), || read() != first),
        "{} stays at {first}",
        counter.display()
    );

    // A second start is refused while it runs.
    let again = tool(&start);
    assert!(!again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already runs"),
        "{}",
        text(&again)
    );

    let stop = tool(&["rapl-stop", "--pidfile", s(&pidfile)]);
    assert!(stop.status.success(), "{}", text(&stop));
    assert_eq!(String::from_utf8_lossy(&stop.stdout), "stopped\n");
    assert!(
        wait_until(Duration::from_secs(5), || !alive(pid)),
        "simulator {pid} still runs after rapl-stop"
    );
    assert!(!pidfile.exists());
    let stop = tool(&["rapl-stop", "--pidfile", s(&pidfile)]);
    assert!(stop.status.success(), "{}", text(&stop));
    assert_eq!(String::from_utf8_lossy(&stop.stdout), "not running\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_simulator_that_exits_at_once_is_reported_with_its_log() {
    let dir = scratch("fails");
    let pidfile = dir.join("run/sim-rapl.pid");
    let log = dir.join("log/sim-rapl.log");
    // A stand-in that fails the way a simulator that cannot read /proc/stat does.
    let fake = dir.join("ergon-sim-rapl");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'simulated failure: no /proc/stat here' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = tool(&[
        "rapl-start",
        "--simulator",
        s(&fake),
        "--powercap",
        s(&dir.join("powercap")),
        "--pidfile",
        s(&pidfile),
        "--log",
        s(&log),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the RAPL simulator exited") && err.contains("no /proc/stat here"),
        "{err}"
    );
    assert!(!pidfile.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The simulated node meter: its hwmon energy counter moves at the simulated CPU/DRAM power, plus
/// the scenario's GPU power, plus the rest of the node (120 W): the same RAPL tick writes both, so
/// over a stretch the meter's increase is the RAPL zones' plus (100 + 120) W × the time.
#[test]
fn the_simulated_node_meter_is_components_plus_the_rest() {
    let dir = scratch("meter");
    let powercap = dir.join("sim/powercap");
    let hwmon = dir.join("sim/hwmon");
    let scenario = dir.join("scenario.json");
    std::fs::write(
        &scenario,
        serde_json::json!({
            "start_monotonic_ns": ergond::clock::monotonic_ns(),
            "gpus": [{"profile": {"kind": "constant", "watts": 100.0}}],
        })
        .to_string(),
    )
    .unwrap();
    let pidfile = dir.join("run/sim-rapl.pid");
    let out = tool(&[
        "rapl-start",
        "--simulator",
        SIMULATOR,
        "--powercap",
        s(&powercap),
        "--pidfile",
        s(&pidfile),
        "--log",
        s(&dir.join("sim-rapl.log")),
        "--period-ms",
        "50",
        "--hwmon",
        s(&hwmon),
        "--gpu-scenario",
        s(&scenario),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let dev = hwmon.join("class/hwmon/hwmon0");
    assert_eq!(
        std::fs::read_to_string(dev.join("name")).unwrap(),
        "power_meter\n"
    );
    let num = |p: &Path| -> f64 {
        std::fs::read_to_string(p)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap() as f64
            / 1e6
    };
    // Both files of one tick: read until two reads of the meter agree around the RAPL reads.
    let sample = || loop {
        let m0 = num(&dev.join("energy1_input"));
        let rapl: f64 = ["intel-rapl:0", "intel-rapl:0:0"]
            .iter()
            .map(|z| num(&powercap.join(z).join("energy_uj")))
            .sum();
        if num(&dev.join("energy1_input")) == m0 {
            return (Instant::now(), m0, rapl);
        }
    };
    assert!(wait_until(Duration::from_secs(5), || sample().1 > 0.0));
    let (t0, m0, r0) = sample();
    std::thread::sleep(Duration::from_secs(1));
    let (t1, m1, r1) = sample();
    let dt = t1.duration_since(t0).as_secs_f64();
    let expected = (r1 - r0) + 220.0 * dt;
    assert!(
        (m1 - m0 - expected).abs() < 0.1 * expected,
        "meter +{} J, RAPL +{} J over {dt} s",
        m1 - m0,
        r1 - r0
    );
    let stop = tool(&["rapl-stop", "--pidfile", s(&pidfile)]);
    assert!(stop.status.success(), "{}", text(&stop));
    let _ = std::fs::remove_dir_all(&dir);
}
