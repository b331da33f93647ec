//! Attribution: splitting one node's measured energy between the jobs on it, one interval at a
//! time, so that **Σ jobs + idle + unattributed = measured total** for every interval.
//!
//! Pure code: [`attribute`] takes plain data for one interval (per-GPU energy and who holds the
//! GPU, per-socket RAPL energy and CPU times) and returns each job's share plus the node's
//! idle and unattributed buckets. Nothing here reads a clock, a file or a counter; the caller
//! (the job registry) gathers the inputs from the sampler and feeds the results to an
//! [`Accumulator`]. The model and the reasons for it are in `docs/attribution.md`.
//!
//! The rules, in short:
//! * A GPU held by one job: all of its energy, idle included, goes to that job.
//! * A GPU held by several jobs: split by process utilisation when known, else equally; a MIG
//!   GPU: by instance activity when known, else by slice size. Both marked estimated
//!   ([`EstimateReason`]). An optional idle-power floor is split by reservation first.
//! * A GPU (or MIG instance) held by no job: unattributed.
//! * Per CPU socket, for the package and the DRAM energy alike: the active part (energy ×
//!   busy fraction of the socket's CPU time) is split by each job's CPU time on the socket; the
//!   busy time of no job (OS, daemons) is unattributed. The idle part is split by allocated
//!   CPUs (the unallocated CPUs' part is idle), or all of it is idle ([`IdlePolicy`]).
//!
//! Conservation holds by construction: every pool of energy is split with `split`-style
//! arithmetic whose remainder goes to a bucket (or, where the jobs own the whole pool, to the
//! largest share), so nothing is created or lost beyond floating-point rounding.
//! [`check_conservation`] verifies it independently from the inputs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ergon_protocol::CpuSet;
use serde::{Deserialize, Serialize};

use crate::counter::Support;

/// Name of this attribution model, for the manifest's `attribution.model`.
pub const MODEL_NAME: &str = "exclusive-gpu+cgroup-cpu-time";

/// Version of this attribution model, bumped whenever a rule changes.
pub const MODEL_VERSION: u32 = 1;

/// Relative tolerance of [`check_conservation`]: far above floating-point rounding of sums of
/// a few hundred terms (~1e-14), far below any real attribution mistake.
pub const CONSERVATION_TOLERANCE: f64 = 1e-9;

/// Where the idle part of a CPU socket's energy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdlePolicy {
    /// Split by the CPUs each job holds on the socket (HPC accounting: a job that reserved
    /// cores pays for them even while they idle). The unallocated CPUs' part is node idle.
    #[default]
    ByAllocatedCpus,
    /// All idle energy stays in the node's idle bucket; jobs pay only for their CPU time
    /// (Kepler/Alumet/Scaphandre style).
    NodeIdle,
}

/// How the rest of the node's energy (the node meter's energy less the components') is split
/// between the open jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestRule {
    /// By each job's allocated share of the node, weighted per resource as Slurm's TRES billing
    /// weights do ([`AttributionConfig::rest_cpu_weight`], [`AttributionConfig::rest_gpu_weight`],
    /// [`AttributionConfig::rest_mem_weight`]; see [`allocated_share`]); the unallocated share
    /// is idle.
    #[default]
    Allocation,
    /// In proportion to each job's measured component energy in the interval; the part of the
    /// idle and unattributed component energy goes to those buckets.
    Energy,
}

impl fmt::Display for RestRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestRule::Allocation => "allocation",
            RestRule::Energy => "energy",
        })
    }
}

/// Site choices for the attribution model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttributionConfig {
    /// Where CPU idle energy goes; default [`IdlePolicy::ByAllocatedCpus`].
    pub cpu_idle: IdlePolicy,
    /// How the rest of the node (meter − components) is split; default
    /// [`RestRule::Allocation`].
    pub rest_of_node: RestRule,
    /// Weight of the node's CPUs in [`RestRule::Allocation`] (default 1).
    pub rest_cpu_weight: f64,
    /// Weight of the node's GPUs in [`RestRule::Allocation`] (default 1).
    pub rest_gpu_weight: f64,
    /// Weight of the node's memory in [`RestRule::Allocation`] (default 0: CPUs and GPUs only,
    /// as Slurm bills by default).
    pub rest_mem_weight: f64,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            cpu_idle: IdlePolicy::default(),
            rest_of_node: RestRule::default(),
            rest_cpu_weight: 1.0,
            rest_gpu_weight: 1.0,
            rest_mem_weight: 0.0,
        }
    }
}

/// The node meter's energy over one interval set against the components', and where the rest
/// went. `meter_j = components_j + rest_j - excess_j`; `rest_j = jobs_j + idle_j +
/// unattributed_j`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct WallBalance {
    /// Intervals metered.
    pub intervals: u64,
    /// Their total length, ns.
    pub metered_ns: u64,
    /// The node meter's energy, J.
    pub meter_j: f64,
    /// The components' measured energy (GPU, package, DRAM) over the same intervals, J.
    pub components_j: f64,
    /// The rest of the node: `max(0, meter − components)`, J.
    pub rest_j: f64,
    /// The rest's part charged to jobs, J.
    pub jobs_j: f64,
    /// The rest's part that is the node's idle, J.
    pub idle_j: f64,
    /// The rest's part that is unattributed (with [`RestRule::Energy`]: the unattributed
    /// components' part), J.
    pub unattributed_j: f64,
    /// Components above the meter (the rest would have been negative), J.
    pub excess_j: f64,
    /// Intervals where the components exceeded the meter beyond its accuracy.
    pub disagreements: u64,
}

impl WallBalance {
    /// `meter − (components + rest − excess)` and `rest − (jobs + idle + unattributed)`: both 0
    /// up to rounding.
    pub fn conservation_error_j(&self) -> (f64, f64) {
        (
            self.meter_j - (self.components_j + self.rest_j - self.excess_j),
            self.rest_j - (self.jobs_j + self.idle_j + self.unattributed_j),
        )
    }

