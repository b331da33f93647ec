//! Messages between the SPANK plugin (client) and the node daemon ergond (server), and how
//! they are framed on the Unix socket.
//!
//! # Frames
//!
//! A frame is a `u32` big-endian body length followed by the body. The body is a msgpack
//! array `[version, message]`: every frame carries [`PROTOCOL_VERSION`], so a one-shot
//! client (a SPANK hook sends one request and reads one reply) needs no handshake round trip,
//! and a peer speaking another version is told so precisely
//! ([`FrameError::UnknownVersion`]) instead of failing on a confusing decode error.
//! [`Request::Hello`] exists for long-lived connections and diagnostics.
//!
//! Messages are encoded with rmp-serde's named (map) encoding for structs and the externally
//! tagged form for enums (`{"JobStart": {...}}`, or just `"Ping"` for a variant without
//! data). Because fields are named, a later version can add an optional field
//! (`#[serde(default)]`) and older peers simply ignore it.
//!
//! Every request gets exactly one reply: [`Reply::Ok`], data, or [`Reply::Error`] with a
//! reason.
//!
//! # Hostile input
//!
//! The server reads frames from any local user. The length is checked against the limit
//! before anything is allocated, decoding never panics, and no single allocation made while
//! decoding exceeds [`MAX_FRAME_LEN`] (see `tests/alloc_bound.rs`).

mod cgroup;
mod cpuset;
mod frame;
mod step;
mod time;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use cgroup::{parse_proc_cgroup, CgroupParseError, CgroupPath};
pub use cpuset::{CpuSet, CpuSetError};
pub use frame::{
    decode_body, encode_frame, read_frame, read_frame_with_limit, write_frame, FrameError,
};
#[cfg(feature = "tokio")]
pub use frame::{read_frame_async, read_frame_async_with_limit, write_frame_async};
pub use step::{
    StepId, StepIdError, SLURM_BATCH_SCRIPT, SLURM_EXTERN_CONT, SLURM_INTERACTIVE_STEP,
    SLURM_PENDING_STEP,
};
pub use time::Timestamp;

/// The protocol version this build speaks; carried in every frame.
///
/// Bump it for any change an older peer would misread (a removed or retyped field, a new
/// required field). Adding an optional field does not need a bump.
pub const PROTOCOL_VERSION: u16 = 1;

/// The largest frame body accepted or produced, in bytes (64 KiB).
///
/// Real messages are a few hundred bytes; the limit only bounds what a misbehaving or
/// hostile local process can make ergond allocate.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// A message from a client (the SPANK plugin, or a user's tool) to ergond.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Explicit handshake, naming the client for ergond's logs. Answered with
    /// [`Reply::Hello`].
    Hello {
        /// Free-form client name and version, e.g. `"spank_ergon 0.1.0"`.
        client: String,
    },
    /// A job is starting on this node (SPANK `job_prolog`, as root or SlurmUser).
    JobStart(JobStart),
    /// A job has ended on this node (SPANK `job_epilog`).
    JobEnd(JobEnd),
    /// A step is starting on this node (SPANK step hooks in slurmstepd).
    StepStart(StepStart),
    /// A step has ended on this node.
    StepEnd(StepEnd),
    /// A user asks about one of their own running jobs. Answered with [`Reply::Job`].
    QueryJob {
        /// The Slurm job id.
        job_id: u32,
    },
    /// Liveness check. Answered with [`Reply::Pong`].
    Ping,
}

impl Request {
    /// Whether this is a job or step lifecycle event (what only root or SlurmUser may send).
    pub fn is_lifecycle(&self) -> bool {
        matches!(
            self,
            Request::JobStart(_) | Request::JobEnd(_) | Request::StepStart(_) | Request::StepEnd(_)
        )
    }
}

/// ergond's answer to a [`Request`]; every request gets exactly one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to [`Request::Hello`].
    Hello {
        /// Free-form server name and version, e.g. `"ergond 0.1.0"`.
        server: String,
        /// The protocol version the server speaks.
        version: u16,
    },
    /// The request was accepted.
    Ok,
    /// The request was refused or failed; `reason` is meant for a human (it ends up in
    /// Slurm's logs or the user's terminal).
    Error {
        /// Machine-readable category.
        code: ErrorCode,
        /// What went wrong and, where possible, what to do about it.
        reason: String,
    },
    /// Answer to [`Request::QueryJob`].
    Job(JobSnapshot),
    /// Answer to [`Request::Ping`].
    Pong,
}

impl Reply {
    /// Shorthand for [`Reply::Error`].
    pub fn error(code: ErrorCode, reason: impl Into<String>) -> Self {
        Reply::Error {
            code,
            reason: reason.into(),
        }
    }
}

