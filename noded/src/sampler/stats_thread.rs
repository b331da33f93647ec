//! The GPU statistics thread (`ergond-gpustat`): every GPU's utilisation, memory, temperature,
//! clocks, throttle and ECC counters at the CPU-time cadence, and the Xid events that arrived,
//! polled without blocking. Its own thread and NVML handle: these queries never delay the
//! energy sampler's ticks.

use super::options::SamplerOptions;
use super::ring::Ring;
use super::shared::{lock, Shared};
use super::ticker::Ticker;
use crate::clock::monotonic_ns;
use crate::gpustats::{WeightedSample, MAX_WEIGHT_PERIODS};
use crate::sources::nvml::{GpuStatsReader, GpuStatsSample};

/// Samples kept per GPU: at the default 100 ms, 25 s, several times the longest stretch the
/// job worker lets pass between two attribution intervals.
pub const STATS_CAPACITY: usize = 256;
/// Xid events kept per GPU between two attribution intervals.
pub const XID_CAPACITY: usize = 64;

/// One GPU's statistics as the thread publishes them.
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

/// The statistics thread.
pub(super) fn stats_thread(reader: GpuStatsReader, opts: &SamplerOptions, shared: &Shared) {
    let Some(part) = &shared.gpu_stats else {
        return;
    };
    let period = opts.cgroup_period.as_nanos() as u64;
    let watch = reader.xid_watch();
    {
        let mut p = lock(part);
        for (g, &s) in p.iter_mut().zip(&watch.supported) {
            g.xid_supported = s;
        }
    }
    let mut last_at: Vec<Option<u64>> = vec![None; reader.len()];
    let mut events = Vec::with_capacity(XID_CAPACITY);
    let mut ticker = Ticker::new(period);
    while ticker.wait(&shared.stop).is_some() {
        let samples: Vec<GpuStatsSample> = (0..reader.len()).map(|i| reader.sample(i)).collect();
        watch.drain(XID_CAPACITY, &mut events);
        let mut p = lock(part);
        // Stamped under the lock: a reader that copied the samples before has taken a window
        // ending before this instant, so the sample falls in the next window, never in none.
        let now = monotonic_ns();
        for (i, mut s) in samples.into_iter().enumerate() {
            s.at_ns = now;
            let weight_ns = last_at[i].map_or(period, |l| {
                s.at_ns.saturating_sub(l).min(MAX_WEIGHT_PERIODS * period)
            });
            last_at[i] = Some(s.at_ns);
            let g = &mut p[i];
            g.samples.push(WeightedSample {
                sample: s,
                weight_ns,
            });
            g.latest = Some(s);
        }
        for &(i, xid) in &events {
            if let Some(g) = p.get_mut(i) {
                g.xids.push((now, xid));
                g.xid_total += 1;
            }
        }
        drop(p);
        ticker.advance();
    }
}