    /// Add another balance.
    pub fn add(&mut self, o: &WallBalance) {
        self.intervals += o.intervals;
        self.metered_ns += o.metered_ns;
        self.meter_j += o.meter_j;
        self.components_j += o.components_j;
        self.rest_j += o.rest_j;
        self.jobs_j += o.jobs_j;
        self.idle_j += o.idle_j;
        self.unattributed_j += o.unattributed_j;
        self.excess_j += o.excess_j;
        self.disagreements += o.disagreements;
    }
}

/// What a node has, for [`allocated_share`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeResources {
    /// Logical CPUs.
    pub cpus: usize,
    /// GPUs.
    pub gpus: usize,
    /// Memory, MiB, when known.
    pub memory_mib: Option<u64>,
}

/// A job's allocated share of a node, 0..=1: the weighted mean of its share of each resource,
/// `(wc·cpus/node_cpus + wg·gpus/node_gpus + wm·mem/node_mem) / (wc + wg + wm)`. A resource
/// the node lacks (or whose size is unknown: memory) drops out with its weight. A job whose
/// memory Slurm did not say has its CPU share stand in for its memory share (Slurm's
/// `DefMemPerCPU` idea). Each share is capped at 1.
pub fn allocated_share(
    config: &AttributionConfig,
    node: &NodeResources,
    cpus: usize,
    gpus: usize,
    memory_mib: Option<u64>,
) -> f64 {
    let frac = |have: f64, of: f64| (have / of).min(1.0);
    let fc = (node.cpus > 0).then(|| frac(cpus as f64, node.cpus as f64));
    let fg = (node.gpus > 0).then(|| frac(gpus as f64, node.gpus as f64));
    let fm = node
        .memory_mib
        .filter(|&m| m > 0)
        .map(|m| match memory_mib {
            Some(j) => frac(j as f64, m as f64),
            None => fc.unwrap_or(0.0),
        });
    let parts = [
        (config.rest_cpu_weight, fc),
        (config.rest_gpu_weight, fg),
        (config.rest_mem_weight, fm),
    ];
    let weight: f64 = parts
        .iter()
        .filter(|(_, f)| f.is_some())
        .map(|(w, _)| w)
        .sum();
    if weight <= 0.0 {
        return 0.0;
    }
    parts
        .iter()
        .filter_map(|(w, f)| f.map(|f| w * f))
        .sum::<f64>()
        / weight
}

/// One job in [`split_rest`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestJob<K> {
    /// The job.
    pub job: K,
    /// Its allocated share of the node, 0..=1, weighted per resource.
    pub allocation: f64,
    /// Its component energy in the interval, J.
    pub energy_j: f64,
}

/// How one interval's wall energy was split.
#[derive(Debug, Clone, PartialEq)]
pub struct RestSplit<K> {
    /// The node's balance for the interval.
    pub balance: WallBalance,
    /// Each job's part of the rest, J.
    pub jobs: BTreeMap<K, f64>,
}

/// Split one interval's rest of the node. `meter_j`: the meter's energy over the interval;
/// `components`: the node's measured component balance over it; `tolerance`: the meter's
/// accuracy as a fraction of its reading. The rest is `max(0, meter − components)`: components
/// above the meter give no negative rest; beyond `tolerance × meter + 1 J` it is a
/// disagreement. With no job open, the rest is idle.
pub fn split_rest<K: Ord + Clone>(
    meter_j: f64,
    duration_ns: u64,
    components: &NodeBalance,
    jobs: &[RestJob<K>],
    rule: RestRule,
    tolerance: f64,
) -> RestSplit<K> {
    let components_j = components.measured_j();
    let raw = meter_j - components_j;
    let rest_j = raw.max(0.0);
    let excess_j = (-raw).max(0.0);
    let disagreement = excess_j > tolerance * meter_j + 1.0;
    let mut out = RestSplit {
        balance: WallBalance {
            intervals: 1,
            metered_ns: duration_ns,
            meter_j,
            components_j,
            rest_j,
            excess_j,
            disagreements: u64::from(disagreement),
            ..WallBalance::default()
        },
        jobs: BTreeMap::new(),
    };
    let b = &mut out.balance;
    // Each job's fraction of the rest; the remainder is idle (and, by energy, unattributed).
    let (fractions, unattributed_f): (Vec<f64>, f64) = match rule {
        RestRule::Allocation => (
            jobs.iter().map(|j| j.allocation.clamp(0.0, 1.0)).collect(),
            0.0,
        ),
        // No job open: all of it is idle, whatever the rule.
        _ if jobs.is_empty() => (Vec::new(), 0.0),
        RestRule::Energy if components_j > 0.0 => (
            jobs.iter()
                .map(|j| (j.energy_j / components_j).clamp(0.0, 1.0))
                .collect(),
            (components.unattributed_j() / components_j).clamp(0.0, 1.0),
        ),
        // No component energy to go by: all idle.
        RestRule::Energy => (vec![0.0; jobs.len()], 0.0),
    };
    let total: f64 = fractions.iter().sum::<f64>() + unattributed_f;
    let scale = if total > 1.0 { 1.0 / total } else { 1.0 };
    for (j, f) in jobs.iter().zip(&fractions) {
        let part = rest_j * f * scale;
        b.jobs_j += part;
        *out.jobs.entry(j.job.clone()).or_insert(0.0) += part;
    }
    b.unattributed_j = rest_j * unattributed_f * scale;
    b.idle_j = rest_j - b.jobs_j - b.unattributed_j;
    out
}

