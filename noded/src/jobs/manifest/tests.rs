//! Manifests built from a registry, an attributor and traces.

use super::*;
use crate::attribution::AttributionConfig;
use crate::jobs::attributor::{Attributor, JobResult};
use crate::jobs::reading::Reading;
use crate::jobs::registry::{EventTime, Job, JobRegistry};
use crate::sampler::TraceSample;
use crate::sources::rapl::{RaplDomain, ZoneKey};
use ergon_protocol::{
    CpuSet, EnergyMethod, GpuAlloc, JobEnd, JobIds, JobStart, Manifest, SensorInfo, SensorKind,
    StepId, StepStart, Timestamp,
};

fn facts() -> NodeFacts {
    let gpu = |index, minor| GpuFact {
        index,
        uuid: format!("GPU-{index}"),
        minor: Some(minor),
        pci_bus_id: None,
        method: EnergyMethod::Counter,
        mig: None,
    };
    NodeFacts {
        gpus: vec![gpu(0, 7), gpu(1, 5), gpu(2, 3)],
        zones: vec![
            ZoneKey {
                socket: Some(0),
                die: None,
                domain: RaplDomain::Package,
            },
            ZoneKey {
                socket: Some(0),
                die: None,
                domain: RaplDomain::Core,
            },
            ZoneKey {
                socket: Some(0),
                die: None,
                domain: RaplDomain::Dram,
            },
        ],
        sensors: vec![SensorInfo {
            kind: SensorKind::Nvml,
            version: "550".into(),
            detail: "3 GPUs".into(),
        }],
        sockets: vec![(0, CpuSet::parse("0-3").unwrap())],
        memory_mib: None,
    }
}

fn at(s: u64) -> EventTime {
    EventTime {
        unix_ns: 1_000_000_000_000 + s * 1_000_000_000,
        mono_ns: s * 1_000_000_000,
    }
}

/// GPU i draws (i+1)*100 W; package 50 W, core 30 W, DRAM 10 W.
fn reading(s: u64) -> Reading {
    let t = s as f64;
    Reading {
        at_mono_ns: s * 1_000_000_000,
        gpus: (0..3).map(|i| Some((i + 1) as f64 * 100.0 * t)).collect(),
        zones: vec![Some(50.0 * t), Some(30.0 * t), Some(10.0 * t)],
        cgroups: vec![("job/step_0".into(), s * 2_000_000_000)],
        sockets: vec![],
        gpu_util: vec![],
        gpu_stats: vec![],
        across: None,
        meter: None,
    }
}

fn traces() -> Vec<Vec<TraceSample>> {
    (0..3)
        .map(|i| {
            (0..=100)
                .map(|k| TraceSample {
                    at_ns: k * 100_000_000,
                    energy_j: (i + 1) as f64 * 10.0 * k as f64,
                    power_w: Some((i + 1) as f32 * 100.0),
                })
                .collect()
        })
        .collect()
}

fn ended_job(gpus: Vec<GpuAlloc>) -> Job {
    let mut r = JobRegistry::default();
    let start = JobStart {
        ids: JobIds {
            job_id: 42,
            array_job_id: None,
            array_task_id: None,
        },
        uid: 1000,
        gid: 1000,
        user: "alice".into(),
        account: None,
        partition: None,
        cluster: None,
        node: "n1".into(),
        gpus,
        cpus: CpuSet::new(),
        report: None,
        work_dir: None,
        stdout_path: None,
        time: Timestamp::default(),
        sluid: None,
        node_list: None,
    };
    r.job_start(&start, at(1)).unwrap();
    let step = StepStart {
        cluster: None,
        job_id: 42,
        array_job_id: None,
        array_task_id: None,
        step: StepId::Numbered(0),
        uid: 1000,
        node: "n1".into(),
        cgroups: vec![ergon_protocol::CgroupPath {
            controller: String::new(),
            path: "/job/step_0/user/task_0".into(),
        }],
        cpus: CpuSet::new(),
        pid: None,
        tasks: None,
        time: Timestamp::default(),
        sluid: None,
        job_mem_mb: None,
    };
    r.step_start(&step, at(2)).unwrap();
    let end = JobEnd {
        cluster: None,
        job_id: 42,
        node: "n1".into(),
        time: Timestamp::default(),
    };
    r.job_end(&end, at(5)).unwrap();
    r.take(42).unwrap()
}

