//! The job record: one job's energy across all its nodes, as collection makes it
//! ([`crate::collect::combine`]), the state keeps it while a delivery is pending
//! ([`crate::state`]), the sinks send it ([`crate::sinks`]) and `ergon report` shows it. A leaf
//! module: it depends on no other module of this crate but the footprint's types
//! ([`crate::carbon`]).

use ergon_protocol::manifest::{ComponentCoverage, EnergyMethod};
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
    /// Coverage per component across the nodes, each the **time-weighted** mean of the nodes
    /// that have the component (each node's coverage weighted by its duration, end − start; a
    /// plain mean when every such node has duration 0); a component no node has is `null`.
    /// Absent when no manifest of the job states per-component coverage (schema 4); a node whose
    /// manifest does not then counts its `coverage` for each component it measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage_components: Option<ComponentCoverage>,
    /// The nodes on which the job's GPUs could not be known (their GPU energy is unknown, not
    /// 0), with ergond's reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus_unknown: Vec<GpusUnknown>,
    /// The gaps whose energy was estimated, with the estimate and its bound, by node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub estimates: Vec<EstimatedGap>,
    /// The sum of the estimates' bounds, joules: the estimated part of `energy_j` is within this
    /// of the truth. Absent when nothing is estimated with a bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_bound_j: Option<f64>,
    /// Slurm's cluster-unique job id (Slurm 26.05+), lowercase, when the manifests have it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sluid: Option<String>,
    /// Every node the job ran on, as its manifests state it (manifest schema 5); absent when
    /// none does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_nodes: Option<Vec<String>>,
    /// The job's nodes whose manifest is not here (ergond down there, the node failed, or its
    /// spool not collected yet): the record is incomplete and covers `nodes` only; nothing is
    /// counted for these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes_missing: Vec<String>,
    /// The job's CO2e and energy cost with the factors they were computed with, when the
    /// accounting config has `[carbon]` or `[cost]` (docs/carbon.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub footprint: Option<crate::footprint::Footprint>,
}

/// A node on which the job's GPUs could not be known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpusUnknown {
    /// Node name.
    pub node: String,
    /// Why (the manifest's `coverage.gpus_unknown`).
    pub reason: String,
}

/// A gap of one node whose energy is in the totals as an estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EstimatedGap {
    /// Node name.
    pub node: String,
    /// Start of the gap.
    pub start_unix_ns: u64,
    /// End of the gap.
    pub end_unix_ns: u64,
    /// Why there is a gap.
    pub reason: String,
    /// The job's energy estimated over it, joules.
    pub energy_j: f64,
    /// The estimate's largest error, joules.
    pub bound_j: f64,
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
    /// Coverage per component on this node, as the manifest states it (schema 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<ComponentCoverage>,
    /// Why the job's GPUs on this node are unknown, when they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_unknown: Option<String>,
    /// The job's energy at the wall on this node, from the node's meter (manifest schema 6);
    /// absent where the node had no meter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall: Option<ergon_protocol::WallEnergy>,
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
    /// The GPU's activity and health over the job (manifest schema 6); absent where ergond
    /// did not sample them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub efficiency: Option<ergon_protocol::GpuEfficiency>,
}

impl JobRecordFull {
    /// The job's energy at the wall: the sum over its nodes when every node had a meter;
    /// `None` otherwise (nothing is invented for a node without one).
    pub fn wall_j(&self) -> Option<f64> {
        if self.nodes.is_empty() {
            return None;
        }
        self.nodes
            .iter()
            .map(|n| n.wall.as_ref().map(|w| w.energy_j))
            .sum()
    }

    /// Energy of the job's allocated GPUs that sat idle (ergond's idle rule); `None` when no
    /// GPU's utilisation was sampled.
    pub fn gpu_idle_j(&self) -> Option<f64> {
        let mut any = false;
        let mut sum = 0.0;
        for g in &self.gpus {
            if let Some(idle) = g.efficiency.as_ref().and_then(|e| e.idle) {
                any = true;
                if idle {
                    sum += g.energy_j.unwrap_or(0.0);
                }
            }
        }
        any.then_some(sum)
    }

