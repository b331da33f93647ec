//! `scripts/demo`, the README's main command, end to end on the real cluster: it runs with the
//! debug build that `cargo build --workspace` made (`ERGON_DEMO_PROFILE=debug`,
//! `ERGON_DEMO_BUILD=0`: no cargo inside a test, no release build) on simulated hardware, in a
//! demo directory of its own. The test checks what the demo shows — every heading, the GPU job's
//! `ergon1` record in sacct, the same energy in `ergon report`, a PNG plot, lines of ergond's
//! /metrics, how to stop it — and that `scripts/demo down` stops ergond and the RAPL simulator
//! and puts the cluster's plugstack drop-in back as it was.
//!
//! The demo takes the cluster lock itself (or finds it held by a parent process), so it never
//! interleaves with another user of the cluster; cargo runs the test binaries one after
//! another, and this binary has a single test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ergon_tests::{repo_root, target_dir};

/// Every heading the demo prints, in order (the report's and `ergon report`'s name the job).
const HEADINGS: &[&str] = &[
    "==> Installing what is missing",
    "==> Building ergon (debug)",
    "==> Hardware",
    "==> Slurm cluster",
    "==> ergond",
    "==> Prometheus (scraping ergond, for the dashboards)",
    "==> Jobs",
    "==> The user's report (job ",
    "==> ergon run (manifests -> sacct AdminComment and the job-records database)",
    "==> sacct -X -j ",
    "==> ergon jobs (from the job-records database)",
    "==> ergon report ",
    "==> ergon summary --by user (energy, CO2e and cost; demo factors)",
    "==> Power plot",
    "==> ergond /metrics (a few lines)",
    "==> Dashboards (dashboards/*.json; queries answered by the demo's Prometheus)",
    "==> Where everything is",
    "==> How to stop",
];

/// The demo's wall time limit here (its own job and daemon timeouts are shorter).
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);

fn demo(dir: &Path, args: &[&str]) -> Output {
    // The binary under test must exist already: `cargo test` builds this crate's binaries
    // (the RAPL simulator), `cargo build --workspace` the others.
    let script = repo_root().join("scripts/demo");
    Command::new("timeout")
        .arg(DEMO_TIMEOUT.as_secs().to_string())
        .arg(&script)
        .args(args)
        .env("ERGON_DEMO_DIR", dir)
        .env("ERGON_DEMO_PROFILE", "debug")
        .env("ERGON_DEMO_BUILD", "0")
        .env("ERGON_DEMO_HARDWARE", "simulated")
        .env_remove("ERGON_DEMO_METRICS_PORT")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The lines of the section under `heading` (up to the next heading).
fn section<'a>(stdout: &'a str, heading: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with(heading))
        .skip(1)
        .take_while(|l| !l.starts_with("==> "))
        .collect()
}

fn pid_in(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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

/// Runs `scripts/demo down` if the test ends before it did (a failed assertion), so that no
/// ergond or simulator outlives the test.
struct DownOnDrop {
    dir: PathBuf,
    armed: bool,
}

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let out = demo(&self.dir, &["down"]);
            eprintln!("cleanup: scripts/demo down: {}", text(&out));
        }
    }
}

