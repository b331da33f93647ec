//! The per-job, per-node energy manifest: ergond writes one JSON file per job per node into
//! its spool when the job ends; the accounting tool reads them, merges a job's nodes and
//! records the result in sacct and the site's data store.
//!
//! The manifest is the durable record of a measurement, so it says not only how much
//! energy a job used but how that number was obtained: which sensors and methods, how much
//! of the job's time was covered, what was left unattributed. Every field is documented
//! below; `protocol/manifest.schema.json` is the same description as a JSON Schema.
//!
//! # Conventions
//!
//! - Energies are joules (`_j`), powers watts (`_w`), times nanoseconds since the Unix
//!   epoch (`_unix_ns`) or seconds (`_s`).
//! - A quantity that was not measured (no such sensor on the node, or the sensor is not
//!   supported) is `null`, never `0`.
//! - Every field is always present (absent optional values are written as `null`).
//!
//! # Power traces on the wire
//!
//! [`TraceSeries::watts`] is a `Vec<f32>` in Rust. In the JSON of **schema 2** (what this build
//! writes) it is the field `watts_f32le_b64`: the values as IEEE 754 binary32, little-endian,
//! 4 bytes each in order, encoded as one base64 string (RFC 4648 §4: standard alphabet, `=`
//! padding, no line breaks). A 600-point series is 3,200 characters; as decimal text it was
//! about 6,000 compact at full f32 precision and about 10,000 pretty-printed (one value a line,
//! as ergond writes files), and reading it back is a base64 decode instead of 600 float parses.
//! In **schema 1** it is the field `watts`, an array of decimal numbers; this build still reads
//! and verifies schema 1 manifests. Values are finite (never NaN or infinite) in both.
//!
//! # Content hash
//!
//! [`Manifest::content_hash`] is `"sha256:<64 lowercase hex>"` of the manifest's *canonical
//! JSON*: its compact serialisation (`serde_json::to_vec`, fields in the order of the struct
//! definitions) with `content_hash` set to `""`. The hash is over *ergon's own* serialisation:
//! a reader parses the file (which may be pretty-printed) into [`Manifest`], re-serialises it
//! in canonical form and hashes that. This is exact because field order is fixed, there are no
//! maps with unordered keys, and every value survives the round trip bit for bit (serde_json is
//! built with `float_roundtrip`; trace values are their own bytes; [`Manifest::to_json`]
//! refuses values such as NaN that would not read back).
//!
//! The canonical form of a trace series is simply its serialised form in the manifest's
//! `schema_version`: for schema 2 the base64 string exactly as written (the encoding is
//! canonical: one string per sequence of values), for schema 1 the decimal array (serde_json's
//! shortest round-trip spelling of each f32), so a schema 1 manifest hashes to exactly what
//! the release that sealed it computed. The reader also accepts the other version's spelling of
//! a series (what is verified is the values, through the version's canonical form), but
//! writers use their version's. Any other change to the fields or their serialisation bumps
//! [`MANIFEST_SCHEMA_VERSION`]; a reader verifies the versions from
//! [`MANIFEST_SCHEMA_VERSION_MIN`] to [`MANIFEST_SCHEMA_VERSION_MAX`]. Schema 3 is schema 2
//! plus the optional `gpus[].mig`, and only manifests that have it are written as 3.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeStruct as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::wire::StepId;

/// The manifest schema this build writes for jobs that held whole GPUs only.
pub const MANIFEST_SCHEMA_VERSION: u32 = 2;

/// The schema written for a job that held MIG instances: schema 2 plus `gpus[].mig`
/// ([`GpuEnergy::mig`]). Readers that predate it cannot verify such a manifest (they would
/// hash it without the field), so only these manifests carry the new number and every other
/// manifest stays readable by them. See [`Manifest::schema_version_for`].
pub const MANIFEST_SCHEMA_VERSION_MIG: u32 = 3;

/// Schema 4: schema 3 plus what makes a partial or estimated figure say so — per-component
/// coverage ([`Coverage::components`]), a job's GPUs that could not be known
/// ([`Coverage::gpus_unknown`]), estimated gaps with an error bound ([`Gap::estimate`]) — and
/// Slurm's cluster-unique job id ([`JobInfo::sluid`], Slurm 26.05+). ergond writes every
/// manifest as schema 4; the new fields are optional in the JSON, so a schema 2 or 3 manifest
/// reads (and verifies) as it always did.
pub const MANIFEST_SCHEMA_VERSION_COVERAGE: u32 = 4;

/// Schema 5: schema 4 plus the job's nodes ([`JobInfo::node_list`]), so that one node's manifest says
/// what whole it is a part of and the accounting can name a node that did not report. Written
/// only when the plugin gave the job's node list; the field is optional, so every schema 4
/// manifest stays as it was.
pub const MANIFEST_SCHEMA_VERSION_NODES: u32 = 5;

/// Schema 6: schema 5 plus each GPU's activity and health over the job
/// ([`GpuEnergy::efficiency`]: SM utilisation, memory, temperature, clocks, throttling, ECC
/// errors, Xid events, whether it sat idle) and the job's energy at the wall
/// ([`Manifest::wall`]). Written only for manifests that have one of them; the fields are
/// optional, so every schema 5 manifest stays as it was.
pub const MANIFEST_SCHEMA_VERSION_EFFICIENCY: u32 = 6;

