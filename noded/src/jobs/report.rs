//! The user's report for `--energy-report`: a summary of the job's manifest, written at the
//! job's end **as the job's user**.
//!
//! Where it goes (per node):
//! - `text` on the node that ran the batch script: appended to the job's stdout file (the
//!   file behind the batch script's `/proc/<pid>/fd/1` when the plugin's StepStart named the
//!   task, else `SLURM_JOB_STDOUT`), so it is the last thing in `slurm-<jobid>.out`;
//! - otherwise (a `json` report, a node without the batch step, an `srun`/`salloc` job
//!   whose stdout is a terminal, or a stdout file that cannot be appended to):
//!   `ergon-<jobid>.txt` / `.json` in the job's working directory, or
//!   `ergon-<jobid>.<node>.txt` / `.json` from the nodes that did not run the batch script.
//!
//! How it is written: a child process is forked, drops to the job's uid and gid (and no
//! supplementary groups) and only then opens the file — `O_NOFOLLOW` (a symlink is refused),
//! `O_NONBLOCK` and a regular-file check (a FIFO or device is refused), and for the new file
//! `O_CREAT | O_EXCL` (nothing existing is replaced). So the kernel checks every access with the
//! user's own rights: ergond never writes into a user's directory as root. The child only makes
//! raw system calls between `fork` and `_exit` (ergond is multi-threaded). The parent waits at
//! most [`WRITE_TIMEOUT`] (a hung NFS server) and then kills it.

use std::ffi::CString;
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ergon_protocol::{Manifest, ReportFormat, StepId};
use serde::Serialize;

/// Longest wait for the writing child.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a report is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Appended to an existing regular file (the job's stdout).
    Append(PathBuf),
    /// A new file; an existing one (or a symlink) is not replaced.
    Create(PathBuf),
}

impl Target {
    /// The file.
    pub fn path(&self) -> &Path {
        match self {
            Target::Append(p) | Target::Create(p) => p,
        }
    }
}

/// Where the report of `manifest` goes, in order of preference; empty when the job gave
/// neither a stdout file nor a working directory (nothing can be written).
pub fn targets(
    manifest: &Manifest,
    format: ReportFormat,
    stdout_path: Option<&str>,
    work_dir: Option<&str>,
    ran_batch: bool,
) -> Vec<Target> {
    let mut out = Vec::new();
    let absolute = |s: &str| {
        let p = Path::new(s);
        (p.is_absolute() && !s.contains('\0')).then(|| p.to_path_buf())
    };
    if format == ReportFormat::Text && ran_batch {
        if let Some(p) = stdout_path.and_then(absolute) {
            out.push(Target::Append(p));
        }
    }
    if let Some(dir) = work_dir.and_then(absolute) {
        let ext = match format {
            ReportFormat::Text => "txt",
            ReportFormat::Json => "json",
        };
        let name = if ran_batch {
            format!("ergon-{}.{ext}", manifest.job.job_id)
        } else {
            format!("ergon-{}.{}.{ext}", manifest.job.job_id, manifest.node)
        };
        out.push(Target::Create(dir.join(name)));
    }
    out
}

fn energy(j: f64) -> String {
    let a = j.abs();
    if a >= 1e9 {
        format!("{:.2} GJ", j / 1e9)
    } else if a >= 1e6 {
        format!("{:.2} MJ", j / 1e6)
    } else if a >= 1e3 {
        format!("{:.2} kJ", j / 1e3)
    } else {
        format!("{j:.1} J")
    }
}

fn opt_energy(j: Option<f64>) -> String {
    j.map_or_else(|| "not measured".to_owned(), energy)
}

fn duration(s: f64) -> String {
    let t = s.max(0.0).round() as u64;
    format!("{:02}:{:02}:{:02}", t / 3600, (t / 60) % 60, t % 60)
}

fn step_name(job_id: u32, s: StepId) -> String {
    format!("{job_id}.{s}")
}