/// The attributor's result for job 42 of [`ended_job`] holding the GPUs at snapshot
/// positions `gpus` (on CPUs 0-1 from 1 s to 5 s, its step's cgroup from 2 s), the node
/// read every second as [`reading`] gives it; `edit` may change each reading first.
fn attributed(gpus: Vec<usize>, edit: impl Fn(u64, &mut Reading)) -> JobResult {
    let r = |s: u64| {
        let mut x = reading(s);
        x.cgroups = vec![("job/step_0".into(), s.saturating_sub(2) * 1_000_000_000)];
        x.sockets = vec![(0, s * 2_000_000_000, s * 4_000_000_000)];
        edit(s, &mut x);
        x
    };
    let mut att = Attributor::new(&facts(), AttributionConfig::default());
    att.advance(&r(1));
    att.job_start(42, gpus, CpuSet::parse("0-1").unwrap());
    att.advance(&r(2));
    att.step_start(42, StepId::Numbered(0), Some("job/step_0"), Some(0));
    for s in 3..=5 {
        att.advance(&r(s));
    }
    att.job_end(42).unwrap()
}

#[test]
fn a_sampling_hole_in_the_job_is_a_recovered_gap_that_keeps_its_coverage() {
    let job = ended_job(vec![GpuAlloc {
        index: 0,
        minor: Some(3),
        mig: None,
    }]);
    // The job runs from 1 s to 5 s; the sampler stopped from 2 s to 3.5 s, and once
    // before the job (not its gap).
    let holes = [(100_000_000, 400_000_000), (2_000_000_000, 3_500_000_000)];
    let res = attributed(vec![2], |_, _| {});
    let m = build(&job, &facts(), &traces(), Some(&res), "cl", &holes);
    assert_eq!(m.coverage.gaps.len(), 1, "{:?}", m.coverage.gaps);
    let g = &m.coverage.gaps[0];
    assert!(g.recovered && g.estimate.is_none());
    assert_eq!(
        (g.start_unix_ns, g.end_unix_ns),
        (at(2).unix_ns, at(2).unix_ns + 1_500_000_000)
    );
    assert_eq!(m.coverage.components.unwrap().gpu, Some(1.0));
}

#[test]
fn attributed_job_carries_its_socket_share_and_a_balanced_node_context() {
    let job = ended_job(vec![GpuAlloc {
        index: 0,
        minor: Some(3),
        mig: None,
    }]);
    // 4 CPUs, half busy; the job's step (from t = 2 s) uses 1 CPU-s per second.
    let res = attributed(vec![2], |_, _| {});
    let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    // GPU minor 3 (300 W) × 4 s.
    assert!(close(m.totals.gpu_j.unwrap(), 1200.0));
    // Package 50 W, half active: the job's 1 of 2 busy CPU-s per second from 2 s gives it
    // 12.5 W × 3 s; half idle: its 2 of 4 CPUs give it 12.5 W × 4 s. 87.5 J in all.
    // DRAM (10 W) the same way: 2.5 W × 3 s + 2.5 W × 4 s = 17.5 J.
    assert_eq!(m.sockets.len(), 1);
    assert!(close(m.sockets[0].package_j, 87.5), "{:?}", m.sockets);
    assert!(close(m.sockets[0].dram_j.unwrap(), 17.5));
    assert!(close(m.totals.cpu_j.unwrap(), 87.5));
    assert!(close(m.totals.energy_j, 1305.0));
    // Node: 2640 J measured = this job 1305 + idle 60 (the unallocated CPUs' idle part)
    // + unattributed 1275 (the other GPUs 1200, busy CPU time outside jobs 75).
    let n = &m.node_context;
    assert!(close(n.node_energy_j, 2640.0));
    assert!(close(n.idle_j, 60.0), "{n:?}");
    assert!(close(n.unattributed_j, 1275.0), "{n:?}");
    assert!(close(
        m.totals.energy_j + n.idle_j + n.unattributed_j,
        n.node_energy_j
    ));
    assert_eq!(m.attribution.model, crate::attribution::MODEL_NAME);
    assert!(!m.attribution.estimated);
    // The step (from 2 s) gets the job's energy over its own 3 s.
    assert!(close(m.steps[0].gpu_j.unwrap(), 900.0));
    assert!(close(m.steps[0].cpu_j.unwrap(), 75.0), "{:?}", m.steps[0]);
    // Trace: the job's package share, 12.5 W in its first second, 25 W after.
    let sock = m.trace.series.iter().find(|s| s.name == "socket0").unwrap();
    assert_eq!(sock.watts.len(), 40);
    assert!(
        sock.watts[..10].iter().all(|&w| (w - 12.5).abs() < 0.01),
        "{sock:?}"
    );
    assert!(
        sock.watts[10..].iter().all(|&w| (w - 25.0).abs() < 0.01),
        "{sock:?}"
    );
    assert!(m.trace.series.iter().any(|s| s.name == "dram0"));
}

