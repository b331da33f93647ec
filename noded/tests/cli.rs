//! The `ergond` binary's diagnostic subcommands, run as a user would: `check` (text and JSON)
//! against the fake NVML library and a generated powercap tree, with invalid configurations and
//! with nothing to measure; `probe` against a fake GPU with a known counter period and power;
//! and the service's refusals (invalid configuration, busy listen address, nothing to measure).

mod common;

use common::{toml_str, FakeNvml};
use ergon_testkit::{PowercapLayout, PowercapTree};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const GPU_COUNTER: &str = "GPU-c0c0c0c0-1111-2222-3333-444444444444";
const GPU_NO_COUNTER: &str = "GPU-dddddddd-5555-6666-7777-888888888888";

fn ergond(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ergond"))
        .args(args)
        .output()
        .expect("run ergond")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A node: config file plus the trees it points at.
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Node {
    /// Config pointing at `nvml` (or a missing library), a powercap tree with `layout` (or an
    /// empty powercap directory), empty perf/sysfs roots (so perf is unusable and its reason is
    /// reported) and a cgroup v2 root.
    fn new(nvml: Option<&Path>, layout: Option<PowercapLayout>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let powercap = dir.path().join("powercap");
        std::fs::create_dir_all(&powercap).unwrap();
        if let Some(l) = layout {
            PowercapTree::create(&powercap, &l.zones());
        }
        let cgroup = dir.path().join("cgroup");
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.controllers"), "cpu memory\n").unwrap();
        let nvml = nvml
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("no-driver/libnvidia-ml.so.1"));
        let config = dir.path().join("ergond.toml");
        std::fs::write(
            &config,
            format!(
                "nvml_library = {}\npowercap_root = {}\nperf_sysfs_root = {}\nsysfs_root = {}\n\
                 cgroup_root = {}\nsocket_path = {}\nstate_dir = {}\nspool_dir = {}\n",
                toml_str(&nvml),
                toml_str(&powercap),
                toml_str(&dir.path().join("perf")),
                toml_str(&dir.path().join("sys")),
                toml_str(&cgroup),
                toml_str(&dir.path().join("run/ergond.sock")),
                toml_str(&dir.path().join("state")),
                toml_str(&dir.path().join("spool")),
            ),
        )
        .unwrap();
        Self { dir, config }
    }

    fn config(&self) -> &str {
        self.config.to_str().unwrap()
    }
}

/// Two GPUs: one with the energy counter (20 ms period), one without (power only).
fn two_gpus() -> FakeNvml {
    FakeNvml::new(json!({"gpus": [
        {"uuid": GPU_COUNTER, "name": "Fake H100", "minor": 3, "pci_bus_id": "00000000:17:00.0",
         "profile": {"kind": "constant", "watts": 300.0}, "update_period_ms": 20.0,
         "initial_energy_mj": 5_000_000u64,
         "utilization": 50, "temperature_c": 60, "throttle": {"power_cap": 0.1}, "xids": []},
        {"uuid": GPU_NO_COUNTER, "name": "Fake P100", "minor": 7, "pci_bus_id": "00000000:65:00.0",
         "profile": {"kind": "constant", "watts": 120.0}, "update_period_ms": 50.0,
         "unsupported": ["energy"]},
    ]}))
}

