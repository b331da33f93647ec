//! [`Reading`]: every cumulative counter of the node at one event's instant.
//!
//! The sampler reads counters on its ticks (every 10–200 ms for GPUs). An event (a job's start
//! or end) falls between two ticks; its counters are the linear interpolation of the two
//! readings that bracket its instant ([`interpolate`]), which is exact whenever power is
//! constant between two ticks and otherwise off by at most one tick's energy variation. The
//! shell waits (off the reply path) until the tick after the event is in
//! ([`crate::sampler::SamplerHandle::wait_for_readings_after`]) and then interpolates, so a
//! one-second job is measured over exactly its second, not over whole ticks.

use serde::{Deserialize, Serialize};

use crate::sampler::TraceSample;

/// Cumulative counters at one instant, as the sampler publishes them (energies since ergond
/// started, joules).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Reading {
    /// The instant (CLOCK_MONOTONIC ns).
    pub at_mono_ns: u64,
    /// Per GPU, by position in the snapshot: energy at the instant; `None` when it could not be
    /// established (GPU not measurable or lost, or no readings bracketing the instant).
    pub gpus: Vec<Option<f64>>,
    /// Per RAPL zone, by position in the snapshot.
    pub zones: Vec<Option<f64>>,
    /// Watched cgroups' CPU time (ns) as of the latest cgroup tick: path and value.
    pub cgroups: Vec<(String, u64)>,
    /// Per socket, from `/proc/stat` as of the latest cgroup tick: (socket, busy ns, total
    /// ns), cumulative since boot.
    pub sockets: Vec<(u32, u64, u64)>,
    /// Per GPU (snapshot position) several jobs hold: the SM utilisation of each job's
    /// processes, `(job id, %)`, from the driver's per-process utilisation; `None` where not
    /// read or not reported.
    #[serde(default)]
    pub gpu_util: Vec<Option<Vec<(u32, f64)>>>,
    /// Per GPU (snapshot position): what its statistics samples say since the previous
    /// reading the attributor took (and its counters as of this instant); `None` where its
    /// statistics are not sampled.
    #[serde(default)]
    pub gpu_stats: Vec<Option<crate::gpustats::GpuWindow>>,
    /// Set when a counter at this instant had to be interpolated across a stretch the sampler
    /// did not cover (ergond stopped, hung, starved or down): the figures that depend on it are
    /// estimates, off by at most the stretch's energy.
    #[serde(default)]
    pub across: Option<Across>,
    /// The node meter's cumulative energy at the instant (J since ergond started), linearly
    /// interpolated between the meter's readings; `None` without a meter or where its readings
    /// do not bracket the instant.
    #[serde(default)]
    pub meter: Option<f64>,
}

/// A stretch without samples that a [`Reading`] was interpolated across.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Across {
    /// The last sample before the instant (CLOCK_MONOTONIC ns; the earliest over the series
    /// interpolated across the stretch).
    pub from_mono_ns: u64,
    /// The first sample after it (the latest over those series).
    pub to_mono_ns: u64,
    /// Per GPU (snapshot position): the energy of the whole stretch, for the GPUs whose value
    /// was interpolated across it. The true value at the instant lies between the two samples,
    /// so the interpolated one is off by at most this.
    pub gpus: Vec<Option<f64>>,
    /// Per RAPL zone, likewise.
    pub zones: Vec<Option<f64>>,
}

impl Across {
    /// Note that series `i` of `slot` was interpolated between samples at `from` and `to`
    /// whose energies differ by `energy_j`.
    pub fn add(slot: &mut Vec<Option<f64>>, n: usize, i: usize, energy_j: f64) {
        if slot.len() < n {
            slot.resize(n, None);
        }
        if let Some(s) = slot.get_mut(i) {
            *s = Some(energy_j.max(0.0));
        }
    }

    /// Widen the stretch to cover `[from, to]`.
    pub fn cover(&mut self, from: u64, to: u64) {
        if self.from_mono_ns == 0 || from < self.from_mono_ns {
            self.from_mono_ns = from;
        }
        self.to_mono_ns = self.to_mono_ns.max(to);
    }
}

