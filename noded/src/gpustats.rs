//! GPU efficiency statistics (pure): what one stretch of the `ergond-gpustat` thread's samples
//! says about a GPU ([`GpuWindow`], summarised from the samples by [`summarise`]), a job's
//! running figures on each GPU it holds, folded window by window ([`GpuJobStats`]), and the
//! manifest's `efficiency` section made from them ([`GpuJobStats::efficiency`]).
//!
//! Averages (SM utilisation, clocks) are time-weighted over the samples that reported the
//! value; maxima (memory used, temperature) are over those samples; throttle time and ECC
//! errors are differences of the driver's cumulative counters, taken from the job's start (or
//! its first sample) to its last sample, so they are exact over an ergond restart too (the
//! counters live in the driver); Xid events are the ones whose arrival fell in the job. A value
//! no sample reported is `None` ("not reported"), never 0.

use ergon_protocol::{GpuEfficiency, ThrottleSeconds, XidEvent};
use serde::{Deserialize, Serialize};

use crate::sources::nvml::GpuStatsSample;

/// The idle rule's default threshold: a GPU allocated to a job whose average SM utilisation
/// over the job is below this (%) sat idle (ergond's `[report] idle_gpu_util_percent`).
pub const DEFAULT_IDLE_GPU_UTIL_PERCENT: f64 = 5.0;

/// Apply the idle rule with `threshold_pct` to a manifest's GPUs (before it is sealed).
pub fn set_idle_threshold(m: &mut ergon_protocol::Manifest, threshold_pct: f64) {
    for e in m.gpus.iter_mut().filter_map(|g| g.efficiency.as_mut()) {
        e.idle_threshold_pct = threshold_pct;
        e.idle = e.sm_util_avg_pct.map(|u| u < threshold_pct);
    }
}

/// Most Xid events kept per job and GPU (the count goes on).
pub const MAX_XIDS: usize = 32;

/// A sample's weight is the time since the previous one, capped at this many sampling periods
/// (a longer stretch is a hole: ergond stopped or starved, not a measurement).
pub const MAX_WEIGHT_PERIODS: u64 = 3;

/// One stored sample: the reading and the time it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WeightedSample {
    /// The reading.
    pub sample: GpuStatsSample,
    /// The time it stands for (ns): since the previous sample, capped.
    pub weight_ns: u64,
}

/// What the samples of one GPU in `(from, to]` say.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GpuWindow {
    /// Time the samples stand for (ns).
    pub sampled_ns: u64,
    /// Σ utilisation % × weight (ns) over the samples that reported it, and their weight.
    pub util_pct_ns: f64,
    /// See `util_pct_ns`.
    pub util_ns: u64,
    /// Σ SM clock MHz × weight, and the weight.
    pub sm_clock_mhz_ns: f64,
    /// See `sm_clock_mhz_ns`.
    pub sm_clock_ns: u64,
    /// Σ memory clock MHz × weight, and the weight.
    pub mem_clock_mhz_ns: f64,
    /// See `mem_clock_mhz_ns`.
    pub mem_clock_ns: u64,
    /// Highest memory used (bytes).
    pub memory_max_bytes: Option<u64>,
    /// Highest temperature (°C).
    pub temperature_max_c: Option<u32>,
    /// The cumulative throttle counters (ns) at the window's last sample that had them.
    pub throttle_ns: [Option<u64>; 4],
    /// The cumulative ECC counters (corrected, uncorrected) at the last sample that had them.
    pub ecc: [Option<u64>; 2],
    /// Xid events that arrived in the window (monotonic ns, Xid); `None` when the GPU's Xid
    /// events are not reported.
    pub xids: Option<Vec<(u64, u64)>>,
}

