//! What the sampler publishes and every reader (Prometheus `/metrics`, `ergond check`, later the
//! job registry) consumes: a plain, cloneable picture of the node's energy counters and of the
//! sampler's own health at one instant.
//!
//! Energies are cumulative since ergond started sampling (joules, `f64`), so readers take
//! differences and never see a wrap or a reset: those are handled once, in [`crate::counter`].
//! A quantity the hardware does not provide is `None`, never 0.
//!
//! Instants named `at_ns` are CLOCK_MONOTONIC nanoseconds ([`crate::clock::monotonic_ns`]): the
//! moment of the reading a figure includes, so that readers can line GPU, RAPL and cgroup
//! figures up on one timeline (attribution needs this; wall-clock time can jump).

use crate::counter::Method;
use crate::sources::rapl::ZoneKey;

/// The node at one instant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeSnapshot {
    /// When the snapshot was assembled (Unix time, ns).
    pub taken_unix_ns: u64,
    /// When the snapshot was assembled (CLOCK_MONOTONIC, ns), on the timeline of the `at_ns`
    /// fields.
    pub taken_monotonic_ns: u64,
    /// Every GPU NVML listed, in NVML index order, lost ones included.
    pub gpus: Vec<GpuSnapshot>,
    /// Every RAPL zone, in a stable order.
    pub zones: Vec<ZoneSnapshot>,
    /// One entry per sampled source (`gpu`, `rapl`, `cgroup`).
    pub samplers: Vec<SamplerHealth>,
    /// Cumulative CPU time of each cgroup registered with `SamplerHandle::watch_cgroup`, in
    /// registration order; read on the same tick as RAPL.
    pub cgroups: Vec<CgroupSnapshot>,
    /// Busy time per socket from `/proc/stat`, read on the same tick as the cgroups.
    pub sockets: Vec<SocketSnapshot>,
    /// The sampler's threads and the CPU time each has used: ergond's own overhead.
    pub threads: Vec<SamplerThread>,
    /// The job attribution's running balance, when the job tracker runs (the service fills it
    /// in; the sampler alone leaves it `None`).
    pub attribution: Option<AttributionSnapshot>,
    /// The plugin socket's counters, when the socket server runs (the service fills it in).
    pub socket_server: Option<SocketServerSnapshot>,
    /// Per-job series of the open jobs, when `[metrics] per_job` is on and the job tracker
    /// runs (the service fills it in).
    pub jobs: Option<JobMetricsSnapshot>,
    /// Per GPU whose statistics are sampled: its latest statistics.
    pub gpu_stats: Vec<GpuStatsSnapshot>,
    /// The node meter read for attribution, if any.
    pub meter: Option<MeterSnapshot>,
}

/// The node meter in use.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterSnapshot {
    /// Which kind of meter.
    pub kind: crate::sources::meter::MeterKind,
    /// Where its values come from.
    pub source: String,
    /// Its resolution, ns.
    pub resolution_ns: u64,
    /// Energy integrated since ergond started, J.
    pub energy_j: f64,
    /// The instant `energy_j` describes (monotonic ns; 0 before any).
    pub at_ns: u64,
    /// The last power read, W, for meters that give a power.
    pub power_w: Option<f64>,
    /// Reads attempted.
    pub reads: u64,
    /// Reads that failed.
    pub read_errors: u64,
    /// Readings rejected as implausible.
    pub rejected: u64,
    /// Gaps between power reads too long to integrate across.
    pub holes: u64,
}

/// The open jobs' running figures for `/metrics`, bounded.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobMetricsSnapshot {
    /// The jobs exported: at most the configured bound, the longest-running first, then sorted
    /// by job id.
    pub jobs: Vec<JobSeries>,
    /// Open jobs not exported because of the bound.
    pub left_out: usize,
    /// The bound (`[metrics] per_job_max_jobs`).
    pub max_jobs: usize,
}

/// One open job's running figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobSeries {
    /// Slurm job id.
    pub job_id: u32,
    /// Owner's user name, when the `user` label is configured and known.
    pub user: Option<String>,
    /// Slurm account, when the `account` label is configured and known.
    pub account: Option<String>,
    /// Energy attributed to the job so far (J), by component: GPU, CPU package, DRAM; `None`
    /// where the component is not measured for the job (absent on `/metrics`, never 0).
    pub gpu_j: Option<f64>,
    /// See [`JobSeries::gpu_j`].
    pub cpu_j: Option<f64>,
    /// See [`JobSeries::gpu_j`].
    pub dram_j: Option<f64>,
    /// Average power attributed to the job over the last attribution interval (W); `None`
    /// before its first interval.
    pub power_w: Option<f64>,
    /// Average SM utilisation of its GPUs so far, 0–1; `None` where not sampled.
    pub gpu_util: Option<f64>,
}

/// One GPU's latest activity and health statistics (`ergond-gpustat`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuStatsSnapshot {
    /// NVML UUID.
    pub uuid: String,
    /// The latest sample (each value `None` where not reported).
    pub sample: crate::sources::nvml::GpuStatsSample,
    /// Xid events since ergond started; `None` where not reported.
    pub xid_total: Option<u64>,
}

