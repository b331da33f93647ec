//! The sampler: dedicated threads that read every energy counter and CPU-time counter of the
//! node at a fixed rate and publish a [`NodeSnapshot`] that readers take cheaply.
//!
//! # Threads
//! * `ergond-gpu` reads every GPU (energy counter and power, one driver call per GPU where
//!   possible) every `gpu_period`.
//! * `ergond-cpu` reads every RAPL zone every `rapl_period` and, on every n-th of those ticks
//!   (n = `cgroup_period / rapl_period`, rounded), the CPU time of each watched cgroup and the
//!   per-socket busy time of `/proc/stat`: CPU time is read on the same tick as RAPL, so the
//!   energy of an interval and how busy each job was in it describe the same instants.
//!
//! GPUs get a thread of their own because a driver call can take milliseconds on a busy GPU and
//! must not delay RAPL's 1 kHz profiling ticks.
//!
//! # Timing
//! Each thread ticks at absolute CLOCK_MONOTONIC deadlines `start + k × period`
//! (`clock_nanosleep(TIMER_ABSTIME)`, timer slack 1 ns, as `ergond probe` does), so lateness never
//! accumulates. A tick that overruns its period does not burst to catch up: the deadlines already
//! past are skipped and counted ([`SamplerHealth::missed_ticks`]). Sleeps longer than 100 ms are cut
//! in pieces so that [`SamplerHandle::stop`] is noticed within 100 ms whatever the period.
//!
//! # Memory
//! Everything the threads keep is sized at start (or when a cgroup is registered) and never
//! grows with uptime: the last [`SamplerOptions::trace_capacity`] samples per GPU and per zone
//! (ring buffers, for downsampled power traces), and the last [`SamplerOptions::latency_window`]
//! read latencies and tick latenesses per source (for p50/p99). The buffers are written in full
//! at start, so their pages are resident from the first tick and RSS stays flat. A tick
//! allocates nothing (the GPU read uses [`GpuSource::read`], whose field-values call decodes into
//! a stack array).
//!
//! # Publication
//! Each thread owns a part of the snapshot behind its own mutex and updates it in place once
//! per tick (numbers only: no allocation, a lock held for well under a microsecond).
//! [`SamplerHandle::snapshot`] locks each part in turn and clones it; the reader pays for the
//! copy and the percentile computation, never the sampling threads.

use crate::clock::monotonic_ns;
use crate::config::{Config, SamplingConfig};
use crate::counter::{EnergyCounter, EnergyTotals, Method, RawReading, Step, Support};
use crate::snapshot::{
    CgroupSnapshot, GpuSnapshot, NodeSnapshot, SamplerHealth, SamplerThread, SocketSnapshot,
    ZoneSnapshot,
};
use crate::sources::cgroup::{detect_version, CgroupCpu, CgroupError, SocketBusy, SocketTimes};
use crate::sources::nvml::{sampling_period, GpuEnergyMeter, GpuReading, GpuSource};
use crate::sources::rapl::RaplSource;
use crate::sources::topology::CpuTopology;
use crate::stats::percentile;
use crate::update_clock::{Observed, UpdateClock};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Default number of samples kept per GPU and per RAPL zone.
pub const DEFAULT_TRACE_CAPACITY: usize = 4096;
/// Default number of ticks over which read latency and lateness percentiles are computed.
pub const DEFAULT_LATENCY_WINDOW: usize = 1024;
/// RAPL period in profiling mode (RAPL updates about every millisecond).
pub const PROFILING_RAPL_PERIOD: Duration = Duration::from_millis(1);
/// How long [`Sampler::start`] spends detecting the GPU counters' update period.
pub const DETECT_BUDGET: Duration = Duration::from_secs(1);

/// Longest uninterrupted sleep: how soon a stop request is noticed.
const STOP_CHECK_NS: u64 = 100_000_000;
/// Fill value of unwritten ring-buffer slots (non-zero, so that filling touches every page).
const UNSET: u64 = u64::MAX;

/// Rates, limits and buffer sizes of one sampler.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerOptions {
    /// GPU sampling period.
    pub gpu_period: Duration,
    /// The GPU energy counter's update period (detected, or assumed): how stale a reading may
    /// be, which widens the plausibility bound on short intervals.
    pub gpu_counter_period: Duration,
    /// RAPL sampling period (also the CPU thread's tick).
    pub rapl_period: Duration,
    /// cgroup and socket CPU-time period; rounded to a whole number of RAPL periods (at least
    /// one) when RAPL is sampled.
    pub cgroup_period: Duration,
    /// Plausibility limit per GPU (W).
    pub gpu_max_power_w: f64,
    /// Plausibility limit per RAPL zone (W).
    pub cpu_max_power_w: f64,
    /// Samples kept per GPU and per zone.
    pub trace_capacity: usize,
    /// Ticks per source over which latency and lateness percentiles are computed.
    pub latency_window: usize,
}

impl SamplerOptions {
    /// Default rates: GPUs at half the detected counter update period clamped to
    /// `[gpu_min_period_ms, gpu_max_period_ms]` (`gpu_default_period_ms` when nothing was
    /// detected), exactly as `ergond check` reports it; RAPL and cgroups at their configured
    /// periods.
    pub fn from_config(s: &SamplingConfig, detected_counter_period: Option<Duration>) -> Self {
        let ms = Duration::from_millis;
        Self {
            gpu_period: sampling_period(
                detected_counter_period,
                ms(s.gpu_min_period_ms),
                ms(s.gpu_max_period_ms),
                ms(s.gpu_default_period_ms),
            ),
            gpu_counter_period: detected_counter_period.unwrap_or(ms(s.gpu_default_period_ms)),
            rapl_period: ms(s.rapl_period_ms),
            cgroup_period: ms(s.cgroup_period_ms),
            gpu_max_power_w: s.gpu_max_power_w,
            cpu_max_power_w: s.cpu_max_power_w,
            trace_capacity: DEFAULT_TRACE_CAPACITY,
            latency_window: DEFAULT_LATENCY_WINDOW,
        }
    }

