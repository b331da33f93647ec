//! The state the sampling threads publish and the handle reads: each thread's part of the
//! snapshot behind its own mutex, and the watched cgroups.

use super::health::Health;
use super::ring::Ring;
use super::trace::TraceSample;
use crate::gpustats::WeightedSample;
use crate::snapshot::{GpuSnapshot, SocketSnapshot, ZoneSnapshot};
use crate::sources::cgroup::CgroupCpu;
use crate::sources::nvml::GpuStatsSample;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};

/// The GPU thread's part of the snapshot.
#[derive(Debug)]
pub(super) struct GpuPart {
    pub(super) gpus: Vec<GpuSnapshot>,
    pub(super) traces: Vec<Ring<TraceSample>>,
    pub(super) health: Health,
}

/// The CPU thread's part of the snapshot.
#[derive(Debug)]
pub(super) struct CpuPart {
    pub(super) zones: Vec<ZoneSnapshot>,
    pub(super) traces: Vec<Ring<TraceSample>>,
    pub(super) sockets: Vec<SocketSnapshot>,
    pub(super) rapl: Option<Health>,
    pub(super) cgroup: Option<Health>,
}

/// Samples kept per GPU: at the default 100 ms, 25 s, several times the longest stretch the
/// job worker lets pass between two attribution intervals.
pub const STATS_CAPACITY: usize = 256;
/// Xid events kept per GPU between two attribution intervals.
pub const XID_CAPACITY: usize = 64;

/// One GPU's statistics as the statistics thread publishes them.
#[derive(Debug)]
pub(super) struct GpuStatsState {
    pub(super) samples: Ring<WeightedSample>,
    pub(super) xids: Ring<(u64, u64)>,
    /// Whether its Xid events are watched.
    pub(super) xid_supported: bool,
    /// Xid events since ergond started.
    pub(super) xid_total: u64,
    /// The latest sample.
    pub(super) latest: Option<GpuStatsSample>,
}

impl GpuStatsState {
    pub(super) fn new() -> Self {
        Self {
            samples: Ring::new(STATS_CAPACITY, WeightedSample::default()),
            xids: Ring::new(XID_CAPACITY, (0, 0)),
            xid_supported: false,
            xid_total: 0,
            latest: None,
        }
    }
}

/// One watched cgroup.
#[derive(Debug)]
pub(super) struct Watched {
    pub(super) path: String,
    pub(super) file: CgroupCpu,
    pub(super) cpu_ns: u64,
    pub(super) at_ns: u64,
    pub(super) read_errors: u64,
    /// Read successfully on the current tick (its `at_ns` is set once the batch is done).
    pub(super) fresh: bool,
}

/// State shared between the handle and the threads.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) stop: AtomicBool,
    /// Per GPU: whether several jobs hold it, so its per-process utilisation is wanted (read
    /// about once a second by the GPU thread, only for these GPUs).
    pub(super) gpu_shared: Vec<AtomicBool>,
    pub(super) gpu: Option<Mutex<GpuPart>>,
    /// Per GPU (snapshot position): the statistics thread's samples and Xid events.
    pub(super) gpu_stats: Option<Mutex<Vec<GpuStatsState>>>,
    pub(super) cpu: Option<Mutex<CpuPart>>,
    pub(super) cgroups: Mutex<Vec<Watched>>,
}

/// Lock, ignoring poisoning: the data is plain numbers, valid whatever a panicking holder did.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
