//! What the sampler publishes and every reader (Prometheus `/metrics`, `ergond check`, later the
//! job registry) consumes: a plain, cloneable picture of the node's energy counters and of the
//! sampler's own health at one instant.
//!
//! Energies are cumulative since ergond started sampling (joules, `f64`), so readers take
//! differences and never see a wrap or a reset: those are handled once, in [`crate::counter`].
//! A quantity the hardware does not provide is `None`, never 0.

use crate::counter::Method;
use crate::sources::rapl::ZoneKey;

/// The node at one instant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeSnapshot {
    /// When the snapshot was assembled (Unix time, ns).
    pub taken_unix_ns: u64,
    /// Every GPU NVML listed, in NVML index order, lost ones included.
    pub gpus: Vec<GpuSnapshot>,
    /// Every RAPL zone, in a stable order.
    pub zones: Vec<ZoneSnapshot>,
    /// One entry per sampling thread.
    pub samplers: Vec<SamplerHealth>,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSnapshot {
    /// NVML index.
    pub index: u32,
    /// NVML UUID (`GPU-…`): the label metrics use, stable across reboots.
    pub uuid: String,
    /// Device minor (`/dev/nvidiaN`), how Slurm's allocation is matched.
    pub minor: Option<u32>,
    /// Product name.
    pub name: String,
    /// Energy since ergond started (J).
    pub energy_j: f64,
    /// Latest instantaneous power (W), if the GPU reports power.
    pub power_w: Option<f64>,
    /// How `energy_j` is obtained.
    pub method: Method,
    /// The GPU fell off the bus (`GPU_IS_LOST`) and is no longer read.
    pub lost: bool,
    /// Counter resets seen (driver reloads).
    pub resets: u64,
    /// Intervals dropped as implausible.
    pub dropped_intervals: u64,
}

/// One RAPL zone.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneSnapshot {
    /// Which socket/die/domain.
    pub key: ZoneKey,
    /// Energy since ergond started (J).
    pub energy_j: f64,
    /// Average power over the latest sampling interval (W).
    pub power_w: Option<f64>,
    /// Counter wraps handled.
    pub wraps: u64,
    /// Intervals dropped as implausible.
    pub dropped_intervals: u64,
}

/// Health of one sampling thread.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerHealth {
    /// `gpu`, `rapl` or `cgroup`.
    pub source: &'static str,
    /// Configured period (ns).
    pub period_ns: u64,
    /// Ticks that ran a read.
    pub samples: u64,
    /// Deadlines skipped because a tick overran.
    pub missed_ticks: u64,
    /// Reads that failed.
    pub read_errors: u64,
    /// Latency of one tick's reads over a recent window (ns).
    pub read_latency_p50_ns: u64,
    /// 99th percentile of the same window (ns).
    pub read_latency_p99_ns: u64,
    /// Largest tick lateness (wake-up after its deadline) in the window (ns).
    pub max_lateness_ns: u64,
}
