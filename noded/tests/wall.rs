//! A job's energy at the wall, end to end: the real `ergond` binary on a generated node (one
//! fake GPU at a constant 100 W, a static RAPL tree) with a generated hwmon node meter whose
//! `energy1_input` the test scripts over time (250 W, then 400 W). Checked:
//!
//! - the job's wall energy is within one meter read period's energy of the scripted trace's
//!   integral over the job (rule `energy`, the job owning every component: all of the rest);
//! - the rest of the node split by allocation (the job holds 1 of 2 CPUs and the GPU: 0.75 of
//!   the node with the default weights) and by energy, with the hand-computed values;
//! - conservation at the wall in `/metrics` (meter = components + rest − excess);
//! - a meter below the components: disagreements flagged in the manifest and `/metrics`, rest 0;
//! - no meter (`[meters] use = "none"`): no `wall` section;
//! - a BMC over IPMI (OpenIPMI's ipmi_sim answering DCMI's power reading): the wall energy is
//!   its power over the metered time.

mod common;

use common::{metric, scrape_metrics, start_node, wait_manifest, Ergond, FakeNvml};
use ergon_protocol::{
    CpuSet, GpuAlloc, JobEnd, JobIds, JobStart, Manifest, Reply, Request, StepId, StepStart,
    Timestamp,
};
use ergon_testkit::{HwmonFixture, HwmonTree};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GPU_W: f64 = 100.0;
const READ_PERIOD_MS: u64 = 100;

/// The scripted node power: `low` W for the first second, then `high` W.
#[derive(Clone, Copy)]
struct Script {
    low: f64,
    high: f64,
}

impl Script {
    /// Energy since the script's start, J, at `t` s.
    fn energy(self, t: f64) -> f64 {
        self.low * t.min(1.0) + self.high * (t - 1.0).max(0.0)
    }
}

