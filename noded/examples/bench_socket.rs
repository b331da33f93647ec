//! `scripts/bench ergond`: ergond's socket under load (issue "ergond jobs", section Benchmarks):
//! socket events handled per second with 64 concurrent clients (target ≥ 5,000/s), p99 reply
//! latency (target ≤ 1 ms), and memory with 256 open jobs.
//!
//! ```text
//! cargo build --release -p fake-nvml
//! cargo build --release -p ergond --bin ergond
//! cargo build --release -p ergond --example bench_socket
//! target/release/examples/bench_socket --ergond target/release/ergond \
//!     --fake-nvml target/release/libnvidia_ml.so [--seconds N] [--clients N] [--rate N] \
//!     [--open-jobs N] [--churn-jobs N] [--memory-only] [--quick] [--json PATH]
//! ```
//!
//! The built `ergond` binary runs as a child process on a generated node in a temporary
//! directory: 8 GPUs of the fake NVML library (counters updated every 100 ms, so the GPU is
//! sampled at 20 Hz), a 2-socket powercap tree (4 RAPL zones), a 64-CPU `/proc/stat` with its
//! topology, and a cgroup v1 `cpuacct` tree holding the step cgroup of every job the benchmark
//! sends (created after ergond has started, which would otherwise take them for jobs already
//! running, and before the runs, as slurmstepd creates it before the step's hooks run), so
//! every `StepStart` makes ergond watch a real cgroup file (on tmpfs, `/dev/shm`, when there is
//! one, as cgroupfs is not a disk file system; the spool and ergond's state directory stay on
//! the temporary directory's disk). Its socket is in the temporary directory, its log
//! (`RUST_LOG=info`, as in service) goes to a file there. Its `slurm_user` is the user the
//! benchmark runs as, so the lifecycle events are accepted without root.
//!
//! Every job is the sequence the plugin sends: `JobStart` (two GPUs, a CPU list, paths, no
//! `--energy-report`), `StepStart` (the ten cgroup entries of a batch step under cgroup v1, a CPU
//! set), `StepEnd`, `JobEnd`, with a unique job id. Requests are stamped just before they are
//! sent.
//!
//! Phase 1, throughput and latency, `--clients` (64) threads for `--seconds` each:
//!
//! - `oneshot-saturate`: every client sends its events back to back, each over a new
//!   connection exactly like the plugin (connect, write one frame, read one reply, close);
//! - `oneshot-paced`: the same, but the clients together offer `--rate` (5,000) events/s on a
//!   fixed schedule (open loop: a late client sends at once and is not given a new schedule);
//!   the latency is measured from the send and also from the scheduled instant;
//! - `persistent-saturate`: each client keeps one connection and sends all its events on it
//!   (ergond serves several requests per connection; the plugin does not do this);
//! - `ping-paced`: a control, `Ping` instead of the job events at the same rate (the socket
//!   path alone: no registry lock, no work for the job worker).
//!
//! A reply latency is the whole exchange as the client sees it: connect, encode, write, wait,
//! read, decode (without the connect for `persistent`). After each run the benchmark waits until
//! every ended job's manifest is in the spool ("drain"): the replies are sent at once, while the
//! readings and manifests are the job worker's work, done after the reply.
//!
//! Phase 2, memory, on a fresh ergond: after one warm-up job, `--open-jobs` (256) jobs are
//! opened (`JobStart` + `StepStart`), each is confirmed open with `QueryJob`, and once the worker
//! has taken their readings VmRSS is compared with the value before. While they stay open,
//! `--churn-jobs` (400) other jobs come and go one after another (each event closes an
//! attribution interval for every open job, as the worker's periodic tick does once a second, so
//! this shows what the open jobs hold after a while, not just after their start), and VmRSS is
//! read again. Then nothing happens for `--seconds`: ergond's CPU and the bytes it writes to
//! storage (`/proc/<pid>/io`, the job journal) while the jobs are merely open. Then all 256 are
//! ended at once (64 clients) and the benchmark times how long until their manifests are in the
//! spool.
//!
//! Every reply is checked (`Ok` for events, `Job` for queries, `Pong` for pings) and the
//! outcomes counted. `Busy` is ergond's answer to overload: counted, reported and judged against
//! the targets. Any other error, or a missing manifest of a job whose `JobEnd` was accepted,
//! fails the run (exit 1, after the results are written). During each run the benchmark also
//! records how busy the machine's CPUs were, and how much of that was ergond, the clients and
//! other processes (`/proc/stat`, ergond's CPU clock, `getrusage`).
//!
//! Writes one JSON object per line to `--json` and prints a table.

use ergon_protocol::{
    parse_proc_cgroup, read_frame, write_frame, CpuSet, ErrorCode, GpuAlloc, JobEnd, JobIds,
    JobStart, Reply, Request, StepEnd, StepId, StepStart, Timestamp,
};
use ergon_testkit::{
    write_cgroup_v1_usage, write_cpu_topology, write_proc_stat, PowercapLayout, PowercapTree,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const NODE: &str = "node0042";
const CLUSTER: &str = "ergon-cluster";
const UID: u32 = 10_042;
const GPUS: usize = 8;
const CPUS: u32 = 64;
const RATE_TARGET: f64 = 5000.0;
const P99_TARGET_US: f64 = 1000.0;
/// Job events' reply latency over the ping control's, p50 and p99 (median over the pairs).
const LATENCY_RATIO_TARGET: f64 = 2.0;
const KINDS: [&str; 4] = ["JobStart", "StepStart", "StepEnd", "JobEnd"];
/// How long a drain may take before the benchmark gives up waiting for manifests.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

struct Args {
    ergond: PathBuf,
    fake_nvml: PathBuf,
    seconds: f64,
    clients: usize,
    rate: f64,
    json: Option<PathBuf>,
    quick: bool,
    open_jobs: u32,
    churn_jobs: u32,
    idle_seconds: f64,
    memory_only: bool,
    /// Pairs of paced runs (ping control, then job events) for the latency ratio.
    repeats: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_socket --ergond BIN --fake-nvml LIB [--seconds N] [--clients N] \
         [--rate EVENTS_PER_S] [--open-jobs N] [--churn-jobs N] [--repeats N] [--memory-only] [--quick] [--json PATH]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        ergond: PathBuf::new(),
        fake_nvml: PathBuf::new(),
        seconds: 10.0,
        clients: 64,
        rate: RATE_TARGET,
        json: None,
        quick: false,
        open_jobs: 256,
        churn_jobs: 400,
        idle_seconds: 0.0,
        memory_only: false,
        repeats: 5,
    };
    let mut seconds = None;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--ergond" => a.ergond = PathBuf::from(v()),
            "--fake-nvml" => a.fake_nvml = PathBuf::from(v()),
            "--seconds" => seconds = Some(v().parse().unwrap_or_else(|_| usage())),
            "--clients" => a.clients = v().parse().unwrap_or_else(|_| usage()),
            "--rate" => a.rate = v().parse().unwrap_or_else(|_| usage()),
            "--json" => a.json = Some(PathBuf::from(v())),
            "--open-jobs" => a.open_jobs = v().parse().unwrap_or_else(|_| usage()),
            "--quick" => a.quick = true,
            "--memory-only" => a.memory_only = true,
            "--churn-jobs" => a.churn_jobs = v().parse().unwrap_or_else(|_| usage()),
            "--repeats" => a.repeats = v().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    a.seconds = seconds.unwrap_or(if a.quick { 2.0 } else { 10.0 });
    a.idle_seconds = a.seconds;
    if !a.ergond.is_file() || !a.fake_nvml.is_file() {
        eprintln!("--ergond must name the built ergond binary and --fake-nvml the built fake NVML library");
        usage();
    }
    assert!(a.clients > 0 && a.seconds > 0.0 && a.rate > 0.0 && a.repeats > 0);
    a
}