/// The newest manifest schema this build reads.
pub const MANIFEST_SCHEMA_VERSION_MAX: u32 = MANIFEST_SCHEMA_VERSION_EFFICIENCY;

/// The oldest manifest schema this build still reads and verifies: schema 1, whose power
/// traces are decimal arrays (see the [module documentation](self#power-traces-on-the-wire)).
pub const MANIFEST_SCHEMA_VERSION_MIN: u32 = 1;

/// Why a manifest could not be read, written or trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The manifest's schema version is not one this build understands.
    #[error("manifest schema version {got} is not supported (this build reads versions {MANIFEST_SCHEMA_VERSION_MIN} to {supported}); use an ergon release that matches the ergond that wrote it")]
    UnsupportedSchema {
        /// The manifest's `schema_version`.
        got: u32,
        /// [`MANIFEST_SCHEMA_VERSION_MAX`], the newest version this build reads.
        supported: u32,
    },
    /// A field appears in a schema version that does not have it.
    #[error("manifest of schema version {version} has {field}, which needs schema version {needs}; the file was not written by a matching ergond")]
    FieldNeedsVersion {
        /// The manifest's `schema_version`.
        version: u32,
        /// The field.
        field: &'static str,
        /// The first version that has it.
        needs: u32,
    },
    /// The text is not valid JSON or does not have the manifest's shape.
    #[error("manifest is not valid JSON of the expected shape: {0}; the file may be truncated or not an ergon manifest")]
    Json(#[from] serde_json::Error),
    /// The manifest has no content hash (it was never sealed).
    #[error(
        "manifest has no content hash; it was not written by ergond (seal it with Manifest::seal)"
    )]
    NotSealed,
    /// The content does not match its hash: the file was modified after ergond wrote it.
    #[error("manifest content hash mismatch: it says {expected} but the content hashes to {computed}; the file was modified or corrupted after it was written")]
    HashMismatch {
        /// The hash stored in the manifest.
        expected: String,
        /// The hash of the content as read.
        computed: String,
    },
    /// The manifest holds a value JSON cannot carry exactly (a NaN or infinite float), so
    /// it would not read back as written.
    #[error("manifest cannot be written: {0}")]
    NotRepresentable(String),
}

/// One job's energy on one node.
///
/// Serialised with the fields in this order; the power trace in the form of the manifest's
/// `schema_version` (see the [module documentation](self#power-traces-on-the-wire)).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_SCHEMA_VERSION`] for manifests this build writes. Checked first, so
    /// that a manifest from another version fails clearly.
    pub schema_version: u32,
    /// Slurm cluster name (`ClusterName` in slurm.conf).
    pub cluster: String,
    /// The node this manifest covers, as Slurm names it.
    pub node: String,
    /// Who and what the job is.
    pub job: JobInfo,
    /// When the job started on this node.
    pub start_unix_ns: u64,
    /// When the job ended on this node.
    pub end_unix_ns: u64,
    /// `end - start` in seconds, for readers that do not want to subtract nanoseconds.
    pub duration_s: f64,
    /// Energy per step, in step start order.
    pub steps: Vec<StepEnergy>,
    /// Energy per GPU allocated to the job on this node.
    pub gpus: Vec<GpuEnergy>,
    /// The job's share of each CPU socket's energy.
    pub sockets: Vec<SocketEnergy>,
    /// The job's totals on this node.
    pub totals: Totals,
    /// What the whole node used over the job's interval, for context.
    pub node_context: NodeContext,
    /// How much of the job's interval the readings cover.
    pub coverage: Coverage,
    /// How energy was attributed to the job.
    pub attribution: AttributionInfo,
    /// The sensors the numbers come from.
    pub sensors: Vec<SensorInfo>,
    /// A downsampled power trace, for plots.
    pub trace: PowerTrace,
    /// The job's energy at the wall, from the node meter (schema 6); absent where the node has
    /// no meter, or it covered none of the job.
    #[serde(default)]
    pub wall: Option<WallEnergy>,
    /// `"sha256:<hex>"`; see the [module documentation](self#content-hash).
    pub content_hash: String,
}

/// The job's node-level energy "at the wall" (schema 6): its component energy plus its part of
/// the rest of the node (the meter's energy less the components'), over the intervals the node
/// meter covered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WallEnergy {
    /// `components_j + rest_of_node_j`, J.
    pub energy_j: f64,
    /// The job's component energy (GPU, CPU package, DRAM) over the metered intervals, J: its
    /// `totals.energy_j` when the meter covered the whole job.
    pub components_j: f64,
    /// Its part of the rest of the node over them, J.
    pub rest_of_node_j: f64,
    /// How the rest was split: `allocation` or `energy` (docs/attribution.md).
    pub rule: String,
    /// The node meter.
    pub meter: WallMeter,
    /// Length of the job's intervals the meter covered, s.
    pub metered_s: f64,
    /// Length of those it did not cover (no meter reading around an end), s: their energy at
    /// the wall is not in `energy_j`.
    pub unmetered_s: f64,
    /// Metered intervals where the node's components measured more than the meter beyond its
    /// accuracy: the rest of the node is 0 there, and the meter or a component is wrong.
    pub disagreements: u64,
    /// The first of those intervals (at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disagreement_intervals: Vec<WallInterval>,
}

