//! One sample of a GPU's or zone's power trace, and which trace to read.

use super::ring::UNSET;

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

pub(super) const UNSET_SAMPLE: TraceSample = TraceSample {
    at_ns: UNSET,
    energy_j: f64::NAN,
    power_w: None,
};

/// Which trace to read with [`SamplerHandle::trace`](super::SamplerHandle::trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceOf {
    /// GPU by position in [`NodeSnapshot::gpus`](crate::snapshot::NodeSnapshot::gpus).
    Gpu(usize),
    /// RAPL zone by position in [`NodeSnapshot::zones`](crate::snapshot::NodeSnapshot::zones).
    Zone(usize),
}