    /// Profiling mode: GPUs at `gpu_min_period_ms` (10 ms = 100 Hz by default) and RAPL at
    /// 1 kHz; cgroups and sockets keep `cgroup_period_ms` (still read on a RAPL tick). Reading
    /// 64 job cgroups costs several times a RAPL read, and job CPU shares change slowly, so a
    /// faster cgroup rate buys little for its cost.
    pub fn profiling(s: &SamplingConfig, detected_counter_period: Option<Duration>) -> Self {
        Self {
            gpu_period: Duration::from_millis(s.gpu_min_period_ms),
            rapl_period: PROFILING_RAPL_PERIOD,
            ..Self::from_config(s, detected_counter_period)
        }
    }

    fn validate(&self) -> Result<(), SamplerError> {
        let invalid = |option, reason: &str| {
            Err(SamplerError::Invalid {
                option,
                reason: reason.to_string(),
            })
        };
        for (option, p) in [
            ("gpu_period", self.gpu_period),
            ("rapl_period", self.rapl_period),
            ("cgroup_period", self.cgroup_period),
        ] {
            if p.is_zero() {
                return invalid(option, "must be longer than 0");
            }
        }
        if self.trace_capacity == 0 {
            return invalid("trace_capacity", "must be at least 1");
        }
        if self.latency_window == 0 {
            return invalid("latency_window", "must be at least 1");
        }
        Ok(())
    }
}

/// Error starting or driving the sampler.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// An option is out of range.
    #[error("invalid sampler option `{option}`: {reason}")]
    Invalid {
        /// The [`SamplerOptions`] field.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A sampling thread could not be created.
    #[error("cannot start the sampling thread {name}: {source}")]
    Spawn {
        /// Thread name.
        name: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A cgroup was registered but no cgroup hierarchy is sampled.
    #[error(
        "cannot watch cgroup {path}: no cgroup hierarchy is being sampled (`cgroup_root` in \
         ergond.toml names no usable cgroup v1 or v2 hierarchy; see the start-up log)"
    )]
    NoCgroupHierarchy {
        /// The cgroup that was to be watched.
        path: String,
    },
    /// The cgroup's CPU usage file could not be opened or read.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

pub use crate::sources::cgroup::CgroupHierarchy;

/// The opened sources handed to the sampler; any may be absent.
#[derive(Debug, Default)]
pub struct SamplerSources {
    /// GPUs through NVML.
    pub gpu: Option<GpuSource>,
    /// RAPL zones (perf or powercap).
    pub rapl: Option<RaplSource>,
    /// cgroup hierarchy for [`SamplerHandle::watch_cgroup`].
    pub cgroups: Option<CgroupHierarchy>,
    /// Per-socket busy time from `/proc/stat`.
    pub sockets: Option<SocketBusy>,
}

/// A source that could not be opened by [`SamplerSources::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceProblem {
    /// `nvml`, `rapl`, `cgroup` or `sockets`.
    pub source: &'static str,
    /// The error, naming the file or library and the fix.
    pub error: String,
}

impl SamplerSources {
    /// Open every source `config` points at. A source that cannot be opened is left out and
    /// reported (and logged); the others are still returned.
    pub fn open(config: &Config) -> (Self, Vec<SourceProblem>) {
        let mut problems = Vec::new();
        let mut problem = |source: &'static str, error: String| {
            tracing::warn!(source, %error, "source unavailable; sampling without it");
            problems.push(SourceProblem { source, error });
        };
        let gpu = match GpuSource::open(config.nvml_library.as_deref()) {
            Ok(g) => Some(g),
            Err(e) => {
                problem("nvml", e.to_string());
                None
            }
        };
        let rapl = match RaplSource::open(&config.rapl_options()) {
            Ok(r) => Some(r),
            Err(e) => {
                problem("rapl", e.to_string());
                None
            }
        };
        let cgroups = match detect_version(&config.cgroup_root) {
            Ok(version) => Some(CgroupHierarchy {
                root: config.cgroup_root.clone(),
                version,
            }),
            Err(e) => {
                problem("cgroup", e.to_string());
                None
            }
        };
        let sockets = match CpuTopology::discover(&config.sysfs_root)
            .map_err(|e| e.to_string())
            .and_then(|t| SocketBusy::open(&config.proc_root, t).map_err(|e| e.to_string()))
        {
            Ok(s) => Some(s),
            Err(e) => {
                problem("sockets", e);
                None
            }
        };
        (
            Self {
                gpu,
                rapl,
                cgroups,
                sockets,
            },
            problems,
        )
    }
}

/// Find how often the GPUs' energy counters (or, for GPUs without one, their power readings)
/// change: poll every measurable GPU every 200 µs until each has changed 4 times or `budget`
/// is spent, and take the median interval between two changes over all GPUs
/// ([`crate::sources::nvml::update_period_from_intervals`]). `None` when no GPU changed twice
/// (constant power without a counter, or a budget too short).
pub fn detect_gpu_counter_period(src: &mut GpuSource, budget: Duration) -> Option<Duration> {
    const CHANGES: usize = 4;
    let measurable: Vec<usize> = (0..src.len())
        .filter(|&i| !src.info(i).lost && src.info(i).method.supported().is_some())
        .collect();
    let mut last: Vec<Option<u64>> = vec![None; src.len()];
    let mut changes: Vec<Vec<u64>> = vec![Vec::new(); src.len()];
    let deadline = monotonic_ns() + budget.as_nanos() as u64;
    while monotonic_ns() < deadline && measurable.iter().any(|&i| changes[i].len() < CHANGES) {
        for &i in &measurable {
            if changes[i].len() >= CHANGES {
                continue;
            }
            let Ok(r) = src.read(i) else { continue };
            let v = r.energy_mj.or(r.power_mw.map(u64::from));
            if v.is_some() && last[i].is_some() && v != last[i] {
                changes[i].push(r.at_ns);
            }
            last[i] = v;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    crate::sources::nvml::update_period_from_intervals(
        changes
            .iter()
            .flat_map(|c| c.windows(2).map(|w| w[1] - w[0])),
    )
}

/// One sample of a GPU's or zone's trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSample {
    /// When it was read (monotonic ns).
    pub at_ns: u64,
    /// Cumulative energy at that instant (J), as in the snapshot: differences of two samples
    /// give the exact energy between them, whatever downsampling is applied.
    pub energy_j: f64,
    /// Power (W): the GPU's instantaneous reading, or the zone's average over the interval
    /// ending here; `None` when not available.
    pub power_w: Option<f32>,
}

const UNSET_SAMPLE: TraceSample = TraceSample {
    at_ns: UNSET,
    energy_j: f64::NAN,
    power_w: None,
};

/// Which trace to read with [`SamplerHandle::trace`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceOf {
    /// GPU by position in [`NodeSnapshot::gpus`].
    Gpu(usize),
    /// RAPL zone by position in [`NodeSnapshot::zones`].
    Zone(usize),
}