/// The text report.
pub fn render_text(m: &Manifest, manifest_path: Option<&Path>) -> String {
    let mut s = String::new();
    let t = &m.totals;
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "==== ergon energy report: job {} on {} ({}) ====",
        m.job.job_id, m.node, m.cluster
    );
    let _ = writeln!(
        s,
        "Duration   {} ({:.1} s)    coverage {:.1} %",
        duration(m.duration_s),
        m.duration_s,
        m.coverage.fraction * 100.0
    );
    let _ = writeln!(
        s,
        "Energy     {}    average {:.1} W, peak {:.1} W",
        energy(t.energy_j),
        t.avg_w,
        t.peak_w
    );
    let _ = writeln!(
        s,
        "  GPU      {}{}",
        opt_energy(t.gpu_j),
        if m.gpus.is_empty() {
            String::new()
        } else {
            format!("    {} GPU(s)", m.gpus.len())
        }
    );
    for g in &m.gpus {
        let _ = writeln!(
            s,
            "    gpu{} {}{}: {}, average {}, peak {}{}",
            g.index,
            g.uuid,
            g.minor
                .map_or_else(String::new, |n| format!(" (minor {n})")),
            opt_energy(g.energy_j),
            g.avg_w
                .map_or_else(|| "n/a".into(), |w| format!("{w:.1} W")),
            g.peak_w
                .map_or_else(|| "n/a".into(), |w| format!("{w:.1} W")),
            match &g.mig {
                Some(mig) => format!(" [MIG {}]", mig.describe()),
                None if g.shared => " [shared: estimated]".to_owned(),
                None => String::new(),
            }
        );
    }
    let _ = writeln!(s, "  CPU      {}", opt_energy(t.cpu_j));
    for k in &m.sockets {
        let _ = writeln!(
            s,
            "    socket {}: package {}, DRAM {}",
            k.socket,
            energy(k.package_j),
            opt_energy(k.dram_j)
        );
    }
    let _ = writeln!(s, "  DRAM     {}", opt_energy(t.dram_j));
    if !m.steps.is_empty() {
        let _ = writeln!(s, "Steps");
        for st in &m.steps {
            let secs = st.end_unix_ns.saturating_sub(st.start_unix_ns) as f64 / 1e9;
            let _ = writeln!(
                s,
                "  {:<16} {:>10}  over {}",
                step_name(m.job.job_id, st.step),
                energy(st.energy_j),
                duration(secs)
            );
        }
    }
    let _ = writeln!(
        s,
        "Node       {} measured on the node over the job; {} idle, {} unattributed",
        energy(m.node_context.node_energy_j),
        energy(m.node_context.idle_j),
        energy(m.node_context.unattributed_j)
    );
    let _ = writeln!(
        s,
        "Method     {} v{}{}",
        m.attribution.model,
        m.attribution.version,
        if m.attribution.estimated {
            " (parts estimated)"
        } else {
            ""
        }
    );
    for g in &m.coverage.gaps {
        let _ = writeln!(
            s,
            "Gap        {:.1} s{}: {}",
            g.end_unix_ns.saturating_sub(g.start_unix_ns) as f64 / 1e9,
            if g.recovered {
                " (energy recovered)"
            } else {
                " (energy unknown)"
            },
            g.reason
        );
    }
    if let Some(p) = manifest_path {
        let _ = writeln!(s, "Manifest   {}", p.display());
    }
    let _ = writeln!(
        s,
        "Accounting: `ergon report {}` once the site's accounting has run.",
        m.job.job_id
    );
    s
}

#[derive(Serialize)]
struct JsonReport<'a> {
    job_id: u32,
    cluster: &'a str,
    node: &'a str,
    duration_s: f64,
    coverage: f64,
    energy_j: f64,
    gpu_j: Option<f64>,
    cpu_j: Option<f64>,
    dram_j: Option<f64>,
    avg_w: f64,
    peak_w: f64,
    gpus: &'a [ergon_protocol::GpuEnergy],
    sockets: &'a [ergon_protocol::SocketEnergy],
    steps: &'a [ergon_protocol::StepEnergy],
    gaps: &'a [ergon_protocol::Gap],
    attribution: &'a ergon_protocol::AttributionInfo,
    manifest: Option<String>,
    content_hash: &'a str,
}