/// Everything measured on one node over one interval (between two sampler ticks, or a tick
/// and a job event).
#[derive(Debug, Clone, PartialEq)]
pub struct IntervalInputs<K> {
    /// Length of the interval in seconds (used only with a GPU's `idle_power_w`).
    pub duration_s: f64,
    /// Every GPU of the node, each once.
    pub gpus: Vec<GpuInterval<K>>,
    /// Every CPU socket of the node, each once.
    pub sockets: Vec<SocketInterval<K>>,
}

/// One GPU over the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInterval<K> {
    /// `/dev/nvidia<minor>`: the id Slurm's allocation and NVML agree on.
    pub minor: u32,
    /// The GPU's energy in the interval (J), or unsupported (then nobody is charged a number:
    /// the holders' entries say unsupported).
    pub energy_j: Support<f64>,
    /// Idle power of the board (W), e.g. the lowest power observed, if known. Used only for
    /// shared and MIG GPUs: `min(energy, idle_power × duration)` is split by reservation
    /// (equally, or by slice size) and only the rest by utilisation or activity.
    pub idle_power_w: Option<f64>,
    /// Who holds the GPU.
    pub usage: GpuUsage<K>,
}

/// How a GPU is held by jobs.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuUsage<K> {
    /// The whole GPU: no holder (unattributed), one (exclusive) or several (sharding,
    /// oversubscription). Each job at most once.
    Whole(Vec<GpuHolder<K>>),
    /// Split into MIG instances.
    Mig {
        /// Compute slices of the whole GPU (7 on A100/H100); slices in no instance are
        /// unattributed.
        total_slices: u32,
        /// The configured instances; a job may hold several.
        instances: Vec<MigInstance<K>>,
    },
}

/// A job holding a whole GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuHolder<K> {
    /// The job.
    pub job: K,
    /// The job's processes' utilisation of the GPU over the interval (e.g. SM %), if known.
    /// Used only when the GPU is shared and every holder's is known.
    pub utilisation: Option<f64>,
}

/// One MIG instance of a GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct MigInstance<K> {
    /// The job holding the instance, if any.
    pub job: Option<K>,
    /// Compute slices of the instance (3 for a `3g.40gb`), at least 1.
    pub slices: u32,
    /// The instance's engine activity over the interval, `0..=1` (DCGM
    /// `GR_ENGINE_ACTIVE`, GPM), if known. Used only when every instance's is known.
    pub activity: Option<f64>,
}

/// One CPU socket (RAPL package) over the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct SocketInterval<K> {
    /// Physical package id.
    pub socket: u32,
    /// Package energy in the interval (J), or unsupported.
    pub package_j: Support<f64>,
    /// DRAM energy in the interval (J), or unsupported (no DRAM domain).
    pub dram_j: Support<f64>,
    /// Non-idle CPU time of the socket's CPUs in the interval (s), from `/proc/stat`.
    pub busy_cpu_s: f64,
    /// All CPU time of the socket's CPUs in the interval (s), from `/proc/stat`
    /// (≈ CPUs × duration).
    pub total_cpu_s: f64,
    /// Logical CPUs of the socket.
    pub cpus: u32,
    /// The jobs with CPU time or CPUs on this socket, each once.
    pub jobs: Vec<SocketJob<K>>,
}

/// One job on one socket over the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct SocketJob<K> {
    /// The job.
    pub job: K,
    /// The job's cgroup CPU time on this socket's CPUs (s); see [`split_cpu_time`] when only
    /// the job's total is known.
    pub cpu_s: f64,
    /// The job's allocated logical CPUs on this socket; see [`cpus_per_socket`].
    pub allocated_cpus: u32,
}

/// Why a job's figure is an estimate rather than a measurement of its own hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum EstimateReason {
    /// A GPU shared with other jobs, split by the jobs' process utilisation.
    SharedGpuByUtilisation {
        /// The GPU's device minor.
        minor: u32,
    },
    /// A GPU shared with other jobs, split equally (utilisation unknown or all zero).
    SharedGpuEqual {
        /// The GPU's device minor.
        minor: u32,
    },
    /// A MIG instance, charged by the instances' activity.
    MigByActivity {
        /// The GPU's device minor.
        minor: u32,
    },
    /// A MIG instance, charged by its slice size (activity unknown or all zero).
    MigBySliceSize {
        /// The GPU's device minor.
        minor: u32,
    },
}

impl fmt::Display for EstimateReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EstimateReason::SharedGpuByUtilisation { minor } => {
                write!(f, "gpu minor {minor} shared: split by process utilisation")
            }
            EstimateReason::SharedGpuEqual { minor } => {
                write!(f, "gpu minor {minor} shared: split equally")
            }
            EstimateReason::MigByActivity { minor } => {
                write!(f, "gpu minor {minor} MIG: split by instance activity")
            }
            EstimateReason::MigBySliceSize { minor } => {
                write!(f, "gpu minor {minor} MIG: split by slice size")
            }
        }
    }
}

/// A job's share of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SocketShare {
    /// Package energy (J); `None` where the socket's package energy is unsupported.
    pub package_j: Option<f64>,
    /// DRAM energy (J); `None` where the socket's DRAM energy is unsupported.
    pub dram_j: Option<f64>,
}

/// A job's share of the node's energy (one interval, or summed by an [`Accumulator`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JobShare {
    /// Per GPU (by device minor): energy (J); `None` where the GPU's energy is unsupported.
    pub gpus: BTreeMap<u32, Option<f64>>,
    /// Per socket (by package id).
    pub sockets: BTreeMap<u32, SocketShare>,
    /// Why parts of the figures are estimates; empty when none is.
    pub estimated: BTreeSet<EstimateReason>,
}

fn sum_supported(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values
        .flatten()
        .fold(None, |acc, v| Some(acc.unwrap_or(0.0) + v))
}

