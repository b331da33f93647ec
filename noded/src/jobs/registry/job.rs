//! What the registry holds: a [`Job`] and its [`Step`]s, the [`EventTime`] of each event, and
//! what start-up discovery found of a job already running ([`Discovered`]).

use ergon_protocol::{CgroupPath, CpuSet, Gap, GpuAlloc, ReportFormat, StepId};
use serde::{Deserialize, Serialize};

/// How the gap of a job found running at start-up begins.
pub const DISCOVERED_GAP: &str = "ergond was not running when the job started";

/// The instant an event refers to, on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTime {
    /// As the plugin stamped it (Unix ns).
    pub unix_ns: u64,
    /// The same instant on CLOCK_MONOTONIC, as the shell mapped it (readings are on this clock).
    pub mono_ns: u64,
}

/// One step of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Which step.
    pub id: StepId,
    /// Its start, if seen.
    pub start: Option<EventTime>,
    /// Its end, if seen.
    pub end: Option<EventTime>,
    /// Its cgroups, as the plugin sent them.
    pub cgroups: Vec<CgroupPath>,
    /// Its CPUs (`cpuset.cpus`).
    pub cpus: CpuSet,
    /// The cgroup watched for its CPU time, if any.
    pub watched: Option<String>,
    /// Exit status, if seen.
    pub exit_status: Option<i32>,
}

/// One job on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Slurm job id.
    pub job_id: u32,
    /// Array job id, from JobStart or a StepStart.
    pub array_job_id: Option<u32>,
    /// Array task id.
    pub array_task_id: Option<u32>,
    /// Owner's uid, if known (JobStart or StepStart).
    pub uid: Option<u32>,
    /// Owner's user name (JobStart only).
    pub user: Option<String>,
    /// Owner's primary gid (JobStart only).
    #[serde(default)]
    pub gid: Option<u32>,
    /// Slurm account.
    pub account: Option<String>,
    /// Slurm partition.
    pub partition: Option<String>,
    /// Slurm cluster.
    pub cluster: Option<String>,
    /// Node name as Slurm knows it (from the first event).
    pub node: String,
    /// GPUs allocated (JobStart).
    pub gpus: Vec<GpuAlloc>,
    /// CPUs allocated (JobStart, else the extern step's set).
    pub cpus: CpuSet,
    /// Memory allocated on this node, MiB (the extern step's StepStart, else the first step's
    /// that says), when Slurm said.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Report requested.
    pub report: Option<ReportFormat>,
    /// Working directory.
    pub work_dir: Option<String>,
    /// Stdout file.
    pub stdout_path: Option<String>,
    /// Whether ergond saw the JobStart. When false, `start` is the first event seen.
    pub start_seen: bool,
    /// The job's start (or the first event seen).
    pub start: EventTime,
    /// The job's end, once seen.
    pub end: Option<EventTime>,
    /// Steps, in the order their first event arrived.
    pub steps: Vec<Step>,
    /// Outages while the job ran (ergond restarted), with whether their energy was recovered.
    pub gaps: Vec<Gap>,
    /// Its attribution, once it has ended and its figures are final (until its manifest is
    /// written).
    #[serde(default)]
    pub result: Option<crate::jobs::attributor::JobResult>,
    /// Found running in the cgroup tree when ergond started (its node name is then the one
    /// its processes' environment or ergond's configuration gives, until an event names it).
    #[serde(default)]
    pub discovered: bool,
    /// Slurm's cluster-unique job id (`SLURM_JOB_SLUID`, Slurm 26.05+), lowercase.
    #[serde(default)]
    pub sluid: Option<String>,
    /// Every node of the job, as Slurm's host list (the plugin's `SLURM_JOB_NODELIST`), when it
    /// said and the list expands.
    #[serde(default)]
    pub node_list: Option<String>,
    /// Why the job's GPUs on this node are not known, when they are not (a job found running
    /// whose allocation could not be read): its GPU energy is then unknown, not zero.
    #[serde(default)]
    pub gpus_unknown: Option<String>,
    /// Whether the user's report has been handed to the report writer (it is sent once, even
    /// when the manifest is retried or ergond restarts before writing it).
    #[serde(default)]
    pub report_sent: bool,
}

impl Job {
    pub(super) fn unknown(job_id: u32, node: &str, first: EventTime) -> Self {
        Self {
            job_id,
            array_job_id: None,
            array_task_id: None,
            uid: None,
            user: None,
            gid: None,
            account: None,
            partition: None,
            cluster: None,
            node: node.to_owned(),
            gpus: Vec::new(),
            cpus: CpuSet::new(),
            memory_mib: None,
            report: None,
            work_dir: None,
            stdout_path: None,
            start_seen: false,
            start: first,
            end: None,
            steps: Vec::new(),
            gaps: Vec::new(),
            result: None,
            discovered: false,
            sluid: None,
            node_list: None,
            gpus_unknown: None,
            report_sent: false,
        }
    }

    /// The step `id`, if known.
    pub fn step(&self, id: StepId) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }
}

/// What start-up discovery knows of a job found running (see
/// [`super::JobRegistry::discovered`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    /// Slurm job id.
    pub job_id: u32,
    /// Its SLUID, lowercase.
    pub sluid: Option<String>,
    /// Owner.
    pub uid: Option<u32>,
    /// Owner's name.
    pub user: Option<String>,
    /// Account.
    pub account: Option<String>,
    /// Partition.
    pub partition: Option<String>,
    /// Cluster.
    pub cluster: Option<String>,
    /// Array job id.
    pub array_job_id: Option<u32>,
    /// Array task id.
    pub array_task_id: Option<u32>,
    /// Slurm's name for this node.
    pub node: String,
    /// About when it started (the job cgroup's modification time).
    pub start: EventTime,
    /// Its CPUs.
    pub cpus: CpuSet,
    /// Its GPUs, or why they are not known.
    pub gpus: Result<Vec<GpuAlloc>, String>,
    /// Its steps and their cgroups.
    pub steps: Vec<(StepId, String)>,
}