/// How often the per-process utilisation of shared GPUs is read.
pub const PROCESS_UTIL_PERIOD_NS: u64 = 1_000_000_000;

/// Fixed-capacity ring buffer: the newest `capacity` values, oldest overwritten.
#[derive(Debug, Clone)]
struct Ring<T> {
    buf: Vec<T>,
    len: usize,
    next: usize,
}

impl<T: Copy> Ring<T> {
    /// Every slot is written now (with `fill`), so the memory is resident from the start.
    fn new(capacity: usize, fill: T) -> Self {
        Self {
            buf: vec![fill; capacity.max(1)],
            len: 0,
            next: 0,
        }
    }

    fn push(&mut self, v: T) {
        self.buf[self.next] = v;
        self.next = (self.next + 1) % self.buf.len();
        self.len = (self.len + 1).min(self.buf.len());
    }

    /// Oldest first, into `out` (cleared first).
    fn copy_into(&self, out: &mut Vec<T>) {
        out.clear();
        let cap = self.buf.len();
        let start = (self.next + cap - self.len) % cap;
        out.extend((0..self.len).map(|i| self.buf[(start + i) % cap]));
    }
}

/// Self-metrics of one source, updated by its thread.
#[derive(Debug)]
struct Health {
    source: &'static str,
    period_ns: u64,
    samples: u64,
    missed_ticks: u64,
    read_errors: u64,
    latency_ns: Ring<u64>,
    lateness_ns: Ring<u64>,
    latency_sum_ns: u64,
    lateness_sum_ns: u64,
    /// The previous tick's instant (0 before the first).
    last_tick_ns: u64,
    /// Stretches longer than [`hole_ns`] between two ticks: (previous tick, this tick).
    holes: Ring<(u64, u64)>,
}

/// Most sampling holes remembered per source.
pub const HOLES_KEPT: usize = 64;

/// The longest time between two ticks of a source sampling every `period_ns` that is not a
/// hole: three periods, and at least 250 ms (a loaded machine's scheduling delays are not
/// holes; ergond stopped, hung, starved or a read blocking for seconds is).
pub fn hole_ns(period_ns: u64) -> u64 {
    period_ns.saturating_mul(3).max(250_000_000)
}

impl Health {
    fn new(source: &'static str, period_ns: u64, window: usize) -> Self {
        Self {
            source,
            period_ns,
            samples: 0,
            missed_ticks: 0,
            read_errors: 0,
            latency_ns: Ring::new(window, UNSET),
            lateness_ns: Ring::new(window, UNSET),
            latency_sum_ns: 0,
            lateness_sum_ns: 0,
            last_tick_ns: 0,
            holes: Ring::new(HOLES_KEPT, (0, 0)),
        }
    }

    /// Note a tick at `at_ns`: a stretch since the previous one longer than [`hole_ns`] is a
    /// hole in the sampling.
    fn tick(&mut self, at_ns: u64) {
        if self.last_tick_ns > 0
            && at_ns.saturating_sub(self.last_tick_ns) > hole_ns(self.period_ns)
        {
            self.holes.push((self.last_tick_ns, at_ns));
        }
        self.last_tick_ns = at_ns;
    }

    fn record(&mut self, latency_ns: u64, lateness_ns: u64, errors: u64) {
        self.samples += 1;
        self.read_errors += errors;
        self.latency_ns.push(latency_ns);
        self.lateness_ns.push(lateness_ns);
        self.latency_sum_ns = self.latency_sum_ns.saturating_add(latency_ns);
        self.lateness_sum_ns = self.lateness_sum_ns.saturating_add(lateness_ns);
    }

    /// Copy out under the lock; percentiles are computed after it is released.
    fn copy(&self) -> (SamplerHealth, Vec<u64>, Vec<u64>) {
        let mut latency = Vec::new();
        let mut lateness = Vec::new();
        self.latency_ns.copy_into(&mut latency);
        self.lateness_ns.copy_into(&mut lateness);
        let h = SamplerHealth {
            source: self.source,
            period_ns: self.period_ns,
            samples: self.samples,
            missed_ticks: self.missed_ticks,
            read_errors: self.read_errors,
            read_latency_p50_ns: 0,
            read_latency_p99_ns: 0,
            max_lateness_ns: 0,
            lateness_p50_ns: 0,
            lateness_p99_ns: 0,
            read_latency_sum_ns: self.latency_sum_ns,
            lateness_sum_ns: self.lateness_sum_ns,
        };
        (h, latency, lateness)
    }
}

fn finish_health(
    (mut h, mut latency, mut lateness): (SamplerHealth, Vec<u64>, Vec<u64>),
) -> SamplerHealth {
    latency.sort_unstable();
    lateness.sort_unstable();
    h.read_latency_p50_ns = percentile(&latency, 50.0);
    h.read_latency_p99_ns = percentile(&latency, 99.0);
    h.lateness_p50_ns = percentile(&lateness, 50.0);
    h.lateness_p99_ns = percentile(&lateness, 99.0);
    h.max_lateness_ns = lateness.last().copied().unwrap_or(0);
    h
}

/// The GPU thread's part of the snapshot.
#[derive(Debug)]
struct GpuPart {
    gpus: Vec<GpuSnapshot>,
    traces: Vec<Ring<TraceSample>>,
    health: Health,
}

