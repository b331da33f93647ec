//! Benchmark: what one lifecycle notification adds to a Slurm job (issue "SPANK plugin",
//! section Benchmarks). Run through `scripts/bench spank`; by hand:
//!
//! ```text
//! cargo run --release -p spank-ergon --example bench_events -- [--quick] [--json PATH]
//! ```
//!
//! Every event is sent with [`spank_ergon::client::notify`], the call the plugin's hooks make,
//! with requests shaped like the real ones (a `StepStart` carries ten cgroup paths parsed from a
//! `/proc/<pid>/cgroup` text the way the plugin does), against:
//!
//! - `ok`: an in-process listener thread that answers `Reply::Ok` at once (the latency a healthy
//!   ergond adds, minus ergond's own work);
//! - `hung-accepted`: a listener that accepts and never answers;
//! - `hung-backlog`: a listener that never calls `accept`, so the connection waits in its backlog;
//! - `absent`: no socket file (ENOENT);
//! - `refused`: a socket file nobody listens on (ECONNREFUSED).
//!
//! Prints a table and, with `--json PATH`, writes one JSON object per line: a `meta` line, then
//! one line per case and event kind.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ergon_protocol::{
    encode_frame, parse_proc_cgroup, read_frame, write_frame, CpuSet, GpuAlloc, JobEnd, JobIds,
    JobStart, Reply, ReportFormat, Request, StepEnd, StepId, StepStart, Timestamp,
};
use spank_ergon::client::{notify, SendError};
use spank_ergon::config::DEFAULT_TIMEOUT_MS;

/// Slack over the timeout the issue allows a hung or missing daemon to add.
const BOUND_SLACK_MS: u64 = 5;
/// Target for the p99 latency with a listener that answers at once.
const OK_P99_TARGET_US: f64 = 1000.0;

struct Args {
    json: Option<PathBuf>,
    quick: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        json: None,
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => args.json = Some(PathBuf::from(it.next().unwrap_or_else(|| usage()))),
            "--quick" => args.quick = true,
            // `cargo bench` passes --bench; accept it so the binary also runs that way.
            "--bench" => {}
            _ => usage(),
        }
    }
    args
}

fn usage() -> ! {
    eprintln!("usage: bench_events [--quick] [--json PATH]");
    std::process::exit(2)
}

/// The four lifecycle events with realistic field sizes, in the order a job sends them.
fn events() -> Vec<(&'static str, Request)> {
    let job_id = 1_234_567;
    let node = "node0042".to_string();
    let start = JobStart {
        ids: JobIds {
            job_id,
            array_job_id: Some(1_234_500),
            array_task_id: Some(67),
        },
        uid: 10_042,
        gid: 10_000,
        user: "alice.researcher".into(),
        account: Some("physics-lab-2025".into()),
        partition: Some("gpu-a100".into()),
        cluster: Some("ergon-cluster".into()),
        node: node.clone(),
        gpus: vec![
            GpuAlloc {
                index: 0,
                minor: Some(0),
                mig: None,
            },
            GpuAlloc {
                index: 1,
                minor: Some(1),
                mig: None,
            },
        ],
        cpus: CpuSet::parse("0-15,32-47").expect("cpu list"),
        report: Some(ReportFormat::Json),
        work_dir: Some("/home/alice.researcher/projects/climate-sim/run-042".into()),
        stdout_path: Some(
            "/home/alice.researcher/projects/climate-sim/run-042/slurm-1234567_67.out".into(),
        ),
        time: Timestamp::now(),
        sluid: None,
        node_list: None,
    };
    // What task 0 of a batch step sees in /proc/<pid>/cgroup under Slurm 22.05 with cgroup/v1:
    // eight hierarchies, ten entries (cpu,cpuacct and net_cls,net_prio each give two).
    let task = format!("/slurm_{node}/uid_10042/job_{job_id}/step_batch/task_0");
    let step_dir = format!("/slurm_{node}/uid_10042/job_{job_id}/step_batch");
    let proc_cgroup = format!(
        "12:memory:{task}\n\
         11:cpuset:{step_dir}\n\
         10:devices:{step_dir}\n\
         9:freezer:{step_dir}\n\
         8:cpu,cpuacct:{task}\n\
         7:pids:/system.slice/slurmd.service\n\
         6:net_cls,net_prio:/\n\
         1:name=systemd:/system.slice/slurmd.service\n"
    );
    let cgroups = parse_proc_cgroup(&proc_cgroup).expect("cgroup text");
    assert_eq!(cgroups.len(), 10, "cgroup fixture");
    let step_start = StepStart {
        cluster: None,
        job_id,
        array_job_id: Some(1_234_500),
        array_task_id: Some(67),
        step: StepId::Batch,
        uid: 10_042,
        node: node.clone(),
        cgroups,
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
        node: node.clone(),
        exit_status: Some(0),
        time: Timestamp::now(),
    };
    let job_end = JobEnd {
        cluster: None,
        job_id,
        node,
        time: Timestamp::now(),
    };
    vec![
        ("JobStart", Request::JobStart(start)),
        ("StepStart", Request::StepStart(step_start)),
        ("StepEnd", Request::StepEnd(step_end)),
        ("JobEnd", Request::JobEnd(job_end)),
    ]
}