/// The JSON report: the manifest's figures without its trace (one object, a newline at the end).
pub fn render_json(m: &Manifest, manifest_path: Option<&Path>) -> String {
    let r = JsonReport {
        job_id: m.job.job_id,
        cluster: &m.cluster,
        node: &m.node,
        duration_s: m.duration_s,
        coverage: m.coverage.fraction,
        energy_j: m.totals.energy_j,
        gpu_j: m.totals.gpu_j,
        cpu_j: m.totals.cpu_j,
        dram_j: m.totals.dram_j,
        avg_w: m.totals.avg_w,
        peak_w: m.totals.peak_w,
        gpus: &m.gpus,
        sockets: &m.sockets,
        steps: &m.steps,
        gaps: &m.coverage.gaps,
        attribution: &m.attribution,
        manifest: manifest_path.map(|p| p.display().to_string()),
        content_hash: &m.content_hash,
    };
    let mut s = serde_json::to_string_pretty(&r).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

/// Why a report could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// A step in the child failed with `errno`.
    #[error("{path}: {what} failed as uid {uid}: {source_text}")]
    Failed {
        /// The file.
        path: String,
        /// The uid it ran as.
        uid: u32,
        /// Which step.
        what: &'static str,
        /// The OS error's text.
        source_text: String,
        /// The errno.
        errno: i32,
    },
    /// The file is not a regular file (a FIFO, a device, a directory).
    #[error("{0}: not a regular file; refused")]
    NotRegular(String),
    /// The child did not finish in time (hung filesystem) and was killed.
    #[error("{0}: writing did not finish within {WRITE_TIMEOUT:?}; gave up")]
    Timeout(String),
    /// fork/pipe failed.
    #[error("cannot start the writer process: {0}")]
    Spawn(String),
}

const STEP_NAMES: [&str; 5] = ["setgroups", "setgid", "setuid", "open", "write"];

/// Write `bytes` to `target` as `uid`/`gid` (see the module documentation).
pub fn write_as_user(target: &Target, uid: u32, gid: u32, bytes: &[u8]) -> Result<(), WriteError> {
    let path_text = target.path().display().to_string();
    let cpath = CString::new(target.path().as_os_str().as_bytes())
        .map_err(|_| WriteError::Spawn("path contains NUL".into()))?;
    let flags = libc::O_WRONLY
        | libc::O_NOFOLLOW
        | libc::O_NONBLOCK
        | libc::O_NOCTTY
        | libc::O_CLOEXEC
        | match target {
            Target::Append(_) => libc::O_APPEND,
            Target::Create(_) => libc::O_CREAT | libc::O_EXCL,
        };
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-int array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(WriteError::Spawn(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the child below calls only async-signal-safe functions on data prepared before
    // the fork, then _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: closing our own pipe ends.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
        return Err(WriteError::Spawn(e.to_string()));
    }
    if pid == 0 {
        // Child.
        // SAFETY: raw system calls only; every pointer is valid for the call.
        unsafe {
            let fail = |step: u8| -> ! {
                let errno = *libc::__errno_location();
                let mut msg = [0u8; 5];
                msg[0] = step;
                msg[1..].copy_from_slice(&errno.to_ne_bytes());
                libc::write(wr, msg.as_ptr().cast(), msg.len());
                libc::_exit(1);
            };
            let groups = [gid as libc::gid_t];
            if libc::setgroups(1, groups.as_ptr()) != 0 {
                fail(0);
            }
            if libc::setgid(gid) != 0 {
                fail(1);
            }
            if libc::setuid(uid) != 0 || (uid != 0 && libc::setuid(0) == 0) {
                fail(2);
            }
            libc::umask(0o022);
            let fd = libc::open(cpath.as_ptr(), flags, 0o644 as libc::c_uint);
            if fd < 0 {
                fail(3);
            }
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || (st.st_mode & libc::S_IFMT) != libc::S_IFREG {
                let msg = [255u8, 0, 0, 0, 0];
                libc::write(wr, msg.as_ptr().cast(), msg.len());
                libc::_exit(1);
            }
            let mut off = 0usize;
            while off < bytes.len() {
                let n = libc::write(fd, bytes[off..].as_ptr().cast(), bytes.len() - off);
                if n < 0 {
                    if *libc::__errno_location() == libc::EINTR {
                        continue;
                    }
                    fail(4);
                }
                off += n as usize;
            }
            libc::close(fd);
            libc::_exit(0);
        }
    }
    // Parent.
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(wr) };
    let deadline = Instant::now() + WRITE_TIMEOUT;
    let mut status = 0;
    let exited = loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break true;
        }
        if r < 0 || Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if !exited {
        // SAFETY: killing and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
            libc::close(rd);
        }
        return Err(WriteError::Timeout(path_text));
    }
    let mut msg = [0u8; 5];
    // SAFETY: reading into a local buffer from our pipe end, then closing it.
    let n = unsafe {
        let n = libc::read(rd, msg.as_mut_ptr().cast(), msg.len());
        libc::close(rd);
        n
    };
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        return Ok(());
    }
    if n == 5 && msg[0] == 255 {
        return Err(WriteError::NotRegular(path_text));
    }
    if n == 5 {
        let errno = i32::from_ne_bytes(msg[1..].try_into().expect("4 bytes"));
        return Err(WriteError::Failed {
            path: path_text,
            uid,
            what: STEP_NAMES
                .get(usize::from(msg[0]))
                .copied()
                .unwrap_or("write"),
            source_text: std::io::Error::from_raw_os_error(errno).to_string(),
            errno,
        });
    }
    Err(WriteError::Spawn(format!(
        "the writer process ended abnormally (status {status})"
    )))
}

