//! ergond on an operator's bad day: the `ergond` binary on the fake NVML library, whose GPU
//! draws a square wave with a known time origin, so every figure has an exact ground truth.
//!
//! - ergond stopped (SIGSTOP) while a job ends: the job's end falls in a stretch the sampler
//!   did not run; its energy is within 1 % of the truth or flagged as an estimate whose stated
//!   bound covers the error — never a wrong figure with coverage 1.0 and no gap.
//! - ergond killed (-9) and restarted after the job ended: the plugin queued the job's end;
//!   ergond replays it and charges the job up to its real end, as an estimate with its bound.
//! - ergond down when a job starts: the queued start gives the job its GPUs; the part before
//!   ergond could measure is a gap, never a GPU energy of zero.

mod common;

use std::path::Path;
use std::time::Duration;

use common::profile::Profile;
use common::{start_node, wait_manifest, FakeNvml};
use ergon_protocol::{
    encode_frame, CgroupPath, CpuSet, GpuAlloc, JobEnd, JobIds, JobStart, Manifest, Reply, Request,
    StepId, StepStart, Timestamp,
};
use serde_json::json;

const NODE: &str = "node3";
/// 100 W for a second, then 500 W for a second.
const SQUARE: (f64, f64, f64) = (100.0, 500.0, 2.0);

fn square_gpu(uuid: &str) -> (FakeNvml, Profile) {
    let (low_w, high_w, period_s) = SQUARE;
    let profile = json!({"kind": "square", "low_w": low_w, "high_w": high_w, "period_s": period_s});
    let fake = FakeNvml::new(json!({"gpus": [{
        "uuid": uuid, "name": "Fake", "minor": 0,
        "profile": profile, "update_period_ms": 20.0,
    }]}));
    (fake, serde_json::from_value(profile).unwrap())
}

fn gpu0() -> Vec<GpuAlloc> {
    vec![GpuAlloc {
        index: 0,
        minor: Some(0),
        mig: None,
    }]
}

fn job_start(job_id: u32, time: Timestamp) -> Request {
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
        cluster: Some("c".into()),
        node: NODE.into(),
        gpus: gpu0(),
        cpus: CpuSet::new(),
        report: None,
        work_dir: None,
        stdout_path: None,
        time,
        sluid: None,
        node_list: None,
    })
}

fn job_end(job_id: u32, time: Timestamp) -> Request {
    Request::JobEnd(JobEnd {
        cluster: Some("c".into()),
        job_id,
        node: NODE.into(),
        time,
    })
}

/// An event as the plugin sends it: one frame on a fresh connection, 100 ms for everything.
fn plugin_send(socket: &Path, req: &Request) -> std::io::Result<Reply> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_write_timeout(Some(Duration::from_millis(100)))?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    ergon_protocol::write_frame(&mut s, req).map_err(std::io::Error::other)?;
    ergon_protocol::read_frame(&mut s).map_err(std::io::Error::other)
}

/// An event left in the queue directory as the plugin leaves one ergond could not take.
fn queue(dir: &Path, req: &Request, stamp: Timestamp) {
    use std::os::unix::fs::PermissionsExt;
    let q = dir.join("run/queue");
    std::fs::create_dir_all(&q).unwrap();
    std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o700)).unwrap();
    let name = format!("{:020}-{}-0.event", stamp.unix_ns, std::process::id());
    std::fs::write(q.join(name), encode_frame(req).unwrap()).unwrap();
}

/// Now on both clocks.
fn now() -> (Timestamp, u64) {
    (Timestamp::now(), ergond::clock::monotonic_ns())
}