/// The request as the plugin would send it now: stamped just before the call.
fn stamped(req: &Request) -> Request {
    let mut req = req.clone();
    let now = Timestamp::now();
    match &mut req {
        Request::JobStart(e) => e.time = now,
        Request::StepStart(e) => e.time = now,
        Request::StepEnd(e) => e.time = now,
        Request::JobEnd(e) => e.time = now,
        _ => {}
    }
    req
}

/// A short name for how one call ended.
fn outcome(r: &Result<(), SendError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(SendError::Connect(e)) => match e.raw_os_error() {
            Some(libc::ENOENT) => "connect:ENOENT".into(),
            Some(libc::ECONNREFUSED) => "connect:ECONNREFUSED".into(),
            Some(n) => format!("connect:errno{n}"),
            None => "connect".into(),
        },
        Err(SendError::Busy) => "busy".into(),
        Err(SendError::Timeout(_)) => "timeout".into(),
        Err(SendError::Frame(_)) => "frame".into(),
        Err(SendError::Refused(..)) => "refused".into(),
        Err(SendError::Unexpected(_)) => "unexpected".into(),
    }
}

/// Durations and outcomes of one case and one event kind.
#[derive(Default)]
struct Samples {
    ns: Vec<u64>,
    outcomes: Vec<(String, usize)>,
}

impl Samples {
    fn push(&mut self, d: Duration, outcome: String) {
        self.ns.push(d.as_nanos() as u64);
        match self.outcomes.iter_mut().find(|(o, _)| *o == outcome) {
            Some((_, n)) => *n += 1,
            None => self.outcomes.push((outcome, 1)),
        }
    }

    fn merge(all: &[&Samples]) -> Samples {
        let mut out = Samples::default();
        for s in all {
            out.ns.extend_from_slice(&s.ns);
            for (o, n) in &s.outcomes {
                match out.outcomes.iter_mut().find(|(p, _)| p == o) {
                    Some((_, m)) => *m += n,
                    None => out.outcomes.push((o.clone(), *n)),
                }
            }
        }
        out
    }
}

/// Percentiles (nearest rank) in µs.
struct Stats {
    n: usize,
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn stats(ns: &[u64]) -> Stats {
    let mut v = ns.to_vec();
    v.sort_unstable();
    let n = v.len();
    let pct = |p: f64| {
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        v[rank.clamp(1, n) - 1] as f64 / 1000.0
    };
    Stats {
        n,
        min: v[0] as f64 / 1000.0,
        p50: pct(50.0),
        p90: pct(90.0),
        p99: pct(99.0),
        max: v[n - 1] as f64 / 1000.0,
        mean: v.iter().sum::<u64>() as f64 / n as f64 / 1000.0,
    }
}

/// One result row: printed in the table and written as one JSON line.
struct Row {
    case: &'static str,
    event: &'static str,
    timeout_ms: u64,
    expected: &'static str,
    samples: Samples,
}

impl Row {
    fn unexpected(&self) -> usize {
        self.samples
            .outcomes
            .iter()
            .filter(|(o, _)| o != self.expected)
            .map(|(_, n)| n)
            .sum()
    }

    /// The issue's target for this case and whether it holds.
    fn target(&self, s: &Stats) -> (String, bool) {
        if self.case == "ok" {
            (
                format!("p99 <= {OK_P99_TARGET_US:.0} us"),
                s.p99 <= OK_P99_TARGET_US,
            )
        } else {
            let bound = (self.timeout_ms + BOUND_SLACK_MS) as f64 * 1000.0;
            (
                format!("max <= {} ms", self.timeout_ms + BOUND_SLACK_MS),
                s.max <= bound,
            )
        }
    }