#[test]
fn demo_shows_the_whole_chain_and_down_stops_it() {
    // The demo is for the host's Slurm (its plugin build and commands); scripts/test runs it in
    // the 22.05 round. Said in the output, never passed silently.
    let release = std::env::var("ERGON_CLUSTER_SLURM").unwrap_or_else(|_| "22.05".into());
    if release != "22.05" {
        println!(
            "SKIPPED: the demo runs on the host's Slurm 22.05 only (this round: Slurm {release})"
        );
        return;
    }
    let t0 = Instant::now();
    let bin = target_dir().join("debug");
    for artifact in [
        "ergond",
        "ergon",
        "libspank_ergon.so",
        "libnvidia_ml.so",
        "ergon-sim-rapl",
        "ergon-demo-hw",
    ] {
        assert!(
            bin.join(artifact).exists(),
            "{} is missing: run `cargo build --workspace` first (scripts/test does)",
            bin.join(artifact).display()
        );
    }
    let dir = std::env::temp_dir()
        .join("ergon-tests")
        .join(format!("demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster_dir =
        PathBuf::from(std::env::var("ERGON_CLUSTER_DIR").unwrap_or("/tmp/ergon-slurm".into()));
    let dropin = cluster_dir.join("etc/plugstack.conf.d/ergon.conf");
    let dropin_before = std::fs::read_to_string(&dropin).ok();

    let mut guard = DownOnDrop {
        dir: dir.clone(),
        armed: true,
    };
    let out = demo(&dir, &[]);
    let all = text(&out);
    println!("{all}");
    println!("scripts/demo took {:?}", t0.elapsed());
    assert!(out.status.success(), "scripts/demo failed:\n{all}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();

    // Every heading, in order.
    let mut at = 0;
    for h in HEADINGS {
        let pos = stdout[at..]
            .find(&format!("\n{h}"))
            .unwrap_or_else(|| panic!("heading {h:?} missing (or out of order):\n{all}"));
        at += pos + 1;
    }
    assert!(
        stdout.contains("SIMULATED HARDWARE"),
        "the demo does not say that the hardware is simulated:\n{all}"
    );

    // The GPU job: the user's report names it.
    let job: u32 = stdout
        .split("==> The user's report (job ")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no job id in the report heading:\n{all}"));
    let report = section(&stdout, "==> The user's report").join("\n");
    assert!(
        report.contains(&format!("job {job} (demo-gpu)")),
        "the user's report does not show the job's output:\n{report}"
    );
    // The simulated gpu1 reports 2 % SM utilisation while it draws power: the report says
    // the job left it idle and what that cost.
    assert!(
        report.contains("Idle GPUs") && report.contains("gpu1: 2 % average SM utilisation"),
        "the user's report has no idle-GPU line for gpu1:\n{report}"
    );
    // ergond's estimate with the demo's static factors, said to be one.
    assert!(
        report.contains("Footprint  about ")
            && report.contains("PUE 1.3 × 250 gCO2e/kWh, 0.3 EUR/kWh, static factors"),
        "the user's report has no CO2e and cost estimate:\n{report}"
    );
    // The simulated node meter: the report gives the job's energy at the wall, with its rest of
    // the node, and the hardware section says the meter is simulated.
    assert!(
        report.contains("At the wall  ")
            && report.contains("rest of node")
            && report.contains("hwmon"),
        "the user's report has no energy at the wall:\n{report}"
    );
    assert!(
        stdout.contains("Node:     SIMULATED: a whole-node hwmon power meter"),
        "the demo does not say that the node meter is simulated:\n{all}"
    );
    // After the job's own output: ergond's report, or (a build without it) the demo's note
    // and the manifest's summary.
    let after = report
        .split("--- end of the job's own output ---")
        .nth(1)
        .unwrap_or_else(|| panic!("no end-of-output marker in:\n{report}"));
    assert!(
        after.contains(&format!("job {job}")) && after.contains("gpu0"),
        "neither ergond's report nor the manifest's summary follows the job's output:\n{report}"
    );

    // sacct: the GPU job's line holds the ergon1 record.
    let sacct = section(&stdout, "==> sacct -X -j ");
    let line = sacct
        .iter()
        .find(|l| l.split_whitespace().next() == Some(&job.to_string()))
        .unwrap_or_else(|| panic!("no sacct line for job {job}:\n{}", sacct.join("\n")));
    assert!(line.contains("ergon1 e="), "sacct line: {line}");
    let energy_j: u64 = line
        .split("ergon1 e=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no energy in {line}"));
    // Two simulated GPUs at 250-650 W for several seconds.
    assert!(energy_j > 1000, "job {job}'s energy {energy_j} J: {line}");

    // ergon jobs lists the GPU job from the database.
    let jobs = section(&stdout, "==> ergon jobs");
    assert!(
        jobs.iter()
            .any(|l| l.split_whitespace().nth(1) == Some(&job.to_string())),
        "ergon jobs does not list job {job}:\n{}",
        jobs.join("\n")
    );

    // ergon report: the same energy, the job's record from the database.
    let heading = format!("==> ergon report {job}");
    let report = section(&stdout, &heading).join("\n");
    assert!(
        report.contains(&format!("({energy_j} J)")),
        "ergon report does not show {energy_j} J:\n{report}"
    );
    assert!(
        report.contains("from the job-records database"),
        "ergon report does not read the job-records database:\n{report}"
    );
    assert!(
        report.contains("gpu0") || report.contains("gpu1"),
        "{report}"
    );
    // CO2e and cost over the job's power trace, with the demo's factors named.
    assert!(
        report.contains("co2e ") && report.contains("250 gCO2e/kWh"),
        "ergon report shows no CO2e with the demo's intensity:\n{report}"
    );
    assert!(
        report.contains("EUR") && report.contains("Europe/Paris"),
        "ergon report shows no cost with the demo's tariff:\n{report}"
    );
    // ergon summary: the user's row has energy, CO2e and cost.
    let summary = section(
        &stdout,
        "==> ergon summary --by user (energy, CO2e and cost; demo factors)",
    )
    .join("\n");
    assert!(
        summary.contains("CO2E") && summary.contains("COST") && summary.contains("EUR"),
        "ergon summary shows no CO2e and cost:\n{summary}"
    );

    // The demo's Prometheus scraped ergond while the GPU job ran: the job dashboard's query
    // gives the job's GPU energy (its per-job series), the node dashboard's the GPUs' power.
    let dash = section(
        &stdout,
        "==> Dashboards (dashboards/*.json; queries answered by the demo's Prometheus)",
    );
    let gpu_j: f64 = dash
        .iter()
        .find_map(|l| l.trim().strip_prefix("component=gpu "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no GPU energy for job {job} from Prometheus:\n{}",
                dash.join("\n")
            )
        });
    assert!(gpu_j > 0.0, "job {job}: {gpu_j} J:\n{}", dash.join("\n"));
    assert!(
        dash.iter()
            .any(|l| l.contains("dashboards/{node,job,site}.json")),
        "{}",
        dash.join("\n")
    );

    // The plot: a PNG file, whose path is printed.
    let plot = dir.join(format!("job-{job}.png"));
    let plot_section = section(&stdout, "==> Power plot").join("\n");
    assert!(
        plot_section.contains(&plot.display().to_string()),
        "plot path not shown:\n{plot_section}"
    );
    let bytes = std::fs::read(&plot).unwrap_or_else(|e| panic!("{}: {e}", plot.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        plot.display()
    );

    // /metrics: GPU and (simulated) RAPL power lines.
    let metrics = section(&stdout, "==> ergond /metrics");
    for name in ["ergon_gpu_power_watts{", "ergon_rapl_power_watts{"] {
        assert!(
            metrics.iter().any(|l| l.trim_start().starts_with(name)),
            "no {name} line in:\n{}",
            metrics.join("\n")
        );
    }

    // How to stop.
    let stop = section(&stdout, "==> How to stop").join("\n");
    assert!(
        stop.contains("scripts/demo down ") && stop.contains("scripts/demo down --all"),
        "{stop}"
    );

    // Down: ergond and the simulator stop, the drop-in is as before.
    let ergond = pid_in(&dir.join("run/ergond.pid"));
    let sim = pid_in(&dir.join("run/sim-rapl.pid"));
    assert!(
        alive(ergond) && alive(sim),
        "ergond {ergond} / simulator {sim} not running"
    );
    let out = demo(&dir, &["down"]);
    guard.armed = false;
    let all = text(&out);
    println!("{all}");
    assert!(out.status.success(), "scripts/demo down failed:\n{all}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("stopped ergond, Prometheus and the RAPL simulator"),
        "{all}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while (alive(ergond) || alive(sim)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !alive(ergond),
        "ergond (pid {ergond}) still runs after down"
    );
    assert!(
        !alive(sim),
        "the simulator (pid {sim}) still runs after down"
    );
    assert_eq!(
        std::fs::read_to_string(&dropin).ok(),
        dropin_before,
        "{} not restored",
        dropin.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!("test took {:?}", t0.elapsed());
}