/// Writes the meter's `energy1_input` (µJ) every 5 ms from the script until dropped.
struct Writer {
    stop: Arc<AtomicBool>,
    t0: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(tree: HwmonTree, script: Script) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let e = script.energy(t0.elapsed().as_secs_f64());
                tree.set(0, "energy1_input", (e * 1e6) as u64);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            t0,
            thread: Some(thread),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fake_gpu() -> FakeNvml {
    FakeNvml::new(json!({"gpus": [{
        "uuid": "GPU-11111111-1111-1111-1111-111111111111", "name": "Fake", "minor": 3,
        "profile": {"kind": "constant", "watts": GPU_W}, "update_period_ms": 10.0,
    }]}))
}

fn request(socket: &Path, req: &Request) {
    let r = common::try_request(socket, req).unwrap_or_else(|e| panic!("{req:?}: {e}"));
    assert_eq!(r, Reply::Ok, "{req:?}");
}

/// What one run gives: the manifest, the scripted integral over the job, `/metrics` after it.
struct Run {
    m: Manifest,
    integral_j: f64,
    metrics: String,
    _ergond: Ergond,
}

/// The node meter of a run.
enum Meter<'a> {
    /// The generated hwmon meter, its energy counter following the script.
    Scripted(Script),
    /// The `[meters]` configuration given (a meter outside the node).
    Configured(&'a str),
    /// No meter (`use = "none"`).
    None,
}

/// Start ergond on a node with `meter`, run one job of about 2 s holding the GPU and CPU 0
/// (of 2) and, when given, `memory_mib` of the node's 8 GiB (sent with its extern step's start,
/// as the plugin does), return its manifest.
fn run(dir: &Path, meter: Meter, extra: &str, memory_mib: Option<u64>) -> Run {
    let fake = fake_gpu();
    let hwmon = HwmonTree::create(
        &dir.join("hwmon"),
        &[HwmonFixture::new("power_meter").with("energy1_input", &format!("{:020}\n", 0))],
    );
    let (meters, script) = match meter {
        Meter::Scripted(s) => (
            format!(
                "[meters]\nuse = \"hwmon\"\nread_period_ms = {READ_PERIOD_MS}\n\
                 [meters.hwmon]\nroot = {}\n",
                common::toml_str(hwmon.root())
            ),
            Some(s),
        ),
        Meter::Configured(c) => (c.to_owned(), None),
        Meter::None => ("[meters]\nuse = \"none\"\n".to_owned(), None),
    };
    let metered = !meters.contains("use = \"none\"");
    let writer = script.map(|s| Writer::start(hwmon.clone(), s));
    let ergond = start_node(dir, &fake.lib, &format!("{extra}{meters}"), "ergond.log");
    fake.wait_for_start();
    if metered {
        // The meter is read: its series has begun.
        common::wait_metrics_with(dir, "ergon_node_meter_energy_joules_total{source=", &ergond);
    }
    let socket = dir.join("run/ergond.sock");
    let (start_t, start) = (Instant::now(), Timestamp::now());
    request(
        &socket,
        &Request::JobStart(JobStart {
            ids: JobIds {
                job_id: 7,
                array_job_id: None,
                array_task_id: None,
            },
            uid: 65534,
            gid: 65534,
            user: "alice".into(),
            account: None,
            partition: None,
            cluster: Some("c".into()),
            node: "n1".into(),
            gpus: vec![GpuAlloc {
                index: 0,
                minor: Some(3),
                mig: None,
            }],
            cpus: CpuSet::parse("0").unwrap(),
            report: None,
            work_dir: None,
            stdout_path: None,
            time: start,
            sluid: None,
            node_list: None,
        }),
    );
    if memory_mib.is_some() {
        request(
            &socket,
            &Request::StepStart(StepStart {
                job_id: 7,
                array_job_id: None,
                array_task_id: None,
                step: StepId::Extern,
                uid: 65534,
                cluster: Some("c".into()),
                node: "n1".into(),
                cgroups: Vec::new(),
                cpus: CpuSet::parse("0").unwrap(),
                pid: None,
                tasks: None,
                time: Timestamp::now(),
                sluid: None,
                job_mem_mb: memory_mib,
            }),
        );
    }
    std::thread::sleep(Duration::from_millis(2000));
    let (end_t, end) = (Instant::now(), Timestamp::now());
    request(
        &socket,
        &Request::JobEnd(JobEnd {
            cluster: Some("c".into()),
            job_id: 7,
            node: "n1".into(),
            time: end,
        }),
    );
    let m = wait_manifest(&dir.join("spool/c-7-n1.json"), &ergond);
    let integral_j = match (script, &writer) {
        (Some(s), Some(w)) => {
            let t = |i: Instant| i.duration_since(w.t0).as_secs_f64();
            s.energy(t(end_t)) - s.energy(t(start_t))
        }
        _ => 0.0,
    };
    drop(writer);
    Run {
        m,
        integral_j,
        metrics: scrape_metrics(dir),
        _ergond: ergond,
    }
}

/// The emulated BMC (ipmi_sim with DCMI at `watts`) in `dir` and ergond's `[meters.ipmi]`
/// section for it, or `None` when a tool it needs is missing (said, and a failure in the full
/// run).
fn ipmi_bmc(
    test: &str,
    dir: &Path,
    watts: &str,
) -> Option<(ergon_testkit::ipmi_sim::IpmiSim, String)> {
    match ergon_testkit::ipmi_sim::IpmiSim::start(&dir.join("bmc"), 0, Some(watts)) {
        Ok(sim) => {
            let creds = ergon_testkit::write_bmc_credentials(&dir.join("bmc.toml"), 0o600);
            let section = sim.meters_ipmi_section(&creds);
            Some((sim, section))
        }
        Err(why) => {
            ergon_testkit::missing(test, &why.0);
            None
        }
    }
}

const SCRIPT: Script = Script {
    low: 250.0,
    high: 400.0,
};

#[test]
fn wall_energy_follows_the_scripted_meter_and_the_rest_goes_to_the_job_by_energy() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        dir.path(),
        Meter::Scripted(SCRIPT),
        "[attribution]\nrest_of_node = \"energy\"\n",
        None,
    );
    let w = r.m.wall.as_ref().expect("a wall section");
    println!("{w:?}, integral {}", r.integral_j);
    assert_eq!(r.m.schema_version, 6);
    assert_eq!(
        (w.rule.as_str(), w.meter.kind.as_str()),
        ("energy", "hwmon")
    );
    assert!(w.meter.source.contains("hwmon0"), "{}", w.meter.source);
    assert_eq!(w.meter.resolution_s, 1.0);
    assert_eq!(w.unmetered_s, 0.0, "the meter covered the whole job");
    assert!((w.metered_s - r.m.duration_s).abs() < 0.01, "{w:?}");
    // The components are the job's own figures; the job owns all of them, so all of the rest.
    assert!((w.components_j - r.m.totals.energy_j).abs() < 1e-6 * w.components_j.max(1.0));
    // Within one read period's energy at the highest power of the scripted integral.
    let tolerance = SCRIPT.high * READ_PERIOD_MS as f64 / 1000.0;
    assert!(
        (w.energy_j - r.integral_j).abs() <= tolerance,
        "wall {} J vs scripted {} J",
        w.energy_j,
        r.integral_j
    );
    assert!((w.rest_of_node_j - (w.energy_j - w.components_j)).abs() < 1e-6);
    assert_eq!(w.disagreements, 0);
    // Conservation at the wall, and the meter's own series.
    let b = |bucket: &str| {
        metric(
            &r.metrics,
            &format!("ergon_wall_energy_joules_total{{bucket=\"{bucket}\"}}"),
        )
    };
    let meter = b("meter");
    assert!(meter > 0.0);
    assert!((meter - (b("components") + b("rest") - b("excess"))).abs() < 1e-6 * meter);
    assert!((b("rest") - (b("jobs") + b("idle") + b("unattributed"))).abs() < 1e-6 * meter);
    assert!(metric(&r.metrics, "ergon_node_meter_power_watts{source=\"hwmon\"}") > 0.0);
    assert_eq!(metric(&r.metrics, "ergon_wall_disagreements_total"), 0.0);
}