/// The GPU energy is the truth within 1 %, or the manifest flags it as an estimate whose
/// bound covers the error. Returns whether it was flagged.
fn truthful(m: &Manifest, truth: f64) -> bool {
    let got = m.totals.gpu_j.expect("GPU energy measured");
    let err = (got - truth).abs();
    let flagged: Vec<_> = m
        .coverage
        .gaps
        .iter()
        .filter_map(|g| g.estimate.map(|e| (g, e)))
        .collect();
    println!(
        "GPU {got:.1} J, truth {truth:.1} J, error {err:.1} J ({:.2} %), estimates {:?}",
        err / truth * 100.0,
        flagged.iter().map(|(_, e)| e).collect::<Vec<_>>()
    );
    if flagged.is_empty() {
        assert!(
            err / truth < 0.01,
            "{err} J off and nothing says so: {:?}",
            m.coverage
        );
        return false;
    }
    let bound: f64 = flagged.iter().map(|(_, e)| e.bound_j).sum();
    assert!(
        err <= bound,
        "{err} J off, beyond the stated bound of {bound} J"
    );
    assert!(m.attribution.estimated, "an estimate is marked estimated");
    true
}

#[test]
fn a_stopped_ergond_flags_what_it_could_not_measure() {
    let (fake, profile) = square_gpu("GPU-00000000-0000-4000-8000-0000000000f3");
    let dir = tempfile::tempdir().unwrap();
    let mut e = start_node(dir.path(), &fake.lib, "", "ergond.log");
    let socket = dir.path().join("run/ergond.sock");
    fake.wait_for_start();
    std::thread::sleep(Duration::from_millis(300));
    let (t_start, m_start) = now();
    assert_eq!(
        plugin_send(&socket, &job_start(1, t_start)).unwrap(),
        Reply::Ok
    );
    std::thread::sleep(Duration::from_millis(1300));
    // ergond stops (a debugger, a frozen cgroup, a starved node) for 3 s; the job ends 0.7 s
    // into it. The plugin's event waits in the socket (the plugin gave up after 100 ms).
    let pid = nix::unistd::Pid::from_raw(e.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let (t_end, m_end) = now();
    assert!(
        plugin_send(&socket, &job_end(1, t_end)).is_err(),
        "ergond is stopped"
    );
    std::thread::sleep(Duration::from_millis(2300));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let m = wait_manifest(&dir.path().join(format!("spool/c-1-{NODE}.json")), &e);
    assert_eq!(m.end_unix_ns, t_end.unix_ns, "the event's own time");
    let truth = profile.energy_j(fake.t(m_start, 1.0), fake.t(m_end, 1.0));
    assert!(
        truthful(&m, truth),
        "the stretch is flagged: {:?}",
        m.coverage
    );
    let gap = m
        .coverage
        .gaps
        .iter()
        .find(|g| g.estimate.is_some())
        .unwrap();
    assert!(
        gap.reason.contains("did not run") && gap.end_unix_ns == t_end.unix_ns,
        "{gap:?}"
    );
    assert!(gap.start_unix_ns < t_end.unix_ns - 500_000_000, "{gap:?}");
    drop(e.child.kill());
}

#[test]
fn a_job_that_ends_while_ergond_is_down_is_charged_to_its_real_end() {
    let (fake, profile) = square_gpu("GPU-00000000-0000-4000-8000-0000000000f4");
    let dir = tempfile::tempdir().unwrap();
    let mut e = start_node(dir.path(), &fake.lib, "", "ergond.log");
    let socket = dir.path().join("run/ergond.sock");
    fake.wait_for_start();
    std::thread::sleep(Duration::from_millis(300));
    let (t_start, m_start) = now();
    assert_eq!(
        plugin_send(&socket, &job_start(2, t_start)).unwrap(),
        Reply::Ok
    );
    std::thread::sleep(Duration::from_millis(1500));
    // Killed (OOM, kill -9): the journal holds the job.
    e.child.kill().unwrap();
    e.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    // The job ends while ergond is down: the plugin queues its end.
    let (t_end, m_end) = now();
    queue(dir.path(), &job_end(2, t_end), t_end);
    std::thread::sleep(Duration::from_millis(1500));
    let e = start_node(dir.path(), &fake.lib, "", "ergond2.log");
    let m = wait_manifest(&dir.path().join(format!("spool/c-2-{NODE}.json")), &e);
    assert_eq!(
        m.end_unix_ns, t_end.unix_ns,
        "charged to its real end, not the restart"
    );
    let truth = profile.energy_j(fake.t(m_start, 1.0), fake.t(m_end, 1.0));
    assert!(
        truthful(&m, truth),
        "the outage is flagged: {:?}",
        m.coverage
    );
    let gap = m
        .coverage
        .gaps
        .iter()
        .find(|g| g.estimate.is_some())
        .unwrap();
    assert!(gap.reason.contains("ergond was not running"), "{gap:?}");
    assert_eq!(gap.end_unix_ns, t_end.unix_ns, "the gap ends with the job");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("run/queue"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "the replayed event is removed");
    assert!(e.log().contains("replayed events the plugin queued"));
}

#[test]
fn a_job_that_starts_while_ergond_is_down_keeps_its_gpus() {
    let (fake, profile) = square_gpu("GPU-00000000-0000-4000-8000-0000000000f5");
    let dir = tempfile::tempdir().unwrap();
    // The job starts before ergond ever ran: the plugin queued its start and its step.
    fake.wait_for_start();
    let (t_start, _) = now();
    queue(dir.path(), &job_start(3, t_start), t_start);
    let cg = "slurm/uid_1000/job_3/step_0";
    ergon_testkit::write_cgroup_v2_usage(&dir.path().join("cgroup"), cg, 0);
    let step = Request::StepStart(StepStart {
        cluster: Some("c".into()),
        job_id: 3,
        array_job_id: None,
        array_task_id: None,
        step: StepId::Numbered(0),
        uid: 1000,
        node: NODE.into(),
        cgroups: vec![CgroupPath {
            controller: String::new(),
            path: format!("/{cg}/user/task_0"),
        }],
        cpus: CpuSet::new(),
        pid: None,
        tasks: Some(1),
        time: Timestamp::from_unix_ns(t_start.unix_ns + 1_000_000),
        sluid: None,
        job_mem_mb: None,
    });
    queue(
        dir.path(),
        &step,
        Timestamp::from_unix_ns(t_start.unix_ns + 1_000_000),
    );
    std::thread::sleep(Duration::from_millis(1000));
    let e = start_node(dir.path(), &fake.lib, "", "ergond.log");
    let m_measured = ergond::clock::monotonic_ns();
    let socket = dir.path().join("run/ergond.sock");
    std::thread::sleep(Duration::from_millis(2000));
    let (t_end, m_end) = now();
    assert_eq!(plugin_send(&socket, &job_end(3, t_end)).unwrap(), Reply::Ok);
    let m = wait_manifest(&dir.path().join(format!("spool/c-3-{NODE}.json")), &e);
    assert_eq!(m.start_unix_ns, t_start.unix_ns, "the job's own start");
    assert_eq!(
        m.gpus.len(),
        1,
        "its GPU, from the queued start: {:?}",
        m.gpus
    );
    assert_eq!(m.coverage.gpus_unknown, None);
    let gap = m
        .coverage
        .gaps
        .iter()
        .find(|g| g.reason.contains("could not take the job's start"))
        .unwrap_or_else(|| panic!("{:?}", m.coverage));
    assert!(!gap.recovered && gap.start_unix_ns == t_start.unix_ns);
    let gpu_cov = m.coverage.components.unwrap().gpu.unwrap();
    assert!(gpu_cov > 0.4 && gpu_cov < 0.9, "{:?}", m.coverage);
    // What it has is the GPU's energy from about when ergond started measuring.
    let measured = profile.energy_j(fake.t(m_measured, 1.0), fake.t(m_end, 1.0));
    let got = m.totals.gpu_j.unwrap();
    assert!(
        got > 0.0 && got <= measured * 1.05 + 50.0,
        "{got} J, about {measured} J measured"
    );
}

/// Wait until `cond` holds (10 s at most).
fn wait_until(what: &str, e: &common::Ergond, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}, still not after 10 s:\n{}",
            e.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_or_read_only_spool_delays_manifests_and_loses_none() {
    if !ergon_testkit::needs_root(
        "a_full_or_read_only_spool_delays_manifests_and_loses_none",
        "mount a tmpfs spool and write the users' reports as another user",
    ) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let (fake, _) = square_gpu("GPU-00000000-0000-4000-8000-0000000000f6");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = ergon_testkit::Tmpfs::mount(&dir.path().join("spool"), "256k");
    // The users' working directory, where their reports go.
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The spool is full.
    let filler = dir.path().join("spool/filler");
    let _ = std::fs::write(&filler, vec![0u8; 300 * 1024]);
    let e = start_node(dir.path(), &fake.lib, "", "ergond.log");
    let socket = dir.path().join("run/ergond.sock");
    let metrics = || common::scrape_metrics(dir.path());
    let metric = |name: &str| common::metric(&metrics(), name);
    let ended = |job_id: u32| {
        let mut start = job_start(job_id, Timestamp::now());
        if let Request::JobStart(s) = &mut start {
            s.report = Some(ergon_protocol::ReportFormat::Text);
            s.work_dir = Some(work.display().to_string());
        }
        assert_eq!(plugin_send(&socket, &start).unwrap(), Reply::Ok);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            plugin_send(&socket, &job_end(job_id, Timestamp::now())).unwrap(),
            Reply::Ok
        );
    };
    for job in 10..13 {
        ended(job);
    }
    wait_until("three manifests waiting", &e, || {
        metric("ergon_manifests_pending") == 3.0
    });
    assert_eq!(metric("ergon_jobs_open"), 0.0, "no job is running");
    assert!(metric("ergon_spool_write_failures_total") >= 3.0);
    let manifest = |job: u32| dir.path().join(format!("spool/c-{job}-{NODE}.json"));
    assert!(!manifest(10).exists());
    // The users got their reports anyway, once each.
    let report = |job: u32| work.join(format!("ergon-{job}.{NODE}.txt"));
    wait_until("the reports", &e, || (10..13).all(|j| report(j).exists()));
    // One line when the spool started failing, not one per manifest or retry.
    let log = e.log();
    assert_eq!(
        log.matches("the spool takes no manifest").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("lost"), "nothing is lost:\n{log}");

    // Space comes back: the manifests are written without a restart.
    std::fs::remove_file(&filler).unwrap();
    wait_until("the manifests written", &e, || {
        (10..13).all(|j| manifest(j).exists())
    });
    wait_until("nothing pending", &e, || {
        metric("ergon_manifests_pending") == 0.0
    });
    assert!(e.log().contains("the spool takes manifests again"));

    // A read-only remount: the same, and a restart meanwhile loses nothing and adds nothing.
    spool.remount("ro");
    ended(14);
    wait_until("one manifest waiting", &e, || {
        metric("ergon_manifests_pending") == 1.0
    });
    wait_until("its report", &e, || report(14).exists());
    wait_until("the journal to hold its end", &e, || {
        ergond::jobs::journal::read(&dir.path().join("state"))
            .ok()
            .flatten()
            .is_some_and(|j| {
                j.jobs
                    .iter()
                    .any(|job| job.job_id == 14 && job.end.is_some())
            })
    });
    drop(e); // killed while the manifest waits
    spool.remount("rw");
    let e = start_node(dir.path(), &fake.lib, "", "ergond2.log");
    let m = wait_manifest(&manifest(14), &e);
    assert!(
        m.coverage.gaps.is_empty(),
        "no gap invented after the job's end: {:?}",
        m.coverage.gaps
    );
    std::thread::sleep(Duration::from_millis(500));
    for job in [10, 11, 12, 14] {
        let text = std::fs::read_to_string(report(job)).unwrap();
        assert_eq!(
            text.matches(&format!("job {job} ")).count(),
            1,
            "exactly one report for job {job}:\n{text}"
        );
    }
}