// ---------------------------------------------------------------------------------------------
// The fake node and the ergond child process.

/// The generated node ergond runs on.
struct Node {
    _dir: tempfile::TempDir,
    /// The cgroup tree, on tmpfs when there is one (`/dev/shm`), as cgroupfs is not a disk
    /// file system: tens of thousands of step cgroups on the spool's disk would slow the
    /// manifests' inode allocation there.
    _cgroup_dir: Option<tempfile::TempDir>,
    config: PathBuf,
    socket: PathBuf,
    spool: PathBuf,
    state: PathBuf,
    cgroup_root: PathBuf,
    log: PathBuf,
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn build_node(fake_nvml: &Path) -> Node {
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = dir.path();
    let nvml_dir = root.join("nvml");
    std::fs::create_dir_all(&nvml_dir).unwrap();
    let lib = nvml_dir.join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml, &lib).expect("copy the fake NVML library");
    let gpus: Vec<Value> = (0..GPUS)
        .map(|i| {
            json!({"uuid": format!("GPU-bench000-0000-0000-0000-{i:012}"), "name": "Fake H100",
                   "minor": i, "profile": {"kind": "constant", "watts": 200.0 + 50.0 * i as f64},
                   "update_period_ms": 100.0,
                   "initial_energy_mj": 1_000_000_000u64 + i as u64})
        })
        .collect();
    std::fs::write(
        format!("{}.scenario.json", lib.display()),
        serde_json::to_vec(&json!({ "gpus": gpus })).unwrap(),
    )
    .unwrap();
    let powercap = PowercapTree::create(
        &root.join("powercap"),
        &PowercapLayout::IntelServer { sockets: 2 }.zones(),
    );
    for (z, v) in [
        ("intel-rapl:0", 123_456_789_012u64),
        ("intel-rapl:0:0", 23_456_789_012),
        ("intel-rapl:1", 133_456_789_012),
        ("intel-rapl:1:0", 33_456_789_012),
    ] {
        powercap.set_energy_uj(z, v);
    }
    let sys = root.join("sys");
    let cpus: Vec<(u32, u32, u32)> = (0..CPUS).map(|c| (c, c / (CPUS / 2), 0)).collect();
    write_cpu_topology(&sys, &cpus);
    let proc_root = root.join("proc");
    let stat: Vec<(u32, [u64; 8])> = (0..CPUS)
        .map(|c| {
            let b = 1_000_000 + u64::from(c) * 1_000;
            (c, [b, 10, b / 4, 8 * b, 100, 10, 20, 0])
        })
        .collect();
    write_proc_stat(&proc_root, &stat);
    let cgroup_dir = tempfile::Builder::new()
        .prefix("ergond-bench-cgroup")
        .tempdir_in("/dev/shm")
        .ok();
    let cgroup_root = cgroup_dir
        .as_ref()
        .map_or_else(|| root.join("cgroup"), |d| d.path().to_path_buf());
    std::fs::create_dir_all(cgroup_root.join("cpuacct")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let socket = root.join("run/ergond.sock");
    let spool = root.join("spool");
    let state = root.join("state");
    let config = root.join("ergond.toml");
    std::fs::write(
        &config,
        format!(
            "nvml_library = {}\npowercap_root = {}\nperf_sysfs_root = {}\nsysfs_root = {}\n\
             cgroup_root = {}\nproc_root = {}\nprefer_perf = false\nsocket_path = {}\n\
             state_dir = {}\nspool_dir = {}\nmetrics_listen = \"127.0.0.1:{port}\"\n\
             slurm_user = {:?}\n",
            toml_str(&lib),
            toml_str(powercap.root()),
            toml_str(&root.join("no-perf")),
            toml_str(&sys),
            toml_str(&cgroup_root),
            toml_str(&proc_root),
            toml_str(&socket),
            toml_str(&state),
            toml_str(&spool),
            user_name(),
        ),
    )
    .unwrap();
    Node {
        log: root.join("ergond.log"),
        _dir: dir,
        _cgroup_dir: cgroup_dir,
        config,
        socket,
        spool,
        state,
        cgroup_root,
    }
}

/// The name of the user this runs as: ergond's `slurm_user`, so that its job events are
/// accepted without root (root's are accepted anyway).
fn user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| "root".into(), |u| u.name)
}

/// The step cgroup of `job_id` (relative to the `cpuacct` hierarchy), as ergond will watch it.
fn step_cgroup(job_id: u32) -> String {
    format!("slurm_{NODE}/uid_{UID}/job_{job_id}/step_batch")
}

fn make_cgroup(cgroup_root: &Path, job_id: u32) {
    write_cgroup_v1_usage(cgroup_root, &step_cgroup(job_id), u64::from(job_id) * 1_000);
}

/// Create the step cgroups of `ids` on two threads; returns the time taken.
fn make_cgroups(cgroup_root: &Path, ids: Vec<u32>) -> Duration {
    let t = Instant::now();
    let half = ids.len() / 2;
    let (a, b) = ids.split_at(half);
    std::thread::scope(|s| {
        s.spawn(|| a.iter().for_each(|&id| make_cgroup(cgroup_root, id)));
        b.iter().for_each(|&id| make_cgroup(cgroup_root, id));
    });
    t.elapsed()
}

struct Ergond {
    child: Child,
}