#[test]
fn the_rest_is_split_by_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(dir.path(), Meter::Scripted(SCRIPT), "", None);
    let w = r.m.wall.as_ref().expect("a wall section");
    assert_eq!(w.rule, "allocation");
    // The job holds 1 of the node's 2 CPUs and its only GPU: (1/2 + 1) / 2 = 0.75 of the rest,
    // the rest being the meter's energy less the node's components (the GPU's 100 W; RAPL
    // counters static).
    let node_rest = r.integral_j - w.components_j;
    let tolerance = SCRIPT.high * READ_PERIOD_MS as f64 / 1000.0;
    assert!(
        (w.rest_of_node_j - 0.75 * node_rest).abs() <= tolerance,
        "rest {} J vs 0.75 × {} J",
        w.rest_of_node_j,
        node_rest
    );
    // The quarter left is the node's idle.
    assert!(
        metric(
            &r.metrics,
            "ergon_wall_energy_joules_total{bucket=\"idle\"}"
        ) > 0.2 * node_rest
    );
}

/// With a memory weight: the job holds 1 of 2 CPUs, the GPU and 2 of the node's 8 GiB (its
/// extern step's start says so): (1 × 1/2 + 1 × 1 + 2 × 1/4) / 4 = 0.5 of the rest.
#[test]
fn the_rest_is_split_by_allocation_with_memory() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        dir.path(),
        Meter::Scripted(SCRIPT),
        "[attribution]\nrest_mem_weight = 2.0\n",
        Some(2048),
    );
    let w = r.m.wall.as_ref().expect("a wall section");
    assert_eq!(w.rule, "allocation");
    let node_rest = r.integral_j - w.components_j;
    let tolerance = SCRIPT.high * READ_PERIOD_MS as f64 / 1000.0;
    assert!(
        (w.rest_of_node_j - 0.5 * node_rest).abs() <= tolerance,
        "rest {} J vs 0.5 × {} J",
        w.rest_of_node_j,
        node_rest
    );
}