/// The window `(from_ns, to_ns]` of `samples` (oldest first) and `xids` (`None`: not
/// reported). The counters are those of the last sample at or before `to_ns`, in the window or
/// not, so that an empty window still gives a job starting at `to_ns` its baseline.
pub fn summarise(
    samples: &[WeightedSample],
    xids: Option<&[(u64, u64)]>,
    from_ns: u64,
    to_ns: u64,
) -> GpuWindow {
    let mut w = GpuWindow::default();
    for s in samples.iter().filter(|s| s.sample.at_ns <= to_ns) {
        let (x, wt) = (&s.sample, s.weight_ns);
        for k in 0..4 {
            if x.throttle_ns[k].is_some() {
                w.throttle_ns[k] = x.throttle_ns[k];
            }
        }
        for (slot, v) in w.ecc.iter_mut().zip([x.ecc_corrected, x.ecc_uncorrected]) {
            if v.is_some() {
                *slot = v;
            }
        }
        if x.at_ns <= from_ns {
            continue;
        }
        w.sampled_ns += wt;
        if let Some(u) = x.util_pct {
            w.util_pct_ns += f64::from(u) * wt as f64;
            w.util_ns += wt;
        }
        if let Some(c) = x.sm_clock_mhz {
            w.sm_clock_mhz_ns += f64::from(c) * wt as f64;
            w.sm_clock_ns += wt;
        }
        if let Some(c) = x.mem_clock_mhz {
            w.mem_clock_mhz_ns += f64::from(c) * wt as f64;
            w.mem_clock_ns += wt;
        }
        w.memory_max_bytes = max_opt(w.memory_max_bytes, x.memory_used_bytes);
        w.temperature_max_c = max_opt(w.temperature_max_c, x.temperature_c);
    }
    w.xids = xids.map(|x| {
        x.iter()
            .copied()
            .filter(|&(at, _)| at > from_ns && at <= to_ns)
            .collect()
    });
    w
}

fn max_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// A cumulative driver counter followed over a job: the sum of its increases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CounterDelta {
    /// The last value seen.
    pub last: Option<u64>,
    /// The increases since the job's baseline; `None` while fewer than two values were seen.
    pub total: Option<u64>,
}

impl CounterDelta {
    /// Start from `baseline` (the counter at the job's start, if known).
    pub fn from_baseline(baseline: Option<u64>) -> Self {
        Self {
            last: baseline,
            total: baseline.map(|_| 0),
        }
    }

    /// A new value. A counter that went back (the driver reloaded) counts from 0 again.
    pub fn update(&mut self, v: Option<u64>) {
        let Some(v) = v else { return };
        if let Some(l) = self.last {
            let inc = if v >= l { v - l } else { v };
            self.total = Some(self.total.unwrap_or(0) + inc);
        }
        self.last = Some(v);
    }
}

/// A job's figures on one GPU, so far (journaled with the job: they survive a restart).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GpuJobStats {
    /// Time the samples stand for (ns).
    pub sampled_ns: u64,
    /// See [`GpuWindow`].
    pub util_pct_ns: f64,
    /// See [`GpuWindow`].
    pub util_ns: u64,
    /// See [`GpuWindow`].
    pub sm_clock_mhz_ns: f64,
    /// See [`GpuWindow`].
    pub sm_clock_ns: u64,
    /// See [`GpuWindow`].
    pub mem_clock_mhz_ns: f64,
    /// See [`GpuWindow`].
    pub mem_clock_ns: u64,
    /// Highest memory used (bytes).
    pub memory_max_bytes: Option<u64>,
    /// Highest temperature (°C).
    pub temperature_max_c: Option<u32>,
    /// Throttle counters per reason of [`crate::sources::nvml::THROTTLE_REASONS`].
    pub throttle: [CounterDelta; 4],
    /// ECC counters (corrected, uncorrected).
    pub ecc: [CounterDelta; 2],
    /// Xid events (monotonic ns, Xid), the first [`MAX_XIDS`]; `None` while not reported.
    pub xids: Option<Vec<(u64, u64)>>,
    /// Xid events in all.
    pub xid_count: u64,
}