/// The CPU thread's part of the snapshot.
#[derive(Debug)]
struct CpuPart {
    zones: Vec<ZoneSnapshot>,
    traces: Vec<Ring<TraceSample>>,
    sockets: Vec<SocketSnapshot>,
    rapl: Option<Health>,
    cgroup: Option<Health>,
}

/// One watched cgroup.
#[derive(Debug)]
struct Watched {
    path: String,
    file: CgroupCpu,
    cpu_ns: u64,
    at_ns: u64,
    read_errors: u64,
    /// Read successfully on the current tick (its `at_ns` is set once the batch is done).
    fresh: bool,
}

/// State shared between the handle and the threads.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    /// Per GPU: whether several jobs hold it, so its per-process utilisation is wanted (read
    /// about once a second by the GPU thread, only for these GPUs).
    gpu_shared: Vec<AtomicBool>,
    gpu: Option<Mutex<GpuPart>>,
    cpu: Option<Mutex<CpuPart>>,
    cgroups: Mutex<Vec<Watched>>,
}

/// Lock, ignoring poisoning: the data is plain numbers, valid whatever a panicking holder did.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the sampler (see the module docs).
#[derive(Debug)]
pub struct Sampler;

impl Sampler {
    /// Detect the GPU counters' update period (up to [`DETECT_BUDGET`]), derive the default rates
    /// from `config.sampling` ([`SamplerOptions::from_config`]) and start sampling `sources`.
    pub fn start(
        config: &Config,
        mut sources: SamplerSources,
    ) -> Result<SamplerHandle, SamplerError> {
        let detected = match sources.gpu.as_mut() {
            Some(g) if !g.is_empty() => detect_gpu_counter_period(g, DETECT_BUDGET),
            _ => None,
        };
        match detected {
            Some(p) => tracing::info!(
                period_ms = p.as_secs_f64() * 1e3,
                "GPU counter update period detected"
            ),
            None if sources.gpu.as_ref().is_some_and(|g| !g.is_empty()) => tracing::info!(
                default_ms = config.sampling.gpu_default_period_ms,
                "GPU counter update period not detected; using sampling.gpu_default_period_ms"
            ),
            None => {}
        }
        Self::start_with(
            SamplerOptions::from_config(&config.sampling, detected),
            sources,
        )
    }

