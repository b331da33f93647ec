//! Self-metrics of one source (samples, errors, read latency, lateness, holes), updated by its
//! thread and turned into [`SamplerHealth`] with percentiles by the reader.

use super::ring::{Ring, UNSET};
use crate::snapshot::SamplerHealth;
use crate::stats::percentile;

/// Self-metrics of one source, updated by its thread.
#[derive(Debug)]
pub(super) struct Health {
    pub(super) source: &'static str,
    pub(super) period_ns: u64,
    pub(super) samples: u64,
    pub(super) missed_ticks: u64,
    pub(super) read_errors: u64,
    pub(super) latency_ns: Ring<u64>,
    pub(super) lateness_ns: Ring<u64>,
    pub(super) latency_sum_ns: u64,
    pub(super) lateness_sum_ns: u64,
    /// The previous tick's instant (0 before the first).
    pub(super) last_tick_ns: u64,
    /// Stretches longer than [`hole_ns`] between two ticks: (previous tick, this tick).
    pub(super) holes: Ring<(u64, u64)>,
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
    pub(super) fn new(source: &'static str, period_ns: u64, window: usize) -> Self {
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
    pub(super) fn tick(&mut self, at_ns: u64) {
        if self.last_tick_ns > 0
            && at_ns.saturating_sub(self.last_tick_ns) > hole_ns(self.period_ns)
        {
            self.holes.push((self.last_tick_ns, at_ns));
        }
        self.last_tick_ns = at_ns;
    }

    pub(super) fn record(&mut self, latency_ns: u64, lateness_ns: u64, errors: u64) {
        self.samples += 1;
        self.read_errors += errors;
        self.latency_ns.push(latency_ns);
        self.lateness_ns.push(lateness_ns);
        self.latency_sum_ns = self.latency_sum_ns.saturating_add(latency_ns);
        self.lateness_sum_ns = self.lateness_sum_ns.saturating_add(lateness_ns);
    }

    /// Copy out under the lock; percentiles are computed after it is released.
    pub(super) fn copy(&self) -> (SamplerHealth, Vec<u64>, Vec<u64>) {
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

pub(super) fn finish_health(
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
