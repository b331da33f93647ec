//! The GPU statistics thread (`ergond-gpustat`): every GPU's utilisation, memory, temperature,
//! clocks, throttle and ECC counters at the CPU-time cadence, and the Xid events that arrived,
//! polled without blocking. Its own thread and NVML handle: these queries never delay the
//! energy sampler's ticks.

use super::options::SamplerOptions;
use super::shared::{lock, Shared, XID_CAPACITY};
use super::ticker::Ticker;
use crate::clock::monotonic_ns;
use crate::gpustats::{WeightedSample, MAX_WEIGHT_PERIODS};
use crate::sources::nvml::{GpuStatsReader, GpuStatsSample};

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
