//! GPU efficiency per job, end to end: the `ergond` binary on the fake NVML library with
//! scripted utilisation, memory, temperature, clocks, throttle counters, ECC counts and Xid
//! events, and a job sent over its socket as the plugin does.
//!
//! - `every_figure_follows_the_script_and_an_omitted_query_is_not_reported`: a busy GPU whose
//!   every query is scripted (memory, temperature and ECC step up during the job, a Xid before
//!   the job and one during it), an idle GPU that reports utilisation only, and a third GPU the
//!   job does not hold (its Xid is not the job's): each figure of the manifest against the
//!   script, "not reported" (`null`) for every query the idle GPU's script omits, the idle
//!   rule with `[report] idle_gpu_util_percent`, and the user's report naming the idle GPU and
//!   its energy.
//! - `the_figures_survive_a_kill_9`: ergond is SIGKILLed mid-job and restarted: the counters
//!   (throttle time, ECC) still span the whole job, the averages keep the part before the kill,
//!   and the samples say they cover only part of the job.

mod common;

use common::{start_node, wait_manifest, Ergond, FakeNvml};
use ergon_protocol::{
    CpuSet, GpuAlloc, JobEnd, JobIds, JobStart, Manifest, Reply, Request, Timestamp,
};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const NODE: &str = "node1";
const CLUSTER: &str = "effcl";

/// GPU 0 (minor 0): busy, every query scripted; GPU 1 (minor 1): idle, utilisation only;
/// GPU 2 (minor 2): not the job's, with a Xid during the job. The job runs over scenario time
/// [`JOB_START_S`, `JOB_END_S`]; memory, temperature and corrected ECC errors step up at 5 s.
fn scenario() -> serde_json::Value {
    json!({"gpus": [
        {"uuid": "GPU-e0000000-0000-0000-0000-000000000000", "minor": 0,
         "profile": {"kind": "constant", "watts": 300.0}, "update_period_ms": 20.0,
         "utilization": 80, "memory_used_bytes": [[0, 1.0e9], [5.0, 4.0e9]],
         "temperature_c": [[0, 50], [5.0, 71]], "sm_clock_mhz": 1410, "mem_clock_mhz": 1593,
         "throttle": {"power_cap": 0.5, "sw_thermal": 0.0, "hw_thermal": 0.25},
         "ecc": {"corrected": [[0, 10], [5.0, 13]], "uncorrected": 0},
         "xids": [{"at_s": 0.5, "xid": 13}, {"at_s": 5.5, "xid": 79}]},
        {"uuid": "GPU-e1111111-1111-1111-1111-111111111111", "minor": 1,
         "profile": {"kind": "constant", "watts": 60.0}, "update_period_ms": 20.0,
         "utilization": 1},
        {"uuid": "GPU-e2222222-2222-2222-2222-222222222222", "minor": 2,
         "profile": {"kind": "constant", "watts": 100.0}, "update_period_ms": 20.0,
         "utilization": 50, "xids": [{"at_s": 5.5, "xid": 48}]}
    ]})
}

const JOB_START_S: f64 = 4.0;
const JOB_END_S: f64 = 7.0;

fn send(socket: &Path, req: Request) {
    let r = common::try_request(socket, &req).unwrap_or_else(|e| panic!("{req:?}: {e}"));
    assert_eq!(r, Reply::Ok, "{req:?}");
}

fn job_start(job_id: u32) -> Request {
    Request::JobStart(JobStart {
        ids: JobIds {
            job_id,
            array_job_id: None,
            array_task_id: None,
        },
        uid: 1000,
        gid: 1000,
        user: "alice".into(),
        account: None,
        partition: None,
        cluster: Some(CLUSTER.into()),
        node: NODE.into(),
        gpus: (0..2)
            .map(|i| GpuAlloc {
                index: i,
                minor: Some(i),
                mig: None,
            })
            .collect(),
        cpus: CpuSet::new(),
        report: None,
        work_dir: None,
        stdout_path: None,
        time: Timestamp::now(),
        sluid: None,
        node_list: None,
    })
}

