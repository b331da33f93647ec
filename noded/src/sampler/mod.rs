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
//! * `ergond-gpustat` reads every GPU's activity and health (utilisation, memory, temperature,
//!   clocks, throttle and ECC counters) every `cgroup_period`, and polls its Xid events without
//!   blocking: slower driver calls, on their own thread and NVML handle so that they never
//!   delay the energy readings.
//!
//! GPUs get a thread of their own because a driver call can take milliseconds on a busy GPU and
//! must not delay RAPL's 1 kHz profiling ticks.
//!
//! # Timing
//! Each thread ticks at absolute CLOCK_MONOTONIC deadlines `start + k × period`
//! (`clock_nanosleep(TIMER_ABSTIME)`, timer slack 1 ns, as `ergond probe` does), so lateness never
//! accumulates. A tick that overruns its period does not burst to catch up: the deadlines already
//! past are skipped and counted ([`SamplerHealth::missed_ticks`]). Sleeps longer than 100 ms are
//! cut in pieces so that [`SamplerHandle::stop`] is noticed within 100 ms whatever the period.
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
//!
//! # Modules
//! Leaves first; no module uses one listed after it, and nothing uses `start`: `options`
//! ([`SamplerOptions`], [`SamplerError`]), `sources` (opening them, detecting the GPU counters'
//! period), `ring` (fixed-capacity buffers), `trace` ([`TraceSample`]), `health` (per-source
//! self-metrics), `shared` (what the threads publish), `ticker` (absolute deadlines),
//! `gpu_thread` and `cpu_thread`, `handle` ([`SamplerHandle`]) and `start` ([`Sampler`]).
//!
//! [`NodeSnapshot`]: crate::snapshot::NodeSnapshot
//! [`SamplerHealth::missed_ticks`]: crate::snapshot::SamplerHealth::missed_ticks
//! [`GpuSource::read`]: crate::sources::nvml::GpuSource::read

mod cpu_thread;
mod gpu_thread;
mod handle;
mod health;
mod meter;
mod options;
mod ring;
mod shared;
mod sources;
mod start;
mod stats_thread;
mod ticker;
mod trace;

pub use crate::sources::cgroup::CgroupHierarchy;
pub use gpu_thread::PROCESS_UTIL_PERIOD_NS;
pub use handle::SamplerHandle;
pub use health::{hole_ns, HOLES_KEPT};
pub use meter::{MeterInfo, NodeMeterHandle};
pub use options::{
    SamplerError, SamplerOptions, DEFAULT_LATENCY_WINDOW, DEFAULT_TRACE_CAPACITY, DETECT_BUDGET,
    PROFILING_RAPL_PERIOD,
};
pub use shared::{STATS_CAPACITY, XID_CAPACITY};
pub use sources::{detect_gpu_counter_period, SamplerSources, SourceProblem};
pub use start::Sampler;
pub use trace::{TraceOf, TraceSample};