/// The Slurm job a process belongs to, from `<proc_root>/<pid>/cgroup` (a `job_<id>` path
/// component), if any.
pub fn job_of_pid(proc_root: &std::path::Path, pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines().find_map(|l| {
        l.rsplit(':')
            .next()?
            .split('/')
            .find_map(|c| c.strip_prefix("job_")?.parse().ok())
    })
}

impl Reading {
    /// `later - self` for GPU `i`, when both are known and not negative.
    pub fn gpu_delta(&self, later: &Reading, i: usize) -> Option<f64> {
        delta(
            self.gpus.get(i).copied().flatten(),
            later.gpus.get(i).copied().flatten(),
        )
    }

    /// The node meter's energy between this reading and `later`.
    pub fn meter_delta(&self, later: &Reading) -> Option<f64> {
        delta(self.meter, later.meter)
    }

    /// `later - self` for zone `i`.
    pub fn zone_delta(&self, later: &Reading, i: usize) -> Option<f64> {
        delta(
            self.zones.get(i).copied().flatten(),
            later.zones.get(i).copied().flatten(),
        )
    }

    /// CPU time (ns) of cgroup `path` in this reading.
    pub fn cgroup_ns(&self, path: &str) -> Option<u64> {
        self.cgroups
            .iter()
            .find(|(p, _)| p == path)
            .map(|&(_, v)| v)
    }
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b >= a => Some(b - a),
        _ => None,
    }
}

/// Cumulative energy at `at_ns`, interpolated linearly between the samples of `trace` (oldest
/// first, as [`crate::sampler::SamplerHandle::trace`] gives them) that bracket it. `None` when
/// the trace does not bracket the instant (it is older than the trace or newer than its last
/// sample) or a sample's energy is not a number.
pub fn interpolate(trace: &[TraceSample], at_ns: u64) -> Option<f64> {
    let after = trace.partition_point(|s| s.at_ns < at_ns);
    let next = trace.get(after)?;
    if next.at_ns == at_ns {
        return next.energy_j.is_finite().then_some(next.energy_j);
    }
    let prev = trace.get(after.checked_sub(1)?)?;
    if !(prev.energy_j.is_finite() && next.energy_j.is_finite()) || next.at_ns <= prev.at_ns {
        return None;
    }
    let f = (at_ns - prev.at_ns) as f64 / (next.at_ns - prev.at_ns) as f64;
    Some(prev.energy_j + (next.energy_j - prev.energy_j) * f)
}

/// A value interpolated at an instant, with the two samples it lies between.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bracketed {
    /// The interpolated cumulative energy.
    pub value: f64,
    /// The sample before (or at) the instant: (ns, J).
    pub before: (u64, f64),
    /// The sample after (or at) it.
    pub after: (u64, f64),
}

impl Bracketed {
    /// Time between the two samples.
    pub fn width_ns(&self) -> u64 {
        self.after.0.saturating_sub(self.before.0)
    }

    /// Energy between the two samples: the most the interpolated value can be off by.
    pub fn energy_j(&self) -> f64 {
        (self.after.1 - self.before.1).max(0.0)
    }
}

/// As [`interpolate`], with the bracketing samples.
pub fn interpolate_bracketed(trace: &[TraceSample], at_ns: u64) -> Option<Bracketed> {
    let after = trace.partition_point(|s| s.at_ns < at_ns);
    let next = trace.get(after)?;
    if next.at_ns == at_ns {
        let v = (next.at_ns, next.energy_j);
        return next.energy_j.is_finite().then_some(Bracketed {
            value: next.energy_j,
            before: v,
            after: v,
        });
    }
    let prev = trace.get(after.checked_sub(1)?)?;
    bracket_between(
        (prev.at_ns, prev.energy_j),
        (next.at_ns, next.energy_j),
        at_ns,
    )
}