fn job_end(job_id: u32) -> Request {
    Request::JobEnd(JobEnd {
        cluster: None,
        job_id,
        node: NODE.into(),
        time: Timestamp::now(),
    })
}

/// Sleep until scenario time `s`; panics if it has passed (ergond took too long to start).
fn until(fake: &FakeNvml, s: f64, what: &str) {
    let at = fake.start_ns + (s * 1e9) as u64;
    let now = ergond::clock::monotonic_ns();
    assert!(now < at, "{what}: scenario time {s} s already passed");
    std::thread::sleep(Duration::from_nanos(at - now));
}

fn manifest(dir: &Path, job: u32, e: &Ergond) -> Manifest {
    wait_manifest(&dir.join(format!("spool/{CLUSTER}-{job}-{NODE}.json")), e)
}

fn close(got: Option<f64>, want: f64, tol: f64, what: &str) {
    let g = got.unwrap_or_else(|| panic!("{what}: not reported"));
    assert!((g - want).abs() <= tol, "{what}: {g}, want {want} ± {tol}");
}

#[test]
fn every_figure_follows_the_script_and_an_omitted_query_is_not_reported() {
    let fake = FakeNvml::new(scenario());
    let dir = tempfile::tempdir().unwrap();
    let e = start_node(
        dir.path(),
        &fake.lib,
        "[report]\nidle_gpu_util_percent = 2.5\n",
        "ergond.log",
    );
    let socket = dir.path().join("run/ergond.sock");
    until(&fake, JOB_START_S, "job start");
    send(&socket, job_start(42));
    until(&fake, JOB_END_S, "job end");
    send(&socket, job_end(42));
    let m = manifest(dir.path(), 42, &e);
    println!("{}", String::from_utf8_lossy(&m.to_json().unwrap()));
    assert_eq!(
        m.schema_version,
        ergon_protocol::MANIFEST_SCHEMA_VERSION_EFFICIENCY
    );
    assert_eq!(m.gpus.len(), 2, "only the job's GPUs");
    let dur = m.duration_s;

    let busy = m.gpus[0].efficiency.as_ref().expect("GPU 0 sampled");
    close(busy.sm_util_avg_pct, 80.0, 0.01, "SM utilisation");
    assert_eq!(busy.idle, Some(false));
    assert_eq!(busy.idle_threshold_pct, 2.5, "from [report]");
    assert_eq!(
        busy.memory_used_max_bytes,
        Some(4_000_000_000),
        "the step during the job"
    );
    assert_eq!(busy.temperature_max_c, Some(71));
    close(busy.sm_clock_avg_mhz, 1410.0, 0.01, "SM clock");
    close(busy.mem_clock_avg_mhz, 1593.0, 0.01, "memory clock");
    close(
        busy.throttle_s.power_cap,
        0.5 * dur,
        0.12,
        "power cap throttle",
    );
    close(
        busy.throttle_s.hw_thermal,
        0.25 * dur,
        0.12,
        "hw thermal throttle",
    );
    assert_eq!(busy.throttle_s.sw_thermal, Some(0.0), "reported, and zero");
    assert_eq!(
        busy.throttle_s.hw_power_brake, None,
        "not scripted: not reported"
    );
    assert_eq!(busy.ecc_corrected, Some(3), "13 - 10 during the job");
    assert_eq!(busy.ecc_uncorrected, Some(0));
    assert_eq!(busy.xid_count, Some(1), "the Xid before the job is not its");
    let xids = busy.xids.as_ref().unwrap();
    assert_eq!(xids[0].xid, 79);
    assert!(
        (m.start_unix_ns..=m.end_unix_ns).contains(&xids[0].at_unix_ns),
        "Xid stamped within the job"
    );
    close(Some(busy.sampled_s), dur, 0.3, "sampled time");
    assert!(!busy.partial);

    let idle = m.gpus[1].efficiency.as_ref().expect("GPU 1 sampled");
    close(idle.sm_util_avg_pct, 1.0, 0.01, "idle GPU's utilisation");
    assert_eq!(idle.idle, Some(true));
    assert_eq!(
        (
            idle.memory_used_max_bytes,
            idle.temperature_max_c,
            idle.sm_clock_avg_mhz,
            idle.mem_clock_avg_mhz
        ),
        (None, None, None, None),
        "not reported, never 0"
    );
    assert_eq!(idle.throttle_s.total(), None);
    assert_eq!((idle.ecc_corrected, idle.ecc_uncorrected), (None, None));
    assert_eq!((idle.xid_count, idle.xids.as_ref()), (None, None));

    let idle_j = m.gpus[1].energy_j.unwrap();
    assert!(
        (idle_j - 60.0 * dur).abs() < 0.01 * 60.0 * dur,
        "{idle_j} J"
    );
    assert_eq!(m.idle_gpu_j(), Some(idle_j));
    let report = ergond::jobs::report::render_text(&m, None, &Default::default());
    println!("{report}");
    let line = format!(
        "Idle GPUs  gpu1: 1 % average SM utilisation, {} spent idle",
        ergon_protocol::format::energy(idle_j)
    );
    assert!(report.contains(&line), "{line:?} missing from\n{report}");
    assert!(
        report.contains("went to allocated GPUs that sat idle"),
        "{report}"
    );
    for want in [
        "1 Xid event(s): 79",
        "(average SM utilisation below 2.5 %)",
        "average SM utilisation 1 %; not reported: memory used, temperature, SM clock, memory clock",
        "throttling not reported",
        "ECC errors not reported; Xid events not reported",
    ] {
        assert!(report.contains(want), "{want:?} missing from\n{report}");
    }
    drop(e);
}

