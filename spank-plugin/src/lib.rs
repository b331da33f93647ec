//! `spank_ergon.so`: the Slurm SPANK plugin of ergon.
//!
//! It does two things, and must never break a job doing them:
//! - adds `--energy-report[=text|json]` to `sbatch`, `srun` and `salloc`;
//! - tells ergond, the node daemon, over its Unix socket when each job and step starts and ends,
//!   with the job's user, its GPUs (as device minors) and each step's exact cgroup paths.
//!
//! Every notification is one blocking exchange bounded by `timeout_ms` (default 100 ms). A
//! missing, refusing or hung daemon costs a job at most that, plus one line in the slurmd log;
//! no hook ever fails a job because of ergon. The plugin starts no thread and no runtime (task
//! hooks run in processes slurmstepd forks), and no panic crosses the FFI boundary (see [`ffi`]).
//!
//! | hook (context)                       | event sent                                  |
//! |--------------------------------------|---------------------------------------------|
//! | `job_prolog` (slurmd, root)          | `JobStart`: ids, user, account, GPUs, report |
//! | `task_post_fork`, task 0 (slurmstepd) | `StepStart`: task 0's cgroups from /proc    |
//! | `exit` (slurmstepd)                  | `StepEnd`: exit status of task 0            |
//! | `job_epilog` (slurmd, root)          | `JobEnd`                                    |
//!
//! In `srun`/`salloc` that made their own allocation with `--energy-report`, the `exit` hook
//! waits (bounded) for the job's report and prints it on the terminal ([`terminal`]).

#![deny(unsafe_code)]

pub mod client;
pub mod config;
pub mod terminal;
// The C ABI Slurm calls: the only unsafe code of the plugin.
#[allow(unsafe_code)]
pub mod ffi;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use ergon_protocol::{
    parse_proc_cgroup, CpuSet, JobEnd, JobIds, JobStart, ReportFormat, Request, StepEnd, StepId,
    StepStart, Timestamp,
};

use crate::config::Config;
use crate::ffi::{log_debug, log_warning, Context, Spank};

/// gres.conf GPUs and their device minors (shared with ergond's discovery).
pub use ergon_gres as gpus;
pub use ffi::SLURM_VERSION_NUMBER;

/// What `--energy-report` asked for in this process: 0 not given, 1 text, 2 json.
static REPORT: AtomicU8 = AtomicU8::new(0);

/// The plugin's state in one process (a prolog, one slurmstepd, one sbatch…).
struct State {
    /// Parsed from the plugstack.conf arguments on the first hook of this process (Slurm does not
    /// call `slurm_spank_init` before `job_prolog`/`job_epilog`, but every hook gets the arguments).
    config: Option<Config>,
    step_start_sent: bool,
    exit_status: Option<i32>,
}