fn add_option(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x + y),
        (x, None) => x,
        (None, y) => y,
    }
}

impl JobShare {
    /// GPU energy over all GPUs; `None` if no GPU of the job had supported energy.
    pub fn gpu_j(&self) -> Option<f64> {
        sum_supported(self.gpus.values().copied())
    }

    /// Package energy over all sockets; `None` if none was supported.
    pub fn package_j(&self) -> Option<f64> {
        sum_supported(self.sockets.values().map(|s| s.package_j))
    }

    /// DRAM energy over all sockets; `None` if none was supported.
    pub fn dram_j(&self) -> Option<f64> {
        sum_supported(self.sockets.values().map(|s| s.dram_j))
    }

    /// The job's total: GPU + package + DRAM, over the components that were measured.
    pub fn total_j(&self) -> f64 {
        self.gpu_j().unwrap_or(0.0) + self.package_j().unwrap_or(0.0) + self.dram_j().unwrap_or(0.0)
    }

    /// Whether any part of the figures is an estimate.
    pub fn is_estimated(&self) -> bool {
        !self.estimated.is_empty()
    }

    /// Adds another share of the same job (a later interval). A component unsupported in one
    /// and supported in the other keeps the supported sum: coverage is tracked elsewhere.
    pub fn add(&mut self, other: &JobShare) {
        for (&minor, &j) in &other.gpus {
            let e = self.gpus.entry(minor).or_insert(None);
            *e = add_option(*e, j);
        }
        for (&socket, s) in &other.sockets {
            let e = self.sockets.entry(socket).or_default();
            e.package_j = add_option(e.package_j, s.package_j);
            e.dram_j = add_option(e.dram_j, s.dram_j);
        }
        self.estimated.extend(other.estimated.iter().copied());
    }
}

/// A measured component of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// GPU boards (NVML).
    Gpu,
    /// CPU packages (RAPL package domain).
    Package,
    /// DRAM (RAPL DRAM domain).
    Dram,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Gpu => "gpu",
            Component::Package => "package",
            Component::Dram => "dram",
        })
    }
}

/// Where one component's measured energy went: `measured = jobs + idle + unattributed`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ComponentBalance {
    /// Energy the sensors measured (supported sensors only).
    pub measured_j: f64,
    /// Energy charged to jobs.
    pub jobs_j: f64,
    /// Idle energy charged to no job (CPU idle of unallocated CPUs, or all CPU idle under
    /// [`IdlePolicy::NodeIdle`]). Always 0 for GPUs: an idle GPU held by no job is
    /// unattributed.
    pub idle_j: f64,
    /// Energy no job is responsible for: CPU busy time outside job cgroups (OS, daemons),
    /// GPUs and MIG slices held by no job.
    pub unattributed_j: f64,
}

impl ComponentBalance {
    fn add(&mut self, other: &ComponentBalance) {
        self.measured_j += other.measured_j;
        self.jobs_j += other.jobs_j;
        self.idle_j += other.idle_j;
        self.unattributed_j += other.unattributed_j;
    }
}

/// The node's side of the balance, per component.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeBalance {
    /// GPU boards.
    pub gpu: ComponentBalance,
    /// CPU packages.
    pub package: ComponentBalance,
    /// DRAM.
    pub dram: ComponentBalance,
}

impl NodeBalance {
    /// The three components with their names.
    pub fn components(&self) -> [(Component, &ComponentBalance); 3] {
        [
            (Component::Gpu, &self.gpu),
            (Component::Package, &self.package),
            (Component::Dram, &self.dram),
        ]
    }

    fn component_mut(&mut self, c: Component) -> &mut ComponentBalance {
        match c {
            Component::Gpu => &mut self.gpu,
            Component::Package => &mut self.package,
            Component::Dram => &mut self.dram,
        }
    }

    /// All energy measured on the node.
    pub fn measured_j(&self) -> f64 {
        self.gpu.measured_j + self.package.measured_j + self.dram.measured_j
    }

    /// All energy charged to jobs.
    pub fn jobs_j(&self) -> f64 {
        self.gpu.jobs_j + self.package.jobs_j + self.dram.jobs_j
    }

    /// Idle energy charged to no job.
    pub fn idle_j(&self) -> f64 {
        self.gpu.idle_j + self.package.idle_j + self.dram.idle_j
    }

    /// Energy attributed to no job and not idle.
    pub fn unattributed_j(&self) -> f64 {
        self.gpu.unattributed_j + self.package.unattributed_j + self.dram.unattributed_j
    }

    fn add(&mut self, other: &NodeBalance) {
        self.gpu.add(&other.gpu);
        self.package.add(&other.package);
        self.dram.add(&other.dram);
    }
}

/// The result of attributing one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "K: Serialize", deserialize = "K: Deserialize<'de> + Ord"))]
pub struct IntervalAttribution<K> {
    /// Each job named in the inputs, with its share.
    pub jobs: BTreeMap<K, JobShare>,
    /// The node's balance: measured, charged to jobs, idle, unattributed.
    pub node: NodeBalance,
}

impl<K: Ord> Default for IntervalAttribution<K> {
    fn default() -> Self {
        Self {
            jobs: BTreeMap::new(),
            node: NodeBalance::default(),
        }
    }
}