#[test]
fn the_figures_survive_a_kill_9() {
    let fake = FakeNvml::new(scenario());
    let dir = tempfile::tempdir().unwrap();
    let mut e = start_node(dir.path(), &fake.lib, "", "ergond-1.log");
    let socket = dir.path().join("run/ergond.sock");
    until(&fake, JOB_START_S, "job start");
    send(&socket, job_start(7));
    // Let the journal take the job and a few intervals of statistics.
    let journal = dir.path().join("state/jobs.journal");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&journal).map_or(true, |m| m.len() < 100) {
        assert!(Instant::now() < deadline, "no journal:\n{}", e.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(400));
    e.child.kill().unwrap(); // SIGKILL
    e.child.wait().unwrap();
    // Down over the 5 s steps and the Xid: the driver's counters still see them.
    std::thread::sleep(Duration::from_millis(2500));
    let e2 = start_node(dir.path(), &fake.lib, "", "ergond-2.log");
    std::thread::sleep(Duration::from_millis(1000));
    send(&socket, job_end(7));
    let m = manifest(dir.path(), 7, &e2);
    println!("{}", String::from_utf8_lossy(&m.to_json().unwrap()));
    let dur = m.duration_s;
    let busy = m.gpus[0].efficiency.as_ref().expect("GPU 0 sampled");
    close(
        busy.throttle_s.power_cap,
        0.5 * dur,
        0.15,
        "power cap over the whole job",
    );
    assert_eq!(
        busy.ecc_corrected,
        Some(3),
        "the step while ergond was down"
    );
    close(busy.sm_util_avg_pct, 80.0, 0.01, "SM utilisation");
    assert!(
        busy.sampled_s < dur - 2.0,
        "{} s sampled of {dur} s",
        busy.sampled_s
    );
    assert!(busy.partial, "the samples say they miss the outage");
    assert!(e2.log().contains("restored the open jobs"), "{}", e2.log());
    drop(e);
}