/// A node meter, as a manifest names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WallMeter {
    /// `hwmon`, `pm_counters`, `redfish` or `ipmi`.
    pub kind: String,
    /// Where its values come from: a path or a URL.
    pub source: String,
    /// Its resolution (update period), s.
    pub resolution_s: f64,
    /// Its stated accuracy, percent of its reading (`[meters] accuracy_percent`).
    pub accuracy_percent: f64,
}

/// An interval of a job, Unix ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WallInterval {
    /// Start.
    pub start_unix_ns: u64,
    /// End.
    pub end_unix_ns: u64,
}

/// The job's identity and ownership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Slurm job id (for an array task, the task's own id).
    pub job_id: u32,
    /// The array's job id, for a task of a job array.
    pub array_job_id: Option<u32>,
    /// The task's index in its array.
    pub array_task_id: Option<u32>,
    /// The owner's user name.
    pub user: String,
    /// The owner's uid.
    pub uid: u32,
    /// Slurm account charged.
    pub account: Option<String>,
    /// Slurm partition.
    pub partition: Option<String>,
    /// Slurm's cluster-unique job id (`SLURM_JOB_SLUID`, Slurm 26.05+), lowercase (it is
    /// Crockford base32, case-insensitive). Absent where Slurm does not provide one
    /// (schema 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sluid: Option<String>,
    /// Every node the job ran on, as Slurm's host list (`SLURM_JOB_NODELIST`, e.g.
    /// `gpu[01-64]`: compact, so that each node's manifest of a large job stays small; see
    /// [`JobInfo::nodes`]); this manifest covers [`Manifest::node`], one of them. Absent where
    /// the plugin did not say (schema 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_list: Option<String>,
}

impl JobInfo {
    /// The job's nodes, [`JobInfo::node_list`] expanded in Slurm's order; `None` when the
    /// manifest has no list or it is not one ([`crate::hostlist::expand`]).
    pub fn nodes(&self) -> Option<Vec<String>> {
        self.node_list
            .as_deref()
            .and_then(|l| crate::hostlist::expand(l).ok())
    }
}

/// Energy of one step on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEnergy {
    /// The step, as Slurm prints it: `"batch"`, `"extern"`, `"interactive"`, `"0"`, …
    pub step: StepId,
    /// When the step started.
    pub start_unix_ns: u64,
    /// When the step ended (the job's end if the step's end was not seen).
    pub end_unix_ns: u64,
    /// Total energy attributed to the step: the sum of the measured components.
    pub energy_j: f64,
    /// GPU energy; `null` if not measured.
    pub gpu_j: Option<f64>,
    /// CPU package energy; `null` if not measured.
    pub cpu_j: Option<f64>,
    /// DRAM energy; `null` if not measured.
    pub dram_j: Option<f64>,
}

/// How an energy figure was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergyMethod {
    /// Difference of a cumulative hardware energy counter (NVML total energy, RAPL): the
    /// preferred, exact method.
    Counter,
    /// Power samples integrated over time: a fallback where no counter exists.
    IntegratedPower,
    /// Estimated (e.g. a gap filled by interpolation).
    Estimated,
}

/// Energy of one GPU over the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuEnergy {
    /// NVML UUID (`GPU-…`), stable across reboots and renumbering.
    pub uuid: String,
    /// Slurm's GPU index (gres.conf order, as in `SLURM_JOB_GPUS`).
    pub index: u32,
    /// `/dev/nvidiaN` device minor, if known.
    pub minor: Option<u32>,
    /// PCI bus id (`00000000:3B:00.0`), if known.
    pub pci_bus_id: Option<String>,
    /// Energy attributed to the job; `null` when the GPU could not be read (never 0 for an
    /// unmeasured GPU).
    pub energy_j: Option<f64>,
    /// Average power over the job; `null` with `energy_j`.
    pub avg_w: Option<f64>,
    /// Highest power sample seen; `null` when no sample was.
    pub peak_w: Option<f64>,
    /// How `energy_j` was obtained.
    pub method: EnergyMethod,
    /// Whether the GPU was shared with other jobs (then `energy_j` is a share, not the
    /// device's whole energy). True for a MIG instance.
    pub shared: bool,
    /// The job's MIG instances on this GPU, when it held instances rather than the whole GPU
    /// (then `energy_j` is the job's modelled share of the board, `shared` is true). Absent
    /// for a whole GPU, also in manifests written before MIG support (their hashes are
    /// unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<GpuMig>,
    /// The GPU's activity and health over the job (schema 6); absent where ergond did not
    /// sample them (no statistics thread, a manifest written before they existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub efficiency: Option<GpuEfficiency>,
}