/// Inputs that cannot be attributed. The interval is refused as a whole rather than guessed:
/// the caller records it as a gap, and no value is ever silently read as 0.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttributionError {
    /// A number that is NaN, infinite or negative.
    #[error("{what} is {value}: energies, times, powers, utilisations and activities must be finite and non-negative; the interval was not attributed (check the sensor or reading that produced it)")]
    InvalidValue {
        /// Which input, e.g. `"socket 0 package energy"`.
        what: String,
        /// The value given.
        value: f64,
    },
    /// The same GPU minor twice.
    #[error(
        "gpu minor {minor} appears twice in the interval's inputs; each GPU must be listed once"
    )]
    DuplicateGpu {
        /// The device minor.
        minor: u32,
    },
    /// The same socket twice.
    #[error(
        "socket {socket} appears twice in the interval's inputs; each socket must be listed once"
    )]
    DuplicateSocket {
        /// The package id.
        socket: u32,
    },
    /// The same job twice where each job must appear once.
    #[error("job {job} appears twice on {place}; merge its entries before attributing")]
    DuplicateJob {
        /// The job, as displayed.
        job: String,
        /// Where, e.g. `"socket 1"` or `"gpu minor 3"`.
        place: String,
    },
    /// Busy CPU time above total CPU time: `/proc/stat` cannot produce that.
    #[error("socket {socket}: busy CPU time {busy_s} s exceeds total CPU time {total_s} s; the /proc/stat deltas are inconsistent")]
    BusyExceedsTotal {
        /// The package id.
        socket: u32,
        /// Busy time given.
        busy_s: f64,
        /// Total time given.
        total_s: f64,
    },
    /// A MIG layout that does not fit the GPU.
    #[error("gpu minor {minor}: MIG instances use {used} slices of {total}; each instance needs at least 1 slice and together at most the GPU's total (which must be at least 1)")]
    BadMigLayout {
        /// The device minor.
        minor: u32,
        /// Slices used by the instances.
        used: u64,
        /// The GPU's total slices.
        total: u32,
    },
    /// [`split_cpu_time`] was given CPU time but no allocated CPU to put it on.
    #[error("{cpu_s} s of CPU time but no allocated CPU on any socket: pass the sockets' CPU counts when the job's CPU set is unknown")]
    NoAllocatedCpus {
        /// The CPU time given.
        cpu_s: f64,
    },
}

/// A broken balance found by [`check_conservation`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConservationError {
    /// Jobs + idle + unattributed differs from what the sensors measured.
    #[error("{component}: measured {measured_j} J but jobs + idle + unattributed = {accounted_j} J (difference {difference_j} J)")]
    Imbalance {
        /// Which component.
        component: Component,
        /// Measured, from the inputs.
        measured_j: f64,
        /// Σ jobs + idle + unattributed, from the outputs.
        accounted_j: f64,
        /// `measured_j - accounted_j`.
        difference_j: f64,
    },
    /// The outputs' record of what was measured differs from the inputs.
    #[error(
        "{component}: inputs measured {inputs_j} J but the attribution records {recorded_j} J"
    )]
    MeasuredMismatch {
        /// Which component.
        component: Component,
        /// From the inputs.
        inputs_j: f64,
        /// From the outputs.
        recorded_j: f64,
    },
    /// The node's `jobs_j` differs from the sum of the jobs' shares.
    #[error("{component}: node records {recorded_j} J charged to jobs but the jobs' shares sum to {sum_j} J")]
    JobsMismatch {
        /// Which component.
        component: Component,
        /// `jobs_j` of the node balance.
        recorded_j: f64,
        /// Σ of the jobs' shares.
        sum_j: f64,
    },
    /// A share that is NaN, infinite or negative.
    #[error("{what} is {value}: every share must be finite and non-negative")]
    InvalidShare {
        /// Which share.
        what: String,
        /// Its value.
        value: f64,
    },
}

fn check_value(value: f64, what: impl FnOnce() -> String) -> Result<(), AttributionError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(AttributionError::InvalidValue {
            what: what(),
            value,
        })
    }
}

fn check_support(
    value: &Support<f64>,
    what: impl FnOnce() -> String,
) -> Result<(), AttributionError> {
    match value {
        Support::Supported(v) => check_value(*v, what),
        Support::Unsupported(_) => Ok(()),
    }
}

fn check_unique_jobs<'a, K: Ord + fmt::Display + 'a>(
    jobs: impl Iterator<Item = &'a K>,
    place: impl Fn() -> String,
) -> Result<(), AttributionError> {
    let mut seen = BTreeSet::new();
    for job in jobs {
        if !seen.insert(job) {
            return Err(AttributionError::DuplicateJob {
                job: job.to_string(),
                place: place(),
            });
        }
    }
    Ok(())
}

fn validate<K: Ord + fmt::Display>(inputs: &IntervalInputs<K>) -> Result<(), AttributionError> {
    check_value(inputs.duration_s, || "interval duration".into())?;
    let mut minors = BTreeSet::new();
    for gpu in &inputs.gpus {
        let minor = gpu.minor;
        if !minors.insert(minor) {
            return Err(AttributionError::DuplicateGpu { minor });
        }
        check_support(&gpu.energy_j, || format!("gpu minor {minor} energy"))?;
        if let Some(w) = gpu.idle_power_w {
            check_value(w, || format!("gpu minor {minor} idle power"))?;
        }
        match &gpu.usage {
            GpuUsage::Whole(holders) => {
                check_unique_jobs(holders.iter().map(|h| &h.job), || {
                    format!("gpu minor {minor}")
                })?;
                for h in holders {
                    if let Some(u) = h.utilisation {
                        check_value(u, || {
                            format!("job {} utilisation of gpu minor {minor}", h.job)
                        })?;
                    }
                }
            }
            GpuUsage::Mig {
                total_slices,
                instances,
            } => {
                let used: u64 = instances.iter().map(|i| u64::from(i.slices)).sum();
                if *total_slices == 0
                    || used > u64::from(*total_slices)
                    || instances.iter().any(|i| i.slices == 0)
                {
                    return Err(AttributionError::BadMigLayout {
                        minor,
                        used,
                        total: *total_slices,
                    });
                }
                for (n, i) in instances.iter().enumerate() {
                    if let Some(a) = i.activity {
                        check_value(a, || {
                            format!("activity of MIG instance {n} of gpu minor {minor}")
                        })?;
                    }
                }
            }
        }
    }
    let mut sockets = BTreeSet::new();
    for s in &inputs.sockets {
        let socket = s.socket;
        if !sockets.insert(socket) {
            return Err(AttributionError::DuplicateSocket { socket });
        }
        check_support(&s.package_j, || format!("socket {socket} package energy"))?;
        check_support(&s.dram_j, || format!("socket {socket} DRAM energy"))?;
        check_value(s.busy_cpu_s, || format!("socket {socket} busy CPU time"))?;
        check_value(s.total_cpu_s, || format!("socket {socket} total CPU time"))?;
        if s.busy_cpu_s > s.total_cpu_s {
            return Err(AttributionError::BusyExceedsTotal {
                socket,
                busy_s: s.busy_cpu_s,
                total_s: s.total_cpu_s,
            });
        }
        check_unique_jobs(s.jobs.iter().map(|j| &j.job), || format!("socket {socket}"))?;
        for j in &s.jobs {
            check_value(j.cpu_s, || {
                format!("job {} CPU time on socket {socket}", j.job)
            })?;
        }
    }
    Ok(())
}

