//! `/metrics` scraped by a real Prometheus (the Debian package, 2.42, which
//! `scripts/slurm-cluster install` installs): the `ergond` binary runs as a service against the
//! fake NVML library (two GPUs at constant, known power) and a generated powercap tree; a private
//! Prometheus scrapes it every second; the test asks Prometheus, through its HTTP API, for the
//! GPUs' energy rate and compares it with the fake's power. Then SIGTERM stops ergond cleanly.
//!
//! Every wait polls a condition against a deadline; both processes are killed when the test
//! ends, whichever way it ends.

mod common;

use common::prometheus::*;
use common::FakeNvml;
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const GPU_A: &str = "GPU-a0a0a0a0-0000-1111-2222-333333333333";
const GPU_B: &str = "GPU-b1b1b1b1-4444-5555-6666-777777777777";
const WATTS_A: f64 = 300.0;
const WATTS_B: f64 = 120.0;

/// Node trees and the ergond configuration, with a node meter (an ACPI hwmon power meter at
/// 500 W); returns the configuration file.
fn node_with_meter(dir: &Path, nvml: &Path, metrics: SocketAddr) -> PathBuf {
    let hwmon = ergon_testkit::HwmonTree::create(
        &dir.join("hwmon"),
        &[ergon_testkit::HwmonFixture::acpi_power_meter(
            500_000_000,
            1000,
        )],
    );
    common::write_node(
        dir,
        nvml,
        &metrics.to_string(),
        "system.slice",
        1000,
        &format!(
            "[meters]\nuse = \"hwmon\"\nread_period_ms = 200\n[meters.hwmon]\nroot = {}\n",
            common::toml_str(hwmon.root())
        ),
    )
}