#[test]
fn a_driver_call_hanging_for_seconds_is_flagged_not_misstated() {
    let (low_w, high_w, period_s) = SQUARE;
    let profile_json =
        json!({"kind": "square", "low_w": low_w, "high_w": high_w, "period_s": period_s});
    // The GPU's reads block from 1.5 s to 4.5 s of scenario time.
    let fake = FakeNvml::new(json!({"gpus": [{
        "uuid": "GPU-00000000-0000-4000-8000-0000000000f7", "name": "Fake", "minor": 0,
        "profile": profile_json, "update_period_ms": 20.0,
        "hang": {"at_s": 1.5, "for_s": 3.0},
    }]}));
    let profile: Profile = serde_json::from_value(profile_json).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = start_node(dir.path(), &fake.lib, "", "ergond.log");
    let socket = dir.path().join("run/ergond.sock");
    fake.wait_for_start();
    std::thread::sleep(Duration::from_millis(500));
    let (t_start, m_start) = now();
    assert_eq!(
        plugin_send(&socket, &job_start(5, t_start)).unwrap(),
        Reply::Ok
    );
    // The job ends 1.2 s into the hang; ergond answers at once (its socket does not wait for
    // the sampler).
    std::thread::sleep(Duration::from_millis(2200));
    let (t_end, m_end) = now();
    assert_eq!(plugin_send(&socket, &job_end(5, t_end)).unwrap(), Reply::Ok);
    let m = wait_manifest(&dir.path().join(format!("spool/c-5-{NODE}.json")), &e);
    let truth = profile.energy_j(fake.t(m_start, 1.0), fake.t(m_end, 1.0));
    assert!(truthful(&m, truth), "the hang is flagged: {:?}", m.coverage);
}