impl Ergond {
    fn start(bin: &Path, node: &Node) -> Self {
        let log = std::fs::File::create(&node.log).unwrap();
        let child = Command::new(bin)
            .args(["--config", node.config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ergond");
        eprintln!("    ergond pid {}", child.id());
        let mut e = Ergond { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Reply::Pong) = oneshot(&node.socket, &Request::Ping) {
                break;
            }
            if let Some(s) = e.child.try_wait().unwrap() {
                panic!(
                    "ergond exited ({s}):\n{}",
                    std::fs::read_to_string(&node.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ergond's socket never answered:\n{}",
                std::fs::read_to_string(&node.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        e
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// VmRSS and VmHWM in KiB.
    fn rss_kib(&self) -> (u64, u64) {
        let pid = self.pid().to_string();
        let field = |name| ergon_testkit::proc_status_kib(&pid, name);
        (field("VmRSS"), field("VmHWM"))
    }

    /// CPU time (utime + stime, ms) per thread name, summed over threads of the same name.
    fn thread_cpu_ms(&self) -> BTreeMap<String, f64> {
        let tick_ms = 1000.0 / clk_tck();
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return out;
        };
        for t in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let name = stat[open + 1..close].to_string();
            let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            // After "pid (comm) ": state is field 3, utime 14 and stime 15 (1-based).
            let ticks: f64 =
                f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
            *out.entry(name).or_insert(0.0) += ticks * tick_ms;
        }
        out
    }

    /// Bytes the process has caused to be written to storage (`/proc/<pid>/io` write_bytes).
    fn write_bytes(&self) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/io", self.pid()))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))?
            .trim()
            .parse()
            .ok()
    }

    /// CPU time of the whole process (ns), from its process CPU clock.
    fn process_cpu_ns(&self) -> u64 {
        use nix::time::ClockId;
        ClockId::pid_cpu_clock_id(nix::unistd::Pid::from_raw(self.pid() as i32))
            .and_then(ClockId::now)
            .map_or(0, |ts| {
                ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
            })
    }

    /// SIGTERM, then wait (SIGKILL after 20 s).
    fn stop(mut self) -> Duration {
        let t = Instant::now();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::SIGTERM,
        );
        while t.elapsed() < Duration::from_secs(20) {
            if self.child.try_wait().unwrap().is_some() {
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        t.elapsed()
    }
}

impl Drop for Ergond {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time (ms) of every other process on the machine (not this one, not ergond), keyed by
/// pid and start time: `/proc/<pid>/stat` utime + stime. Tick-sampled by the kernel: a fair
/// measure for CPU-bound processes (another build's compilers), not for short bursts; a process
/// that starts and ends between two readings is missed.
fn others_cpu_ms(ergond_pid: u32) -> BTreeMap<(u32, u64), f64> {
    let me = std::process::id();
    let tick_ms = 1000.0 / clk_tck();
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || pid == ergond_pid {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        if f.len() < 20 {
            continue;
        }
        // After "pid (comm) ": utime and stime are fields 14 and 15 (1-based), starttime 22.
        let ticks: f64 = f[11..13]
            .iter()
            .map(|v| v.parse::<f64>().unwrap_or(0.0))
            .sum();
        let start: u64 = f[19].parse().unwrap_or(0);
        out.insert((pid, start), ticks * tick_ms);
    }
    out
}

/// CPU time (ms) the other processes used between two [`others_cpu_ms`] readings: the growth
/// of those in both, and all of those that started in between.
fn others_delta_ms(a: &BTreeMap<(u32, u64), f64>, b: &BTreeMap<(u32, u64), f64>) -> f64 {
    b.iter()
        .map(|(k, v)| (v - a.get(k).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// CPU pressure (`/proc/pressure/cpu`, "some" total, µs): time during which at least one
/// runnable task waited for a CPU.
fn cpu_pressure_us() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    s.lines()
        .find(|l| l.starts_with("some"))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// CPU time (ms) of this process, all threads (the clients).
fn self_cpu_ms() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let ru = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage of this process");
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    ms(ru.user_time()) + ms(ru.system_time())
}

fn clk_tck() -> f64 {
    ergond::sources::cgroup::user_hz() as f64
}

/// Manifests in the spool (temporary files excluded).
fn count_manifests(spool: &Path) -> usize {
    std::fs::read_dir(spool)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.ends_with(".json") && !n.starts_with('.')
                })
                .count()
        })
        .unwrap_or(0)
}

/// Wait until the spool holds `want` manifests (or [`DRAIN_LIMIT`]); returns the count and when
/// it was reached (polled every 20 ms).
fn wait_for_manifests(spool: &Path, want: usize) -> (usize, Instant) {
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let n = count_manifests(spool);
        if n >= want || Instant::now() >= deadline {
            return (n, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and the client.

/// The four events of job `job_id`, shaped like the plugin's (see spank-plugin's
/// `bench_events`: `JobStart` ~410 bytes, `StepStart` ~760 bytes with ten cgroup entries).
fn job_events(job_id: u32) -> [Request; 4] {
    let pair = job_id % (GPUS as u32 / 2);
    let start = JobStart {
        ids: JobIds {
            job_id,
            array_job_id: None,
            array_task_id: None,
        },
        uid: UID,
        gid: 10_000,
        user: "alice.researcher".into(),
        account: Some("physics-lab-2025".into()),
        partition: Some("gpu-a100".into()),
        cluster: Some(CLUSTER.into()),
        node: NODE.into(),
        gpus: vec![
            GpuAlloc {
                index: 0,
                minor: Some(2 * pair),
                mig: None,
            },
            GpuAlloc {
                index: 1,
                minor: Some(2 * pair + 1),
                mig: None,
            },
        ],
        cpus: CpuSet::parse("0-15,32-47").expect("cpu list"),
        // No `--energy-report`: it is opt-in, and the report would go to the job's directory.
        report: None,
        work_dir: Some("/home/alice.researcher/projects/climate-sim/run-042".into()),
        stdout_path: Some(format!(
            "/home/alice.researcher/projects/climate-sim/run-042/slurm-{job_id}.out"
        )),
        time: Timestamp::now(),
        sluid: None,
        node_list: None,
    };
    let task = format!("/slurm_{NODE}/uid_{UID}/job_{job_id}/step_batch/task_0");
    let step_dir = format!("/slurm_{NODE}/uid_{UID}/job_{job_id}/step_batch");
    let proc_cgroup = format!(
        "12:memory:{task}\n11:cpuset:{step_dir}\n10:devices:{step_dir}\n9:freezer:{step_dir}\n\
         8:cpu,cpuacct:{task}\n7:pids:/system.slice/slurmd.service\n6:net_cls,net_prio:/\n\
         1:name=systemd:/system.slice/slurmd.service\n"
    );
    let step_start = StepStart {
        cluster: None,
        job_id,
        array_job_id: None,
        array_task_id: None,
        step: StepId::Batch,
        uid: UID,
        node: NODE.into(),
        cgroups: parse_proc_cgroup(&proc_cgroup).expect("cgroup text"),
        cpus: CpuSet::parse("0-15,64-79").expect("cpu list"),
        pid: Some(412_345),
        tasks: Some(1),
        time: Timestamp::now(),
        sluid: None,
        job_mem_mb: None,
    };
    let step_end = StepEnd {
        cluster: None,
        job_id,
        step: StepId::Batch,
        node: NODE.into(),
        exit_status: Some(0),
        time: Timestamp::now(),
    };
    let job_end = JobEnd {
        cluster: None,
        job_id,
        node: NODE.into(),
        time: Timestamp::now(),
    };
    [
        Request::JobStart(start),
        Request::StepStart(step_start),
        Request::StepEnd(step_end),
        Request::JobEnd(job_end),
    ]
}

/// Stamp the request now, as the plugin does just before sending.
fn stamp(req: &mut Request) {
    let now = Timestamp::now();
    match req {
        Request::JobStart(e) => e.time = now,
        Request::StepStart(e) => e.time = now,
        Request::StepEnd(e) => e.time = now,
        Request::JobEnd(e) => e.time = now,
        _ => {}
    }
}

/// Why an exchange failed, as a short name for the outcome counts.
fn io_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => "connect:EAGAIN (backlog full)".into(),
        Some(n) => format!("io:errno{n}"),
        None => format!("io:{:?}", e.kind()),
    }
}

fn exchange(s: &mut UnixStream, req: &Request) -> Result<Reply, String> {
    write_frame(s, req).map_err(|e| format!("write: {e}"))?;
    read_frame(s).map_err(|e| match e {
        ergon_protocol::FrameError::Io(e) => io_name(&e),
        e => format!("read: {e}"),
    })
}

/// One request on a new connection, as the plugin sends it.
fn oneshot(socket: &Path, req: &Request) -> Result<Reply, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| io_name(&e))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| io_name(&e))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| io_name(&e))?;
    exchange(&mut s, req)
}

/// A `Busy` reply's reason without its numbers, so that equal causes count together.
fn busy_reason(reason: &str) -> String {
    let s: String = reason.chars().filter(|c| !c.is_ascii_digit()).collect();
    s.chars().take(60).collect()
}

/// The outcome's name; "ok" when it is the expected reply.
fn outcome(r: &Result<Reply, String>, query: bool) -> String {
    match r {
        Ok(Reply::Ok) if !query => "ok".into(),
        Ok(Reply::Job(_)) if query => "ok".into(),
        Ok(Reply::Error {
            code: ErrorCode::Busy,
            reason,
        }) => format!("Busy: {}", busy_reason(reason)),
        Ok(Reply::Error { code, .. }) => format!("{code:?}"),
        Ok(other) => format!("unexpected:{other:?}"),
        Err(e) => e.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 1.

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    OneshotSaturate,
    OneshotPaced,
    PersistentSaturate,
    /// Control: `Ping` instead of the job events, paced like `OneshotPaced` (the socket alone,
    /// no work for the job worker).
    PingPaced,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::OneshotSaturate => "oneshot-saturate",
            Mode::OneshotPaced => "oneshot-paced",
            Mode::PersistentSaturate => "persistent-saturate",
            Mode::PingPaced => "ping-paced",
        }
    }

