//! Whole-node meters: the hwmon and HPE Cray pm_counters sources against generated sysfs trees,
//! the Redfish source against real Redfish emulators from sushy-tools (`sushy-static` serving
//! power resources, `sushy-emulator` checking basic authentication) over HTTPS on loopback,
//! and against a slow and an erroring BMC (small HTTP servers in this file), the IPMI source
//! through ipmitool against OpenIPMI's `ipmi_sim` (an SDR power sensor, and DCMI's power reading
//! from the tests' module: `ergon_testkit::ipmi_sim`), and the integrator that turns readings
//! into node energy.
//!
//! sushy-tools comes from PyPI, pinned, into a virtual environment cached under the target
//! directory (`python3 -m venv`, Debian's python3-venv); where it cannot be installed (no
//! network, no venv module) the emulator tests say `SKIPPED` and return. Test certificates are
//! made with the `openssl` command.

use ergon_testkit::ipmi_sim::{self, IpmiSim};
use ergon_testkit::{HwmonFixture, HwmonTree, PmCountersTree};
use ergond::counter::{CounterEvent, Method};
use ergond::sources::meter::hwmon::{self, HwmonMeter};
use ergond::sources::meter::ipmi::{IpmiConfig, IpmiMeter};
use ergond::sources::meter::pm_counters::{self, PmCountersMeter};
use ergond::sources::meter::redfish::{load_credentials, RedfishConfig, RedfishMeter};
use ergond::sources::meter::{
    EnergyIntegrator, IntegratorConfig, MeterError, MeterKind, MeterReading, MeterWorker,
    NodeMeter, Outcome, Quantity, Rejection,
};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const S: u64 = 1_000_000_000;

fn integrator_config(max_gap_ns: u64, staleness_ns: u64) -> IntegratorConfig {
    IntegratorConfig {
        max_node_power_w: 3000.0,
        margin: 1.2,
        max_gap_ns,
        staleness_ns,
    }
}

fn integrator(staleness_ns: u64) -> EnergyIntegrator {
    EnergyIntegrator::new(integrator_config(30 * S, staleness_ns))
}

/// The energy the integrator gives between two power readings of a meter (J), and the seconds
/// between them.
fn integrate(resolution_ns: u64, r1: MeterReading, r2: MeterReading) -> (f64, f64) {
    let mut i = integrator(resolution_ns);
    i.update(r1);
    let Outcome::Delta(d) = i.update(r2) else {
        panic!("expected a delta")
    };
    (d.joules, (r2.at_ns - r1.at_ns) as f64 / 1e9)
}

fn watts(q: Quantity) -> f64 {
    match q {
        Quantity::Power { watts } => watts,
        other => panic!("expected a power, got {other:?}"),
    }
}

