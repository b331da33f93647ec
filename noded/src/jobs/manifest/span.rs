//! The job's interval as the manifest's parts see it: its start and end on both clocks, its
//! duration, and the bins of its power trace.

use super::super::registry::EventTime;

/// Most points per trace series.
pub const MAX_TRACE_POINTS: usize = 600;
/// Shortest trace bin.
pub const MIN_TRACE_BIN_NS: u64 = 100_000_000;

/// The job's interval and its power trace's bins.
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    /// The job's start.
    pub start: EventTime,
    /// Its end (the start when it has none).
    pub end: EventTime,
    /// Seconds from start to end.
    pub duration_s: f64,
    /// Where every trace series starts (monotonic ns): the job's start, or the oldest instant
    /// every GPU trace covers.
    pub trace_start_mono: u64,
    /// One trace bin (ns).
    pub bin_ns: u64,
}

impl Span {
    /// Average power of `j` joules over the job (0 for a job of no duration).
    pub fn per_s(&self, j: f64) -> f64 {
        if self.duration_s > 0.0 {
            j / self.duration_s
        } else {
            0.0
        }
    }
}