#[test]
fn components_above_the_meter_are_flagged_and_the_rest_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    // 50 W at the wall against a 100 W GPU.
    let r = run(
        dir.path(),
        Meter::Scripted(Script {
            low: 50.0,
            high: 50.0,
        }),
        "",
        None,
    );
    let w = r.m.wall.as_ref().expect("a wall section");
    assert_eq!(w.rest_of_node_j, 0.0);
    assert!(w.disagreements > 0, "{w:?}");
    assert!(!w.disagreement_intervals.is_empty());
    assert!(metric(&r.metrics, "ergon_wall_disagreements_total") > 0.0);
    assert!(
        metric(
            &r.metrics,
            "ergon_wall_energy_joules_total{bucket=\"excess\"}"
        ) > 0.0
    );
    assert!(r
        ._ergond
        .log()
        .contains("measured more energy than the node meter"));
}

#[test]
fn no_meter_no_wall_section() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(dir.path(), Meter::None, "", None);
    assert!(r.m.wall.is_none());
    assert!(!r.metrics.contains("ergon_node_meter_"));
    assert!(!r.metrics.contains("ergon_wall_"));
}

/// The node's BMC over IPMI: OpenIPMI's ipmi_sim on loopback answering DCMI's power reading
/// (a constant 300 W) to ergond's ipmitool; the job's wall energy is that power over the
/// metered time.
#[test]
fn wall_energy_from_a_bmc_over_ipmi_dcmi() {
    let test = "wall_energy_from_a_bmc_over_ipmi_dcmi";
    if !ergon_testkit::needs_root(test, "own the BMC credentials file as root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some((sim, ipmi)) = ipmi_bmc(test, dir.path(), "300") else {
        return;
    };
    let meters = format!("[meters]\nuse = \"ipmi\"\nread_period_ms = 250\n{ipmi}");
    let r = run(
        dir.path(),
        Meter::Configured(&meters),
        "[attribution]\nrest_of_node = \"energy\"\n",
        None,
    );
    let w = r.m.wall.as_ref().expect("a wall section");
    println!("{w:?}");
    assert_eq!(w.meter.kind, "ipmi");
    assert_eq!(
        w.meter.source,
        format!("ipmi 127.0.0.1:{} DCMI power reading", sim.port)
    );
    assert_eq!(w.meter.resolution_s, 1.0);
    assert!(w.metered_s > 0.9 * r.m.duration_s, "{w:?}");
    // A constant 300 W: the energy is 300 W over the metered time, whatever the read times.
    assert!(
        (w.energy_j - 300.0 * w.metered_s).abs() < 1.0,
        "{} J over {} s",
        w.energy_j,
        w.metered_s
    );
    assert!((w.rest_of_node_j - (w.energy_j - w.components_j)).abs() < 1e-6);
    assert!(metric(&r.metrics, "ergon_node_meter_power_watts{source=\"ipmi\"}") == 300.0);
}

/// A plain-HTTP Redfish BMC on loopback that takes `delay` to answer each request with
/// `watts`, until the returned flag is set.
fn slow_bmc(delay: Duration, watts: f64) -> (String, Arc<AtomicBool>) {
    bmc(move |_| delay, watts)
}