/// `spool_layout = "sharded"`: the manifest goes to `<spool>/<end day>/<node>/<name>.json.gz`,
/// also for a job that ended while ergond was killed (written after the restart from the
/// journal and the plugin's queued event); nothing is written flat.
#[test]
fn the_sharded_layout_writes_under_day_and_node_also_after_kill_9() {
    use std::io::Read as _;
    let (fake, _) = square_gpu("GPU-00000000-0000-4000-8000-0000000000f9");
    let dir = tempfile::tempdir().unwrap();
    let extra = "spool_layout = \"sharded\"\n";
    let mut e = start_node(dir.path(), &fake.lib, extra, "ergond.log");
    let socket = dir.path().join("run/ergond.sock");
    fake.wait_for_start();
    let read = |job: u32, end_ns: u64, e: &common::Ergond| -> Manifest {
        let path = dir
            .path()
            .join("spool")
            .join(ergond::jobs::spool::day(end_ns))
            .join(NODE)
            .join(format!("c-{job}-{NODE}.json.gz"));
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !path.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no manifest {}:\n{}",
                path.display(),
                e.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
            .read_to_end(&mut json)
            .unwrap();
        Manifest::from_json(&json).expect("a valid, sealed manifest")
    };

    let (t1, _) = now();
    assert_eq!(plugin_send(&socket, &job_start(1, t1)).unwrap(), Reply::Ok);
    std::thread::sleep(Duration::from_millis(300));
    let (t1_end, _) = now();
    assert_eq!(
        plugin_send(&socket, &job_end(1, t1_end)).unwrap(),
        Reply::Ok
    );
    let m = read(1, t1_end.unix_ns, &e);
    assert_eq!(m.end_unix_ns, t1_end.unix_ns);

    // Job 2 starts, ergond is killed, the job ends meanwhile (the plugin queues the event).
    let (t2, _) = now();
    assert_eq!(plugin_send(&socket, &job_start(2, t2)).unwrap(), Reply::Ok);
    std::thread::sleep(Duration::from_millis(300));
    e.child.kill().unwrap();
    e.child.wait().unwrap();
    let (t2_end, _) = now();
    queue(dir.path(), &job_end(2, t2_end), t2_end);
    let e = start_node(dir.path(), &fake.lib, extra, "ergond-2.log");
    let m = read(2, t2_end.unix_ns, &e);
    assert_eq!(m.end_unix_ns, t2_end.unix_ns, "the queued event's own time");
    let flat: Vec<_> = std::fs::read_dir(dir.path().join("spool"))
        .unwrap()
        .filter_map(|d| d.ok())
        .filter(|d| d.file_type().is_ok_and(|t| t.is_file()))
        .map(|d| d.file_name())
        .collect();
    assert!(flat.is_empty(), "files written flat: {flat:?}");
}