    /// Average SM utilisation of the job's GPUs, %, weighted by the time each was sampled.
    pub fn gpu_util_pct(&self) -> Option<f64> {
        let (mut sum, mut weight) = (0.0, 0.0);
        for e in self.gpus.iter().filter_map(|g| g.efficiency.as_ref()) {
            if let Some(u) = e.sm_util_avg_pct {
                let w = e.sampled_s.max(1e-9);
                sum += u * w;
                weight += w;
            }
        }
        (weight > 0.0).then(|| sum / weight)
    }

    /// Seconds the job's GPUs were throttled, summed over GPUs and reasons.
    pub fn gpu_throttle_s(&self) -> Option<f64> {
        let all: Vec<f64> = self
            .gpus
            .iter()
            .filter_map(|g| g.efficiency.as_ref()?.throttle_s.total())
            .collect();
        (!all.is_empty()).then(|| all.iter().sum())
    }

    /// Xid errors on the job's GPUs.
    pub fn xid_events(&self) -> Option<u64> {
        let all: Vec<u64> = self
            .gpus
            .iter()
            .filter_map(|g| g.efficiency.as_ref()?.xid_count)
            .collect();
        (!all.is_empty()).then(|| all.iter().sum())
    }

    /// The short record stored in sacct.
    pub fn sacct_record(&self) -> JobRecord {
        let whole = |x: f64| {
            if x.is_finite() && x > 0.0 {
                x.round() as u64
            } else {
                0
            }
        };
        let gpus_unknown = self.gpus_unknown.len() as u32;
        let carbon = self.footprint.as_ref().and_then(|f| f.carbon.as_ref());
        let cost = self.footprint.as_ref().and_then(|f| f.cost.as_ref());
        // Per-component coverage goes in when the record's coverage is incomplete (then it says
        // which part is missing) or a node's GPUs are unknown; complete coverage needs no more.
        let partial = JobRecord {
            coverage: self.coverage_min,
            ..JobRecord::default()
        }
        .normalized()
        .coverage
            < 1.0;
        let components = self
            .coverage_components
            .filter(|_| partial || gpus_unknown > 0);
        let mut coverage_gpu = components.and_then(|c| c.gpu);
        if gpus_unknown > 0 && coverage_gpu.is_none() {
            // Unknown GPUs are uncovered GPUs: never a record without a GPU part.
            coverage_gpu = Some(0.0);
        }
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
            coverage_gpu,
            coverage_cpu: components.and_then(|c| c.cpu),
            coverage_dram: components.and_then(|c| c.dram),
            gpus_unknown_nodes: gpus_unknown,
            estimate_bound_j: self.estimate_bound_j.map(|b| {
                if b.is_finite() && b > 0.0 {
                    b.ceil() as u64
                } else {
                    0
                }
            }),
            sluid: self.sluid.clone(),
            nodes_expected: match &self.job_nodes {
                Some(all) if !self.nodes_missing.is_empty() => Some(all.len() as u32),
                _ => None,
            },
            co2e_g: carbon.map(|c| c.total_g),
            co2e_missing: carbon
                .map(|c| c.missing_energy_fraction)
                .filter(|m| *m > 0.0),
            cost: cost.map(|c| c.amount),
            cost_missing: cost.map(|c| c.missing_energy_fraction).filter(|m| *m > 0.0),
            currency: cost.and_then(|c| c.currency.clone()),
            gpu_idle_j: self.gpu_idle_j().map(whole),
            gpu_util_pct: self.gpu_util_pct(),
            gpu_throttle_s: self.gpu_throttle_s(),
            xid_events: self
                .xid_events()
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            wall_j: self.wall_j().map(whole),
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