/// Splits `total` in proportion to `weights` out of `denom` (≥ Σ weights). Returns the shares
/// and the remainder `total − Σ shares` (the part of `denom` no weight covers). Where the
/// weights cover all of `denom`, the remainder is folded into the largest share, so the shares
/// alone add up to `total`; a rounding-negative remainder is folded the same way, so nothing
/// returned is negative.
fn split(total: f64, weights: &[f64], denom: f64) -> (Vec<f64>, f64) {
    let mut shares = vec![0.0; weights.len()];
    if total == 0.0 || denom <= 0.0 {
        return (shares, total);
    }
    for (s, w) in shares.iter_mut().zip(weights) {
        *s = total * (w / denom);
    }
    let mut rest = total - shares.iter().sum::<f64>();
    let covers_all = weights.iter().sum::<f64>() >= denom;
    if covers_all || rest < 0.0 {
        let largest = shares
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        if let Some(i) = largest {
            shares[i] = (shares[i] + rest).max(0.0);
            rest = 0.0;
        }
    }
    (shares, rest)
}

/// Attributes one interval of one node. Every job named anywhere in the inputs appears in the
/// result (with zero shares where it used nothing). Fails, attributing nothing, on inputs that
/// are not numbers a sensor could produce (see [`AttributionError`]).
pub fn attribute<K: Ord + Clone + fmt::Display>(
    inputs: &IntervalInputs<K>,
    config: &AttributionConfig,
) -> Result<IntervalAttribution<K>, AttributionError> {
    validate(inputs)?;
    let mut out = IntervalAttribution::default();
    for gpu in &inputs.gpus {
        attribute_gpu(gpu, inputs.duration_s, &mut out);
    }
    for socket in &inputs.sockets {
        attribute_socket(socket, config.cpu_idle, &mut out);
    }
    Ok(out)
}

fn job_entry<'a, K: Ord + Clone>(out: &'a mut IntervalAttribution<K>, job: &K) -> &'a mut JobShare {
    out.jobs.entry(job.clone()).or_default()
}

fn credit_gpu<K: Ord + Clone>(out: &mut IntervalAttribution<K>, job: &K, minor: u32, j: f64) {
    let share = job_entry(out, job);
    let e = share.gpus.entry(minor).or_insert(Some(0.0));
    *e = Some(e.unwrap_or(0.0) + j);
    out.node.gpu.jobs_j += j;
}

fn attribute_gpu<K: Ord + Clone>(
    gpu: &GpuInterval<K>,
    duration_s: f64,
    out: &mut IntervalAttribution<K>,
) {
    let minor = gpu.minor;
    let holders: Vec<&K> = match &gpu.usage {
        GpuUsage::Whole(h) => h.iter().map(|h| &h.job).collect(),
        GpuUsage::Mig { instances, .. } => {
            instances.iter().filter_map(|i| i.job.as_ref()).collect()
        }
    };
    let Some(&energy) = gpu.energy_j.supported() else {
        for job in holders {
            job_entry(out, job).gpus.insert(minor, None);
        }
        return;
    };
    out.node.gpu.measured_j += energy;
    // Idle floor: split by reservation; only the rest by utilisation or activity.
    let floor = gpu
        .idle_power_w
        .map_or(0.0, |w| (w * duration_s).min(energy));
    match &gpu.usage {
        GpuUsage::Whole(holders) => match holders.as_slice() {
            [] => out.node.gpu.unattributed_j += energy,
            [only] => credit_gpu(out, &only.job, minor, energy),
            _ => {
                let n = holders.len();
                let equal = vec![1.0; n];
                let (reserved, _) = split(floor, &equal, n as f64);
                let utilisation: Option<Vec<f64>> = holders.iter().map(|h| h.utilisation).collect();
                let (weights, reason) = match utilisation {
                    Some(u) if u.iter().sum::<f64>() > 0.0 => {
                        (u, EstimateReason::SharedGpuByUtilisation { minor })
                    }
                    _ => (equal, EstimateReason::SharedGpuEqual { minor }),
                };
                let denom = weights.iter().sum::<f64>();
                let (active, _) = split(energy - floor, &weights, denom);
                for (i, h) in holders.iter().enumerate() {
                    credit_gpu(out, &h.job, minor, reserved[i] + active[i]);
                    job_entry(out, &h.job).estimated.insert(reason);
                }
            }
        },
        GpuUsage::Mig {
            total_slices,
            instances,
        } => {
            let total = f64::from(*total_slices);
            let slices: Vec<f64> = instances.iter().map(|i| f64::from(i.slices)).collect();
            let (reserved, unreserved) = split(floor, &slices, total);
            let activity: Option<Vec<f64>> = instances
                .iter()
                .map(|i| i.activity.map(|a| a * f64::from(i.slices)))
                .collect();
            let (active, unused, reason) = match activity {
                Some(a) if a.iter().sum::<f64>() > 0.0 => {
                    let denom = a.iter().sum::<f64>();
                    let (s, r) = split(energy - floor, &a, denom);
                    (s, r, EstimateReason::MigByActivity { minor })
                }
                _ => {
                    let (s, r) = split(energy - floor, &slices, total);
                    (s, r, EstimateReason::MigBySliceSize { minor })
                }
            };
            out.node.gpu.unattributed_j += unreserved + unused;
            for (i, inst) in instances.iter().enumerate() {
                let j = reserved[i] + active[i];
                match &inst.job {
                    Some(job) => {
                        credit_gpu(out, job, minor, j);
                        job_entry(out, job).estimated.insert(reason);
                    }
                    None => out.node.gpu.unattributed_j += j,
                }
            }
        }
    }
}