#[test]
fn prometheus_scrapes_ergond_and_gpu_energy_rate_is_the_fake_power() {
    let start = Instant::now();
    let deadline = start + TEST_BUDGET;
    let prometheus = prometheus_bin();
    let fake = FakeNvml::new(json!({"gpus": [
        {"uuid": GPU_A, "name": "Fake H100", "minor": 2, "pci_bus_id": "00000000:17:00.0",
         "profile": {"kind": "constant", "watts": WATTS_A}, "update_period_ms": 20.0,
         "initial_energy_mj": 7_000_000u64,
         "utilization": 37, "memory_used_bytes": 1073741824u64, "temperature_c": 61,
         "throttle": {"power_cap": 0.5}, "xids": []},
        {"uuid": GPU_B, "name": "Fake A100", "minor": 5, "pci_bus_id": "00000000:65:00.0",
         "profile": {"kind": "constant", "watts": WATTS_B}, "update_period_ms": 20.0},
    ]}));
    let dir = tempfile::tempdir().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = node_with_meter(dir.path(), &fake.lib, metrics);

    let mut ergond = Proc::spawn(
        "ergond",
        Command::new(env!("CARGO_BIN_EXE_ergond"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info"),
        dir.path().join("ergond.log"),
    );

    // ergond itself serves both GPUs before Prometheus is involved (once the sampler's first
    // GPU tick is in: before it, the GPUs are listed with 0 J and no power yet).
    let body = wait_for(
        "ergond's /metrics to show both GPUs' power",
        deadline,
        &mut [&mut ergond],
        || match http_get(metrics, "/metrics") {
            Ok((200, b))
                if [GPU_A, GPU_B]
                    .iter()
                    .all(|u| b.contains(&format!("ergon_gpu_power_watts{{uuid=\"{u}\"")))
                    && b.contains("ergon_gpu_utilization_ratio")
                    && b.contains("ergon_node_meter_power_watts") =>
            {
                Some(b)
            }
            _ => None,
        },
    );
    for want in [
        format!(
            "ergon_gpu_power_watts{{uuid=\"{GPU_A}\",index=\"0\",minor=\"2\",name=\"Fake H100\"}} 300\n"
        ),
        format!("ergon_gpu_energy_method{{uuid=\"{GPU_B}\",method=\"counter\"}} 1\n"),
        "ergon_rapl_energy_joules_total{zone=\"package-0\",socket=\"0\",domain=\"package\"}"
            .to_string(),
        "ergon_node_energy_joules_total{component=\"gpu\"}".to_string(),
        "ergon_sampler_samples_total{source=\"gpu\"}".to_string(),
        "# TYPE ergon_gpu_energy_joules_total counter\n".to_string(),
        // GPU statistics where the GPU reports them (GPU B reports none: no series).
        format!("ergon_gpu_utilization_ratio{{gpu=\"{GPU_A}\"}} 0.37\n"),
        format!("ergon_gpu_memory_used_bytes{{gpu=\"{GPU_A}\"}} 1073741824\n"),
        format!("ergon_gpu_temperature_celsius{{gpu=\"{GPU_A}\"}} 61\n"),
        format!("ergon_gpu_throttle_seconds_total{{gpu=\"{GPU_A}\",reason=\"power_cap\"}}"),
        format!("ergon_gpu_xid_events_total{{gpu=\"{GPU_A}\"}} 0\n"),
        "# TYPE ergon_gpu_throttle_seconds_total counter\n".to_string(),
        // The node meter and the energy at the wall.
        "ergon_node_meter_energy_joules_total{source=\"hwmon\"}".to_string(),
        "ergon_node_meter_power_watts{source=\"hwmon\"} 500\n".to_string(),
        "# TYPE ergon_wall_energy_joules_total counter\n".to_string(),
        "ergon_wall_energy_joules_total{bucket=\"excess\"}".to_string(),
        "ergon_wall_disagreements_total ".to_string(),
    ] {
        assert!(body.contains(&want), "missing {want:?} in:\n{body}");
    }
    let (status, index) = http_get(metrics, "/").unwrap();
    assert!(status == 200 && index.contains("/metrics"), "{index}");
    assert_eq!(http_get(metrics, "/other").unwrap().0, 404);

    assert!(
        !body.contains(&format!("ergon_gpu_utilization_ratio{{gpu=\"{GPU_B}\"")),
        "{body}"
    );
    promtool_finds_nothing(&prometheus, &body);

    // A private Prometheus scraping ergond every second.
    let (mut prometheus, prom) = start_prometheus(&prometheus, dir.path(), metrics);

    // Both GPUs' energy in Prometheus, scraped for longer than the rate window (7 samples in 8 s
    // span at least 6 s): a series younger than the window makes rate() extrapolate from its
    // first sample, which is correct PromQL but not the GPU's power.
    wait_for(
        "ergon_gpu_energy_joules_total of both GPUs, 7 samples each in 8 s",
        deadline,
        &mut [&mut ergond, &mut prometheus],
        || {
            let r = query(prom, "count_over_time(ergon_gpu_energy_joules_total[8s])");
            let enough = |uuid: &str| {
                r.iter()
                    .any(|s| label(s, "uuid") == uuid && value_of(s) >= 7.0)
            };
            (enough(GPU_A) && enough(GPU_B)).then_some(())
        },
    );

    let up = query(prom, "up{job=\"ergond\"} == 1");
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(label(&up[0], "instance"), metrics.to_string());

    let rates = query(prom, "rate(ergon_gpu_energy_joules_total[5s])");
    assert_eq!(rates.len(), 2, "{rates:?}");
    for (uuid, watts) in [(GPU_A, WATTS_A), (GPU_B, WATTS_B)] {
        let r = rates
            .iter()
            .find(|r| label(r, "uuid") == uuid)
            .unwrap_or_else(|| panic!("no rate for {uuid}: {rates:?}"));
        let w = value_of(r);
        println!("{uuid}: rate {w:.2} W, fake draws {watts} W");
        assert!(
            (w - watts).abs() <= 0.10 * watts,
            "{uuid}: Prometheus computes {w} W, the fake GPU draws {watts} W"
        );
        assert_eq!(
            label(r, "name"),
            if uuid == GPU_A {
                "Fake H100"
            } else {
                "Fake A100"
            }
        );
    }
    let total = query(
        prom,
        "rate(ergon_node_energy_joules_total{component=\"gpu\"}[5s])",
    );
    assert_eq!(total.len(), 1, "{total:?}");
    let w = value_of(&total[0]);
    assert!(
        (w - (WATTS_A + WATTS_B)).abs() <= 0.10 * (WATTS_A + WATTS_B),
        "node GPU total {w} W"
    );

    // SIGTERM: ergond stops serving and exits 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ergond.child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let status = ergond
        .wait_exit(Instant::now() + Duration::from_secs(10))
        .unwrap_or_else(|| panic!("ergond ignored SIGTERM:\n{}", ergond.log()));
    assert!(status.success(), "{status}:\n{}", ergond.log());
    assert!(http_get(metrics, "/metrics").is_err(), "still listening");
    println!("--- ergond log ---\n{}", ergond.log());
    assert!(start.elapsed() < TEST_BUDGET + Duration::from_secs(5));
}

/// Per-job series, scraped by a real Prometheus from an ergond driven through its socket as
/// the plugin drives it: job 42 on GPU A (300 W, exclusive) and job 43 on GPU B, with
/// `per_job_max_jobs = 1`. Job 42, the longest-running, has series that rise at its GPU's
/// power; job 43 is left out and counted; when job 42 ends its series go stale in Prometheus
/// and job 43's appear; when job 43 ends no per-job series is left.
#[test]
fn prometheus_sees_an_open_jobs_series_rise_and_go_when_it_ends() {
    use ergon_protocol::{
        CgroupPath, CpuSet, GpuAlloc, JobEnd, JobIds, JobStart, Reply, Request, StepId, StepStart,
        Timestamp,
    };
    let deadline = Instant::now() + TEST_BUDGET;
    let prometheus = prometheus_bin();
    let fake = FakeNvml::new(json!({"gpus": [
        {"uuid": GPU_A, "name": "Fake H100", "minor": 2, "pci_bus_id": "00000000:17:00.0",
         "profile": {"kind": "constant", "watts": WATTS_A}, "update_period_ms": 20.0},
        {"uuid": GPU_B, "name": "Fake A100", "minor": 5, "pci_bus_id": "00000000:65:00.0",
         "profile": {"kind": "constant", "watts": WATTS_B}, "update_period_ms": 20.0},
    ]}));
    let dir = tempfile::tempdir().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = common::write_node(
        dir.path(),
        &fake.lib,
        &metrics.to_string(),
        "slurm/job_42/step_0",
        1_000_000,
        "private_data = \"no\"\n[metrics]\nper_job_max_jobs = 1\nper_job_labels = [\"user\", \"account\"]\n",
    );
    let mut ergond = Proc::spawn(
        "ergond",
        Command::new(env!("CARGO_BIN_EXE_ergond"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info"),
        dir.path().join("ergond.log"),
    );
    let socket = dir.path().join("run/ergond.sock");
    wait_for("ergond's socket", deadline, &mut [&mut ergond], || {
        matches!(
            common::try_request(&socket, &Request::Ping),
            Ok(Reply::Pong)
        )
        .then_some(())
    });
    let send = |req: Request| {
        let r = common::try_request(&socket, &req).unwrap_or_else(|e| panic!("{req:?}: {e}"));
        assert_eq!(r, Reply::Ok, "{req:?}");
    };
    let start = |job_id: u32, minor: u32| {
        Request::JobStart(JobStart {
            ids: JobIds {
                job_id,
                array_job_id: None,
                array_task_id: None,
            },
            uid: 1000,
            gid: 1000,
            user: "alice".into(),
            account: Some("proj".into()),
            partition: Some("gpu".into()),
            cluster: Some("testcl".into()),
            node: "node1".into(),
            gpus: vec![GpuAlloc {
                index: 0,
                minor: Some(minor),
                mig: None,
            }],
            cpus: CpuSet::new(),
            report: None,
            work_dir: None,
            stdout_path: None,
            time: Timestamp::now(),
            sluid: None,
            node_list: None,
        })
    };
    let end = |job_id: u32| {
        Request::JobEnd(JobEnd {
            cluster: None,
            job_id,
            node: "node1".into(),
            time: Timestamp::now(),
        })
    };
    send(start(42, 2));
    send(Request::StepStart(StepStart {
        cluster: None,
        job_id: 42,
        array_job_id: None,
        array_task_id: None,
        step: StepId::Numbered(0),
        uid: 1000,
        node: "node1".into(),
        cgroups: vec![CgroupPath {
            controller: String::new(),
            path: "/slurm/job_42/step_0".into(),
        }],
        cpus: "0-1".parse().unwrap(),
        pid: None,
        tasks: Some(1),
        time: Timestamp::now(),
        sluid: None,
        job_mem_mb: None,
    }));
    // Job 43 starts later: beyond the bound of 1, so left out while 42 runs.
    wait_for(
        "job 42's series on ergond's /metrics",
        deadline,
        &mut [&mut ergond],
        || {
            let (_, b) = http_get(metrics, "/metrics").ok()?;
            b.contains("ergon_job_power_watts{job_id=\"42\"")
                .then_some(())
        },
    );
    send(start(43, 5));
    let body = wait_for(
        "job 43 counted as left out on ergond's /metrics",
        deadline,
        &mut [&mut ergond],
        || {
            let (_, b) = http_get(metrics, "/metrics").ok()?;
            b.contains("ergon_job_metrics_left_out_jobs 1\n")
                .then_some(b)
        },
    );
    for want in [
        "ergon_job_energy_joules_total{job_id=\"42\",user=\"alice\",account=\"proj\",component=\"gpu\"} ",
        "ergon_job_metrics_max_jobs 1\n",
        "# TYPE ergon_job_energy_joules_total counter\n",
    ] {
        assert!(body.contains(want), "missing {want:?} in:\n{body}");
    }
    assert!(!body.contains("job_id=\"43\""), "{body}");
    // The exposition with per-job series and their optional labels lints clean.
    promtool_finds_nothing(&prometheus, &body);

    let (mut prometheus, prom) = start_prometheus(&prometheus, dir.path(), metrics);
    let gpu42 = "ergon_job_energy_joules_total{job_id=\"42\",component=\"gpu\"}";
    // Scraped for longer than the rate window (see the test above).
    wait_for(
        "job 42's GPU energy, 7 samples in 8 s",
        deadline,
        &mut [&mut ergond, &mut prometheus],
        || {
            let r = query(prom, &format!("count_over_time({gpu42}[8s])"));
            (r.len() == 1 && value_of(&r[0]) >= 7.0).then_some(())
        },
    );
    let first = query(prom, gpu42);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        (label(&first[0], "user"), label(&first[0], "account")),
        ("alice", "proj")
    );
    let e1 = value_of(&first[0]);
    // The next scrape has more: the counter rises while the job runs.
    let e2 = wait_for(
        "job 42's GPU energy to rise between scrapes",
        deadline,
        &mut [&mut ergond, &mut prometheus],
        || {
            let r = query(prom, gpu42);
            r.first().map(value_of).filter(|&e| e > e1)
        },
    );
    println!("job 42 GPU energy: {e1:.1} J, then {e2:.1} J");
    // Its GPU is its own: its GPU energy rises at the GPU's power, and so does its power
    // (the generated RAPL counters stand still: no CPU energy to add).
    let rate = query(prom, &format!("rate({gpu42}[5s])"));
    assert_eq!(rate.len(), 1, "{rate:?}");
    let w = value_of(&rate[0]);
    assert!(
        (w - WATTS_A).abs() <= 0.10 * WATTS_A,
        "job 42's GPU energy rises at {w} W, its GPU draws {WATTS_A} W"
    );
    let power = query(prom, "ergon_job_power_watts{job_id=\"42\"}");
    assert_eq!(power.len(), 1, "{power:?}");
    let p = value_of(&power[0]);
    assert!(
        (p - WATTS_A).abs() <= 0.10 * WATTS_A,
        "job 42's power {p} W, its GPU draws {WATTS_A} W"
    );
    assert!(
        query(prom, "ergon_job_energy_joules_total{job_id=\"43\"}").is_empty(),
        "job 43 is beyond the bound"
    );
    let left_out = query(prom, "ergon_job_metrics_left_out_jobs");
    assert_eq!(left_out.iter().map(value_of).collect::<Vec<_>>(), vec![1.0]);

    // Job 42 ends: its series are gone from the scrape, so stale in Prometheus, and job 43
    // takes the freed place.
    send(end(42));
    wait_for(
        "job 42's series to go and job 43's to come in Prometheus",
        deadline,
        &mut [&mut ergond, &mut prometheus],
        || {
            let gone = query(prom, "{__name__=~\"ergon_job_.+\",job_id=\"42\"}").is_empty();
            let came = query(prom, "ergon_job_power_watts{job_id=\"43\"}").len() == 1;
            (gone && came).then_some(())
        },
    );
    let left_out = query(prom, "ergon_job_metrics_left_out_jobs");
    assert_eq!(left_out.iter().map(value_of).collect::<Vec<_>>(), vec![0.0]);

    send(end(43));
    wait_for(
        "no per-job series left in Prometheus",
        deadline,
        &mut [&mut ergond, &mut prometheus],
        || {
            query(prom, "{__name__=~\"ergon_job_(energy|power).+\"}")
                .is_empty()
                .then_some(())
        },
    );
    let (_, body) = http_get(metrics, "/metrics").unwrap();
    assert!(!body.contains("job_id="), "{body}");
    println!("--- ergond log ---\n{}", ergond.log());
}