/// A GPU's activity and health over the job on this node, from ergond's samples at the CPU-time
/// cadence. Each figure is `null` where the GPU or driver does not report it ("not reported"),
/// never 0. For a GPU shared with other jobs (or MIG), the figures are the whole device's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuEfficiency {
    /// Time of the job the samples cover, seconds.
    pub sampled_s: f64,
    /// Whether the samples cover less of the job than they should (ergond was down during
    /// part of it): the averages and maxima are then over the part sampled. Counters
    /// (throttle, ECC) still span the whole job where the driver kept them.
    pub partial: bool,
    /// Average SM utilisation, % (time-weighted).
    pub sm_util_avg_pct: Option<f64>,
    /// Whether the GPU sat idle: `sm_util_avg_pct` below `idle_threshold_pct`; `null` when
    /// utilisation is not reported.
    pub idle: Option<bool>,
    /// The idle rule's threshold (ergond's `[report] idle_gpu_util_percent`).
    pub idle_threshold_pct: f64,
    /// Highest device memory in use, bytes.
    pub memory_used_max_bytes: Option<u64>,
    /// Highest GPU temperature, °C.
    pub temperature_max_c: Option<u32>,
    /// Average SM clock, MHz.
    pub sm_clock_avg_mhz: Option<f64>,
    /// Average memory clock, MHz.
    pub mem_clock_avg_mhz: Option<f64>,
    /// Time the clocks were held down, per reason (NVML's clock-event-reason counters).
    pub throttle_s: ThrottleSeconds,
    /// Corrected ECC errors during the job.
    pub ecc_corrected: Option<u64>,
    /// Uncorrected ECC errors during the job.
    pub ecc_uncorrected: Option<u64>,
    /// Xid critical errors during the job (`null`: not reported).
    pub xid_count: Option<u64>,
    /// The first of them (at most 32), in order.
    pub xids: Option<Vec<XidEvent>>,
}

/// Seconds a GPU's clocks were held down, per reason; `null` where the driver has no counter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThrottleSeconds {
    /// Software power cap (the board's power limit).
    pub power_cap: Option<f64>,
    /// Software thermal slowdown.
    pub sw_thermal: Option<f64>,
    /// Hardware thermal slowdown.
    pub hw_thermal: Option<f64>,
    /// Hardware power brake (external power brake assertion).
    pub hw_power_brake: Option<f64>,
}

impl ThrottleSeconds {
    /// `(reason, seconds)` for the reasons reported.
    pub fn reported(&self) -> Vec<(&'static str, f64)> {
        [
            ("power_cap", self.power_cap),
            ("sw_thermal", self.sw_thermal),
            ("hw_thermal", self.hw_thermal),
            ("hw_power_brake", self.hw_power_brake),
        ]
        .into_iter()
        .filter_map(|(n, v)| Some((n, v?)))
        .collect()
    }

    /// The sum of the reported reasons' seconds; `None` when none is reported.
    pub fn total(&self) -> Option<f64> {
        let r = self.reported();
        (!r.is_empty()).then(|| r.iter().map(|(_, v)| v).sum())
    }
}

/// One Xid critical error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidEvent {
    /// When ergond received it.
    pub at_unix_ns: u64,
    /// The Xid (e.g. 79: fallen off the bus, 48: double-bit ECC error).
    pub xid: u64,
}

/// A job's MIG instances on one GPU and how the board's energy was shared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuMig {
    /// Compute slices of the whole GPU (7 on A100/H100).
    pub total_slices: u32,
    /// The job's instances on it.
    pub instances: Vec<MigInstanceRef>,
    /// How the board's energy was split among the instances' jobs.
    pub share_method: MigShareMethod,
}

impl GpuMig {
    /// For people: `GI 1 (3 of 7 slices), estimated by slice size`.
    pub fn describe(&self) -> String {
        let instances: Vec<String> = self
            .instances
            .iter()
            .map(|i| match i.slices {
                Some(n) => format!(
                    "GI {} ({n} of {} slices)",
                    i.gpu_instance_id, self.total_slices
                ),
                None => format!("GI {}", i.gpu_instance_id),
            })
            .collect();
        let how = match self.share_method {
            MigShareMethod::SliceSize => "by slice size",
            MigShareMethod::Activity => "by activity",
            MigShareMethod::WholeGpu => "as a shared whole GPU",
        };
        format!("{}, estimated {how}", instances.join(", "))
    }
}

/// One MIG instance a job held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigInstanceRef {
    /// GPU instance id.
    pub gpu_instance_id: u32,
    /// Compute instance id, if known.
    pub compute_instance_id: Option<u32>,
    /// Its GPU instance slices; `null` when ergond did not find the instance on the GPU.
    pub slices: Option<u32>,
    /// Its `MIG-…` UUID; `null` when ergond did not find the instance on the GPU.
    pub uuid: Option<String>,
}

/// How a MIG GPU's energy was split (docs/attribution.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigShareMethod {
    /// By instance slices over the GPU's total slices (unused slices unattributed).
    SliceSize,
    /// By instance activity × slices.
    Activity,
    /// As a whole GPU among its holders (by process utilisation or equally), because a holder
    /// held no instance ergond knew (a MIG layout that changed while ergond ran, or an
    /// allocation the plugin could not resolve).
    WholeGpu,
}

