//! The GPU thread (`ergond-gpu`): every GPU's energy counter and power each tick, and the
//! per-process utilisation of shared GPUs about once a second.

use super::options::SamplerOptions;
use super::shared::{lock, GpuPart, Shared};
use super::ticker::Ticker;
use super::trace::TraceSample;
use crate::clock::monotonic_ns;
use crate::counter::{Method, Support};
use crate::sources::nvml::{GpuEnergyMeter, GpuReading, GpuSource};
use crate::update_clock::{Observed, UpdateClock};
use std::sync::atomic::Ordering;

/// How often the per-process utilisation of shared GPUs is read.
pub const PROCESS_UTIL_PERIOD_NS: u64 = 1_000_000_000;

/// The GPU thread.
pub(super) fn gpu_thread(mut src: GpuSource, opts: &SamplerOptions, shared: &Shared) {
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
