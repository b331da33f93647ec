//! The job record: one job's energy across all its nodes, as collection makes it
//! ([`crate::collect::combine`]), the state keeps it while a delivery is pending
//! ([`crate::state`]), the sinks send it ([`crate::sinks`]) and `ergon report` shows it. A leaf
//! module: it depends on no other module of this crate.

use ergon_protocol::manifest::EnergyMethod;
use ergon_protocol::record::JobRecord;
use serde::{Deserialize, Serialize};

/// One job's energy across all its nodes: what the sinks receive and what the sacct record is
/// made from.
///
/// Coverage is given two ways: `coverage_min` (the worst node; what the sacct record's `cov`
/// shows, so that a gap on any node is visible) and `coverage_weighted` (each node's coverage
/// weighted by its energy, or a plain mean when the job used no energy).
///
/// `peak_w` is the sum of the nodes' peak powers: an upper bound, since the nodes' peaks need not
/// coincide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecordFull {
    /// `<cluster>/<job id>/<job hash>`: the same for the same set of node manifests, so a receiver
    /// can drop a record it has already seen.
    pub idempotency_key: String,
    /// `sha256:<hex>` over the sorted content hashes of the job's node manifests.
    pub job_hash: String,
    /// Slurm cluster name.
    pub cluster: String,
    /// Slurm job id.
    pub job_id: u32,
    /// The array's job id, for an array task.
    pub array_job_id: Option<u32>,
    /// The task's index in its array.
    pub array_task_id: Option<u32>,
    /// The owner's user name.
    pub user: String,
    /// The owner's uid.
    pub uid: u32,
    /// Slurm account.
    pub account: Option<String>,
    /// Slurm partition.
    pub partition: Option<String>,
    /// Earliest start over the nodes.
    pub start_unix_ns: u64,
    /// Latest end over the nodes.
    pub end_unix_ns: u64,
    /// `end - start`, seconds.
    pub duration_s: f64,
    /// Total energy, joules.
    pub energy_j: f64,
    /// GPU energy, joules; `None` when no node measured it.
    pub gpu_j: Option<f64>,
    /// CPU package energy, joules; `None` when no node measured it.
    pub cpu_j: Option<f64>,
    /// DRAM energy, joules; `None` when no node measured it.
    pub dram_j: Option<f64>,
    /// `energy_j / duration_s` (0 for a zero-length job).
    pub avg_w: f64,
    /// Sum of the nodes' peak powers (an upper bound of the job's peak).
    pub peak_w: f64,
    /// The lowest node coverage.
    pub coverage_min: f64,
    /// Energy-weighted mean node coverage.
    pub coverage_weighted: f64,
    /// Whether any node's figures are partly estimated.
    pub estimated: bool,
    /// Per node, sorted by node name.
    pub nodes: Vec<NodeSummary>,
    /// Per GPU, sorted by node then index.
    pub gpus: Vec<GpuSummary>,
}

/// One node's share of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// Node name.
    pub node: String,
    /// Energy on this node, joules.
    pub energy_j: f64,
    /// GPU energy, joules.
    pub gpu_j: Option<f64>,
    /// CPU package energy, joules.
    pub cpu_j: Option<f64>,
    /// DRAM energy, joules.
    pub dram_j: Option<f64>,
    /// Average power, watts.
    pub avg_w: f64,
    /// Peak power, watts.
    pub peak_w: f64,
    /// Fraction of the job's time on this node covered by readings.
    pub coverage: f64,
    /// The node manifest's content hash.
    pub manifest_hash: String,
}

/// One GPU's share of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSummary {
    /// Node name.
    pub node: String,
    /// NVML UUID.
    pub uuid: String,
    /// Slurm GPU index on the node.
    pub index: u32,
    /// Energy, joules; `None` when the GPU could not be read (never 0 for an unmeasured GPU).
    pub energy_j: Option<f64>,
    /// Average power, watts.
    pub avg_w: Option<f64>,
    /// Peak power, watts.
    pub peak_w: Option<f64>,
    /// How the energy was obtained.
    pub method: EnergyMethod,
    /// The job's MIG instances on this GPU, when it held instances (its `energy_j` is then its
    /// modelled share of the board); absent for a whole GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<ergon_protocol::GpuMig>,
}

impl JobRecordFull {
    /// The short record stored in sacct.
    pub fn sacct_record(&self) -> JobRecord {
        let whole = |x: f64| {
            if x.is_finite() && x > 0.0 {
                x.round() as u64
            } else {
                0
            }
        };
        JobRecord {
            energy_j: whole(self.energy_j),
            gpu_j: whole(self.gpu_j.unwrap_or(0.0)),
            cpu_j: whole(self.cpu_j.unwrap_or(0.0)),
            dram_j: whole(self.dram_j.unwrap_or(0.0)),
            other_j: None,
            avg_w: self.avg_w,
            peak_w: self.peak_w,
            gpus: self.gpus.len() as u32,
            nodes: self.nodes.len() as u32,
            coverage: self.coverage_min,
            hash: JobRecord::short_hash(&self.job_hash),
        }
    }

    /// `cluster/job` as used for keys in the state.
    pub fn job_key(&self) -> String {
        job_key(&self.cluster, self.job_id)
    }
}

/// `cluster/job`, the key of a job in the state.
pub fn job_key(cluster: &str, job_id: u32) -> String {
    format!("{cluster}/{job_id}")
}