fn raw_energy(q: Quantity) -> u64 {
    match q {
        Quantity::Energy { raw, .. } => raw,
        other => panic!("expected an energy counter, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// hwmon

fn hwmon_node() -> Vec<HwmonFixture> {
    vec![
        HwmonFixture::new("coretemp").with("temp1_input", "45000\n"),
        // Per-socket energy: not the node's, never picked by default.
        HwmonFixture::new("amd_energy").with("energy1_input", "00000000000000123456\n"),
        HwmonFixture::acpi_power_meter(250_000_000, 500),
    ]
}

#[test]
fn hwmon_finds_the_acpi_power_meter_and_integrates_its_power() {
    let dir = tempfile::tempdir().unwrap();
    let tree = HwmonTree::create(dir.path(), &hwmon_node());

    let found = hwmon::discover(tree.root()).unwrap();
    let names: Vec<&str> = found.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        names,
        ["amd_energy", "power_meter"],
        "only devices with power or energy"
    );
    assert_eq!(found[1].power_average, [1]);

    let mut m = HwmonMeter::open(tree.root(), &[]).unwrap();
    assert_eq!(m.kind(), MeterKind::Hwmon);
    assert_eq!(m.device().name, "power_meter");
    assert!(
        m.source().contains("hwmon2/power1_average"),
        "{}",
        m.source()
    );
    assert_eq!(
        m.resolution_ns(),
        500_000_000,
        "power1_average_interval is in ms"
    );

    let mut i = integrator(m.resolution_ns());
    let r1 = m.read().unwrap();
    assert_eq!(watts(r1.quantity), 250.0, "µW → W");
    assert_eq!(i.update(r1), Outcome::Baseline);
    tree.set(2, "power1_average", 310_500_000);
    let r2 = m.read().unwrap();
    assert_eq!(watts(r2.quantity), 310.5);
    assert!(r2.at_ns > r1.at_ns);
    let Outcome::Delta(d) = i.update(r2) else {
        panic!("expected a delta")
    };
    let dt = (r2.at_ns - r1.at_ns) as f64 / 1e9;
    assert!((d.joules - (250.0 + 310.5) / 2.0 * dt).abs() < 1e-9);
    assert_eq!(i.totals().energy.method, Method::IntegratedPower);

    // A meter reporting more than the node can draw is rejected, with the reason.
    tree.set(2, "power1_average", 9_000_000_000);
    let r3 = m.read().unwrap();
    assert!(matches!(
        i.update(r3),
        Outcome::Rejected(Rejection::AbovePowerLimit { watts, .. }) if watts == 9000.0
    ));
    assert_eq!(i.totals().rejected, 1);
}

#[test]
fn hwmon_energy_counter_resets_and_implausible_jumps() {
    let dir = tempfile::tempdir().unwrap();
    let tree = HwmonTree::create(
        dir.path(),
        &[
            HwmonFixture::new("power_meter").with("power1_average", "100000000\n"),
            HwmonFixture::new("node_energy")
                .with("energy1_input", "00000000000005000000\n")
                .with("power1_average", "100000000\n"),
        ],
    );
    let mut m = HwmonMeter::open(tree.root(), &["node_energy".to_string()]).unwrap();
    assert_eq!(m.device().name, "node_energy");
    // A counter is preferred to a power: it is exact across any read interval.
    assert!(m.source().ends_with("energy1_input)"), "{}", m.source());
    assert_eq!(m.resolution_ns(), hwmon::DEFAULT_RESOLUTION_NS);

    let mut i = integrator(m.resolution_ns());
    let r = m.read().unwrap();
    assert_eq!(raw_energy(r.quantity), 5_000_000);
    assert_eq!(i.update(r), Outcome::Baseline);
    tree.set(1, "energy1_input", 7_000_000);
    let Outcome::Delta(d) = i.update(m.read().unwrap()) else {
        panic!("expected a delta")
    };
    assert!((d.joules - 2.0).abs() < 1e-12, "µJ → J: {}", d.joules);

    // The counter restarted (driver reload): the new value is the energy since.
    tree.set(1, "energy1_input", 400_000);
    let Outcome::Delta(d) = i.update(m.read().unwrap()) else {
        panic!("expected a delta")
    };
    assert_eq!(d.event, Some(CounterEvent::Reset));
    assert!((d.joules - 0.4).abs() < 1e-12);

    // 10 MJ within a fraction of a second (plus the 1 s resolution) is not a node's energy.
    tree.set(1, "energy1_input", 10_000_000_400_000);
    assert!(matches!(
        i.update(m.read().unwrap()),
        Outcome::Rejected(Rejection::ImplausibleEnergy { .. })
    ));
    let t = i.totals();
    assert_eq!(t.energy.method, Method::Counter);
    assert_eq!((t.energy.resets, t.rejected), (1, 1));
    assert!((t.energy.joules - 2.4).abs() < 1e-9);

    // A garbled value is an error naming the file, not a reading.
    tree.set(1, "energy1_input", 0);
    std::fs::write(tree.root().join("hwmon1/energy1_input"), "not a number\n").unwrap();
    let e = m.read().unwrap_err().to_string();
    assert!(e.contains("energy1_input"), "{e}");
}

#[test]
fn hwmon_without_a_node_meter_says_what_it_found() {
    let dir = tempfile::tempdir().unwrap();
    let tree = HwmonTree::create(dir.path(), &hwmon_node()[..2]);
    let e = HwmonMeter::open(tree.root(), &[]).unwrap_err();
    assert!(matches!(e, MeterError::NotFound(_)));
    let e = e.to_string();
    assert!(e.contains("power_meter") && e.contains("amd_energy"), "{e}");
    assert!(e.contains("acpi_power_meter"), "says what to load: {e}");
    // No hwmon class at all (a container): no meter, which is not an I/O error.
    assert!(matches!(
        HwmonMeter::open(&dir.path().join("absent"), &[]),
        Err(MeterError::NotFound(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// pm_counters

#[test]
fn pm_counters_energy_freshness_and_generation() {
    let dir = tempfile::tempdir().unwrap();
    let tree = PmCountersTree::create(dir.path(), 1, 4);
    assert_eq!(
        pm_counters::available(tree.root()).unwrap(),
        [
            "accel0_energy",
            "accel1_energy",
            "accel2_energy",
            "accel3_energy",
            "cpu0_energy",
            "energy",
            "memory_energy"
        ]
    );
    tree.set_energy("energy", 1_000);
    tree.set_freshness(41);
    let mut m = PmCountersMeter::open(tree.root(), pm_counters::DEFAULT_COUNTER).unwrap();
    assert_eq!(m.kind(), MeterKind::PmCounters);
    assert_eq!(m.resolution_ns(), 100_000_000, "raw_scan_hz 10");
    let mut i = integrator(m.resolution_ns());

    let r = m.read().unwrap();
    assert_eq!(raw_energy(r.quantity), 1_000);
    assert_eq!((r.freshness, r.generation), (Some(41), Some(1)));
    assert_eq!(i.update(r), Outcome::Baseline);

    // The controller has not published since: same freshness, a stale reading.
    assert_eq!(i.update(m.read().unwrap()), Outcome::Stale);

    tree.set_energy("energy", 1_150);
    tree.set_freshness(42);
    let Outcome::Delta(d) = i.update(m.read().unwrap()) else {
        panic!("expected a delta")
    };
    assert_eq!(d.joules, 150.0);

    // Controller restart: new generation, counters from 0 again. The value (80 J) is above
    // nothing in particular; it is taken as the energy since the reset because the generation
    // changed, not because it went down.
    tree.set_generation(2);
    tree.set_freshness(1);
    tree.set_energy("energy", 80);
    let Outcome::Delta(d) = i.update(m.read().unwrap()) else {
        panic!("expected a delta")
    };
    assert_eq!((d.event, d.joules), (Some(CounterEvent::Reset), 80.0));
    let t = i.totals();
    assert_eq!((t.stale, t.generation_changes, t.energy.resets), (1, 1, 1));
    assert_eq!(t.energy.joules, 230.0);

    // Another domain's counter.
    tree.set_energy("accel2_energy", 777);
    let mut accel = PmCountersMeter::open(tree.root(), "accel2_energy").unwrap();
    assert_eq!(raw_energy(accel.read().unwrap().quantity), 777);
    assert!(accel.source().ends_with("accel2_energy"));
}

#[test]
fn pm_counters_errors_name_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let missing = PmCountersMeter::open(&dir.path().join("nope"), "energy").unwrap_err();
    assert!(
        matches!(&missing, MeterError::NotFound(m) if m.contains("HPE Cray")),
        "{missing}"
    );
    let tree = PmCountersTree::create(&dir.path().join("pm"), 2, 0);
    let e = PmCountersMeter::open(tree.root(), "power").unwrap_err();
    assert!(matches!(e, MeterError::Config(_)), "{e}");
    let e = PmCountersMeter::open(tree.root(), "accel0_energy").unwrap_err();
    assert!(
        e.to_string().contains("cpu1_energy"),
        "lists the counters there: {e}"
    );
    let mut m = PmCountersMeter::open(tree.root(), "energy").unwrap();
    tree.write_raw("energy", "12 W 1595271530318433 us\n");
    let e = m.read().unwrap_err().to_string();
    assert!(e.contains("energy") && e.contains("in J"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Redfish: credentials

fn write_credentials(dir: &Path, mode: u32) -> PathBuf {
    ergon_testkit::write_bmc_credentials(&dir.join("bmc.toml"), mode)
}

#[test]
fn redfish_credentials_must_be_root_only() {
    if !ergon_testkit::needs_root(
        "redfish_credentials_must_be_root_only",
        "own the credentials file as root and as another user",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = write_credentials(dir.path(), 0o600);
    let c = load_credentials(&p).unwrap();
    assert_eq!(
        (c.username.as_str(), c.password.as_str()),
        ("admin", "secret")
    );
    assert!(
        !format!("{c:?}").contains("secret"),
        "Debug hides the password"
    );
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
    load_credentials(&p).unwrap();

    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = load_credentials(&p).unwrap_err().to_string();
    assert!(
        e.contains("mode is 0644") && e.contains("chmod 0600"),
        "{e}"
    );

    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
    let e = load_credentials(&p).unwrap_err().to_string();
    assert!(e.contains("owned by uid 65534"), "{e}");
    std::os::unix::fs::chown(&p, Some(0), None).unwrap();

    let link = dir.path().join("link.toml");
    std::os::unix::fs::symlink(&p, &link).unwrap();
    let e = load_credentials(&link).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");

    let e = load_credentials(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");

    std::fs::write(&p, "user = \"admin\"\n").unwrap();
    let e = load_credentials(&p).unwrap_err().to_string();
    assert!(e.contains("username"), "{e}");

    // Plain http:// would send the password in clear: only with insecure = true.
    let p = write_credentials(dir.path(), 0o600);
    let e = RedfishMeter::new(RedfishConfig::new("http://127.0.0.1:1", &p)).unwrap_err();
    assert!(e.to_string().contains("https://"), "{e}");
    let mut cfg = RedfishConfig::new("https://127.0.0.1:1", &p);
    cfg.chassis = Some("../../x".into());
    assert!(RedfishMeter::new(cfg).is_err());
}

// ---------------------------------------------------------------------------------------------
// Redfish: real emulators (sushy-tools)

const SUSHY_TOOLS: &str = "sushy-tools==2.2.0";

/// The Python interpreter of a virtual environment with sushy-tools, installed once per target
/// directory; `None` where it cannot be installed. The tools are run as modules
/// (`python -m sushy_tools.static.main`): the venv is built beside its final path and renamed
/// into place (concurrent test processes never see half of one), and its entry-point scripts
/// would still name the old path.
fn sushy_python() -> Option<PathBuf> {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("venv-sushy-tools-2.2.0");
            let python = venv.join("bin/python");
            let ready = |python: &Path| {
                Command::new(python)
                    .args([
                        "-c",
                        "import sushy_tools.static.main, sushy_tools.emulator.main",
                    ])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if ready(&python) {
                return Some(python);
            }
            let tmp = venv.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let built = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&tmp)
                .status()
                .is_ok_and(|s| s.success())
                && Command::new(tmp.join("bin/python"))
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                    ])
                    .arg(SUSHY_TOOLS)
                    .status()
                    .is_ok_and(|s| s.success());
            if built {
                let _ = std::fs::remove_dir_all(&venv);
                let _ = std::fs::rename(&tmp, &venv);
            }
            let _ = std::fs::remove_dir_all(&tmp);
            ready(&python).then_some(python)
        })
        .clone()
}

fn sushy_or_skip(test: &str) -> Option<PathBuf> {
    let bin = sushy_python();
    if bin.is_none() {
        ergon_testkit::missing(
            test,
            &format!("cannot install {SUSHY_TOOLS} from PyPI into a venv (python3-venv, network)"),
        );
    }
    bin
}

/// A CA and a server certificate for 127.0.0.1 signed by it (`ca.pem`, `server.pem`,
/// `server.key` in `dir`).
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (Debian: openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ergon test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (by its own pid) when the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd` and wait until it accepts connections on `port`.
fn start_server(mut cmd: Command, port: u16, log: &Path) -> Server {
    let out = std::fs::File::create(log).unwrap();
    cmd.env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let mut s = Server(cmd.spawn().expect("start the emulator"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = s.0.try_wait().unwrap() {
            panic!(
                "emulator exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "emulator not listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

fn write_json(path: &Path, v: serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// A Redfish mockup: one chassis `1U` with a `Power` resource in the Chassis collection, and a
/// chassis `Blade2` with only `EnvironmentMetrics`.
fn write_mockup(root: &Path, power_w: f64) {
    write_json(
        &root.join("index.json"),
        serde_json::json!({"@odata.id": "/redfish/v1", "RedfishVersion": "1.15.0",
            "Chassis": {"@odata.id": "/redfish/v1/Chassis"}}),
    );
    write_json(
        &root.join("Chassis/index.json"),
        serde_json::json!({"@odata.id": "/redfish/v1/Chassis", "Members@odata.count": 1,
            "Members": [{"@odata.id": "/redfish/v1/Chassis/1U"}]}),
    );
    write_json(
        &root.join("Chassis/1U/index.json"),
        serde_json::json!({"@odata.id": "/redfish/v1/Chassis/1U", "Id": "1U",
            "Power": {"@odata.id": "/redfish/v1/Chassis/1U/Power"}}),
    );
    set_mockup_power(root, power_w);
    write_json(
        &root.join("Chassis/Blade2/EnvironmentMetrics/index.json"),
        serde_json::json!({"@odata.id": "/redfish/v1/Chassis/Blade2/EnvironmentMetrics",
            "PowerWatts": {"DataSourceUri": "/redfish/v1/Chassis/Blade2/Sensors/Power",
                           "Reading": 410.5}}),
    );
}

fn set_mockup_power(root: &Path, power_w: f64) {
    write_json(
        &root.join("Chassis/1U/Power/index.json"),
        serde_json::json!({"@odata.id": "/redfish/v1/Chassis/1U/Power", "Id": "Power",
            "PowerControl": [{"MemberId": "0", "Name": "System Power Control",
                              "PowerConsumedWatts": power_w,
                              "PowerMetrics": {"IntervalInMin": 1}}]}),
    );
}

#[test]
fn redfish_reads_power_from_sushy_static_over_https() {
    let test = "redfish_reads_power_from_sushy_static_over_https";
    if !ergon_testkit::needs_root(test, "own the credentials file as root") {
        return;
    }
    let Some(python) = sushy_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let mockup = dir.path().join("mockup");
    write_mockup(&mockup, 250.0);
    let port = free_port();
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "sushy_tools.static.main",
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-m",
    ])
    .arg(&mockup)
    .arg("-c")
    .arg(dir.path().join("server.pem"))
    .arg("-k")
    .arg(dir.path().join("server.key"));
    let log = dir.path().join("static.log");
    let _server = start_server(cmd, port, &log);
    let creds = write_credentials(dir.path(), 0o600);
    let url = format!("https://127.0.0.1:{port}");

    let mut cfg = RedfishConfig::new(&url, &creds);
    cfg.ca_file = Some(dir.path().join("ca.pem"));
    let mut m = RedfishMeter::new(cfg.clone()).unwrap();
    assert_eq!(m.kind(), MeterKind::Redfish);
    let r1 = m.read().unwrap();
    assert_eq!(watts(r1.quantity), 250.0);
    assert_eq!(
        m.source(),
        format!("redfish {url}/redfish/v1/Chassis/1U/Power"),
        "the only chassis of the collection, its Power resource"
    );
    set_mockup_power(&mockup, 330.0);
    let r2 = m.read().unwrap();
    assert_eq!(watts(r2.quantity), 330.0);
    let (joules, dt) = integrate(m.resolution_ns(), r1, r2);
    assert!((joules - 290.0 * dt).abs() < 1e-9);

    // Basic authentication went out with the request ("admin:secret").
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged
            .to_lowercase()
            .contains("authorization: basic ywrtaw46c2vjcmv0"),
        "{logged}"
    );

    // A BMC without the Power resource: EnvironmentMetrics.
    let mut blade = cfg.clone();
    blade.chassis = Some("Blade2".into());
    let mut m = RedfishMeter::new(blade).unwrap();
    assert_eq!(watts(m.read().unwrap().quantity), 410.5);
    assert!(m.source().ends_with("/Chassis/Blade2/EnvironmentMetrics"));

    // The server's certificate is checked: not signed by a built-in root.
    let mut untrusted = cfg.clone();
    untrusted.ca_file = None;
    let e = RedfishMeter::new(untrusted).unwrap().read().unwrap_err();
    assert!(
        matches!(&e, MeterError::Request(m) if m.to_lowercase().contains("certificate")),
        "{e}"
    );
    // ... unless told not to, explicitly.
    let mut insecure = cfg;
    insecure.ca_file = None;
    insecure.insecure = true;
    assert_eq!(
        watts(
            RedfishMeter::new(insecure)
                .unwrap()
                .read()
                .unwrap()
                .quantity
        ),
        330.0
    );
}

#[test]
fn redfish_basic_auth_against_sushy_emulator() {
    let test = "redfish_basic_auth_against_sushy_emulator";
    if !ergon_testkit::needs_root(test, "own the credentials file as root") {
        return;
    }
    let Some(python) = sushy_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    // An htpasswd file with a bcrypt hash of "secret", the only hash sushy-emulator accepts.
    let out = Command::new(&python)
        .args([
            "-c",
            "import bcrypt; print('admin:' + bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode())",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
    std::fs::write(
        dir.path().join("emulator.conf"),
        format!(
            "SUSHY_EMULATOR_AUTH_FILE = {:?}\nSUSHY_EMULATOR_FAKE_DRIVER = True\n",
            dir.path().join("htpasswd")
        ),
    )
    .unwrap();
    let port = free_port();
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "sushy_tools.emulator.main", "--config"])
        .arg(dir.path().join("emulator.conf"))
        .args(["--fake", "-i", "127.0.0.1", "-p", &port.to_string()])
        .arg("--ssl-certificate")
        .arg(dir.path().join("server.pem"))
        .arg("--ssl-key")
        .arg(dir.path().join("server.key"));
    let _server = start_server(cmd, port, &dir.path().join("emulator.log"));
    let url = format!("https://127.0.0.1:{port}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "username = \"admin\"\npassword = \"wrong\"\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cfg = RedfishConfig::new(&url, &bad);
    cfg.ca_file = Some(dir.path().join("ca.pem"));
    let e = RedfishMeter::new(cfg.clone()).unwrap().read().unwrap_err();
    assert!(
        matches!(&e, MeterError::Credentials(m) if m.contains("HTTP 401") && m.contains("bad.toml")),
        "{e}"
    );

    // The right password is accepted: the chassis is found in the collection, and this BMC
    // (the emulator models no power) has neither power resource, which the error says.
    cfg.credentials_file = write_credentials(dir.path(), 0o400);
    let e = RedfishMeter::new(cfg).unwrap().read().unwrap_err();
    let MeterError::NotFound(msg) = &e else {
        panic!("{e}")
    };
    assert!(
        msg.contains("/Power (404)") && msg.contains("/EnvironmentMetrics (404)"),
        "{msg}"
    );
    assert!(msg.contains("/redfish/v1/Chassis/"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Redfish: a slow and an erroring BMC (plain HTTP, insecure = true)

/// A one-request-per-connection HTTP server on loopback: `respond` gets the request head and
/// returns the raw response (it may block, to play a slow BMC).
fn http_server(
    mut respond: impl FnMut(&str) -> Vec<u8> + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            if head.starts_with("STOP") {
                return;
            }
            let resp = respond(&head);
            let _ = conn.write_all(&resp);
        }
    });
    (url, handle)
}

fn stop_server(url: &str, handle: std::thread::JoinHandle<()>) {
    let mut s = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    s.write_all(b"STOP\r\n\r\n").unwrap();
    handle.join().unwrap();
}

fn response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn power_body(w: &str) -> String {
    format!("{{\"PowerControl\": [{{\"PowerConsumedWatts\": {w}}}]}}")
}

fn plain_http_config(url: &str, dir: &Path) -> RedfishConfig {
    let mut cfg = RedfishConfig::new(url, &write_credentials(dir, 0o600));
    cfg.insecure = true;
    cfg.chassis = Some("1".into());
    cfg
}

#[test]
fn redfish_erroring_bmc_gives_errors_not_readings() {
    if !ergon_testkit::needs_root(
        "redfish_erroring_bmc_gives_errors_not_readings",
        "own the credentials file as root",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut script = vec![
        response("500 Internal Server Error", "{}"),
        response("200 OK", "{not json"),
        response("200 OK", &" ".repeat(5000)),
        // No Content-Length: the body runs to the end of the connection, and is cut at the bound.
        format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{}",
            " ".repeat(5000)
        )
        .into_bytes(),
        response("200 OK", &power_body("null")),
        response("200 OK", &power_body("\"high\"")),
        response("401 Unauthorized", ""),
        response("200 OK", &power_body("-5")),
        response("200 OK", &power_body("350.25")),
    ]
    .into_iter();
    let (heads_tx, heads_rx) = mpsc::channel();
    let (url, server) = http_server(move |head| {
        heads_tx.send(head.to_string()).unwrap();
        script
            .next()
            .unwrap_or_else(|| response("503 Service Unavailable", ""))
    });
    let mut cfg = plain_http_config(&url, dir.path());
    cfg.max_response_bytes = 1000;
    let mut m = RedfishMeter::new(cfg).unwrap();
    let mut err = || m.read().unwrap_err().to_string();
    assert!(err().contains("HTTP 500"));
    assert!(err().contains("not JSON"));
    assert!(err().contains("larger than 1000 bytes"));
    assert!(err().contains("larger than 1000 bytes"));
    assert!(err().contains("no power reading now (null)"));
    assert!(err().contains("not a number"));
    assert!(err().contains("refused the credentials"));
    let mut i = integrator(0);
    let r = m.read().unwrap();
    assert_eq!(
        i.update(r),
        Outcome::Rejected(Rejection::NegativePower(-5.0)),
        "a negative power is a reading, rejected by the integrator"
    );
    assert_eq!(watts(m.read().unwrap().quantity), 350.25);
    stop_server(&url, server);
    let head = heads_rx.recv().unwrap();
    assert!(
        head.starts_with("GET /redfish/v1/Chassis/1/Power HTTP/1.1"),
        "{head}"
    );
    assert!(
        head.to_lowercase()
            .contains("authorization: basic ywrtaw46c2vjcmv0"),
        "{head}"
    );
}

#[test]
fn redfish_slow_bmc_times_out_and_never_blocks_a_reader_of_the_worker() {
    if !ergon_testkit::needs_root(
        "redfish_slow_bmc_times_out_and_never_blocks_a_reader_of_the_worker",
        "own the credentials file as root",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A BMC that answers only when the test lets it.
    let (got_tx, got_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<&'static str>();
    let (url, server) = http_server(move |_| {
        got_tx.send(()).unwrap();
        let w = release_rx.recv().unwrap_or("1");
        response("200 OK", &power_body(w))
    });

    // Per-request timeout: a BMC that does not answer is an error after timeout_ms.
    let mut cfg = plain_http_config(&url, dir.path());
    cfg.timeout_ms = 300;
    let mut m = RedfishMeter::new(cfg.clone()).unwrap();
    let t0 = Instant::now();
    let e = m.read().unwrap_err().to_string();
    let took = t0.elapsed();
    assert!(e.contains("no answer within 300 ms"), "{e}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    got_rx.recv().unwrap();
    release_tx.send("1").unwrap(); // let the abandoned request end

    // On a worker thread, a read in progress holds nothing a reader of the totals waits for.
    cfg.timeout_ms = 60_000;
    let worker = MeterWorker::spawn(
        Box::new(RedfishMeter::new(cfg).unwrap()),
        integrator_config(600 * S, 0),
        Duration::from_millis(20),
    )
    .unwrap();
    got_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    // The worker is now inside read(), waiting for the BMC.
    let t0 = Instant::now();
    let st = worker.status();
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!((st.reads, st.last_reading), (0, None));
    release_tx.send("400").unwrap();
    got_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let st = worker.status();
    assert_eq!(st.reads, 1);
    assert_eq!(watts(st.last_reading.unwrap().quantity), 400.0);
    assert_eq!(st.totals.energy.method, Method::IntegratedPower);
    release_tx.send("420").unwrap();
    got_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let st = worker.status();
    assert_eq!(st.reads, 2);
    assert!(
        st.totals.energy.joules > 0.0,
        "two reads integrated: {st:?}"
    );
    drop(release_tx); // every later request is answered at once
    worker.stop();
    stop_server(&url, server);
}

// ---------------------------------------------------------------------------------------------
// Configuration and `ergond check`

#[test]
fn meters_configuration_is_validated() {
    use ergond::config::Config;
    let c = Config::parse(
        "[meters]\nmax_node_power_w = 4000\nmax_gap_ms = 5000\n\
         [meters.hwmon]\nnames = [\"power_meter\", \"node_energy\"]\n\
         [meters.pm_counters]\nenabled = false\ncounter = \"accel0_energy\"\n\
         [meters.redfish]\nurl = \"https://bmc\"\ncredentials_file = \"/etc/ergon/bmc.toml\"\n\
         ca_file = \"/etc/ergon/bmc-ca.pem\"\ntimeout_ms = 2000\n",
    )
    .unwrap();
    let m = &c.meters;
    assert_eq!((m.max_node_power_w, m.max_gap_ms), (4000.0, 5000));
    assert_eq!(m.hwmon.names, ["power_meter", "node_energy"]);
    assert!(m.hwmon.enabled && !m.pm_counters.enabled);
    let r = m.redfish.as_ref().unwrap();
    assert_eq!((r.timeout_ms, r.insecure), (2000, false));
    assert_eq!(r.max_response_bytes, 1 << 20);
    assert_eq!(Config::parse("").unwrap().meters.redfish, None);
    assert_eq!(Config::parse("").unwrap().meters.ipmi, None);
    let c = Config::parse("[meters.ipmi]\nsensor = \"Pwr Consumption\"\n").unwrap();
    let i = c.meters.ipmi.unwrap();
    assert_eq!(
        (i.host, i.port, i.sensor.as_deref()),
        (None, 623, Some("Pwr Consumption"))
    );
    let e = Config::parse("[meters.ipmi]\nhost = \"bmc\"\n").unwrap_err();
    assert!(
        e.to_string().contains("meters.ipmi.credentials_file"),
        "{e}"
    );

    let e = Config::parse("[meters]\nmax_node_power_w = -1\n").unwrap_err();
    assert!(e.to_string().contains("meters.max_node_power_w"), "{e}");
    let e =
        Config::parse("[meters.redfish]\nurl = \"https://bmc\"\ncredentials_file = \"bmc.toml\"\n")
            .unwrap_err();
    assert!(e.to_string().contains("credentials_file"), "{e}");
    let e =
        Config::parse("[meters.redfish]\nurl = \"https://bmc\"\npassword = \"x\"\n").unwrap_err();
    assert!(
        e.to_string().contains("password"),
        "no password in ergond.toml: {e}"
    );
}

#[test]
fn ergond_check_describes_the_node_meters() {
    let dir = tempfile::tempdir().unwrap();
    let hw = HwmonTree::create(&dir.path().join("hwmon"), &hwmon_node());
    let pm = PmCountersTree::create(&dir.path().join("pm_counters"), 1, 0);
    pm.set_energy("energy", 123_456);
    let creds = dir.path().join("bmc.toml");
    std::fs::write(&creds, "username = \"a\"\npassword = \"b\"\n").unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("ergond.toml");
    std::fs::write(
        &config,
        format!(
            "powercap_root = {:?}\n[meters.hwmon]\nroot = {:?}\n[meters.pm_counters]\nroot = {:?}\n\
             [meters.redfish]\nurl = \"https://127.0.0.1:1\"\ncredentials_file = {:?}\n",
            dir.path().join("powercap"),
            hw.root(),
            pm.root(),
            creds
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ergond"))
        .args(["check", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let inv: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let meters = inv["meters"].as_array().unwrap();
    let by_kind = |k: &str| meters.iter().find(|m| m["kind"] == k).unwrap();
    let h = by_kind("hwmon");
    assert_eq!(
        (h["ok"].as_bool(), h["reading"].as_str()),
        (Some(true), Some("250 W"))
    );
    assert_eq!(h["resolution_ms"].as_f64(), Some(500.0));
    let p = by_kind("pm_counters");
    assert_eq!(p["reading"].as_str(), Some("123456 J"), "{p}");
    assert_eq!(
        (p["used"].as_bool(), h["used"].as_bool()),
        (Some(true), Some(false))
    );
    let r = by_kind("redfish");
    assert_eq!(
        (r["ok"].as_bool(), r["problem"].as_bool()),
        (Some(false), Some(true))
    );
    // The credentials file is world-readable: refused, and the problem says how to fix it
    // (as root; otherwise it is not owned by root, which is refused too).
    let why = r["why"].as_str().unwrap();
    assert!(why.contains("refusing BMC credentials file"), "{why}");
    let problems = inv["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p
            .as_str()
            .unwrap()
            .starts_with("redfish node meter: refusing")),
        "{problems:?}"
    );

    let text = Command::new(env!("CARGO_BIN_EXE_ergond"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Node meters (the one in use gives the jobs' energy at the wall"),
        "{text}"
    );
    assert!(text.contains("hwmon: hwmon power_meter"), "{text}");
    // use = "auto": pm_counters before hwmon.
    assert!(
        text.lines()
            .any(|l| l.contains("pm_counters:") && l.ends_with("(in use)")),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// IPMI: ipmitool against OpenIPMI's ipmi_sim on loopback (ergon_testkit::ipmi_sim)

/// The emulated BMC, or `None` when a tool it needs is missing (said, and a failure in the full
/// run).
fn ipmi_sim(test: &str, dir: &Path, sensor_raw: u32, dcmi: Option<&str>) -> Option<IpmiSim> {
    match IpmiSim::start(dir, sensor_raw, dcmi) {
        Ok(sim) => Some(sim),
        Err(why) => {
            ergon_testkit::missing(test, &why.0);
            None
        }
    }
}

/// The IPMI meter's configuration for the emulated BMC over LAN.
fn ipmi_config(sim: &IpmiSim, dir: &Path) -> IpmiConfig {
    let mut cfg = IpmiConfig::local();
    cfg.host = Some("127.0.0.1".into());
    cfg.port = sim.port;
    cfg.credentials_file = Some(write_credentials(dir, 0o600));
    cfg.cipher_suite = Some(3);
    cfg.timeout_ms = 5_000;
    cfg
}

/// Read `m` until it gives `want` W (the BMC's value changes within its poll period).
fn await_watts(m: &mut IpmiMeter, want: f64) -> MeterReading {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = m.read().unwrap();
        if watts(r.quantity) == want {
            break r;
        }
        assert!(Instant::now() < deadline, "still {:?}", r.quantity);
    }
}

#[test]
fn ipmi_sdr_power_sensor_through_ipmitool_against_ipmi_sim() {
    let test = "ipmi_sdr_power_sensor_through_ipmitool_against_ipmi_sim";
    if !ergon_testkit::needs_root(test, "own the credentials file as root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = ipmi_sim(test, &dir.path().join("bmc"), 62, None) else {
        return;
    };
    let port = sim.port;
    let mut cfg = ipmi_config(&sim, dir.path());

    // No DCMI in plain ipmi_sim and no sensor named: the error says what to configure.
    let e = IpmiMeter::new(cfg.clone()).unwrap().read().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("Invalid command"),
        "{msg}\nipmi_sim said: {}",
        sim.log()
    );
    assert!(matches!(e, MeterError::NotFound(_)), "{msg}");
    assert!(
        msg.contains("dcmi power reading") && msg.contains("Invalid command"),
        "{msg}"
    );
    assert!(msg.contains("`sensor`"), "{msg}");

    cfg.sensor = Some(ipmi_sim::SENSOR.into());
    let mut m = IpmiMeter::new(cfg.clone()).unwrap();
    assert_eq!(m.kind(), MeterKind::Ipmi);
    // ipmi_sim polls the sensor's raw value from its file every 200 ms.
    let r1 = await_watts(&mut m, 248.0); // raw 62 × M 4
    sim.set_sensor_raw(80);
    let r2 = await_watts(&mut m, 320.0);
    assert_eq!(
        m.source(),
        format!("ipmi 127.0.0.1:{port} sensor \"Node Power\"")
    );
    let (joules, _) = integrate(m.resolution_ns(), r1, r2);
    assert!(joules > 0.0);

    // A wrong password: no session, and ipmitool's reason.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "username = \"admin\"\npassword = \"wrong\"\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut wrong = cfg.clone();
    wrong.credentials_file = Some(bad);
    let e = IpmiMeter::new(wrong)
        .unwrap()
        .read()
        .unwrap_err()
        .to_string();
    assert!(e.contains("RMCP+ session"), "{e}");

    // A sensor the BMC does not have.
    let mut nope = cfg.clone();
    nope.sensor = Some("Nope".into());
    let e = IpmiMeter::new(nope)
        .unwrap()
        .read()
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"Nope\" not found"), "{e}");

    // A BMC that never answers: ipmitool is killed at the bound.
    let hung = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut slow = cfg;
    slow.port = hung.local_addr().unwrap().port();
    slow.timeout_ms = 700;
    let t0 = Instant::now();
    let e = IpmiMeter::new(slow)
        .unwrap()
        .read()
        .unwrap_err()
        .to_string();
    assert!(e.contains("no answer within 700 ms"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn ipmi_dcmi_power_reading_through_ipmitool_against_ipmi_sim() {
    let test = "ipmi_dcmi_power_reading_through_ipmitool_against_ipmi_sim";
    if !ergon_testkit::needs_root(test, "own the credentials file as root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = ipmi_sim(test, &dir.path().join("bmc"), 62, Some("312")) else {
        return;
    };
    let port = sim.port;
    let mut cfg = ipmi_config(&sim, dir.path());
    // A sensor is configured too: DCMI, the BMC's own power statistic, is preferred.
    cfg.sensor = Some(ipmi_sim::SENSOR.into());

    let mut m = IpmiMeter::new(cfg.clone()).unwrap();
    let r1 = m
        .read()
        .unwrap_or_else(|e| panic!("{e}\nipmi_sim said: {}", sim.log()));
    assert_eq!(watts(r1.quantity), 312.0);
    assert_eq!(
        m.source(),
        format!("ipmi 127.0.0.1:{port} DCMI power reading")
    );
    // `ergond check` reads it the same way, and says it is the meter in use.
    let config = dir.path().join("ergond.toml");
    std::fs::write(
        &config,
        format!(
            "powercap_root = {:?}\n[meters]\nuse = \"ipmi\"\n{}",
            dir.path().join("powercap"),
            sim.meters_ipmi_section(cfg.credentials_file.as_ref().unwrap())
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ergond"))
        .args(["check", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let inv: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let i = inv["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["kind"] == "ipmi")
        .unwrap_or_else(|| panic!("{inv}"));
    assert_eq!(
        (
            i["ok"].as_bool(),
            i["used"].as_bool(),
            i["reading"].as_str()
        ),
        (Some(true), Some(true), Some("312 W")),
        "{i}"
    );

    // The module reads its file at each request: the next reading is the new value.
    sim.set_dcmi("450");
    let r2 = m.read().unwrap();
    assert_eq!(watts(r2.quantity), 450.0);
    // Power readings integrate by the trapezoid between the two reads.
    let (joules, dt) = integrate(m.resolution_ns(), r1, r2);
    assert!(
        (joules - (312.0 + 450.0) / 2.0 * dt).abs() < 1e-6,
        "{joules} J over {dt} s"
    );

    // A BMC whose power reading is deactivated gives an error that says so, never 0 W.
    sim.set_dcmi("off");
    let e = m.read().unwrap_err();
    assert!(matches!(e, MeterError::Format { .. }), "{e}");
    assert!(e.to_string().contains("deactivated"), "{e}");

    // A BMC that cannot read its power now (completion code 0xD5): ipmitool's reason, and on
    // a first read the configured SDR sensor is used instead.
    sim.set_dcmi("unavailable");
    let e = m.read().unwrap_err().to_string();
    assert!(e.contains("present state"), "{e}");
    let mut fallback = IpmiMeter::new(cfg.clone()).unwrap();
    let r = await_watts(&mut fallback, 248.0);
    assert_eq!(watts(r.quantity), 248.0);
    assert_eq!(
        fallback.source(),
        format!("ipmi 127.0.0.1:{port} sensor \"Node Power\"")
    );
    // Without a sensor to fall back on, the first read's error names both ways.
    let mut no_sensor = cfg.clone();
    no_sensor.sensor = None;
    let e = IpmiMeter::new(no_sensor).unwrap().read().unwrap_err();
    assert!(matches!(e, MeterError::NotFound(_)), "{e}");
    assert!(e.to_string().contains("`sensor`"), "{e}");

    // The BMC's power is back: the meter that had DCMI reads it again.
    sim.set_dcmi("298");
    assert_eq!(watts(m.read().unwrap().quantity), 298.0);
}

/// One `ipmitool shell`, one BMC session, for every read (by default); a failed read closes it
/// and the next opens another; a BMC reboot loses the session, and the meter reads again
/// through a new one. With `session = false`, one ipmitool per read, the same readings.
#[test]
fn ipmi_session_is_kept_between_reads_and_reopened_after_a_bmc_restart() {
    let test = "ipmi_session_is_kept_between_reads_and_reopened_after_a_bmc_restart";
    if !ergon_testkit::needs_root(test, "own the credentials file as root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(mut sim) = ipmi_sim(test, &dir.path().join("bmc"), 62, Some("500")) else {
        return;
    };
    let cfg = ipmi_config(&sim, dir.path());
    assert!(cfg.session, "sessions are the default");
    let mut m = IpmiMeter::new(cfg.clone()).unwrap();
    assert_eq!(m.session_pid(), None);
    assert_eq!(watts(m.read().unwrap().quantity), 500.0);
    let pid = m.session_pid().expect("a session is open");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "ipmitool");
    for w in [510, 520, 530, 540] {
        sim.set_dcmi(&w.to_string());
        assert_eq!(watts(m.read().unwrap().quantity), w as f64);
        assert_eq!(
            m.session_pid(),
            Some(pid),
            "the same session for every read"
        );
    }

    // A failed read (the BMC cannot read its power now) closes the session: its ipmitool is
    // gone (killed and reaped), and the next read opens another.
    sim.set_dcmi("unavailable");
    assert!(m.read().is_err());
    assert_eq!(m.session_pid(), None);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "ipmitool {pid} left behind"
    );
    sim.set_dcmi("550");
    assert_eq!(watts(m.read().unwrap().quantity), 550.0);
    let pid2 = m.session_pid().expect("a new session");
    assert_ne!(pid2, pid);

    // The BMC reboots: its sessions are gone. Reads fail while the old session is used, then
    // a new session reads again.
    sim.restart();
    sim.set_dcmi("560");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    loop {
        match m.read() {
            Ok(r) => {
                assert_eq!(watts(r.quantity), 560.0);
                break;
            }
            Err(e) => {
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "no reading after the restart: {e}"
                );
            }
        }
    }
    println!("{failures} failed read(s) after the BMC restart");
    assert_ne!(
        m.session_pid(),
        Some(pid2),
        "a new session after the restart"
    );

    // A meter opened and read on one thread (ergond's start-up probe) and then read by its
    // worker on another: the first thread's end must not cost the worker a read.
    let probe_cfg = cfg.clone();
    let probed = std::thread::spawn(move || {
        let mut m = IpmiMeter::new(probe_cfg).unwrap();
        m.read().unwrap();
        m
    })
    .join()
    .unwrap();
    let worker = MeterWorker::spawn(
        Box::new(probed),
        integrator_config(600 * S, 0),
        Duration::from_millis(50),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.status().reads < 5 {
        assert!(Instant::now() < deadline, "{:?}", worker.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = worker.status();
    assert_eq!(st.errors, 0, "{:?}", st.last_error);
    drop(worker);

    // One ipmitool per read: the same readings, no session left open.
    let mut one_shot = cfg.clone();
    one_shot.session = false;
    one_shot.sensor = Some(ipmi_sim::SENSOR.into());
    let mut m = IpmiMeter::new(one_shot.clone()).unwrap();
    assert_eq!(watts(m.read().unwrap().quantity), 560.0);
    assert_eq!(m.session_pid(), None);
    sim.set_dcmi("unavailable");
    let mut fallback = IpmiMeter::new(one_shot).unwrap();
    assert_eq!(watts(await_watts(&mut fallback, 248.0).quantity), 248.0);
    assert_eq!(fallback.session_pid(), None);
}

/// In-band IPMI (no `host`) goes through the kernel's IPMI device; on a machine without one
/// (no BMC, or the ipmi_si/ipmi_devintf modules not loaded), the error says what is missing
/// and what to do. Where /dev/ipmi0 exists the local BMC is read instead, and that must work.
#[test]
fn ipmi_in_band_without_a_device_says_what_to_load() {
    let test = "ipmi_in_band_without_a_device_says_what_to_load";
    if Command::new("ipmitool").arg("-V").output().is_err() {
        ergon_testkit::missing(test, "no ipmitool (Debian: ipmitool)");
        return;
    }
    let mut m = IpmiMeter::new(IpmiConfig::local()).unwrap();
    assert_eq!(m.source(), "ipmi the local BMC");
    let devices = ["/dev/ipmi0", "/dev/ipmi/0", "/dev/ipmidev/0"];
    if devices.iter().any(|d| Path::new(d).exists()) {
        // A real BMC: it reads (DCMI, or says how to name a sensor).
        match m.read() {
            Ok(r) => assert!(watts(r.quantity) > 0.0),
            Err(e) => assert!(e.to_string().contains("`sensor`"), "{e}"),
        }
        return;
    }
    let e = m.read().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MeterError::NotFound(_)), "{msg}");
    assert!(msg.contains("/dev/ipmi0"), "{msg}");
    assert!(
        msg.contains("ipmi_si") && msg.contains("ipmi_devintf"),
        "{msg}"
    );
}