static STATE: Mutex<State> = Mutex::new(State {
    config: None,
    step_start_sent: false,
    exit_status: None,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process's configuration, parsed (and its problems logged) on first use.
fn config(spank: &Spank) -> Config {
    let mut st = state();
    if let Some(c) = &st.config {
        return c.clone();
    }
    let (config, problems) = config::parse_args(spank.argv().iter().map(String::as_str));
    // Configuration problems belong in the node's log, not on every user's terminal.
    if matches!(
        spank.context(),
        Context::Remote | Context::JobScript | Context::Slurmd
    ) {
        for p in problems {
            log_warning(&p);
        }
    }
    st.config = Some(config.clone());
    config
}

/// How Slurm hands a job's SPANK option to the prolog and epilog (`SPANK_` + plugin + option).
pub const OPTION_ENV: &str = "SPANK__SLURM_SPANK_OPTION_spank_ergon_energy_report";

/// Parses the option's value: none means text. Slurm 22.05 passes a value-less option to the
/// prolog as the string `(null)`, which also means none.
pub fn parse_report(value: Option<&str>) -> Result<ReportFormat, String> {
    match value {
        None | Some("") | Some("(null)") => Ok(ReportFormat::Text),
        Some(v) => v
            .parse()
            .map_err(|e: ergon_protocol::ReportFormatError| e.to_string()),
    }
}

/// The option callback's logic: remember the format, or say why the value is wrong.
pub(crate) fn option_given(value: Option<&str>) -> Result<(), String> {
    let format = parse_report(value)?;
    REPORT.store(
        if format == ReportFormat::Json { 2 } else { 1 },
        Ordering::Relaxed,
    );
    Ok(())
}

/// Whether this `srun` or `salloc` makes the job's allocation itself (no job id in its
/// environment when it started), as opposed to an `srun` inside an allocation.
static OWN_ALLOCATION: AtomicBool = AtomicBool::new(false);

fn report_from_process() -> Option<ReportFormat> {
    match REPORT.load(Ordering::Relaxed) {
        1 => Some(ReportFormat::Text),
        2 => Some(ReportFormat::Json),
        _ => None,
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|n| n.into_string().ok())
        .and_then(|n| n.split('.').next().map(str::to_owned))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The node name: slurmd's name for it where Slurm says it, else the short hostname.
fn node(spank: &Spank) -> String {
    spank
        .getenv("SLURMD_NODENAME")
        .or_else(|| env("SLURMD_NODENAME"))
        .unwrap_or_else(hostname)
}

/// The cluster's name (`SLURM_CLUSTER_NAME`): from the job's environment in slurmstepd, from the
/// process environment in the prolog and epilog.
fn cluster(spank: &Spank) -> Option<String> {
    spank
        .getenv("SLURM_CLUSTER_NAME")
        .or_else(|| env("SLURM_CLUSTER_NAME"))
}

/// How long the two events of a job's set-up — `JobStart` from the prolog and the extern step's
/// `StepStart` — wait for ergond's reply (at most `timeout_ms`; the others wait `timeout_ms`).
///
/// From Slurm 24.11 on, when these two hold up the job's set-up for more than a few tens of
/// milliseconds, an `srun` starts its step about a second later. Measured on 24.11.5 and 26.05.5
/// with a listener that never answers: `srun true` took 0.3 s with every event's wait at 30 ms,
/// 1.2-1.6 s with 40 ms or more, still 1.4-1.6 s when only one of the two waited 10 ms, and
/// 0.4-0.7 s with both at 10 ms (22.05: 0.5-0.8 s at 100 ms). A hung ergond thus cost each srun
/// job about a second. A healthy ergond answers in tens of microseconds (BENCHMARKS.md), so
/// 10 ms still hears every answer, refusals included; ergond records a request whose sender
/// stopped waiting all the same, and an event that was also queued is replayed as a harmless
/// duplicate.
pub const SETUP_REPLY_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Sends one event if notifications are on. One that did not get through is left in the
/// queue directory for ergond to replay (unless ergond refused it for good: a replay would be
/// refused too), and one line says so in slurmd's log.
fn notify(config: &Config, what: &str, request: &Request) {
    notify_waiting(config, what, request, config.timeout);
}

/// As [`notify`], waiting for the reply at most `reply_wait`.
fn notify_waiting(config: &Config, what: &str, request: &Request, reply_wait: std::time::Duration) {
    if !config.notify {
        return;
    }
    let e = match client::notify_waiting(&config.socket, config.timeout, reply_wait, request) {
        Ok(()) => return log_debug(&format!("{what} recorded by ergond")),
        Err(e) => e,
    };
    let for_good = matches!(
        e,
        client::SendError::Refused(
            ergon_protocol::ErrorCode::PermissionDenied
                | ergon_protocol::ErrorCode::Malformed
                | ergon_protocol::ErrorCode::UnsupportedVersion,
            _
        )
    );
    let queued = match config.queue_dir() {
        Some(dir) if !for_good => Some(client::queue(&dir, stamp(request), request)),
        _ => None,
    };
    let socket = config.socket.display();
    log_warning(&match queued {
        Some(Ok(file)) => format!(
            "{what} not taken by ergond at {socket}: {e}; queued as {} for ergond to replay \
             (the job continues)",
            file.display()
        ),
        Some(Err(q)) => format!(
            "{what} not recorded by ergond at {socket}: {e}; and not queued either ({q}); the \
             job continues, its energy report will be incomplete"
        ),
        None => format!(
            "{what} not recorded by ergond at {socket}: {e}; the job continues, its energy \
             report will be incomplete"
        ),
    });
}

/// The instant an event happened (what names its queue file).
fn stamp(request: &Request) -> u64 {
    match request {
        Request::JobStart(m) => m.time.unix_ns,
        Request::JobEnd(m) => m.time.unix_ns,
        Request::StepStart(m) => m.time.unix_ns,
        Request::StepEnd(m) => m.time.unix_ns,
        _ => Timestamp::now().unix_ns,
    }
}

pub(crate) fn init(spank: &Spank) {
    config(spank);
    if matches!(spank.context(), Context::Local | Context::Allocator) {
        let inside = env("SLURM_JOB_ID").is_some() || env("SLURM_JOBID").is_some();
        OWN_ALLOCATION.store(!inside, Ordering::Relaxed);
    }
}

/// The program this process runs (`srun`, `salloc`, `sbatch`…), from its argv\[0\].
fn program() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default()
}

/// In `srun` (local context) or `salloc` (allocator context) that made the job's allocation
/// and was given `--energy-report`: wait for the report and show it on the terminal.
fn interactive_report(spank: &Spank) {
    let Some(format) = report_from_process() else {
        return;
    };
    let interactive = match spank.context() {
        Context::Local => true,
        Context::Allocator => program() == "salloc",
        _ => false,
    };
    if !interactive || !OWN_ALLOCATION.load(Ordering::Relaxed) {
        return;
    }
    let Some(job) = spank.job_id().or_else(|| env("SLURM_JOB_ID")?.parse().ok()) else {
        return;
    };
    let config = config(spank);
    let nodes = env("SLURM_JOB_NUM_NODES")
        .or_else(|| env("SLURM_NNODES"))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1);
    let Ok(dir) = std::env::current_dir() else {
        return;
    };
    let found = terminal::wait_for_reports(&dir, job, format, nodes, config.report_wait);
    let mut err = std::io::stderr().lock();
    let _ = terminal::show(&mut err, &found, &dir, job, format, config.report_wait);
}

fn job_start(spank: &Spank, config: &Config) -> Result<JobStart, String> {
    let job_id = spank
        .job_id()
        .or_else(|| env("SLURM_JOB_ID")?.parse().ok())
        .ok_or("Slurm gave the prolog no job id")?;
    let uid = spank
        .uid()
        .or_else(|| env("SLURM_JOB_UID")?.parse().ok())
        .ok_or("Slurm gave the prolog no job uid")?;
    let gid = spank
        .gid()
        .or_else(|| env("SLURM_JOB_GID")?.parse().ok())
        .unwrap_or(u32::MAX);
    let node = node(spank);
    let report = match spank.energy_report_option() {
        Some(value) => parse_report(value.as_deref()).ok(),
        None => match std::env::var(OPTION_ENV) {
            Ok(value) => parse_report(Some(&value)).ok(),
            Err(_) => report_from_process(),
        },
    };
    let indices = gpus::parse_job_gpus(&env("SLURM_JOB_GPUS").unwrap_or_default());
    let gres_conf = gpus::gres_conf_path(config.gres_conf.as_deref(), env("SLURM_CONF").as_deref());
    let gres = std::fs::read_to_string(&gres_conf)
        .map(|text| gpus::gres_gpus(&text, &node))
        .unwrap_or_default();
    let (gpus, problems) = gpus::allocations(&indices, &gres, &config.mig_minors);
    for p in problems {
        log_warning(&p);
    }
    Ok(JobStart {
        ids: JobIds {
            job_id,
            array_job_id: env("SLURM_ARRAY_JOB_ID").and_then(|v| v.parse().ok()),
            array_task_id: env("SLURM_ARRAY_TASK_ID").and_then(|v| v.parse().ok()),
        },
        uid,
        gid,
        user: env("SLURM_JOB_USER").unwrap_or_else(|| uid.to_string()),
        account: env("SLURM_JOB_ACCOUNT"),
        partition: env("SLURM_JOB_PARTITION"),
        cluster: env("SLURM_CLUSTER_NAME"),
        gpus,
        cpus: CpuSet::default(),
        report,
        work_dir: env("SLURM_JOB_WORK_DIR"),
        stdout_path: env("SLURM_JOB_STDOUT"),
        node,
        time: Timestamp::now(),
        sluid: env("SLURM_JOB_SLUID").map(|s| s.to_ascii_lowercase()),
        // Slurm 22.05's prolog has SLURM_NODELIST only (measured); later releases both.
        node_list: env("SLURM_JOB_NODELIST").or_else(|| env("SLURM_NODELIST")),
    })
}

pub(crate) fn job_prolog(spank: &Spank) {
    let config = config(spank);
    if !config.notify {
        return;
    }
    match job_start(spank, &config) {
        Ok(start) => {
            let what = format!("job {} start", start.ids.job_id);
            notify_waiting(&config, &what, &Request::JobStart(start), SETUP_REPLY_WAIT);
        }
        Err(e) => log_warning(&format!("job start not sent: {e}")),
    }
}

pub(crate) fn task_post_fork(spank: &Spank) {
    let config = config(spank);
    {
        let mut st = state();
        if st.step_start_sent || !config.notify || spank.task_id().unwrap_or(0) != 0 {
            return;
        }
        st.step_start_sent = true;
    }
    let (Some(job_id), Some(step)) = (spank.job_id(), spank.step_id()) else {
        log_warning("step start not sent: Slurm gave no job or step id");
        return;
    };
    let step = StepId::from_raw(step);
    let pid = spank.task_pid();
    let proc_path = match pid {
        Some(p) => format!("/proc/{p}/cgroup"),
        None => "/proc/self/cgroup".to_string(),
    };
    let cgroups = match std::fs::read_to_string(&proc_path) {
        Ok(text) => parse_proc_cgroup(&text).unwrap_or_else(|e| {
            log_warning(&format!(
                "{proc_path}: {e}; step {job_id}.{step} sent without cgroups"
            ));
            Vec::new()
        }),
        Err(e) => {
            log_warning(&format!(
                "cannot read {proc_path}: {e}; step {job_id}.{step} sent without cgroups"
            ));
            Vec::new()
        }
    };
    let cpus = step_cpus(&cgroups);
    let start = StepStart {
        job_id,
        cluster: cluster(spank),
        cpus,
        // From the job's environment: the S_JOB_ARRAY_* items are wrong in 22.05's extern step
        // (they give the task's own job id), and its environment has no array variables.
        array_job_id: spank
            .getenv("SLURM_ARRAY_JOB_ID")
            .and_then(|v| v.parse().ok()),
        array_task_id: spank
            .getenv("SLURM_ARRAY_TASK_ID")
            .and_then(|v| v.parse().ok()),
        step,
        uid: spank.uid().unwrap_or(u32::MAX),
        node: node(spank),
        cgroups,
        pid,
        tasks: spank.local_task_count(),
        time: Timestamp::now(),
        sluid: spank
            .getenv("SLURM_JOB_SLUID")
            .map(|s| s.to_ascii_lowercase()),
        job_mem_mb: spank.job_alloc_mem_mb(),
    };
    let reply_wait = if step == StepId::Extern {
        SETUP_REPLY_WAIT
    } else {
        config.timeout
    };
    notify_waiting(
        &config,
        &format!("step {job_id}.{step} start"),
        &Request::StepStart(start),
        reply_wait,
    );
}

/// Where cgroup hierarchies are mounted (the standard place; Slurm's `CgroupMountpoint` default).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The step's CPUs, from its cpuset cgroup: v1 `cpuset/<path>/cpuset.cpus`, v2
/// `<path>/cpuset.cpus.effective`. Empty when there is no cpuset controller or it cannot be read.
fn step_cpus(cgroups: &[ergon_protocol::CgroupPath]) -> CpuSet {
    let file = if let Some(g) = cgroups.iter().find(|g| g.controller == "cpuset") {
        format!("{CGROUP_ROOT}/cpuset{}/cpuset.cpus", g.path)
    } else if let Some(g) = cgroups.iter().find(|g| g.is_unified()) {
        format!(
            "{CGROUP_ROOT}{}/cpuset.cpus.effective",
            g.path.trim_end_matches('/')
        )
    } else {
        return CpuSet::default();
    };
    match std::fs::read_to_string(&file).map(|t| CpuSet::parse(t.trim())) {
        Ok(Ok(set)) => set,
        Ok(Err(e)) => {
            log_warning(&format!("{file}: {e}; step sent without its CPU set"));
            CpuSet::default()
        }
        Err(e) => {
            log_warning(&format!(
                "cannot read {file}: {e}; step sent without its CPU set"
            ));
            CpuSet::default()
        }
    }
}

pub(crate) fn task_exit(spank: &Spank) {
    if spank.task_id().unwrap_or(0) == 0 {
        state().exit_status = spank.task_exit_status();
    }
}

pub(crate) fn exit(spank: &Spank) {
    if matches!(spank.context(), Context::Local | Context::Allocator) {
        return interactive_report(spank);
    }
    if spank.context() != Context::Remote {
        return;
    }
    let config = config(spank);
    let exit_status = state().exit_status;
    if !config.notify {
        return;
    }
    let (Some(job_id), Some(step)) = (spank.job_id(), spank.step_id()) else {
        return;
    };
    let end = StepEnd {
        job_id,
        cluster: cluster(spank),
        step: StepId::from_raw(step),
        node: node(spank),
        exit_status,
        time: Timestamp::now(),
    };
    let what = format!("step {job_id}.{} end", end.step);
    notify(&config, &what, &Request::StepEnd(end));
}

pub(crate) fn job_epilog(spank: &Spank) {
    let config = config(spank);
    if !config.notify {
        return;
    }
    let Some(job_id) = spank.job_id().or_else(|| env("SLURM_JOB_ID")?.parse().ok()) else {
        log_warning("job end not sent: Slurm gave the epilog no job id");
        return;
    };
    let end = JobEnd {
        job_id,
        cluster: cluster(spank),
        node: node(spank),
        time: Timestamp::now(),
    };
    notify(&config, &format!("job {job_id} end"), &Request::JobEnd(end));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_values() {
        assert_eq!(parse_report(None), Ok(ReportFormat::Text));
        assert_eq!(parse_report(Some("(null)")), Ok(ReportFormat::Text));
        assert_eq!(parse_report(Some("json")), Ok(ReportFormat::Json));
        assert_eq!(parse_report(Some("text")), Ok(ReportFormat::Text));
        let err = parse_report(Some("bogus")).unwrap_err();
        assert!(
            err.contains("\"bogus\"") && err.contains("text") && err.contains("json"),
            "{err}"
        );
    }

    #[test]
    fn version_comes_from_the_installed_headers() {
        let dir =
            std::env::var("SLURM_INCLUDE_DIR").unwrap_or_else(|_| "/usr/include/slurm".into());
        let header = std::fs::read_to_string(format!("{dir}/slurm_version.h")).unwrap();
        assert!(header.contains(&format!("SLURM_VERSION_NUMBER {SLURM_VERSION_NUMBER:#x}")));
    }
}
