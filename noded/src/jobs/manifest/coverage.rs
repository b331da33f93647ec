//! The coverage of a job's manifest: its gaps (the job's own, and the stretches the sampler did
//! not run in), the part of its interval with readings or recovered energy, and per component.

use ergon_protocol::{ComponentCoverage, Gap};

use super::super::facts::NodeFacts;
use super::super::registry::Job;
use super::span::Span;
use crate::sources::rapl::RaplDomain;

/// Adds to `gaps` the job's own and the sampler's holes (`holes`, monotonic ns) over the job's
/// interval, sorted by start; returns the part of the interval with readings or recovered
/// energy (0 when the start was not seen or nothing is attributed).
pub(super) fn time_fraction(
    job: &Job,
    span: &Span,
    end_unix: u64,
    attributed: bool,
    holes: &[(u64, u64)],
    gaps: &mut Vec<Gap>,
) -> f64 {
    let (start, end) = (span.start, span.end);
    // Coverage: the part of the job's interval with readings or recovered energy.
    gaps.extend(job.gaps.iter().cloned());
    // Stretches the sampler did not run in while the job did (ergond stopped, hung, starved,
    // a driver call blocking): the counters carry the energy across them, so the totals are
    // whole, but the power trace has a hole there. Those already a gap are not repeated.
    let unix_of = |mono: u64| {
        start
            .unix_ns
            .saturating_add(mono)
            .saturating_sub(start.mono_ns)
    };
    for &(from, to) in holes {
        if to <= start.mono_ns || from >= end.mono_ns {
            continue;
        }
        let (a, b) = (
            unix_of(from.max(start.mono_ns)),
            unix_of(to.min(end.mono_ns)),
        );
        if gaps
            .iter()
            .any(|g| g.start_unix_ns < b && g.end_unix_ns > a)
        {
            continue;
        }
        gaps.push(Gap::new(
            a,
            b,
            "ergond's sampler did not run in this stretch (ergond stopped, hung or starved, or \
             a sensor read blocked); the energy over it is in the totals from the hardware \
             counters, the power trace has a hole",
            true,
        ));
    }
    gaps.sort_by_key(|g| g.start_unix_ns);
    // Unrecovered time is the union of the unrecovered gaps (two may cover the same outage).
    let mut spans: Vec<(u64, u64)> = job
        .gaps
        .iter()
        .filter(|g| !g.recovered)
        .map(|g| (g.start_unix_ns, g.end_unix_ns.max(g.start_unix_ns)))
        .collect();
    spans.sort_unstable();
    let mut unrecovered_ns: u64 = 0;
    let mut reach: u64 = 0;
    for (a, b) in spans {
        let a = a.max(reach);
        if b > a {
            unrecovered_ns += b - a;
        }
        reach = reach.max(b);
    }
    let span_ns = end_unix.saturating_sub(start.unix_ns);
    // The part of the job's interval with readings or recovered energy, then per component.
    if !(job.start_seen && attributed) {
        0.0
    } else if span_ns == 0 {
        if unrecovered_ns > 0 {
            0.0
        } else {
            1.0
        }
    } else {
        (1.0 - unrecovered_ns as f64 / span_ns as f64).clamp(0.0, 1.0)
    }
}

/// Coverage per component: each component the job has on this node covers `time_fraction` of
/// its interval, except GPUs whose allocation is unknown (0), GPUs not read for part of it
/// (`gpu_covered`, per GPU: the mean is taken), and CPU or DRAM figures the attribution did not
/// produce (0). A
/// component the job does not have (no GPU allocated, no RAPL zone) is `None`.
pub(super) fn component_coverage(
    time_fraction: f64,
    gpus_unknown: bool,
    gpu_covered: &[f64],
    facts: &NodeFacts,
    cpu_measured: bool,
    dram_measured: bool,
) -> ComponentCoverage {
    let has = |d: RaplDomain| {
        facts
            .zones
            .iter()
            .any(|z| z.socket.is_some() && z.domain == d)
    };
    let gpu = if gpus_unknown {
        Some(0.0)
    } else if !gpu_covered.is_empty() {
        Some(time_fraction * gpu_covered.iter().sum::<f64>() / gpu_covered.len() as f64)
    } else {
        None
    };
    let measured = |present: bool, measured: bool| {
        present.then_some(if measured { time_fraction } else { 0.0 })
    };
    ComponentCoverage {
        gpu,
        cpu: measured(has(RaplDomain::Package), cpu_measured),
        dram: measured(has(RaplDomain::Dram), dram_measured),
    }
}