#[test]
fn a_gpu_that_could_not_be_read_has_no_energy_not_zero() {
    let job = ended_job(vec![
        GpuAlloc {
            index: 0,
            minor: Some(3),
            mig: None,
        },
        GpuAlloc {
            index: 1,
            minor: Some(5),
            mig: None,
        },
    ]);
    // NVML position 2 (minor 3) is lost at 4 s: never read again.
    let res = attributed(vec![2, 1], |s, x| {
        if s >= 4 {
            x.gpus[2] = None;
        }
    });
    let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
    let lost = m.gpus.iter().find(|g| g.uuid == "GPU-2").unwrap();
    // Measured until it was lost (300 W for 2 s), and the job's GPU coverage says the rest
    // is not: 1 of 2 GPUs covered 2 of 4 s.
    assert_eq!(lost.energy_j, Some(600.0));
    assert_eq!(m.totals.gpu_j, Some(1400.0));
    assert_eq!(m.coverage.components.unwrap().gpu, Some(0.75));
    assert_eq!(m.coverage.fraction, 0.75);
    assert!(m.attribution.estimated);
    assert!(
        m.sensors[0].detail.contains("was not read for 2.0 s"),
        "{:?}",
        m.sensors
    );
    // A GPU never read has no energy: null, never 0.
    let res = attributed(vec![2, 1], |_, x| x.gpus[2] = None);
    let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
    let unread = m.gpus.iter().find(|g| g.uuid == "GPU-2").unwrap();
    assert_eq!((unread.energy_j, unread.avg_w), (None, None));
    assert_eq!(unread.method, EnergyMethod::Estimated);
    // The total counts what was measured, and says nothing about the unread GPU.
    assert_eq!(m.totals.gpu_j, Some(800.0));
    assert_eq!(m.coverage.components.unwrap().gpu, Some(0.5));
}