/// How a socket's energy was shared among the jobs on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareMethod {
    /// In proportion to each job's cgroup CPU time on the socket's CPUs.
    CgroupCpuTime,
    /// In proportion to the cores allocated to each job (when CPU time was unavailable).
    AllocatedCores,
}

/// The job's share of one CPU socket's energy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SocketEnergy {
    /// Physical package id (`/sys/devices/system/cpu/cpuN/topology/physical_package_id`).
    pub socket: u32,
    /// The job's share of the package energy.
    pub package_j: f64,
    /// The job's share of the DRAM energy; `null` where RAPL has no DRAM domain.
    pub dram_j: Option<f64>,
    /// How the socket's energy was measured.
    pub method: EnergyMethod,
    /// How the socket's energy was shared among jobs.
    pub share_method: ShareMethod,
}

/// The job's totals on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// All energy attributed to the job: the sum of the measured components.
    pub energy_j: f64,
    /// GPU energy; `null` if not measured.
    pub gpu_j: Option<f64>,
    /// CPU package energy; `null` if not measured.
    pub cpu_j: Option<f64>,
    /// DRAM energy; `null` if not measured.
    pub dram_j: Option<f64>,
    /// `energy_j` divided by the job's duration.
    pub avg_w: f64,
    /// Highest total power over the trace's intervals.
    pub peak_w: f64,
}

/// The node's energy over the job's interval, so that a job's share can be judged.
///
/// Conservation: the energies of all jobs on the node + `idle_j` + `unattributed_j` =
/// `node_energy_j`, over the sensors listed in [`Manifest::sensors`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeContext {
    /// Total energy the node's sensors measured over the job's interval.
    pub node_energy_j: f64,
    /// Part of it attributed to idle: the idle share of CPU package and DRAM energy on CPUs no
    /// job was allocated (or all idle CPU energy, when a site leaves idle unattributed to jobs).
    /// See docs/attribution.md.
    pub idle_j: f64,
    /// Part of it that no job caused: busy CPU time outside any job's cgroup (OS, daemons),
    /// GPUs (or MIG slices) allocated to no job, and energy a split could not place.
    pub unattributed_j: f64,
}

/// How completely the readings cover the job's interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// Fraction of the interval covered by readings, `0.0..=1.0`. From schema 4 on, the
    /// lowest of [`Coverage::components`]: a component that is missing cannot hide behind
    /// another that is complete.
    pub fraction: f64,
    /// The intervals without readings, or whose figures are estimated.
    pub gaps: Vec<Gap>,
    /// Coverage per component (schema 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<ComponentCoverage>,
    /// Why the job's GPUs on this node are not known, when they are not (schema 4): the job's
    /// GPU energy is then unknown — `totals.gpu_j` is `null` and `components.gpu` is 0 —
    /// never a zero that would look like a CPU-only job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_unknown: Option<String>,
}

/// The fraction of the job's interval each component's figure covers, `0.0..=1.0`; `null` for
/// a component the job does not have on this node (no GPU allocated, no RAPL DRAM domain).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ComponentCoverage {
    /// The job's GPUs.
    pub gpu: Option<f64>,
    /// CPU packages.
    pub cpu: Option<f64>,
    /// DRAM.
    pub dram: Option<f64>,
}

impl ComponentCoverage {
    /// The lowest coverage of the components the job has (1.0 when it has none).
    pub fn lowest(&self) -> f64 {
        [self.gpu, self.cpu, self.dram]
            .into_iter()
            .flatten()
            .fold(1.0, f64::min)
    }
}

/// An interval without readings, or whose figures are estimated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gap {
    /// Start of the gap.
    pub start_unix_ns: u64,
    /// End of the gap.
    pub end_unix_ns: u64,
    /// Why (e.g. `"ergond restarted"`, `"nvml read failed"`).
    pub reason: String,
    /// Whether the gap's energy was recovered from a cumulative counter read after it
    /// (the total is then exact, only the trace has a hole).
    pub recovered: bool,
    /// For a gap whose energy is in the totals but was split by estimate (an event's
    /// counters interpolated across a stretch the sampler did not run, a job that ended while
    /// ergond was down): how much of the job's energy was estimated and how far off it can
    /// be (schema 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<GapEstimate>,
}

impl Gap {
    /// A gap with no estimate.
    pub fn new(
        start_unix_ns: u64,
        end_unix_ns: u64,
        reason: impl Into<String>,
        recovered: bool,
    ) -> Self {
        Self {
            start_unix_ns,
            end_unix_ns,
            reason: reason.into(),
            recovered,
            estimate: None,
        }
    }
}

/// The estimated part of a job's energy in a [`Gap`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GapEstimate {
    /// The job's energy in the estimated part, joules (included in the totals).
    pub energy_j: f64,
    /// The largest error that estimate can have, joules: the true figure is within
    /// `energy_j ± bound_j` (derived from the counters on each side of the gap and the
    /// hardware's power limits, not from a model).
    pub bound_j: f64,
}

/// The attribution model used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributionInfo {
    /// Model name, e.g. `"exclusive-gpu+cgroup-cpu-time"`.
    pub model: String,
    /// Model version, bumped whenever the attribution rules change.
    pub version: u32,
    /// Whether any part of the figures is estimated rather than measured.
    pub estimated: bool,
}