/// The plugin socket server's counters since ergond started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SocketServerSnapshot {
    /// Connections accepted.
    pub accepted: u64,
    /// Idle connections closed to make room for new ones.
    pub evicted: u64,
    /// Connections refused (per-uid limit, or every slot busy with a request).
    pub refused: u64,
    /// Frames that could not be decoded.
    pub malformed: u64,
    /// Connections closed for staying silent past their deadline.
    pub timed_out: u64,
}

/// The attribution's running figures since ergond started.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AttributionSnapshot {
    /// Jobs running now (started, not ended).
    pub open_jobs: usize,
    /// Jobs that have ended and whose manifest is not written yet (the spool is behind, or
    /// does not take it: retried).
    pub manifests_pending: usize,
    /// Failed attempts to write a manifest into the spool.
    pub spool_failures: u64,
    /// Events the plugin queued that ergond replayed.
    pub replayed_events: u64,
    /// Intervals attributed.
    pub intervals: u64,
    /// Intervals the model refused (nothing attributed).
    pub failed_intervals: u64,
    /// Intervals that failed the independent conservation check.
    pub conservation_failures: u64,
    /// Event readings older than the last closed interval.
    pub late_readings: u64,
    /// Σ over intervals of (measured − jobs − idle − unattributed), J: 0 up to rounding.
    pub conservation_error_j: f64,
    /// Per component (`gpu`, `cpu`, `dram`): measured, jobs, idle, unattributed (J).
    pub components: Vec<(&'static str, [f64; 4])>,
    /// The node's energy at the wall, when a node meter is read.
    pub wall: Option<crate::attribution::WallBalance>,
}

/// One watched cgroup.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupSnapshot {
    /// The path as registered (relative to the hierarchy, e.g. `slurm/uid_1000/job_42`).
    pub path: String,
    /// Cumulative CPU time of the cgroup (all tasks, all CPUs), ns, as of `at_ns`.
    pub cpu_ns: u64,
    /// When `cpu_ns` was read (monotonic ns).
    pub at_ns: u64,
    /// Reads that failed (the cgroup was removed, ...); `cpu_ns` keeps the last good value.
    pub read_errors: u64,
}

/// CPU time of one socket (from `/proc/stat`).
#[derive(Debug, Clone, PartialEq)]
pub struct SocketSnapshot {
    /// Socket (physical package) id.
    pub socket: u32,
    /// Non-idle time summed over the socket's CPUs since boot, ns.
    pub busy_ns: u64,
    /// All time summed over the socket's CPUs since boot, ns.
    pub total_ns: u64,
    /// When it was read (monotonic ns).
    pub at_ns: u64,
}

/// One sampler thread.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerThread {
    /// Thread name (`ergond-gpu`, `ergond-cpu`).
    pub name: &'static str,
    /// The sources it reads (the `source` of [`SamplerHealth`] entries).
    pub sources: &'static [&'static str],
    /// CPU time the thread has used since it started (user + system, ns), from its
    /// `pthread_getcpuclockid` clock; `None` if it could not be read (thread gone).
    pub cpu_ns: Option<u64>,
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
    /// Whether the GPU reports an energy counter or power at all. When false, `energy_j` and
    /// `power_w` mean nothing (energy unknown, not 0) and must not be exported.
    pub measurable: bool,
    /// Reads of this GPU that failed.
    pub read_errors: u64,
    /// The instant `energy_j` describes (monotonic ns; 0 before the first reading): for an
    /// energy counter, the driver's update that produced the value (estimated from the reads,
    /// see [`crate::update_clock`]), not the read; for integrated power, the read.
    pub at_ns: u64,
    /// The hardware counter itself at `at_ns` (J since the driver loaded), when the GPU has
    /// one: what restart recovery compares across an outage.
    pub raw_j: Option<f64>,
    /// For a GPU several jobs hold: when it was read (monotonic ns) and each process's SM
    /// utilisation (pid, %); `None` when not read (not shared, or not reported by the driver).
    pub processes: Option<(u64, Vec<(u32, u32)>)>,
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
    /// When the latest reading was taken (monotonic ns; 0 before the first).
    pub at_ns: u64,
    /// The hardware counter itself at `at_ns` (J, modulo `range_j`).
    pub raw_j: Option<f64>,
    /// The counter's range (J) when it wraps; `None` when it does not (perf).
    pub range_j: Option<f64>,
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
    /// Median tick lateness over the same window (ns).
    pub lateness_p50_ns: u64,
    /// 99th percentile of tick lateness over the same window (ns).
    pub lateness_p99_ns: u64,
    /// Sum of every tick's read latency since start (ns): with `samples`, a summary's sum.
    pub read_latency_sum_ns: u64,
    /// Sum of every tick's lateness since start (ns).
    pub lateness_sum_ns: u64,
}