/// Linear interpolation at `at_ns` between two (ns, J) samples that bracket it.
pub fn bracket_between(before: (u64, f64), after: (u64, f64), at_ns: u64) -> Option<Bracketed> {
    if !(before.1.is_finite() && after.1.is_finite())
        || after.0 <= before.0
        || !(before.0..=after.0).contains(&at_ns)
    {
        return None;
    }
    let f = (at_ns - before.0) as f64 / (after.0 - before.0) as f64;
    Some(Bracketed {
        value: before.1 + (after.1 - before.1) * f,
        before,
        after,
    })
}

/// Samples of `trace` taken within `[from_ns, to_ns]`.
pub fn window(trace: &[TraceSample], from_ns: u64, to_ns: u64) -> &[TraceSample] {
    let a = trace.partition_point(|s| s.at_ns < from_ns);
    let b = trace.partition_point(|s| s.at_ns <= to_ns);
    &trace[a..b.max(a)]
}

/// Average power per bin over `[from_ns, to_ns]` cut into bins of `bin_ns`, from the energy
/// interpolated at the bin edges; bins that the trace does not cover are dropped from the
/// start (the series then starts later: the returned instant is its first edge) and end the
/// series where they occur later. At most `max_points` bins.
///
/// Every bin is `bin_ns` wide: a shorter last bin is dropped (unless it would be the only one).
/// Besides breaking the series' fixed interval, a short bin misreads power: a counter that
/// steps every 20 ms, averaged over a few milliseconds around a step, reads up to twice the
/// true power (found end to end: a job at a constant 700 W got a 920 W peak from its last bin).
pub fn power_series(
    trace: &[TraceSample],
    from_ns: u64,
    to_ns: u64,
    bin_ns: u64,
    max_points: usize,
) -> (u64, Vec<f32>) {
    let bin_ns = bin_ns.max(1);
    let mut start = from_ns;
    // Skip bins before the trace's oldest sample.
    if let Some(first) = trace.first() {
        if first.at_ns > start {
            let skip = (first.at_ns - start).div_ceil(bin_ns);
            start += skip * bin_ns;
        }
    }
    let mut out = Vec::new();
    let mut edge = start;
    let mut prev = interpolate(trace, edge);
    while out.len() < max_points && edge < to_ns {
        let mut next_edge = edge + bin_ns;
        if next_edge > to_ns {
            if !out.is_empty() {
                break;
            }
            next_edge = to_ns;
        }
        let next = interpolate(trace, next_edge);
        match (prev, next) {
            (Some(a), Some(b)) => {
                out.push(((b - a) / ((next_edge - edge) as f64 / 1e9)) as f32);
            }
            _ => break,
        }
        edge = next_edge;
        prev = next;
    }
    (start, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_ns: u64, energy_j: f64) -> TraceSample {
        TraceSample {
            at_ns,
            energy_j,
            power_w: None,
        }
    }

    #[test]
    fn interpolates_between_bracketing_samples() {
        let tr = [s(100, 10.0), s(200, 20.0), s(300, 40.0)];
        assert_eq!(interpolate(&tr, 150), Some(15.0));
        assert_eq!(interpolate(&tr, 250), Some(30.0));
        assert_eq!(interpolate(&tr, 200), Some(20.0));
        assert_eq!(interpolate(&tr, 100), Some(10.0));
        assert_eq!(interpolate(&tr, 99), None, "before the trace");
        assert_eq!(interpolate(&tr, 301), None, "not yet read");
        assert_eq!(interpolate(&[], 5), None);
        assert_eq!(interpolate(&[s(100, f64::NAN), s(200, 1.0)], 150), None);
    }

    #[test]
    fn bracketed_values_know_their_samples() {
        let tr = [s(100, 10.0), s(200, 20.0), s(1_300, 40.0)];
        let b = interpolate_bracketed(&tr, 750).unwrap();
        assert_eq!(
            (b.value, b.before, b.after),
            (30.0, (200, 20.0), (1_300, 40.0))
        );
        assert_eq!((b.width_ns(), b.energy_j()), (1_100, 20.0));
        let at = interpolate_bracketed(&tr, 200).unwrap();
        assert_eq!(
            (at.width_ns(), at.energy_j()),
            (0, 0.0),
            "a sample at the instant"
        );
        assert_eq!(interpolate_bracketed(&tr, 50), None);
        assert_eq!(bracket_between((0, 0.0), (10, 5.0), 11), None, "outside");
        assert_eq!(bracket_between((0, 0.0), (10, 5.0), 4).unwrap().value, 2.0);
        let mut a = Across::default();
        a.cover(50, 60);
        a.cover(40, 55);
        assert_eq!((a.from_mono_ns, a.to_mono_ns), (40, 60));
        Across::add(&mut a.gpus, 3, 1, 7.5);
        assert_eq!(a.gpus, vec![None, Some(7.5), None]);
    }

    #[test]
    fn deltas_need_both_ends() {
        let a = Reading {
            at_mono_ns: 0,
            gpus: vec![Some(1.0), None],
            zones: vec![Some(5.0)],
            cgroups: vec![("x".into(), 7)],
            sockets: vec![],
            gpu_util: vec![],
            gpu_stats: vec![],
            across: None,
            meter: None,
        };
        let b = Reading {
            at_mono_ns: 1,
            gpus: vec![Some(4.0), Some(1.0)],
            zones: vec![Some(4.0)],
            cgroups: vec![],
            sockets: vec![],
            gpu_util: vec![],
            gpu_stats: vec![],
            across: None,
            meter: None,
        };
        assert_eq!(a.gpu_delta(&b, 0), Some(3.0));
        assert_eq!(a.gpu_delta(&b, 1), None);
        assert_eq!(a.gpu_delta(&b, 9), None);
        assert_eq!(a.zone_delta(&b, 0), None, "went backwards");
        assert_eq!(a.cgroup_ns("x"), Some(7));
    }

    #[test]
    fn power_series_bins_constant_power() {
        // 100 W: 0.1 J per ms, samples every 10 ms from 0 to 1 s.
        let tr: Vec<_> = (0..=100)
            .map(|k| s(k * 10_000_000, k as f64 * 1.0))
            .collect();
        let (start, w) = power_series(&tr, 50_000_000, 950_000_000, 100_000_000, 600);
        assert_eq!(start, 50_000_000);
        assert_eq!(w.len(), 9);
        assert!(w.iter().all(|&p| (p - 100.0).abs() < 1e-3), "{w:?}");
        let (_, w) = power_series(&tr, 0, 1_000_000_000, 1_000_000, 5);
        assert_eq!(w.len(), 5, "capped");
        let (start, w) = power_series(&tr[50..], 0, 1_000_000_000, 100_000_000, 600);
        assert_eq!(
            (start, w.len()),
            (500_000_000, 5),
            "starts where the trace does"
        );
        let (_, w) = power_series(&tr, 0, 80_000_000, 100_000_000, 600);
        assert_eq!(w.len(), 1, "an interval shorter than a bin is one bin");
    }

    #[test]
    fn power_series_drops_a_short_last_bin() {
        // 100 W on a counter that steps every 20 ms (2 J), sampled every 10 ms.
        let tr: Vec<_> = (0..=100)
            .map(|k| s(k * 10_000_000, (k / 2 * 2) as f64))
            .collect();
        // 10..920 ms: nine full bins; the last 10 ms, across a step, would read 200 W.
        let (_, w) = power_series(&tr, 10_000_000, 920_000_000, 100_000_000, 600);
        assert_eq!(w.len(), 9);
        assert!(w.iter().all(|&p| (p - 100.0).abs() < 1e-3), "{w:?}");
    }

    #[test]
    fn window_selects_inclusive_range() {
        let tr = [s(1, 0.0), s(2, 0.0), s(3, 0.0), s(4, 0.0)];
        assert_eq!(window(&tr, 2, 3).len(), 2);
        assert_eq!(window(&tr, 5, 9).len(), 0);
        assert_eq!(window(&tr, 3, 2).len(), 0);
    }
}