/// Why ergond refused a request; see [`Reply::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame or message could not be decoded.
    Malformed,
    /// The frame carried a protocol version the server does not speak.
    UnsupportedVersion,
    /// The peer (by `SO_PEERCRED`) may not send this request: lifecycle events only from
    /// root or SlurmUser, queries only about the peer's own jobs.
    PermissionDenied,
    /// No such job is known on this node.
    UnknownJob,
    /// The server is overloaded or shutting down; retrying later may succeed.
    Busy,
    /// The server failed; see its logs.
    Internal,
    /// A code this build does not know (sent by a newer server). Never sent.
    #[serde(other)]
    Unknown,
}

/// A Slurm job's identity, including its place in a job array.
///
/// Embedded as a nested field (`JobStart.ids`) rather than flattened: serde's `flatten`
/// buffers the whole struct through an intermediate representation that defeats the
/// allocation bounds of this module, and a nested struct costs a few bytes at most.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobIds {
    /// `SLURM_JOB_ID`: the job's own id (for an array task, the task's own id).
    pub job_id: u32,
    /// `SLURM_ARRAY_JOB_ID`, for a task of a job array.
    #[serde(default)]
    pub array_job_id: Option<u32>,
    /// `SLURM_ARRAY_TASK_ID`, for a task of a job array.
    #[serde(default)]
    pub array_task_id: Option<u32>,
}

/// A job is starting on this node: everything ergond needs to attribute energy to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStart {
    /// Which job.
    pub ids: JobIds,
    /// The job owner's uid, so that only they can query it.
    pub uid: u32,
    /// The job owner's primary gid.
    pub gid: u32,
    /// The job owner's user name, for the manifest.
    pub user: String,
    /// Slurm account charged.
    #[serde(default)]
    pub account: Option<String>,
    /// Slurm partition.
    #[serde(default)]
    pub partition: Option<String>,
    /// Slurm cluster name.
    #[serde(default)]
    pub cluster: Option<String>,
    /// This node's name as Slurm knows it.
    pub node: String,
    /// The GPUs allocated to the job on this node.
    #[serde(default, deserialize_with = "crate::bounded::vec")]
    pub gpus: Vec<GpuAlloc>,
    /// The CPUs allocated to the job on this node, where the prolog can know them (empty when
    /// not: Slurm 22.05 gives its prolog only a CPU count; see `StepStart::cpus`).
    #[serde(default)]
    pub cpus: CpuSet,
    /// Whether (and how) the user asked for an energy report (`--energy-report`).
    #[serde(default)]
    pub report: Option<ReportFormat>,
    /// The job's working directory, where a report may be written.
    #[serde(default)]
    pub work_dir: Option<String>,
    /// The job's stdout file, where a text report may be appended.
    #[serde(default)]
    pub stdout_path: Option<String>,
    /// When the job started, stamped by the plugin.
    pub time: Timestamp,
    /// Slurm's cluster-unique job id (`SLURM_JOB_SLUID`, Slurm 26.05+), when the prolog's
    /// environment has it. Absent from older plugins' frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sluid: Option<String>,
    /// Every node of the job, as Slurm's host list (e.g. `gpu[01-03]`): the prolog's
    /// `SLURM_JOB_NODELIST`, or `SLURM_NODELIST` (all Slurm 22.05's prolog has). Absent from
    /// older plugins' frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_list: Option<String>,
}

/// One GPU allocated to a job.
///
/// Slurm and NVML number GPUs differently: Slurm by order in `gres.conf`, NVML by PCI bus
/// order. The device minor (`/dev/nvidia<minor>`) is what both can agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuAlloc {
    /// Slurm's index in `gres.conf` order, as in `SLURM_JOB_GPUS`.
    pub index: u32,
    /// The `/dev/nvidiaN` device minor, which is how ergond matches NVML devices; `None`
    /// if the plugin could not resolve it. For a MIG instance, the minor of its parent GPU.
    #[serde(default)]
    pub minor: Option<u32>,
    /// The MIG instance, when the GRES is one (gres.conf `MultipleFiles=` naming
    /// `/dev/nvidia-caps/nvidia-capN` files); `None` for a whole GPU. Absent in frames from
    /// plugins that predate MIG support, which decode as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<MigAlloc>,
}

/// A MIG instance of a GPU, as NVML identifies it within its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigAlloc {
    /// GPU instance id (`nvidia-smi mig -lgi`; `gpuN/giG` in
    /// `/proc/driver/nvidia-caps/mig-minors`).
    pub gpu_instance_id: u32,
    /// Compute instance id within it, if the GRES names one (`gpuN/giG/ciC`).
    #[serde(default)]
    pub compute_instance_id: Option<u32>,
}

/// The format of the per-job report a user asked for with `--energy-report[=text|json]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportFormat {
    /// A human-readable summary.
    Text,
    /// The machine-readable summary.
    Json,
}

impl fmt::Display for ReportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReportFormat::Text => "text",
            ReportFormat::Json => "json",
        })
    }
}