    fn paced(self) -> bool {
        matches!(self, Mode::OneshotPaced | Mode::PingPaced)
    }
}

/// What one client thread saw.
#[derive(Default)]
struct ClientResult {
    /// (event kind index, latency ns) per event.
    latencies: Vec<(u8, u64)>,
    /// Paced mode: latency from the scheduled instant (ns).
    from_schedule: Vec<u64>,
    outcomes: BTreeMap<String, u64>,
    jobs_ended: u64,
    /// Cgroups the thread had to create itself (the pre-created ones ran out).
    late_cgroups: u64,
    first_busy: Option<Instant>,
    finished: Option<Instant>,
}

struct RunSpec<'a> {
    socket: &'a Path,
    cgroup_root: &'a Path,
    mode: Mode,
    clients: usize,
    seconds: f64,
    rate: f64,
    /// Job id of client c's k-th job: base + k * clients + c.
    base: u32,
    /// Jobs per client whose cgroups exist already.
    precreated: u32,
}

fn client(spec: &RunSpec, c: usize, start: Instant, end: Instant) -> ClientResult {
    let mut r = ClientResult::default();
    let mut conn: Option<UnixStream> = None;
    // Paced: this client's share of the rate, its schedule offset by its index.
    let interval = Duration::from_secs_f64(spec.clients as f64 / spec.rate);
    let mut next = start + interval.mul_f64(c as f64 / spec.clients as f64);
    let mut k: u32 = 0;
    loop {
        if Instant::now() >= end || (spec.mode.paced() && next >= end) {
            break;
        }
        let job_id = spec.base + k * spec.clients as u32 + c as u32;
        let ping = spec.mode == Mode::PingPaced;
        if k >= spec.precreated && !ping {
            make_cgroup(spec.cgroup_root, job_id);
            r.late_cgroups += 1;
        }
        k += 1;
        for (kind, mut req) in job_events(job_id).into_iter().enumerate() {
            let scheduled = next;
            if ping {
                req = Request::Ping;
            }
            if spec.mode.paced() {
                let now = Instant::now();
                if scheduled > now {
                    std::thread::sleep(scheduled - now);
                }
                next += interval;
            }
            stamp(&mut req);
            let t0 = Instant::now();
            let reply = if spec.mode == Mode::PersistentSaturate {
                if conn.is_none() {
                    conn = UnixStream::connect(spec.socket).ok().inspect(|s| {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    });
                }
                match conn.as_mut() {
                    Some(s) => {
                        let rep = exchange(s, &req);
                        if rep.is_err() {
                            conn = None;
                        }
                        rep
                    }
                    None => Err("connect failed".into()),
                }
            } else {
                oneshot(spec.socket, &req)
            };
            let t1 = Instant::now();
            r.latencies.push((kind as u8, (t1 - t0).as_nanos() as u64));
            if spec.mode.paced() {
                r.from_schedule.push((t1 - scheduled).as_nanos() as u64);
            }
            let o = match reply {
                Ok(Reply::Pong) if ping => "ok".to_string(),
                _ => outcome(&reply, false),
            };
            if kind == 3 && o == "ok" && !ping {
                r.jobs_ended += 1;
            }
            if o.starts_with("Busy") && r.first_busy.is_none() {
                r.first_busy = Some(t1);
            }
            *r.outcomes.entry(o).or_insert(0) += 1;
        }
    }
    r.finished = Some(Instant::now());
    r
}

/// Percentiles (nearest rank) of `ns`, in µs.
fn percentiles(ns: &mut [u64]) -> Value {
    if ns.is_empty() {
        return json!({"n": 0});
    }
    ns.sort_unstable();
    let n = ns.len();
    let pct = |p: f64| ergond::stats::percentile(ns, p) as f64 / 1000.0;
    json!({
        "n": n,
        "p50_us": pct(50.0), "p90_us": pct(90.0), "p99_us": pct(99.0), "p999_us": pct(99.9),
        "max_us": ns[n - 1] as f64 / 1000.0,
        "mean_us": ns.iter().sum::<u64>() as f64 / n as f64 / 1000.0,
    })
}