/// A plain-HTTP Redfish BMC on loopback that takes `delay(n)` to answer its `n`-th request
/// with `watts`, until the returned flag is set.
fn bmc(
    delay: impl Fn(usize) -> Duration + Send + 'static,
    watts: f64,
) -> (String, Arc<AtomicBool>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            if s.load(Ordering::Relaxed) {
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
            std::thread::sleep(delay(n));
            let body = format!("{{\"PowerControl\": [{{\"PowerConsumedWatts\": {watts}}}]}}");
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
    (url, stop)
}

/// A BMC that takes 2 s to answer: ergond reads it on its own thread, so the GPU sampler keeps
/// its rate and its lateness, job events are answered at once, and the job still gets its
/// energy at the wall.
#[test]
fn a_slow_bmc_does_not_stall_sampling() {
    if !ergon_testkit::needs_root(
        "a_slow_bmc_does_not_stall_sampling",
        "own the BMC credentials file as root",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let creds = ergon_testkit::write_bmc_credentials(&dir.path().join("bmc.toml"), 0o600);
    let (url, stop) = slow_bmc(Duration::from_secs(2), 500.0);
    let fake = fake_gpu();
    let ergond = start_node(
        dir.path(),
        &fake.lib,
        &format!(
            "[meters]\nuse = \"redfish\"\n[meters.redfish]\nurl = \"{url}\"\nchassis = \"1\"\n\
             insecure = true\ntimeout_ms = 10000\ncredentials_file = {}\n",
            common::toml_str(&creds)
        ),
        "ergond.log",
    );
    fake.wait_for_start();
    let samples = |m: &str| metric(m, "ergon_sampler_samples_total{source=\"gpu\"}");
    let period = metric(
        &scrape_metrics(dir.path()),
        "ergon_sampler_period_seconds{source=\"gpu\"}",
    );
    let socket = dir.path().join("run/ergond.sock");
    let t0 = Instant::now();
    let before = samples(&scrape_metrics(dir.path()));
    let start = Timestamp::now();
    let t_req = Instant::now();
    request(
        &socket,
        &Request::JobStart(JobStart {
            ids: JobIds {
                job_id: 9,
                array_job_id: None,
                array_task_id: None,
            },
            uid: 65534,
            gid: 65534,
            user: "alice".into(),
            account: None,
            partition: None,
            cluster: Some("c".into()),
            node: "n1".into(),
            gpus: vec![GpuAlloc {
                index: 0,
                minor: Some(3),
                mig: None,
            }],
            cpus: CpuSet::parse("0-1").unwrap(),
            report: None,
            work_dir: None,
            stdout_path: None,
            time: start,
            sluid: None,
            node_list: None,
        }),
    );
    assert!(
        t_req.elapsed() < Duration::from_millis(500),
        "{:?}",
        t_req.elapsed()
    );
    std::thread::sleep(Duration::from_secs(5));
    let t_req = Instant::now();
    request(
        &socket,
        &Request::JobEnd(JobEnd {
            cluster: Some("c".into()),
            job_id: 9,
            node: "n1".into(),
            time: Timestamp::now(),
        }),
    );
    assert!(
        t_req.elapsed() < Duration::from_millis(500),
        "{:?}",
        t_req.elapsed()
    );
    let text = scrape_metrics(dir.path());
    let got = samples(&text) - before;
    let expected = t0.elapsed().as_secs_f64() / period;
    let p99 = metric(
        &text,
        "ergon_sampler_lateness_seconds{source=\"gpu\",quantile=\"0.99\"}",
    );
    println!("gpu samples {got} of {expected:.0} expected, lateness p99 {p99} s");
    assert!(got >= 0.8 * expected, "{got} samples, {expected} expected");
    assert!(p99 < 0.1, "GPU lateness p99 {p99} s with a 2 s BMC");
    let m = wait_manifest(&dir.path().join("spool/c-9-n1.json"), &ergond);
    let w = m.wall.as_ref().expect("a wall section from the slow BMC");
    assert_eq!(w.meter.kind, "redfish");
    println!("{w:?}");
    assert!(w.metered_s > 0.0, "{w:?}");
    stop.store(true, Ordering::Relaxed);
}

/// A BMC that answers at first, then hangs (each request past its timeout): once the meter has
/// not read for longer than its wait bound, job events are not held back waiting for it, and a
/// job it never covered has no `wall` section.
#[test]
fn a_hung_bmc_does_not_hold_job_events_back() {
    if !ergon_testkit::needs_root(
        "a_hung_bmc_does_not_hold_job_events_back",
        "own the BMC credentials file as root",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let creds = ergon_testkit::write_bmc_credentials(&dir.path().join("bmc.toml"), 0o600);
    let (url, stop) = bmc(
        |n| {
            if n < 3 {
                Duration::ZERO
            } else {
                Duration::from_secs(30)
            }
        },
        500.0,
    );
    let fake = fake_gpu();
    let ergond = start_node(
        dir.path(),
        &fake.lib,
        &format!(
            "[meters]\nuse = \"redfish\"\n[meters.redfish]\nurl = \"{url}\"\nchassis = \"1\"\n\
             insecure = true\ntimeout_ms = 1000\ncredentials_file = {}\n",
            common::toml_str(&creds)
        ),
        "ergond.log",
    );
    fake.wait_for_start();
    // The BMC fails its reads; after the wait bound (2 × 1 s + 1 s + 1 s) the meter is stale.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(
        &scrape_metrics(dir.path()),
        "ergon_node_meter_read_errors_total{source=\"redfish\"}",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "{}", ergond.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5));
    let socket = dir.path().join("run/ergond.sock");
    request(
        &socket,
        &Request::JobStart(JobStart {
            ids: JobIds {
                job_id: 11,
                array_job_id: None,
                array_task_id: None,
            },
            uid: 65534,
            gid: 65534,
            user: "alice".into(),
            account: None,
            partition: None,
            cluster: Some("c".into()),
            node: "n1".into(),
            gpus: vec![],
            cpus: CpuSet::parse("0").unwrap(),
            report: None,
            work_dir: None,
            stdout_path: None,
            time: Timestamp::now(),
            sluid: None,
            node_list: None,
        }),
    );
    std::thread::sleep(Duration::from_millis(500));
    let t_end = Instant::now();
    request(
        &socket,
        &Request::JobEnd(JobEnd {
            cluster: Some("c".into()),
            job_id: 11,
            node: "n1".into(),
            time: Timestamp::now(),
        }),
    );
    let m = wait_manifest(&dir.path().join("spool/c-11-n1.json"), &ergond);
    let took = t_end.elapsed();
    println!("manifest {took:?} after the job's end");
    // Waiting for the hung meter would take its 4 s bound per event.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(m.wall.is_none(), "{:?}", m.wall);
    stop.store(true, Ordering::Relaxed);
}

/// The IPMI meter's `ipmitool shell` (its session with the BMC) is ergond's child; when ergond
/// is killed (`kill -9`, no destructor runs), it must not live on: it would spin on its closed
/// input. It dies with ergond's meter thread.
#[test]
fn a_killed_ergond_leaves_no_ipmitool_behind() {
    let test = "a_killed_ergond_leaves_no_ipmitool_behind";
    if !ergon_testkit::needs_root(test, "own the BMC credentials file as root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some((_sim, ipmi)) = ipmi_bmc(test, dir.path(), "300") else {
        return;
    };
    let fake = fake_gpu();
    let mut ergond = start_node(
        dir.path(),
        &fake.lib,
        &format!("[meters]\nuse = \"ipmi\"\n{ipmi}"),
        "ergond.log",
    );
    let pid = ergond.child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    let shell = loop {
        let live: Vec<u32> = ergon_testkit::child_processes(pid, "ipmitool")
            .into_iter()
            .filter(|&(_, state)| state != 'Z')
            .map(|(p, _)| p)
            .collect();
        if let [one] = live[..] {
            break one;
        }
        assert!(
            Instant::now() < deadline,
            "no ipmitool session:\n{}",
            ergond.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // ergond reads the BMC through it (the session starts before its first reading is in:
    // await the reading).
    let name = "ergon_node_meter_power_watts{source=\"ipmi\"}";
    let before = metric(&common::wait_metrics_with(dir.path(), name, &ergond), name);
    assert_eq!(before, 300.0);
    ergond.child.kill().unwrap();
    ergond.child.wait().unwrap();
    let alive = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .is_ok_and(|s| s.split_once(") ").is_some_and(|(_, r)| !r.starts_with('Z')))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(shell) {
        assert!(
            Instant::now() < deadline,
            "ipmitool {shell} outlived the killed ergond"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