fn attribute_socket<K: Ord + Clone>(
    s: &SocketInterval<K>,
    policy: IdlePolicy,
    out: &mut IntervalAttribution<K>,
) {
    let cpu: Vec<f64> = s.jobs.iter().map(|j| j.cpu_s).collect();
    let cores: Vec<f64> = s.jobs.iter().map(|j| f64::from(j.allocated_cpus)).collect();
    // Jobs' CPU time can exceed the socket's busy time by sampling skew (cgroup and /proc/stat
    // are read a few µs apart): the busy time is then at least the jobs' sum.
    let busy = s.busy_cpu_s.max(cpu.iter().sum::<f64>());
    let busy_fraction = if s.total_cpu_s > 0.0 {
        (busy / s.total_cpu_s).min(1.0)
    } else if busy > 0.0 {
        1.0
    } else {
        0.0
    };
    let core_denom = f64::from(s.cpus).max(cores.iter().sum::<f64>());
    for job in &s.jobs {
        job_entry(out, &job.job)
            .sockets
            .entry(s.socket)
            .or_default();
    }
    for component in [Component::Package, Component::Dram] {
        let measured = match component {
            Component::Package => &s.package_j,
            _ => &s.dram_j,
        };
        let Some(&energy) = measured.supported() else {
            continue;
        };
        let active = energy * busy_fraction;
        let idle = energy - active;
        let (active_shares, os) = split(active, &cpu, busy);
        let (idle_shares, idle_rest) = match policy {
            IdlePolicy::ByAllocatedCpus => split(idle, &cores, core_denom),
            IdlePolicy::NodeIdle => (vec![0.0; s.jobs.len()], idle),
        };
        let mut charged = 0.0;
        for (i, job) in s.jobs.iter().enumerate() {
            let j = active_shares[i] + idle_shares[i];
            charged += j;
            let share = job_entry(out, &job.job)
                .sockets
                .entry(s.socket)
                .or_default();
            match component {
                Component::Package => share.package_j = Some(j),
                _ => share.dram_j = Some(j),
            }
        }
        let balance = out.node.component_mut(component);
        balance.measured_j += energy;
        balance.jobs_j += charged;
        balance.unattributed_j += os;
        balance.idle_j += idle_rest;
    }
}

/// What the inputs measured, per component (supported sensors only).
fn measured(inputs: &IntervalInputs<impl Sized>) -> NodeBalance {
    let mut m = NodeBalance::default();
    for g in &inputs.gpus {
        m.gpu.measured_j += g.energy_j.supported().copied().unwrap_or(0.0);
    }
    for s in &inputs.sockets {
        m.package.measured_j += s.package_j.supported().copied().unwrap_or(0.0);
        m.dram.measured_j += s.dram_j.supported().copied().unwrap_or(0.0);
    }
    m
}

/// The jobs' shares summed per component, checking each share is a non-negative number.
fn jobs_sum<K: fmt::Display>(
    jobs: &BTreeMap<K, JobShare>,
) -> Result<NodeBalance, ConservationError> {
    let mut sum = NodeBalance::default();
    let check = |v: f64, what: &dyn Fn() -> String| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(ConservationError::InvalidShare {
                what: what(),
                value: v,
            })
        }
    };
    for (job, share) in jobs {
        for (minor, j) in &share.gpus {
            if let Some(j) = j {
                sum.gpu.jobs_j += check(*j, &|| format!("job {job} gpu minor {minor} energy"))?;
            }
        }
        for (socket, s) in &share.sockets {
            if let Some(j) = s.package_j {
                sum.package.jobs_j +=
                    check(j, &|| format!("job {job} socket {socket} package energy"))?;
            }
            if let Some(j) = s.dram_j {
                sum.dram.jobs_j += check(j, &|| format!("job {job} socket {socket} DRAM energy"))?;
            }
        }
    }
    Ok(sum)
}

fn within_tolerance(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= CONSERVATION_TOLERANCE * scale.abs().max(1e-3)
}