fn cpu_delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// Run `spec` against `ergond`, then wait for the manifests of its jobs (the spool held
/// `manifests_before`). Returns the JSON line and whether every reply was the expected one.
fn run_phase1(
    spec: &RunSpec,
    ergond: &Ergond,
    spool: &Path,
    manifests_before: usize,
) -> (Value, bool) {
    let cpu0 = ergond.thread_cpu_ms();
    let pcpu0 = ergond.process_cpu_ns();
    let (others0, self0, psi0) = (
        others_cpu_ms(ergond.pid()),
        self_cpu_ms(),
        cpu_pressure_us(),
    );
    let (rss0, _) = ergond.rss_kib();
    let barrier = Arc::new(Barrier::new(spec.clients + 1));
    let start_cell = Arc::new(std::sync::OnceLock::<Instant>::new());
    let results: Vec<ClientResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..spec.clients)
            .map(|c| {
                let barrier = Arc::clone(&barrier);
                let start_cell = Arc::clone(&start_cell);
                std::thread::Builder::new()
                    .name(format!("client-{c}"))
                    .spawn_scoped(s, move || {
                        barrier.wait();
                        let start = *start_cell.get().unwrap();
                        let end = start + Duration::from_secs_f64(spec.seconds);
                        let now = Instant::now();
                        if start > now {
                            std::thread::sleep(start - now);
                        }
                        client(spec, c, start, end)
                    })
                    .expect("spawn a client thread")
            })
            .collect();
        start_cell
            .set(Instant::now() + Duration::from_millis(20))
            .unwrap();
        barrier.wait();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let start = *start_cell.get().unwrap();
    let sent_end = results.iter().filter_map(|r| r.finished).max().unwrap();
    let send_s = (sent_end - start).as_secs_f64();
    let cpu_sent = ergond.thread_cpu_ms();
    let pcpu_sent = ergond.process_cpu_ns();
    let (others1, self1, psi1) = (
        others_cpu_ms(ergond.pid()),
        self_cpu_ms(),
        cpu_pressure_us(),
    );
    let ergond_ms = (pcpu_sent - pcpu0) as f64 / 1e6;
    let cores = |ms: f64| ms / 1e3 / send_s;
    let machine = json!({
        "ergond_cores": cores(ergond_ms),
        "clients_cores": cores(self1 - self0),
        "other_processes_cores": cores(others_delta_ms(&others0, &others1)),
        "cpu_pressure_some_pct": psi0.zip(psi1).map(|(a, b)| (b - a) as f64 / 1e4 / send_s),
        "loadavg_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    let (rss_sent, hwm_sent) = ergond.rss_kib();
    let manifests_at_end = count_manifests(spool).saturating_sub(manifests_before);

    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_kind: Vec<Vec<u64>> = vec![Vec::new(); 4];
    let mut all = Vec::new();
    let mut from_schedule = Vec::new();
    let (mut jobs_ended, mut late_cgroups) = (0u64, 0u64);
    for r in &results {
        for (o, n) in &r.outcomes {
            *outcomes.entry(o.clone()).or_insert(0) += n;
        }
        for &(k, ns) in &r.latencies {
            per_kind[k as usize].push(ns);
            all.push(ns);
        }
        from_schedule.extend_from_slice(&r.from_schedule);
        jobs_ended += r.jobs_ended;
        late_cgroups += r.late_cgroups;
    }
    let first_busy_s = results
        .iter()
        .filter_map(|r| r.first_busy)
        .min()
        .map(|t| (t - start).as_secs_f64());
    let events = all.len() as u64;
    let unexpected: u64 = outcomes
        .iter()
        .filter(|(o, _)| *o != "ok")
        .map(|(_, n)| n)
        .sum();
    let busy: u64 = outcomes
        .iter()
        .filter(|(o, _)| o.starts_with("Busy"))
        .map(|(_, n)| n)
        .sum();
    let ok_events = outcomes.get("ok").copied().unwrap_or(0);
    let rate = events as f64 / send_s;

    // Drain: every ended job's manifest in the spool.
    let want = manifests_before + jobs_ended as usize;
    let (got, drained_at) = wait_for_manifests(spool, want);
    let drain_s = (drained_at.saturating_duration_since(sent_end)).as_secs_f64();
    let total_s = (drained_at - start).as_secs_f64();
    let cpu_drained = ergond.thread_cpu_ms();
    let pcpu_drained = ergond.process_cpu_ns();
    let (rss_drained, hwm_drained) = ergond.rss_kib();

    let lat = percentiles(&mut all);
    let sched = percentiles(&mut from_schedule);
    let kinds: Vec<Value> = per_kind
        .iter_mut()
        .zip(KINDS)
        .map(|(v, k)| {
            let mut p = percentiles(v);
            p["event"] = json!(k);
            p
        })
        .collect();
    let p99 = lat["p99_us"].as_f64().unwrap_or(f64::INFINITY);
    let ok_rate = ok_events as f64 / send_s;
    // Throughput: events accepted (`Ok`) per second over the whole run; a paced run must also
    // have delivered what it offered, every event accepted.
    let rate_met = match spec.mode {
        Mode::OneshotPaced | Mode::PingPaced => {
            spec.rate >= RATE_TARGET && unexpected == 0 && ok_rate >= 0.95 * spec.rate
        }
        _ => ok_rate >= RATE_TARGET,
    };
    let p99_met = p99 <= P99_TARGET_US;
    let other_errors = unexpected - busy;
    let cpu_send = cpu_delta(&cpu0, &cpu_sent);
    let cpu_drain = cpu_delta(&cpu_sent, &cpu_drained);
    let line = json!({
        "group": "ergond", "kind": "socket", "mode": spec.mode.name(),
        "clients": spec.clients, "seconds": send_s,
        "offered_rate": if spec.mode.paced() { json!(spec.rate) } else { Value::Null },
        "events": events, "events_per_s": rate,
        "ok_events": ok_events, "ok_events_per_s": ok_events as f64 / send_s,
        "jobs_ended": jobs_ended,
        "outcomes": outcomes, "unexpected": unexpected, "busy": busy, "other_errors": other_errors,
        "first_busy_s": first_busy_s,
        "latency": lat,
        "latency_from_schedule": if spec.mode.paced() { sched } else { Value::Null },
        "latency_per_event": kinds,
        "manifests_when_sending_ended": manifests_at_end,
        "manifests_written": got - manifests_before,
        "drain_s": drain_s,
        "jobs_per_s_to_manifest": jobs_ended as f64 / total_s,
        "ergond_cpu_ms_sending": cpu_send,
        "ergond_process_cpu_s_sending": (pcpu_sent - pcpu0) as f64 / 1e9,
        "ergond_cpu_ms_draining": cpu_drain,
        "ergond_process_cpu_s_draining": (pcpu_drained - pcpu_sent) as f64 / 1e9,
        "ergond_core_pct_sending": (pcpu_sent - pcpu0) as f64 / 1e9 / send_s * 100.0,
        "rss_kib_before": rss0, "rss_kib_sending_end": rss_sent, "rss_kib_drained": rss_drained,
        "hwm_kib_sending_end": hwm_sent, "hwm_kib_drained": hwm_drained,
        "late_cgroups": late_cgroups,
        "machine_during_send": machine,
        "target_rate": RATE_TARGET, "rate_target_met": rate_met,
        "target_p99_us": P99_TARGET_US, "p99_target_met": p99_met,
    });
    // `Busy` is ergond's answer to overload, reported and judged against the targets above;
    // any other error, or a missing manifest of an accepted job, fails the run.
    (line, other_errors == 0 && got >= want)
}

// ---------------------------------------------------------------------------------------------
// Phase 2.

fn phase2(args: &Args) -> (Value, bool) {
    let node = build_node(&args.fake_nvml);
    let ergond = Ergond::start(&args.ergond, &node);
    let base = 300_000_000u32;
    // Warm-up: one whole job, so that lazily allocated state (the manifest path, the tracing
    // buffers, the worker's trace buffer) exists before the first RSS reading.
    let warm = base - 1;
    make_cgroup(&node.cgroup_root, warm);
    for mut req in job_events(warm) {
        stamp(&mut req);
        assert_eq!(oneshot(&node.socket, &req), Ok(Reply::Ok), "warm-up job");
    }
    let (n, _) = wait_for_manifests(&node.spool, 1);
    assert_eq!(n, 1, "warm-up manifest");
    let ids: Vec<u32> = (0..args.open_jobs).map(|i| base + i).collect();
    make_cgroups(&node.cgroup_root, ids.clone());
    std::thread::sleep(Duration::from_millis(500));
    let (rss0, hwm0) = ergond.rss_kib();

    // Open 256 jobs: JobStart + StepStart each, one after another.
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let t_open = Instant::now();
    for &id in &ids {
        let [mut js, mut ss, _, _] = job_events(id);
        for req in [&mut js, &mut ss] {
            stamp(req);
            let o = outcome(&oneshot(&node.socket, req), false);
            *outcomes.entry(o).or_insert(0) += 1;
        }
    }
    let open_s = t_open.elapsed().as_secs_f64();
    // Confirm every job is open, with its step.
    let mut confirmed = 0;
    for &id in &ids {
        let r = oneshot(&node.socket, &Request::QueryJob { job_id: id });
        if let Ok(Reply::Job(s)) = &r {
            if s.job_id == id && s.steps == [StepId::Batch] && s.uid == UID {
                confirmed += 1;
            }
        }
        let o = outcome(&r, true);
        *outcomes.entry(format!("query:{o}")).or_insert(0) += 1;
    }
    // Wait for the worker to take the readings (one "job started" line per job once its start
    // reading is in; the step's reading follows it in the same queue), then for RSS to settle.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(&node.log).unwrap_or_default();
        if log.matches("job started").count() > args.open_jobs as usize {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut last = ergond.rss_kib().0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let now = ergond.rss_kib().0;
        if now == last {
            break;
        }
        last = now;
    }
    let (rss1, hwm1) = ergond.rss_kib();
    let delta_kib = rss1 as i64 - rss0 as i64;

    // While they stay open, other jobs come and go: every event closes an attribution interval
    // for every open job (as the worker's periodic tick does once a second), so this is what
    // the 256 jobs hold after a while on a busy node, not just after their start.
    let churn: Vec<u32> = (0..args.churn_jobs).map(|i| base + 1_000_000 + i).collect();
    make_cgroups(&node.cgroup_root, churn.clone());
    let t_churn = Instant::now();
    for &id in &churn {
        for mut req in job_events(id) {
            stamp(&mut req);
            let o = outcome(&oneshot(&node.socket, &req), false);
            *outcomes.entry(o).or_insert(0) += 1;
        }
    }
    let (churned, at) = wait_for_manifests(&node.spool, 1 + churn.len());
    let churn_s = (at - t_churn).as_secs_f64();
    let churned = churned - 1;
    let mut last = ergond.rss_kib().0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let now = ergond.rss_kib().0;
        if now == last {
            break;
        }
        last = now;
    }
    let (rss_churn, hwm_churn) = ergond.rss_kib();

    // Then nothing happens for a while: what do the open jobs cost at rest (the worker's
    // periodic attribution, the journal)?
    let idle = Duration::from_secs_f64(args.idle_seconds);
    let (io0, cpu0, t_idle) = (
        ergond.write_bytes(),
        ergond.process_cpu_ns(),
        Instant::now(),
    );
    std::thread::sleep(idle);
    let idle_s = t_idle.elapsed().as_secs_f64();
    let idle_write_mib_s = ergond
        .write_bytes()
        .zip(io0)
        .map(|(b, a)| (b - a) as f64 / 1_048_576.0 / idle_s);
    let idle_core_pct = (ergond.process_cpu_ns() - cpu0) as f64 / 1e9 / idle_s * 100.0;
    let journal_bytes = std::fs::metadata(node.state.join("jobs.journal"))
        .map(|m| m.len())
        .ok();

    // End them all at once: StepEnd + JobEnd per job, from the client threads.
    let clients = args.clients.min(ids.len());
    let t_end = Instant::now();
    let end_outcomes: Vec<BTreeMap<String, u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let ids = &ids;
                let socket = &node.socket;
                s.spawn(move || {
                    let mut out: BTreeMap<String, u64> = BTreeMap::new();
                    for &id in ids.iter().skip(c).step_by(clients) {
                        let [_, _, mut se, mut je] = job_events(id);
                        for req in [&mut se, &mut je] {
                            stamp(req);
                            let o = outcome(&oneshot(socket, req), false);
                            *out.entry(o).or_insert(0) += 1;
                        }
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let replied_s = t_end.elapsed().as_secs_f64();
    for m in end_outcomes {
        for (o, n) in m {
            *outcomes.entry(o).or_insert(0) += n;
        }
    }
    let (got, at) = wait_for_manifests(&node.spool, 1 + churn.len() + args.open_jobs as usize);
    let manifests_s = (at - t_end).as_secs_f64();
    let got = got - 1 - churned;
    let manifest_bytes: u64 = ids
        .iter()
        .filter_map(|id| {
            std::fs::metadata(node.spool.join(format!("{CLUSTER}-{id}-{NODE}.json")))
                .ok()
                .map(|m| m.len())
        })
        .sum();
    std::thread::sleep(Duration::from_millis(500));
    let (rss2, hwm2) = ergond.rss_kib();
    let unexpected: u64 = outcomes
        .iter()
        .filter(|(o, _)| !o.ends_with("ok"))
        .map(|(_, n)| n)
        .sum();
    ergond.stop();
    let ok = unexpected == 0
        && confirmed == args.open_jobs
        && got == args.open_jobs as usize
        && churned == churn.len();
    let line = json!({
        "group": "ergond", "kind": "memory", "open_jobs": args.open_jobs,
        "open_s": open_s, "confirmed_open": confirmed,
        "rss_kib_before": rss0, "hwm_kib_before": hwm0,
        "rss_kib_open": rss1, "hwm_kib_open": hwm1,
        "rss_delta_kib": delta_kib,
        "bytes_per_open_job": delta_kib as f64 * 1024.0 / f64::from(args.open_jobs),
        "churn_jobs": churn.len(), "churn_manifests": churned, "churn_s": churn_s,
        "churn_jobs_per_s": churned as f64 / churn_s,
        "rss_kib_open_after_churn": rss_churn, "hwm_kib_open_after_churn": hwm_churn,
        "rss_delta_kib_after_churn": rss_churn as i64 - rss0 as i64,
        "bytes_per_open_job_after_churn":
            (rss_churn as i64 - rss0 as i64) as f64 * 1024.0 / f64::from(args.open_jobs),
        "idle_s": idle_s, "idle_write_mib_per_s": idle_write_mib_s,
        "idle_core_pct": idle_core_pct, "journal_bytes_idle": journal_bytes,
        "rss_kib_after_end": rss2, "hwm_kib_after_end": hwm2,
        "end_replies_s": replied_s,
        "manifests": got, "manifests_s": manifests_s,
        "manifests_per_s": got as f64 / manifests_s,
        "manifest_bytes_mean": manifest_bytes as f64 / got.max(1) as f64,
        "outcomes": outcomes, "unexpected": unexpected,
    });
    drop(node);
    (line, ok)
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let args = parse_args();
    let mut lines: Vec<Value> = Vec::new();
    let mut ok = true;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "==> ergond socket benchmark: {} clients, {} s per run, offered rate {} events/s (paced runs); load average {}",
        args.clients,
        args.seconds,
        args.rate,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    lines.push(json!({
        "group": "ergond", "kind": "meta", "clients": args.clients, "seconds": args.seconds,
        "rate": args.rate, "quick": args.quick, "gpus": GPUS, "rapl_zones": 4,
        "cpus": num_cpus(), "loadavg_start": load.trim(), "open_jobs": args.open_jobs,
    }));
    let mut out = Vec::new();
    if !args.memory_only {
        ok &= phase1(&args, &mut lines, &mut out);
    }
    eprintln!(
        "==> memory with {} open jobs (fresh ergond)",
        args.open_jobs
    );
    let (mem, mem_ok) = phase2(&args);
    ok &= mem_ok;
    out.push(format!(
        "memory: {} open jobs (confirmed open {}): RSS {} -> {} KiB, delta {} KiB = {:.0} bytes per job; \
         HWM {} KiB; after ending them RSS {} KiB",
        args.open_jobs,
        mem["confirmed_open"],
        mem["rss_kib_before"],
        mem["rss_kib_open"],
        mem["rss_delta_kib"],
        mem["bytes_per_open_job"].as_f64().unwrap_or(0.0),
        mem["hwm_kib_open"],
        mem["rss_kib_after_end"],
    ));
    out.push(format!(
        "after {} other jobs came and went ({:.0} jobs/s to manifest with {} open): RSS {} KiB, \
         delta {} KiB = {:.0} bytes per open job",
        mem["churn_jobs"],
        mem["churn_jobs_per_s"].as_f64().unwrap_or(0.0),
        args.open_jobs,
        mem["rss_kib_open_after_churn"],
        mem["rss_delta_kib_after_churn"],
        mem["bytes_per_open_job_after_churn"]
            .as_f64()
            .unwrap_or(0.0),
    ));
    out.push(format!(
        "then {:.1} s with nothing happening: ergond wrote {:.1} MiB/s (journal {:.1} MiB) and \
         used {:.1} % of a core",
        mem["idle_s"].as_f64().unwrap_or(0.0),
        mem["idle_write_mib_per_s"].as_f64().unwrap_or(f64::NAN),
        mem["journal_bytes_idle"].as_f64().unwrap_or(f64::NAN) / 1_048_576.0,
        mem["idle_core_pct"].as_f64().unwrap_or(0.0),
    ));
    out.push(format!(
        "ending all {}: replies in {:.3} s, {} manifests in the spool after {:.3} s ({:.0} manifests/s, {:.0} bytes each); unexpected replies {}",
        args.open_jobs,
        mem["end_replies_s"].as_f64().unwrap_or(0.0),
        mem["manifests"],
        mem["manifests_s"].as_f64().unwrap_or(0.0),
        mem["manifests_per_s"].as_f64().unwrap_or(0.0),
        mem["manifest_bytes_mean"].as_f64().unwrap_or(0.0),
        mem["unexpected"],
    ));
    lines.push(mem);
    println!();
    for l in &out {
        println!("{l}");
    }
    if let Some(path) = &args.json {
        let mut f = std::fs::File::create(path).expect("create the JSON file");
        for l in &lines {
            writeln!(f, "{l}").unwrap();
        }
        println!("\nresults: {}", path.display());
    }
    if !ok {
        eprintln!(
            "FAILED: some replies were errors other than Busy, or manifests of accepted jobs are \
             missing (see outcomes in the JSON lines)"
        );
        std::process::exit(1);
    }
}

/// Phase 1 on one ergond (the spool accumulates): a warm-up, then each run. Pushes the JSON
/// lines and the printed table; returns whether every reply was the expected one.
fn phase1(args: &Args, lines: &mut Vec<Value>, out: &mut Vec<String>) -> bool {
    let mut ok = true;
    let node = build_node(&args.fake_nvml);
    // The paced runs first, while ergond's registry holds only what they open; the saturating
    // runs fill it to its limit. The paced runs alternate, control then job events, `repeats`
    // times: each pair gives one latency ratio, and the target is on their median.
    let mut modes = Vec::new();
    for _ in 0..args.repeats {
        modes.extend([Mode::PingPaced, Mode::OneshotPaced]);
    }
    modes.extend([Mode::OneshotSaturate, Mode::PersistentSaturate]);
    // Cgroups for every job the runs may start: a generous estimate per run, created before
    // the timed runs (a client that runs out creates the rest itself, counted as late).
    let per_client = |mode: Mode| -> u32 {
        let jobs_per_s = match mode {
            Mode::OneshotPaced => args.rate / 4.0 * 1.05,
            Mode::OneshotSaturate => 3_000.0,
            Mode::PersistentSaturate => 5_000.0,
            Mode::PingPaced => return 0,
        };
        ((args.seconds * jobs_per_s) / args.clients as f64).ceil() as u32 + 2
    };
    // Job ids: run i from 1,000,000 + i × 10,000,000 (a run opens fewer than 10 million jobs).
    let bases: Vec<u32> = (0..modes.len() as u32)
        .map(|i| 1_000_000 + i * 10_000_000)
        .collect();
    let warm_base = 4_000_000_000u32;
    let warm_n = 4u32;
    let clients = args.clients as u32;
    let mut ids = Vec::new();
    for (m, &base) in modes.iter().zip(&bases) {
        ids.extend((0..per_client(*m) * clients).map(|i| base + i));
    }
    ids.extend((0..warm_n * clients).map(|i| warm_base + i));
    // ergond first: at its start it takes on the jobs it finds in the cgroup tree (jobs that
    // were running before it), and these are not running jobs yet.
    let ergond = Ergond::start(&args.ergond, &node);
    let (rss_start, _) = ergond.rss_kib();
    let n_cgroups = ids.len();
    let made = make_cgroups(&node.cgroup_root, ids);
    eprintln!("    {n_cgroups} step cgroups created in {made:.2?}");
    // Warm-up (not recorded): a few jobs per client.
    let warm = RunSpec {
        socket: &node.socket,
        cgroup_root: &node.cgroup_root,
        mode: Mode::OneshotSaturate,
        clients: args.clients,
        seconds: 0.3,
        rate: args.rate,
        base: warm_base,
        precreated: warm_n,
    };
    let (w, w_ok) = run_phase1(&warm, &ergond, &node.spool, 0);
    if !w_ok {
        eprintln!(
            "warm-up: unexpected replies or missing manifests: {}",
            w["outcomes"]
        );
    }
    let mut manifests = count_manifests(&node.spool);
    out.push(format!(
        "ergond socket, {} clients, {} s per run (targets: >= {RATE_TARGET:.0} events/s, p99 <= \
         {P99_TARGET_US:.0} µs)",
        args.clients, args.seconds
    ));
    out.push(
        "| run                 | replies/s | accepted/s | p50 µs  | p99 µs   | p999 µs  | max µs   | not ok | 1st Busy | drain    | jobs/s | ergond cores | others cores |"
            .into(),
    );
    out.push(
        "|---------------------|-----------|------------|---------|----------|----------|----------|--------|----------|----------|--------|--------------|--------------|"
            .into(),
    );
    let mut paced_lines = Vec::new();
    let mut runs: Vec<(Mode, Value)> = Vec::new();
    for (i, (mode, &base)) in modes.iter().zip(&bases).enumerate() {
        let label = if mode.paced() {
            format!("{} #{}", mode.name(), i / 2 + 1)
        } else {
            mode.name().to_string()
        };
        eprintln!("==> {label} for {} s", args.seconds);
        let spec = RunSpec {
            socket: &node.socket,
            cgroup_root: &node.cgroup_root,
            mode: *mode,
            clients: args.clients,
            seconds: args.seconds,
            rate: args.rate,
            base,
            precreated: per_client(*mode),
        };
        let (mut line, run_ok) = run_phase1(&spec, &ergond, &node.spool, manifests);
        if mode.paced() {
            line["pair"] = json!(i / 2 + 1);
        }
        manifests = count_manifests(&node.spool);
        ok &= run_ok;
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let l = &line["latency"];
        out.push(format!(
            "| {:<19} | {:>9.0} | {:>10.0} | {:>7.1} | {:>8.1} | {:>8.1} | {:>8.1} | {:>6} | {:>8} | {:>6.2} s | {:>6.0} | {:>12.2} | {:>12.2} |",
            label,
            f(&line["events_per_s"]),
            f(&line["ok_events_per_s"]),
            f(&l["p50_us"]),
            f(&l["p99_us"]),
            f(&l["p999_us"]),
            f(&l["max_us"]),
            line["unexpected"].as_u64().unwrap_or(0),
            line["first_busy_s"]
                .as_f64()
                .map_or("-".to_string(), |s| format!("{s:.2} s")),
            f(&line["drain_s"]),
            f(&line["jobs_per_s_to_manifest"]),
            f(&line["machine_during_send"]["ergond_cores"]),
            f(&line["machine_during_send"]["other_processes_cores"]),
        ));
        if mode.paced() {
            let s = &line["latency_from_schedule"];
            paced_lines.push(format!(
                "{label}: latency from the scheduled instant p50 {:.1} µs, p99 {:.1} µs, p999 {:.1} µs, max {:.1} µs",
                f(&s["p50_us"]),
                f(&s["p99_us"]),
                f(&s["p999_us"]),
                f(&s["max_us"]),
            ));
        }
        eprintln!(
            "    {:.0} replies/s ({:.0} accepted/s), p99 {:.1} µs, outcomes {}, drain {:.2} s, \
             ergond thread CPU ms {}, cores busy {}",
            f(&line["events_per_s"]),
            f(&line["ok_events_per_s"]),
            f(&l["p99_us"]),
            line["outcomes"],
            f(&line["drain_s"]),
            line["ergond_cpu_ms_sending"],
            line["machine_during_send"],
        );
        runs.push((*mode, line.clone()));
        lines.push(line);
    }
    out.extend(latency_ratios(&runs, lines));
    let run = |m: Mode| runs.iter().find(|(k, _)| *k == m).map(|(_, l)| l);
    let verdict = |b: bool| if b { "met" } else { "MISSED" };
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    if let (Some(sat), Some(paced), Some(ping)) = (
        run(Mode::OneshotSaturate),
        run(Mode::OneshotPaced),
        run(Mode::PingPaced),
    ) {
        out.push(format!(
            "target >= {RATE_TARGET:.0} events/s: oneshot-saturate accepted {:.0}/s over {:.1} s \
             ({}, {} Busy); oneshot-paced at {:.0}/s: {} not ok, drain {:.2} s ({})",
            f(&sat["ok_events_per_s"]),
            f(&sat["seconds"]),
            verdict(sat["rate_target_met"] == true),
            sat["busy"],
            f(&paced["offered_rate"]),
            paced["unexpected"],
            f(&paced["drain_s"]),
            verdict(paced["rate_target_met"] == true),
        ));
        out.push(format!(
            "target p99 <= {P99_TARGET_US:.0} µs: oneshot-paced p99 {:.1} µs ({}); ping-paced \
             control p99 {:.1} µs ({}); oneshot-saturate p99 {:.1} µs ({}; 64 clients without \
             pause wait about 64 / throughput each)",
            f(&paced["latency"]["p99_us"]),
            verdict(paced["p99_target_met"] == true),
            f(&ping["latency"]["p99_us"]),
            verdict(ping["p99_target_met"] == true),
            f(&sat["latency"]["p99_us"]),
            verdict(sat["p99_target_met"] == true),
        ));
    }
    let (rss_end, hwm_end) = ergond.rss_kib();
    let stop_s = ergond.stop().as_secs_f64();
    let (warns, warn_kinds) = log_problems(&node.log);
    out.extend(paced_lines);
    out.push(format!(
        "phase 1 ergond RSS {rss_start} -> {rss_end} KiB (HWM {hwm_end} KiB); {warns} warnings \
         or errors in its log: {}",
        serde_json::to_string(&warn_kinds).unwrap_or_default()
    ));
    lines.push(
        json!({"group": "ergond", "kind": "phase1_process", "rss_kib_start": rss_start,
        "rss_kib_end": rss_end, "hwm_kib_end": hwm_end, "stop_s": stop_s,
        "log_warnings_and_errors": warns, "log_problem_kinds": warn_kinds,
        "manifests_in_spool": manifests}),
    );
    ok
}

/// The latency target restated as a ratio (issue "one energy path…", performance targets): for
/// each pair of paced runs, the job events' p50 and p99 reply latency over the ping control's
/// (same clients, same offered rate, same ergond, one right after the other); the target is
/// the median of the pairs' ratios <= [`LATENCY_RATIO_TARGET`] for both. Also checks that every
/// job event of the paced runs was accepted. Pushes one JSON line; returns the printed lines.
fn latency_ratios(runs: &[(Mode, Value)], lines: &mut Vec<Value>) -> Vec<String> {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let pings = runs.iter().filter(|(m, _)| *m == Mode::PingPaced);
    let events = runs.iter().filter(|(m, _)| *m == Mode::OneshotPaced);
    let mut pairs = Vec::new();
    for ((_, ping), (_, ev)) in pings.zip(events) {
        let (p, e) = (&ping["latency"], &ev["latency"]);
        pairs.push((
            f(&e["p50_us"]) / f(&p["p50_us"]),
            f(&e["p99_us"]) / f(&p["p99_us"]),
            ev["unexpected"].as_u64().unwrap_or(u64::MAX) == 0 && ev["busy"].as_u64() == Some(0),
        ));
    }
    if pairs.is_empty() {
        return Vec::new();
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let p50 = median(pairs.iter().map(|p| p.0).collect());
    let p99 = median(pairs.iter().map(|p| p.1).collect());
    let all_accepted = pairs.iter().all(|p| p.2);
    let met = p50 <= LATENCY_RATIO_TARGET && p99 <= LATENCY_RATIO_TARGET && all_accepted;
    lines.push(json!({
        "group": "ergond", "kind": "latency_ratio", "pairs": pairs.len(),
        "p50_ratios": pairs.iter().map(|p| p.0).collect::<Vec<_>>(),
        "p99_ratios": pairs.iter().map(|p| p.1).collect::<Vec<_>>(),
        "p50_ratio_median": p50, "p99_ratio_median": p99,
        "every_event_accepted": all_accepted,
        "target": format!("median job-event/ping latency ratio <= {LATENCY_RATIO_TARGET} for p50 and p99, every event accepted"),
        "target_met": met,
    }));
    let list = |k: usize| {
        pairs
            .iter()
            .map(|p| format!("{:.2}", if k == 0 { p.0 } else { p.1 }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![format!(
        "target: job events' latency within {LATENCY_RATIO_TARGET}× the ping control's (median          over {} pairs): p50 ratio {p50:.2} ({}), p99 ratio {p99:.2} ({}); every event accepted:          {all_accepted} — {}",
        pairs.len(),
        list(0),
        list(1),
        if met { "met" } else { "MISSED" }
    )]
}

/// WARN and ERROR lines in ergond's log: how many, and how many of each message (the text
/// before the first field, digits dropped).
fn log_problems(log: &Path) -> (usize, BTreeMap<String, u64>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut kinds = BTreeMap::new();
    let mut n = 0;
    for l in text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        n += 1;
        let msg = l
            .split_once(": ")
            .map_or(l, |(_, m)| m)
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(80)
            .collect::<String>();
        *kinds.entry(msg).or_insert(0) += 1;
    }
    (n, kinds)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
