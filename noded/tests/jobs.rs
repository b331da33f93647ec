//! Job tracking end to end: the `ergond` binary runs on the fake NVML library (four GPUs at
//! constant, known power; device minors differ from NVML indices) and a generated powercap
//! tree, and this test talks to its socket with a real `UnixStream` the way the SPANK plugin
//! does (one request, one reply).
//!
//! - A job on 2 of the 4 GPUs (allocated by minor) with one step: its manifest appears in the
//!   spool, verifies, charges the two allocated GPUs within 0.5% of power × interval and does
//!   not mention the other two; the step's GPU energy matches its own interval.
//! - A job end for a job ergond never saw start still gives a manifest, with coverage 0 and a
//!   gap.
//! - A client running as another uid (a forked child that `setuid`s) is refused job events and
//!   may query only its own job.
//! - Several requests on one connection are answered in order; 300 idle connections and a
//!   flood of reopened ones never keep a plugin-like event (100 ms deadline) out: the oldest
//!   idle ones are closed to make room.
//! - 10,000 random or truncated frames leave the daemon serving (a Ping gets Pong) and its RSS
//!   roughly flat.

mod common;

use common::{rel_err, try_request, Ergond, FakeNvml};
use ergon_protocol::{
    encode_frame, read_frame, write_frame, CgroupPath, CpuSet, ErrorCode, GpuAlloc, JobEnd, JobIds,
    JobStart, Manifest, Reply, Request, StepEnd, StepId, StepStart, Timestamp, MAX_FRAME_LEN,
};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// (uuid, minor, watts) of NVML devices 0..4.
const GPUS: [(&str, u32, f64); 4] = [
    ("GPU-00000000-0000-0000-0000-000000000000", 7, 100.0),
    ("GPU-11111111-1111-1111-1111-111111111111", 5, 200.0),
    ("GPU-22222222-2222-2222-2222-222222222222", 3, 300.0),
    ("GPU-33333333-3333-3333-3333-333333333333", 1, 400.0),
];
const CLUSTER: &str = "testcl";
const NODE: &str = "node1";
const NOBODY: u32 = 65534;

fn start_ergond(dir: &Path, nvml: &Path) -> (Ergond, PathBuf, PathBuf) {
    start_ergond_with(dir, nvml, "")
}

fn start_ergond_with(dir: &Path, nvml: &Path, extra: &str) -> (Ergond, PathBuf, PathBuf) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = common::write_node(
        dir,
        nvml,
        &format!("127.0.0.1:{port}"),
        "slurm/job_42/step_0",
        1_000_000,
        &format!("socket_mode = 0o666\n{extra}"),
    );
    let socket = dir.join("run/ergond.sock");
    let spool = dir.join("spool");
    let log = dir.join("ergond.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ergond"))
        .args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut ergond = Ergond { child, log };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Reply::Pong) = try_request(&socket, &Request::Ping) {
            break;
        }
        if let Some(s) = ergond.child.try_wait().unwrap() {
            panic!("ergond exited ({s}):\n{}", ergond.log());
        }
        assert!(
            Instant::now() < deadline,
            "ergond's socket never answered:\n{}",
            ergond.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (ergond, socket, spool)
}

/// One request on a fresh connection with one deadline for the whole exchange, as the SPANK
/// plugin sends its events.
fn plugin_request(socket: &Path, req: &Request, deadline: Duration) -> std::io::Result<Reply> {
    let t0 = Instant::now();
    let mut s = UnixStream::connect(socket)?;
    s.set_write_timeout(Some(deadline))?;
    write_frame(&mut s, req).map_err(std::io::Error::other)?;
    let left = deadline
        .saturating_sub(t0.elapsed())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))?;
    read_frame(&mut s).map_err(std::io::Error::other)
}

/// One request, one reply, as the plugin does; returns the reply and how long it took.
fn request(socket: &Path, req: &Request) -> (Reply, Duration) {
    let t0 = Instant::now();
    let reply = try_request(socket, req).unwrap_or_else(|e| panic!("{req:?}: {e}"));
    (reply, t0.elapsed())
}