    fn json(&self) -> String {
        let s = stats(&self.samples.ns);
        let (target, met) = self.target(&s);
        let mut o = String::new();
        let _ = write!(
            o,
            "{{\"group\":\"spank\",\"kind\":\"notify\",\"case\":{},\"event\":{},\"n\":{},\
             \"timeout_ms\":{},\"min_us\":{:.1},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\
             \"max_us\":{:.1},\"mean_us\":{:.1}",
            js(self.case),
            js(self.event),
            s.n,
            self.timeout_ms,
            s.min,
            s.p50,
            s.p90,
            s.p99,
            s.max,
            s.mean
        );
        if self.case != "ok" {
            let t = self.timeout_ms as f64 * 1000.0;
            let _ = write!(
                o,
                ",\"overshoot_p50_ms\":{:.3},\"overshoot_max_ms\":{:.3}",
                (s.p50 - t) / 1000.0,
                (s.max - t) / 1000.0
            );
        }
        let outcomes = self
            .samples
            .outcomes
            .iter()
            .map(|(k, n)| format!("{}:{n}", js(k)))
            .collect::<Vec<_>>()
            .join(",");
        let _ = write!(
            o,
            ",\"expected\":{},\"outcomes\":{{{outcomes}}},\"unexpected\":{},\"target\":{},\
             \"target_met\":{}}}",
            js(self.expected),
            self.unexpected(),
            js(&target),
            met && self.unexpected() == 0
        );
        o
    }
}

/// A JSON string literal.
fn js(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Sends `n` events (cycling through the four kinds) after `warmup` unmeasured ones; returns the
/// samples per kind.
fn run(
    socket: &Path,
    timeout: Duration,
    events: &[(&'static str, Request)],
    warmup: usize,
    n: usize,
) -> Vec<Samples> {
    let mut per_kind: Vec<Samples> = events.iter().map(|_| Samples::default()).collect();
    for i in 0..warmup + n {
        let k = i % events.len();
        let req = stamped(&events[k].1);
        let t = Instant::now();
        let r = notify(socket, timeout, &req);
        let d = t.elapsed();
        if i >= warmup {
            per_kind[k].push(d, outcome(&r));
        }
    }
    per_kind
}

/// Rows for one case: one per event kind, then `all`.
fn rows(
    case: &'static str,
    expected: &'static str,
    timeout: Duration,
    events: &[(&'static str, Request)],
    per_kind: Vec<Samples>,
    per_kind_rows: bool,
) -> Vec<Row> {
    let timeout_ms = timeout.as_millis() as u64;
    let mut out = Vec::new();
    let all = Samples::merge(&per_kind.iter().collect::<Vec<_>>());
    if per_kind_rows {
        for ((name, _), samples) in events.iter().zip(per_kind) {
            out.push(Row {
                case,
                event: name,
                timeout_ms,
                expected,
                samples,
            });
        }
    }
    out.push(Row {
        case,
        event: "all",
        timeout_ms,
        expected,
        samples: all,
    });
    out
}

/// A listener thread that answers every request with `Reply::Ok` at once, one connection at a
/// time (the client is sequential). Stopped by setting the flag and connecting once.
fn ok_listener(path: &Path) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let listener = UnixListener::bind(path).expect("bind ok listener");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        for conn in listener.incoming() {
            if flag.load(Ordering::Relaxed) {
                break;
            }
            let Ok(mut s) = conn else { continue };
            if read_frame::<_, Request>(&mut s).is_ok() {
                let _ = write_frame(&mut s, &Reply::Ok);
            }
        }
    });
    (stop, handle)
}

/// A listener thread that accepts every connection and keeps it open without answering.
fn hung_listener(path: &Path) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let listener = UnixListener::bind(path).expect("bind hung listener");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        let mut held: Vec<UnixStream> = Vec::new();
        for conn in listener.incoming() {
            if flag.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(s) = conn {
                held.push(s);
            }
        }
    });
    (stop, handle)
}