/// A kind of sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SensorKind {
    /// NVIDIA GPUs through NVML.
    Nvml,
    /// RAPL through `perf_event_open` (the `power` PMU).
    RaplPerf,
    /// RAPL through `/sys/class/powercap`.
    RaplPowercap,
    /// CPU time from cgroup accounting (`cpuacct.usage`, `cpu.stat`).
    Cgroup,
}

/// A sensor the numbers come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorInfo {
    /// Which kind.
    pub kind: SensorKind,
    /// Its version: NVIDIA driver / NVML version, kernel release, cgroup version.
    pub version: String,
    /// Free-form detail, e.g. the zones or devices read.
    pub detail: String,
}

/// A downsampled power trace: one sample per `interval_ms` per series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerTrace {
    /// Time between samples.
    pub interval_ms: u32,
    /// Time of each series' first sample.
    pub start_unix_ns: u64,
    /// One series per device.
    pub series: Vec<TraceSeries>,
}

/// The power of one device over time.
///
/// In JSON (schema 2): `{"name": "gpu0", "watts_f32le_b64": "<base64>"}`; in schema 1 the
/// values were `"watts": [<numbers>]`. Both are read; see the
/// [module documentation](self#power-traces-on-the-wire).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSeries {
    /// Device name: `"gpu0"` (Slurm index), `"socket0"`, `"dram0"`.
    pub name: String,
    /// Average power over each interval, watts (attributed to the job). Finite.
    pub watts: Vec<f32>,
}

/// The JSON field of a series' values in schema 2.
const WATTS_B64: &str = "watts_f32le_b64";
/// The JSON field of a series' values in schema 1.
const WATTS_DECIMAL: &str = "watts";

/// `watts` as schema 2 writes them: base64 of the little-endian f32 bytes.
fn encode_watts(watts: &[f32]) -> String {
    let bytes: Vec<u8> = watts.iter().flat_map(|w| w.to_le_bytes()).collect();
    BASE64.encode(bytes)
}

/// The inverse of [`encode_watts`]. Only the canonical encoding is accepted (padding required,
/// no stray bits or characters), and every value must be finite.
fn decode_watts(text: &str) -> Result<Vec<f32>, String> {
    let bytes = BASE64
        .decode(text)
        .map_err(|e| format!("{WATTS_B64} is not valid base64: {e}"))?;
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "{WATTS_B64} holds {} bytes, not a whole number of 4-byte f32 values",
            bytes.len()
        ));
    }
    let watts: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(i) = watts.iter().position(|w| !w.is_finite()) {
        return Err(format!("{WATTS_B64} value {i} is NaN or infinite"));
    }
    Ok(watts)
}

impl Serialize for TraceSeries {
    /// The schema 2 form.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("TraceSeries", 2)?;
        s.serialize_field("name", &self.name)?;
        s.serialize_field(WATTS_B64, &encode_watts(&self.watts))?;
        s.end()
    }
}

impl<'de> Deserialize<'de> for TraceSeries {
    /// Either form: `name` and exactly one of `watts_f32le_b64` (schema 2) or `watts`
    /// (schema 1). Other fields are ignored, as everywhere in the manifest.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// `watts_f32le_b64`'s value, decoded straight from the (usually borrowed) text.
        struct B64Watts(Vec<f32>);
        impl<'de> Deserialize<'de> for B64Watts {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = B64Watts;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a base64 string of little-endian f32 values")
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<B64Watts, E> {
                        decode_watts(v).map(B64Watts).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }

        struct SeriesVisitor;
        impl<'de> Visitor<'de> for SeriesVisitor {
            type Value = TraceSeries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a trace series: name and watts_f32le_b64 (or watts)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TraceSeries, A::Error> {
                let mut name: Option<String> = None;
                let mut watts: Option<Vec<f32>> = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "name" => {
                            if name.is_some() {
                                return Err(de::Error::duplicate_field("name"));
                            }
                            name = Some(map.next_value()?);
                        }
                        WATTS_B64 | WATTS_DECIMAL => {
                            if watts.is_some() {
                                return Err(de::Error::custom(format!(
                                    "a trace series has more than one of {WATTS_B64} and {WATTS_DECIMAL}"
                                )));
                            }
                            watts = Some(if key.as_ref() == WATTS_B64 {
                                map.next_value::<B64Watts>()?.0
                            } else {
                                map.next_value::<Vec<f32>>()?
                            });
                        }
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(TraceSeries {
                    name: name.ok_or_else(|| de::Error::missing_field("name"))?,
                    watts: watts.ok_or_else(|| de::Error::missing_field(WATTS_B64))?,
                })
            }
        }

        deserializer.deserialize_struct(
            "TraceSeries",
            &["name", WATTS_B64, WATTS_DECIMAL],
            SeriesVisitor,
        )
    }
}

/// A power trace serialised in schema 1's form (`watts` as decimal arrays).
struct PowerTraceV1<'a>(&'a PowerTrace);