fn job_start(job_id: u32, uid: u32, gpus: Vec<GpuAlloc>) -> JobStart {
    JobStart {
        ids: JobIds {
            job_id,
            array_job_id: None,
            array_task_id: None,
        },
        uid,
        gid: uid,
        user: "alice".into(),
        account: Some("proj".into()),
        partition: Some("gpu".into()),
        cluster: Some(CLUSTER.into()),
        node: NODE.into(),
        gpus,
        cpus: CpuSet::new(),
        report: None,
        work_dir: None,
        stdout_path: None,
        time: Timestamp::now(),
        sluid: None,
        node_list: None,
    }
}

fn wait_for_file(path: &Path, ergond: &Ergond) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(b) = std::fs::read(path) {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "no manifest {}:\n{}",
            path.display(),
            ergond.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send `req` as uid `uid` and return the reply: this test binary runs again as that user
/// (`Command::uid`), running only [`client_as_another_user`], which sends the frame it reads on
/// stdin and prints the reply.
fn request_as(uid: u32, socket: &Path, req: &Request) -> Reply {
    use std::os::unix::process::CommandExt as _;
    let out = common::run_with_input(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "client_as_another_user",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("ERGON_TEST_SOCKET", socket)
            .uid(uid)
            .gid(uid),
        &encode_frame(req).unwrap(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix(REPLY_LINE))
        .unwrap_or_else(|| panic!("client as uid {uid} failed ({}):\n{text}", out.status));
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    read_frame(&mut bytes.as_slice()).unwrap()
}

/// How [`client_as_another_user`] prints the reply frame (hex).
const REPLY_LINE: &str = "ergon-test-reply ";

/// Not a test: what [`request_as`] runs as another user. Sends the frame on stdin to the socket
/// in `ERGON_TEST_SOCKET` and prints the whole reply frame.
#[test]
#[ignore = "run by request_as, as another user"]
fn client_as_another_user() {
    let Some(socket) = std::env::var_os("ERGON_TEST_SOCKET") else {
        eprintln!("not a test on its own: request_as runs it");
        return;
    };
    let mut frame = Vec::new();
    std::io::stdin().read_to_end(&mut frame).unwrap();
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(&frame).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    assert!(body.len() <= MAX_FRAME_LEN);
    s.read_exact(&mut body).unwrap();
    let hex: String = len
        .iter()
        .chain(&body)
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("{REPLY_LINE}{hex}");
}

/// xorshift64*: deterministic garbage.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One hostile connection: garbage of one of several kinds, then half-close and read whatever
/// the daemon answers.
fn garbage(socket: &Path, rng: &mut Rng, valid: &[u8]) {
    let bytes = match rng.next() % 5 {
        // Random length prefix (mostly oversize), random tail.
        0 => {
            let n = 4 + (rng.next() % 64) as usize;
            rng.bytes(n)
        }
        // Plausible length, random msgpack body.
        1 => {
            let n = 1 + (rng.next() % 200) as usize;
            let mut b = (n as u32).to_be_bytes().to_vec();
            b.extend(rng.bytes(n));
            b
        }
        // A real frame cut short.
        2 => valid[..(rng.next() as usize % valid.len())].to_vec(),
        // A real frame with a byte flipped.
        3 => {
            let mut b = valid.to_vec();
            let i = 4 + rng.next() as usize % (b.len() - 4);
            b[i] ^= 1 + (rng.next() % 255) as u8;
            b
        }
        // Announces a huge frame.
        _ => {
            let mut b = u32::MAX.to_be_bytes().to_vec();
            b.extend(rng.bytes(16));
            b
        }
    };
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let _ = s.write_all(&bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

#[test]
fn jobs_are_measured_refused_and_the_socket_survives_garbage() {
    let t_test = Instant::now();
    let fake = FakeNvml::new(
        json!({"gpus": GPUS.iter().map(|(uuid, minor, watts)| json!({
        "uuid": uuid, "name": "Fake", "minor": minor,
        "profile": {"kind": "constant", "watts": watts}, "update_period_ms": 10.0,
    })).collect::<Vec<_>>()}),
    );
    let dir = tempfile::tempdir().unwrap();
    // The uid-nobody client must reach the socket.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ergond, socket, spool) = start_ergond(dir.path(), &fake.lib);
    fake.wait_for_start();
    // Clients of other uids (the job's owner, a stranger) need root to be run as.
    let as_others = ergon_testkit::needs_root(
        "jobs_are_measured_refused_and_the_socket_survives_garbage: requests from other uids",
        "run a client as another uid",
    );

    // --- A job on the GPUs with minors 3 and 5 (NVML devices 2 and 1). ---
    let start = job_start(
        42,
        1000,
        vec![
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
        ],
    );
    let t_start = start.time;
    let mut latencies = Vec::new();
    let (r, d) = request(&socket, &Request::JobStart(start));
    assert_eq!(r, Reply::Ok);
    latencies.push(d);
    std::thread::sleep(Duration::from_millis(1000));
    let step_start = StepStart {
        cluster: None,
        job_id: 42,
        array_job_id: None,
        array_task_id: None,
        step: StepId::Numbered(0),
        uid: 1000,
        node: NODE.into(),
        cgroups: vec![CgroupPath {
            controller: String::new(),
            path: "/slurm/job_42/step_0/user/task_0".into(),
        }],
        cpus: "0-1".parse().unwrap(),
        pid: None,
        tasks: Some(1),
        time: Timestamp::now(),
        sluid: None,
        job_mem_mb: None,
    };
    let t_step0 = step_start.time;
    let (r, d) = request(&socket, &Request::StepStart(step_start));
    assert_eq!(r, Reply::Ok);
    latencies.push(d);
    // The job's owner may query it, others may not.
    if as_others {
        match request_as(1000, &socket, &Request::QueryJob { job_id: 42 }) {
            Reply::Job(s) => assert_eq!((s.job_id, s.uid, s.steps.len()), (42, 1000, 1)),
            other => panic!("owner's query: {other:?}"),
        }
        match request_as(NOBODY, &socket, &Request::QueryJob { job_id: 42 }) {
            Reply::Error { code, .. } => assert_eq!(code, ErrorCode::PermissionDenied),
            other => panic!("stranger's query: {other:?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let step_end = StepEnd {
        cluster: None,
        job_id: 42,
        step: StepId::Numbered(0),
        node: NODE.into(),
        exit_status: Some(0),
        time: Timestamp::now(),
    };
    let t_step1 = step_end.time;
    let (r, d) = request(&socket, &Request::StepEnd(step_end));
    assert_eq!(r, Reply::Ok);
    latencies.push(d);
    std::thread::sleep(Duration::from_millis(1000));
    let end = JobEnd {
        cluster: None,
        job_id: 42,
        node: NODE.into(),
        time: Timestamp::now(),
    };
    let t_end = end.time;
    let (r, d) = request(&socket, &Request::JobEnd(end));
    assert_eq!(r, Reply::Ok);
    latencies.push(d);
    println!("lifecycle reply latencies (connect + request + reply): {latencies:?}");
    for d in &latencies {
        assert!(*d < Duration::from_millis(100), "slow reply {d:?}");
    }

    let path = spool.join(format!("{CLUSTER}-42-{NODE}.json"));
    let m = Manifest::from_json(&wait_for_file(&path, &ergond)).expect("manifest verifies");
    println!("{}", String::from_utf8_lossy(&m.to_json().unwrap()));
    let secs = t_end.seconds_since(t_start);
    assert_eq!(
        (m.job.job_id, m.job.uid, m.job.user.as_str()),
        (42, 1000, "alice")
    );
    assert_eq!((m.cluster.as_str(), m.node.as_str()), (CLUSTER, NODE));
    assert_eq!(
        (m.start_unix_ns, m.end_unix_ns),
        (t_start.unix_ns, t_end.unix_ns)
    );
    assert_eq!(m.gpus.len(), 2, "{:?}", m.gpus);
    for (slurm_index, nvml) in [(0u32, 2usize), (1, 1)] {
        let (uuid, minor, watts) = GPUS[nvml];
        let g = m
            .gpus
            .iter()
            .find(|g| g.uuid == uuid)
            .unwrap_or_else(|| panic!("GPU minor {minor} not charged: {:?}", m.gpus));
        let truth = watts * secs;
        let energy = g.energy_j.expect("a measured GPU has energy");
        println!(
            "{uuid}: {:.3} J, truth {truth:.3} J, error {:.4}%",
            energy,
            100.0 * rel_err(energy, truth)
        );
        assert!(rel_err(energy, truth) < 0.005, "{g:?} vs {truth} J");
        assert_eq!((g.index, g.minor), (slurm_index, Some(minor)));
        assert!((g.avg_w.unwrap() - watts).abs() < 0.005 * watts, "{g:?}");
        assert!((g.peak_w.unwrap() - watts).abs() < 0.01 * watts, "{g:?}");
    }
    for (uuid, _, _) in [GPUS[0], GPUS[3]] {
        assert!(m.gpus.iter().all(|g| g.uuid != uuid), "{uuid} charged");
    }
    let truth = (GPUS[1].2 + GPUS[2].2) * secs;
    assert!(
        rel_err(m.totals.gpu_j.unwrap(), truth) < 0.005,
        "{:?}",
        m.totals
    );
    assert_eq!(m.coverage.fraction, 1.0);
    assert!(m.coverage.gaps.is_empty());
    assert_eq!(m.attribution.model, ergond::attribution::MODEL_NAME);
    assert!(
        !m.attribution.estimated,
        "exclusive GPUs are measured, not estimated"
    );
    assert_eq!(m.steps.len(), 1);
    let step_truth = (GPUS[1].2 + GPUS[2].2) * t_step1.seconds_since(t_step0);
    let step_j = m.steps[0].gpu_j.unwrap();
    assert!(
        rel_err(step_j, step_truth) < 0.01,
        "step {step_j} J vs {step_truth} J"
    );
    assert_eq!(
        m.trace
            .series
            .iter()
            .filter(|s| s.name.starts_with("gpu"))
            .count(),
        2
    );
    assert!(m
        .trace
        .series
        .iter()
        .all(|s| !s.watts.is_empty() && s.watts.len() <= 600));
    assert!(m
        .sensors
        .iter()
        .any(|s| s.kind == ergon_protocol::SensorKind::Nvml));

    // --- The end of a job ergond never saw start. ---
    let (r, _) = request(
        &socket,
        &Request::JobEnd(JobEnd {
            cluster: None,
            job_id: 77,
            node: NODE.into(),
            time: Timestamp::now(),
        }),
    );
    assert_eq!(r, Reply::Ok);
    let m = Manifest::from_json(&wait_for_file(
        &spool.join(format!("unknown-77-{NODE}.json")),
        &ergond,
    ))
    .unwrap();
    assert_eq!(m.coverage.fraction, 0.0);
    assert_eq!(m.coverage.gaps.len(), 1);
    assert!(m.gpus.is_empty());

    // --- Another uid may not send job events. ---
    if as_others {
        match request_as(
            NOBODY,
            &socket,
            &Request::JobStart(job_start(43, NOBODY, vec![])),
        ) {
            Reply::Error { code, reason } => {
                assert_eq!(code, ErrorCode::PermissionDenied);
                assert!(reason.contains("65534"), "{reason}");
            }
            other => panic!("unprivileged JobStart: {other:?}"),
        }
        assert_eq!(request_as(NOBODY, &socket, &Request::Ping), Reply::Pong);
        assert!(
            !spool.join(format!("{CLUSTER}-43-{NODE}.json")).exists()
                && matches!(
                    request(&socket, &Request::QueryJob { job_id: 43 }).0,
                    Reply::Error {
                        code: ErrorCode::UnknownJob,
                        ..
                    }
                ),
            "the refused job must not be tracked"
        );
    }

    // --- Several requests on one connection, in order. ---
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for req in [
        Request::Hello {
            client: "jobs test".into(),
        },
        Request::Ping,
        Request::Ping,
    ] {
        write_frame(&mut s, &req).unwrap();
        let reply: Reply = read_frame(&mut s).unwrap();
        match req {
            Request::Hello { .. } => assert!(matches!(reply, Reply::Hello { version: 1, .. })),
            _ => assert_eq!(reply, Reply::Pong),
        }
    }
    drop(s);

    // --- Idle connections never keep a lifecycle event out. ---
    // A client holds 300 connections that never send (more than the 256 the socket serves at
    // once) and reopens each as soon as ergond closes it; every plugin-like event (one frame
    // right after connecting, 100 ms for the whole exchange) still gets through.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let churn = {
        let (socket, stop) = (socket.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let open = |socket: &Path| {
                let s = UnixStream::connect(socket).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            };
            let mut held: Vec<UnixStream> = (0..300).map(|_| open(&socket)).collect();
            held_tx.send(()).unwrap();
            let mut reopened = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in held.iter_mut() {
                    if matches!(s.read(&mut [0u8; 1]), Ok(0)) {
                        *s = open(&socket);
                        reopened += 1;
                    }
                }
                std::thread::yield_now();
            }
            reopened
        })
    };
    held_rx.recv().unwrap();
    for (i, job) in (600..620).enumerate() {
        let event = if i % 2 == 0 {
            Request::JobStart(job_start(job, 1000, vec![]))
        } else {
            Request::Ping
        };
        let reply = plugin_request(&socket, &event, Duration::from_millis(100))
            .unwrap_or_else(|e| panic!("event {i} under an idle-connection flood: {e}"));
        assert!(matches!(reply, Reply::Ok | Reply::Pong), "{reply:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reopened = churn.join().unwrap();
    let metrics = common::scrape_metrics(dir.path());
    let evictions = common::metric(&metrics, "ergon_socket_evictions_total");
    assert!(
        evictions >= 44.0 && reopened >= 44,
        "{evictions} evictions, {reopened} connections reopened"
    );
    println!(
        "{reopened} idle connections reopened, {evictions} evictions; every event got through"
    );
    // The started jobs are open; end them so later checks see a quiet node.
    for job in (600..620).step_by(2) {
        assert_eq!(
            request(
                &socket,
                &Request::JobEnd(JobEnd {
                    cluster: None,
                    job_id: job,
                    node: NODE.into(),
                    time: Timestamp::now()
                })
            )
            .0,
            Reply::Ok
        );
    }

    // --- 10,000 hostile frames. ---
    let valid = encode_frame(&Request::JobStart(job_start(44, 0, vec![]))).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let t_garbage = Instant::now();
    for _ in 0..500 {
        garbage(&socket, &mut rng, &valid);
    }
    let rss_before = ergond.rss_kib();
    for _ in 0..10_000 {
        garbage(&socket, &mut rng, &valid);
    }
    let rss_after = ergond.rss_kib();
    println!(
        "10,500 hostile connections in {:?}; RSS {rss_before} KiB -> {rss_after} KiB",
        t_garbage.elapsed()
    );
    assert_eq!(request(&socket, &Request::Ping).0, Reply::Pong);
    assert!(
        rss_after < rss_before + 5 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Logged, but not once per frame: a flood is summarised with its count.
    let log = ergond.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("malformed request"))
        .count();
    assert!(
        (1..=5).contains(&lines),
        "{lines} log lines for 10,500 bad frames"
    );
    assert!(
        common::metric(
            &common::scrape_metrics(dir.path()),
            "ergon_socket_malformed_frames_total"
        ) >= 5_000.0,
        "most of the hostile frames are counted (a frame with a flipped byte may still decode)"
    );
    println!("test took {:?}", t_test.elapsed());
}

/// A step end for a job whose start ergond never heard of (its JobStart was lost) opens the
/// job with partial coverage; when its end never comes either, the job is finished once its
/// cgroup is not in the tree, never left open.
#[test]
fn a_job_known_only_from_a_step_event_is_never_left_open() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeNvml::new(
        json!({"gpus": GPUS.iter().map(|(uuid, minor, watts)| json!({
        "uuid": uuid, "name": "Fake", "minor": minor,
        "profile": {"kind": "constant", "watts": watts}, "update_period_ms": 10.0,
    })).collect::<Vec<_>>()}),
    );
    let (ergond, socket, spool) =
        start_ergond_with(dir.path(), &fake.lib, "lost_job_check_s = 1\n");
    let end = StepEnd {
        cluster: Some(CLUSTER.into()),
        job_id: 701,
        step: StepId::Numbered(0),
        node: NODE.into(),
        exit_status: Some(0),
        time: Timestamp::now(),
    };
    assert_eq!(request(&socket, &Request::StepEnd(end)).0, Reply::Ok);
    let t0 = Instant::now();
    let m = Manifest::from_json(&wait_for_file(
        &spool.join(format!("{CLUSTER}-701-{NODE}.json")),
        &ergond,
    ))
    .unwrap();
    println!("orphan finished after {:?}", t0.elapsed());
    assert_eq!(m.coverage.fraction, 0.0, "its start was not seen");
    assert!(
        m.coverage
            .gaps
            .iter()
            .any(|g| g.reason.contains("end was not reported")),
        "{:?}",
        m.coverage.gaps
    );
    assert!(ergond.log().contains("its cgroup is gone"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        request(&socket, &Request::QueryJob { job_id: 701 }).0,
        Reply::Error {
            code: ErrorCode::UnknownJob,
            ..
        }
    ) {
        assert!(
            Instant::now() < deadline,
            "the job stays open:\n{}",
            ergond.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