fn stop_listener(path: &Path, (stop, handle): (Arc<AtomicBool>, JoinHandle<()>)) {
    stop.store(true, Ordering::Relaxed);
    let _ = UnixStream::connect(path);
    let _ = handle.join();
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<14} {:<10} {:>5} {:>10} {:>10} {:>10} {:>10}  {:<24} target",
        "case", "event", "n", "p50", "p90", "p99", "max", "outcomes"
    );
    for r in rows {
        let s = stats(&r.samples.ns);
        let (target, met) = r.target(&s);
        let fmt = |us: f64| {
            if r.case == "ok" || us < 10_000.0 {
                format!("{us:.1} us")
            } else {
                format!("{:.2} ms", us / 1000.0)
            }
        };
        let outcomes = r
            .samples
            .outcomes
            .iter()
            .map(|(o, n)| format!("{o}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        let verdict = if met && r.unexpected() == 0 {
            "ok"
        } else {
            "MISSED"
        };
        println!(
            "{:<14} {:<10} {:>5} {:>10} {:>10} {:>10} {:>10}  {:<24} {target}: {verdict}",
            r.case,
            r.event,
            s.n,
            fmt(s.p50),
            fmt(s.p90),
            fmt(s.p99),
            fmt(s.max),
            outcomes
        );
    }
}

fn main() {
    let args = parse_args();
    let (n_ok, n_hung, n_none, warmup) = if args.quick {
        (1000, 5, 200, 50)
    } else {
        (5000, 20, 1000, 200)
    };
    let timeout = Duration::from_millis(DEFAULT_TIMEOUT_MS);
    let v = spank_ergon::SLURM_VERSION_NUMBER;
    println!(
        "spank_ergon built for Slurm {}.{:02}.{} (SLURM_VERSION_NUMBER {v:#x})",
        v >> 16,
        (v >> 8) & 0xff,
        v & 0xff
    );
    let dir = std::env::temp_dir().join(format!("ergon-bench-spank-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let events = events();

    let mut all_rows = Vec::new();

    // (a) a listener that answers at once.
    let path = dir.join("ok.sock");
    let l = ok_listener(&path);
    let per_kind = run(&path, timeout, &events, warmup, n_ok);
    stop_listener(&path, l);
    all_rows.extend(rows("ok", "ok", timeout, &events, per_kind, true));

    // (b) hung: accepted and never answered; never accepted (waits in the backlog).
    let path = dir.join("hung.sock");
    let l = hung_listener(&path);
    let per_kind = run(&path, timeout, &events, 1, n_hung);
    stop_listener(&path, l);
    all_rows.extend(rows(
        "hung-accepted",
        "timeout",
        timeout,
        &events,
        per_kind,
        false,
    ));

    let path = dir.join("backlog.sock");
    let listener = UnixListener::bind(&path).expect("bind backlog listener");
    let per_kind = run(&path, timeout, &events, 1, n_hung);
    drop(listener);
    all_rows.extend(rows(
        "hung-backlog",
        "timeout",
        timeout,
        &events,
        per_kind,
        false,
    ));

    // (c) no listener: no socket file; a socket file nobody listens on.
    let path = dir.join("absent.sock");
    let per_kind = run(&path, timeout, &events, warmup, n_none);
    all_rows.extend(rows(
        "absent",
        "connect:ENOENT",
        timeout,
        &events,
        per_kind,
        false,
    ));

    let path = dir.join("refused.sock");
    drop(UnixListener::bind(&path).expect("bind refused socket")); // leaves the file behind
    let per_kind = run(&path, timeout, &events, warmup, n_none);
    all_rows.extend(rows(
        "refused",
        "connect:ECONNREFUSED",
        timeout,
        &events,
        per_kind,
        false,
    ));

    let _ = std::fs::remove_dir_all(&dir);

    let frames = events
        .iter()
        .map(|(name, req)| {
            let len = encode_frame(req).map(|f| f.len()).unwrap_or(0);
            format!("{}:{len}", js(name))
        })
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "spank plugin: client::notify per event (timeout {} ms{})",
        timeout.as_millis(),
        if args.quick { ", quick" } else { "" }
    );
    print_table(&all_rows);

    let missed = all_rows
        .iter()
        .filter(|r| {
            let s = stats(&r.samples.ns);
            !r.target(&s).1 || r.unexpected() != 0
        })
        .count();
    if let Some(path) = &args.json {
        let mut f = std::fs::File::create(path)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        let _ = writeln!(
            f,
            "{{\"group\":\"spank\",\"kind\":\"meta\",\"quick\":{},\"timeout_ms\":{},\
             \"slurm_version_number\":\"{:#x}\",\
             \"frame_bytes\":{{{frames}}},\"rows_missing_target\":{missed}}}",
            args.quick,
            timeout.as_millis(),
            spank_ergon::SLURM_VERSION_NUMBER
        );
        for r in &all_rows {
            let _ = writeln!(f, "{}", r.json());
        }
    }
}