impl GpuJobStats {
    /// A job starting with the counters of `at_start` (the window that ended at its start).
    pub fn starting(at_start: Option<&GpuWindow>) -> Self {
        let w = at_start.cloned().unwrap_or_default();
        Self {
            throttle: w.throttle_ns.map(CounterDelta::from_baseline),
            ecc: w.ecc.map(CounterDelta::from_baseline),
            ..Self::default()
        }
    }

    /// Fold in the next window.
    pub fn add(&mut self, w: &GpuWindow) {
        self.sampled_ns += w.sampled_ns;
        self.util_pct_ns += w.util_pct_ns;
        self.util_ns += w.util_ns;
        self.sm_clock_mhz_ns += w.sm_clock_mhz_ns;
        self.sm_clock_ns += w.sm_clock_ns;
        self.mem_clock_mhz_ns += w.mem_clock_mhz_ns;
        self.mem_clock_ns += w.mem_clock_ns;
        self.memory_max_bytes = max_opt(self.memory_max_bytes, w.memory_max_bytes);
        self.temperature_max_c = max_opt(self.temperature_max_c, w.temperature_max_c);
        for (c, v) in self.throttle.iter_mut().zip(w.throttle_ns) {
            c.update(v);
        }
        for (c, v) in self.ecc.iter_mut().zip(w.ecc) {
            c.update(v);
        }
        if let Some(x) = &w.xids {
            let list = self.xids.get_or_insert_with(Vec::new);
            for &e in x {
                self.xid_count += 1;
                if list.len() < MAX_XIDS {
                    list.push(e);
                }
            }
        }
    }

    /// Average SM utilisation (%), if reported.
    pub fn util_avg_pct(&self) -> Option<f64> {
        (self.util_ns > 0).then(|| self.util_pct_ns / self.util_ns as f64)
    }

    /// The manifest's section: `duration_ns` is the job's interval on the node (to say whether
    /// the samples cover it), `to_unix` turns a monotonic instant into Unix ns, and
    /// `idle_threshold_pct` is the idle rule's threshold.
    pub fn efficiency(
        &self,
        duration_ns: u64,
        to_unix: impl Fn(u64) -> u64,
        idle_threshold_pct: f64,
    ) -> GpuEfficiency {
        let avg = |sum: f64, ns: u64| (ns > 0).then(|| round2(sum / ns as f64));
        let util = self.util_avg_pct().map(round2);
        let secs = |c: &CounterDelta| c.total.map(|ns| round3(ns as f64 / 1e9));
        // Samples covering less than 90 % of the job (ergond was down or restarted during it,
        // or the job is shorter than a few sampling periods): the averages and maxima are over
        // the part sampled.
        let missing = duration_ns.saturating_sub(self.sampled_ns);
        let partial = missing > duration_ns / 10 && missing > 2_000_000_000;
        GpuEfficiency {
            sampled_s: round3(self.sampled_ns as f64 / 1e9),
            partial,
            sm_util_avg_pct: util,
            idle: util.map(|u| u < idle_threshold_pct),
            idle_threshold_pct,
            memory_used_max_bytes: self.memory_max_bytes,
            temperature_max_c: self.temperature_max_c,
            sm_clock_avg_mhz: avg(self.sm_clock_mhz_ns, self.sm_clock_ns),
            mem_clock_avg_mhz: avg(self.mem_clock_mhz_ns, self.mem_clock_ns),
            throttle_s: ThrottleSeconds {
                power_cap: secs(&self.throttle[0]),
                sw_thermal: secs(&self.throttle[1]),
                hw_thermal: secs(&self.throttle[2]),
                hw_power_brake: secs(&self.throttle[3]),
            },
            ecc_corrected: self.ecc[0].total,
            ecc_uncorrected: self.ecc[1].total,
            xid_count: self.xids.as_ref().map(|_| self.xid_count),
            xids: self.xids.as_ref().map(|x| {
                x.iter()
                    .map(|&(at, xid)| XidEvent {
                        at_unix_ns: to_unix(at),
                        xid,
                    })
                    .collect()
            }),
        }
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: u64, util: Option<u32>, mem: Option<u64>, thr: Option<u64>) -> WeightedSample {
        WeightedSample {
            sample: GpuStatsSample {
                at_ns: at_s * 1_000_000_000,
                util_pct: util,
                memory_used_bytes: mem,
                throttle_ns: [thr, None, None, None],
                ..Default::default()
            },
            weight_ns: 1_000_000_000,
        }
    }