impl Serialize for PowerTraceV1<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct SeriesV1<'a>(&'a TraceSeries);
        impl Serialize for SeriesV1<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut s = serializer.serialize_struct("TraceSeries", 2)?;
                s.serialize_field("name", &self.0.name)?;
                s.serialize_field(WATTS_DECIMAL, &self.0.watts)?;
                s.end()
            }
        }
        let t = self.0;
        let mut s = serializer.serialize_struct("PowerTrace", 3)?;
        s.serialize_field("interval_ms", &t.interval_ms)?;
        s.serialize_field("start_unix_ns", &t.start_unix_ns)?;
        s.serialize_field("series", &t.series.iter().map(SeriesV1).collect::<Vec<_>>())?;
        s.end()
    }
}

impl Serialize for Manifest {
    /// The fields in struct order (the order the canonical form and the schema use), the power
    /// trace in the form of `schema_version`: decimal arrays for schema 1, base64 otherwise.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Manifest", 18)?;
        s.serialize_field("schema_version", &self.schema_version)?;
        s.serialize_field("cluster", &self.cluster)?;
        s.serialize_field("node", &self.node)?;
        s.serialize_field("job", &self.job)?;
        s.serialize_field("start_unix_ns", &self.start_unix_ns)?;
        s.serialize_field("end_unix_ns", &self.end_unix_ns)?;
        s.serialize_field("duration_s", &self.duration_s)?;
        s.serialize_field("steps", &self.steps)?;
        s.serialize_field("gpus", &self.gpus)?;
        s.serialize_field("sockets", &self.sockets)?;
        s.serialize_field("totals", &self.totals)?;
        s.serialize_field("node_context", &self.node_context)?;
        s.serialize_field("coverage", &self.coverage)?;
        s.serialize_field("attribution", &self.attribution)?;
        s.serialize_field("sensors", &self.sensors)?;
        if self.schema_version == 1 {
            s.serialize_field("trace", &PowerTraceV1(&self.trace))?;
        } else {
            s.serialize_field("trace", &self.trace)?;
        }
        match &self.wall {
            Some(w) => s.serialize_field("wall", w)?,
            None => s.skip_field("wall")?,
        }
        s.serialize_field("content_hash", &self.content_hash)?;
        s.end()
    }
}

/// Only `schema_version`, read before the rest so a newer manifest fails clearly.
#[derive(Deserialize)]
struct SchemaProbe {
    schema_version: u32,
}

impl Manifest {
    /// The hash this manifest's content has: `"sha256:<hex>"` of its canonical JSON with
    /// `content_hash` set to `""`.
    pub fn compute_hash(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.content_hash = String::new();
        unsealed.hash_unsealed()
    }

