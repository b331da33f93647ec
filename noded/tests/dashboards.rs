//! The Grafana dashboards that read ergond (`dashboards/`, tag `ergond`: the node and job
//! dashboards) against a real Prometheus scraping a real ergond: the `ergond` binary on the fake
//! NVML library (two GPUs) and a generated powercap tree, one job open on it (driven through
//! its socket as the plugin drives it), so that the node's, the attribution's and the job's
//! series are all there. Every target of every panel (rows' nested panels too), its template
//! variables substituted with this node's instance and this job's id, must return data through
//! Prometheus' HTTP API, and every metric it names must be on ergond's `/metrics`: a panel
//! whose metric is renamed or dropped fails here. A new panel or dashboard is picked up from
//! the JSON alone. (The site dashboard, over `ergon run`'s uploads, is checked in
//! `accounting/tests/dashboards.rs`.)

mod common;

use common::prometheus::*;
use common::FakeNvml;
use ergon_protocol::{
    CgroupPath, CpuSet, GpuAlloc, JobIds, JobStart, Reply, Request, StepId, StepStart, Timestamp,
};
use ergon_testkit::dashboards::{self, exposition_names, Api, Source};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

const GPU_A: &str = "GPU-a0a0a0a0-0000-1111-2222-333333333333";
const GPU_B: &str = "GPU-b1b1b1b1-4444-5555-6666-777777777777";

#[test]
fn every_ergond_dashboard_panel_returns_data_from_prometheus_scraping_ergond() {
    let deadline = Instant::now() + Duration::from_secs(90);
    let boards: Vec<_> = dashboards::load_all()
        .into_iter()
        .filter(|d| d.source == Source::Ergond)
        .collect();
    assert!(
        boards.iter().any(|d| d.file == "node.json") && boards.iter().any(|d| d.file == "job.json"),
        "{:?}",
        boards.iter().map(|d| &d.file).collect::<Vec<_>>()
    );
    let prometheus = prometheus_bin();
    let fake = FakeNvml::new(json!({"gpus": [
        {"uuid": GPU_A, "name": "Fake H100", "minor": 2, "pci_bus_id": "00000000:17:00.0",
         "profile": {"kind": "constant", "watts": 300.0}, "update_period_ms": 20.0,
         // What the GPU panels show: utilisation, throttling and an Xid.
         "utilization": 80, "throttle": {"power_cap": 0.5, "sw_thermal": 0.0, "hw_thermal": 0.25},
         "xids": [{"at_s": 0.5, "xid": 13}]},
        {"uuid": GPU_B, "name": "Fake A100", "minor": 5, "pci_bus_id": "00000000:65:00.0",
         "profile": {"kind": "constant", "watts": 120.0}, "update_period_ms": 20.0},
    ]}));
    let dir = tempfile::tempdir().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = common::write_node(
        dir.path(),
        &fake.lib,
        &metrics.to_string(),
        "slurm/job_42/step_0",
        1_000_000,
        "",
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
    // Job 42 on GPU A, with a step whose cgroup has CPU time: open for the whole test.
    for req in [
        Request::JobStart(JobStart {
            ids: JobIds {
                job_id: 42,
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
                minor: Some(2),
                mig: None,
            }],
            cpus: CpuSet::new(),
            report: None,
            work_dir: None,
            stdout_path: None,
            time: Timestamp::now(),
            sluid: None,
            node_list: None,
        }),
        Request::StepStart(StepStart {
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
        }),
    ] {
        let r = common::try_request(&socket, &req).unwrap_or_else(|e| panic!("{req:?}: {e}"));
        assert_eq!(r, Reply::Ok, "{req:?}");
    }
    // What ergon exports: ergond's own exposition once the job's series are in it.
    let body = wait_for(
        "job 42's energy, power and GPU use, and the GPUs' statistics on ergond's /metrics",
        deadline,
        &mut [&mut ergond],
        || {
            let (_, b) = http_get(metrics, "/metrics").ok()?;
            (b.contains("ergon_job_power_watts{job_id=\"42\"")
                && b.contains("ergon_job_energy_joules_total{job_id=\"42\"")
                && b.contains("ergon_gpu_power_watts{")
                && b.contains("ergon_job_gpu_utilization_ratio{job_id=\"42\"")
                && b.contains("ergon_gpu_throttle_seconds_total{")
                && b.contains("ergon_gpu_xid_events_total{"))
            .then_some(b)
        },
    );
    let exported = exposition_names(&body);
    assert!(
        exported.iter().all(|n| n.starts_with("ergon_")),
        "{exported:?}"
    );

    let (mut prometheus, prom) = start_prometheus(&prometheus, dir.path(), metrics);
    wait_for(
        "Prometheus to hold job 42's power",
        deadline,
        &mut [&mut ergond, &mut prometheus],
        || (!query(prom, "ergon_job_power_watts{job_id=\"42\"}").is_empty()).then_some(()),
    );
    let instance = metrics.to_string();
    let chosen = BTreeMap::from([("instance", instance.as_str()), ("job_id", "42")]);
    for d in &boards {
        let exprs: Vec<String> =
            dashboards::evaluate(d, Api { addr: prom }, &chosen, &exported, deadline)
                .into_iter()
                .map(|(_, e)| e)
                .collect();
        println!("dashboards/{}: {} queries return data", d.file, exprs.len());
        for e in &exprs {
            println!("  {e}");
        }
        // The variables took this node's and this job's values.
        assert!(
            exprs
                .iter()
                .all(|e| e.contains(&format!("instance=\"{instance}\""))
                    || e.contains("job_id=\"42\"")),
            "{exprs:#?}"
        );
        prometheus.assert_running();
        ergond.assert_running();
    }
}