#[test]
fn allocated_gpus_matched_by_minor_get_their_whole_energy() {
    let job = ended_job(vec![
        GpuAlloc {
            index: 0,
            minor: Some(3),
            mig: None,
        },
        GpuAlloc {
            index: 1,
            minor: Some(5),
            mig: None,
        },
    ]);
    let res = attributed(vec![2, 1], |_, _| {});
    let mut m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
    assert_eq!(m.gpus.len(), 2);
    // minor 3 is NVML position 2 (300 W), minor 5 position 1 (200 W); 4 s.
    assert_eq!(
        (m.gpus[0].uuid.as_str(), m.gpus[0].energy_j),
        ("GPU-2", Some(1200.0))
    );
    assert_eq!(
        (m.gpus[1].uuid.as_str(), m.gpus[1].energy_j),
        ("GPU-1", Some(800.0))
    );
    assert_eq!(m.gpus[0].avg_w, Some(300.0));
    assert_eq!(m.gpus[0].peak_w, Some(300.0));
    assert_eq!(m.totals.gpu_j, Some(2000.0));
    assert_eq!(m.duration_s, 4.0);
    let c = m.coverage.components.unwrap();
    assert_eq!((c.gpu, c.cpu, c.dram), (Some(1.0), Some(1.0), Some(1.0)));
    assert_eq!(m.coverage.fraction, 1.0);
    assert!(m.coverage.gaps.is_empty());
    assert_eq!(
        m.schema_version,
        ergon_protocol::MANIFEST_SCHEMA_VERSION_COVERAGE
    );
    assert_eq!(m.cluster, "cl");
    // Node: 600 W GPUs + 50 W package + 10 W DRAM (core is inside package), 4 s.
    assert_eq!(m.node_context.node_energy_j, 2640.0);
    // Step 0 from 2 s to the job's end (no StepEnd): 3 s × 500 W.
    assert_eq!(m.steps[0].gpu_j, Some(1500.0));
    assert_eq!(m.attribution.model, crate::attribution::MODEL_NAME);
    // Trace: 100 ms bins over 4 s, constant power.
    assert_eq!(m.trace.interval_ms, 100);
    assert_eq!(m.trace.series[0].name, "gpu0");
    assert_eq!(m.trace.series[0].watts.len(), 40);
    assert!(m.trace.series[0]
        .watts
        .iter()
        .all(|&w| (w - 300.0).abs() < 0.01));
    // Peak: both GPUs (500 W) and the job's CPU share once its step runs (25 W package,
    // 5 W DRAM).
    assert!(
        (m.totals.peak_w - 530.0).abs() < 0.01,
        "{}",
        m.totals.peak_w
    );
    m.seal();
    let back = Manifest::from_json(&m.to_json().unwrap()).unwrap();
    assert_eq!(back, m);
}

#[test]
fn index_fallback_and_unmatched_gpus_are_marked_estimated() {
    let job = ended_job(vec![
        GpuAlloc {
            index: 0,
            minor: None,
            mig: None,
        },
        GpuAlloc {
            index: 1,
            minor: Some(99),
            mig: None,
        },
    ]);
    let res = attributed(vec![0], |_, _| {});
    let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
    assert_eq!(m.gpus.len(), 1);
    assert_eq!(m.gpus[0].uuid, "GPU-0");
    // The GPU that matches nothing is not covered.
    assert_eq!(m.coverage.components.unwrap().gpu, Some(0.5));
    assert!(m.attribution.estimated);
    let nvml = &m.sensors[0].detail;
    assert!(
        nvml.contains("matched by index") && nvml.contains("matches no NVML device"),
        "{nvml}"
    );
}

#[test]
fn unseen_start_gives_zero_coverage_and_a_gap() {
    let mut job = ended_job(vec![GpuAlloc {
        index: 0,
        minor: Some(3),
        mig: None,
    }]);
    job.start_seen = false;
    let res = attributed(vec![], |_, _| {});
    let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
    assert_eq!(m.coverage.fraction, 0.0);
    assert_eq!(m.coverage.gaps.len(), 1);
    assert!(m.gpus.is_empty());
    assert_eq!(m.totals.gpu_j, None);
    assert!(m.to_json().is_ok());
}

#[test]
fn a_job_the_attributor_never_had_has_no_figures_and_says_so() {
    let job = ended_job(vec![GpuAlloc {
        index: 0,
        minor: Some(3),
        mig: None,
    }]);
    let m = build(&job, &facts(), &traces(), None, "cl", &[]);
    assert_eq!((m.totals.gpu_j, m.totals.cpu_j), (None, None));
    assert_eq!(m.gpus[0].energy_j, None);
    assert_eq!(m.coverage.fraction, 0.0);
    assert!(m.coverage.gaps[0].reason.contains("no figures"));
    assert_eq!(m.attribution.model, UNATTRIBUTED_MODEL);
}

#[test]
fn match_gpus_prefers_minor() {
    let f = facts().gpus;
    let got = match_gpus(
        &[
            GpuAlloc {
                index: 2,
                minor: Some(7),
                mig: None,
            },
            GpuAlloc {
                index: 2,
                minor: None,
                mig: None,
            },
        ],
        &f,
    );
    assert_eq!(got[0].1, Some((0, MatchedBy::Minor)));
    assert_eq!(got[1].1, Some((2, MatchedBy::Index)));
}