/// A `--energy-report` value that is neither `text` nor `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --energy-report value {0:?}: expected \"text\" or \"json\" (lowercase)")]
pub struct ReportFormatError(pub String);

impl FromStr for ReportFormat {
    type Err = ReportFormatError;

    /// Accepts exactly `"text"` or `"json"`, lowercase, as the option's help text shows them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(ReportFormat::Text),
            "json" => Ok(ReportFormat::Json),
            other => Err(ReportFormatError(other.to_owned())),
        }
    }
}

/// A step is starting on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStart {
    /// The job the step belongs to.
    pub job_id: u32,
    /// The array's job id when this job is an array task, from the step's environment. Sent with
    /// the steps because Slurm 22.05 does not tell the job prolog (where `JobStart` comes from)
    /// about arrays; the extern step's environment has none either, so it is absent there.
    #[serde(default)]
    pub array_job_id: Option<u32>,
    /// The array task's index, with `array_job_id`.
    #[serde(default)]
    pub array_task_id: Option<u32>,
    /// Which step.
    pub step: StepId,
    /// The job owner's uid.
    pub uid: u32,
    /// The Slurm cluster (`SLURM_CLUSTER_NAME`), so that ergond can name a job whose start it
    /// missed (it was down) correctly.
    #[serde(default)]
    pub cluster: Option<String>,
    /// This node's name as Slurm knows it.
    pub node: String,
    /// The step's cgroups, from `/proc/self/cgroup` inside the step; see [`parse_proc_cgroup`].
    #[serde(default, deserialize_with = "crate::bounded::vec")]
    pub cgroups: Vec<CgroupPath>,
    /// The CPUs the step may run on, from its cpuset cgroup (`cpuset.cpus`): the exact CPU ids
    /// Slurm confines it to. The extern step's set is the job's allocation on this node. Empty
    /// when unknown (no cpuset controller).
    #[serde(default)]
    pub cpus: CpuSet,
    /// A process of the step, for diagnostics.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Number of tasks of the step on this node.
    #[serde(default)]
    pub tasks: Option<u32>,
    /// When the step started, stamped by the plugin.
    pub time: Timestamp,
    /// Slurm's cluster-unique job id (`SLURM_JOB_SLUID`, Slurm 26.05+), from the step's
    /// environment. Absent from older plugins' frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sluid: Option<String>,
    /// The job's memory allocation on this node, MiB (Slurm's `S_JOB_ALLOC_MEM`: `--mem`, or
    /// `--mem-per-cpu` × its CPUs here). Absent when Slurm gives none (0) and from older
    /// plugins' frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_mem_mb: Option<u64>,
}

/// A step has ended on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEnd {
    /// The job the step belongs to.
    pub job_id: u32,
    /// Which step.
    pub step: StepId,
    /// The Slurm cluster (`SLURM_CLUSTER_NAME`), so that ergond can name a job whose start it
    /// missed (it was down) correctly.
    #[serde(default)]
    pub cluster: Option<String>,
    /// This node's name as Slurm knows it.
    pub node: String,
    /// The step's exit status, if the plugin saw it.
    #[serde(default)]
    pub exit_status: Option<i32>,
    /// When the step ended, stamped by the plugin.
    pub time: Timestamp,
}

/// A job has ended on this node; ergond takes final readings and writes the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEnd {
    /// Which job.
    pub job_id: u32,
    /// The Slurm cluster (`SLURM_CLUSTER_NAME`), so that ergond can name a job whose start it
    /// missed (it was down) correctly.
    #[serde(default)]
    pub cluster: Option<String>,
    /// This node's name as Slurm knows it.
    pub node: String,
    /// When the job ended, stamped by the plugin.
    pub time: Timestamp,
}

/// What ergond knows so far about a running job, for [`Request::QueryJob`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSnapshot {
    /// Which job.
    pub job_id: u32,
    /// The job owner's uid.
    pub uid: u32,
    /// When the job started on this node.
    pub started: Timestamp,
    /// Steps seen so far.
    #[serde(default, deserialize_with = "crate::bounded::vec")]
    pub steps: Vec<StepId>,
    /// Energy attributed so far, in joules; `None` if no sensor could be read yet.
    #[serde(default)]
    pub energy_j: Option<f64>,
    /// Fraction (0..=1) of the job's time so far covered by readings.
    #[serde(default)]
    pub coverage: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_format_parses_lowercase_only() {
        assert_eq!("text".parse(), Ok(ReportFormat::Text));
        assert_eq!("json".parse(), Ok(ReportFormat::Json));
        let err = "JSON".parse::<ReportFormat>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --energy-report value \"JSON\": expected \"text\" or \"json\" (lowercase)"
        );
        assert!("".parse::<ReportFormat>().is_err());
        assert_eq!(ReportFormat::Json.to_string(), "json");
    }
}
