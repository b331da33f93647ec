//! The CPU thread (`ergond-cpu`): RAPL every tick; the watched cgroups' CPU time and the
//! sockets' busy time on every n-th tick, so that both describe the same instants.

use super::options::SamplerOptions;
use super::shared::{lock, CpuPart, Shared};
use super::ticker::Ticker;
use super::trace::TraceSample;
use crate::clock::monotonic_ns;
use crate::counter::{EnergyCounter, EnergyTotals, Method, RawReading, Step};
use crate::sources::cgroup::{SocketBusy, SocketTimes};
use crate::sources::rapl::RaplSource;

/// The CPU thread: RAPL every tick, cgroups and sockets every `cgroup_every` ticks.
pub(super) fn cpu_thread_main(
    mut rapl: Option<RaplSource>,
    mut sockets: Option<SocketBusy>,
    opts: &SamplerOptions,
    base_period: u64,
    cgroup_every: u64,
    shared: &Shared,
) {
    let Some(part) = &shared.cpu else { return };
    let zones: Vec<_> = rapl
        .as_ref()
        .map(|r| r.zones().to_vec())
        .unwrap_or_default();
    let mut counters: Vec<EnergyCounter> = zones
        .iter()
        .map(|z| EnergyCounter::new(z.counter_spec(opts.cpu_max_power_w, 1.5)))
        .collect();
    let mut totals: Vec<EnergyTotals> = zones
        .iter()
        .map(|_| EnergyTotals::new(Method::Counter))
        .collect();
    let mut power: Vec<Option<f64>> = vec![None; zones.len()];
    let mut raw: Vec<u64> = Vec::with_capacity(zones.len());
    let mut socket_times: Vec<SocketTimes> =
        Vec::with_capacity(sockets.as_ref().map_or(0, |s| s.sockets().len()));
    let mut rapl_errors = 0u64;
    let mut socket_errors = 0u64;
    let mut last_slot: Option<u64> = None;
    let has_cpu_time = lock(part).cgroup.is_some();
    let mut ticker = Ticker::new(base_period);
    while let Some(lateness) = ticker.wait(&shared.stop) {
        // RAPL.
        let mut rapl_tick: Option<(u64, u64, u64)> = None; // (latency, at, errors)
        if let Some(r) = rapl.as_mut() {
            let before = monotonic_ns();
            let result = r.read(&mut raw);
            let after = monotonic_ns();
            let at = before + (after - before) / 2;
            let mut errs = 0;
            match result {
                Ok(()) => {
                    for (z, &value) in raw.iter().enumerate() {
                        let step = counters[z].update(RawReading { at_ns: at, value });
                        totals[z].add(&step);
                        power[z] = match step {
                            Step::Delta(d) if d.to_ns > d.from_ns => {
                                Some(d.joules / ((d.to_ns - d.from_ns) as f64 / 1e9))
                            }
                            _ => None,
                        };
                    }
                }
                Err(e) => {
                    errs = 1;
                    rapl_errors += 1;
                    if rapl_errors == 1 {
                        tracing::warn!(error = %e, "RAPL read failed (further failures are counted, not logged)");
                    }
                }
            }
            rapl_tick = Some((after - before, at, errs));
        }

        // cgroups and sockets, on the same tick.
        let slot = ticker.index() / cgroup_every;
        let mut cg_tick: Option<(u64, u64, u64, u64)> = None; // (latency, at, errors, missed)
        if has_cpu_time && last_slot != Some(slot) {
            let missed = last_slot.map_or(0, |l| slot.saturating_sub(l + 1));
            last_slot = Some(slot);
            let before = monotonic_ns();
            let mut errs = 0;
            let mut watched = lock(&shared.cgroups);
            let sockets_ok = match sockets.as_mut() {
                Some(s) => match s.read(&mut socket_times) {
                    Ok(()) => true,
                    Err(e) => {
                        errs += 1;
                        socket_errors += 1;
                        if socket_errors == 1 {
                            tracing::warn!(error = %e, "/proc/stat read failed (further failures are counted, not logged)");
                        }
                        false
                    }
                },
                None => false,
            };
            for w in watched.iter_mut() {
                match w.file.read_usage_ns() {
                    Ok(v) => {
                        w.cpu_ns = v;
                        w.fresh = true;
                    }
                    Err(e) => {
                        errs += 1;
                        w.read_errors += 1;
                        if w.read_errors == 1 {
                            tracing::warn!(cgroup = %w.path, error = %e, "cgroup CPU time read failed");
                        }
                    }
                }
            }
            let after = monotonic_ns();
            // One instant for the whole batch: the midpoint of the tick's CPU-time reads.
            let at = before + (after - before) / 2;
            for w in watched.iter_mut().filter(|w| w.fresh) {
                w.at_ns = at;
                w.fresh = false;
            }
            drop(watched);
            if !sockets_ok {
                socket_times.clear();
            }
            cg_tick = Some((after - before, at, errs, missed));
        }

        {
            let mut p = lock(part);
            let CpuPart {
                zones: zsnap,
                traces,
                sockets: ssnap,
                rapl: rh,
                cgroup: ch,
            } = &mut *p;
            if let (Some((latency, at, errs)), Some(h)) = (rapl_tick, rh.as_mut()) {
                if errs == 0 {
                    for (z, zs) in zsnap.iter_mut().enumerate() {
                        let t = &totals[z];
                        zs.energy_j = t.joules;
                        zs.power_w = power[z];
                        zs.wraps = t.wraps;
                        zs.dropped_intervals = t.dropped;
                        zs.at_ns = at;
                        let spec = counters[z].spec();
                        zs.raw_j = raw.get(z).map(|&v| v as f64 * spec.joules_per_unit);
                        zs.range_j = match spec.kind {
                            crate::counter::CounterKind::Wrapping { modulus } => {
                                Some(modulus as f64 * spec.joules_per_unit)
                            }
                            crate::counter::CounterKind::Resetting => None,
                        };
                        traces[z].push(TraceSample {
                            at_ns: at,
                            energy_j: t.joules,
                            power_w: power[z].map(|w| w as f32),
                        });
                    }
                }
                h.tick(at);
                h.record(latency, lateness, errs);
            }
            if let (Some((latency, at, errs, missed)), Some(h)) = (cg_tick, ch.as_mut()) {
                for (ss, t) in ssnap.iter_mut().zip(&socket_times) {
                    ss.busy_ns = t.busy_ns;
                    ss.total_ns = t.total_ns;
                    ss.at_ns = at;
                }
                h.record(latency, lateness, errs);
                h.missed_ticks += missed;
            }
        }
        let missed = ticker.advance();
        if missed > 0 {
            if let Some(h) = lock(part).rapl.as_mut() {
                h.missed_ticks += missed;
            }
        }
    }
}