/// Write the report to the first target that takes it. Returns the file written, or every
/// target's error.
pub fn deliver(
    targets: &[Target],
    uid: u32,
    gid: u32,
    text: &str,
) -> Result<PathBuf, Vec<WriteError>> {
    let mut errors = Vec::new();
    for t in targets {
        match write_as_user(t, uid, gid, text.as_bytes()) {
            Ok(()) => return Ok(t.path().to_path_buf()),
            Err(e) => errors.push(e),
        }
    }
    Err(errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn manifest() -> Manifest {
        let json = r#"{"schema_version":1,"cluster":"c","node":"n1",
            "job":{"job_id":42,"array_job_id":null,"array_task_id":null,"user":"alice","uid":1000,"account":null,"partition":null},
            "start_unix_ns":0,"end_unix_ns":65000000000,"duration_s":65.0,
            "steps":[{"step":"batch","start_unix_ns":0,"end_unix_ns":65000000000,"energy_j":12300.0,"gpu_j":10000.0,"cpu_j":2000.0,"dram_j":300.0}],
            "gpus":[{"uuid":"GPU-a","index":0,"minor":6,"pci_bus_id":null,"energy_j":10000.0,"avg_w":153.8,"peak_w":300.0,"method":"counter","shared":false}],
            "sockets":[{"socket":0,"package_j":2000.0,"dram_j":300.0,"method":"counter","share_method":"cgroup_cpu_time"}],
            "totals":{"energy_j":12300.0,"gpu_j":10000.0,"cpu_j":2000.0,"dram_j":300.0,"avg_w":189.2,"peak_w":412.0},
            "node_context":{"node_energy_j":20000.0,"idle_j":100.0,"unattributed_j":7600.0},
            "coverage":{"fraction":1.0,"gaps":[]},
            "attribution":{"model":"exclusive-gpu+cgroup-cpu-time","version":1,"estimated":false},
            "sensors":[],"trace":{"interval_ms":1000,"start_unix_ns":0,"series":[]},"content_hash":""}"#;
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_mig_share_is_named_with_its_instances_and_method() {
        let mut m = manifest();
        m.gpus[0].shared = true;
        m.gpus[0].mig = Some(ergon_protocol::GpuMig {
            total_slices: 7,
            instances: vec![ergon_protocol::MigInstanceRef {
                gpu_instance_id: 2,
                compute_instance_id: Some(0),
                slices: Some(3),
                uuid: Some("MIG-x".into()),
            }],
            share_method: ergon_protocol::MigShareMethod::SliceSize,
        });
        let t = render_text(&m, None);
        assert!(
            t.contains("[MIG GI 2 (3 of 7 slices), estimated by slice size]"),
            "{t}"
        );
        let j: serde_json::Value = serde_json::from_str(&render_json(&m, None)).unwrap();
        assert_eq!(j["gpus"][0]["mig"]["total_slices"], 7);
    }

    #[test]
    fn text_names_every_component_and_gpu() {
        let t = render_text(
            &manifest(),
            Some(Path::new("/var/spool/ergon/c-42-n1.json")),
        );
        for want in [
            "job 42 on n1",
            "00:01:05",
            "12.30 kJ",
            "average 189.2 W, peak 412.0 W",
            "gpu0 GPU-a (minor 6): 10.00 kJ",
            "CPU      2.00 kJ",
            "DRAM     300.0 J",
            "42.batch",
            "coverage 100.0 %",
            "/var/spool/ergon/c-42-n1.json",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
        let j: serde_json::Value = serde_json::from_str(&render_json(&manifest(), None)).unwrap();
        assert_eq!(j["energy_j"], 12300.0);
        assert_eq!(j["gpus"][0]["uuid"], "GPU-a");
        assert!(j.get("trace").is_none());
    }

    #[test]
    fn targets_prefer_stdout_for_text_on_the_batch_node() {
        let m = manifest();
        let t = targets(
            &m,
            ReportFormat::Text,
            Some("/home/a/slurm-42.out"),
            Some("/home/a"),
            true,
        );
        assert_eq!(
            t,
            vec![
                Target::Append("/home/a/slurm-42.out".into()),
                Target::Create("/home/a/ergon-42.txt".into())
            ]
        );
        let t = targets(
            &m,
            ReportFormat::Json,
            Some("/home/a/slurm-42.out"),
            Some("/home/a"),
            false,
        );
        assert_eq!(t, vec![Target::Create("/home/a/ergon-42.n1.json".into())]);
        // Relative or missing paths are never used.
        assert!(targets(&m, ReportFormat::Text, Some("slurm.out"), Some("rel"), true).is_empty());
    }

    #[test]
    fn writes_as_the_user_and_refuses_symlinks_fifos_and_replacing() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to change uid");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(4242), Some(4242)).unwrap();
        // A new file is created owned by the user.
        let f = home.join("ergon-1.txt");
        write_as_user(&Target::Create(f.clone()), 4242, 4242, b"hello\n").unwrap();
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!((md.uid(), md.gid()), (4242, 4242));
        // Never replaced.
        let e = write_as_user(&Target::Create(f.clone()), 4242, 4242, b"x").unwrap_err();
        assert!(
            matches!(
                e,
                WriteError::Failed {
                    errno: libc::EEXIST,
                    ..
                }
            ),
            "{e}"
        );
        // Appended to.
        write_as_user(&Target::Append(f.clone()), 4242, 4242, b"more\n").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "hello\nmore\n");
        // A symlink to a file the user may not write (root's) is refused, for both kinds.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"root's").unwrap();
        let link = home.join("slurm-1.out");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        for t in [Target::Append(link.clone()), Target::Create(link.clone())] {
            assert!(write_as_user(&t, 4242, 4242, b"evil").is_err());
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's");
        // A directory the user cannot write: refused by the kernel (it runs as the user).
        let e = write_as_user(
            &Target::Create(dir.path().join("rootfile")),
            4242,
            4242,
            b"x",
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                WriteError::Failed {
                    errno: libc::EACCES,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!dir.path().join("rootfile").exists());
        // A FIFO is refused without blocking.
        let fifo = home.join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        std::os::unix::fs::chown(&fifo, Some(4242), Some(4242)).unwrap();
        let t0 = Instant::now();
        assert!(write_as_user(&Target::Append(fifo), 4242, 4242, b"x").is_err());
        assert!(t0.elapsed() < Duration::from_secs(2));
        // deliver falls back to the next target.
        let got = deliver(
            &[
                Target::Append(link),
                Target::Create(home.join("ergon-2.txt")),
            ],
            4242,
            4242,
            "r",
        )
        .unwrap();
        assert_eq!(got, home.join("ergon-2.txt"));
    }
}