    #[test]
    fn a_window_weights_what_was_reported_and_keeps_the_last_counters() {
        let s = [
            sample(1, Some(10), Some(5), Some(100)),
            sample(2, None, Some(9), None),
            sample(3, Some(30), Some(7), Some(300)),
            sample(4, Some(99), Some(99), Some(999)),
        ];
        let w = summarise(
            &s,
            Some(&[(2_500_000_000, 79), (9_000_000_000, 48)]),
            0,
            3_000_000_000,
        );
        assert_eq!(w.sampled_ns, 3_000_000_000);
        assert_eq!(
            w.util_ns, 2_000_000_000,
            "the sample without utilisation is left out"
        );
        assert_eq!(w.util_pct_ns / w.util_ns as f64, 20.0);
        assert_eq!(w.memory_max_bytes, Some(9));
        assert_eq!(w.throttle_ns[0], Some(300));
        assert_eq!(w.throttle_ns[1], None, "not reported stays not reported");
        assert_eq!(w.xids, Some(vec![(2_500_000_000, 79)]));
        assert_eq!(summarise(&s, None, 0, 1).xids, None);
    }

    #[test]
    fn a_job_counts_counter_increases_from_its_start_and_never_invents_values() {
        let start = GpuWindow {
            throttle_ns: [Some(1_000_000_000), None, None, None],
            ..Default::default()
        };
        let mut j = GpuJobStats::starting(Some(&start));
        j.add(&GpuWindow {
            sampled_ns: 2_000_000_000,
            util_pct_ns: 2.0 * 2e9,
            util_ns: 2_000_000_000,
            throttle_ns: [Some(1_500_000_000), None, None, None],
            ecc: [Some(4), None],
            xids: Some(vec![(5, 79)]),
            ..Default::default()
        });
        j.add(&GpuWindow {
            sampled_ns: 2_000_000_000,
            util_pct_ns: 0.0,
            util_ns: 2_000_000_000,
            throttle_ns: [Some(2_000_000_000), None, None, None],
            ecc: [Some(6), None],
            xids: Some(vec![]),
            ..Default::default()
        });
        let e = j.efficiency(4_000_000_000, |m| m + 10, 5.0);
        assert_eq!(e.sm_util_avg_pct, Some(1.0));
        assert_eq!(e.idle, Some(true));
        assert_eq!(e.throttle_s.power_cap, Some(1.0));
        assert_eq!(e.throttle_s.sw_thermal, None);
        assert_eq!(e.ecc_corrected, Some(2), "from its first value on");
        assert_eq!(e.ecc_uncorrected, None);
        assert_eq!(e.memory_used_max_bytes, None);
        assert_eq!(e.temperature_max_c, None);
        assert_eq!(e.sm_clock_avg_mhz, None);
        assert_eq!(e.xid_count, Some(1));
        assert_eq!(
            e.xids.as_ref().map(|x| (x[0].at_unix_ns, x[0].xid)),
            Some((15, 79))
        );
        assert!(!e.partial);
        let none = GpuJobStats::starting(None).efficiency(10_000_000_000, |m| m, 5.0);
        assert_eq!((none.idle, none.xids, none.xid_count), (None, None, None));
        assert!(none.partial, "nothing sampled over 10 s");
    }

    #[test]
    fn a_counter_that_goes_back_restarts_from_zero() {
        let mut c = CounterDelta::from_baseline(Some(100));
        c.update(Some(150));
        c.update(Some(20));
        c.update(None);
        assert_eq!(c.total, Some(70));
    }
}