    /// Start sampling `sources` with explicit options (tests, benchmarks, profiling mode).
    pub fn start_with(
        options: SamplerOptions,
        sources: SamplerSources,
    ) -> Result<SamplerHandle, SamplerError> {
        options.validate()?;
        let SamplerSources {
            gpu,
            rapl,
            cgroups,
            sockets,
        } = sources;
        let gpu = gpu.filter(|g| !g.is_empty());
        let window = options.latency_window;
        let cap = options.trace_capacity;

        let gpu_part = gpu.as_ref().map(|src| {
            let gpus = (0..src.len())
                .map(|i| {
                    let info = src.info(i);
                    let method = info.method.supported().copied();
                    GpuSnapshot {
                        index: info.id.index,
                        uuid: info.id.uuid.clone(),
                        minor: info.id.minor,
                        name: info.id.name.clone().unwrap_or_default(),
                        energy_j: 0.0,
                        power_w: None,
                        method: method.unwrap_or(Method::IntegratedPower),
                        lost: info.lost,
                        resets: 0,
                        dropped_intervals: 0,
                        measurable: method.is_some(),
                        read_errors: 0,
                        at_ns: 0,
                        raw_j: None,
                        processes: None,
                    }
                })
                .collect();
            Mutex::new(GpuPart {
                gpus,
                traces: (0..src.len())
                    .map(|_| Ring::new(cap, UNSET_SAMPLE))
                    .collect(),
                health: Health::new("gpu", options.gpu_period.as_nanos() as u64, window),
            })
        });

        let cpu_thread = rapl.is_some() || cgroups.is_some() || sockets.is_some();
        let (base_period, cgroup_every) = cpu_tick(&options, rapl.is_some());
        let cpu_part = cpu_thread.then(|| {
            let zones = rapl
                .as_ref()
                .map(|r| {
                    r.zones()
                        .iter()
                        .map(|z| ZoneSnapshot {
                            key: z.key.clone(),
                            energy_j: 0.0,
                            power_w: None,
                            wraps: 0,
                            dropped_intervals: 0,
                            at_ns: 0,
                            raw_j: None,
                            range_j: None,
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            let sockets_snap = sockets
                .as_ref()
                .map(|s| {
                    s.sockets()
                        .iter()
                        .map(|&socket| SocketSnapshot {
                            socket,
                            busy_ns: 0,
                            total_ns: 0,
                            at_ns: 0,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let has_cpu_time = cgroups.is_some() || sockets.is_some();
            Mutex::new(CpuPart {
                traces: zones.iter().map(|_| Ring::new(cap, UNSET_SAMPLE)).collect(),
                zones,
                sockets: sockets_snap,
                rapl: rapl
                    .is_some()
                    .then(|| Health::new("rapl", base_period, window)),
                cgroup: has_cpu_time
                    .then(|| Health::new("cgroup", base_period * cgroup_every, window)),
            })
        });

        let gpu_count = gpu_part.as_ref().map_or(0, |p| lock(p).gpus.len());
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            gpu_shared: (0..gpu_count).map(|_| AtomicBool::new(false)).collect(),
            gpu: gpu_part,
            cpu: cpu_part,
            cgroups: Mutex::new(Vec::new()),
        });
        let mut handle = SamplerHandle {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            cgroups,
            options: options.clone(),
        };
        if let Some(src) = gpu {
            let shared = Arc::clone(&shared);
            let opts = options.clone();
            handle.spawn("ergond-gpu", &["gpu"], move |cpu| {
                gpu_thread(src, &opts, &shared);
                cpu.store(crate::clock::thread_cpu_ns(), Ordering::Relaxed);
            })?;
        }
        if cpu_thread {
            let shared = Arc::clone(&shared);
            let opts = options.clone();
            handle.spawn("ergond-cpu", &["rapl", "cgroup"], move |cpu| {
                cpu_thread_main(rapl, sockets, &opts, base_period, cgroup_every, &shared);
                cpu.store(crate::clock::thread_cpu_ns(), Ordering::Relaxed);
            })?;
        }
        Ok(handle)
    }
}

/// The CPU thread's tick (ns) and every how many ticks cgroups are read.
fn cpu_tick(options: &SamplerOptions, rapl: bool) -> (u64, u64) {
    let cgroup = options.cgroup_period.as_nanos() as u64;
    if rapl {
        let base = options.rapl_period.as_nanos() as u64;
        let every = ((cgroup as f64 / base as f64).round() as u64).max(1);
        (base, every)
    } else {
        (cgroup, 1)
    }
}

/// A running thread.
#[derive(Debug)]
struct ThreadEntry {
    name: &'static str,
    sources: &'static [&'static str],
    handle: Option<JoinHandle<()>>,
    /// CPU time recorded by the thread as it exits (`UNSET` before).
    final_cpu_ns: Arc<AtomicU64>,
}

/// The running sampler. Dropping it stops the threads (as [`Self::stop`] does).
#[derive(Debug)]
pub struct SamplerHandle {
    shared: Arc<Shared>,
    threads: Vec<ThreadEntry>,
    cgroups: Option<CgroupHierarchy>,
    options: SamplerOptions,
}

impl SamplerHandle {
    fn spawn(
        &mut self,
        name: &'static str,
        sources: &'static [&'static str],
        body: impl FnOnce(&AtomicU64) + Send + 'static,
    ) -> Result<(), SamplerError> {
        let final_cpu_ns = Arc::new(AtomicU64::new(UNSET));
        let cpu = Arc::clone(&final_cpu_ns);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                crate::clock::fine_timer_slack();
                body(&cpu);
            })
            .map_err(|source| SamplerError::Spawn { name, source })?;
        self.threads.push(ThreadEntry {
            name,
            sources,
            handle: Some(handle),
            final_cpu_ns,
        });
        Ok(())
    }

    /// The options in force.
    pub fn options(&self) -> &SamplerOptions {
        &self.options
    }

    /// The node as of the latest ticks. Costs the reader a copy (and the percentile
    /// computation); the sampling threads wait at most for that copy.
    pub fn snapshot(&self) -> NodeSnapshot {
        let mut s = NodeSnapshot {
            taken_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            taken_monotonic_ns: monotonic_ns(),
            ..Default::default()
        };
        let mut healths = Vec::with_capacity(3);
        if let Some(part) = &self.shared.gpu {
            let g = lock(part);
            s.gpus = g.gpus.clone();
            healths.push(g.health.copy());
        }
        if let Some(part) = &self.shared.cpu {
            let c = lock(part);
            s.zones = c.zones.clone();
            s.sockets = c.sockets.clone();
            healths.extend(c.rapl.as_ref().map(Health::copy));
            healths.extend(c.cgroup.as_ref().map(Health::copy));
        }
        s.cgroups = lock(&self.shared.cgroups)
            .iter()
            .map(|w| CgroupSnapshot {
                path: w.path.clone(),
                cpu_ns: w.cpu_ns,
                at_ns: w.at_ns,
                read_errors: w.read_errors,
            })
            .collect();
        s.samplers = healths.into_iter().map(finish_health).collect();
        s.threads = self
            .threads
            .iter()
            .map(|t| SamplerThread {
                name: t.name,
                sources: t.sources,
                cpu_ns: match t.final_cpu_ns.load(Ordering::Relaxed) {
                    UNSET => t
                        .handle
                        .as_ref()
                        .and_then(|h| crate::sys::thread_cpu_ns(h.as_pthread_t())),
                    v => Some(v),
                },
            })
            .collect();
        s
    }

    /// The trace of one GPU or zone, oldest sample first, into `out` (cleared first). Returns
    /// false when there is no such GPU or zone.
    pub fn trace(&self, of: TraceOf, out: &mut Vec<TraceSample>) -> bool {
        out.clear();
        let (part, i) = match of {
            TraceOf::Gpu(i) => match &self.shared.gpu {
                Some(p) => {
                    let g = lock(p);
                    return match g.traces.get(i) {
                        Some(r) => {
                            r.copy_into(out);
                            true
                        }
                        None => false,
                    };
                }
                None => return false,
            },
            TraceOf::Zone(i) => (&self.shared.cpu, i),
        };
        match part {
            Some(p) => match lock(p).traces.get(i) {
                Some(r) => {
                    r.copy_into(out);
                    true
                }
                None => false,
            },
            None => false,
        }
    }

    /// Block until every GPU and RAPL zone being read has a reading taken at or after `at_ns`
    /// (CLOCK_MONOTONIC), or until `timeout` has passed; returns whether they all have.
    ///
    /// The job registry calls this after a job or step event so that the readings bracketing the
    /// event's instant are both in the traces, and the counters at that exact instant can be
    /// interpolated between them ([`Self::trace`]). It waits at most one sampling period in
    /// normal operation. It polls the published parts (one short lock each, every millisecond)
    /// and never disturbs the sampling threads. GPUs that are lost or not measurable are not
    /// waited for.
    pub fn wait_for_readings_after(&self, at_ns: u64, timeout: Duration) -> bool {
        let deadline = monotonic_ns().saturating_add(timeout.as_nanos() as u64);
        loop {
            let gpus_done = self.shared.gpu.as_ref().is_none_or(|p| {
                lock(p)
                    .gpus
                    .iter()
                    .all(|g| !g.measurable || g.lost || g.at_ns >= at_ns)
            });
            let zones_done = self.shared.cpu.as_ref().is_none_or(|p| {
                let c = lock(p);
                c.rapl.is_none() || c.zones.iter().all(|z| z.at_ns >= at_ns)
            });
            if gpus_done && zones_done {
                return true;
            }
            if monotonic_ns() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The stretches where a source did not sample for longer than [`hole_ns`] of its period
    /// (ergond stopped, hung or starved; a read blocking for seconds), merged across sources,
    /// oldest first: (last tick before, first tick after), CLOCK_MONOTONIC ns. The last
    /// [`HOLES_KEPT`] per source are kept.
    pub fn holes(&self) -> Vec<(u64, u64)> {
        let mut all = Vec::new();
        let mut one = Vec::new();
        if let Some(p) = &self.shared.gpu {
            lock(p).health.holes.copy_into(&mut one);
            all.append(&mut one);
        }
        if let Some(p) = &self.shared.cpu {
            let c = lock(p);
            for h in [&c.rapl, &c.cgroup].into_iter().flatten() {
                h.holes.copy_into(&mut one);
                all.append(&mut one);
            }
        }
        all.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (a, b) in all {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        merged
    }

    /// Whether GPU `i` (snapshot position) is read by the sampler (measurable, not lost).
    pub fn gpu_readable(&self, i: usize) -> bool {
        self.shared
            .gpu
            .as_ref()
            .is_some_and(|p| lock(p).gpus.get(i).is_some_and(|g| g.measurable && !g.lost))
    }

    /// The widest bracket between two samples of a series of `of` that is not a hole.
    pub fn hole_threshold_ns(&self, of: TraceOf) -> u64 {
        hole_ns(match of {
            TraceOf::Gpu(_) => self.options.gpu_period.as_nanos() as u64,
            TraceOf::Zone(_) => self.options.rapl_period.as_nanos() as u64,
        })
    }

    /// Say whether several jobs hold GPU `i` (snapshot position): only then does the GPU
    /// thread read its per-process utilisation (into [`GpuSnapshot::processes`]).
    pub fn set_gpu_shared(&self, i: usize, shared: bool) {
        if let Some(f) = self.shared.gpu_shared.get(i) {
            f.store(shared, Ordering::Relaxed);
        }
    }

    /// The cgroup hierarchy [`Self::watch_cgroup`] reads, if any.
    pub fn cgroup_hierarchy(&self) -> Option<&CgroupHierarchy> {
        self.cgroups.as_ref()
    }

    /// Start sampling the CPU time of cgroup `path` (relative to the hierarchy, e.g.
    /// `slurm/uid_1000/job_42` for v1 or `system.slice/slurmstepd.scope/job_42` for v2). The
    /// file is opened and read once here, so a missing cgroup is an error now, and the cgroup
    /// is in the next snapshot with a valid `cpu_ns`. Watching a path already watched does
    /// nothing.
    pub fn watch_cgroup(&self, path: &str) -> Result<(), SamplerError> {
        let Some(h) = &self.cgroups else {
            return Err(SamplerError::NoCgroupHierarchy {
                path: path.to_string(),
            });
        };
        if lock(&self.shared.cgroups).iter().any(|w| w.path == path) {
            return Ok(());
        }
        let mut file = CgroupCpu::open(&h.root, h.version, path)?;
        let before = monotonic_ns();
        let cpu_ns = file.read_usage_ns()?;
        let at_ns = before + (monotonic_ns() - before) / 2;
        let mut watched = lock(&self.shared.cgroups);
        if !watched.iter().any(|w| w.path == path) {
            watched.push(Watched {
                path: path.to_string(),
                file,
                cpu_ns,
                at_ns,
                read_errors: 0,
                fresh: false,
            });
        }
        Ok(())
    }

    /// Stop sampling cgroup `path`; returns whether it was watched.
    pub fn unwatch_cgroup(&self, path: &str) -> bool {
        let mut watched = lock(&self.shared.cgroups);
        let before = watched.len();
        watched.retain(|w| w.path != path);
        watched.len() != before
    }

    /// Stop and join the threads; returns the final snapshot (every tick that ran is in it).
    pub fn stop(mut self) -> NodeSnapshot {
        self.shutdown();
        self.snapshot()
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in &mut self.threads {
            if let Some(h) = t.handle.take() {
                if h.join().is_err() {
                    tracing::error!(thread = t.name, "sampler thread panicked");
                }
            }
        }
    }
}

impl Drop for SamplerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Absolute-deadline tick schedule of one thread.
struct Ticker {
    start: u64,
    period: u64,
    k: u64,
}

impl Ticker {
    /// First tick now.
    fn new(period_ns: u64) -> Self {
        Self {
            start: monotonic_ns(),
            period: period_ns.max(1),
            k: 0,
        }
    }

    fn index(&self) -> u64 {
        self.k
    }

    /// Sleep until the current deadline; returns the lateness of the wake-up, or `None` when a
    /// stop was requested.
    fn wait(&self, stop: &AtomicBool) -> Option<u64> {
        let deadline = self.start + self.k * self.period;
        loop {
            if stop.load(Ordering::Acquire) {
                return None;
            }
            let now = monotonic_ns();
            if now >= deadline {
                return Some(now - deadline);
            }
            crate::clock::sleep_until(deadline.min(now + STOP_CHECK_NS));
        }
    }

    /// After a tick: move to the first deadline not yet past. Returns the deadlines skipped.
    fn advance(&mut self) -> u64 {
        let after = monotonic_ns();
        let next = (after - self.start) / self.period + 1;
        let missed = next.saturating_sub(self.k + 1);
        self.k = next.max(self.k + 1);
        missed
    }
}

/// The GPU thread.
fn gpu_thread(mut src: GpuSource, opts: &SamplerOptions, shared: &Shared) {
    let Some(part) = &shared.gpu else { return };
    let n = src.len();
    let mut meters: Vec<Option<GpuEnergyMeter>> = (0..n)
        .map(|i| match src.info(i).method {
            Support::Supported(m) => Some(GpuEnergyMeter::new(
                m,
                opts.gpu_max_power_w,
                opts.gpu_counter_period,
            )),
            Support::Unsupported(_) => None,
        })
        .collect();
    // Energy counters are stamped with the instant of the driver's update that produced their
    // value, not the read's (see crate::update_clock).
    let mut clocks: Vec<Option<UpdateClock>> = (0..n)
        .map(|i| {
            matches!(src.info(i).method, Support::Supported(Method::Counter))
                .then(|| UpdateClock::new(opts.gpu_counter_period.as_nanos() as u64))
        })
        .collect();
    let mut readings: Vec<Option<GpuReading>> = vec![None; n];
    let mut errors: Vec<u64> = vec![0; n];
    let mut ticker = Ticker::new(opts.gpu_period.as_nanos() as u64);
    let mut last_processes = 0u64;
    let mut was_shared = vec![false; n];
    let mut wanted = vec![false; n];
    while let Some(lateness) = ticker.wait(&shared.stop) {
        // Per-process utilisation of the shared GPUs: about once a second, and at once when a
        // GPU has just become shared.
        let now = monotonic_ns();
        for (i, w) in wanted.iter_mut().enumerate() {
            *w = shared
                .gpu_shared
                .get(i)
                .is_some_and(|f| f.load(Ordering::Relaxed));
        }
        let newly = wanted.iter().zip(&was_shared).any(|(w, was)| *w && !*was);
        if newly || now.saturating_sub(last_processes) >= PROCESS_UTIL_PERIOD_NS {
            last_processes = now;
            for (i, &want) in wanted.iter().enumerate() {
                let processes = if want {
                    src.process_utilization(i)
                } else {
                    None
                };
                if let Some(p) = &shared.gpu {
                    lock(p).gpus[i].processes = processes.map(|v| (now, v));
                }
            }
        }
        was_shared.copy_from_slice(&wanted);
        let t0 = monotonic_ns();
        let mut tick_errors = 0;
        for i in 0..n {
            readings[i] = None;
            if meters[i].is_none() || src.info(i).lost {
                continue;
            }
            match src.read(i) {
                Ok(r) => {
                    if let Some(m) = meters[i].as_mut() {
                        m.update(&r);
                    }
                    readings[i] = Some(r);
                }
                Err(e) => {
                    tick_errors += 1;
                    errors[i] += 1;
                    if errors[i] == 1 {
                        tracing::warn!(error = %e, "GPU read failed (further failures are counted, not logged)");
                    }
                }
            }
        }
        let latency = monotonic_ns() - t0;
        {
            let mut p = lock(part);
            let GpuPart {
                gpus,
                traces,
                health,
            } = &mut *p;
            for i in 0..n {
                let g = &mut gpus[i];
                g.lost = src.info(i).lost;
                g.read_errors = errors[i];
                let (Some(r), Some(m)) = (readings[i], meters[i].as_ref()) else {
                    continue;
                };
                let t = m.totals();
                g.power_w = r.power_mw.map(|mw| f64::from(mw) / 1000.0);
                g.resets = t.resets;
                g.dropped_intervals = t.dropped;
                g.raw_j = r.energy_mj.map(|mj| mj as f64 / 1000.0);
                // A new value is stamped with its update's instant; a read that saw no update
                // adds nothing (the value still describes that instant).
                let stamp = match (clocks[i].as_mut(), r.energy_mj) {
                    (Some(c), Some(raw)) => match c.observe(r.at_ns, raw) {
                        Observed::First => Some(r.at_ns),
                        Observed::Same => None,
                        Observed::New(at) => Some(at),
                    },
                    _ => Some(r.at_ns),
                };
                if let Some(at) = stamp {
                    g.energy_j = t.joules;
                    g.at_ns = at;
                    traces[i].push(TraceSample {
                        at_ns: at,
                        energy_j: t.joules,
                        power_w: g.power_w.map(|w| w as f32),
                    });
                }
            }
            health.tick(t0);
            health.record(latency, lateness, tick_errors);
        }
        let missed = ticker.advance();
        if missed > 0 {
            lock(part).health.missed_ticks += missed;
        }
    }
}

/// The CPU thread: RAPL every tick, cgroups and sockets every `cgroup_every` ticks.
fn cpu_thread_main(
    mut rapl: Option<RaplSource>,
    mut sockets: Option<SocketBusy>,
    opts: &SamplerOptions,
    base_period: u64,
    cgroup_every: u64,
    shared: &Shared,
) {
    let Some(part) = &shared.cpu else { return };
    let zones: Vec<_> = rapl
        .as_ref()
        .map(|r| r.zones().to_vec())
        .unwrap_or_default();
    let mut counters: Vec<EnergyCounter> = zones
        .iter()
        .map(|z| EnergyCounter::new(z.counter_spec(opts.cpu_max_power_w, 1.5)))
        .collect();
    let mut totals: Vec<EnergyTotals> = zones
        .iter()
        .map(|_| EnergyTotals::new(Method::Counter))
        .collect();
    let mut power: Vec<Option<f64>> = vec![None; zones.len()];
    let mut raw: Vec<u64> = Vec::with_capacity(zones.len());
    let mut socket_times: Vec<SocketTimes> =
        Vec::with_capacity(sockets.as_ref().map_or(0, |s| s.sockets().len()));
    let mut rapl_errors = 0u64;
    let mut socket_errors = 0u64;
    let mut last_slot: Option<u64> = None;
    let has_cpu_time = lock(part).cgroup.is_some();
    let mut ticker = Ticker::new(base_period);
    while let Some(lateness) = ticker.wait(&shared.stop) {
        // RAPL.
        let mut rapl_tick: Option<(u64, u64, u64)> = None; // (latency, at, errors)
        if let Some(r) = rapl.as_mut() {
            let before = monotonic_ns();
            let result = r.read(&mut raw);
            let after = monotonic_ns();
            let at = before + (after - before) / 2;
            let mut errs = 0;
            match result {
                Ok(()) => {
                    for (z, &value) in raw.iter().enumerate() {
                        let step = counters[z].update(RawReading { at_ns: at, value });
                        totals[z].add(&step);
                        power[z] = match step {
                            Step::Delta(d) if d.to_ns > d.from_ns => {
                                Some(d.joules / ((d.to_ns - d.from_ns) as f64 / 1e9))
                            }
                            _ => None,
                        };
                    }
                }
                Err(e) => {
                    errs = 1;
                    rapl_errors += 1;
                    if rapl_errors == 1 {
                        tracing::warn!(error = %e, "RAPL read failed (further failures are counted, not logged)");
                    }
                }
            }
            rapl_tick = Some((after - before, at, errs));
        }

        // cgroups and sockets, on the same tick.
        let slot = ticker.index() / cgroup_every;
        let mut cg_tick: Option<(u64, u64, u64, u64)> = None; // (latency, at, errors, missed)
        if has_cpu_time && last_slot != Some(slot) {
            let missed = last_slot.map_or(0, |l| slot.saturating_sub(l + 1));
            last_slot = Some(slot);
            let before = monotonic_ns();
            let mut errs = 0;
            let mut watched = lock(&shared.cgroups);
            let sockets_ok = match sockets.as_mut() {
                Some(s) => match s.read(&mut socket_times) {
                    Ok(()) => true,
                    Err(e) => {
                        errs += 1;
                        socket_errors += 1;
                        if socket_errors == 1 {
                            tracing::warn!(error = %e, "/proc/stat read failed (further failures are counted, not logged)");
                        }
                        false
                    }
                },
                None => false,
            };
            for w in watched.iter_mut() {
                match w.file.read_usage_ns() {
                    Ok(v) => {
                        w.cpu_ns = v;
                        w.fresh = true;
                    }
                    Err(e) => {
                        errs += 1;
                        w.read_errors += 1;
                        if w.read_errors == 1 {
                            tracing::warn!(cgroup = %w.path, error = %e, "cgroup CPU time read failed");
                        }
                    }
                }
            }
            let after = monotonic_ns();
            // One instant for the whole batch: the midpoint of the tick's CPU-time reads.
            let at = before + (after - before) / 2;
            for w in watched.iter_mut().filter(|w| w.fresh) {
                w.at_ns = at;
                w.fresh = false;
            }
            drop(watched);
            if !sockets_ok {
                socket_times.clear();
            }
            cg_tick = Some((after - before, at, errs, missed));
        }

        {
            let mut p = lock(part);
            let CpuPart {
                zones: zsnap,
                traces,
                sockets: ssnap,
                rapl: rh,
                cgroup: ch,
            } = &mut *p;
            if let (Some((latency, at, errs)), Some(h)) = (rapl_tick, rh.as_mut()) {
                if errs == 0 {
                    for (z, zs) in zsnap.iter_mut().enumerate() {
                        let t = &totals[z];
                        zs.energy_j = t.joules;
                        zs.power_w = power[z];
                        zs.wraps = t.wraps;
                        zs.dropped_intervals = t.dropped;
                        zs.at_ns = at;
                        let spec = counters[z].spec();
                        zs.raw_j = raw.get(z).map(|&v| v as f64 * spec.joules_per_unit);
                        zs.range_j = match spec.kind {
                            crate::counter::CounterKind::Wrapping { modulus } => {
                                Some(modulus as f64 * spec.joules_per_unit)
                            }
                            crate::counter::CounterKind::Resetting => None,
                        };
                        traces[z].push(TraceSample {
                            at_ns: at,
                            energy_j: t.joules,
                            power_w: power[z].map(|w| w as f32),
                        });
                    }
                }
                h.tick(at);
                h.record(latency, lateness, errs);
            }
            if let (Some((latency, at, errs, missed)), Some(h)) = (cg_tick, ch.as_mut()) {
                for (ss, t) in ssnap.iter_mut().zip(&socket_times) {
                    ss.busy_ns = t.busy_ns;
                    ss.total_ns = t.total_ns;
                    ss.at_ns = at;
                }
                h.record(latency, lateness, errs);
                h.missed_ticks += missed;
            }
        }
        let missed = ticker.advance();
        if missed > 0 {
            if let Some(h) = lock(part).rapl.as_mut() {
                h.missed_ticks += missed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_values_in_order() {
        let mut r = Ring::new(3, 0u64);
        let mut out = Vec::new();
        r.copy_into(&mut out);
        assert!(out.is_empty());
        for v in 1..=2 {
            r.push(v);
        }
        r.copy_into(&mut out);
        assert_eq!(out, [1, 2]);
        for v in 3..=7 {
            r.push(v);
        }
        r.copy_into(&mut out);
        assert_eq!(out, [5, 6, 7]);
        assert_eq!(r.buf.len(), 3);
    }

    #[test]
    fn cgroup_ticks_are_a_whole_number_of_rapl_ticks() {
        let s = SamplingConfig::default();
        let o = SamplerOptions::from_config(&s, None);
        assert_eq!(cpu_tick(&o, true), (100_000_000, 1));
        assert_eq!(cpu_tick(&o, false), (100_000_000, 1));
        let p = SamplerOptions::profiling(&s, None);
        assert_eq!(cpu_tick(&p, true), (1_000_000, 100));
        let o = SamplerOptions {
            cgroup_period: Duration::from_millis(1),
            rapl_period: Duration::from_millis(5),
            ..o
        };
        assert_eq!(cpu_tick(&o, true), (5_000_000, 1));
    }

    #[test]
    fn default_gpu_period_is_half_the_counter_period_clamped() {
        let s = SamplingConfig::default();
        let o = SamplerOptions::from_config(&s, Some(Duration::from_millis(100)));
        assert_eq!(o.gpu_period, Duration::from_millis(50));
        assert_eq!(o.gpu_counter_period, Duration::from_millis(100));
        let o = SamplerOptions::from_config(&s, None);
        assert_eq!(o.gpu_period, Duration::from_millis(100));
        let p = SamplerOptions::profiling(&s, Some(Duration::from_millis(100)));
        assert_eq!(
            (p.gpu_period, p.rapl_period, p.cgroup_period),
            (
                Duration::from_millis(10),
                Duration::from_millis(1),
                Duration::from_millis(100)
            )
        );
    }

    #[test]
    fn invalid_options_are_named() {
        let o = SamplerOptions {
            trace_capacity: 0,
            ..SamplerOptions::from_config(&SamplingConfig::default(), None)
        };
        let e = Sampler::start_with(o, SamplerSources::default()).unwrap_err();
        assert!(e.to_string().contains("trace_capacity"), "{e}");
    }

    #[test]
    fn ticker_skips_and_counts_missed_deadlines() {
        let stop = AtomicBool::new(false);
        let mut t = Ticker::new(2_000_000);
        assert!(t.wait(&stop).is_some());
        std::thread::sleep(Duration::from_millis(7));
        // 7 ms into a 2 ms schedule: deadlines 1, 2 and 3 are past.
        let missed = t.advance();
        assert!((3..=4).contains(&missed), "{missed}");
        assert!(t.wait(&stop).is_some());
        stop.store(true, Ordering::Release);
        assert!(t.wait(&stop).is_none());
    }
}