/// Checks an interval's attribution against its inputs, independently of how it was computed:
/// per component, the measured energy recomputed from the inputs equals the jobs' shares +
/// idle + unattributed (to [`CONSERVATION_TOLERANCE`] relative, or 1e-12 J), the node's
/// `jobs_j` equals the sum of the jobs' shares, and no share or bucket is negative or NaN.
pub fn check_conservation<K: fmt::Display>(
    inputs: &IntervalInputs<K>,
    outputs: &IntervalAttribution<K>,
) -> Result<(), ConservationError> {
    let measured = measured(inputs);
    let jobs = jobs_sum(&outputs.jobs)?;
    for (((component, m), (_, j)), (_, o)) in measured
        .components()
        .into_iter()
        .zip(jobs.components())
        .zip(outputs.node.components())
    {
        for (name, v) in [("idle", o.idle_j), ("unattributed", o.unattributed_j)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConservationError::InvalidShare {
                    what: format!("node {component} {name} energy"),
                    value: v,
                });
            }
        }
        if !within_tolerance(m.measured_j, o.measured_j, m.measured_j) {
            return Err(ConservationError::MeasuredMismatch {
                component,
                inputs_j: m.measured_j,
                recorded_j: o.measured_j,
            });
        }
        if !within_tolerance(j.jobs_j, o.jobs_j, m.measured_j) {
            return Err(ConservationError::JobsMismatch {
                component,
                recorded_j: o.jobs_j,
                sum_j: j.jobs_j,
            });
        }
        let accounted = j.jobs_j + o.idle_j + o.unattributed_j;
        if !within_tolerance(m.measured_j, accounted, m.measured_j) {
            return Err(ConservationError::Imbalance {
                component,
                measured_j: m.measured_j,
                accounted_j: accounted,
                difference_j: m.measured_j - accounted,
            });
        }
    }
    Ok(())
}

/// How many CPUs of a job's CPU set lie on each socket, from the sockets' CPU sets
/// (`/sys/devices/system/cpu/cpuN/topology/physical_package_id`, grouped). Sockets with none
/// are listed with 0.
pub fn cpus_per_socket(job: &CpuSet, sockets: &[(u32, CpuSet)]) -> Vec<(u32, u32)> {
    sockets
        .iter()
        .map(|(socket, cpus)| {
            let mut n: u64 = 0;
            for &(a0, a1) in job.ranges() {
                for &(b0, b1) in cpus.ranges() {
                    let (lo, hi) = (a0.max(b0), a1.min(b1));
                    if lo <= hi {
                        n += u64::from(hi - lo) + 1;
                    }
                }
            }
            (*socket, u32::try_from(n).unwrap_or(u32::MAX))
        })
        .collect()
}

/// Splits a job's cgroup CPU time across sockets in proportion to its allocated CPUs per
/// socket, for when per-CPU usage is unavailable (cgroup v2 `cpu.stat` has only a total).
/// Exact: the parts add up to `cpu_s`. When the job's CPU set is unknown, pass each socket's
/// CPU count instead. Errors on a negative or NaN time, or on CPU time with no CPU to put it on.
pub fn split_cpu_time(
    cpu_s: f64,
    allocated: &[(u32, u32)],
) -> Result<Vec<(u32, f64)>, AttributionError> {
    check_value(cpu_s, || "job CPU time".into())?;
    let weights: Vec<f64> = allocated.iter().map(|&(_, n)| f64::from(n)).collect();
    let denom = weights.iter().sum::<f64>();
    if cpu_s > 0.0 && denom == 0.0 {
        return Err(AttributionError::NoAllocatedCpus { cpu_s });
    }
    let (shares, _) = split(cpu_s, &weights, denom);
    Ok(allocated.iter().map(|&(s, _)| s).zip(shares).collect())
}

/// Sums attributed intervals per job and per node, and keeps a running conservation error
/// (`ergon_attribution_conservation_error_joules`). Serialisable, for the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "K: Serialize", deserialize = "K: Deserialize<'de> + Ord"))]
pub struct Accumulator<K> {
    jobs: BTreeMap<K, JobShare>,
    node: NodeBalance,
    intervals: u64,
    error_j: f64,
    abs_error_j: f64,
    max_interval_error_j: f64,
}

impl<K: Ord> Default for Accumulator<K> {
    fn default() -> Self {
        Self {
            jobs: BTreeMap::new(),
            node: NodeBalance::default(),
            intervals: 0,
            error_j: 0.0,
            abs_error_j: 0.0,
            max_interval_error_j: 0.0,
        }
    }
}

impl<K: Ord + Clone> Accumulator<K> {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one attributed interval. Its conservation error — measured minus the sum of the
    /// jobs' shares, idle and unattributed, recomputed from the shares rather than taken from
    /// the node's `jobs_j` — is added to the running error.
    pub fn add(&mut self, interval: &IntervalAttribution<K>) {
        for (job, share) in &interval.jobs {
            self.jobs.entry(job.clone()).or_default().add(share);
        }
        self.node.add(&interval.node);
        let jobs: f64 = interval.jobs.values().map(JobShare::total_j).sum();
        let n = &interval.node;
        let error = n.measured_j() - (jobs + n.idle_j() + n.unattributed_j());
        self.error_j += error;
        self.abs_error_j += error.abs();
        self.max_interval_error_j = self.max_interval_error_j.max(error.abs());
        self.intervals += 1;
    }

    /// A job's totals so far.
    pub fn job(&self, job: &K) -> Option<&JobShare> {
        self.jobs.get(job)
    }

    /// All jobs' totals so far.
    pub fn jobs(&self) -> &BTreeMap<K, JobShare> {
        &self.jobs
    }

    /// Removes a job (at its end) and returns its totals. The node's balance keeps its energy.
    pub fn take_job(&mut self, job: &K) -> Option<JobShare> {
        self.jobs.remove(job)
    }

    /// The node's balance summed over all intervals.
    pub fn node(&self) -> &NodeBalance {
        &self.node
    }

    /// Intervals added.
    pub fn intervals(&self) -> u64 {
        self.intervals
    }

    /// Signed sum of the intervals' conservation errors (J): measured − accounted.
    pub fn conservation_error_j(&self) -> f64 {
        self.error_j
    }

    /// Sum of the intervals' absolute conservation errors (J): errors cannot cancel here.
    pub fn abs_conservation_error_j(&self) -> f64 {
        self.abs_error_j
    }

    /// The largest absolute conservation error of one interval (J).
    pub fn max_interval_error_j(&self) -> f64 {
        self.max_interval_error_j
    }
}