#[test]
fn check_lists_gpus_zones_and_cgroup_and_exits_0() {
    let fake = two_gpus();
    let node = Node::new(
        Some(&fake.lib),
        Some(PowercapLayout::IntelServer { sockets: 2 }),
    );

    let out = ergond(&["check", "--config", node.config()]);
    let stdout = text(&out.stdout);
    println!("{stdout}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    for want in [
        "NVML 12.550.54.15, driver 550.54.15, 2 GPU(s)",
        &format!("GPU 0  minor 3  {GPU_COUNTER}  00000000:17:00.0  Fake H100"),
        &format!("GPU 1  minor 7  {GPU_NO_COUNTER}  00000000:65:00.0  Fake P100"),
        "energy: counter (energy counter: field value, power: field value)",
        "energy: integrated power (energy counter: unsupported, power: field value)",
        "energy counter update period: ",
        "activity and health: SM utilisation, temperature, throttle power_cap, Xid events; \
         not reported: memory used, SM clock, memory clock, throttle sw_thermal, \
         throttle hw_thermal, throttle hw_power_brake, ECC errors",
        "activity and health: none; not reported: SM utilisation, memory used",
        "backend: powercap, 4 zone(s)",
        "perf power PMU not used: ",
        "package-0        wraps after 262143.3 J",
        "package-0:dram   wraps after 65713.0 J",
        "package-1        wraps after",
        "package-1:dram   wraps after",
        "v2 under",
        "RESULT: ok: energy from nvml and rapl; 0 problem(s)",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("PROBLEM"), "{stdout}");

    // The same inventory as JSON.
    let out = ergond(&["check", "--json", "-c", node.config()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("check --json prints JSON");
    let gpus = v["nvml"]["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[0]["uuid"], GPU_COUNTER);
    assert_eq!(gpus[0]["minor"], 3);
    assert_eq!(gpus[0]["pci_bus_id"], "00000000:17:00.0");
    assert_eq!(gpus[0]["method"], "counter");
    assert_eq!(gpus[0]["energy_read"], "field_value");
    assert_eq!(gpus[0]["update_period_of"], "energy counter");
    let period = gpus[0]["update_period_ms"].as_f64().unwrap();
    assert!((15.0..=25.0).contains(&period), "detected {period} ms");
    assert_eq!(gpus[1]["uuid"], GPU_NO_COUNTER);
    assert_eq!(gpus[1]["minor"], 7);
    assert_eq!(gpus[1]["method"], "integrated_power");
    assert_eq!(gpus[1]["energy_read"], "unsupported");
    assert!(gpus[1]["method_reason"]
        .as_str()
        .unwrap()
        .contains("no energy counter"));
    assert_eq!(v["nvml"]["driver_version"], "550.54.15");
    assert_eq!(v["rapl"]["backend"], "powercap");
    let zones: Vec<&str> = v["rapl"]["zones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        zones,
        ["package-0", "package-0:dram", "package-1", "package-1:dram"]
    );
    let wrap = v["rapl"]["zones"][0]["wraps_after_j"].as_f64().unwrap();
    assert!((wrap - 262_143.328_851).abs() < 1e-6, "{wrap}");
    assert_eq!(v["cgroup"]["version"], "v2");
    assert_eq!(v["energy_sources"], json!(["nvml", "rapl"]));
    assert_eq!(v["problems"], json!([]));
    assert_eq!(v["exit_code"], 0);
}

#[test]
fn invalid_config_exits_1_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("powercap_rot = \"/sys/class/powercap\"\n", "powercap_rot"),
        (
            "[sampling]\nrapl_period_ms = 0\n",
            "sampling.rapl_period_ms",
        ),
        ("[sampling]\ngpu_hz = 100\n", "gpu_hz"),
        ("prefer_perf = 3\n", "prefer_perf"),
        ("cgroup_root = \"sys/fs/cgroup\"\n", "cgroup_root"),
    ];
    for (i, (body, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, body).unwrap();
        let out = ergond(&["check", "--config", path.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{body}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(&format!("bad{i}.toml")),
            "{body}: {stderr}"
        );
        // --json still prints one JSON object, with the error.
        let out = ergond(&["check", "--json", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["config"]["error"].as_str().unwrap().contains(key), "{v}");
        assert_eq!(v["exit_code"], 1);
        // probe validates the same way.
        let out = ergond(&["probe", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "probe with {body}");
    }
    // An explicitly given file must exist.
    let missing = dir.path().join("missing.toml");
    let out = ergond(&["check", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("missing.toml"));
}

#[test]
fn nothing_to_measure_exits_2_and_says_what_is_missing() {
    let node = Node::new(None, None);
    let missing_lib = node.dir.path().join("no-driver/libnvidia-ml.so.1");
    let powercap = node.dir.path().join("powercap");
    let out = ergond(&["check", "--config", node.config()]);
    let stdout = text(&out.stdout);
    println!("{stdout}");
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    for want in [
        format!("PROBLEM: no NVIDIA driver library at {}", missing_lib.display()),
        "`nvml_library` in".to_string(),
        format!(
            "PROBLEM: no CPU energy (RAPL): no RAPL energy counters found: {} has no intel-rapl zones",
            powercap.display()
        ),
        "RESULT: no energy source works on this node".to_string(),
    ] {
        assert!(stdout.contains(&want), "missing {want:?} in:\n{stdout}");
    }

    let out = ergond(&["check", "--json", "--config", node.config()]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["energy_sources"], json!([]));
    assert_eq!(v["nvml"]["ok"], false);
    assert_eq!(v["rapl"]["ok"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["exit_code"], 2);

    // probe has nothing to probe either, and says why.
    let out = ergond(&["probe", "--seconds", "0.1", "--config", node.config()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no NVIDIA driver library"));
}

#[test]
fn probe_reports_counter_period_latency_and_counter_vs_integrated_energy() {
    // GPU 0 reads through the one field-values call; GPU 1 has no field-values call (old
    // driver), so its reads use the two fallback functions.
    let fake = FakeNvml::new(json!({"gpus": [
        {"uuid": "GPU-probe-0", "minor": 0, "profile": {"kind": "constant", "watts": 300.0},
         "update_period_ms": 20.0, "initial_energy_mj": 1_000_000u64},
        {"uuid": "GPU-probe-1", "minor": 1, "profile": {"kind": "constant", "watts": 150.0},
         "update_period_ms": 20.0, "unsupported": ["field_values"]},
    ]}));
    let node = Node::new(Some(&fake.lib), None);
    let out = ergond(&[
        "probe",
        "--seconds",
        "1",
        "--period-ms",
        "5",
        "--json",
        "--config",
        node.config(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{}", serde_json::to_string_pretty(&v).unwrap());
    assert_eq!(v["period_ms"], 5.0);
    assert!(v["ticks"].as_u64().unwrap() >= 150, "{}", v["ticks"]);
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    for (g, watts) in gpus.iter().zip([300.0, 150.0]) {
        assert_eq!(g["method"], "counter");
        assert_eq!(g["read_errors"], 0);
        let u = &g["counter_update"];
        // The median is robust to a tick delayed by a loaded machine (the mean is not: a
        // missed update makes one interval twice as long).
        let median = u["median_ms"].as_f64().unwrap();
        assert!((15.0..=25.0).contains(&median), "median {median} ms");
        assert!(u["changes"].as_u64().unwrap() >= 30, "{u}");
        let e = &g["energy"];
        assert_eq!(e["window"], "first to last counter change");
        let window = e["window_s"].as_f64().unwrap();
        let counter = e["counter_j"].as_f64().unwrap();
        let integrated = e["integrated_j"].as_f64().unwrap();
        let diff = e["relative_difference"].as_f64().unwrap();
        assert!(
            diff.abs() < 0.02,
            "counter {counter} J vs integrated {integrated} J"
        );
        assert!(
            ((counter / window) - watts).abs() / watts < 0.05,
            "{counter} J over {window} s"
        );
    }
    let calls = |g: &Value| -> Vec<String> {
        g["latency"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                assert!(l["p50_us"].as_f64().unwrap() <= l["p99_us"].as_f64().unwrap());
                l["call"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(calls(&gpus[0]), ["nvmlDeviceGetFieldValues", "whole read"]);
    assert_eq!(
        calls(&gpus[1]),
        [
            "nvmlDeviceGetTotalEnergyConsumption",
            "nvmlDeviceGetPowerUsage",
            "whole read"
        ]
    );

    // The text form has the same sections.
    let out = ergond(&[
        "probe",
        "--seconds",
        "0.2",
        "--period-ms",
        "5",
        "-c",
        node.config(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for want in [
        "GPU 0  minor 0  GPU-probe-0",
        "energy counter update period: min",
        "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetTotalEnergyConsumption",
        "by counter difference",
        "by integrating power",
        "difference (counter - integrated) / counter",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn service_refuses_bad_config_busy_port_and_no_source_and_help_is_honest() {
    // An invalid configuration: exit 1, the key and the file named.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "metrics_listen = \"localhost\"\n").unwrap();
    let out = ergond(&["--config", bad.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("metrics_listen") && stderr.contains("bad.toml"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    // The listen address is taken: exit 1, saying which key to change.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let node = Node::new(None, None);
    let mut cfg = std::fs::read_to_string(&node.config).unwrap();
    cfg.push_str(&format!(
        "metrics_listen = \"{}\"\n",
        busy.local_addr().unwrap()
    ));
    std::fs::write(&node.config, cfg).unwrap();
    let out = ergond(&["--config", node.config()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot listen on") && stderr.contains("`metrics_listen`"),
        "{stderr}"
    );

    // Nothing to measure: exit 2 rather than serve empty metrics, leaving no socket behind.
    drop(busy);
    let out = ergond(&["--config", node.config()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no energy source works"), "{stderr}");
    let cfg = std::fs::read_to_string(&node.config).unwrap();
    if let Some(socket) = cfg
        .lines()
        .find_map(|l| l.strip_prefix("socket_path = "))
        .and_then(|v| serde_json::from_str::<String>(v).ok())
    {
        assert!(!Path::new(&socket).exists(), "{socket} left behind");
    }

    let out = ergond(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for want in [
        "check",
        "probe",
        "/metrics",
        "SPANK plugin's socket",
        "CPU package and DRAM",
        "journaled",
        "--energy-report",
    ] {
        assert!(help.contains(want), "missing {want:?} in:\n{help}");
    }
}