    /// The hash of this manifest as it is, `content_hash` included (callers make it empty).
    /// The canonical JSON is streamed into the hasher, never held in memory.
    fn hash_unsealed(&self) -> String {
        struct Hasher(Sha256);
        impl std::io::Write for Hasher {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.update(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut hasher = Hasher(Sha256::new());
        serde_json::to_writer(&mut hasher, self).expect("a Manifest always serialises to JSON");
        let digest = hasher.0.finalize();
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256:");
        for byte in digest {
            out.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
            out.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
        }
        out
    }

    /// [`Manifest::verify`] for a manifest the caller owns: the hash is computed with the stored
    /// one taken out, instead of over a copy (manifests with long power traces are large).
    fn verified(mut self) -> Result<Manifest, ManifestError> {
        if self.content_hash.is_empty() {
            return Err(ManifestError::NotSealed);
        }
        let stored = std::mem::take(&mut self.content_hash);
        let computed = self.hash_unsealed();
        self.content_hash = stored;
        if computed != self.content_hash {
            return Err(ManifestError::HashMismatch {
                expected: self.content_hash,
                computed,
            });
        }
        Ok(self)
    }

    /// Set `content_hash` to the hash of the current content. Call it last, after every
    /// other field is final.
    pub fn seal(&mut self) {
        self.content_hash = self.compute_hash();
    }

    /// Check that `content_hash` matches the content.
    pub fn verify(&self) -> Result<(), ManifestError> {
        if self.content_hash.is_empty() {
            return Err(ManifestError::NotSealed);
        }
        let computed = self.compute_hash();
        if computed != self.content_hash {
            return Err(ManifestError::HashMismatch {
                expected: self.content_hash.clone(),
                computed,
            });
        }
        Ok(())
    }

    /// Energy of the job's allocated GPUs that sat idle ([`GpuEfficiency::idle`]) on this
    /// node; `None` when no GPU's utilisation was sampled.
    pub fn idle_gpu_j(&self) -> Option<f64> {
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

    /// The schema version a writer uses for this content: the lowest that has every field
    /// present — [`MANIFEST_SCHEMA_VERSION_EFFICIENCY`] with a GPU's `efficiency` or `wall`,
    /// [`MANIFEST_SCHEMA_VERSION_NODES`] with `job.node_list`,
    /// [`MANIFEST_SCHEMA_VERSION_COVERAGE`] with a schema 4 field,
    /// [`MANIFEST_SCHEMA_VERSION_MIG`] when a GPU entry has `mig`, else
    /// [`MANIFEST_SCHEMA_VERSION`].
    pub fn schema_version_for(&self) -> u32 {
        if self.gpus.iter().any(|g| g.efficiency.is_some()) || self.wall.is_some() {
            MANIFEST_SCHEMA_VERSION_EFFICIENCY
        } else if self.job.node_list.is_some() {
            MANIFEST_SCHEMA_VERSION_NODES
        } else if self.schema4_field().is_some() {
            MANIFEST_SCHEMA_VERSION_COVERAGE
        } else if self.gpus.iter().any(|g| g.mig.is_some()) {
            MANIFEST_SCHEMA_VERSION_MIG
        } else {
            MANIFEST_SCHEMA_VERSION
        }
    }

    /// The first schema 4 field this manifest has, if any.
    fn schema4_field(&self) -> Option<&'static str> {
        if self.job.sluid.is_some() {
            Some("job.sluid")
        } else if self.coverage.components.is_some() {
            Some("coverage.components")
        } else if self.coverage.gpus_unknown.is_some() {
            Some("coverage.gpus_unknown")
        } else if self.coverage.gaps.iter().any(|g| g.estimate.is_some()) {
            Some("coverage.gaps[].estimate")
        } else {
            None
        }
    }

    /// Parse a manifest and verify its hash.
    ///
    /// `schema_version` is checked before the rest, so a manifest from another version gives
    /// [`ManifestError::UnsupportedSchema`] rather than a shape error.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        Self::from_json_unverified(bytes)?.verified()
    }

    /// Parse a manifest without verifying its hash, e.g. to show a damaged one with a
    /// warning. The schema version is still checked.
    pub fn from_json_unverified(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let unsupported = |got| ManifestError::UnsupportedSchema {
            got,
            supported: MANIFEST_SCHEMA_VERSION_MAX,
        };
        let known =
            |v: u32| (MANIFEST_SCHEMA_VERSION_MIN..=MANIFEST_SCHEMA_VERSION_MAX).contains(&v);
        // One parse in the common case; the version alone is read only to explain a failure,
        // so that a manifest of another version is reported as such, not as a shape error.
        match serde_json::from_slice::<Manifest>(bytes) {
            Ok(m)
                if m.schema_version < MANIFEST_SCHEMA_VERSION_MIG
                    && m.gpus.iter().any(|g| g.mig.is_some()) =>
            {
                Err(ManifestError::FieldNeedsVersion {
                    version: m.schema_version,
                    field: "gpus[].mig",
                    needs: MANIFEST_SCHEMA_VERSION_MIG,
                })
            }
            Ok(m)
                if m.schema_version < MANIFEST_SCHEMA_VERSION_COVERAGE
                    && m.schema4_field().is_some() =>
            {
                Err(ManifestError::FieldNeedsVersion {
                    version: m.schema_version,
                    field: m.schema4_field().unwrap_or_default(),
                    needs: MANIFEST_SCHEMA_VERSION_COVERAGE,
                })
            }
            Ok(m)
                if m.schema_version < MANIFEST_SCHEMA_VERSION_NODES
                    && m.job.node_list.is_some() =>
            {
                Err(ManifestError::FieldNeedsVersion {
                    version: m.schema_version,
                    field: "job.node_list",
                    needs: MANIFEST_SCHEMA_VERSION_NODES,
                })
            }
            Ok(m)
                if m.schema_version < MANIFEST_SCHEMA_VERSION_EFFICIENCY
                    && m.gpus.iter().any(|g| g.efficiency.is_some()) =>
            {
                Err(ManifestError::FieldNeedsVersion {
                    version: m.schema_version,
                    field: "gpus[].efficiency",
                    needs: MANIFEST_SCHEMA_VERSION_EFFICIENCY,
                })
            }
            Ok(m) if m.schema_version < MANIFEST_SCHEMA_VERSION_EFFICIENCY && m.wall.is_some() => {
                Err(ManifestError::FieldNeedsVersion {
                    version: m.schema_version,
                    field: "wall",
                    needs: MANIFEST_SCHEMA_VERSION_EFFICIENCY,
                })
            }
            Ok(m) if known(m.schema_version) => Ok(m),
            Ok(m) => Err(unsupported(m.schema_version)),
            Err(e) => match serde_json::from_slice::<SchemaProbe>(bytes) {
                Ok(p) if !known(p.schema_version) => Err(unsupported(p.schema_version)),
                _ => Err(e.into()),
            },
        }
    }

    /// The manifest as pretty-printed JSON with a trailing newline, ready to be written to
    /// the spool.
    ///
    /// Fails with [`ManifestError::NotRepresentable`] if the manifest would not read back
    /// exactly as it is (JSON has no NaN or infinity; serde_json would write `null`), since
    /// then its hash could never be verified.
    pub fn to_json(&self) -> Result<Vec<u8>, ManifestError> {
        let mut out = serde_json::to_vec_pretty(self)?;
        out.push(b'\n');
        let back: Manifest = serde_json::from_slice(&out).map_err(|e| {
            ManifestError::NotRepresentable(format!(
                "it does not read back: {e}; is a value NaN or infinite?"
            ))
        })?;
        if &back != self {
            return Err(ManifestError::NotRepresentable(
                "it does not read back identically; is a value NaN or infinite?".to_owned(),
            ));
        }
        Ok(out)
    }
}
